"""The built-in codecs: request bodies to Python objects and predictions back to bytes.

| media type | decoded to (default ``input_fn``) | encoded from (default ``output_fn``) |
|---|---|---|
| ``application/json`` (also ``*/*+json``) | ``json.loads`` result | anything ``json.dumps`` takes; objects with ``tolist()`` / ``item()`` (numpy) too |
| ``application/jsonlines``, ``application/x-jsonlines``, ``application/x-ndjson`` | list, one item per non-empty line | a list: one JSON document per line; anything else: one line |
| ``text/csv`` | list of rows; a cell that reads as an int or float becomes one, others stay strings | rows (list of lists), a column (list of scalars) or one scalar |
| ``text/plain`` | ``str`` | ``str``, ``bytes``, numbers; lists and dicts as JSON text |
| ``application/octet-stream`` | ``bytes`` as received | ``bytes`` or ``str`` |
| ``application/x-npy`` (only when numpy is importable) | ``numpy.load(..., allow_pickle=False)``: never unpickles | ``numpy.save(..., allow_pickle=False)``; object arrays are refused |

Text is decoded with the ``charset`` parameter when given, else UTF-8. A body that is not
valid for its declared type raises ``BadRequest`` (400); an unknown type or charset raises
``UnsupportedType`` (415). A prediction that cannot be written in a type raises
``CannotEncode``, and the caller tries the client's next acceptable type.
numpy is imported only when an ``x-npy`` body or answer is actually handled.
"""

from __future__ import annotations

import codecs
import csv
import io
import json

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable

from trainenv.serving.api import BadRequest, HTTPError

JSON = "application/json"
JSONLINES = "application/jsonlines"
CSV = "text/csv"
TEXT = "text/plain"
OCTET_STREAM = "application/octet-stream"
NPY = "application/x-npy"
JSONLINES_ALIASES = (JSONLINES, "application/x-jsonlines", "application/x-ndjson")

_numpy_available: bool | None = None


class UnsupportedType(HTTPError):
    status = 415


class CannotEncode(Exception):
    """The prediction has no representation in this media type."""


def numpy_available() -> bool:
    global _numpy_available
    if _numpy_available is None:
        import importlib.util

        _numpy_available = importlib.util.find_spec("numpy") is not None
    return _numpy_available


def is_text(media_type: str) -> bool:
    """Bodies of these types reach a user ``input_fn`` as ``str`` (as SageMaker's toolkits do)."""
    return (
        media_type.startswith("text/")
        or media_type == JSON
        or media_type.endswith("+json")
        or media_type in JSONLINES_ALIASES
    )


def decode_text(body: bytes, media_type: str, params: dict[str, str]) -> str:
    charset = params.get("charset", "utf-8")
    try:
        codecs.lookup(charset)
    except LookupError:
        raise UnsupportedType(f"unknown charset {charset!r} in Content-Type {media_type}") from None
    if charset.lower().replace("_", "-") in ("utf-8", "utf8") and body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        return body.decode(charset)
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"body is not valid {charset} (byte {exc.start}): Content-Type {media_type}"
        ) from None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def _jsonlines(text: str) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BadRequest(
                    f"body is not valid JSON Lines: line {number}: {exc.msg} at column {exc.colno}"
                ) from None
    return items


