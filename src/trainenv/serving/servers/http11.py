"""HTTP/1.1 for the stdlib server: parsing a request, its body as ``wsgi.input``, an answer's head.

* **Strict parsing** (``parse_request``). Request line and header lines up to 8190 bytes
  (414/431), at most 100 headers (431), no obs-fold, no space before the colon,
  ``Content-Length`` digits only and never together with ``Transfer-Encoding`` (400: no request
  smuggling), ``Transfer-Encoding`` other than ``chunked`` 501, HTTP versions other than 1.0/1.1
  505, ``Expect`` other than ``100-continue`` 417. Header names with ``_`` are dropped (they
  would alias ``-`` in WSGI). A request that fails these raises ``Reject(status, message)``.
* **Bodies.** ``FixedBody`` never reads past ``Content-Length``; ``ChunkedBody`` de-chunks and
  answers malformed framing with 400. ``100 Continue`` is sent only when the app starts
  reading (``Continue``), so a 413 decided from ``Content-Length`` never invites the body.
* **One write per answer.** ``head`` builds the status line and headers (``Date``, ``Server``,
  ``Content-Length``, ``Connection``) as one ``bytes``, to be sent with the body.
"""

from __future__ import annotations

import re
import socket
import sys
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, BinaryIO, Callable, Iterator

    from trainenv.serving.logsink import ServingLog

from trainenv.serving.api import HTTPError, reason_phrase, status_code_name

MAX_LINE = 8190
MAX_HEADERS = 100
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+\Z")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+\Z")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_SERVER_HEADER = b"Server: trainenv\r\n"


