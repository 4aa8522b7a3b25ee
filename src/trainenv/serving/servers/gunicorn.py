"""The same WSGI app on gunicorn ``gthread`` workers (``TRAINENV_SERVER=gunicorn``, extra ``serve``).

Configured in Python through ``gunicorn.app.base.BaseApplication`` (no command line, no config
file; ``GUNICORN_CMD_ARGS`` is not read). The settings:

| gunicorn setting | value |
|---|---|
| ``bind`` | ``fd://N``: a dup of the socket start-up bound, so bind errors and the log line are ours |
| ``workers`` / ``worker_class`` | ``env.workers`` / ``gthread`` (not gevent: 230 ms p99 tail, monkey-patching) |
| ``threads`` | ``env.threads + env.max_queue`` (at most 256): requests reach the app's pool, which answers 503/504 itself, and ``/ping`` is never stuck behind busy handlers |
| ``worker_connections`` | ``env.max_connections`` |
| ``timeout`` | ``max(30, timeout_s + 30)``: only for a worker whose main loop hangs; handler timeouts are the app's 504 |
| ``graceful_timeout`` / ``keepalive`` | ``env.grace_s`` / ``env.keepalive_s`` |
| ``preload_app`` | off: each worker runs ``model_fn`` itself, after the fork (safe with CUDA and threads) |
| ``accesslog`` | off: the app writes the access lines (health checks at DEBUG) |
| ``limit_request_*`` | 8190-byte lines, 100 headers (as the stdlib server) |
| ``control_socket_disable`` | on, where the setting exists |

The handler module is imported once in the arbiter, before forking (``trainenv.serving.startup``),
so an import error exits 78 before any worker starts. Each worker then builds the app and loads
the model in ``load()`` with a heartbeat thread notifying the arbiter, and only then starts
accepting. As with ``servers.prefork``, ``/ping`` is 200 only once every worker has loaded: the
arbiter's ``pre_fork`` gives each worker a slot (the lowest no live worker holds), and a worker
sets its slot's byte in shared memory once loaded; the bytes are never cleared, so a replaced
worker that reloads does not turn ``/ping`` to 503. ``_Bridge`` gives the app what the stdlib
server gives it: a read timeout on the request's socket (a client silent mid-body is dropped)
and ``trainenv.timeout_writer``. A worker whose model fails to load exits with gunicorn's
``APP_LOAD_ERROR`` and the arbiter halts; the reason (failure or start-up timeout) reaches the
arbiter through one byte of shared memory, so ``run`` returns 78 or 124 as the stdlib server
would.
"""

from __future__ import annotations

import math
import mmap
import os
import socket
import sys
import threading
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Iterable, MutableMapping

    from trainenv.serving.app import ServingApp
    from trainenv.serving.config import ServingEnv

from trainenv.errors import EXIT_CONFIG, EXIT_INTERNAL, EXIT_TIMEOUT, ConfigError, TrainenvError
from trainenv.serving.logsink import ServingLog

_REASON_NONE = 0
_REASON_LOAD_FAILED = 1
_REASON_STARTUP_TIMEOUT = 2
_current_worker: dict[str, Any] = {}


def _pre_fork(arbiter: Any, worker: Any) -> None:
    """In the arbiter: give the new worker the lowest slot no live worker holds (its readiness byte)."""
    used = {getattr(other, "trainenv_slot", -1) for other in arbiter.WORKERS.values()}
    worker.trainenv_slot = min(set(range(len(used) + 1)) - used)


def _post_fork(arbiter: Any, worker: Any) -> None:
    _current_worker["worker"] = worker


