"""The user's handler module: finding it, importing it, checking its hooks, and running them.

Hooks are SageMaker's, so existing ``inference.py`` files run unchanged, plus a few of our own.
Every hook is optional; an absent hook gets the default in the last column.

| hook | called | default |
|---|---|---|
| ``pre_model_fn(model_dir)`` | once, before ``model_fn`` | nothing |
| ``model_fn(model_dir)`` | once per process, at start-up | the model is ``None`` |
| ``model_warmup_fn(model_dir, model)`` | once, after ``model_fn``; ``/ping`` is 503 until it returns | nothing |
| ``input_fn(body, content_type)`` | per request | ``trainenv.serving.codecs.decode`` |
| ``predict_fn(data, model)`` | per request | ``model(data)`` if callable, else ``model.predict(data)`` |
| ``predict_batch_fn(inputs, model)`` | per batch of ``/invocations`` requests (``trainenv.serving.batching``); a batch of one where it is the only predict hook | |
| ``output_fn(prediction, accept)`` | per request | ``codecs.encode`` in the best type the client accepts |
| ``transform_fn(model, body, content_type, accept)`` | per request, instead of the three above | |
| ``ready_fn(model) -> bool`` | per ``/ping`` and readiness probe (deep health check) | always ready once loaded |
| ``execution_parameters_fn()`` | ``GET /execution-parameters`` (SageMaker Batch) | route answers 404 |

``body`` reaches ``input_fn``/``transform_fn`` as ``str`` for text types (JSON, JSON Lines, CSV,
``text/*``; decoded with the declared charset, 400 if it does not decode) and as ``bytes``
otherwise; ``content_type`` and ``accept`` are bare media types (``application/json``, no
parameters). ``transform_fn`` together with any of ``input_fn``/``predict_fn``/``output_fn`` is
refused at start-up. A per-request hook that takes one more positional parameter (or one named
``context``) also gets a ``RequestContext``. ``output_fn``/``transform_fn`` return ``bytes``,
``str``, ``(body, content_type)`` or a ``Response``.

Where the module comes from: ``ServingEnv.handler`` (``TRAINENV_SERVING_MODULE`` /
``SAGEMAKER_PROGRAM``), else ``inference.py`` in ``<model_dir>/code``, then the code dir. The
file's dir and ``handler_dirs`` go first on ``sys.path`` before the import, so the handler's
sibling modules import. Any failure to import, a hook that is not a function or has the wrong
arity, or no way to predict raises ``HandlerError`` (exit 78) with a one-line message.

``predict_batch_fn`` gets a list of decoded inputs (and, if it asks, a list of contexts) and
returns a list of the same length: an item that is an exception fails that request alone (an
``HTTPError`` item answers its status, anything else 500); a raise, or anything but a sequence
of that length, fails every request of the batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from types import ModuleType

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Sequence

from trainenv.errors import ConfigError
from trainenv.serving import codecs, media
from trainenv.serving.api import HTTPError, RequestContext, Response
from trainenv.serving.config import ServingEnv

# A hook's answer: (status, content type, extra headers, body).
Answer = tuple[int, str, tuple[tuple[str, str], ...], bytes]

# hook name -> its SageMaker positional parameters (a context may follow)
HOOK_PARAMS: dict[str, tuple[str, ...]] = {
    "pre_model_fn": ("model_dir",),
    "model_fn": ("model_dir",),
    "model_warmup_fn": ("model_dir", "model"),
    "input_fn": ("body", "content_type"),
    "predict_fn": ("data", "model"),
    "predict_batch_fn": ("inputs", "model"),
    "output_fn": ("prediction", "accept"),
    "transform_fn": ("model", "body", "content_type", "accept"),
    "ready_fn": ("model",),
    "execution_parameters_fn": (),
}
CONTEXT_HOOKS = ("input_fn", "predict_fn", "predict_batch_fn", "output_fn", "transform_fn")


class HandlerError(ConfigError):
    """The handler module cannot be used: not found, fails to import, bad hooks, model_fn raised."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class HookError(Exception):
    """A user hook raised something other than ``HTTPError`` while serving a request."""

    def __init__(self, hook: str, error: BaseException) -> None:
        text = str(error)
        super().__init__(f"{hook} raised {type(error).__name__}" + (f": {text}" if text else ""))
        self.hook = hook
        self.error = error


def _prepend_path(paths: Sequence[Path]) -> None:
    for path in reversed(list(paths)):
        text = str(path)
        if path.is_dir() and text not in sys.path:
            sys.path.insert(0, text)


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return " ".join(text.split())


def find_handler_file(env: ServingEnv) -> Path | None:
    for candidate in env.handler_files:
        if candidate.is_file():
            return candidate
    return None


