"""The embedded HTTP/1.1 WSGI server: stdlib only, hardened for a model endpoint.

One process; an accept loop plus one thread per open connection, which also runs the handler
(the app's ``InlineRunner`` bounds how many run at once and answers 504 through
``environ["trainenv.timeout_writer"]`` when one overruns: the answer is written and the
connection closed while the handler finishes in the background). What makes it fit for
production (parsing and bodies: ``trainenv.serving.servers.http11``):

* **HTTP/1.1 keep-alive, one write per response.** Status line, headers and body leave in one
  ``sendall`` (bodies over 256 KiB in a second one), and ``TCP_NODELAY`` is set, so keep-alive
  never meets Nagle + delayed ACK (the naive stdlib server: 44 ms per request).
* **Backlog** ``env.backlog`` (default 1024, never under 128; the stdlib default of 5 drops
  bursts of new connections into 1 s SYN retries).
* **Bounded.** At most ``max_connections`` open connections: one more gets an immediate 503
  with ``Retry-After`` and is closed. Handler concurrency is the app's pool (503 when full).
* **Timeouts per connection.** An idle keep-alive connection closes after ``keepalive_s``; a
  client that stalls for ``read_timeout_s`` in the middle of a request is dropped.
* **Unread bodies.** A body the app left unread is discarded when small (64 KiB); otherwise,
  and whenever the app sets ``environ["trainenv.must_close"]``, the connection is closed after
  the answer with a *lingering close* (stop writing, read and drop what the client still
  sends, up to 2 s / 64 MiB), so the client reads the 413 instead of a connection reset.
* **Graceful drain.** ``stop_accepting()`` closes the listening socket; ``drain(deadline)``
  closes idle keep-alive connections, lets requests in flight finish (their answers carry
  ``Connection: close``) and returns how many were still running at the deadline.

``run(env, sock, new_app, log)`` is the whole life of the process (or of one worker of
``servers.prefork``): it answers at once (``/ping`` 503) while a thread loads the model, then 200;
SIGTERM/SIGINT drain (a second signal stops waiting); exit 0, 78 when the model fails to load,
124 past the start-up timeout.
"""

from __future__ import annotations

import errno
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable

    from trainenv.serving.app import ServingApp
    from trainenv.serving.config import ServingEnv

from trainenv.errors import EXIT_CONFIG, EXIT_TIMEOUT, TrainenvError
from trainenv.serving.logsink import ServingLog
from trainenv.serving.servers.http11 import (
    ChunkedBody,
    MAX_LINE,
    FixedBody,
    Reject,
    answer_head,
    head,
    no_write,
    parse_request,
    send_error,
)

DISCARD_LIMIT = 64 * 1024
LINGER_BYTES = 64 * 1024 * 1024
LINGER_SECONDS = 2.0
SINGLE_WRITE_LIMIT = 256 * 1024
_BUSY_BODY = b'{"error":"service_unavailable","message":"too many open connections; retry later"}'
_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class _Connection:
    __slots__ = ("sock", "busy", "answered")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.busy = False
        self.answered = False


