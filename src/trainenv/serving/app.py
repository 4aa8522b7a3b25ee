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
| ``/v2/models/{name}[/versions/{v}]/infer`` | POST | KServe v2 inference (``trainenv.serving.protocols``) |
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
| ``Content-Type`` not a media type, or not supported (default ``input_fn``) | 415 |
| a hook raised ``trainenv.serving.HTTPError(status, message)`` | that status |
| a hook raised anything else | 500 (``"<hook> raised <Type>: <message>"``) |
| not ready (loading, ``ready_fn`` false, draining), or every handler thread busy and the queue full | 503 with ``Retry-After`` |
| the handler did not answer within ``timeout_s`` | 504, sent when the deadline passes; the connection is closed, the call finishes in the background and still holds its slot |

Handler calls run in the server's own request thread, at most ``threads`` at once, at most
``max_queue`` waiting (``trainenv.serving.pool.InlineRunner``). When a call passes ``timeout_s``,
the runner's watchdog answers 504 at once through the server (``environ["trainenv.timeout_writer"]``
on the stdlib server, the raw ``environ["gunicorn.socket"]`` on gunicorn) and closes that
connection; the handler's late result is dropped.

Error messages (bodies and log lines) have the environment's secret values and URL
credentials masked (``trainenv.redact``). A missing ``Content-Type`` means ``application/json``; a missing ``Accept`` or ``*/*`` means
``default_accept``. The request id is the client's ``X-Request-Id`` (or
``X-Amzn-RequestId``) when it is sane, else generated; it is echoed in ``X-Request-Id``.
The app sets ``environ["trainenv.must_close"]`` to ask the server to close the connection after
the answer. The decision to answer 413 is taken from ``Content-Length`` before reading. The
stdlib server (``environ["trainenv.lingers"]``) then sends the answer and drops the rest of the
body while half-closed; on gunicorn, which cannot, the app reads and drops it first (at most
64 MiB; beyond that the client may see a reset instead of the 413).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from trainenv.redact import redact_text
from trainenv.serving import codecs, media, protocols
from trainenv.serving.api import (
    HTTPError,
    RequestContext,
    reason_phrase,
    status_code_name,
)
from trainenv.serving.config import ServingEnv
from trainenv.serving.handler import Handler, HookError
from trainenv.serving.logsink import ServingLog
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

RETRY_AFTER_S = "1"
_READ_CHUNK = 65536
DISCARD_LIMIT = 64 * 1024 * 1024
_MAX_MESSAGE = 1000
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
_V2_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?\Z")
_STATUS_LINES: Dict[int, str] = {}
_JSON_CT = ("Content-Type", "application/json")

Result = Tuple[int, List[Tuple[str, str]], bytes]


def status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"{status} {reason_phrase(status)}"
    return line


def _clean(text: str) -> str:
    """One line, no CR/LF (they must never reach a header or a reason phrase), bounded."""
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


class ServingApp:
    """The WSGI callable for one process (one handler, one pool)."""

    def __init__(self, env: ServingEnv, handler: Handler, log: ServingLog) -> None:
        self.env = env
        self.handler = handler
        self.log = log
        self.pool = InlineRunner(env.threads, env.max_queue)
        self.state = READY if handler.loaded else LOADING
        self._not_ready_reason = "the model is loading"
        self._last_ready_problem = ""
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time()) & 0xFFFF:04x}-"
        self._access = env.access_log and log.enabled("INFO")
        self._access_health = env.access_log and log.enabled("DEBUG")
        self._deadline_s = env.timeout_s

        routes: Dict[str, Dict[str, Callable[[dict, str], Result]]] = {
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

    # -- lifecycle, set by the server ---------------------------------------------------------

    def set_ready(self) -> None:
        self.state = READY

    def set_draining(self) -> None:
        self.state = DRAINING
        self._not_ready_reason = "the server is shutting down"

    def set_failed(self, reason: str) -> None:
        self.state = FAILED
        self._not_ready_reason = reason

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or "/"
        request_id = self._request_id(environ)
        environ["trainenv.started"] = started
        try:
            status, headers, body = self._dispatch(environ, method, path, request_id)
        except Exception as exc:  # noqa: BLE001 - a bug here must still answer
            self.log.error(
                f"internal error on {method} {path} [{request_id}]: {type(exc).__name__}: {exc}",
                _format_exc(),
            )
            status, headers, body = self._error(
                500, "internal error in trainenv serving; see the server log", request_id
            )
        headers.append(("Content-Length", str(len(body))))
        headers.append(("X-Request-Id", request_id))
        start_response(status_line(status), headers)
        if self._access and not environ.get("trainenv.answered"):
            self._access_line(environ, method, path, status, len(body), request_id)
        return [body]

    def _access_line(
        self, environ: dict, method: str, path: str, status: int, size: int, request_id: str
    ) -> None:
        health = path in self._health
        if health and not self._access_health:
            return
        elapsed = (time.perf_counter() - environ["trainenv.started"]) * 1000.0
        line = f'{environ.get("REMOTE_ADDR", "-")} "{method} {_shown_path(path)}" {status} {size} {elapsed:.1f}ms {request_id}'
        if health:
            self.log.debug(line)
        else:
            self.log.info(line)

    def _request_id(self, environ: dict) -> str:
        given = environ.get("HTTP_X_REQUEST_ID") or environ.get("HTTP_X_AMZN_REQUESTID")
        if given and _REQUEST_ID.match(given):
            return given
        return f"{self._id_prefix}{next(self._ids)}"

    def _dispatch(self, environ: dict, method: str, path: str, request_id: str) -> Result:
        methods = self._routes.get(path)
        if methods is None:
            if path.startswith("/v2/models/"):
                return self._v2_model(environ, method, path, request_id)
            return self._error(404, f"no route {_shown_path(path)}", request_id)
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            return self._method_not_allowed(method, path, methods, request_id)
        return handler(environ, request_id)

    def _method_not_allowed(
        self, method: str, path: str, methods: Dict[str, Any], request_id: str, v2: bool = False
    ) -> Result:
        allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
        status, headers, body = self._error(
            405, f"{method} is not allowed on {_shown_path(path)}; use {', '.join(allowed)}", request_id, v2
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
        headers: Iterable[Tuple[str, str]] = (),
        code: Optional[str] = None,
    ) -> Result:
        message = _clean(redact_text(message, self.log.secrets))
        if v2:
            body = codecs.to_json({"error": message})
        else:
            body = codecs.to_json(
                {"error": code or status_code_name(status), "message": message, "request_id": request_id}
            )
        out = [_JSON_CT]
        out.extend(_user_headers(headers))
        if status == 503 and not any(k.lower() == "retry-after" for k, _ in out):
            out.append(("Retry-After", RETRY_AFTER_S))
        return status, out, body

    def _not_ready(self, request_id: str, v2: bool = False) -> Result:
        return self._error(503, f"not ready: {self._not_ready_reason}", request_id, v2)

    def _is_ready(self) -> bool:
        if self.state != READY:
            return False
        try:
            ready = self.handler.ready()
        except Exception as exc:  # noqa: BLE001
            problem = f"ready_fn raised {type(exc).__name__}: {exc}"
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

    def _ping(self, environ: dict, request_id: str) -> Result:
        if not self._is_ready():
            if self.state == READY:
                return self._error(503, f"not ready: {self._last_ready_problem}", request_id)
            return self._not_ready(request_id)
        return 200, [_JSON_CT], b'{"status":"ready"}'

    def _live(self, environ: dict, request_id: str) -> Result:
        return 200, [_JSON_CT], b'{"live":true}'

    def _v2_ready(self, environ: dict, request_id: str) -> Result:
        if not self._is_ready():
            return self._error(
                503, f"not ready: {self._last_ready_problem or self._not_ready_reason}", request_id, v2=True
            )
        return 200, [_JSON_CT], b'{"ready":true}'

    def _v2_metadata(self, environ: dict, request_id: str) -> Result:
        from trainenv import __version__

        return 200, [_JSON_CT], codecs.to_json({"name": "trainenv", "version": __version__, "extensions": []})

    def _execution_parameters(self, environ: dict, request_id: str) -> Result:
        return self._through_pool(environ, self.handler.execution_parameters, (), request_id)

    # -- reading the request ------------------------------------------------------------------

    def _read_body(self, environ: dict) -> bytes:
        limit = self.env.max_request_bytes
        stream = environ["wsgi.input"]
        length_text = environ.get("CONTENT_LENGTH")
        if length_text:
            try:
                length = int(length_text)
                if length < 0:
                    raise ValueError
            except ValueError:
                environ["trainenv.must_close"] = True
                raise HTTPError(400, f"Content-Length {length_text!r} is not a byte count") from None
            if length > limit:
                environ["trainenv.must_close"] = True
                _discard(environ, stream, length)
                raise HTTPError(
                    413, f"the body is {length} bytes; the limit is {limit} bytes (max_request_bytes)"
                )
            body = stream.read(length) if length else b""
            if len(body) != length:
                environ["trainenv.must_close"] = True
                raise HTTPError(400, f"the body ended after {len(body)} of {length} bytes")
            return body
        if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return b""
        parts: List[bytes] = []
        size = 0
        while True:
            chunk = stream.read(min(_READ_CHUNK, limit + 1 - size))
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                environ["trainenv.must_close"] = True
                _discard(environ, stream, None)
                raise HTTPError(
                    413, f"the chunked body passed the limit of {limit} bytes (max_request_bytes)"
                )
            parts.append(chunk)

    def _content_type(self, environ: dict) -> Tuple[str, Dict[str, str]]:
        header = environ.get("CONTENT_TYPE") or ""
        if not header.strip():
            return codecs.JSON, {}
        parsed = media.parse_media_type(header)
        if parsed is None:
            raise HTTPError(415, f"Content-Type {header!r} is not a media type")
        return parsed

    def _context(
        self,
        environ: dict,
        request_id: str,
        content_type: str,
        accept: str,
        route: str,
        parameters: Any = None,
    ) -> RequestContext:
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        return RequestContext(
            request_id=request_id,
            headers=headers,
            content_type=content_type,
            accept=accept,
            route=route,
            parameters=parameters,
            target_model=environ.get("HTTP_X_AMZN_SAGEMAKER_TARGET_MODEL"),
            custom_attributes=environ.get("HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES"),
        )

    # -- running the handler ------------------------------------------------------------------

    def _timeout_answer(self, request_id: str, v2: bool) -> Result:
        self.log.warning(
            f"timeout [{request_id}]: no answer within {self._deadline_s:g} s; the call is still running in the background"
        )
        return self._error(
            504, f"the handler did not answer within {self._deadline_s:g} s (timeout_s)", request_id, v2
        )

    def _on_timeout(self, environ: dict, request_id: str, v2: bool) -> Callable[[], None]:
        """Called by the watchdog when the deadline passes: answer 504 now, while the handler
        still runs, through the server's writer (stdlib: ``trainenv.timeout_writer``; gunicorn:
        its ``gunicorn.socket``). Without either, the 504 goes out when the handler returns."""

        def on_timeout() -> None:
            writer = environ.get("trainenv.timeout_writer")
            if writer is None:
                sock = environ.get("gunicorn.socket")
                writer = None if sock is None else _socket_writer(sock)
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
        self, environ: dict, fn: Callable, args: Tuple, request_id: str, v2: bool = False
    ) -> Result:
        """Run ``fn(*args) -> (status, content type, headers, body)`` in the pool; map every failure."""
        try:
            status, content_type, extra, body = self.pool.run(
                fn, args, time.monotonic() + self._deadline_s, self._on_timeout(environ, request_id, v2)
            )
        except AlreadyAnswered:
            if not environ.get("trainenv.answered"):
                return self._timeout_answer(request_id, v2)
            # Answered and closed already; what we return now only meets a closed socket
            # (gunicorn ignores the EPIPE; the stdlib server does not write it).
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
        headers = [("Content-Type", _clean(content_type))]
        headers.extend(_user_headers(extra))
        return status, headers, body

    def _invocations(self, environ: dict, request_id: str) -> Result:
        if self.state != READY:
            return self._not_ready(request_id)
        try:
            body = self._read_body(environ)
            media_type, params = self._content_type(environ)
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
            self._context(environ, request_id, media_type, accept[0], "/invocations")
            if self.handler.wants_context
            else None
        )
        return self._through_pool(
            environ, self.handler.invoke, (body, media_type, params, accept, context), request_id
        )

    def _json_body(
        self, environ: dict, request_id: str, v2: bool
    ) -> Tuple[Optional[bytes], Optional[Result]]:
        try:
            body = self._read_body(environ)
            media_type, _ = self._content_type(environ)
        except HTTPError as exc:
            return None, self._error(exc.status, exc.message, request_id, v2)
        if media_type != codecs.JSON and not media_type.endswith("+json"):
            return None, self._error(
                415, f"Content-Type must be application/json, got {media_type}", request_id, v2
            )
        return body, None

    def _vertex_predict(self, environ: dict, request_id: str) -> Result:
        if self.state != READY:
            return self._not_ready(request_id)
        body, failure = self._json_body(environ, request_id, v2=False)
        if failure is not None:
            return failure
        return self._through_pool(environ, self._vertex_job, (body, environ, request_id), request_id)

    def _vertex_job(self, body: bytes, environ: dict, request_id: str) -> Tuple[int, str, tuple, bytes]:
        instances, parameters = protocols.parse_vertex_request(body)
        context = None
        if self.handler.wants_context:
            context = self._context(environ, request_id, codecs.JSON, codecs.JSON, "vertex", parameters)
        prediction = self.handler.predict_objects(instances, context)
        try:
            return 200, codecs.JSON, (), protocols.vertex_response(prediction)
        except TypeError as exc:
            raise HookError("predict_fn", exc) from None

    def _v2_model(self, environ: dict, method: str, path: str, request_id: str) -> Result:
        match = _V2_MODEL.match(path)
        if match is None:
            return self._error(404, f"no route {_shown_path(path)}", request_id, v2=True)
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
            return 200, [_JSON_CT], codecs.to_json(document)
        if self.state != READY:
            return self._not_ready(request_id, v2=True)
        body, failure = self._json_body(environ, request_id, v2=True)
        if failure is not None:
            return failure
        return self._through_pool(
            environ, self._v2_job, (body, version, environ, request_id), request_id, v2=True
        )

    def _v2_job(
        self, body: bytes, version: Optional[str], environ: dict, request_id: str
    ) -> Tuple[int, str, tuple, bytes]:
        request = protocols.V2Request(body)
        context = None
        if self.handler.wants_context:
            context = self._context(environ, request_id, codecs.JSON, codecs.JSON, "v2", request.parameters)
        prediction = self.handler.predict_objects(request.data, context)
        try:
            return (
                200,
                codecs.JSON,
                (),
                protocols.v2_response(request, prediction, self.env.model_name, version),
            )
        except TypeError as exc:
            raise HookError("predict_fn", exc) from None


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+\Z")
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length")
)


def _user_headers(headers: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Headers from a hook's ``Response``/``HTTPError``: valid names only, one-line values, no
    hop-by-hop or framing headers (the server owns those)."""
    return [
        (str(name), _clean(value))
        for name, value in headers
        if _TOKEN.match(str(name)) and str(name).lower() not in _HOP_BY_HOP
    ]


def _socket_writer(sock: Any) -> Callable[[str, List[Tuple[str, str]], bytes], None]:
    """Write a complete ``Connection: close`` answer on a raw socket, then shut it down."""

    def write(status_text: str, headers: List[Tuple[str, str]], body: bytes) -> None:
        lines = (
            [f"HTTP/1.1 {status_text}"]
            + [f"{name}: {value}" for name, value in headers]
            + ["Connection: close", "", ""]
        )
        try:
            sock.sendall("\r\n".join(lines).encode("latin-1") + body)
            sock.shutdown(2)  # socket.SHUT_RDWR
        except OSError:
            pass

    return write


def _format_exc() -> str:
    import traceback

    return traceback.format_exc()


def _discard(environ: dict, stream: Any, length: Optional[int]) -> None:
    """Before a 413 on a server that cannot half-close (gunicorn): read and drop the rest of the
    body, at most ``DISCARD_LIMIT`` bytes, so the client gets to read the answer. The stdlib
    server sets ``trainenv.lingers`` and does this itself after answering."""
    if environ.get("trainenv.lingers"):
        return
    left = DISCARD_LIMIT if length is None else length
    if left > DISCARD_LIMIT:
        return
    try:
        while left > 0:
            chunk = stream.read(min(_READ_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
    except Exception:  # noqa: BLE001 - best effort; the answer is a 413 either way
        return


def _shown_path(path: str) -> str:
    """The path for logs and messages: printable, bounded (query strings never reach here)."""
    text = path if path.isprintable() else path.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:197] + "..."
