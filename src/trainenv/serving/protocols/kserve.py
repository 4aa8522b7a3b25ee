"""KServe's Open Inference Protocol (v2): ``POST /v2/models/{name}[/versions/{v}]/infer``.

A JSON request::

    {"id": "1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

Each input's ``data`` (flat or nested, row-major) is checked against ``shape`` and
``datatype`` and reshaped into nested lists. ``predict_fn`` gets that nested list when there
is one input, else a dict ``{name: nested list}``. The prediction becomes the outputs: a dict
gives one output per key; anything else one output, named like the single requested output or
``output0``. Shape and datatype come from numpy arrays as they are (duck-typed: nothing here
imports numpy; ml_dtypes ``bfloat16`` is ``BF16``), else from the nested lists (bool ``BOOL``, int ``INT64``, float ``FP64``,
str or bytes ``BYTES``); a scalar is shape ``[1]``. The request ``id`` is echoed. Errors are
``{"error": "<message>"}`` as the protocol says.

**Binary tensors** (the ``binary_tensor_data`` extension, as Triton and tritonclient speak it).
A request with ``Inference-Header-Content-Length: L`` is a JSON header of ``L`` bytes, then the
raw data (``trainenv.serving.protocols.binary``) of each input whose
``parameters.binary_data_size`` is set, in input order. Such inputs reach ``predict_fn`` in the
same nested form as JSON ones, ``BYTES`` elements as ``bytes``. An output is sent binary when
its requested output says ``parameters.binary_data``, else when the request's
``parameters.binary_data_output`` is true: its ``data`` is replaced by
``parameters.binary_data_size``, its raw data follows the JSON header (output order), and the
answer carries the header's length in ``Inference-Header-Content-Length`` with
``Content-Type: application/octet-stream``. A 400 for: a header length or ``binary_data_size``
that is not a non-negative integer or reaches past the body; a ``binary_data_size`` other than
the element count x the datatype's size; ``BYTES`` data with another element count than the
shape's, or an element running past its tensor; bytes left after the last binary input.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Sequence

from trainenv.serving import codecs
from trainenv.serving.api import BadRequest
from trainenv.serving.protocols import binary, load_json_object

HEADER_LENGTH = "Inference-Header-Content-Length"
_INT_TYPES = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
_FLOAT_TYPES = {"FP16", "FP32", "FP64", "BF16"}
DATATYPES = _INT_TYPES | _FLOAT_TYPES | {"BOOL", "BYTES"}
_MAX_DIMS = 32
_MAX_EMPTY_LISTS = 65536  # lists a shape with a zero dimension may still make _reshape build
_DIGITS = re.compile(r"[0-9]+\Z")


def server_metadata(version: str) -> bytes:
    """The answer to ``GET /v2``: this server and the protocol extensions it speaks."""
    return codecs.to_json({"name": "trainenv", "version": version, "extensions": ["binary_tensor_data"]})


def _header_length(value: str, body_size: int) -> int:
    if not _DIGITS.match(value):
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise BadRequest(f"{HEADER_LENGTH} {shown!r} is not a non-negative integer")
    length = int(value) if len(value) <= 20 else body_size + 1  # past any body either way
    if length > body_size:
        raise BadRequest(f"{HEADER_LENGTH} {value[:40]} reaches past the end of the body ({body_size} bytes)")
    return length


def _flatten(data: Any, out: list[Any]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


def _reshape(flat: Sequence[Any], shape: Sequence[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _check_lists(shape: Sequence[int], count: int, where: str) -> None:
    """``BadRequest`` when ``_reshape`` would build far more lists than there are elements: a zero
    dimension makes the element count 0, yet ``[10000000, 0]`` would still build 10 million lists."""
    lists = 0
    leading = 1
    for dim in shape[:-1]:
        leading *= dim
        lists += leading
        if not leading:
            break
    if lists > _MAX_DIMS * count + _MAX_EMPTY_LISTS:
        raise BadRequest(
            f"{where}: shape {shape} holds {count} elements in {lists} nested lists; "
            f"at most {_MAX_EMPTY_LISTS} lists may hold no element"
        )


def _check_scalar(value: Any, datatype: str) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool)
    if datatype in _INT_TYPES:
        return isinstance(value, int) and not isinstance(value, bool) and (value >= 0 or datatype[0] == "I")
    if datatype in _FLOAT_TYPES:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


class _Tail:
    """The binary part of a request, handed out input by input."""

    __slots__ = ("data", "offset", "present")

    def __init__(self, data: memoryview, present: bool) -> None:
        self.data = data
        self.offset = 0
        self.present = present

    def take(self, size: Any, where: str) -> memoryview:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if not self.present:
            raise BadRequest(f"{where}: binary_data_size is set but the request has no {HEADER_LENGTH} header")
        if self.offset + size > len(self.data):
            raise BadRequest(f"{where}: binary_data_size {size} reaches past the end of the body")
        self.offset += size
        return self.data[self.offset - size : self.offset]


def _parse_input(index: int, spec: Any, tail: _Tail) -> tuple[str, Any]:
    where = f"inputs[{index}]"
    if not isinstance(spec, dict):
        raise BadRequest(f"{where} must be an object")
    name = spec.get("name")
    shape = spec.get("shape")
    datatype = spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise BadRequest(f'{where} needs a "name" string')
    where = f"input {name!r}"
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(f'{where}: "shape" must be a list of non-negative integers')
    if datatype not in DATATYPES:
        raise BadRequest(
            f'{where}: "datatype" must be one of {", ".join(sorted(DATATYPES))}, got {datatype!r}'
        )
    parameters = spec.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadRequest(f'{where}: "parameters" must be an object')
    count = 1
    for dim in shape:
        count *= dim
    _check_lists(shape, count, where)
    if parameters and "binary_data_size" in parameters:
        if "data" in spec:
            raise BadRequest(f'{where} has both "data" and binary_data_size')
        raw = tail.take(parameters["binary_data_size"], where)
        return name, _reshape(binary.decode(raw, datatype, count, where), shape)
    if "data" not in spec:
        raise BadRequest(f'{where}: "data" is missing')
    flat: list[Any] = []
    _flatten(spec["data"], flat)
    if len(flat) != count:
        raise BadRequest(f"{where}: shape {shape} needs {count} elements, data has {len(flat)}")
    for value in flat:
        if not _check_scalar(value, datatype):
            raise BadRequest(f"{where}: {value!r} is not a {datatype} value")
    return name, _reshape(flat, shape)


def _binary_flag(value: Any, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false, got {value!r}")
    return value


class V2Request:
    """A parsed ``/infer`` request: the data for ``predict_fn`` and what the answer must echo.

    ``header_length`` is the ``Inference-Header-Content-Length`` header, when sent."""

    __slots__ = ("id", "parameters", "data", "requested", "binary_output", "binary_default")

    def __init__(self, body: bytes, header_length: str | None = None) -> None:
        if header_length is None:
            header, tail = body, _Tail(memoryview(b""), present=False)
        else:
            view = memoryview(body)
            split = _header_length(header_length, len(body))
            header, tail = view[:split].tobytes(), _Tail(view[split:], present=True)
        document = load_json_object(header, "inference request")
        request_id = document.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise BadRequest('"id" must be a string')
        parameters = document.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest('"parameters" must be an object')
        inputs = document.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest('"inputs" must be a non-empty list')
        tensors = dict(_parse_input(i, spec, tail) for i, spec in enumerate(inputs))
        if len(tensors) != len(inputs):
            raise BadRequest("input names must be unique")
        if tail.offset != len(tail.data):
            raise BadRequest(f"{len(tail.data) - tail.offset} bytes after the last binary input")
        requested: list[str] = []
        binary_output: dict[str, bool | None] = {}
        outputs = document.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("parameters", {}), dict)
                for o in outputs
            ):
                raise BadRequest('"outputs" must be a list of {"name": ..., "parameters": {...}} objects')
            requested = [o["name"] for o in outputs]
            for o in outputs:
                flag = o.get("parameters", {}).get("binary_data")
                binary_output[o["name"]] = _binary_flag(flag, f"output {o['name']!r}: binary_data")
        self.id: str | None = request_id
        self.parameters = parameters
        self.data = next(iter(tensors.values())) if len(tensors) == 1 else tensors
        self.requested = requested
        self.binary_output = binary_output
        default = (parameters or {}).get("binary_data_output")
        self.binary_default = bool(_binary_flag(default, "parameters.binary_data_output"))

    def wants_binary(self, name: str) -> bool:
        """Is output ``name`` to be sent as raw data?"""
        flag = self.binary_output.get(name)
        return self.binary_default if flag is None else flag


_NUMPY_KINDS = {"b": "BOOL", "i": "INT", "u": "UINT", "f": "FP", "U": "BYTES", "S": "BYTES", "O": "BYTES"}


def _shape_of(value: Any) -> list[int]:
    shape: list[int] = []
    while isinstance(value, (list, tuple)):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _rectangular(value: Any, shape: Sequence[int]) -> bool:
    if not shape:
        return not isinstance(value, (list, tuple))
    if not isinstance(value, (list, tuple)) or len(value) != shape[0]:
        return False
    return all(_rectangular(item, shape[1:]) for item in value)


def _datatype(flat: Sequence[Any]) -> str:
    kinds = set()
    for value in flat:
        if isinstance(value, bool):
            kinds.add("BOOL")
        elif isinstance(value, int):
            kinds.add("INT64")
        elif isinstance(value, float):
            kinds.add("FP64")
        elif isinstance(value, (str, bytes)):
            kinds.add("BYTES")
        else:
            raise TypeError(f"a {type(value).__name__} cannot be a tensor element")
    if not kinds:
        return "FP64"
    if kinds == {"INT64", "FP64"}:
        return "FP64"
    if len(kinds) > 1:
        raise TypeError(f"mixed element types {sorted(kinds)} in one tensor")
    return kinds.pop()


def output_tensor(name: str, value: Any) -> dict[str, Any]:
    """One v2 output ``{name, shape, datatype, data}`` (``BYTES`` elements as they are: str or
    bytes); ``TypeError`` if it is not a tensor."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and hasattr(value, "shape") and hasattr(value, "tolist"):
        kind = "BF" if getattr(dtype, "name", "") == "bfloat16" else _NUMPY_KINDS.get(getattr(dtype, "kind", ""))
        if kind is None:
            raise TypeError(f"numpy dtype {dtype} cannot be a v2 tensor")
        datatype = kind if kind in ("BOOL", "BYTES") else f"{kind}{dtype.itemsize * 8}"
        flat: list[Any] = value.reshape(-1).tolist()
        if kind == "BYTES" and not all(isinstance(v, (str, bytes)) for v in flat):
            raise TypeError("an object array is a BYTES tensor only when it holds str or bytes")
        shape = [int(d) for d in value.shape] or [1]
        return {"name": name, "shape": shape, "datatype": datatype, "data": flat}
    value = codecs.plain_value(value)
    if isinstance(value, (list, tuple)):
        shape = _shape_of(value)
        flat = []
        _flatten(list(value) if isinstance(value, tuple) else value, flat)
        count = 1
        for dim in shape:
            count *= dim
        if count != len(flat) or not _rectangular(value, shape):
            raise TypeError("the prediction is a ragged list, not a tensor")
    else:
        shape, flat = [1], [value]
    return {"name": name, "shape": shape, "datatype": _datatype(flat), "data": flat}


