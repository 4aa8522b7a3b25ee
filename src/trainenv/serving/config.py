"""The serving settings: one frozen ``ServingEnv``, resolved from the environment by a pure function.

``resolve_serving_env(environ, layout, num_cpus, num_gpus)`` reads only its arguments: no file,
no process, no global. ``trainenv.serving_env()`` calls it with the discovered CPUs and GPUs.
A bad value raises ``ConfigError`` with one line naming the variable and the value, e.g.
``TRAINENV_SERVING_PORT: 'http' is not a port number (expected an integer 0-65535)``.
An empty variable counts as unset.

Each field, its variables (first set wins) and its default:

| field | variables | default |
|---|---|---|
| ``host`` | ``TRAINENV_SERVING_HOST`` | ``0.0.0.0`` (every platform requires it) |
| ``port`` | ``TRAINENV_SERVING_PORT``, ``SAGEMAKER_BIND_TO_PORT``, ``AIP_HTTP_PORT``, ``LISTENING_PORT``, ``PORT`` | ``8080``; ``0`` picks a free port (tests) |
| ``workers`` | ``TRAINENV_SERVING_WORKERS``, ``SAGEMAKER_MODEL_SERVER_WORKERS`` | GPUs if any, else ``min(CPUs, 4)``; gunicorn processes (the stdlib server is one process) |
| ``threads`` | ``TRAINENV_SERVING_THREADS`` | ``4``: handler calls running at once, per process |
| ``timeout_s`` | ``TRAINENV_SERVING_TIMEOUT``, ``SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS``, ``SAGEMAKER_MODEL_SERVER_TIMEOUT`` | ``60``; seconds per request, then 504 |
| ``startup_timeout_s`` | ``TRAINENV_SERVING_STARTUP_TIMEOUT``, ``SAGEMAKER_STARTUP_TIMEOUT`` | none: loading the model may take as long as it takes |
| ``grace_s`` | ``TRAINENV_SERVING_GRACE_SECONDS``, ``TRAINENV_GRACE_SECONDS`` | ``25`` (under SageMaker's 30 s SIGKILL) |
| ``max_request_bytes`` | ``TRAINENV_SERVING_MAX_REQUEST_BYTES``, ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` (MiB) | 6 MiB |
| ``max_queue`` | ``TRAINENV_SERVING_MAX_QUEUE`` | ``64`` requests waiting for a handler thread, then 503 |
| ``max_connections`` | ``TRAINENV_SERVING_MAX_CONNECTIONS`` | ``512`` open connections (stdlib server), then 503 |
| ``backlog`` | ``TRAINENV_SERVING_BACKLOG`` | ``1024`` (at least 128) |
| ``keepalive_s`` | ``TRAINENV_SERVING_KEEPALIVE`` | ``65``: idle keep-alive connections close after this |
| ``read_timeout_s`` | ``TRAINENV_SERVING_READ_TIMEOUT`` | ``30``: a client silent this long mid-request is dropped |
| ``default_accept`` | ``TRAINENV_SERVING_DEFAULT_ACCEPT``, ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` | ``application/json`` |
| ``model_dir`` | ``TRAINENV_MODEL_DIR``, ``AIP_STORAGE_URI`` (only a local path or ``file://``), ``SM_MODEL_DIR`` | ``<base>/model`` |
| ``handler`` | ``TRAINENV_SERVING_MODULE``, ``SAGEMAKER_PROGRAM`` | ``inference.py`` in ``<model_dir>/code``, then the code dir |
| ``server`` | ``TRAINENV_SERVER`` (``stdlib`` or ``gunicorn``) | ``stdlib`` |
| ``model_name`` | ``TRAINENV_SERVING_MODEL_NAME`` | ``model`` (the KServe v2 ``{name}``) |
| ``vertex_health_route`` / ``vertex_predict_route`` | ``AIP_HEALTH_ROUTE`` / ``AIP_PREDICT_ROUTE`` | none (routes off) |
| ``log_level`` | ``TRAINENV_SERVING_LOG_LEVEL``, ``SAGEMAKER_CONTAINER_LOG_LEVEL`` (name or number) | ``INFO`` |
| ``access_log`` | ``TRAINENV_SERVING_ACCESS_LOG`` (``true``/``false``) | ``true``; health checks are logged at DEBUG only |

The handler is a file (``inference.py``, ``sub/handler.py``, an absolute path) or a dotted module
name (``my_pkg.serving``). A relative file is looked for in ``<model_dir>/code`` then the code dir
(``handler_files``); both dirs go on ``sys.path`` before the import (``handler_dirs``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional, Tuple

from trainenv.errors import ConfigError, shown
from trainenv.layout import Layout
from trainenv.frozen import SnapshotMapping, frozen

MIB = 1024 * 1024
DEFAULT_PORT = 8080
DEFAULT_HOST = "0.0.0.0"
DEFAULT_THREADS = 4
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 25.0
DEFAULT_MAX_REQUEST_BYTES = 6 * MIB
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_BACKLOG = 1024
MIN_BACKLOG = 128
DEFAULT_KEEPALIVE_S = 65.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_ACCEPT = "application/json"
DEFAULT_HANDLER_FILE = "inference.py"
DEFAULT_MODEL_NAME = "model"
SERVERS = ("stdlib", "gunicorn")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

PORT_VARIABLES = (
    "TRAINENV_SERVING_PORT",
    "SAGEMAKER_BIND_TO_PORT",
    "AIP_HTTP_PORT",
    "LISTENING_PORT",
    "PORT",
)

_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+\-]+/[A-Za-z0-9!#$&^_.+\-]+\Z")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_ROUTE = re.compile(r"/[!-~]*\Z")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NUMERIC_LEVELS = {"10": "DEBUG", "20": "INFO", "30": "WARNING", "40": "ERROR", "50": "ERROR"}


@frozen
class ServingEnv(SnapshotMapping):
    """Everything ``trainenv serve`` needs, resolved once (see the module docstring for sources)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    port_source: str = "default"
    workers: int = 1
    threads: int = DEFAULT_THREADS
    timeout_s: float = DEFAULT_TIMEOUT_S
    startup_timeout_s: Optional[float] = None
    grace_s: float = DEFAULT_GRACE_S
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    backlog: int = DEFAULT_BACKLOG
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    default_accept: str = DEFAULT_ACCEPT
    model_dir: Path = Path("/ml/model")
    code_dir: Path = Path("/ml/usercode")
    handler: Optional[str] = None
    handler_source: str = "default"
    handler_files: Tuple[Path, ...] = ()
    handler_dirs: Tuple[Path, ...] = ()
    server: str = "stdlib"
    model_name: str = DEFAULT_MODEL_NAME
    vertex_health_route: Optional[str] = None
    vertex_predict_route: Optional[str] = None
    log_level: str = "INFO"
    access_log: bool = True

    @property
    def handler_module(self) -> Optional[str]:
        """The dotted module name to import, when the handler is not a file."""
        return None if self.handler is None or _is_file_name(self.handler) else self.handler


