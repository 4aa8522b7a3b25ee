"""Start serving: resolve the settings, bind, load the handler, pick the server, hand it the app.

``trainenv serve`` and ``python -m trainenv.serving`` both call ``main(flags)``; an embedding
program may call ``run_server(env, log)`` with a ``ServingEnv`` of its own. The order of events:

1. Resolve the settings (``trainenv.settings.serving``: flag → variables → default). A bad value
   is one ``ERROR`` line naming the flag or variable, and exit 78.
2. Bind and listen on ``env.host:env.port`` (``port 0`` picks a free one); log
   ``listening on http://HOST:PORT`` with the effective settings.
3. Import the handler module and check its hooks (``trainenv.serving.handler``).
4. Run the chosen server (``trainenv.serving.servers``) with ``new_app(log)``, which builds the
   one WSGI app (``trainenv.serving.app``) every server serves: **stdlib** builds it once and
   loads the model in the background (``/ping`` 503 until loaded); with ``workers`` > 1,
   **prefork** forks that many stdlib workers on the one socket, each building the app and
   loading its own model (``/ping`` 200 once all have loaded); **gunicorn** builds it in each
   worker, which loads its own model before it accepts a connection.
5. SIGTERM or SIGINT: ``/ping`` turns 503, the listening socket closes, requests in flight get up
   to ``env.grace_s`` to finish; a second signal cuts the wait short.

Exit codes:

| code | when |
|---|---|
| 0 | stopped by SIGTERM/SIGINT (after draining) |
| 78 | bad configuration or handler: a bad setting, port in use or not allowed, bad host, gunicorn missing, handler not found or fails to import, bad hooks, ``model_fn``/warm-up raised, no way to predict |
| 124 | the model was not ready within ``startup_timeout_s`` |
| 70 | an internal error of trainenv (a bug); the traceback is logged |

Every failure is logged as one ``ERROR`` line saying what to fix, followed by the traceback of
the user's code when there is one.
"""

from __future__ import annotations

import errno
import os
import socket

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping

    from trainenv.serving.app import ServingApp

from trainenv.errors import EXIT_INTERNAL, ConfigError, TrainenvError
from trainenv.redact import secret_values
from trainenv.serving.config import ServingEnv
from trainenv.serving.logsink import ServingLog, stderr_sink


def main(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Resolve the settings from ``flags`` and ``environ`` (default ``os.environ``) and serve; the exit code."""
    environ = os.environ if environ is None else environ
    try:
        env = resolve_env(flags or {}, environ)
    except ConfigError as exc:
        stderr_sink(f"ERROR {exc}")
        return exc.exit_code
    return run_server(env)


def resolve_env(flags: Mapping[str, Any], environ: Mapping[str, str]) -> ServingEnv:
    """The ``ServingEnv`` for these flags and variables, with this machine's CPUs and GPUs."""
    from trainenv.environment import probe_hardware
    from trainenv.layout import Layout
    from trainenv.serving.config import resolve_serving_env

    cpus, _, gpus = probe_hardware(environ)
    return resolve_serving_env(environ, Layout.resolve(environ), cpus, len(gpus), flags)


def run_server(env: ServingEnv, log: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the process exit code (see the module docstring)."""
    slog = ServingLog(log, env.log_level, secret_values(dict(os.environ)))
    sock: socket.socket | None = None
    try:
        serve = _pick_server(env)
        sock = bind_socket(env)
        slog.info(f"listening on {_url(sock)} ({_settings_line(env)})")
        new_app = app_factory(env, slog)
        return serve(env, sock, new_app, slog)
    except TrainenvError as exc:
        slog.error(str(exc), getattr(exc, "detail", ""))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence: log, exit 70
        import traceback

        slog.error(f"internal error: {type(exc).__name__}: {exc}", traceback.format_exc())
        return EXIT_INTERNAL
    finally:
        if sock is not None:
            sock.close()


def _pick_server(env: ServingEnv) -> Callable[[ServingEnv, socket.socket, Callable[[ServingLog], ServingApp], ServingLog], int]:
    """The ``run`` function of ``env.server``; ``ConfigError`` when gunicorn is not installed."""
    if env.server == "gunicorn":
        import importlib.util

        if importlib.util.find_spec("gunicorn") is None:
            raise ConfigError.at(
                env.sources.get("server", "TRAINENV_SERVER"),
                None,
                "'gunicorn' needs gunicorn installed: pip install 'trainenv[serve]'",
            )
        from trainenv.serving.servers import gunicorn

        return gunicorn.run
    if env.workers > 1:
        from trainenv.serving.servers import prefork

        return prefork.run
    from trainenv.serving.servers import stdlib

    return stdlib.run


def app_factory(env: ServingEnv, slog: ServingLog) -> Callable[[ServingLog], ServingApp]:
    """Import the handler (``HandlerError`` on failure) and return ``new_app(log)``: a fresh
    ``ServingApp`` over it, its model not loaded yet (the server calls ``app.load()``)."""
    from trainenv.serving.app import ServingApp
    from trainenv.serving.handler import Handler, Hooks, import_handler

    module, origin = import_handler(env)
    hooks = Hooks(module)
    slog.info(f"handler {origin} ({hooks.summary()})")
    if env.max_batch_size > 1:
        from trainenv.serving import batching

        batching.check(env, hooks)
    return lambda log: ServingApp(env, Handler(hooks, env), log)


def bind_socket(env: ServingEnv) -> socket.socket:
    """A listening TCP socket on ``env.host:env.port``; ``ConfigError`` naming the setting if not possible."""
    port_var = env.port_source if env.port_source != "default" else "TRAINENV_SERVING_PORT"
    host_var = env.sources.get("host", "default")
    host_var = host_var if host_var != "default" else "TRAINENV_SERVING_HOST"
    try:
        infos = socket.getaddrinfo(env.host, env.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError.at(host_var, None, f"cannot resolve {env.host!r}: {exc.strerror}") from None
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
            raise ConfigError.at(host_var, None, f"{env.host!r} is not an address of this machine") from None
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


def _settings_line(env: ServingEnv) -> str:
    processes = (
        f"{env.workers} workers x {env.threads} threads"
        if env.workers > 1 or env.server == "gunicorn"
        else f"{env.threads} handler threads"
    )
    return (
        f"server {env.server}, {processes}, timeout {env.timeout_s:g} s, max body {env.max_request_bytes} bytes, "
        f"queue {env.max_queue}, grace {env.grace_s:g} s, model dir {env.model_dir}"
    )
