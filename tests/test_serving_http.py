"""End-to-end tests: a real ``python -m trainenv.serving`` process on 127.0.0.1 (ephemeral
port), a real HTTP client. Every route family, the failure-probe table of docs/serving.md,
readiness, timeouts, saturation, SIGTERM drain and start-up failures, against the stdlib
server and (when gunicorn is importable) gunicorn."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from support import SERVERS, TRAINENV, Server, error_of, make_tree, run_train
from support import make_base as _make_base

MIB = 1024 * 1024

HANDLER = """
import os
import time

from trainenv.serving import HTTPError, Response

MODEL_SLEEP = float(os.environ.get("TEST_MODEL_SLEEP", "0"))


def model_fn(model_dir):
    time.sleep(MODEL_SLEEP)
    return {"dir": model_dir}


def predict_fn(data, model, context):
    if not isinstance(data, (int, float, str, list, dict)):
        return data  # e.g. a numpy array from an .npy body
    if data == 13:
        raise ValueError("thirteen is unlucky")
    if data == "leak":
        raise RuntimeError("cannot reach https://user:" + os.environ["TEST_API_TOKEN"] + "@db.example/x")
    if data == "created":
        return Response(b"made", 201, "text/plain", {"X-Custom": "yes", "Connection": "upgrade", "Bad Name": "x"})
    if data == "context" or data == ["context"]:
        seen = {"request_id": context.request_id, "target": context.target_model,
                "route": context.route, "parameters": context.parameters}
        return seen if data == "context" else [seen]
    if data == "burn":                       # CPU-bound for 3 s: cannot be interrupted
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            pass
    if data == "sleep":
        time.sleep(1.0)
    if data == "hold":
        time.sleep(1.5)
    if isinstance(data, dict) and "status" in data:
        raise HTTPError(data["status"], "asked for it")
    return data


def ready_fn(model):
    return not os.path.exists(os.path.join(model["dir"], "unready"))