def _first(environ: Mapping[str, str], names: Tuple[str, ...]) -> Tuple[Optional[str], Optional[str]]:
    """``(variable, value)`` of the first non-empty variable, else ``(None, None)``."""
    for name in names:
        value = environ.get(name)
        if value is not None and value.strip() != "":
            return name, value.strip()
    return None, None


def _int(name: str, value: str, minimum: int, maximum: Optional[int], what: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        number = None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        limit = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError.at(name, None, f"{shown(value)} is not {what} (expected an integer {limit})")
    return number


def _seconds(name: str, value: str, minimum: float, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    ok = math.isfinite(number) and (number > minimum or (allow_zero and number == minimum))
    if not ok:
        bound = f">= {minimum:g}" if allow_zero else f"> {minimum:g}"
        raise ConfigError.at(
            name, None, f"{shown(value)} is not a number of seconds (expected a number {bound})"
        )
    return number


def _is_file_name(handler: str) -> bool:
    return handler.endswith(".py") or "/" in handler


def _resolve_port(environ: Mapping[str, str]) -> Tuple[int, str]:
    name, value = _first(environ, PORT_VARIABLES)
    if name is None or value is None:
        return DEFAULT_PORT, "default"
    return _int(name, value, 0, 65535, "a port number"), name


def _resolve_model_dir(environ: Mapping[str, str], layout: Layout) -> Path:
    explicit = environ.get("TRAINENV_MODEL_DIR", "").strip()
    if explicit:
        return Path(explicit)
    storage = environ.get("AIP_STORAGE_URI", "").strip()
    if storage.startswith("file://"):
        return Path(storage[len("file://") :])
    if storage.startswith("/"):
        return Path(storage)
    sm_model_dir = environ.get("SM_MODEL_DIR", "").strip()
    if sm_model_dir:
        return Path(sm_model_dir)
    return layout.base_dir / "model"


def _resolve_handler(
    environ: Mapping[str, str], model_dir: Path, code_dir: Path
) -> Tuple[Optional[str], str, Tuple[Path, ...], Tuple[Path, ...]]:
    dirs = (model_dir / "code", code_dir)
    name, value = _first(environ, ("TRAINENV_SERVING_MODULE", "SAGEMAKER_PROGRAM"))
    if name is None or value is None:
        return None, "default", tuple(d / DEFAULT_HANDLER_FILE for d in dirs), dirs
    if "\n" in value or "\x00" in value:
        raise ConfigError.at(name, None, f"{shown(value)} is not a module name or a .py file")
    if _is_file_name(value):
        if not value.endswith(".py"):
            raise ConfigError.at(
                name, None, f"{shown(value)} is not a .py file (a file handler must end in .py)"
            )
        path = Path(value)
        files = (path,) if path.is_absolute() else tuple(d / path for d in dirs)
        return value, name, files, dirs
    if not _MODULE_NAME.match(value):
        raise ConfigError.at(name, None, f"{shown(value)} is neither a dotted module name nor a .py file")
    return value, name, (), dirs


def _resolve_route(environ: Mapping[str, str], name: str) -> Optional[str]:
    value = environ.get(name, "").strip()
    if not value:
        return None
    if not _ROUTE.match(value):
        raise ConfigError.at(name, None, f"{shown(value)} is not a URL path (must start with '/', no spaces)")
    return value


def _resolve_log_level(environ: Mapping[str, str]) -> str:
    name, value = _first(environ, ("TRAINENV_SERVING_LOG_LEVEL", "SAGEMAKER_CONTAINER_LOG_LEVEL"))
    if name is None or value is None:
        return "INFO"
    level = _NUMERIC_LEVELS.get(value, value.upper())
    if level == "WARN":
        level = "WARNING"
    if level == "CRITICAL":
        level = "ERROR"
    if level not in LOG_LEVELS:
        raise ConfigError.at(
            name, None, f"{shown(value)} is not a log level (one of {', '.join(LOG_LEVELS)})"
        )
    return level


def _resolve_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError.at(
        name, None, f"{shown(environ[name])} is not a boolean (true/false, 1/0, yes/no, on/off)"
    )


def resolve_serving_env(
    environ: Mapping[str, str], layout: Layout, num_cpus: int, num_gpus: int
) -> ServingEnv:
    """The serving settings from ``environ`` (see the module docstring); pure, raises ConfigError."""
    host = environ.get("TRAINENV_SERVING_HOST", "").strip() or DEFAULT_HOST
    if any(c.isspace() for c in host) or "/" in host:
        raise ConfigError.at("TRAINENV_SERVING_HOST", None, f"{shown(host)} is not a host name or IP address")
    port, port_source = _resolve_port(environ)

    name, value = _first(environ, ("TRAINENV_SERVING_WORKERS", "SAGEMAKER_MODEL_SERVER_WORKERS"))
    if name is not None and value is not None:
        workers = _int(name, value, 1, 1024, "a worker count")
    else:
        workers = num_gpus if num_gpus > 0 else max(1, min(num_cpus, 4))

    name, value = _first(environ, ("TRAINENV_SERVING_THREADS",))
    threads = _int(name, value, 1, 1024, "a thread count") if name and value else DEFAULT_THREADS

    name, value = _first(
        environ,
        (
            "TRAINENV_SERVING_TIMEOUT",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT",
        ),
    )
    timeout_s = _seconds(name, value, 0.0) if name and value else DEFAULT_TIMEOUT_S

    name, value = _first(environ, ("TRAINENV_SERVING_STARTUP_TIMEOUT", "SAGEMAKER_STARTUP_TIMEOUT"))
    startup_timeout_s = _seconds(name, value, 0.0) if name and value else None

    name, value = _first(environ, ("TRAINENV_SERVING_GRACE_SECONDS", "TRAINENV_GRACE_SECONDS"))
    grace_s = _seconds(name, value, 0.0, allow_zero=True) if name and value else DEFAULT_GRACE_S

    name, value = _first(environ, ("TRAINENV_SERVING_MAX_REQUEST_BYTES",))
    if name and value:
        max_request_bytes = _int(name, value, 1, None, "a size in bytes")
    else:
        name, value = _first(environ, ("SAGEMAKER_MAX_PAYLOAD_IN_MB",))
        if name and value:
            try:
                mib = float(value)
            except ValueError:
                mib = math.nan
            if not (math.isfinite(mib) and mib > 0):
                raise ConfigError.at(
                    name, None, f"{shown(value)} is not a size in MiB (expected a number > 0)"
                )
            max_request_bytes = max(1, int(mib * MIB))
        else:
            max_request_bytes = DEFAULT_MAX_REQUEST_BYTES

    def optional_int(var: str, default: int, minimum: int, what: str) -> int:
        raw = environ.get(var, "").strip()
        return _int(var, raw, minimum, None, what) if raw else default

    max_queue = optional_int("TRAINENV_SERVING_MAX_QUEUE", DEFAULT_MAX_QUEUE, 0, "a queue length")
    max_connections = optional_int(
        "TRAINENV_SERVING_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1, "a connection count"
    )
    backlog = optional_int("TRAINENV_SERVING_BACKLOG", DEFAULT_BACKLOG, MIN_BACKLOG, "a listen backlog")

    def optional_seconds(var: str, default: float) -> float:
        raw = environ.get(var, "").strip()
        return _seconds(var, raw, 0.0) if raw else default

    keepalive_s = optional_seconds("TRAINENV_SERVING_KEEPALIVE", DEFAULT_KEEPALIVE_S)
    read_timeout_s = optional_seconds("TRAINENV_SERVING_READ_TIMEOUT", DEFAULT_READ_TIMEOUT_S)

    name, value = _first(environ, ("TRAINENV_SERVING_DEFAULT_ACCEPT", "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT"))
    if name and value:
        default_accept = value.split(";", 1)[0].strip().lower()
        if not _MEDIA_TYPE.match(default_accept) or "*" in default_accept:
            raise ConfigError.at(
                name, None, f"{shown(value)} is not a concrete media type such as application/json"
            )
    else:
        default_accept = DEFAULT_ACCEPT

    model_dir = _resolve_model_dir(environ, layout)
    handler, handler_source, handler_files, handler_dirs = _resolve_handler(
        environ, model_dir, layout.code_dir
    )

    server = environ.get("TRAINENV_SERVER", "").strip().lower() or "stdlib"
    if server not in SERVERS:
        raise ConfigError.at(
            "TRAINENV_SERVER", None, f"{shown(environ['TRAINENV_SERVER'])} is not one of {', '.join(SERVERS)}"
        )

    model_name = environ.get("TRAINENV_SERVING_MODEL_NAME", "").strip() or DEFAULT_MODEL_NAME
    if not _MODEL_NAME.match(model_name) or len(model_name) > 128:
        raise ConfigError.at(
            "TRAINENV_SERVING_MODEL_NAME", None, f"{shown(model_name)} is not a model name ([A-Za-z0-9_.-])"
        )

    return ServingEnv(
        host=host,
        port=port,
        port_source=port_source,
        workers=workers,
        threads=threads,
        timeout_s=timeout_s,
        startup_timeout_s=startup_timeout_s,
        grace_s=grace_s,
        max_request_bytes=max_request_bytes,
        max_queue=max_queue,
        max_connections=max_connections,
        backlog=backlog,
        keepalive_s=keepalive_s,
        read_timeout_s=read_timeout_s,
        default_accept=default_accept,
        model_dir=model_dir,
        code_dir=layout.code_dir,
        handler=handler,
        handler_source=handler_source,
        handler_files=handler_files,
        handler_dirs=handler_dirs,
        server=server,
        model_name=model_name,
        vertex_health_route=_resolve_route(environ, "AIP_HEALTH_ROUTE"),
        vertex_predict_route=_resolve_route(environ, "AIP_PREDICT_ROUTE"),
        log_level=_resolve_log_level(environ),
        access_log=_resolve_bool(environ, "TRAINENV_SERVING_ACCESS_LOG", True),
    )
