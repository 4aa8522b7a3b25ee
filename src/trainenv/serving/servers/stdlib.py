"""The embedded HTTP/1.1 WSGI server: stdlib only, hardened for a model endpoint.

One process; an accept thread, one connection-loop thread that owns every connection between
requests and reads without blocking until a whole request (head and body) is buffered, and a
bounded set of handler threads (``handler_threads``) that parse, run the app and answer it
(``trainenv.serving.servers.connections``). While the handler answers fast, the loop thread
answers whole requests itself (no thread hand-over: about half the CPU of a small request); a
slow one sends the work back to the handler threads. Idle keep-alive connections and slow
clients hold no thread. The app's ``InlineRunner`` bounds how many handler calls run at once and answers 504
through ``environ["trainenv.timeout_writer"]`` when one overruns: the answer is written and the
connection closed while the handler finishes in the background. What makes it fit for
production (parsing and bodies: ``trainenv.serving.servers.http11``):

* **HTTP/1.1 keep-alive, one write per response.** Status line, headers and body leave in one
  ``sendall`` (bodies over 256 KiB in a second one), and ``TCP_NODELAY`` is set, so keep-alive
  never meets Nagle + delayed ACK (the naive stdlib server: 44 ms per request).
* **Backlog** ``env.backlog`` (default 1024, never under 128; the stdlib default of 5 drops
  bursts of new connections into 1 s SYN retries).
* **Bounded.** At most ``max_connections`` open connections: one more gets an immediate 503
  with ``Retry-After`` and is closed. Handler concurrency is the app's pool (503 when full).
* **Timeouts per connection.** An idle keep-alive connection closes after ``keepalive_s``; a
  client that stalls for ``read_timeout_s`` in the middle of a head is dropped, in the middle of
  a body answered 408.
* **Unread bodies.** A body the app left unread is discarded when small (64 KiB); otherwise,
  and whenever the app sets ``environ["trainenv.must_close"]``, the connection is closed after
  the answer with a *lingering close* (stop writing; the connection loop reads and drops what
  the client still sends, up to 2 s / 64 MiB), so the client reads the 413 instead of a reset.
* **Graceful drain.** ``stop_accepting()`` closes the listening socket; ``drain(deadline)``
  closes idle keep-alive connections, lets requests in flight finish (their answers carry
  ``Connection: close``) and returns how many were still running at the deadline.

``run(env, sock, new_app, log)`` is the whole life of the process (or of one worker of
``servers.prefork``): it answers at once (``/ping`` 503) while a thread loads the model, then 200;
SIGTERM/SIGINT drain (a second signal stops waiting); exit 0, 78 when the model fails to load,
124 past the start-up timeout.
"""

from __future__ import annotations

