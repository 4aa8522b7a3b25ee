"""Reading a request for the app: the body within its limit, and its media type.

``read_body(environ, limit)`` returns the whole body (``Content-Length`` or chunked) or raises:

* ``HTTPError(400)``: a ``Content-Length`` that is not a byte count, or a body that ends early;
* ``HTTPError(413)``: a ``Content-Length`` over ``limit`` (decided before reading a byte), or a
  chunked body passing it while read; ``environ["trainenv.must_close"]`` is set;
* ``ClientGone``: the client stopped sending in the middle of the body (the server's read
  timeout passed, or the connection broke). Not a server error: the app logs one warning
  and answers 408 on a connection it closes.

A server that half-closes and drops the rest of an unread body itself sets
``environ["trainenv.lingers"]``; on any other server the rest of an oversized body (at most
``DISCARD_LIMIT`` bytes) is read and dropped before the 413, so the client gets to read it.

``content_type(environ)`` is ``(media type, parameters)``; no ``Content-Type`` means JSON, a
value that is not a media type is a 415.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, MutableMapping

    from _typeshed.wsgi import InputStream

from trainenv.serving import codecs, media
from trainenv.serving.api import HTTPError

READ_CHUNK = 65536
DISCARD_LIMIT = 64 * 1024 * 1024


class ClientGone(Exception):
    """The client went silent (or away) in the middle of the body."""


def read_body(environ: MutableMapping[str, Any], limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (see the module docstring)."""
    stream = environ["wsgi.input"]
    length_text = environ.get("CONTENT_LENGTH")
    if length_text:
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            environ["trainenv.must_close"] = True
            raise HTTPError(400, f"Content-Length {length_text!r} is not a byte count") from None
        if length > limit:
            environ["trainenv.must_close"] = True
            _discard(environ, stream, length)
            raise HTTPError(413, f"the body is {length} bytes; the limit is {limit} bytes (max_request_bytes)")
        body = _read(environ, stream, length, length) if length else b""
        if len(body) != length:
            environ["trainenv.must_close"] = True
            raise HTTPError(400, f"the body ended after {len(body)} of {length} bytes")
        return body
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = _read(environ, stream, min(READ_CHUNK, limit + 1 - size), None)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            environ["trainenv.must_close"] = True
            _discard(environ, stream, None)
            raise HTTPError(413, f"the chunked body passed the limit of {limit} bytes (max_request_bytes)")
        parts.append(chunk)


def _read(environ: MutableMapping[str, Any], stream: InputStream, size: int, length: int | None) -> bytes:
    try:
        return stream.read(size)
    except OSError as exc:  # a timeout is an OSError too
        environ["trainenv.must_close"] = True
        of = f" of {length} bytes" if length is not None else " (chunked)"
        why = "went silent past the read timeout" if isinstance(exc, TimeoutError) else f"went away ({exc})"
        raise ClientGone(f"the client {why} in the middle of the body{of}") from None


def content_type(environ: MutableMapping[str, Any]) -> tuple[str, dict[str, str]]:
    """``(media type, parameters)`` of the body; JSON when there is no ``Content-Type``."""
    header = environ.get("CONTENT_TYPE") or ""
    if not header.strip():
        return codecs.JSON, {}
    parsed = media.parse_media_type(header)
    if parsed is None:
        raise HTTPError(415, f"Content-Type {header!r} is not a media type")
    return parsed


def _discard(environ: MutableMapping[str, Any], stream: InputStream, length: int | None) -> None:
    """Before a 413 on a server that cannot half-close: read and drop the rest of the body, at
    most ``DISCARD_LIMIT`` bytes, so the client gets to read the answer."""
    if environ.get("trainenv.lingers"):
        return
    left = DISCARD_LIMIT if length is None else length
    if left > DISCARD_LIMIT:
        return
    try:
        while left > 0:
            chunk = stream.read(min(READ_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
    except Exception:  # noqa: BLE001 - best effort; the answer is a 413 either way
        return
