"""The pieces of an answer the app builds: status lines, JSON error bodies, safe headers, and the
``RequestContext`` a hook may ask for. Pure functions of their arguments.

An error body is ``{"error": <code>, "message": <text>, "request_id": <id>}``, or on the KServe
v2 routes ``{"error": <text>}`` as that protocol says; the message is one line of at most 1000
characters. A 503 always carries ``Retry-After``.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterable, MutableMapping

from trainenv.serving import codecs
from trainenv.serving.api import RequestContext, reason_phrase, status_code_name

RETRY_AFTER_S = "1"
JSON_CT = ("Content-Type", "application/json")
_MAX_MESSAGE = 1000
_STATUS_LINES: dict[int, str] = {}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+\Z")
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length")
)

Result = tuple[int, list[tuple[str, str]], bytes]


def status_line(status: int) -> str:
    """``"404 Not Found"``, cached."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"{status} {reason_phrase(status)}"
    return line


def clean(text: str) -> str:
    """One line, no CR/LF (they must never reach a header or a reason phrase), bounded."""
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


class BadHeader(ValueError):
    """A hook's header value that HTTP/1.1 cannot carry (not latin-1); ``answer`` names it."""

    def __init__(self, name: str, value: str) -> None:
        shown = value if len(value) <= 40 else value[:37] + "..."
        self.answer = (
            f"the handler answered header {name!r} with value {shown!r}, which is not latin-1 "
            "(HTTP headers cannot carry it; percent-encode it or move it to the body)"
        )
        super().__init__(self.answer)


def user_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers from a hook's ``Response``/``HTTPError`` (and its content type): valid names only,
    one-line values, no hop-by-hop or framing headers (the server owns those); ``BadHeader`` for a
    value that is not latin-1."""
    out = []
    for name, value in headers:
        name, value = str(name), clean(value)
        if _TOKEN.match(name) and name.lower() not in _HOP_BY_HOP:
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise BadHeader(name, value) from None
            out.append((name, value))
    return out


def error_answer(
    status: int,
    message: str,
    request_id: str,
    v2: bool = False,
    headers: Iterable[tuple[str, str]] = (),
    code: str | None = None,
) -> Result:
    """A JSON error answer (``message`` already redacted)."""
    message = clean(message)
    if v2:
        body = codecs.to_json({"error": message})
    else:
        body = codecs.to_json({"error": code or status_code_name(status), "message": message, "request_id": request_id})
    out = [JSON_CT]
    out.extend(user_headers(headers))
    if status == 503 and not any(k.lower() == "retry-after" for k, _ in out):
        out.append(("Retry-After", RETRY_AFTER_S))
    return status, out, body


def request_context(
    environ: MutableMapping[str, Any], request_id: str, content_type: str, accept: str, route: str, parameters: Any = None
) -> RequestContext:
    """What a hook that asks for a context gets: request id, headers, types, route, parameters."""
    headers = {key[5:].replace("_", "-").title(): value for key, value in environ.items() if key.startswith("HTTP_")}
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


def shown_path(path: str) -> str:
    """The path for logs and messages: printable, bounded (query strings never reach here)."""
    text = path if path.isprintable() else path.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:197] + "..."