def _as_text(tensor: dict[str, Any]) -> None:
    """A ``BYTES`` output sent as JSON: each ``bytes`` element must be UTF-8 text."""
    try:
        tensor["data"] = [v.decode("utf-8") if isinstance(v, bytes) else v for v in tensor["data"]]
    except UnicodeDecodeError:
        raise TypeError(
            f"output {tensor['name']!r} holds bytes that are not UTF-8 text; JSON cannot carry them,"
            " ask for it binary (binary_data)"
        ) from None


def answer(
    request: V2Request, prediction: Any, model_name: str, version: str | None
) -> tuple[str, tuple[tuple[str, str], ...], bytes]:
    """``(content type, headers, body)`` of the v2 inference response; ``TypeError`` when the
    prediction is not tensor-shaped (the handler's fault)."""
    if isinstance(prediction, dict):
        names = request.requested or list(prediction)
        missing = [n for n in names if n not in prediction]
        if missing:
            raise BadRequest(f"requested outputs {missing} are not produced by the model")
        outputs = [output_tensor(str(n), prediction[n]) for n in names]
    else:
        name = request.requested[0] if len(request.requested) == 1 else "output0"
        outputs = [output_tensor(name, prediction)]
    raw: list[bytes] = []
    for tensor in outputs:
        if request.wants_binary(tensor["name"]):
            data = binary.encode(tensor.pop("data"), tensor["datatype"])
            tensor["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        elif tensor["datatype"] == "BYTES":
            _as_text(tensor)
    document: dict[str, Any] = {"model_name": model_name}
    if version is not None:
        document["model_version"] = version
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = outputs
    header = codecs.to_json(document)
    if not raw:
        return codecs.JSON, (), header
    return codecs.OCTET_STREAM, ((HEADER_LENGTH, str(len(header))),), header + b"".join(raw)
