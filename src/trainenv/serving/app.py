"""The WSGI application: routes, limits, readiness, errors. Both servers run this same app.

| route | method | answer |
|---|---|---|
| ``/ping`` | GET | 200 ``{"status": "ready"}`` once the model is loaded, warmed up and ``ready_fn`` agrees; 503 before, and while draining |
| ``/invocations`` | POST | the handler's answer (``input_fn`` -> ``predict_fn`` -> ``output_fn``, or ``transform_fn``) |
| ``/execution-parameters`` | GET | ``execution_parameters_fn()`` as JSON; the route exists only with the hook |
| ``/v2`` | GET | server metadata ``{"name", "version", "extensions"}`` |
| ``/v2/health/live`` | GET | 200 while the process serves (also during loading) |
| ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]/ready`` | GET | 200 when ready, else 503 |
| ``/v2/models/{name}[/versions/{v}]`` | GET | model metadata |
| ``/v2/models/{name}[/versions/{v}]/infer`` | POST | KServe v2 inference, JSON or binary tensors (``trainenv.serving.protocols.kserve``) |
| ``$AIP_HEALTH_ROUTE`` / ``$AIP_PREDICT_ROUTE`` | GET / POST | Vertex AI health / ``{"instances"}`` -> ``{"predictions"}`` |

HEAD is accepted wherever GET is. Every error is JSON ``{"error": <code>, "message": <text>,
"request_id": <id>}`` (on ``/v2`` routes ``{"error": <text>}``, as the protocol says) with no
traceback; the traceback goes to the log with the request id:

| situation | status |
|---|---|
| body not valid for its type; bad ``Content-Length`` | 400 |
| unknown path / unknown v2 model name | 404 |
| wrong method | 405 with ``Allow`` |
| no acceptable response type | 406 |
| ``Content-Length`` over ``max_request_bytes`` (decided before reading; the connection is closed), or a chunked body passing it while read | 413 |
| the client went silent mid-body (the server's read timeout): one WARNING line, no access line | 408, connection closed |
| ``Content-Type`` not a media type, or not supported (default ``input_fn``); the message says how to send JSON | 415 |
| a hook raised ``trainenv.serving.HTTPError(status, message)`` | that status |
| a hook raised anything else | 500 (``"<hook> raised <Type>: <message>"``) |
| not ready (loading, ``ready_fn`` false, draining), or every handler thread busy and the queue full | 503 with ``Retry-After`` |
| the handler did not answer within ``timeout_s`` | 504, sent when the deadline passes; the connection is closed, the call finishes in the background and still holds its slot |

Handler calls run in the server's own request thread, at most ``threads`` at once, at most
``max_queue`` waiting (``trainenv.serving.pool.InlineRunner``). A hook that raises anything,
even ``SystemExit`` or ``KeyboardInterrupt``, fails its request alone (500). When a call passes
``timeout_s``, the runner's watchdog answers 504 at once through
``environ["trainenv.timeout_writer"]`` (each server provides one) and that connection closes;
the handler's late result is dropped. Batching ``/invocations`` (opt-in): ``trainenv.serving.batching``.

Error messages (bodies and log lines) have the environment's secret values and URL
credentials masked (``trainenv.redact``). A missing ``Accept`` or ``*/*`` means
``default_accept``. The request id is the client's ``X-Request-Id`` (or
``X-Amzn-RequestId``) when it is sane, else generated; it is echoed in ``X-Request-Id``.
The app sets ``environ["trainenv.must_close"]`` to ask the server to close the connection after
the answer. Reading the body and its type: ``trainenv.serving.request``.
"""

from __future__ import annotations

import itertools
import os
import re
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Iterable, MutableMapping

from trainenv.redact import redact_text
from trainenv.serving import batching, codecs
from trainenv.serving.answers import (
    JSON_CT,
    Result,
    error_answer,
    request_context,
    shown_path,
    status_line,
    user_headers,
)
from trainenv.serving.api import HTTPError
from trainenv.serving.config import ServingEnv
from trainenv.serving.handler import Answer, Handler, HandlerError, HookError
from trainenv.serving.logsink import ServingLog
from trainenv.serving.request import ClientGone, content_type, read_body
from trainenv.serving.protocols import kserve, vertex
from trainenv.serving.pool import (
    AlreadyAnswered,
    DeadlineExceeded,
    InlineRunner,
    Saturated,
)