def _cell(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _csv(text: str) -> list[list[Any]]:
    try:
        return [[_cell(cell) for cell in row] for row in csv.reader(io.StringIO(text)) if row]
    except csv.Error as exc:
        raise BadRequest(f"body is not valid CSV: {exc}") from None


def _npy(body: bytes) -> Any:
    import numpy

    try:
        return numpy.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadRequest(f"body is not a valid .npy array without pickled objects: {exc}") from None


def decodable_types() -> tuple[str, ...]:
    base = (JSON,) + JSONLINES_ALIASES + (CSV, TEXT, OCTET_STREAM)
    return base + (NPY,) if numpy_available() else base


def decode(body: bytes, media_type: str, params: dict[str, str]) -> Any:
    """The default ``input_fn``: the body as a Python object, per the table above."""
    if media_type == JSON or media_type.endswith("+json"):
        return _json(decode_text(body, media_type, params))
    if media_type == OCTET_STREAM:
        return body
    if media_type == CSV:
        return _csv(decode_text(body, media_type, params))
    if media_type in JSONLINES_ALIASES:
        return _jsonlines(decode_text(body, media_type, params))
    if media_type == TEXT:
        return decode_text(body, media_type, params)
    if media_type == NPY and numpy_available():
        return _npy(body)
    raise UnsupportedType(
        f"Content-Type {media_type} is not supported by the default input_fn "
        f"(supported: {', '.join(decodable_types())}); {how_to_send_json(media_type)}, "
        "or define input_fn to accept it"
    )


FORM = "application/x-www-form-urlencoded"


def how_to_send_json(media_type: str) -> str:
    """The hint in a 415 answer: how to send JSON (with curl, whose ``-d`` sends a form type)."""
    hint = "send JSON with -H 'Content-Type: application/json'"
    return f"{hint} (curl -d sends {FORM})" if media_type == FORM else hint


def plain_value(value: Any) -> Any:
    """numpy arrays and scalars as lists and Python scalars; anything else unchanged."""
    if isinstance(value, (str, bytes, int, float, bool, list, dict, tuple)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return value


def _json_default(value: Any) -> Any:
    plain = plain_value(value)
    if plain is value:
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    return plain


def to_json(value: Any) -> bytes:
    try:
        return json.dumps(value, default=_json_default, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CannotEncode(str(exc)) from None


def _encode_jsonlines(value: Any) -> bytes:
    value = plain_value(value)
    if isinstance(value, (list, tuple)):
        return b"".join(to_json(item) + b"\n" for item in value)
    return to_json(value) + b"\n"


def _csv_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _encode_csv(value: Any) -> bytes:
    value = plain_value(value)
    if isinstance(value, bytes):
        raise CannotEncode("bytes cannot be written as CSV")
    if isinstance(value, str):
        return value.encode("utf-8")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if _csv_scalar(value):
        writer.writerow([value])
    elif isinstance(value, (list, tuple)):
        for row in value:
            row = plain_value(row)
            if isinstance(row, (list, tuple)):
                cells = [plain_value(cell) for cell in row]
                if not all(_csv_scalar(cell) for cell in cells):
                    raise CannotEncode("CSV cells must be strings or numbers")
                writer.writerow(cells)
            elif _csv_scalar(row):
                writer.writerow([row])
            else:
                raise CannotEncode(f"a CSV row cannot be a {type(row).__name__}")
    else:
        raise CannotEncode(f"a {type(value).__name__} cannot be written as CSV")
    return out.getvalue().encode("utf-8")


def _encode_text(value: Any) -> bytes:
    value = plain_value(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value).encode("utf-8")
    return to_json(value)


def _encode_octet(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise CannotEncode(f"a {type(value).__name__} is not bytes")


def _encode_npy(value: Any) -> bytes:
    import numpy

    try:
        array = numpy.asarray(value)
    except (ValueError, TypeError) as exc:
        raise CannotEncode(str(exc)) from None
    if array.dtype.hasobject:
        raise CannotEncode("object arrays cannot be written as .npy without pickling")
    out = io.BytesIO()
    numpy.save(out, array, allow_pickle=False)
    return out.getvalue()


_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    JSON: to_json,
    JSONLINES: _encode_jsonlines,
    "application/x-jsonlines": _encode_jsonlines,
    CSV: _encode_csv,
    TEXT: _encode_text,
    OCTET_STREAM: _encode_octet,
}


def encodable_types(default: str) -> tuple[str, ...]:
    """The types the default ``output_fn`` can write, ``default`` first when it is one of them."""
    types = list(_ENCODERS)
    if numpy_available():
        types.append(NPY)
    if default in types:
        types.remove(default)
        types.insert(0, default)
    return tuple(types)


def encode(value: Any, media_type: str) -> bytes:
    """The prediction in ``media_type``; ``CannotEncode`` when it has no such representation."""
    encoder = _ENCODERS.get(media_type)
    if encoder is not None:
        return encoder(value)
    if media_type == NPY and numpy_available():
        return _encode_npy(value)
    raise CannotEncode(f"no encoder for {media_type}")