def import_handler(env: ServingEnv) -> tuple[ModuleType, str]:
    """Import the handler module; ``(module, where it came from)``; ``HandlerError`` on failure."""
    if env.handler_module is not None:
        _prepend_path(env.handler_dirs)
        name = env.handler_module
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                dirs = ", ".join(str(d) for d in env.handler_dirs)
                raise HandlerError(
                    f"{env.handler_source}: handler module {name!r} not found on sys.path (looked in {dirs} first)"
                ) from None
            raise HandlerError(
                f"cannot import handler module {name!r}: {_describe(exc)}", _traceback()
            ) from None
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise HandlerError(
                f"cannot import handler module {name!r}: {_describe(exc)}", _traceback()
            ) from None
        return module, f"module {name} ({getattr(module, '__file__', '?')})"

    path = find_handler_file(env)
    if path is None:
        looked = ", ".join(str(p) for p in env.handler_files)
        hint = (
            "set TRAINENV_SERVING_MODULE"
            if env.handler_source == "default"
            else f"check {env.handler_source}"
        )
        raise HandlerError(f"no handler module: none of {looked} exists; {hint}")
    _prepend_path([path.parent, *env.handler_dirs])
    name = path.stem if path.stem.isidentifier() else "trainenv_handler"
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, "__file__", None) != str(path):
        name = f"trainenv_handler_{name}"
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise HandlerError(f"cannot import handler {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise HandlerError(f"cannot import handler {path}: {_describe(exc)}", _traceback()) from None
    return module, str(path)


def _traceback() -> str:
    import traceback

    return traceback.format_exc()


_CO_VARARGS = 0x04


def _positional(fn: Callable[..., Any]) -> tuple[int, int, bool, bool]:
    """(required positional, allowed positional, has *args, has a 'context' parameter).

    Plain functions and methods are read from their code object (``inspect`` costs ~10 ms of
    start-up to import); anything else (wrapped functions, partials, callable objects) goes
    through ``inspect.signature``.
    """
    target, bound = fn, 0
    if isinstance(fn, types.MethodType):
        target, bound = fn.__func__, 1
    code = getattr(target, "__code__", None)
    if isinstance(target, types.FunctionType) and code is not None and not hasattr(target, "__wrapped__"):
        count = code.co_argcount
        kwonly = code.co_varnames[count : count + code.co_kwonlyargcount]
        kwdefaults = target.__kwdefaults__ or {}
        required = count - len(target.__defaults__ or ()) - bound
        required += 99 * sum(1 for n in kwonly if n not in kwdefaults and n != "context")
        names = code.co_varnames[: count + code.co_kwonlyargcount]
        return required, count - bound, bool(code.co_flags & _CO_VARARGS), "context" in names
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return 0, 99, True, False
    required = allowed = 0
    var = named_context = False
    for param in signature.parameters.values():
        if param.name == "context":
            named_context = True
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            allowed += 1
            if param.default is param.empty:
                required += 1
        elif param.kind == param.VAR_POSITIONAL:
            var = True
        elif param.kind == param.KEYWORD_ONLY and param.default is param.empty and param.name != "context":
            required += 99
    return required, allowed, var, named_context


class Hooks:
    """The hooks found in a module, checked, with which per-request hooks want a context."""

    def __init__(self, module: ModuleType) -> None:
        self.user: dict[str, Callable[..., Any]] = {}
        self.wants_context: dict[str, bool] = {}
        origin = getattr(module, "__file__", None) or module.__name__
        for name, params in HOOK_PARAMS.items():
            fn = getattr(module, name, None)
            if fn is None:
                continue
            if not callable(fn):
                raise HandlerError(f"{origin}: {name} is not a function (it is a {type(fn).__name__} value)")
            required, allowed, var, named_context = _positional(fn)
            expected = f"{name}({', '.join(params)})"
            with_context = name in CONTEXT_HOOKS and (named_context or (allowed > len(params) and not var))
            limit = len(params) + (1 if with_context else 0)
            if required > limit or (allowed < len(params) and not var):
                raise HandlerError(f"{origin}: {name} has the wrong parameters; expected {expected}")
            self.user[name] = fn
            self.wants_context[name] = with_context
        mixed = [n for n in ("input_fn", "predict_fn", "predict_batch_fn", "output_fn") if n in self.user]
        if "transform_fn" in self.user and mixed:
            raise HandlerError(
                f"{origin}: transform_fn cannot be combined with {', '.join(mixed)}; define one or the other"
            )

    def get(self, name: str) -> Callable[..., Any] | None:
        return self.user.get(name)

    def summary(self) -> str:
        """``user: model_fn, predict_fn; default: input_fn, output_fn``."""
        per_request = (
            ["transform_fn"] if "transform_fn" in self.user else ["input_fn", "predict_fn", "output_fn"]
        )
        if "predict_batch_fn" in self.user and "predict_fn" not in self.user:
            per_request[1:2] = ["predict_batch_fn"]
        names = ["model_fn", *per_request]
        user = [n for n in HOOK_PARAMS if n in self.user]
        default = [n for n in names if n not in self.user]
        return f"user: {', '.join(user) or 'none'}; default: {', '.join(default) or 'none'}"


def _default_predict(model: object) -> Callable[[Any], Any] | None:
    predict: object = getattr(model, "predict", None)
    if callable(predict):
        return predict
    if callable(model) and not isinstance(model, type):
        return model
    return None


class Handler:
    """Runs the hooks for one process: load once, then invoke per request (thread-safe)."""

    def __init__(self, hooks: Hooks, env: ServingEnv) -> None:
        self.hooks = hooks
        self.env = env
        self.model: Any = None
        self.loaded = False
        self._encodable = codecs.encodable_types(env.default_accept)
        self._wants_context = any(hooks.wants_context.get(n) for n in CONTEXT_HOOKS)
        self._default_predict: Callable[[Any], Any] | None = None

    @property
    def wants_context(self) -> bool:
        return self._wants_context

    def load(self) -> float:
        """``pre_model_fn``, ``model_fn``, ``model_warmup_fn``; the seconds taken. ``HandlerError`` on failure."""
        started = time.monotonic()
        model_dir = str(self.env.model_dir)
        for name in ("pre_model_fn", "model_fn", "model_warmup_fn"):
            fn = self.hooks.get(name)
            if fn is None:
                continue
            try:
                result = fn(model_dir, self.model) if name == "model_warmup_fn" else fn(model_dir)
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise HandlerError(f"{name} raised {_describe(exc)}", _traceback()) from None
            if name == "model_fn":
                self.model = result
        if not any(n in self.hooks.user for n in ("predict_fn", "predict_batch_fn", "transform_fn")):
            self._default_predict = _default_predict(self.model)
            if self._default_predict is None:
                raise HandlerError(
                    f"the handler defines no predict_fn (nor transform_fn), and the model from model_fn "
                    f"({type(self.model).__name__}) is neither callable nor has a predict() method"
                )
        self.loaded = True
        return time.monotonic() - started

    def ready(self) -> bool:
        """``ready_fn(model)`` when defined; ``HookError`` when it raised (even ``sys.exit``)."""
        fn = self.hooks.get("ready_fn")
        if fn is None:
            return True
        try:
            return bool(fn(self.model))
        except BaseException as exc:  # noqa: BLE001 - as in _call
            raise HookError("ready_fn", exc) from exc

    def _call(self, name: str, args: tuple[Any, ...], context: RequestContext | list[RequestContext | None] | None) -> Any:
        fn = self.hooks.user[name]
        if self.hooks.wants_context[name]:
            args = args + (context,)
        try:
            return fn(*args)
        except HTTPError:
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit/KeyboardInterrupt in a hook fail one request
            raise HookError(name, exc) from exc

    # -- the request pipeline -------------------------------------------------------------

    def negotiate(self, accept_header: str | None) -> list[str]:
        """The response types to try, best first; empty means 406."""
        if "output_fn" in self.hooks.user or "transform_fn" in self.hooks.user:
            chosen = media.preferred(accept_header, self.env.default_accept, self._encodable)
            return [] if chosen is None else [chosen]
        return media.acceptable(accept_header, self._encodable, self.env.default_accept)

    def invoke(
        self,
        body: bytes,
        media_type: str,
        params: dict[str, str],
        accept: list[str],
        context: RequestContext | None,
    ) -> Answer:
        """One ``/invocations`` request: ``(status, content type, extra headers, body)``."""
        if "transform_fn" in self.hooks.user:
            payload = codecs.decode_text(body, media_type, params) if codecs.is_text(media_type) else body
            result = self._call("transform_fn", (self.model, payload, media_type, accept[0]), context)
            return _normalize("transform_fn", result, accept[0])
        data = self.decode(body, media_type, params, context)
        return self.respond(self.predict(data, context), accept, context)

    def decode(self, body: bytes, media_type: str, params: dict[str, str], context: RequestContext | None) -> Any:
        """The request body as ``input_fn`` (or the default decoder) makes it."""
        if "input_fn" in self.hooks.user:
            payload = codecs.decode_text(body, media_type, params) if codecs.is_text(media_type) else body
            return self._call("input_fn", (payload, media_type), context)
        return codecs.decode(body, media_type, params)

    def respond(self, prediction: Any, accept: list[str], context: RequestContext | None) -> Answer:
        """A prediction as the answer ``output_fn`` (or the default encoder) makes of it."""
        if "output_fn" in self.hooks.user:
            result = self._call("output_fn", (prediction, accept[0]), context)
            return _normalize("output_fn", result, accept[0])
        if isinstance(prediction, Response):
            return _normalize("predict_fn", prediction, accept[0])
        return self._encode(prediction, accept)

    def predict(self, data: Any, context: RequestContext | None) -> Any:
        if "predict_fn" in self.hooks.user:
            return self._call("predict_fn", (data, self.model), context)
        if "predict_batch_fn" in self.hooks.user:
            return batch_item(self.predict_batch([data], [context])[0])
        predict = self._default_predict
        assert predict is not None
        try:
            return predict(data)
        except HTTPError:
            raise
        except BaseException as exc:  # noqa: BLE001 - as in _call
            raise HookError("predict_fn (default: the model)", exc) from exc

    def predict_batch(self, inputs: list[Any], contexts: list[RequestContext | None]) -> list[Any]:
        """``predict_batch_fn(inputs, model)``, checked: one prediction (or exception) per input.
        ``HookError`` (or the ``HTTPError`` it raised) when it raised or returned anything else."""
        result = self._call("predict_batch_fn", (inputs, self.model), contexts)
        if isinstance(result, (str, bytes, bytearray, dict)) or not hasattr(result, "__len__"):
            raise HookError(
                "predict_batch_fn",
                TypeError(f"returned a {type(result).__name__}; return a list with one prediction per input"),
            )
        try:
            predictions = list(result)
        except BaseException as exc:  # noqa: BLE001 - the user's sequence, as in _call
            raise HookError("predict_batch_fn", exc) from exc
        if len(predictions) != len(inputs):
            raise HookError(
                "predict_batch_fn",
                ValueError(
                    f"returned {len(predictions)} predictions for {len(inputs)} inputs; return one per input"
                ),
            )
        return predictions

    def predict_objects(self, data: Any, context: RequestContext | None) -> Any:
        """For the JSON protocols (Vertex, KServe v2): decoded data in, a plain prediction out."""
        if "transform_fn" not in self.hooks.user:
            return self.predict(data, context)
        body = codecs.to_json(data).decode("utf-8")
        result = self._call("transform_fn", (self.model, body, codecs.JSON, codecs.JSON), context)
        status, _, _, payload = _normalize("transform_fn", result, codecs.JSON)
        if status >= 400:
            raise HTTPError(status, payload.decode("utf-8", "replace")[:500])
        try:
            return json.loads(payload)
        except ValueError:
            raise HookError("transform_fn", ValueError("did not return JSON for application/json")) from None

    def _encode(
        self, prediction: Any, accept: list[str]
    ) -> Answer:
        problems = []
        for media_type in accept:
            try:
                return 200, media_type, (), codecs.encode(prediction, media_type)
            except codecs.CannotEncode as exc:
                problems.append(f"{media_type}: {exc}")
        raise HookError(
            "output_fn (default)",
            TypeError(
                f"the prediction ({type(prediction).__name__}) cannot be written as any accepted type ({'; '.join(problems)})"
            ),
        )

    def execution_parameters(self) -> Answer:
        result = self._call("execution_parameters_fn", (), None)
        if isinstance(result, (dict, list)):
            return 200, codecs.JSON, (), codecs.to_json(result)
        return _normalize("execution_parameters_fn", result, codecs.JSON)


def batch_item(item: Any) -> Any:
    """One item of ``predict_batch_fn``'s list: the prediction, or the exception it stands for raised
    (an ``HTTPError`` as it is, anything else as a ``HookError``: 500)."""
    if isinstance(item, HTTPError):
        raise item
    if isinstance(item, BaseException):
        raise HookError("predict_batch_fn", item)
    return item


def _with_charset(media_type: str) -> str:
    return (
        f"{media_type}; charset=utf-8"
        if media_type.startswith("text/") and ";" not in media_type
        else media_type
    )


def _normalize(hook: str, result: Any, accept: str) -> Answer:
    """A hook's return value as ``(status, content type, headers, body)``."""
    if isinstance(result, Response):
        return result.status, result.content_type or accept, result.headers, result.body
    content_type = accept
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str):
        result, content_type = result
    if isinstance(result, str):
        return 200, _with_charset(content_type), (), result.encode("utf-8")
    if isinstance(result, (bytes, bytearray, memoryview)):
        return 200, content_type, (), bytes(result)
    raise HookError(
        hook,
        TypeError(
            f"returned a {type(result).__name__}; return bytes, str, (body, content_type) or trainenv.serving.Response"
        ),
    )