class Reject(Exception):
    """A request that cannot be parsed: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Continue:
    """Sends ``100 Continue`` once, the first time the app reads the body."""

    __slots__ = ("send", "pending")

    def __init__(self, send: Callable[[bytes], None], pending: bool) -> None:
        self.send = send
        self.pending = pending

    def __call__(self) -> None:
        if self.pending:
            self.pending = False
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")


class FixedBody:
    """``wsgi.input`` for a ``Content-Length`` body: never reads past it."""

    __slots__ = ("_rfile", "remaining", "_continue")

    def __init__(self, rfile: BinaryIO, length: int, expect: Continue) -> None:
        self._rfile = rfile
        self.remaining = length
        self._continue = expect

    def read(self, size: int | None = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        self._continue()
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._rfile.read(want)
        self.remaining -= len(data)
        if len(data) < want:
            self.remaining = -1
        return data

    def readline(self, size: int | None = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        self._continue()
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._rfile.readline(want)
        self.remaining -= len(data)
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class ChunkedBody:
    """``wsgi.input`` for ``Transfer-Encoding: chunked``: de-chunks; malformed framing is a 400."""

    __slots__ = ("_rfile", "_left", "done", "_continue", "_buffer")

    def __init__(self, rfile: BinaryIO, expect: Continue) -> None:
        self._rfile = rfile
        self._left = 0
        self.done = False
        self._continue = expect
        self._buffer = b""

    def _next_chunk(self) -> None:
        line = self._rfile.readline(MAX_LINE + 1)
        if not line.endswith(b"\n") or len(line) > MAX_LINE:
            raise HTTPError(400, "malformed chunked body: bad chunk size line")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = (
                int(size_text, 16)
                if size_text and all(c in b"0123456789abcdefABCDEF" for c in size_text)
                else -1
            )
        except ValueError:
            size = -1
        if size < 0:
            raise HTTPError(400, "malformed chunked body: bad chunk size")
        if size == 0:
            for _ in range(MAX_HEADERS + 1):
                trailer = self._rfile.readline(MAX_LINE + 1)
                if trailer in (b"\r\n", b"\n"):
                    self.done = True
                    return
                if not trailer.endswith(b"\n"):
                    break
            raise HTTPError(400, "malformed chunked body: bad trailer")
        self._left = size

    def read(self, size: int | None = -1) -> bytes:
        self._continue()
        parts: list[bytes] = []
        want = sys.maxsize if size is None or size < 0 else size
        while want > 0 and not self.done:
            if self._left == 0:
                self._next_chunk()
                continue
            data = self._rfile.read(min(want, self._left))
            if not data:
                raise HTTPError(400, "the chunked body ended early")
            parts.append(data)
            want -= len(data)
            self._left -= len(data)
            if self._left == 0 and self._rfile.readline(3) not in (b"\r\n", b"\n"):
                raise HTTPError(400, "malformed chunked body: missing CRLF after a chunk")
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        data = self._buffer
        while b"\n" not in data and not self.done:
            more = self.read(8192)
            if not more:
                break
            data += more
        cut = data.find(b"\n") + 1 or len(data)
        if size is not None and 0 <= size < cut:
            cut = size
        self._buffer = data[cut:]
        return data[:cut]

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")



_date_cache: list[tuple[int, bytes]] = [(0, b"")]  # (second, its Date line)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date_header() -> bytes:
    """``Date: Sun, 06 Nov 1994 08:49:37 GMT`` (RFC 9110 IMF-fixdate), computed once a second."""
    now = int(time.time())
    second, line = _date_cache[0]
    if second != now:
        t = time.gmtime(now)
        text = f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
        line = f"Date: {text}\r\n".encode("ascii")
        _date_cache[0] = (now, line)
    return line


environ_keys: dict[bytes, str | None] = {}


def environ_key(name: bytes) -> str | None:
    """``b"Content-Type" -> "CONTENT_TYPE"``, ``b"X-Foo" -> "HTTP_X_FOO"``; ``None`` for names with ``_``."""
    key = environ_keys.get(name)
    if key is None and name not in environ_keys:
        text = name.decode("latin-1").upper()
        if "_" in text:
            key = None
        elif text in ("CONTENT-TYPE", "CONTENT-LENGTH"):
            key = text.replace("-", "_")
        else:
            key = "HTTP_" + text.replace("-", "_")
        if len(environ_keys) < 4096:
            environ_keys[name] = key
    return key



def parse_request(
    base_environ: dict[str, Any], send: Callable[[bytes], None], rfile: Any, line: bytes, remote: str
) -> tuple[dict[str, Any], FixedBody | ChunkedBody, bool, bool]:
    """Read the headers after request ``line``: ``(environ, body, keep-alive, HTTP/1.0)``; ``Reject`` if malformed."""
    if len(line) > MAX_LINE:
        raise Reject(414, "the request line is too long")
    if not line.endswith(b"\n"):
        raise Reject(400, "the connection closed inside the request line")
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not _METHOD.match(parts[0]):
        raise Reject(400, "malformed request line")
    method, target, version = parts
    match = _VERSION.match(version)
    if match is None:
        raise Reject(400, "malformed HTTP version")
    if match.group(1) != b"1" or match.group(2) not in (b"0", b"1"):
        raise Reject(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    http10 = match.group(2) == b"0"
    if target.startswith(b"http://") or target.startswith(b"https://"):
        slash = target.find(b"/", target.find(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        raise Reject(400, "the request target must be a path")
    path, _, query = target.partition(b"?")
    if b"%" in path:
        from urllib.parse import unquote_to_bytes

        path = unquote_to_bytes(path)
    path_info = path.decode("latin-1")

    environ = dict(base_environ)
    environ["REQUEST_METHOD"] = method.decode("ascii")
    environ["PATH_INFO"] = path_info
    environ["QUERY_STRING"] = query.decode("latin-1")
    environ["SERVER_PROTOCOL"] = version.decode("ascii")
    environ["REMOTE_ADDR"] = remote
    content_length: bytes | None = None
    count = 0
    while True:
        header = rfile.readline(MAX_LINE + 1)
        if header in (b"\r\n", b"\n"):
            break
        if not header:
            raise Reject(400, "the connection closed inside the headers")
        if len(header) > MAX_LINE or not header.endswith(b"\n"):
            raise Reject(431, "a header line is too long")
        count += 1
        if count > MAX_HEADERS:
            raise Reject(431, "too many headers")
        if header[0] in b" \t":
            raise Reject(400, "obsolete header line folding is not accepted")
        name, colon, value = header.partition(b":")
        if not colon or not _HEADER_NAME.match(name):
            raise Reject(400, "malformed header line")
        value = value.strip(b" \t\r\n")
        key = environ_key(name)
        if key is None:
            continue
        if key == "CONTENT_LENGTH":
            if content_length is not None and content_length != value:
                raise Reject(400, "conflicting Content-Length headers")
            content_length = value
        text = value.decode("latin-1")
        previous = environ.get(key)
        environ[key] = text if previous is None or key == "CONTENT_LENGTH" else f"{previous}, {text}"

    connection = environ.get("HTTP_CONNECTION", "").lower()
    keep_alive = ("keep-alive" in connection) if http10 else ("close" not in connection)
    expect = environ.get("HTTP_EXPECT")
    if expect is not None and expect.lower() != "100-continue":
        raise Reject(417, f"Expect: {expect} is not supported")
    expect_continue = Continue(send, expect is not None and not http10)
    transfer = environ.get("HTTP_TRANSFER_ENCODING")
    body: Any
    if transfer is not None:
        if content_length is not None:
            raise Reject(400, "Content-Length and Transfer-Encoding together are not accepted")
        if http10 or transfer.strip().lower() != "chunked":
            raise Reject(501, f"Transfer-Encoding {transfer!r} is not supported (only chunked)")
        body = ChunkedBody(rfile, expect_continue)
    elif content_length is not None:
        if not content_length.isdigit() or len(content_length) > 18:
            raise Reject(400, "Content-Length must be a number of bytes")
        body = FixedBody(rfile, int(content_length), expect_continue)
    else:
        body = FixedBody(rfile, 0, expect_continue)
    environ["wsgi.input"] = body
    return environ, body, keep_alive, http10


def send_error(sock: socket.socket, status: int, message: str) -> None:
    """A JSON error answer, then close for writing (the request could not be parsed)."""
    body = ('{"error":"%s","message":"%s"}' % (status_code_name(status), message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason_phrase(status)}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    try:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def head(
    status_text: str, headers: list[tuple[str, str]], length: int, no_body: bool, close: bool, http10: bool
) -> bytes:
    """Status line and headers, with ``Date``, ``Server``, ``Content-Length`` and ``Connection``."""
    out = [f"HTTP/1.1 {status_text}\r\n".encode("latin-1"), date_header(), _SERVER_HEADER]
    has_length = False
    for name, value in headers:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} contains a line break")
        if name.lower() == "content-length":
            has_length = True
        out.append(f"{name}: {value}\r\n".encode("latin-1"))
    if not has_length and not no_body:
        out.append(f"Content-Length: {length}\r\n".encode("ascii"))
    if close:
        out.append(b"Connection: close\r\n")
    elif http10:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def answer_head(
    log: ServingLog, status_text: str, headers: list[tuple[str, str]], payload: bytes, no_body: bool, close: bool, http10: bool
) -> tuple[bytes, bytes, bool]:
    """``head()``, then the payload to send (empty when ``no_body``) and whether to close; when the
    head cannot be built (a header that is not latin-1 or holds a line break: a bug, since the app
    cleans every header), an ERROR log line and a JSON 500 in its place, never a silent drop."""
    try:
        return head(status_text, headers, len(payload), no_body, close, http10), b"" if no_body else payload, close
    except (ValueError, UnicodeError) as exc:
        log.error(f"cannot send the answer {status_text[:3]}: {exc}; answered 500 instead")
    body = b'{"error":"internal_server_error","message":"the answer\'s headers could not be sent; see the server log"}'
    start = head("500 Internal Server Error", [("Content-Type", "application/json")], len(body), False, True, http10)
    return start, b"" if no_body else body, True


def no_write(data: bytes) -> None:
    raise RuntimeError("the WSGI write() callable is not supported; return an iterable")


