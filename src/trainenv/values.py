"""How a value becomes an environment variable name, a variable's value or an argv element.

``normalize`` upper-cases a name and replaces every character outside ``[A-Z0-9_]`` with ``_``
(``learning-rate`` → ``LEARNING_RATE``); ``normalized_names`` refuses two names that become
one. Values: strings as they are, ``None`` as empty, everything else compact JSON
(``env_value``); an argument is one argv element, JSON unless a string (``cmd_value``), and
``to_cmd_args`` gives ``--name value`` per hyperparameter in the file's order. Pure functions,
shared by the snapshot (``environment``), the exports and the serving settings.
"""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterable, Mapping

from trainenv.errors import ConfigError

_NOT_NAME = re.compile(r"[^A-Z0-9_]")


def normalize(name: str) -> str:
    """``learning-rate`` → ``LEARNING_RATE``."""
    return _NOT_NAME.sub("_", name.upper())


def normalized_names(names: Iterable[str], what: str, source: object = None) -> dict[str, str]:
    """``{name: NORMALIZED}``; a ConfigError when two names normalize to the same thing."""
    seen: dict[str, str] = {}
    result: dict[str, str] = {}
    for name in names:
        key = normalize(name)
        if key in seen:
            where = f"{source}: " if source is not None else ""
            raise ConfigError(
                f"{where}{what} names {seen[key]!r} and {name!r} both become {key!r} in environment variable names; rename one"
            )
        seen[key] = name
        result[name] = key
    return result


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # one encoder, not one per value


def to_json(value: Any) -> str:
    """Compact JSON, non-ASCII kept as is."""
    return _COMPACT.encode(value)


def env_value(value: Any) -> str:
    """Strings as they are; ``None`` as empty; everything else compact JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return to_json(value)


def cmd_value(value: Any) -> str:
    """One argv element: strings as they are, everything else JSON (``true``, ``[1,2]``, ``null``)."""
    return value if isinstance(value, str) else to_json(value)


def to_cmd_args(hyperparameters: Mapping[str, Any]) -> list[str]:
    """``--name value`` per hyperparameter, in the file's order; each value one argv element."""
    args: list[str] = []
    for name, value in hyperparameters.items():
        args.append(f"--{name}")
        args.append(cmd_value(value))
    return args
