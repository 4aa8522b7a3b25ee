"""The embedded HTTP/1.1 WSGI server: stdlib only, hardened for a model endpoint.

One process; an accept loop plus one thread per open connection, which also runs the handler
(the app's ``InlineRunner`` bounds how many run at once and answers 504 through
``environ["trainenv.timeout_writer"]`` when one overruns: the answer is written and the
connection closed while the handler finishes in the background). What makes it fit for production (serving.md §5.1,
each point measured or read there):

* **HTTP/1.1 keep-alive, one write per response.** Status line, headers and body leave in one
  ``sendall`` (bodies over 256 KiB in a second one), and ``TCP_NODELAY`` is set, so keep-alive
  never meets Nagle + delayed ACK (the naive stdlib server: 44 ms per request).
* **Backlog** ``env.backlog`` (default 1024, never under 128; the stdlib default of 5 drops
  bursts of new connections into 1 s SYN retries).
* **Bounded.** At most ``max_connections`` open connections: one more gets an immediate 503
  with ``Retry-After`` and is closed. Handler concurrency is the app's pool (503 when full).
* **Timeouts per connection.** An idle keep-alive connection closes after ``keepalive_s``; a
  client that stalls for ``read_timeout_s`` in the middle of a request is dropped.
* **Strict parsing.** Request line and header lines up to 8190 bytes (414/431), at most 100
  headers (431), no obs-fold, no space before the colon, ``Content-Length`` digits only and
  never together with ``Transfer-Encoding`` (400: no request smuggling), ``Transfer-Encoding``
  other than ``chunked`` 501, HTTP versions other than 1.0/1.1 505, ``Expect`` other than
  ``100-continue`` 417. Header names with ``_`` are dropped (they would alias ``-`` in WSGI).
* **Bodies.** ``wsgi.input`` is bounded by ``Content-Length`` or de-chunked; ``100 Continue`` is
  sent only when the app starts reading, so a 413 decided from ``Content-Length`` never
  invites the body. A body the app left unread is discarded when small (64 KiB); otherwise,
  and whenever the app sets ``environ["trainenv.must_close"]``, the connection is closed after
  the answer with a *lingering close* (stop writing, read and drop what the client still
  sends, up to 2 s / 64 MiB), so the client reads the 413 instead of a connection reset.
* **Graceful drain.** ``stop_accepting()`` closes the listening socket; ``drain(deadline)``
  closes idle keep-alive connections, lets requests in flight finish (their answers carry
  ``Connection: close``) and returns how many were still running at the deadline.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from trainenv.serving.api import HTTPError, reason_phrase, status_code_name
from trainenv.serving.logsink import ServingLog

MAX_LINE = 8190
MAX_HEADERS = 100
DISCARD_LIMIT = 64 * 1024
LINGER_BYTES = 64 * 1024 * 1024
LINGER_SECONDS = 2.0
SINGLE_WRITE_LIMIT = 256 * 1024
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+\Z")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+\Z")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_SERVER_HEADER = b"Server: trainenv\r\n"
_BUSY_BODY = b'{"error":"service_unavailable","message":"too many open connections; retry later"}'
_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class _Reject(Exception):
    """A request that cannot be parsed: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Continue:
    """Sends ``100 Continue`` once, the first time the app reads the body."""

    __slots__ = ("sock", "pending")

    def __init__(self, sock: socket.socket, pending: bool) -> None:
        self.sock = sock
        self.pending = pending

    def __call__(self) -> None:
        if self.pending:
            self.pending = False
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")