import queue
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
from trainenv.serving.servers.buffering import BufferedInput, send_all
from trainenv.serving.servers.connections import LINGER, Connection, ConnectionLoop
from trainenv.serving.servers.dispatch import Balance, Dispatcher
from trainenv.serving.servers.http11 import (
    MAX_LINE,
    ChunkedBody,
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
        max_body: int = 6 * 1024 * 1024,
        max_threads: int = 128,
        max_waiting: int = 64,
        multiprocess: bool = False,
        balance: Balance | None = None,
    ) -> None:
        self.app = app
        self.log = log
        self.read_timeout_s = read_timeout_s
        host, port = sock.getsockname()[:2]
        self._base_environ = {
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
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
        self.dispatcher = Dispatcher(max_threads, max_waiting)
        app.pool.backlog = self.dispatcher.backlog
        self.loop = ConnectionLoop(
            sock, self._serve, self.dispatcher, log,
            max_connections=max_connections, keepalive_s=keepalive_s, read_timeout_s=read_timeout_s,
            max_body=max_body, balance=balance, inline_ready=self._inline_ready(app),
        )
        self.stopped = self.loop.stopped

    def serve_forever(self) -> None:
        """Accept until ``stop_accepting()`` (in a thread of its own; the connection loop gets one too)."""
        threading.Thread(target=self.loop.serve_forever, name="trainenv-connections", daemon=True).start()
        self.loop.accept_forever()

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused from now on."""
        self.loop.stop_accepting()

    def drain(self, deadline: float) -> int:
        """Close idle connections, wait for busy ones until ``deadline``; how many were cut."""
        return self.loop.drain(deadline)

    def close(self) -> None:
        self.loop.close_all()

    @property
    def busy(self) -> int:
        return self.loop.busy

    def _inline_ready(self, app: ServingApp) -> Callable[[], bool] | None:
        """When the connection loop may answer a request itself: never with batching (a batch
        waits for company); else while a handler slot is free and no request waits for a thread."""
        if app.batcher is not None:
            return None
        pool, dispatcher = app.pool, self.dispatcher
        return lambda: pool.has_free_slot() and dispatcher.backlog() == 0

    # -- one connection, on a dispatcher thread -----------------------------------------------------

    def _serve(self, conn: Connection) -> None:
        """Answer the buffered request of ``conn``, and the next ones already buffered."""
        loop = self.loop
        keep = False
        try:
            while True:
                keep = False
                try:
                    keep = self._one_request(conn)
                finally:
                    if not conn.answered:  # else the watchdog's 504 ended it already
                        loop.done()
                if not keep or not loop.resume(conn):
                    return
        except (OSError, ValueError):
            keep = False
        except BaseException as exc:  # noqa: BLE001 - a dispatcher thread must survive anything
            self.log.error(f"internal error in the server: {type(exc).__name__}: {exc}")
            keep = False
        finally:
            if not keep and conn.state != LINGER:
                loop.close(conn)

    def _timeout_writer(self, conn: Connection) -> Callable[[str, list[tuple[str, str]], bytes], None]:
        """``environ["trainenv.timeout_writer"]``: answer now (from the app's watchdog thread) and
        close, while the handler keeps running in its thread. The request no longer counts as in
        flight for the drain."""

        def write(status_text: str, headers: list[tuple[str, str]], body: bytes) -> None:
            if conn.answered:
                return
            conn.answered = True
            try:
                send_all(conn.sock, head(status_text, headers, len(body), False, True, False) + body, 5.0)
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.loop.done()

        return write

    def _one_request(self, conn: Connection) -> bool:
        """Parse, run the app, answer. True to keep the connection open."""
        sock = conn.sock
        reader = BufferedInput(conn, self.read_timeout_s)
        line = reader.readline(MAX_LINE + 1)
        if line in (b"\r\n", b"\n"):
            line = reader.readline(MAX_LINE + 1)
        if not line:
            return False

        def send(data: bytes) -> None:
            send_all(sock, data, self.read_timeout_s)

        try:
            environ, body, keep_alive, http10 = parse_request(self._base_environ, send, reader, line, conn.remote)
        except Reject as reject:
            send_error(sock, reject.status, reject.message)
            return False
        reader.live = True
        head_only = environ["REQUEST_METHOD"] == "HEAD"
        environ["trainenv.timeout_writer"] = self._timeout_writer(conn)
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
        if environ.get("trainenv.answered") or conn.answered:
            return False
        status_text, headers = captured
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        must_close = bool(environ.get("trainenv.must_close")) or self.loop.draining or not keep_alive
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
            send(start + payload)
        else:
            send(start)
            send(payload)
        if must_close:
            if 0 != unread <= LINGER_BYTES:
                self.loop.linger(conn, LINGER_BYTES if unread < 0 else unread, LINGER_SECONDS)
            return False
        return True


def handler_threads(env: ServingEnv) -> int:
    """Threads answering requests in one process: one per handler slot, as many again to wait for a
    slot (at most ``max_queue``), and one more so a request can always be told 503. Measured at 64
    connections on 2 cores, a thread per request in flight (``threads + max_queue``) cost 30% of
    the requests/s and 1.5x the p99 (GIL contention). With batching, a thread for every request
    the pool admits, plus a whole batch: a request waiting unparsed for a thread cannot join the
    batch being gathered, and the threads of a batch mostly wait (measured: 1.13-1.5x the
    requests/s at 64 connections, the same at 16)."""
    if env.max_batch_size > 1:
        return env.threads + env.max_queue + 1 + env.max_batch_size
    return env.threads + min(env.max_queue, env.threads) + 1


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
    balance: Balance | None = None,
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
            max_body=env.max_request_bytes,
            max_threads=handler_threads(env),
            max_waiting=max(0, env.threads + env.max_queue - handler_threads(env)),
            multiprocess=env.workers > 1,
            balance=balance,
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
    server.close()
    app.stop()
    return 0

