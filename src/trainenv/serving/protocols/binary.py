"""Raw tensor data of the KServe v2 binary tensor extension: bytes to flat lists and back.

A tensor's raw data is its elements in row-major order, little-endian, each in its datatype's
size: ``BOOL`` one byte (0 is false), ``UINT8``..``UINT64``/``INT8``..``INT64`` two's complement,
``FP16`` IEEE half, ``BF16`` the upper half of an ``FP32``, ``FP32``, ``FP64``. A ``BYTES``
tensor is its elements one after another, each a 4-byte little-endian length, then that many
bytes. Pure functions on ``struct``: no numpy.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

from trainenv.serving.api import BadRequest

_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "BF16": "H",
    "FP32": "f",
    "FP64": "d",
}
_SIZES = {datatype: struct.calcsize(f"<{code}") for datatype, code in _FORMATS.items()}
"""Bytes per element of each fixed-size datatype (``BYTES`` has none)."""


def decode(raw: bytes | memoryview, datatype: str, count: int, where: str) -> list[Any]:
    """The ``count`` elements of ``raw`` as Python values (``BYTES`` as ``bytes``); ``BadRequest``
    (naming ``where``) when ``raw`` does not hold exactly that many."""
    if datatype == "BYTES":
        return _split(raw, count, where)
    size = _SIZES[datatype]
    if len(raw) != count * size:
        raise BadRequest(
            f"{where}: {count} elements of {datatype} take {count * size} bytes, binary_data_size is {len(raw)}"
        )
    if datatype == "BF16":  # widen each to an FP32 whose low half is zero
        halves = bytes(raw)
        wide = bytearray(2 * len(halves))
        wide[2::4] = halves[0::2]
        wide[3::4] = halves[1::2]
        return list(struct.unpack(f"<{count}f", wide))
    return list(struct.unpack(f"<{count}{_FORMATS[datatype]}", raw))


def _split(raw: bytes | memoryview, count: int, where: str) -> list[Any]:
    items: list[Any] = []
    offset, end = 0, len(raw)
    while offset < end and len(items) <= count:
        if offset + 4 > end:
            raise BadRequest(f"{where}: BYTES element {len(items)} runs past the tensor")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > end:
            raise BadRequest(f"{where}: BYTES element {len(items)} runs past the tensor")
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count or offset != end:
        shown = f"more than {count}" if len(items) > count else str(len(items))
        raise BadRequest(f"{where}: the BYTES data holds {shown} element(s), the shape needs {count}")
    return items


def encode(flat: list[Any], datatype: str) -> bytes:
    """The raw data of elements ``flat`` (a ``str`` ``BYTES`` element as UTF-8); ``TypeError``
    when a value does not fit its datatype."""
    if datatype == "BYTES":
        parts = []
        for value in flat:
            data = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(data, bytes):
                raise TypeError(f"a BYTES element must be str or bytes, got {type(value).__name__}")
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    try:
        if datatype == "BF16":
            return _bf16(flat)
        return struct.pack(f"<{len(flat)}{_FORMATS[datatype]}", *flat)
    except (struct.error, OverflowError, TypeError) as exc:
        raise TypeError(f"a value does not fit {datatype}: {exc}") from None


def _bf16(flat: list[Any]) -> bytes:
    """Each value as FP32, rounded to its upper 16 bits (to nearest, ties to even; NaN stays NaN)."""
    words = struct.unpack(f"<{len(flat)}I", struct.pack(f"<{len(flat)}f", *flat))
    halves = [
        0x7FC0 if word & 0x7FFFFFFF > 0x7F800000 else (word + 0x7FFF + ((word >> 16) & 1)) >> 16
        for word in words
    ]
    return struct.pack(f"<{len(halves)}H", *halves)
