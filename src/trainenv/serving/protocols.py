"""The JSON request/response shapes of Vertex AI and KServe's Open Inference Protocol (v2).

These routes are the codec themselves, so ``input_fn``/``output_fn`` are not used there:
the decoded data goes to ``predict_fn(data, model)`` (or, for a ``transform_fn`` handler, to
``transform_fn`` as a JSON body with ``application/json`` both ways).

**Vertex AI** (``AIP_PREDICT_ROUTE``): ``{"instances": [...], "parameters": {...}}`` ->
``predict_fn(instances, model)`` -> ``{"predictions": [...]}``. The prediction must be a list
(one per instance; numpy arrays are converted). ``parameters`` is in ``context.parameters``.

**KServe v2** (``POST /v2/models/{name}[/versions/{v}]/infer``)::

    {"id": "1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

Each input's ``data`` (flat or nested, row-major) is checked against ``shape`` and
``datatype`` and reshaped into nested lists. ``predict_fn`` gets that nested list when there
is one input, else a dict ``{name: nested list}``. The prediction becomes the outputs: a dict
gives one output per key; anything else one output, named like the single requested output or
``output0``. Shape and datatype come from numpy arrays as they are, else from the nested lists
(bool ``BOOL``, int ``INT64``, float ``FP64``, str ``BYTES``); a scalar is shape ``[1]``.
The request ``id`` is echoed. Errors are ``{"error": "<message>"}`` as the protocol says.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Sequence

from trainenv.serving import codecs
from trainenv.serving.api import BadRequest

_INT_TYPES = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
_FLOAT_TYPES = {"FP16", "FP32", "FP64", "BF16"}
DATATYPES = _INT_TYPES | _FLOAT_TYPES | {"BOOL", "BYTES"}
_MAX_DIMS = 32


def _load_json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"{what} body must be a JSON object, got {type(document).__name__}")
    return document


# -- Vertex AI ------------------------------------------------------------------------------


def parse_vertex_request(body: bytes) -> tuple[list[Any], Any]:
    """``(instances, parameters)`` of a Vertex predict request; ``BadRequest`` if malformed."""
    document = _load_json_object(body, "Vertex AI predict")
    instances = document.get("instances")
    if not isinstance(instances, list):
        raise BadRequest('Vertex AI predict body needs "instances": a list')
    return instances, document.get("parameters")


def vertex_response(prediction: Any) -> bytes:
    """``{"predictions": [...]}``; ``TypeError`` when the prediction is not a list."""
    plain = codecs.plain_value(prediction)
    if isinstance(plain, tuple):
        plain = list(plain)
    if not isinstance(plain, list):
        raise TypeError(
            f"for Vertex AI, predict_fn must return a list (one prediction per instance), got {type(prediction).__name__}"
        )
    try:
        return codecs.to_json({"predictions": plain})
    except codecs.CannotEncode as exc:
        raise TypeError(f"the prediction is not JSON serializable: {exc}") from None


# -- KServe v2 ------------------------------------------------------------------------------


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


def _check_scalar(value: Any, datatype: str) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool)
    if datatype in _INT_TYPES:
        return isinstance(value, int) and not isinstance(value, bool) and (value >= 0 or datatype[0] == "I")
    if datatype in _FLOAT_TYPES:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _parse_input(index: int, spec: Any) -> tuple[str, Any]:
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
    if "data" not in spec:
        raise BadRequest(f'{where}: "data" is missing')
    flat: list[Any] = []
    _flatten(spec["data"], flat)
    count = 1
    for dim in shape:
        count *= dim
    if len(flat) != count:
        raise BadRequest(f"{where}: shape {shape} needs {count} elements, data has {len(flat)}")
    for value in flat:
        if not _check_scalar(value, datatype):
            raise BadRequest(f"{where}: {value!r} is not a {datatype} value")
    return name, _reshape(flat, shape)


class V2Request:
    """A parsed ``/infer`` request: the data for ``predict_fn`` and what the answer must echo."""

    __slots__ = ("id", "parameters", "data", "requested")

    def __init__(self, body: bytes) -> None:
        document = _load_json_object(body, "inference request")
        request_id = document.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise BadRequest('"id" must be a string')
        inputs = document.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest('"inputs" must be a non-empty list')
        tensors = dict(_parse_input(i, spec) for i, spec in enumerate(inputs))
        if len(tensors) != len(inputs):
            raise BadRequest("input names must be unique")
        requested: list[str] = []
        outputs = document.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
            ):
                raise BadRequest('"outputs" must be a list of {"name": ...} objects')
            requested = [o["name"] for o in outputs]
        self.id: str | None = request_id
        self.parameters = document.get("parameters")
        self.data = next(iter(tensors.values())) if len(tensors) == 1 else tensors
        self.requested = requested


_NUMPY_KINDS = {"b": "BOOL", "i": "INT", "u": "UINT", "f": "FP", "U": "BYTES", "S": "BYTES"}


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
        elif isinstance(value, str):
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
    """One v2 output ``{name, shape, datatype, data}``; ``TypeError`` if it is not a tensor."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and hasattr(value, "shape") and hasattr(value, "tolist"):
        kind = _NUMPY_KINDS.get(getattr(dtype, "kind", ""))
        if kind is None:
            raise TypeError(f"numpy dtype {dtype} cannot be a v2 tensor")
        datatype = kind if kind in ("BOOL", "BYTES") else f"{kind}{dtype.itemsize * 8}"
        flat: list[Any] = value.reshape(-1).tolist()
        if kind == "BYTES":
            flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in flat]
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


def v2_response(request: V2Request, prediction: Any, model_name: str, version: str | None) -> bytes:
    """The v2 inference response; ``TypeError`` when the prediction is not tensor-shaped."""
    if isinstance(prediction, dict):
        names = request.requested or list(prediction)
        missing = [n for n in names if n not in prediction]
        if missing:
            raise BadRequest(f"requested outputs {missing} are not produced by the model")
        outputs = [output_tensor(str(n), prediction[n]) for n in names]
    else:
        name = request.requested[0] if len(request.requested) == 1 else "output0"
        outputs = [output_tensor(name, prediction)]
    document: dict[str, Any] = {"model_name": model_name}
    if version is not None:
        document["model_version"] = version
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = outputs
    return codecs.to_json(document)
