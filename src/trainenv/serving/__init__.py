"""trainenv serving: one WSGI app for SageMaker, KServe v2 and Vertex AI, on a hardened stdlib
HTTP/1.1 server (default) or gunicorn.

A handler module (``inference.py``) written for SageMaker runs unchanged::

    def model_fn(model_dir):                  # once per process, before /ping says 200
        return load(model_dir)

    def predict_fn(data, model):              # data: the decoded body (JSON -> Python objects)
        if not data:
            raise BadRequest("empty input")   # -> 400 {"error": "bad_request", "message": ...}
        return model.predict(data)

Serve it with ``trainenv serve`` or ``python -m trainenv.serving``; both run
``trainenv.serving.startup.main``. ``run_server(env, log) -> exit code`` (also importable from
here) serves a ``ServingEnv`` of your own. Where to read more:

| module | what |
|---|---|
| ``trainenv.settings.serving`` | every setting: its variables, default and help |
| ``config`` | ``ServingEnv``, ``resolve_serving_env`` |
| ``startup`` | start-up order, exit codes |
| ``handler`` | finding and importing the handler, the hooks and their defaults |
| ``app`` | routes, status codes, readiness, error bodies |
| ``request`` | reading the body within its limit, its media type |
| ``codecs`` / ``media`` | content types, ``Accept`` negotiation |
| ``protocols`` | Vertex AI and KServe v2 request/response shapes |
| ``pool`` | handler threads, queue, 503 when saturated, 504 on timeout |
| ``servers`` | the stdlib server (default) and gunicorn: SIGTERM drain |

Importing this package is cheap: it loads the error and response classes only.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

from trainenv.serving.api import (
    BadRequest,
    HTTPError,
    NotFound,
    RequestContext,
    Response,
    ServiceUnavailable,
    TooManyRequests,
    UnprocessableEntity,
)

__all__ = [
    "HTTPError",
    "BadRequest",
    "NotFound",
    "UnprocessableEntity",
    "TooManyRequests",
    "ServiceUnavailable",
    "Response",
    "RequestContext",
    "ServingEnv",
    "resolve_serving_env",
    "run_server",
]

_LAZY = {
    "ServingEnv": "trainenv.serving.config",
    "resolve_serving_env": "trainenv.serving.config",
    "run_server": "trainenv.serving.startup",
}

if TYPE_CHECKING:  # pragma: no cover
    from trainenv.serving.config import ServingEnv, resolve_serving_env
    from trainenv.serving.startup import run_server


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trainenv.serving' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
