"""``run_server(env, log)``: bind, load the handler, serve until SIGTERM/SIGINT, drain, exit code.

This is what ``trainenv serve`` and ``python -m trainenv.serving`` run. The order of events:

1. Bind and listen on ``env.host:env.port`` (``port 0`` picks a free one); log
   ``listening on http://HOST:PORT`` with the effective settings.
2. Import the handler module and check its hooks (``trainenv.serving.handler``).
3. Serve. **stdlib** (default): connections are answered at once; ``/ping`` is 503 while a
   background thread runs ``pre_model_fn``, ``model_fn`` and ``model_warmup_fn``, then 200.
   **gunicorn** (``TRAINENV_SERVER=gunicorn``): ``env.workers`` gthread workers share the
   socket; each loads its own model copy before it accepts a connection (so a worker that
   answers is ready; before any is, probes wait) while a heartbeat keeps the arbiter from
   killing a slow loader. Configured in Python, no command-line strings.
4. SIGTERM or SIGINT: ``/ping`` turns 503, the listening socket closes, idle keep-alive
   connections close, requests in flight get up to ``env.grace_s`` to finish; a second
   signal cuts the wait short. (gunicorn: its arbiter's graceful stop, same grace.)

Exit codes:

| code | when |
|---|---|
| 0 | stopped by SIGTERM/SIGINT (after draining) |
| 78 | bad configuration or handler: port in use or not allowed, bad host, gunicorn missing, handler not found or fails to import, bad hooks, ``model_fn``/warm-up raised, no way to predict |
| 124 | the model was not ready within ``startup_timeout_s`` |
| 70 | an internal error of trainenv (a bug); the traceback is logged |

Every failure is logged as one ``ERROR`` line saying what to fix, followed by the traceback of
the user's code when there is one.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, Optional

from trainenv.errors import (
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_TIMEOUT,
    ConfigError,
    TrainenvError,
)
from trainenv.redact import secret_values
from trainenv.serving.config import ServingEnv
from trainenv.serving.logsink import ServingLog

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind_socket(env: ServingEnv) -> socket.socket:
    """A listening TCP socket on ``env.host:env.port``; ``ConfigError`` naming the variable if not possible."""
    port_var = env.port_source if env.port_source != "default" else "TRAINENV_SERVING_PORT"
    try:
        infos = socket.getaddrinfo(env.host, env.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError.at(
            "TRAINENV_SERVING_HOST", None, f"cannot resolve {env.host!r}: {exc.strerror}"
        ) from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and env.host in ("::", ""):
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        sock.bind(address)
        sock.listen(env.backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError.at(
                port_var, None, f"port {env.port} on {env.host} is already in use; choose another port"
            ) from None
        if exc.errno == errno.EACCES:
            raise ConfigError.at(
                port_var, None, f"port {env.port} needs privileges this process lacks; use a port >= 1024"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError.at(
                "TRAINENV_SERVING_HOST", None, f"{env.host!r} is not an address of this machine"
            ) from None
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


def _settings_line(env: ServingEnv) -> str:
    processes = (
        f"{env.workers} workers x {env.threads} threads"
        if env.server == "gunicorn"
        else f"{env.threads} handler threads"
    )
    return (
        f"server {env.server}, {processes}, timeout {env.timeout_s:g} s, max body {env.max_request_bytes} bytes, "
        f"queue {env.max_queue}, grace {env.grace_s:g} s, model dir {env.model_dir}"
    )


def run_server(env: ServingEnv, log: Optional[Callable[[str], None]] = None) -> int:
    """Serve until SIGTERM/SIGINT; the process exit code (see the module docstring)."""
    slog = ServingLog(log, env.log_level, secret_values(dict(os.environ)))
    try:
        if env.server == "gunicorn":
            from trainenv.serving.gunicorn_server import run_gunicorn

            return run_gunicorn(env, slog)
        return _run_stdlib(env, slog)
    except TrainenvError as exc:
        slog.error(str(exc), getattr(exc, "detail", ""))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence: log, exit 70
        import traceback

        slog.error(f"internal error: {type(exc).__name__}: {exc}", traceback.format_exc())
        return EXIT_INTERNAL


def load_hooks(env: ServingEnv, slog: ServingLog) -> Any:
    """Import the handler and check its hooks; ``HandlerError`` on failure."""
    from trainenv.serving.handler import Hooks, import_handler

    module, origin = import_handler(env)
    hooks = Hooks(module)
    slog.info(f"handler {origin} ({hooks.summary()})")
    return hooks


class _Signals:
    """Installs SIGTERM/SIGINT handlers that only enqueue; restores the previous ones on exit."""

    def __init__(self, events: "queue.SimpleQueue[Any]") -> None:
        self.events = events
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.events.put(("signal", signum))

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _run_stdlib(env: ServingEnv, slog: ServingLog) -> int:
    from trainenv.serving.app import ServingApp
    from trainenv.serving.handler import Handler, HandlerError
    from trainenv.serving.stdlib_server import StdlibServer

    sock = bind_socket(env)
    slog.info(f"listening on {_url(sock)} ({_settings_line(env)})")
    if env.workers > 1:
        slog.debug(
            f"the stdlib server is one process; workers={env.workers} applies to TRAINENV_SERVER=gunicorn"
        )
    events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
    with _Signals(events):
        try:
            hooks = load_hooks(env, slog)
        except BaseException:
            sock.close()
            raise
        handler = Handler(hooks, env)
        app = ServingApp(env, handler, slog)
        server = StdlibServer(
            sock,
            app,
            slog,
            max_connections=env.max_connections,
            keepalive_s=env.keepalive_s,
            read_timeout_s=env.read_timeout_s,
        )
        threading.Thread(target=server.serve_forever, name="trainenv-accept", daemon=True).start()

        def load() -> None:
            try:
                seconds = handler.load()
            except HandlerError as exc:
                events.put(("failed", exc))
            except BaseException as exc:  # noqa: BLE001
                import traceback

                events.put(
                    (
                        "failed",
                        HandlerError(
                            f"loading the model failed: {type(exc).__name__}: {exc}", traceback.format_exc()
                        ),
                    )
                )
            else:
                events.put(("loaded", seconds))

        threading.Thread(target=load, name="trainenv-model-load", daemon=True).start()
        startup_deadline = None if env.startup_timeout_s is None else time.monotonic() + env.startup_timeout_s
        exit_code: Optional[int] = None
        while exit_code is None:
            timeout = None if startup_deadline is None else max(0.0, startup_deadline - time.monotonic())
            try:
                event = events.get(timeout=timeout)
            except queue.Empty:
                slog.error(
                    f"the model was not ready within the start-up timeout of {env.startup_timeout_s:g} s "
                    "(TRAINENV_SERVING_STARTUP_TIMEOUT); exiting"
                )
                app.set_failed("start-up timeout")
                server.stop_accepting()
                return EXIT_TIMEOUT
            kind = event[0]
            if kind == "loaded":
                startup_deadline = None
                app.set_ready()
                slog.info(f"ready: model loaded and warmed up in {event[1]:.2f} s")
            elif kind == "failed":
                error = event[1]
                app.set_failed(str(error))
                server.stop_accepting()
                slog.error(f"{error}; exiting", getattr(error, "detail", ""))
                return EXIT_CONFIG
            elif kind == "signal":
                exit_code = _drain(env, server, app, events, event[1], slog)
        return exit_code


def _drain(
    env: ServingEnv, server: Any, app: Any, events: "queue.SimpleQueue[Any]", signum: int, slog: ServingLog
) -> int:
    name = signal.Signals(signum).name
    slog.info(f"{name}: stopping; {server.busy} requests in flight get up to {env.grace_s:g} s to finish")
    app.set_draining()
    server.stop_accepting()
    deadline = time.monotonic() + env.grace_s
    cut = 0
    while True:
        cut = server.drain(min(deadline, time.monotonic() + 0.1))
        if cut == 0 or time.monotonic() >= deadline:
            break
        try:
            event = events.get_nowait()
        except queue.Empty:
            continue
        if event[0] == "signal":
            slog.info(f"{signal.Signals(event[1]).name} again: not waiting any longer")
            break
    if cut:
        slog.warning(f"stopped with {cut} requests still running (grace {env.grace_s:g} s)")
    else:
        slog.info("stopped: all requests finished")
    app.pool.stop()
    return 0
