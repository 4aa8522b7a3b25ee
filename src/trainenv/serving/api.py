"""What a handler module may use from trainenv: errors with a status, a response, the request context.

``raise HTTPError(422, "text too long")`` (or a subclass: ``BadRequest``, ``NotFound``,
``UnprocessableEntity``, ``TooManyRequests``, ``ServiceUnavailable``) from any hook answers with
that status and ``{"error": <code>, "message": <text>}``; no traceback is logged for it.
``Response(body, status=200, content_type=None, headers=None)`` returned from ``output_fn`` or
``transform_fn`` (or ``execution_parameters_fn``) is sent as it is. A hook that takes one more
positional parameter than SageMaker's signature (or a parameter named ``context``) receives a
``RequestContext``.
"""

from __future__ import annotations

import http
from dataclasses import dataclass, field

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping

# Stable across Python versions (http.HTTPStatus phrases change, e.g. 413 and 422 in 3.13).
_CODE_BY_STATUS: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    422: "unprocessable_entity",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    500: "internal_server_error",
    501: "not_implemented",
    503: "service_unavailable",
    504: "gateway_timeout",
    505: "http_version_not_supported",
}


def status_code_name(status: int) -> str:
    """``400 -> "bad_request"``: the short code put in the ``error`` field."""
    name = _CODE_BY_STATUS.get(status)
    if name is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        name = "_".join(phrase.lower().replace("-", " ").split())
        _CODE_BY_STATUS[status] = name
    return name


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error" if status >= 400 else "OK"


class HTTPError(Exception):
    """Raise from a hook to answer with ``status`` (400-599) and a JSON error body.

    A subclass knows its status, so ``BadRequest("why")`` gives the message alone.
    """

    status = 500

    def __init__(
        self,
        status: int | str | None = None,
        message: str = "",
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(status, str) and not message:
            message = status
            status = None
        if status is None:
            status = type(self).status
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"HTTPError status must be an integer 400-599, got {status!r}")
        super().__init__(message)
        self.status = status
        self.message = str(message) or reason_phrase(status)
        self.code = code or status_code_name(status)
        self.headers: tuple[tuple[str, str], ...] = tuple((headers or {}).items())


class BadRequest(HTTPError):
    status = 400


class NotFound(HTTPError):
    status = 404


class UnprocessableEntity(HTTPError):
    status = 422


class TooManyRequests(HTTPError):
    status = 429


class ServiceUnavailable(HTTPError):
    status = 503


class Response:
    """A complete answer from a hook: body (bytes or str), status, content type, extra headers."""

    __slots__ = ("body", "status", "content_type", "headers")

    def __init__(
        self,
        body: Any = b"",
        status: int = 200,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(body, str):
            body = body.encode("utf-8")
        elif isinstance(body, (bytearray, memoryview)):
            body = bytes(body)
        elif not isinstance(body, bytes):
            raise TypeError(f"Response body must be bytes or str, got {type(body).__name__}")
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"Response status must be an integer 100-599, got {status!r}")
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers: tuple[tuple[str, str], ...] = tuple((headers or {}).items())

    def __repr__(self) -> str:
        return f"Response(status={self.status}, content_type={self.content_type!r}, {len(self.body)} bytes)"


@dataclass(frozen=True)
class RequestContext:
    """Per-request facts for hooks that ask for a ``context`` argument."""

    request_id: str
    headers: Mapping[str, str]
    content_type: str
    accept: str
    route: str
    parameters: Any = None
    target_model: str | None = None
    custom_attributes: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