class _FixedBody:
    """``wsgi.input`` for a ``Content-Length`` body: never reads past it."""

    __slots__ = ("_rfile", "remaining", "_continue")

    def __init__(self, rfile: Any, length: int, expect: _Continue) -> None:
        self._rfile = rfile
        self.remaining = length
        self._continue = expect

    def read(self, size: Optional[int] = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        self._continue()
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._rfile.read(want)
        self.remaining -= len(data)
        if len(data) < want:
            self.remaining = -1
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        self._continue()
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._rfile.readline(want)
        self.remaining -= len(data)
        return data

    def readlines(self, hint: int = -1) -> List[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class _ChunkedBody:
    """``wsgi.input`` for ``Transfer-Encoding: chunked``: de-chunks; malformed framing is a 400."""

    __slots__ = ("_rfile", "_left", "done", "_continue", "_buffer")

    def __init__(self, rfile: Any, expect: _Continue) -> None:
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

    def read(self, size: Optional[int] = -1) -> bytes:
        self._continue()
        parts: List[bytes] = []
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

    def readline(self, size: Optional[int] = -1) -> bytes:
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

    def readlines(self, hint: int = -1) -> List[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class _Connection:
    __slots__ = ("sock", "busy", "answered")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.busy = False
        self.answered = False


_date_cache: List[Any] = [0, b""]
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date_header() -> bytes:
    """``Date: Sun, 06 Nov 1994 08:49:37 GMT`` (RFC 9110 IMF-fixdate), computed once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        text = f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
        _date_cache[1] = f"Date: {text}\r\n".encode("ascii")
        _date_cache[0] = now
    return _date_cache[1]


_environ_keys: Dict[bytes, Optional[str]] = {}


def _environ_key(name: bytes) -> Optional[str]:
    """``b"Content-Type" -> "CONTENT_TYPE"``, ``b"X-Foo" -> "HTTP_X_FOO"``; ``None`` for names with ``_``."""
    key = _environ_keys.get(name)
    if key is None and name not in _environ_keys:
        text = name.decode("latin-1").upper()
        if "_" in text:
            key = None
        elif text in ("CONTENT-TYPE", "CONTENT-LENGTH"):
            key = text.replace("-", "_")
        else:
            key = "HTTP_" + text.replace("-", "_")
        if len(_environ_keys) < 4096:
            _environ_keys[name] = key
    return key


class StdlibServer:
    """Serve ``app`` on the bound, listening ``sock`` (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        app: Callable,
        log: ServingLog,
        *,
        max_connections: int,
        keepalive_s: float,
        read_timeout_s: float,
    ) -> None:
        self.sock = sock
        self.app = app
        self.log = log
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.read_timeout_s = read_timeout_s
        host, port = sock.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = str(port)
        self._base_environ = {
            "SERVER_NAME": self.server_name,
            "SERVER_PORT": self.server_port,
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "trainenv.lingers": True,
        }
        self._lock = threading.Lock()
        self._connections: Dict[int, _Connection] = {}
        self._busy = 0
        self._accepting = True
        self._draining = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.stopped = threading.Event()

    # -- accept loop ----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until ``stop_accepting()``; each gets its own daemon thread."""
        self.sock.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "listen")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while self._accepting:
                for key, _ in selector.select():
                    if key.data == "wake" or not self._accepting:
                        return
                    self._accept_ready()
        finally:
            selector.close()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            try:
                self.sock.close()
            except OSError:
                pass
            self.stopped.set()

    def _accept_ready(self) -> None:
        for _ in range(64):
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning(f"cannot accept a connection: {exc.strerror}; pausing 0.1 s")
                    time.sleep(0.1)
                return
            if len(self._connections) >= self.max_connections:
                self._refuse(conn)
                continue
            connection = _Connection(conn)
            with self._lock:
                self._connections[id(connection)] = connection
            thread = threading.Thread(
                target=self._serve_connection, args=(connection, address), name="trainenv-http", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:
                with self._lock:
                    self._connections.pop(id(connection), None)
                self._refuse(conn)

    def _refuse(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            conn.send(_BUSY_503)
        except OSError:
            pass
        finally:
            conn.close()

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused from now on."""
        if not self._accepting:
            self.stopped.wait(5.0)
            return
        self._accepting = False
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self.stopped.wait(5.0)

    def drain(self, deadline: float) -> int:
        """Close idle connections, wait for busy ones until ``deadline``; how many were cut."""
        self._draining = True
        while True:
            with self._lock:
                idle = [c for c in self._connections.values() if not c.busy]
                busy = self._busy
            for connection in idle:
                try:
                    connection.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            if busy == 0 or time.monotonic() >= deadline:
                return busy
            time.sleep(0.02)

    @property
    def busy(self) -> int:
        return self._busy

    # -- one connection ---------------------------------------------------------------------------

    def _serve_connection(self, connection: _Connection, address: Any) -> None:
        sock = connection.sock
        remote = str(address[0]) if isinstance(address, tuple) and address else "-"
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        rfile = sock.makefile("rb", 65536)
        try:
            while not self._draining:
                sock.settimeout(self.keepalive_s)
                line = rfile.readline(MAX_LINE + 1)
                if line in (b"\r\n", b"\n"):
                    line = rfile.readline(MAX_LINE + 1)
                if not line:
                    return
                sock.settimeout(self.read_timeout_s)
                with self._lock:
                    connection.busy = True
                    self._busy += 1
                try:
                    keep = self._one_request(connection, rfile, line, remote)
                finally:
                    self._not_busy(connection)
                if not keep:
                    return
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._connections.pop(id(connection), None)
            try:
                rfile.close()
                sock.close()
            except OSError:
                pass

    def _not_busy(self, connection: _Connection) -> None:
        with self._lock:
            if connection.busy:
                connection.busy = False
                self._busy -= 1

    def _timeout_writer(self, connection: _Connection) -> Callable[[str, List[Tuple[str, str]], bytes], None]:
        """``environ["trainenv.timeout_writer"]``: answer now (from the app's watchdog thread) and
        close, while the handler keeps running in the connection's thread. The request no longer
        counts as in flight for the drain."""

        def write(status_text: str, headers: List[Tuple[str, str]], body: bytes) -> None:
            if connection.answered:
                return
            connection.answered = True
            try:
                connection.sock.sendall(_head(status_text, headers, len(body), False, True, False) + body)
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._not_busy(connection)

        return write

    def _one_request(self, connection: _Connection, rfile: Any, line: bytes, remote: str) -> bool:
        """Parse, run the app, answer. True to keep the connection open."""
        sock = connection.sock
        connection.answered = False
        try:
            environ, body, keep_alive, http10 = self._parse(sock, rfile, line, remote)
        except _Reject as reject:
            self._send_error(sock, reject.status, reject.message)
            return False
        head_only = environ["REQUEST_METHOD"] == "HEAD"
        environ["trainenv.timeout_writer"] = self._timeout_writer(connection)
        captured: List[Any] = []

        def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
            if exc_info is not None and captured:
                raise exc_info[1].with_traceback(exc_info[2])
            captured[:] = [status, headers]
            return _no_write

        try:
            result = self.app(environ, start_response)
            try:
                chunks = [bytes(chunk) for chunk in result]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if not captured:
                raise RuntimeError("the WSGI app returned without calling start_response")
        except Exception as exc:  # noqa: BLE001 - the app failed outside its own error handling
            self.log.error(
                f"the WSGI app failed on {environ['REQUEST_METHOD']} {environ['PATH_INFO'][:200]!r}: "
                f"{type(exc).__name__}: {exc}"
            )
            self._send_error(sock, 500, "internal error in the server; see the server log")
            return False
        if environ.get("trainenv.answered") or connection.answered:
            return False
        status_text, headers = captured
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        must_close = bool(environ.get("trainenv.must_close")) or self._draining or not keep_alive
        unread = 0
        if isinstance(body, _FixedBody):
            unread = body.remaining
            if 0 < unread <= DISCARD_LIMIT and not must_close:
                body.read(unread)
                unread = body.remaining
        elif isinstance(body, _ChunkedBody) and not body.done:
            unread = -1
        if unread != 0:
            must_close = True

        code = status_text[:3]
        no_body = head_only or code in ("204", "304") or code.startswith("1")
        head = _head(status_text, headers, len(payload), no_body, must_close, http10)
        if no_body:
            sock.sendall(head)
        elif len(payload) <= SINGLE_WRITE_LIMIT:
            sock.sendall(head + payload)
        else:
            sock.sendall(head)
            sock.sendall(payload)
        if must_close:
            self._linger(sock, rfile, unread)
            return False
        return True

    def _parse(
        self, sock: socket.socket, rfile: Any, line: bytes, remote: str
    ) -> Tuple[dict, Any, bool, bool]:
        if len(line) > MAX_LINE:
            raise _Reject(414, "the request line is too long")
        if not line.endswith(b"\n"):
            raise _Reject(400, "the connection closed inside the request line")
        parts = line.rstrip(b"\r\n").split(b" ")
        if len(parts) != 3 or not _METHOD.match(parts[0]):
            raise _Reject(400, "malformed request line")
        method, target, version = parts
        match = _VERSION.match(version)
        if match is None:
            raise _Reject(400, "malformed HTTP version")
        if match.group(1) != b"1" or match.group(2) not in (b"0", b"1"):
            raise _Reject(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        http10 = match.group(2) == b"0"
        if target.startswith(b"http://") or target.startswith(b"https://"):
            slash = target.find(b"/", target.find(b"//") + 2)
            target = target[slash:] if slash >= 0 else b"/"
        if not target.startswith(b"/"):
            raise _Reject(400, "the request target must be a path")
        path, _, query = target.partition(b"?")
        if b"%" in path:
            from urllib.parse import unquote_to_bytes

            path = unquote_to_bytes(path)
        path_info = path.decode("latin-1")

        environ = dict(self._base_environ)
        environ["REQUEST_METHOD"] = method.decode("ascii")
        environ["PATH_INFO"] = path_info
        environ["QUERY_STRING"] = query.decode("latin-1")
        environ["SERVER_PROTOCOL"] = version.decode("ascii")
        environ["REMOTE_ADDR"] = remote
        content_length: Optional[bytes] = None
        count = 0
        while True:
            header = rfile.readline(MAX_LINE + 1)
            if header in (b"\r\n", b"\n"):
                break
            if not header:
                raise _Reject(400, "the connection closed inside the headers")
            if len(header) > MAX_LINE or not header.endswith(b"\n"):
                raise _Reject(431, "a header line is too long")
            count += 1
            if count > MAX_HEADERS:
                raise _Reject(431, "too many headers")
            if header[0] in b" \t":
                raise _Reject(400, "obsolete header line folding is not accepted")
            name, colon, value = header.partition(b":")
            if not colon or not _HEADER_NAME.match(name):
                raise _Reject(400, "malformed header line")
            value = value.strip(b" \t\r\n")
            key = _environ_key(name)
            if key is None:
                continue
            if key == "CONTENT_LENGTH":
                if content_length is not None and content_length != value:
                    raise _Reject(400, "conflicting Content-Length headers")
                content_length = value
            text = value.decode("latin-1")
            previous = environ.get(key)
            environ[key] = text if previous is None or key == "CONTENT_LENGTH" else f"{previous}, {text}"

        connection = environ.get("HTTP_CONNECTION", "").lower()
        keep_alive = ("keep-alive" in connection) if http10 else ("close" not in connection)
        expect = environ.get("HTTP_EXPECT")
        if expect is not None and expect.lower() != "100-continue":
            raise _Reject(417, f"Expect: {expect} is not supported")
        expect_continue = _Continue(sock, expect is not None and not http10)
        transfer = environ.get("HTTP_TRANSFER_ENCODING")
        body: Any
        if transfer is not None:
            if content_length is not None:
                raise _Reject(400, "Content-Length and Transfer-Encoding together are not accepted")
            if http10 or transfer.strip().lower() != "chunked":
                raise _Reject(501, f"Transfer-Encoding {transfer!r} is not supported (only chunked)")
            body = _ChunkedBody(rfile, expect_continue)
        elif content_length is not None:
            if not content_length.isdigit() or len(content_length) > 18:
                raise _Reject(400, "Content-Length must be a number of bytes")
            body = _FixedBody(rfile, int(content_length), expect_continue)
        else:
            body = _FixedBody(rfile, 0, expect_continue)
        environ["wsgi.input"] = body
        return environ, body, keep_alive, http10

    def _send_error(self, sock: socket.socket, status: int, message: str) -> None:
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

    def _linger(self, sock: socket.socket, rfile: Any, unread: int) -> None:
        """Half-close, then read and drop what the client still sends, so it can read our answer."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        if unread == 0 or unread > LINGER_BYTES:
            return
        budget = LINGER_BYTES if unread < 0 else unread
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            while budget > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(min(remaining, 1.0))
                data = (
                    rfile.read1(min(budget, 65536))
                    if hasattr(rfile, "read1")
                    else rfile.read(min(budget, 65536))
                )
                if not data:
                    return
                budget -= len(data)
        except (OSError, ValueError):
            return


def _head(
    status_text: str, headers: List[Tuple[str, str]], length: int, no_body: bool, close: bool, http10: bool
) -> bytes:
    """Status line and headers, with ``Date``, ``Server``, ``Content-Length`` and ``Connection``."""
    out = [f"HTTP/1.1 {status_text}\r\n".encode("latin-1"), _date_header(), _SERVER_HEADER]
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


def _no_write(data: bytes) -> None:
    raise RuntimeError("the WSGI write() callable is not supported; return an iterable")