def execution_parameters_fn():
    return {"MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 6}
"""


def make_base(root: Path, handler: str = HANDLER) -> Path:
    return _make_base(root, handler)


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tmp_path_factory):
    """One server per kind for the route and probe tests (threads=4, 6 MiB limit, Vertex on)."""
    base = make_base(tmp_path_factory.mktemp(f"serve-{request.param}"))
    srv = Server(
        base,
        {
            "TRAINENV_SERVER": request.param,
            "TRAINENV_SERVING_TIMEOUT": "1",
            "AIP_HEALTH_ROUTE": "/vertex/health",
            "AIP_PREDICT_ROUTE": "/vertex/predict",
            "TRAINENV_SERVING_MODEL_NAME": "echo",
            "TEST_API_TOKEN": "s3cr3t-value-123",
        },
    )
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log


# -- route families -----------------------------------------------------------------------------


def test_sagemaker_routes(server):
    status, headers, body = server.request("GET", "/ping")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    status, headers, body = server.request("HEAD", "/ping")
    assert status == 200 and body == b""
    status, headers, body = server.post(b"[[1, 2]]")
    assert (status, headers["Content-Type"], json.loads(body)) == (200, "application/json", [[1, 2]])
    assert headers["X-Request-Id"]
    status, _, body = server.request("GET", "/execution-parameters")
    assert status == 200 and json.loads(body)["BatchStrategy"] == "MULTI_RECORD"


def test_client_request_id_is_echoed(server):
    status, headers, _ = server.post(b"[1]", X_Request_Id="abc-123")
    assert status == 200 and headers["X-Request-Id"] == "abc-123"


def test_kserve_v2_routes(server):
    assert server.request("GET", "/v2/health/live")[0] == 200
    assert server.request("GET", "/v2/health/ready")[0] == 200
    assert server.request("GET", "/v2/models/echo/ready")[0] == 200
    status, _, body = server.request("GET", "/v2")
    assert status == 200 and json.loads(body)["name"] == "trainenv"
    status, _, body = server.request("GET", "/v2/models/echo")
    assert status == 200 and json.loads(body)["name"] == "echo"
    request = {
        "id": "q1",
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}],
    }
    status, _, body = server.post(json.dumps(request).encode(), path="/v2/models/echo/infer")
    assert status == 200
    assert json.loads(body) == {
        "model_name": "echo",
        "id": "q1",
        "outputs": [{"name": "output0", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}],
    }
    status, _, body = server.post(json.dumps(request).encode(), path="/v2/models/echo/versions/3/infer")
    assert status == 200 and json.loads(body)["model_version"] == "3"
    status, _, body = server.post(json.dumps(request).encode(), path="/v2/models/other/infer")
    assert status == 404 and "other" in json.loads(body)["error"]
    status, _, body = server.post(
        b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1]}]}',
        path="/v2/models/echo/infer",
    )
    assert status == 400 and "needs 3 elements" in json.loads(body)["error"]
    status, headers, _ = server.request("GET", "/v2/models/echo/infer")
    assert status == 405 and headers["Allow"] == "POST"


def test_vertex_routes(server):
    assert server.request("GET", "/vertex/health")[0] == 200
    status, _, body = server.post(
        b'{"instances": [[1, 2], [3, 4]], "parameters": {"k": 1}}', path="/vertex/predict"
    )
    assert (status, json.loads(body)) == (200, {"predictions": [[1, 2], [3, 4]]})
    status, _, body = server.post(b'{"inputs": [1]}', path="/vertex/predict")
    assert status == 400 and "instances" in error_of(body)["message"]


def test_deep_health_check_with_ready_fn(server):
    flag = server.base / "model" / "unready"
    flag.write_text("")
    try:
        status, headers, body = server.request("GET", "/ping")
        assert status == 503 and headers["Retry-After"] == "1"
        assert "ready_fn returned false" in error_of(body)["message"]
        assert server.request("GET", "/v2/health/ready")[0] == 503
        assert server.request("GET", "/v2/health/live")[0] == 200
    finally:
        flag.unlink()
    assert server.request("GET", "/ping")[0] == 200


def test_hooks_get_a_context_when_they_ask(server):
    status, _, body = server.post(
        b'"context"', X_Request_Id="ctx-1", X_Amzn_SageMaker_Target_Model="m.tar.gz"
    )
    assert (status, json.loads(body)) == (
        200,
        {"request_id": "ctx-1", "target": "m.tar.gz", "route": "/invocations", "parameters": None},
    )
    status, _, body = server.post(
        b'{"instances": ["context"], "parameters": {"k": 2}}', path="/vertex/predict"
    )
    assert status == 200
    prediction = json.loads(body)["predictions"][0]
    assert prediction["route"] == "vertex" and prediction["parameters"] == {"k": 2}


def test_response_objects_keep_status_and_safe_headers(server):
    status, headers, body = server.post(b'"created"')
    assert (status, body, headers["Content-Type"], headers["X-Custom"]) == (201, b"made", "text/plain", "yes")
    assert headers.get("Connection") != "upgrade" and "Bad Name" not in headers


def test_secrets_never_reach_the_body_or_the_log(server):
    status, _, body = server.post(b'"leak"')
    assert status == 500
    message = error_of(body)["message"]
    assert "s3cr3t-value-123" not in message and "user:" not in message and "***" in message
    server.wait_for(r"ERROR request .* failed: predict_fn raised RuntimeError", 5)
    assert "s3cr3t-value-123" not in server.log


# -- the failure-probe table of docs/serving.md ------------------------------------------------------


def test_probe_valid_json(server):
    status, headers, body = server.post(b"[[1,2]]")
    assert (status, headers["Content-Type"], body) == (200, "application/json", b"[[1,2]]")


def test_probe_charset_parameter(server):
    status, _, body = server.post(b"[[1,2]]", "application/json; charset=utf-8")
    assert (status, body) == (200, b"[[1,2]]")
    status, _, body = server.post('{"é": 1}'.encode("utf-16"), "Application/JSON; Charset=UTF-16")
    assert (status, json.loads(body)) == (200, {"é": 1})


def test_probe_missing_content_type_means_json(server):
    status, _, body = server.post(b"[[1,2]]", content_type=None)
    assert (status, body) == (200, b"[[1,2]]")


def test_probe_malformed_json_is_400(server):
    status, headers, body = server.post(b'{"a": ')
    assert status == 400 and headers["Content-Type"] == "application/json"
    error = error_of(body)
    assert error["error"] == "bad_request" and "not valid JSON" in error["message"]


def test_probe_text_plain_is_decoded_as_text(server):
    status, _, body = server.post(b"hello", "text/plain")
    assert (status, json.loads(body)) == (200, "hello")


def test_probe_unsupported_content_type_is_415(server):
    status, _, body = server.post(b"<a/>", "application/xml")
    assert status == 415 and error_of(body)["error"] == "unsupported_media_type"
    status, _, body = server.post(b"[1]", "not a media type")
    assert status == 415


def test_probe_accept_xml_is_406(server):
    status, _, body = server.post(b"[1]", Accept="application/xml")
    assert status == 406 and error_of(body)["error"] == "not_acceptable"


def test_probe_accept_csv(server):
    status, headers, body = server.post(b"[[1,2],[3,4]]", Accept="text/csv")
    assert (status, headers["Content-Type"], body) == (200, "text/csv", b"1,2\n3,4\n")


def test_probe_accept_with_q_weight(server):
    status, headers, body = server.post(b"[1]", Accept="application/json;q=0.9")
    assert (status, headers["Content-Type"]) == (200, "application/json")
    status, headers, _ = server.post(b"[[1]]", Accept="application/json;q=0.4, text/csv;q=0.8, */*;q=0.1")
    assert (status, headers["Content-Type"]) == (200, "text/csv")


def test_probe_handler_value_error_is_500_json(server):
    status, headers, body = server.post(b"13")
    assert status == 500 and headers["Content-Type"] == "application/json"
    error = error_of(body)
    assert error["error"] == "internal_server_error"
    assert "predict_fn raised ValueError: thirteen is unlucky" in error["message"]
    server.wait_for(r"ERROR request .* failed: predict_fn raised ValueError", 5)
    assert "Traceback" in server.log


def test_probe_handler_http_error_keeps_status(server):
    status, _, body = server.post(b'{"status": 422}')
    assert status == 422 and error_of(body) == {
        "error": "unprocessable_entity",
        "message": "asked for it",
        "request_id": json.loads(body)["request_id"],
    }
    status, _, _ = server.post(b'{"status": 429}')
    assert status == 429


def test_probe_get_invocations_is_405_with_allow(server):
    status, headers, body = server.request("GET", "/invocations")
    assert status == 405 and headers["Allow"] == "POST"
    assert error_of(body)["error"] == "method_not_allowed"


def test_probe_unknown_path_is_404_json(server):
    status, _, body = server.request("GET", "/nope")
    assert status == 404 and error_of(body)["error"] == "not_found"


def test_probe_8_mib_body_with_6_mib_limit_is_413(server):
    body = b"[" + b"1," * (4 * MIB) + b"1]"
    assert len(body) > 8 * MIB
    status, headers, answer = server.post(body)
    assert status == 413 and error_of(answer)["error"] == "payload_too_large"
    assert server.post(b"[1]")[0] == 200


def test_npy_round_trip_without_pickle(server):
    numpy = pytest.importorskip("numpy")
    import io

    buffer = io.BytesIO()
    numpy.save(buffer, numpy.arange(6, dtype="float32").reshape(2, 3))
    status, headers, body = server.post(buffer.getvalue(), "application/x-npy", Accept="application/x-npy")
    assert status == 200 and headers["Content-Type"] == "application/x-npy"
    array = numpy.load(io.BytesIO(body), allow_pickle=False)
    assert array.dtype == numpy.float32 and array.tolist() == [[0, 1, 2], [3, 4, 5]]
    pickled = io.BytesIO()
    numpy.save(pickled, numpy.array([{"evil": 1}], dtype=object), allow_pickle=True)
    status, _, body = server.post(pickled.getvalue(), "application/x-npy")
    assert status == 400 and "pickled" in error_of(body)["message"]


def test_chunked_bodies_are_read_and_capped(server):
    def chunked(parts):
        conn = server.connection()
        try:
            conn.request(
                "POST",
                "/invocations",
                body=iter(parts),
                headers={"Content-Type": "application/json"},
                encode_chunked=True,
            )
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    assert chunked([b"[1,", b"2]"]) == (200, b"[1,2]")
    status, body = chunked([b"[" + b"0," * MIB] * 4 + [b"0]"])
    assert status == 413 and error_of(body)["error"] == "payload_too_large"


def test_keep_alive_is_fast(server):
    """200 sequential requests on one keep-alive connection: no Nagle/delayed-ACK stall (44 ms each)."""
    conn = server.connection()
    started = time.monotonic()
    for _ in range(200):
        conn.request("POST", "/invocations", body=b"[0.1, 0.2]", headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"[0.1,0.2]"
    elapsed = time.monotonic() - started
    conn.close()
    assert elapsed < 2.0, f"200 keep-alive requests took {elapsed:.2f} s"


def test_ping_is_not_logged_at_info_unless_it_is_answered_an_error(server):
    server.request("GET", "/ping")
    server.request("DELETE", "/ping", headers={"X-Request-Id": "wrong-method"})
    server.post(b"[1]", X_Request_Id="logged-at-info")
    server.wait_for(r'INFO .*"POST /invocations" 200 .* logged-at-info', 5)
    assert '"GET /ping"' not in server.log
    assert re.search(r'INFO .*"DELETE /ping" 405 .* wrong-method', server.log), server.log


def test_timeout_is_504_and_the_next_request_succeeds(server):
    started = time.monotonic()
    status, _, body = server.post(b'"burn"')
    elapsed = time.monotonic() - started
    assert status == 504 and error_of(body)["error"] == "gateway_timeout"
    assert elapsed < 2.5, elapsed
    status, _, body = server.post(b"[1]")
    assert (status, body) == (200, b"[1]")


# -- stdlib-only behaviours --------------------------------------------------------------------------


def test_saturated_pool_answers_503_with_retry_after(tmp_path):
    srv = Server(make_base(tmp_path), {"TRAINENV_SERVING_THREADS": "1", "TRAINENV_SERVING_MAX_QUEUE": "0"})
    try:
        srv.wait_ready()
        holder = threading.Thread(target=srv.post, args=(b'"hold"',))
        holder.start()
        time.sleep(0.3)
        status, headers, body = srv.post(b"[1]")
        holder.join()
        assert status == 503 and headers["Retry-After"] == "1"
        assert "busy" in error_of(body)["message"]
        assert srv.post(b"[1]")[0] == 200
    finally:
        assert srv.stop() == 0


def test_connections_over_the_limit_get_503(tmp_path):
    srv = Server(make_base(tmp_path), {"TRAINENV_SERVING_MAX_CONNECTIONS": "2"})
    try:
        srv.wait_ready()
        held = []
        deadline = time.monotonic() + 10
        while len(held) < 2:  # wait_ready's own connections may not be reaped yet: they count too
            conn = srv.connection()
            conn.request("GET", "/ping")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                held.append(conn)
                continue
            conn.close()
            assert response.status == 503 and time.monotonic() < deadline
            time.sleep(0.05)
        status, headers, body = srv.request("GET", "/ping")
        assert status == 503 and headers["Retry-After"] == "1" and b"too many open connections" in body
        for conn in held:
            conn.close()
        deadline = time.monotonic() + 5
        while srv.request("GET", "/ping")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.request("GET", "/ping")[0] == 200
    finally:
        assert srv.stop() == 0


def test_malformed_requests_are_refused(tmp_path):
    srv = Server(make_base(tmp_path), {})
    try:
        srv.wait_ready()

        def raw(data: bytes) -> bytes:
            return srv.send_raw(data, timeout=5)

        smuggle = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        assert raw(smuggle).startswith(b"HTTP/1.1 400 ")
        assert raw(b"GET /ping HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
        assert raw(b"GET /ping HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
        assert raw(b"GET /ping HTTP/1.1\r\n folded\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(b"POST /invocations HTTP/1.1\r\nContent-Length: 1x\r\n\r\n1").startswith(b"HTTP/1.1 400 ")
        # Expect: 100-continue with an oversized body: 413 before the body is ever sent
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\nExpect: 100-continue\r\n\r\n"
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
        # HTTP/1.0 keep-alive
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in first
            sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        assert srv.stop() == 0


# -- readiness, drain, start-up failures (both servers) ---------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_ping_is_never_200_before_the_model_is_loaded(tmp_path, kind):
    srv = Server(make_base(tmp_path), {"TRAINENV_SERVER": kind, "TEST_MODEL_SLEEP": "2"})
    try:
        seen = []
        first_ok = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                status = srv.request("GET", "/ping", timeout=0.5)[0]
            except OSError:
                status = None  # gunicorn: no worker accepts before its model is loaded
            seen.append(status)
            if status == 200:
                first_ok = time.monotonic() - srv.started
                break
            if kind == "stdlib" and len(seen) == 3:
                status, headers, body = srv.post(b"[1]")
                assert status == 503 and headers["Retry-After"] == "1"
            time.sleep(0.05)
        assert first_ok is not None, srv.log
        assert first_ok >= 2.0, f"/ping said 200 after {first_ok:.2f} s, before model_fn's 2 s sleep ended"
        if kind == "stdlib":  # answers at once while loading (a loaded machine may time a probe out)
            assert seen.count(503) >= 3, seen
        assert srv.post(b"[1]")[0] == 200
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("kind", SERVERS)
def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tmp_path, kind):
    srv = Server(make_base(tmp_path), {"TRAINENV_SERVER": kind})
    srv.wait_ready()
    result = {}

    def slow():
        try:
            result["answer"] = srv.post(b'"sleep"')
        except Exception as exc:  # noqa: BLE001
            result["answer"] = exc

    idle = srv.connection()  # an idle keep-alive connection must not hold up the exit
    idle.request("GET", "/ping")
    assert idle.getresponse().read()
    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.3)
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    client.join(10)
    code = srv.stop()
    assert code == 0, srv.log
    status, _, body = result["answer"]
    assert (status, body) == (200, b'"sleep"')
    assert time.monotonic() - started < 8
    idle.close()
    with pytest.raises(OSError):
        srv.request("GET", "/ping", timeout=1)


FAILURES = {
    "import": (
        "import no_such_module_anywhere\n",
        r"cannot import handler .*inference\.py: ModuleNotFoundError: No module named 'no_such_module_anywhere'",
    ),
    "model_fn": (
        "def model_fn(d):\n    raise RuntimeError('weights missing')\n\ndef predict_fn(x, m):\n    return x\n",
        r"model_fn raised RuntimeError: weights missing",
    ),
    "hooks": (
        "def transform_fn(m, b, c, a):\n    return b\n\ndef predict_fn(x, m):\n    return x\n",
        r"transform_fn cannot be combined with predict_fn",
    ),
    "syntax": ("def predict_fn(x, m)\n    return x\n", r"cannot import handler .*: SyntaxError"),
}


@pytest.mark.parametrize("kind", SERVERS)
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_bad_handler_exits_78_with_a_clear_error(tmp_path, kind, failure):
    source, pattern = FAILURES[failure]
    srv = Server(make_base(tmp_path, source), {"TRAINENV_SERVER": kind})
    code = srv.wait_exit(20)
    assert code == 78, srv.log
    assert re.search(r"ERROR .*" + pattern, srv.log), srv.log


def test_missing_handler_and_bad_settings_exit_78(tmp_path):
    srv = Server(tmp_path, {}, wait_listening=False)
    assert srv.wait_exit(10) == 78
    assert "no handler module: none of" in srv.log and "set TRAINENV_SERVING_MODULE" in srv.log

    srv = Server(make_base(tmp_path / "b"), {"TRAINENV_SERVING_PORT": "eighty"}, wait_listening=False)
    assert srv.wait_exit(10) == 78
    assert "TRAINENV_SERVING_PORT: 'eighty' is not a port number" in srv.log


def test_port_in_use_exits_78(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        srv = Server(make_base(tmp_path), {"TRAINENV_SERVING_PORT": str(port)}, wait_listening=False)
        assert srv.wait_exit(10) == 78
    assert f"TRAINENV_SERVING_PORT: port {port} on 127.0.0.1 is already in use" in srv.log


def test_dotted_handler_module_from_the_code_dir(tmp_path):
    code = tmp_path / "usercode" / "pkg"
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "serve.py").write_text(
        "from pkg.helper import double\n\ndef predict_fn(x, m):\n    return double(x)\n"
    )
    (code / "helper.py").write_text("def double(x):\n    return [2 * v for v in x]\n")
    srv = Server(tmp_path, {"TRAINENV_SERVING_MODULE": "pkg.serve"})
    try:
        srv.wait_ready()
        assert srv.post(b"[1, 2]")[2] == b"[2,4]"
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("kind", SERVERS)
def test_startup_timeout_exits_124(tmp_path, kind):
    srv = Server(
        make_base(tmp_path),
        {"TRAINENV_SERVER": kind, "TEST_MODEL_SLEEP": "10", "TRAINENV_SERVING_STARTUP_TIMEOUT": "1"},
    )
    started = time.monotonic()
    assert srv.wait_exit(15) == 124, srv.log
    assert time.monotonic() - started < 6
    assert "not ready within the start-up timeout of 1 s" in srv.log


EXAMPLE_MODEL = Path(__file__).resolve().parent.parent / "examples" / "serving" / "model"


def test_the_example_handler_serves(tmp_path):
    srv = Server(tmp_path, {"TRAINENV_MODEL_DIR": str(EXAMPLE_MODEL)})
    try:
        srv.wait_ready()
        status, _, body = srv.post(b"[[5.1, 3.5, 1.4]]")
        assert status == 200 and json.loads(body) == [pytest.approx(0.5 * 5.1 - 0.25 * 3.5 + 1.4 + 0.1)]
        status, headers, body = srv.post(b"5.1,3.5,1.4\n6.2,2.9,4.3\n", "text/csv", Accept="text/csv")
        assert status == 200 and headers["Content-Type"] == "text/csv" and len(body.splitlines()) == 2
        status, _, body = srv.post(b"[[1, 2]]")
        assert status == 400 and "needs 3 numbers" in error_of(body)["message"]
        assert srv.request("GET", "/execution-parameters")[0] == 404  # no execution_parameters_fn
        request = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [5.1, 3.5, 1.4]}]}
        status, _, body = srv.post(json.dumps(request).encode(), path="/v2/models/model/infer")
        assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1]
    finally:
        assert srv.stop() == 0


TRAIN_THEN_SERVE = {
    "train.py": (
        "import json, os\n"
        "with open(os.path.join(os.environ['TRAINENV_MODEL_DIR'], 'model.json'), 'w') as f:\n"
        "    json.dump({'scale': 3}, f)\n"
    ),
    "inference.py": (
        "import json, os\n\n"
        "def model_fn(model_dir):\n"
        "    with open(os.path.join(model_dir, 'model.json')) as f:\n"
        "        return json.load(f)['scale']\n\n"
        "def predict_fn(data, scale):\n"
        "    return [scale * x for x in data]\n"
    ),
}


def test_serve_finds_the_model_that_train_wrote_in_the_same_base_dir(tmp_path):
    base = make_tree(tmp_path / "job", TRAIN_THEN_SERVE)
    result = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert result.returncode == 0, result.stderr.decode()
    assert (base / "output" / "model" / "model.json").is_file() and not (base / "model").exists()
    srv = Server(base, {}, argv=[*TRAINENV, "serve"])
    try:
        srv.wait_ready()
        assert srv.post(b"[1, 2]")[2] == b"[3,6]"
        assert f"model dir {base / 'output' / 'model'}" in srv.log
    finally:
        assert srv.stop() == 0, srv.log


def test_serve_help_lists_its_options_and_stands_on_its_own():
    import subprocess

    result = subprocess.run([*TRAINENV, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--port", "--model-dir", "--server [stdlib|gunicorn]", "--workers"):
        assert option in result.stdout, result.stdout
    for reference in ("CONTRACT", "§", "shared/", ".md"):
        assert reference not in result.stdout, result.stdout


@pytest.mark.parametrize("kind", SERVERS)
def test_serve_options_override_their_variables(tmp_path, kind):
    other = "stdlib" if kind == "gunicorn" else "gunicorn"
    bad = {
        "TRAINENV_SERVING_PORT": "eighty",
        "TRAINENV_MODEL_DIR": str(tmp_path / "nowhere"),
        "TRAINENV_SERVER": other,
        "TRAINENV_SERVING_WORKERS": "zero",
    }
    argv = [*TRAINENV, "serve", "--port", "0", "--model-dir", str(EXAMPLE_MODEL), "--server", kind, "--workers", "1"]
    srv = Server(tmp_path, bad, argv=argv)
    try:
        srv.wait_ready()
        assert f"server {kind}, " in srv.log and "/examples/serving/model)" in srv.log  # (PWD may be masked)
        assert srv.post(b"[[5.1, 3.5, 1.4]]")[0] == 200
    finally:
        assert srv.stop() == 0, srv.log


def test_a_bad_option_or_variable_stops_serve_with_78_naming_it(tmp_path):
    srv = Server(make_base(tmp_path), {}, wait_listening=False, argv=[*TRAINENV, "serve", "--port", "eighty"])
    assert srv.wait_exit(30) == 78
    assert "option --port: 'eighty' is not a port number" in srv.log, srv.log
    srv = Server(tmp_path, {"TRAINENV_SERVING_READ_TIMEOUT": "soon"}, wait_listening=False, argv=[*TRAINENV, "serve"])
    assert srv.wait_exit(30) == 78
    assert "TRAINENV_SERVING_READ_TIMEOUT: 'soon' is not a number of seconds" in srv.log, srv.log
