"""What counts as a secret, and hiding it: one rule for everything trainenv prints or writes.

A name is **secret** when it contains ``secret``, ``password`` or ``passwd``, or when its last
word is ``token``, ``key``, ``apikey``, ``pwd``, ``credential``, ``credentials``, ``auth`` or
``passphrase`` (any case). Words are split at ``_``, ``-``, ``.`` and where a lower-case letter
meets an upper-case one: ``HF_TOKEN``, ``wandbApiKey`` and ``db_password`` are secret;
``tokenizer``, ``max_tokens``, ``key_dim``, ``monkey_patch`` and ``author`` are not.

Two ways to hide, used by ``trainenv env``, ``train --dry-run``, the log and the failure file:

- ``redact_data`` for structured data (a snapshot, a plan): the value of a secret name becomes
  ``***``, at any depth; every other string goes through ``redact_text``.
- ``redact_text`` for free text (a log line, an error message, a stderr tail): each known secret
  value (``secret_values``) is replaced by ``***`` in every form serializing may have given it
  (as is, inside JSON, shell-quoted, inside a Python ``repr``), and so is the ``user:password@``
  part of any URL.
"""

from __future__ import annotations

from collections.abc import Mapping
import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterable, Iterator

MASK = "***"
_ALWAYS_SECRET = re.compile(r"secret|password|passwd", re.IGNORECASE)
_SECRET_LAST_WORDS = frozenset({"token", "key", "apikey", "pwd", "credential", "credentials", "auth", "passphrase"})
_WORD_BREAK = re.compile(r"[_\-.]+|(?<=[a-z])(?=[A-Z])")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@:]*(?::[^/\s@]*)?@")
_MIN_SECRET_LEN = 4  # shorter values are masked by name only, never scrubbed from free text
_MIN_NUMERIC_SECRET_LEN = 8  # likewise short numbers (a port, a count): "1234" is in too much text
_LITERALS = frozenset({"true", "false", "null", "none"})
# The shell's working-directory variables end in "pwd" but hold a path, and scrubbing that path
# from every log line would hide where the job runs.
_SHELL_PATHS = frozenset({"PWD", "OLDPWD"})
_ELLIPSIS = "..."  # how errors.shown() marks a value it cut short
_MIN_CUT_PREFIX = 8  # a cut-short secret is scrubbed when at least this much of it shows


def is_secret_name(name: str) -> bool:
    """Whether the value of ``name`` is a secret (see the module docstring)."""
    if name in _SHELL_PATHS:
        return False
    if _ALWAYS_SECRET.search(name):
        return True
    words = [word for word in _WORD_BREAK.split(name) if word]
    return bool(words) and words[-1].lower() in _SECRET_LAST_WORDS


def redact_urls(text: str) -> str:
    """Replace ``scheme://user:pass@`` with ``scheme://***@``."""
    if "@" not in text:
        return text
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)


def _forms(value: str) -> Iterator[str]:
    """``value`` as it appears once serialized: as is, in JSON, shell-quoted, in a Python repr."""
    import json
    import shlex

    yield value
    yield json.dumps(value)[1:-1]
    yield json.dumps(value, ensure_ascii=False)[1:-1]
    yield shlex.quote(value)
    for python in (repr, ascii):
        # Inside '...' (with \' escaped; adding both quotes forces that choice) and inside "...".
        quoted = python(value + "'\"")[1:-4]
        yield quoted
        yield quoted.replace("\\'", "'")


def secret_values(values: Mapping[str, str]) -> list[str]:
    """The values of secret names, in each serialized form, longest first (for ``redact_text``)."""
    found: set[str] = set()
    for name, value in values.items():
        if is_secret_name(name) and _scrubbable(value):
            found.update(_forms(value))
    return sorted(found, key=len, reverse=True)


def _scrubbable(value: str) -> bool:
    """Whether to scrub ``value`` from free text: not a word every traceback has (``true``), not a
    short number. Such values are still masked wherever they appear under their name."""
    if len(value) < _MIN_SECRET_LEN or value.lower() in _LITERALS:
        return False
    return not (len(value) < _MIN_NUMERIC_SECRET_LEN and value.replace(".", "", 1).lstrip("-").isdigit())


def nested_secrets(value: object, name: str = "", found: dict[str, str] | None = None) -> dict[str, str]:
    """``{path: text}`` for every value under a secret name, at any depth of JSON data."""
    import json

    found = {} if found is None else found
    if isinstance(value, Mapping):
        for key, inner in value.items():
            nested_secrets(inner, f"{name}.{key}" if name else str(key), found)
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            nested_secrets(inner, f"{name}[{index}]", found)
    elif value not in (None, "") and _under_secret_name(name):
        found[name] = value if isinstance(value, str) else json.dumps(value)
    return found


def _under_secret_name(path: str) -> bool:
    """Whether any key along ``path`` (``a.b[0].c``) is a secret name: all below it is secret."""
    return any(is_secret_name(key) for key in re.split(r"\.|\[\d+\]", path) if key)


def known_secrets(environ: Mapping[str, str], data: object = None) -> list[str]:
    """``secret_values`` of the secret names of ``environ`` and of ``data`` (e.g. hyperparameters)."""
    named = dict(environ)
    if data is not None:
        named.update({f"secret:{path}": text for path, text in nested_secrets(data).items()})
    return secret_values(named)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Scrub free text (a log line, a stderr tail): known secret values and URL credentials.

    A secret cut short in an error message (``'hf_abcdefgh...``, as ``errors.shown`` cuts long
    values) is scrubbed too, when at least its first eight characters show.
    """
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
        if _ELLIPSIS in text and len(secret) > _MIN_CUT_PREFIX and secret[:_MIN_CUT_PREFIX] in text:
            text = _scrub_cut_short(text, secret)
    return redact_urls(text)


def _scrub_cut_short(text: str, secret: str) -> str:
    """Mask each run of ``secret``'s leading characters that ends in the cut marker."""
    head = secret[:_MIN_CUT_PREFIX]
    start = text.find(head)
    while start >= 0:
        end = start + _MIN_CUT_PREFIX
        while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
            end += 1
        if text.startswith(_ELLIPSIS, end):
            text = text[:start] + MASK + text[end:]
            end = start + len(MASK)
        start = text.find(head, end)
    return text


def redact_data(value: Any, secrets: Iterable[str] = (), name: str = "") -> Any:
    """A copy of JSON-like data with secret-named values masked and every string scrubbed.

    Everything below a secret name is masked too (``{"credentials": {"user": ..., "pass": ...}}``).
    """
    if name and is_secret_name(name) and value not in (None, ""):
        return _masked(value)
    if isinstance(value, Mapping):
        return {k: redact_data(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v, secrets, name) for v in value]
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def _masked(value: Any) -> Any:
    """``value`` with every leaf masked, keeping the shape (so a reader sees what was there)."""
    if isinstance(value, Mapping):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(v) for v in value]
    return MASK if value not in (None, "") else value
