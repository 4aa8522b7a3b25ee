"""Reading requirements files as pip does (pure: reads files, runs nothing).

What counts: a line is a requirement unless it is an option; of the options, only ``-r``
(another requirements file) and ``-e`` (an editable install) bring requirements, so a file of
comments and options alone (``--index-url ...``) installs nothing. Lines are pip's logical
lines: ``\\`` continuations joined, ``#`` comments and blank lines dropped. ``-r``/``-c``
lines name the local files a requirements file includes, relative to its own directory.

Extra requirements (``TRAINENV_REQUIREMENTS``) are requirement specifiers only; one that starts
with ``-`` is a ``ConfigError``: options belong in requirements.txt, where both installers
read them.
"""

from __future__ import annotations

import re
from pathlib import Path

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

from trainenv.errors import ConfigError, InstallError, shown

_COMMENT = re.compile(r"(^|\s+)#.*$")
_REQUIREMENT_OPTIONS = ("-r", "--requirement", "-e", "--editable")
_INCLUDE_OPTIONS = ("-r", "--requirement", "-c", "--constraint")


def read_requirements(path: Path | None, extras: tuple[str, ...]) -> tuple[bytes | None, bool]:
    """``(the file's bytes, or None when it gives the installer nothing to read; whether there
    is anything to install)`` for a requirements file (or none) and the cleaned extras."""
    wanted = bool(extras)
    if path is None:
        return None, wanted
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise InstallError(
            f"requirements install failed: cannot read {path}: {exc.strerror or exc}; check the file's permissions"
        ) from None
    lines = logical_lines(text.decode("utf-8", "replace"))
    wanted = wanted or has_requirements(lines)
    return (text if lines else None), wanted  # no line: not even an option for the installer


def clean_extras(extras: Iterable[str]) -> tuple[str, ...]:
    """The extra requirements, stripped and without blanks; an option is a ``ConfigError``."""
    cleaned = []
    for extra in extras:
        text = extra.strip()
        if not text:
            continue
        if text.startswith("-"):
            raise ConfigError.at(
                "launch settings", "requirements",
                f"{shown(extra)} is an installer option, not a requirement; put options in requirements.txt",
            )
        cleaned.append(text)
    return tuple(cleaned)


def logical_lines(text: str) -> list[str]:
    """Lines as pip reads them: ``\\`` continuations joined, comments and blanks dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        line = _COMMENT.sub("", pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    tail = _COMMENT.sub("", pending).strip()
    if tail:
        lines.append(tail)
    return lines


def _option_value(line: str, names: Iterable[str]) -> str | None:
    """The value of ``-r x``, ``-rx``, ``--requirement x`` or ``--requirement=x``; else None."""
    for name in names:
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if name.startswith("--"):
            if rest[:1] in ("=", " ", "\t"):
                return rest[1:].strip() or None
        elif rest:
            return rest.lstrip(" \t=") or None
    return None


def has_requirements(lines: Iterable[str]) -> bool:
    """True if a line is a requirement, or an option that brings requirements (-r, -e)."""
    for line in lines:
        if not line.startswith("-"):
            return True
        if _option_value(line, _REQUIREMENT_OPTIONS) is not None:
            return True
    return False


def included_files(text: str, base: Path) -> list[Path]:
    """Local files named by ``-r``/``-c`` lines, relative to the including file's directory."""
    found = []
    for line in logical_lines(text):
        value = _option_value(line, _INCLUDE_OPTIONS)
        if value is None or "://" in value:
            continue
        path = Path(value).expanduser()
        found.append(path if path.is_absolute() else base / path)
    return found
