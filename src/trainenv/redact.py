"""What counts as a secret, and hiding it (CONTRACT §8).

A name is secret when it contains ``token``, ``secret``, ``password``, ``passwd``, ``key``,
``credential`` or ``auth`` in any case. Its value is shown as ``***``. Independently, the
``user:password@`` part of any URL is replaced by ``***@`` wherever it appears in text.
"""

from __future__ import annotations

from collections.abc import Mapping
import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

MASK = "***"
_SECRET_NAME = re.compile(r"token|secret|password|passwd|key|credential|auth", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@:]*(?::[^/\s@]*)?@")
_MIN_SECRET_LEN = 4


def is_secret_name(name: str) -> bool:
    return _SECRET_NAME.search(name) is not None


def redact_urls(text: str) -> str:
    """Replace ``scheme://user:pass@`` with ``scheme://***@``."""
    if "@" not in text:
        return text
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)


def redact_value(name: str, value: str) -> str:
    return MASK if is_secret_name(name) and value != "" else redact_urls(value)


def redact_mapping(values: Mapping[str, str]) -> dict:
    return {k: redact_value(k, v) for k, v in values.items()}


def secret_values(values: Mapping[str, str]) -> list:
    """The values of secret-looking names, longest first (for scrubbing free text).

    Each value also comes in the forms it takes inside JSON and shell-quoted text, so a
    secret with quotes or backslashes is found wherever trainenv serialized it.
    """
    import json
    import shlex

    found = set()
    for name, value in values.items():
        if is_secret_name(name) and len(value) >= _MIN_SECRET_LEN:
            found.update({value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], shlex.quote(value)})
    return sorted(found, key=len, reverse=True)


def nested_secrets(value: object, name: str = "", found: dict = None) -> dict:
    """``{path: text}`` for every value under a secret-looking key, at any depth of JSON data."""
    import json

    found = {} if found is None else found
    if isinstance(value, Mapping):
        for key, inner in value.items():
            nested_secrets(inner, f"{name}.{key}" if name else str(key), found)
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            nested_secrets(inner, f"{name}[{index}]", found)
    elif is_secret_name(name.rsplit(".", 1)[-1].split("[", 1)[0]) and value not in (None, ""):
        found[name] = value if isinstance(value, str) else json.dumps(value)
    return found


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Scrub free text (a log line, a stderr tail): known secret values and URL credentials."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return redact_urls(text)