def run(env: ServingEnv, sock: socket.socket, new_app: Callable[[ServingLog], ServingApp], slog: ServingLog) -> int:
    """Serve ``new_app`` on gunicorn workers sharing ``sock``; the exit code (see the module docstring)."""
    try:
        from gunicorn.app.base import BaseApplication
        from gunicorn.errors import AppImportError, HaltServer
    except ImportError:
        raise ConfigError.at(
            "TRAINENV_SERVER", None, "'gunicorn' needs gunicorn installed: pip install 'trainenv[serve]'"
        ) from None
    reason = mmap.mmap(-1, 1)
    loaded = mmap.mmap(-1, env.workers)  # byte i: the worker of slot i has loaded (never cleared)
    listen_fd = os.dup(sock.fileno())  # gunicorn takes ownership of (and closes) the fd it is given
    sink, level, secrets = slog.sink, env.log_level, slog.secrets

    class TrainenvGunicorn(BaseApplication):
        def load_config(self) -> None:
            settings = {
                "bind": [f"fd://{listen_fd}"],
                "workers": env.workers,
                "worker_class": "gthread",
                "threads": min(256, env.threads + env.max_queue),
                "worker_connections": env.max_connections,
                "timeout": int(max(30.0, env.timeout_s + 30.0)),
                "graceful_timeout": int(math.ceil(env.grace_s)),
                "keepalive": int(max(1.0, env.keepalive_s)),
                "backlog": env.backlog,
                "preload_app": False,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": env.log_level.lower(),
                "limit_request_line": 8190,
                "limit_request_fields": 100,
                "limit_request_field_size": 8190,
                "proc_name": "trainenv-serve",
                "pre_fork": _pre_fork,
                "post_fork": _post_fork,
                "sendfile": False,
                "control_socket_disable": True,
            }
            for key, value in settings.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self) -> _Bridge:
            return _load_worker_app(env, new_app, ServingLog(sink, level, secrets), reason, loaded, AppImportError)

    arbiter_pid = os.getpid()
    try:
        TrainenvGunicorn().run()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    except HaltServer as exc:  # raised again from halt() when two workers fail together
        code = exc.exit_status
    if os.getpid() != arbiter_pid:
        # A worker leaves gunicorn through SystemExit; it must not run its parent's code from
        # here on (the caller's cleanup, atexit handlers): end the process with that status.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code if isinstance(code, int) else 1)
    sock.close()
    why = reason[0]
    if code in (0, None):
        return 0
    if why == _REASON_STARTUP_TIMEOUT:
        return EXIT_TIMEOUT
    if why == _REASON_LOAD_FAILED or code == 4:
        slog.error("a gunicorn worker could not load the model (see the error above); exiting")
        return EXIT_CONFIG
    slog.error(f"gunicorn stopped with status {code}")
    return EXIT_INTERNAL


def _load_worker_app(
    env: ServingEnv,
    new_app: Callable[[ServingLog], ServingApp],
    slog: ServingLog,
    reason: mmap.mmap,
    loaded: mmap.mmap,
    app_import_error: Any,
) -> _Bridge:
    """In a worker: build the app and load the model (heartbeat running). Runs before the worker accepts."""
    worker = _current_worker.get("worker")
    slot = getattr(worker, "trainenv_slot", None)
    done = threading.Event()
    deadline: float | None = (
        None if env.startup_timeout_s is None else time.monotonic() + env.startup_timeout_s
    )

    def heartbeat() -> None:
        while not done.wait(1.0):
            if deadline is not None and time.monotonic() > deadline:
                slog.error(
                    f"the model was not ready within the start-up timeout of {env.startup_timeout_s:g} s "
                    "(TRAINENV_SERVING_STARTUP_TIMEOUT); exiting"
                )
                reason[0] = _REASON_STARTUP_TIMEOUT
                sys.stderr.flush()
                os._exit(4)
            if worker is not None:
                worker.notify()

    threading.Thread(target=heartbeat, name="trainenv-heartbeat", daemon=True).start()
    app = new_app(slog)
    app.peers_loading = lambda: loaded[:].count(0)
    try:
        seconds = app.load()
    except TrainenvError as exc:
        reason[0] = _REASON_LOAD_FAILED
        slog.error(str(exc), getattr(exc, "detail", ""))
        raise app_import_error(str(exc)) from None
    finally:
        done.set()
    if slot is not None and slot < env.workers:
        loaded[slot] = 1
    slog.info(f"worker {os.getpid()} ready: model loaded and warmed up in {seconds:.2f} s")
    return _Bridge(app, env.read_timeout_s)


class _Bridge:
    """What the stdlib server does for the app, done on gunicorn's socket: a read timeout for
    the request (a client silent mid-body is dropped) and the writer of early 504 answers."""

    def __init__(self, app: ServingApp, read_timeout_s: float) -> None:
        self.app = app
        self.read_timeout_s = read_timeout_s

    def __call__(
        self, environ: MutableMapping[str, Any], start_response: Callable[[str, list[tuple[str, str]]], object]
    ) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(self.read_timeout_s)
            environ["trainenv.timeout_writer"] = _socket_writer(sock)
        return self.app(environ, start_response)


def _socket_writer(sock: socket.socket) -> Callable[[str, list[tuple[str, str]], bytes], None]:
    """Write a complete ``Connection: close`` answer on a raw socket, then shut it down."""

    def write(status_text: str, headers: list[tuple[str, str]], body: bytes) -> None:
        lines = (
            [f"HTTP/1.1 {status_text}"]
            + [f"{name}: {value}" for name, value in headers]
            + ["Connection: close", "", ""]
        )
        try:
            sock.sendall("\r\n".join(lines).encode("latin-1") + body)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    return write