class StdlibServer:
    """Serve ``app`` on the bound, listening ``sock`` (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        app: ServingApp,
        log: ServingLog,
        *,
        max_connections: int,
        keepalive_s: float,
        read_timeout_s: float,
        multiprocess: bool = False,
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
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "trainenv.lingers": True,
        }
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}
        self._busy = 0
        self._accepting = True
        self._serving = False  # serve_forever has started
        self._draining = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.stopped = threading.Event()

    # -- accept loop ----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until ``stop_accepting()``; each gets its own daemon thread."""
        with self._lock:
            if not self._accepting:
                return
            self._serving = True
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
        with self._lock:
            was_accepting, serving = self._accepting, self._serving
            self._accepting = False
        if not serving:  # the accept loop never started (a worker stopped while loading)
            self.stopped.set()
            return
        if not was_accepting:
            self.stopped.wait(5.0)
            return
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

    def _timeout_writer(self, connection: _Connection) -> Callable[[str, list[tuple[str, str]], bytes], None]:
        """``environ["trainenv.timeout_writer"]``: answer now (from the app's watchdog thread) and
        close, while the handler keeps running in the connection's thread. The request no longer
        counts as in flight for the drain."""

        def write(status_text: str, headers: list[tuple[str, str]], body: bytes) -> None:
            if connection.answered:
                return
            connection.answered = True
            try:
                connection.sock.sendall(head(status_text, headers, len(body), False, True, False) + body)
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
            environ, body, keep_alive, http10 = parse_request(self._base_environ, sock, rfile, line, remote)
        except Reject as reject:
            send_error(sock, reject.status, reject.message)
            return False
        head_only = environ["REQUEST_METHOD"] == "HEAD"
        environ["trainenv.timeout_writer"] = self._timeout_writer(connection)
        captured: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info is not None and captured:
                raise exc_info[1].with_traceback(exc_info[2])
            captured[:] = [status, headers]
            return no_write

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
            send_error(sock, 500, "internal error in the server; see the server log")
            return False
        if environ.get("trainenv.answered") or connection.answered:
            return False
        status_text, headers = captured
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        must_close = bool(environ.get("trainenv.must_close")) or self._draining or not keep_alive
        unread = 0
        if isinstance(body, FixedBody):
            unread = body.remaining
            if 0 < unread <= DISCARD_LIMIT and not must_close:
                body.read(unread)
                unread = body.remaining
        elif isinstance(body, ChunkedBody) and not body.done:
            unread = -1
        if unread != 0:
            must_close = True

        code = status_text[:3]
        no_body = head_only or code in ("204", "304") or code.startswith("1")
        start, payload, must_close = answer_head(self.log, status_text, headers, payload, no_body, must_close, http10)
        if len(payload) <= SINGLE_WRITE_LIMIT:
            sock.sendall(start + payload)
        else:
            sock.sendall(start)
            sock.sendall(payload)
        if must_close:
            self._linger(sock, rfile, unread)
            return False
        return True

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


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Signals:
    """Installs handlers for ``signals`` that only enqueue; restores the previous ones on exit."""

    def __init__(self, events: queue.SimpleQueue[Any], signals: tuple[int, ...]) -> None:
        self.events, self.signals = events, signals
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.events.put(("signal", signum))

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run(
    env: ServingEnv, sock: socket.socket, new_app: Callable[[ServingLog], ServingApp], log: ServingLog, *,
    accept_early: bool = True,
    on_loaded: Callable[[ServingApp], None] | None = None,
    signals: tuple[int, ...] = _STOP_SIGNALS, cut: tuple[int, ...] | None = None,
) -> int:
    """Serve ``new_app(log)`` on ``sock`` until SIGTERM/SIGINT; the exit code (see the module docstring).
    A worker of ``servers.prefork`` also passes ``accept_early=False`` when it replaces one (it
    accepts once its model is loaded), ``on_loaded`` (tell the supervisor), ``signals=(SIGTERM, SIGQUIT)``
    and ``cut=(SIGQUIT,)``: only those cut a drain short (default: any of ``signals``)."""
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    with _Signals(events, signals):
        app = new_app(log)
        server = StdlibServer(
            sock, app, log,
            max_connections=env.max_connections,
            keepalive_s=env.keepalive_s,
            read_timeout_s=env.read_timeout_s,
            multiprocess=env.workers > 1,
        )
        accept = threading.Thread(target=server.serve_forever, name="trainenv-accept", daemon=True).start
        if accept_early:
            accept()

        def load() -> None:
            try:
                events.put(("loaded", app.load()))
            except TrainenvError as exc:
                events.put(("failed", exc))

        threading.Thread(target=load, name="trainenv-model-load", daemon=True).start()
        deadline = None if env.startup_timeout_s is None else time.monotonic() + env.startup_timeout_s
        while True:
            try:
                event = events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                log.error(
                    f"the model was not ready within the start-up timeout of {env.startup_timeout_s:g} s "
                    "(TRAINENV_SERVING_STARTUP_TIMEOUT); exiting"
                )
                app.set_failed("start-up timeout")
                server.stop_accepting()
                return EXIT_TIMEOUT
            if event[0] == "loaded":
                deadline = None
                log.info(f"ready: model loaded and warmed up in {event[1]:.2f} s")
                if not accept_early:
                    accept()
                if on_loaded is not None:
                    on_loaded(app)
            elif event[0] == "failed":
                server.stop_accepting()
                log.error(f"{event[1]}; exiting", getattr(event[1], "detail", ""))
                return EXIT_CONFIG
            elif event[0] == "signal":
                return _drain(env, server, app, events, event[1], log, cut or signals)


def _drain(env: ServingEnv, server: StdlibServer, app: ServingApp, events: queue.SimpleQueue[Any], signum: int,
           log: ServingLog, cut_by: tuple[int, ...]) -> int:
    log.info(f"{signal.Signals(signum).name}: stopping; {server.busy} requests in flight get up to {env.grace_s:g} s to finish")
    app.set_draining()
    server.stop_accepting()
    deadline = time.monotonic() + env.grace_s
    while True:
        cut = server.drain(min(deadline, time.monotonic() + 0.1))
        if cut == 0 or time.monotonic() >= deadline:
            break
        try:
            event = events.get_nowait()
        except queue.Empty:
            continue
        if event[0] == "signal" and event[1] in cut_by:  # not a worker's duplicate SIGTERM (from killpg)
            log.info(f"{signal.Signals(event[1]).name} again: not waiting any longer")
            break
    if cut:
        log.warning(f"stopped with {cut} requests still running (grace {env.grace_s:g} s)")
    else:
        log.info("stopped: all requests finished")
    app.stop()
    return 0

