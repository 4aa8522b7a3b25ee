"""KServe v2 binary tensors: a real ``trainenv serve`` on 127.0.0.1 (stdlib and gunicorn) and
the real ``tritonclient[http]`` client in both directions (FP32, FP16, INT64, BOOL, BYTES, binary
and JSON), hostile ``Inference-Header-Content-Length`` / ``binary_data_size`` values over a raw
socket (400 JSON each, the server keeps serving), and the raw codec itself."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest

from support import SERVERS, Server, make_base
from trainenv.serving.api import BadRequest
from trainenv.serving.protocols import binary, kserve

np = pytest.importorskip("numpy")
httpclient = pytest.importorskip("tritonclient.http")

HANDLER = """
import numpy


def model_fn(model_dir):
    return None


def predict_fn(data, model):
    if not isinstance(data, dict):
        data = {"f32": data}  # one input comes alone
    out = {"seen": [f"{name}:{_kind(value)}" for name, value in data.items()]}
    for name, value in data.items():
        if name == "plain":
            out[name] = value  # nested Python lists: the datatype is inferred
        elif name == "text":
            out[name] = ["é" + (v.decode() if isinstance(v, bytes) else v) for v in value]
        else:
            dtype = object if name.startswith("s") else {"f16": "float16", "f32": "float32", "i64": "int64", "b": "bool"}.get(name)
            if name == "bf16":
                import ml_dtypes

                dtype = ml_dtypes.bfloat16
            out[name] = numpy.asarray(value, dtype=dtype)
    return out


def _kind(value):
    while isinstance(value, list):
        value = value[0]
    return type(value).__name__
"""


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp(f"binary-{request.param}"), HANDLER)
    srv = Server(base, {"TRAINENV_SERVER": request.param}, argv=[sys.executable, "-m", "trainenv", "serve"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()  # also when it never got ready: no server outlives the test
    assert code == 0, srv.log
    assert "Traceback" not in srv.log and "internal error" not in srv.log, srv.log


def _inputs(binary_data: bool, raw_bytes: bool):
    arrays = {
        "f32": np.array([[1.5, -2.25, 3.0], [0.0, 1e-3, -7.5]], dtype=np.float32),
        "f16": np.array([0.5, -1.25], dtype=np.float16),
        "i64": np.array([[2**40, -3], [7, 0]], dtype=np.int64),
        "b": np.array([True, False, True], dtype=bool),
        "s": np.array([b"ab", "é".encode(), b""] + ([b"\xff\x00raw"] if raw_bytes else []), dtype=object),
    }
    inputs = []
    for name, array in arrays.items():
        datatype = {"f32": "FP32", "f16": "FP16", "i64": "INT64", "b": "BOOL", "s": "BYTES"}[name]
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary_data)
        inputs.append(tensor)
    return arrays, inputs


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_tritonclient_round_trip(server, binary_in, binary_out):
    arrays, inputs = _inputs(binary_in, raw_bytes=binary_in and binary_out)  # JSON carries UTF-8 only
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary_out) for name in [*arrays, "seen"]]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        result = client.infer("model", inputs, outputs=outputs, request_id="r1")
    finally:
        client.close()
    response = result.get_response()
    assert response["id"] == "r1"
    assert {o["name"]: "parameters" in o for o in response["outputs"]} == {n: binary_out for n in [*arrays, "seen"]}
    for name, sent in arrays.items():
        got = result.as_numpy(name)
        assert got.shape == sent.shape, name
        if name == "s":
            assert [bytes(v) if binary_out else v.encode() for v in got.reshape(-1)] == list(sent)
        else:
            assert got.dtype == sent.dtype and (got == sent).all(), (name, got)
    seen = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("seen")]
    text_kind = "bytes" if binary_in else "str"  # BYTES elements sent binary arrive as bytes
    assert seen == ["f32:float", "f16:float", "i64:int", "b:bool", f"s:{text_kind}"]


def test_default_request_gets_every_output_binary(server):
    """No outputs named: tritonclient asks ``binary_data_output`` and reads the header back."""
    plain = httpclient.InferInput("plain", [2, 2], "INT64")
    plain.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.int64))
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"a", b"bc"], dtype=object))
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        result = client.infer("model", [plain, text])
    finally:
        client.close()
    assert all(o["parameters"]["binary_data_size"] >= 0 for o in result.get_response()["outputs"])
    assert result.as_numpy("plain").tolist() == [[1, 2], [3, 4]]
    assert [bytes(v) for v in result.as_numpy("text")] == ["éa".encode(), "ébc".encode()]


def test_tritonclient_bf16(server):
    """BF16 goes binary only (tritonclient refuses it as JSON); ml_dtypes arrays come back as BF16."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sent = np.array([[1.0, -2.5], [0.15625, 3e38]], dtype=ml_dtypes.bfloat16)
    tensor = httpclient.InferInput("bf16", [2, 2], "BF16")
    tensor.set_data_from_numpy(sent, binary_data=True)
    flag = httpclient.InferInput("b", [1], "BOOL")  # a second input: predict_fn gets them by name
    flag.set_data_from_numpy(np.array([True]))
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        result = client.infer("model", [tensor, flag], outputs=[httpclient.InferRequestedOutput("bf16")])
    finally:
        client.close()
    got = result.as_numpy("bf16")
    assert got.dtype == sent.dtype and got.tolist() == sent.tolist()