LOADING = "loading"
READY = "ready"
DRAINING = "draining"
FAILED = "failed"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
_V2_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?\Z")
class ServingApp:
    """The WSGI callable for one process (one handler, one pool)."""

    def __init__(self, env: ServingEnv, handler: Handler, log: ServingLog) -> None:
        self.env = env
        self.handler = handler
        self.log = log
        self.pool = InlineRunner(env.threads, env.max_queue)
        self.batcher = batching.for_app(env, handler, self.pool)
        self.state = READY if handler.loaded else LOADING
        self._not_ready_reason = "the model is loading"
        self._last_ready_problem = ""
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time()) & 0xFFFF:04x}-"
        self._access = env.access_log and log.enabled("INFO")
        self._access_health = env.access_log and log.enabled("DEBUG")
        self._deadline_s = env.timeout_s
        # Several processes (servers/prefork.py): how many workers have not loaded yet; ready at 0.
        self.peers_loading: Callable[[], int] | None = None

        routes: dict[str, dict[str, Callable[[MutableMapping[str, Any], str], Result]]] = {
            "/ping": {"GET": self._ping},
            "/invocations": {"POST": self._invocations},
            "/v2": {"GET": self._v2_metadata},
            "/v2/health/live": {"GET": self._live},
            "/v2/health/ready": {"GET": self._v2_ready},
        }
        if handler.hooks.get("execution_parameters_fn") is not None:
            routes["/execution-parameters"] = {"GET": self._execution_parameters}
        if env.vertex_health_route:
            routes.setdefault(env.vertex_health_route, {})["GET"] = self._ping
        if env.vertex_predict_route:
            routes.setdefault(env.vertex_predict_route, {})["POST"] = self._vertex_predict
        self._routes = routes
        self._health = {"/ping", "/v2/health/live", "/v2/health/ready", env.vertex_health_route}

    # -- lifecycle, driven by the server ------------------------------------------------------

    def load(self) -> float:
        """Load the model (``pre_model_fn``, ``model_fn``, warm-up), then answer ``/ping`` 200;
        the seconds taken. ``HandlerError`` (exit 78) when anything in it raised."""
        try:
            seconds = self.handler.load()
        except HandlerError:
            raise
        except BaseException as exc:  # noqa: BLE001 - even sys.exit in model_fn is a load failure
            raise HandlerError(f"loading the model failed: {type(exc).__name__}: {exc}", _format_exc()) from None
        if self.state == LOADING:
            self.state = READY
        return seconds

    def stop(self) -> None:
        """Stop the pool's watchdog (after the last request)."""
        self.pool.stop()

    def set_draining(self) -> None:
        self.state = DRAINING
        self._not_ready_reason = "the server is shutting down"

    def set_failed(self, reason: str) -> None:
        self.state = FAILED
        self._not_ready_reason = reason

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(
        self, environ: MutableMapping[str, Any], start_response: Callable[[str, list[tuple[str, str]]], object]
    ) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or "/"
        request_id = self._request_id(environ)
        environ["trainenv.started"] = started
        access = self._access
        try:
            status, headers, body = self._dispatch(environ, method, path, request_id)
        except ClientGone as exc:  # the client's doing, not ours: one warning, no 500
            self.log.warning(
                f'{environ.get("REMOTE_ADDR", "-")} "{method} {shown_path(path)}" [{request_id}]: {exc}; '
                "answered 408 and closed the connection"
            )
            access = False  # that warning is the request's one line
            status, headers, body = self._error(408, str(exc), request_id)
        except Exception as exc:  # noqa: BLE001 - a bug here must still answer
            self.log.error(
                f"internal error on {method} {path} [{request_id}]: {type(exc).__name__}: {exc}",
                _format_exc(),
            )
            status, headers, body = self._error(
                500, getattr(exc, "answer", "internal error in trainenv serving; see the server log"), request_id
            )
        headers.append(("Content-Length", str(len(body))))
        headers.append(("X-Request-Id", request_id))
        start_response(status_line(status), headers)
        if access and not environ.get("trainenv.answered"):
            self._access_line(environ, method, path, status, len(body), request_id)
        return [body]

    def _access_line(
        self, environ: MutableMapping[str, Any], method: str, path: str, status: int, size: int, request_id: str
    ) -> None:
        health = path in self._health and (status < 400 or status == 503)  # a probe's usual answers: DEBUG
        if health and not self._access_health:
            return
        elapsed = (time.perf_counter() - environ["trainenv.started"]) * 1000.0
        line = f'{environ.get("REMOTE_ADDR", "-")} "{method} {shown_path(path)}" {status} {size} {elapsed:.1f}ms {request_id}'
        if health:
            self.log.debug(line)
        else:
            self.log.info(line)

    def _request_id(self, environ: MutableMapping[str, Any]) -> str:
        given: str | None = environ.get("HTTP_X_REQUEST_ID") or environ.get("HTTP_X_AMZN_REQUESTID")
        if given and _REQUEST_ID.match(given):
            return given
        return f"{self._id_prefix}{next(self._ids)}"

    def _dispatch(self, environ: MutableMapping[str, Any], method: str, path: str, request_id: str) -> Result:
        methods = self._routes.get(path)
        if methods is None:
            if path.startswith("/v2/models/"):
                return self._v2_model(environ, method, path, request_id)
            return self._error(404, f"no route {shown_path(path)}", request_id)
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            return self._method_not_allowed(method, path, methods, request_id)
        return handler(environ, request_id)

    def _method_not_allowed(
        self, method: str, path: str, methods: dict[str, Any], request_id: str, v2: bool = False
    ) -> Result:
        allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
        status, headers, body = self._error(
            405, f"{method} is not allowed on {shown_path(path)}; use {', '.join(allowed)}", request_id, v2
        )
        headers.append(("Allow", ", ".join(allowed)))
        return status, headers, body

    # -- answers ------------------------------------------------------------------------------

    def _error(
        self,
        status: int,
        message: str,
        request_id: str,
        v2: bool = False,
        headers: Iterable[tuple[str, str]] = (),
        code: str | None = None,
    ) -> Result:
        return error_answer(status, redact_text(message, self.log.secrets), request_id, v2, headers, code)

    def _not_ready(self, request_id: str, v2: bool = False) -> Result:
        return self._error(503, f"not ready: {self._not_ready_reason}", request_id, v2)

    def _is_ready(self) -> bool:
        if self.state != READY:
            return False
        if self.peers_loading is not None:
            loading = self.peers_loading()
            if loading:
                self._not_ready_reason = f"{loading} more worker process(es) still loading the model"
                return False
            self.peers_loading = None  # every worker has loaded once: a replacement never undoes it
        try:
            ready = self.handler.ready()
        except HookError as exc:
            problem = str(exc)
            if problem != self._last_ready_problem:
                self.log.warning(problem, _format_exc())
            self._last_ready_problem = problem
            return False
        problem = "" if ready else "ready_fn returned false"
        if problem != self._last_ready_problem:
            if problem:
                self.log.warning("not ready: ready_fn returned false")
            else:
                self.log.info("ready again: ready_fn returned true")
            self._last_ready_problem = problem
        return ready

    def _ping(self, environ: MutableMapping[str, Any], request_id: str) -> Result:
        if not self._is_ready():
            if self.state == READY:
                return self._error(503, f"not ready: {self._last_ready_problem or self._not_ready_reason}", request_id)
            return self._not_ready(request_id)
        return 200, [JSON_CT], b'{"status":"ready"}'

    def _live(self, environ: MutableMapping[str, Any], request_id: str) -> Result:
        return 200, [JSON_CT], b'{"live":true}'

    def _v2_ready(self, environ: MutableMapping[str, Any], request_id: str) -> Result:
        if not self._is_ready():
            return self._error(
                503, f"not ready: {self._last_ready_problem or self._not_ready_reason}", request_id, v2=True
            )
        return 200, [JSON_CT], b'{"ready":true}'

    def _v2_metadata(self, environ: MutableMapping[str, Any], request_id: str) -> Result:
        from trainenv import __version__

        return 200, [JSON_CT], kserve.server_metadata(__version__)

    def _execution_parameters(self, environ: MutableMapping[str, Any], request_id: str) -> Result:
        return self._through_pool(environ, self.handler.execution_parameters, (), request_id)

    # -- running the handler ------------------------------------------------------------------

    def _timeout_answer(self, request_id: str, v2: bool) -> Result:
        self.log.warning(
            f"timeout [{request_id}]: no answer within {self._deadline_s:g} s; the call is still running in the background"
        )
        return self._error(
            504, f"the handler did not answer within {self._deadline_s:g} s (timeout_s)", request_id, v2
        )

    def _on_timeout(self, environ: MutableMapping[str, Any], request_id: str, v2: bool) -> Callable[[], None]:
        """Called by the watchdog when the deadline passes: answer 504 now, while the handler
        still runs, through the server's ``environ["trainenv.timeout_writer"]``. Without one,
        the 504 goes out when the handler returns."""

        def on_timeout() -> None:
            writer = environ.get("trainenv.timeout_writer")
            if writer is None:
                return
            status, headers, body = self._timeout_answer(request_id, v2)
            headers.append(("Content-Length", str(len(body))))
            headers.append(("X-Request-Id", request_id))
            writer(status_line(status), headers, body)
            environ["trainenv.answered"] = True
            if self._access:
                self._access_line(
                    environ,
                    environ.get("REQUEST_METHOD", "POST"),
                    environ.get("PATH_INFO", ""),
                    status,
                    len(body),
                    request_id,
                )

        return on_timeout

    def _through_pool(
        self, environ: MutableMapping[str, Any], fn: Callable[..., Answer], args: tuple[Any, ...], request_id: str,
        v2: bool = False, run: Callable[..., Answer] | None = None,
    ) -> Result:
        """Run ``fn(*args) -> (status, content type, headers, body)`` in the pool (or ``run``); map every failure."""
        try:
            status, content_type, extra, body = (run or self.pool.run)(
                fn, args, time.monotonic() + self._deadline_s, self._on_timeout(environ, request_id, v2)
            )
        except AlreadyAnswered:
            if not environ.get("trainenv.answered"):
                return self._timeout_answer(request_id, v2)
            # Answered and closed already; what we return now only meets a closed socket
            # (a server either skips it or meets a closed socket).
            return 504, [], b""
        except Saturated:
            self.log.warning(
                f"saturated [{request_id}]: {self.pool.threads} handler threads busy"
                f" ({self.pool.overrunning} past their timeout), queue full; answered 503"
            )
            return self._error(
                503,
                f"all {self.pool.threads} handler threads are busy and the queue is full; retry later",
                request_id,
                v2,
            )
        except DeadlineExceeded:
            self.log.warning(
                f"timeout [{request_id}]: waited {self._deadline_s:g} s for a free handler thread; never started"
            )
            return self._error(
                504,
                f"no handler thread became free within {self._deadline_s:g} s (timeout_s)",
                request_id,
                v2,
            )
        except HTTPError as exc:
            if exc.status >= 500:
                self.log.warning(f"handler answered {exc.status} [{request_id}]: {exc.message}")
            return self._error(exc.status, exc.message, request_id, v2, exc.headers, None if v2 else exc.code)
        except HookError as exc:
            import traceback

            detail = "".join(traceback.format_exception(type(exc.error), exc.error, exc.error.__traceback__))
            self.log.error(f"request {request_id} failed: {exc}", detail)
            return self._error(500, f"{exc} (request id {request_id})", request_id, v2)
        headers = user_headers([("Content-Type", content_type)])
        headers.extend(user_headers(extra))
        return status, headers, body

    def _invocations(self, environ: MutableMapping[str, Any], request_id: str) -> Result:
        if self.state != READY:
            return self._not_ready(request_id)
        try:
            body = read_body(environ, self.env.max_request_bytes)
            media_type, params = content_type(environ)
        except HTTPError as exc:
            return self._error(exc.status, exc.message, request_id)
        accept_header = environ.get("HTTP_ACCEPT")
        accept = self.handler.negotiate(accept_header)
        if not accept:
            return self._error(
                406,
                f"cannot answer in any type of Accept: {accept_header!r} (default {self.env.default_accept})",
                request_id,
            )
        context = (
            request_context(environ, request_id, media_type, accept[0], "/invocations")
            if self.handler.wants_context
            else None
        )
        return self._through_pool(
            environ, self.handler.invoke, (body, media_type, params, accept, context), request_id,
            run=self.batcher.run if self.batcher else None,
        )

    def _json_body(
        self, environ: MutableMapping[str, Any], request_id: str, v2: bool, binary: bool = False
    ) -> tuple[bytes | None, Result | None]:
        """The body of a JSON route (with ``binary``, a v2 binary tensor request: octet-stream too)."""
        try:
            body = read_body(environ, self.env.max_request_bytes)
            media_type, _ = content_type(environ)
        except HTTPError as exc:
            return None, self._error(exc.status, exc.message, request_id, v2)
        json_type = media_type == codecs.JSON or media_type.endswith("+json")
        if not json_type and not (binary and media_type == codecs.OCTET_STREAM):
            return None, self._error(
                415,
                f"Content-Type must be application/json, got {media_type}; {codecs.how_to_send_json(media_type)}",
                request_id,
                v2,
            )
        return body, None

    def _vertex_predict(self, environ: MutableMapping[str, Any], request_id: str) -> Result:
        if self.state != READY:
            return self._not_ready(request_id)
        body, failure = self._json_body(environ, request_id, v2=False)
        if failure is not None:
            return failure
        return self._through_pool(environ, self._vertex_job, (body, environ, request_id), request_id)

    def _vertex_job(self, body: bytes, environ: MutableMapping[str, Any], request_id: str) -> Answer:
        instances, parameters = vertex.parse_request(body)
        context = None
        if self.handler.wants_context:
            context = request_context(environ, request_id, codecs.JSON, codecs.JSON, "vertex", parameters)
        prediction = self.handler.predict_objects(instances, context)
        try:
            return 200, codecs.JSON, (), vertex.response(prediction)
        except TypeError as exc:
            raise HookError("predict_fn", exc) from None

    def _v2_model(self, environ: MutableMapping[str, Any], method: str, path: str, request_id: str) -> Result:
        match = _V2_MODEL.match(path)
        if match is None:
            return self._error(404, f"no route {shown_path(path)}", request_id, v2=True)
        name, version, action = match.groups()
        if name != self.env.model_name:
            return self._error(
                404,
                f"model {name!r} not found; this server serves {self.env.model_name!r}",
                request_id,
                v2=True,
            )
        wanted = "POST" if action == "/infer" else "GET"
        if (method if method != "HEAD" else "GET") != wanted:
            return self._method_not_allowed(method, path, {wanted: None}, request_id, v2=True)
        if action == "/ready":
            return self._v2_ready(environ, request_id)
        if action is None:
            document = {
                "name": name,
                "versions": [version] if version else [],
                "platform": "trainenv",
                "inputs": [],
                "outputs": [],
            }
            return 200, [JSON_CT], codecs.to_json(document)
        if self.state != READY:
            return self._not_ready(request_id, v2=True)
        header_length = environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH")
        body, failure = self._json_body(environ, request_id, v2=True, binary=header_length is not None)
        if failure is not None:
            return failure
        return self._through_pool(
            environ, self._v2_job, (body, header_length, version, environ, request_id), request_id, v2=True
        )

    def _v2_job(
        self, body: bytes, header_length: str | None, version: str | None, environ: MutableMapping[str, Any], request_id: str
    ) -> Answer:
        request = kserve.V2Request(body, header_length)
        context = None
        if self.handler.wants_context:
            context = request_context(environ, request_id, codecs.JSON, codecs.JSON, "v2", request.parameters)
        prediction = self.handler.predict_objects(request.data, context)
        try:
            return (200, *kserve.answer(request, prediction, self.env.model_name, version))
        except TypeError as exc:
            raise HookError("predict_fn", exc) from None


def _format_exc() -> str:
    import traceback

    return traceback.format_exc()
