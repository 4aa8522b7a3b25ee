"""Serving settings: one table, resolved ``trainenv serve`` flag → variables (first set wins) → default.

Each row of ``SERVING`` is one setting: its name (the ``ServingEnv`` field), its ``serve`` flag
(empty when it has none), its variable, the platform variables read after it (SageMaker, Vertex
AI, Heroku-style ``PORT``), how to parse a value, its default and its help. The ``serve``
options, the variable lookups, ``--help``, ``trainenv env --serving`` and the settings table
in docs/serving.md come from it. An empty variable counts as unset.

``resolve_serving_settings(flags, environ)`` returns ``(values, sources)``: each value parsed,
and where it came from (``option --port``, the variable's name, or ``default``). A bad value is
a ``ConfigError`` naming the flag or variable and the value, e.g.
``TRAINENV_SERVING_PORT: 'http' is not a port number (expected an integer 0-65535)``.
Rows whose default depends on the machine (``workers``, ``model_dir``) have ``None`` here;
``trainenv.serving.config`` fills them in.
"""

from __future__ import annotations

import re
from pathlib import Path

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping

from trainenv.errors import ConfigError, shown
from trainenv.settings.rows import Setting

MIB = 1024 * 1024
SERVERS = ("stdlib", "gunicorn")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LEVEL_ALIASES = {
    "10": "DEBUG", "20": "INFO", "30": "WARNING", "40": "ERROR", "50": "ERROR", "WARN": "WARNING", "CRITICAL": "ERROR",
}
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+\-]+/[A-Za-z0-9!#$&^_.+\-]+\Z")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\Z")
_ROUTE = re.compile(r"/[!-~]*\Z")


# -- parsers: a raw string in, the value out, or ValueError("is not ...") -------------------------


def _integer(minimum: int, maximum: int | None, what: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number: int | None = int(str(value), 10)
        except ValueError:
            number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            limit = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"is not {what} (expected an integer {limit})")
        return number

    return parse


def _seconds(allow_zero: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(str(value))
        except ValueError:
            number = float("nan")
        if not (number == number and number != float("inf") and (number > 0 or (allow_zero and number == 0))):
            raise ValueError(f"is not a number of seconds (expected a number {'>= 0' if allow_zero else '> 0'})")
        return number

    return parse


def _mib(value: Any) -> int:
    """``SAGEMAKER_MAX_PAYLOAD_IN_MB``: MiB, as SageMaker counts them, to bytes."""
    try:
        number = float(str(value))
    except ValueError:
        number = float("nan")
    if not (number == number and number != float("inf") and number > 0):
        raise ValueError("is not a size in MiB (expected a number > 0)")
    return max(1, int(number * MIB))


def _host(value: Any) -> str:
    text = str(value)
    if any(c.isspace() for c in text) or "/" in text:
        raise ValueError("is not a host name or IP address")
    return text


def _server(value: Any) -> str:
    text = str(value).lower()
    if text not in SERVERS:
        raise ValueError(f"is not one of {', '.join(SERVERS)}")
    return text


def _path(value: Any) -> Path:
    return Path(str(value))


def _storage_uri(value: Any) -> Path | None:
    """``AIP_STORAGE_URI``: a local path or ``file://`` URL; ``None`` (skipped) for ``gs://``."""
    text = str(value)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    return Path(text) if text.startswith("/") else None


def _handler(value: Any) -> str:
    text = str(value)
    if "\n" in text or "\x00" in text:
        raise ValueError("is not a module name or a .py file")
    if text.endswith(".py") or "/" in text:
        if not text.endswith(".py"):
            raise ValueError("is not a .py file (a file handler must end in .py)")
        return text
    if not _MODULE_NAME.match(text):
        raise ValueError("is neither a dotted module name nor a .py file")
    return text


def _milliseconds(value: Any) -> float:
    try:
        number = float(str(value))
    except ValueError:
        number = float("nan")
    if not 0 <= number <= 10_000:  # also refuses nan
        raise ValueError("is not a delay in milliseconds (expected a number 0-10000)")
    return number


def _media_type(value: Any) -> str:
    text = str(value).split(";", 1)[0].strip().lower()
    if not _MEDIA_TYPE.match(text) or "*" in text:
        raise ValueError("is not a concrete media type such as application/json")
    return text


def _model_name(value: Any) -> str:
    if not _MODEL_NAME.match(str(value)):
        raise ValueError("is not a model name ([A-Za-z0-9_.-], at most 128)")
    return str(value)


def _route(value: Any) -> str:
    if not _ROUTE.match(str(value)):
        raise ValueError("is not a URL path (must start with '/', no spaces)")
    return str(value)


def _log_level(value: Any) -> str:
    level = _LEVEL_ALIASES.get(str(value).upper(), str(value).upper())
    if level not in LOG_LEVELS:
        raise ValueError(f"is not a log level (one of {', '.join(LOG_LEVELS)})")
    return level


def _boolean(value: Any) -> bool:
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("is not a boolean (true/false, 1/0, yes/no, on/off)")


# Platform variables whose values need their own parser (a unit, or a form that may not apply).
VARIABLE_PARSERS: dict[str, Callable[[Any], Any]] = {
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": _mib,
    "AIP_STORAGE_URI": _storage_uri,
}


SERVING: tuple[Setting, ...] = (
    Setting("host", "", "TRAINENV_SERVING_HOST", _host, "0.0.0.0",
            "Address to listen on (0.0.0.0: every interface, as the platforms require).", "HOST"),
    Setting("port", "--port", "TRAINENV_SERVING_PORT", _integer(0, 65535, "a port number"), 8080,
            "Port to listen on; 0 picks a free one.", "PORT",
            fallbacks=("SAGEMAKER_BIND_TO_PORT", "AIP_HTTP_PORT", "LISTENING_PORT", "PORT")),
    Setting("server", "--server", "TRAINENV_SERVER", _server, "stdlib",
            "stdlib: trainenv's own HTTP/1.1 server (one process, or --workers pre-forked ones); gunicorn: "
            "the same app on gunicorn worker processes (pip install 'trainenv[serve]').", "SERVER", SERVERS),
    Setting("workers", "--workers", "TRAINENV_SERVING_WORKERS", _integer(1, 1024, "a worker count"), None,
            "Worker processes on the one port, each loading its own model. Default: 1; with gunicorn, "
            "GPUs on this machine, else min(CPUs, 4).", "N",
            fallbacks=("SAGEMAKER_MODEL_SERVER_WORKERS",)),
    Setting("threads", "", "TRAINENV_SERVING_THREADS", _integer(1, 1024, "a thread count"), 4,
            "Handler calls running at once, per process.", "N"),
    Setting("timeout_s", "", "TRAINENV_SERVING_TIMEOUT", _seconds(), 60.0,
            "Seconds a request may take, then 504.", "SECONDS",
            fallbacks=("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", "SAGEMAKER_MODEL_SERVER_TIMEOUT")),
    Setting("startup_timeout_s", "", "TRAINENV_SERVING_STARTUP_TIMEOUT", _seconds(), None,
            "Seconds to load the model before giving up (exit 124). Default: no limit.", "SECONDS",
            fallbacks=("SAGEMAKER_STARTUP_TIMEOUT",)),
    Setting("grace_s", "", "TRAINENV_SERVING_GRACE_SECONDS", _seconds(allow_zero=True), 25.0,
            "After SIGTERM, seconds requests in flight get to finish.", "SECONDS",
            fallbacks=("TRAINENV_GRACE_SECONDS",)),
    Setting("max_request_bytes", "", "TRAINENV_SERVING_MAX_REQUEST_BYTES", _integer(1, None, "a size in bytes"), 6 * MIB,
            "Largest request body in bytes, then 413 (SAGEMAKER_MAX_PAYLOAD_IN_MB counts MiB).", "BYTES",
            fallbacks=("SAGEMAKER_MAX_PAYLOAD_IN_MB",)),
    Setting("max_queue", "", "TRAINENV_SERVING_MAX_QUEUE", _integer(0, None, "a queue length"), 64,
            "Requests waiting for a handler thread, then 503.", "N"),
    Setting("max_batch_size", "", "TRAINENV_SERVING_MAX_BATCH_SIZE", _integer(1, 1024, "a batch size"), 1,
            "Most /invocations requests gathered into one predict_batch_fn call; 1: no batching.", "N"),
    Setting("max_batch_delay_ms", "", "TRAINENV_SERVING_MAX_BATCH_DELAY_MS", _milliseconds, 5.0,
            "Milliseconds a batch waits for more requests before it runs (it runs at once when full).", "MS"),
    Setting("max_connections", "", "TRAINENV_SERVING_MAX_CONNECTIONS", _integer(1, None, "a connection count"), 512,
            "Open connections, then 503.", "N"),
    Setting("backlog", "", "TRAINENV_SERVING_BACKLOG", _integer(128, None, "a listen backlog"), 1024,
            "Listen backlog.", "N"),
    Setting("keepalive_s", "", "TRAINENV_SERVING_KEEPALIVE", _seconds(), 65.0,
            "Seconds an idle keep-alive connection stays open.", "SECONDS"),
    Setting("read_timeout_s", "", "TRAINENV_SERVING_READ_TIMEOUT", _seconds(), 30.0,
            "Seconds a client may stay silent in the middle of a request before it is dropped.", "SECONDS"),
    Setting("default_accept", "", "TRAINENV_SERVING_DEFAULT_ACCEPT", _media_type, "application/json",
            "Response type when the request has no Accept (or */*).", "TYPE",
            fallbacks=("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT",)),
    Setting("model_dir", "--model-dir", "TRAINENV_MODEL_DIR", _path, None,
            "The model dir given to model_fn. Default: <base>/model, else <base>/output/model when "
            "only that exists (the image that trained also serves).", "DIR",
            fallbacks=("AIP_STORAGE_URI", "SM_MODEL_DIR")),
    Setting("handler", "", "TRAINENV_SERVING_MODULE", _handler, None,
            "The handler: a .py file or a dotted module name. Default: inference.py in <model dir>/code, "
            "then in the code dir.", "MODULE",
            fallbacks=("SAGEMAKER_PROGRAM",)),
    Setting("model_name", "", "TRAINENV_SERVING_MODEL_NAME", _model_name, "model",
            "The model name in the KServe v2 routes (/v2/models/NAME/infer).", "NAME"),
    Setting("vertex_health_route", "", "AIP_HEALTH_ROUTE", _route, None,
            "Vertex AI health route (GET).", "PATH"),
    Setting("vertex_predict_route", "", "AIP_PREDICT_ROUTE", _route, None,
            "Vertex AI predict route (POST {\"instances\": [...]}).", "PATH"),
    Setting("log_level", "", "TRAINENV_SERVING_LOG_LEVEL", _log_level, "INFO",
            "DEBUG, INFO, WARNING or ERROR (or 10-50); health checks are logged at DEBUG.", "LEVEL",
            fallbacks=("SAGEMAKER_CONTAINER_LOG_LEVEL",)),
    Setting("access_log", "", "TRAINENV_SERVING_ACCESS_LOG", _boolean, True,
            "One log line per request.", "BOOL"),
)

SERVING_BY_NAME = {s.name: s for s in SERVING}


def resolve_serving_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(values, sources)``: each row from its flag, else its variables in order, else its default."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SERVING:
        values[setting.name], sources[setting.name] = setting.default, "default"
        given = flags.get(setting.name)
        if given is not None and str(given).strip() != "":
            values[setting.name] = _parse(setting.parse, given, f"option {setting.flag}")
            sources[setting.name] = f"option {setting.flag}"
            continue
        for variable in (setting.variable, *setting.fallbacks):
            raw = environ.get(variable, "").strip()
            if raw == "":
                continue
            value = _parse(VARIABLE_PARSERS.get(variable, setting.parse), raw, variable)
            if value is not None:
                values[setting.name], sources[setting.name] = value, variable
                break
    return values, sources


def _parse(parse: Callable[[Any], Any], raw: Any, where: str) -> Any:
    try:
        return parse(str(raw).strip())
    except ValueError as exc:
        raise ConfigError.at(where, None, f"{shown(str(raw).strip())} {exc}") from None


def serving_variables(values: Mapping[str, Any]) -> dict[str, str]:
    """The settings as the variables that set them (``TRAINENV_SERVING_PORT`` → ``"8080"``), one per
    row: setting these reproduces ``values``. ``None`` is empty (unset)."""
    from trainenv.values import env_value

    out = {}
    for setting in SERVING:
        value = values[setting.name]
        out[setting.variable] = env_value(str(value) if isinstance(value, Path) else value)
    return out