def test_raw_response_framing(server):
    """A binary answer: the header names the JSON part's length; octet-stream; the data follows."""
    header = json.dumps(
        {
            "inputs": [{"name": "f32", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}],
            "outputs": [{"name": "f32", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = header + struct.pack("<2f", 1.0, -2.0)
    status, headers, answer = server.post(
        body, content_type="application/octet-stream", path="/v2/models/model/infer",
        Inference_Header_Content_Length=str(len(header)),
    )
    assert status == 200, answer
    length = int(headers["Inference-Header-Content-Length"])
    assert headers["Content-Type"] == "application/octet-stream"
    document = json.loads(answer[:length])
    assert document["outputs"] == [
        {"name": "f32", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
    ]
    assert struct.unpack("<2f", answer[length:]) == (1.0, -2.0)
    status, _, answer = server.request("GET", "/v2")
    assert "binary_tensor_data" in json.loads(answer)["extensions"]


def _raw(port: int, header_length: str, body: bytes) -> bytes:
    return (
        f"POST /v2/models/model/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _request(*inputs: dict) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


F32 = {"name": "f32", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
S = {"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}
GOOD = _request(F32)
HOSTILE = {
    "length beyond the body": (str(len(GOOD) + 9), GOOD + bytes(8), "past the end of the body"),
    "negative length": ("-5", GOOD + bytes(8), "not a non-negative integer"),
    "non-numeric length": ("abc", GOOD + bytes(8), "not a non-negative integer"),
    "huge length": ("9" * 5000, GOOD + bytes(8), "past the end of the body"),
    "length 1e3": ("1e3", GOOD + bytes(8), "not a non-negative integer"),
    "header not JSON": ("3", GOOD + bytes(8), "not valid JSON"),
    "data past the body": (str(len(GOOD)), GOOD + bytes(4), "reaches past the end of the body"),
    "size not the element count x 4": (
        None, _request({**F32, "parameters": {"binary_data_size": 6}}), "2 elements of FP32 take 8 bytes, binary_data_size is 6"
    ),
    "negative size": (None, _request({**F32, "parameters": {"binary_data_size": -8}}), "binary_data_size must be a non-negative integer"),
    "string size": (None, _request({**F32, "parameters": {"binary_data_size": "8"}}), "binary_data_size must be a non-negative integer"),
    "bool size": (None, _request({**F32, "parameters": {"binary_data_size": True}}), "binary_data_size must be a non-negative integer"),
    "data and binary both": (None, _request({**F32, "data": [1, 2]}), 'both "data" and binary_data_size'),
    "bytes left over": (str(len(GOOD)), GOOD + bytes(12), "4 bytes after the last binary input"),
    "BYTES: too few elements": (None, _request({**S, "parameters": {"binary_data_size": 5}}), "holds 1 element(s), the shape needs 2"),
    "BYTES: element past the tensor": (None, _request(S), "element 1 runs past the tensor"),
    "BYTES: cut length prefix": (None, _request({**S, "parameters": {"binary_data_size": 7}}), "element 1 runs past the tensor"),
    "zero dimension, ten million empty lists": (
        None, _request({**F32, "shape": [10000000, 0], "parameters": {"binary_data_size": 0}}), "nested lists"
    ),
}
_TAILS = {
    "size not the element count x 4": bytes(6),
    "negative size": bytes(8),
    "string size": bytes(8),
    "bool size": bytes(8),
    "data and binary both": bytes(8),
    "BYTES: too few elements": struct.pack("<I", 1) + b"a",
    "BYTES: element past the tensor": struct.pack("<I", 1) + b"a" + struct.pack("<I", 100),
    "BYTES: cut length prefix": struct.pack("<I", 1) + b"a" + b"\x01\x00",
    "zero dimension, ten million empty lists": b"",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_binary_requests_are_400(server, case):
    length, body, fragment = HOSTILE[case]
    if length is None:  # the JSON part is the whole header; the binary tail follows
        length = str(len(body))
        body += _TAILS[case]
    answer = server.send_raw(_raw(server.port, length, body))
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    error = json.loads(payload)["error"]
    assert fragment in error, error
    assert "Traceback" not in error
    # The server keeps serving: the same shape, well-formed, is answered.
    good = GOOD + struct.pack("<2f", 1.0, 2.0)
    status, _, out = server.post(good, path="/v2/models/model/infer", Inference_Header_Content_Length=str(len(GOOD)))
    assert status == 200, out


def test_body_cap_covers_the_binary_part(tmp_path):
    base = make_base(tmp_path, HANDLER)
    srv = Server(base, {"TRAINENV_SERVING_MAX_REQUEST_BYTES": "1000"}, argv=[sys.executable, "-m", "trainenv", "serve"])
    try:
        srv.wait_ready()
        header = _request({**F32, "shape": [250], "parameters": {"binary_data_size": 1000}})
        status, _, out = srv.post(
            header + bytes(1000), path="/v2/models/model/infer", Inference_Header_Content_Length=str(len(header))
        )
        assert status == 413, out
    finally:
        assert srv.stop() == 0, srv.log


# -- the raw codec, every datatype ----------------------------------------------------------------


@pytest.mark.parametrize(
    "datatype, values",
    [
        ("BOOL", [True, False]),
        ("UINT8", [0, 255]),
        ("UINT16", [0, 65535]),
        ("UINT32", [0, 2**32 - 1]),
        ("UINT64", [0, 2**64 - 1]),
        ("INT8", [-128, 127]),
        ("INT16", [-(2**15), 2**15 - 1]),
        ("INT32", [-(2**31), 2**31 - 1]),
        ("INT64", [-(2**63), 2**63 - 1]),
        ("FP16", [0.5, -65504.0]),
        ("FP32", [1.5, -0.25]),
        ("FP64", [1e300, -1e-300]),
        ("BF16", [1.0, -2.5]),
        ("BYTES", [b"", b"\x00\xff", "é"]),
    ],
)
def test_codec_round_trips_every_datatype(datatype, values):
    raw = binary.encode(values, datatype)
    expected = [v.encode() if isinstance(v, str) else v for v in values]
    assert binary.decode(raw, datatype, len(values), "input 'x'") == expected
    if datatype not in ("BYTES", "BF16"):  # numpy agrees on the bytes (little-endian, row-major)
        numpy_type = {"BOOL": "bool", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.get(datatype, datatype.lower())
        assert raw == np.array(values, dtype=numpy_type).tobytes()


def test_codec_bf16_rounds_and_keeps_nan():
    raw = binary.encode([1.00390625, float("nan")], "BF16")  # halfway between 1.0 and 1.0078125: to even
    one, nan = binary.decode(raw, "BF16", 2, "x")
    assert one == 1.0 and math.isnan(nan)


def test_codec_refuses_values_its_type_cannot_hold():
    with pytest.raises(TypeError, match="UINT8"):
        binary.encode([256], "UINT8")
    with pytest.raises(TypeError, match="FP16"):
        binary.encode([1e10], "FP16")
    with pytest.raises(BadRequest, match="BYTES element 0 runs past the tensor"):
        binary.decode(b"\x05\x00\x00\x00ab", "BYTES", 1, "input 'x'")


def test_json_output_of_non_utf8_bytes_asks_for_binary():
    request = kserve.V2Request(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}')
    with pytest.raises(TypeError, match="binary_data"):
        kserve.answer(request, [b"\xff"], "m", None)
