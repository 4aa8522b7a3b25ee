"""The read-only mapping behaviour shared by the frozen snapshot classes.

A snapshot is a frozen record (``trainenv.record``); this mixin makes it a ``Mapping`` over its fields, so
``dict(env)``, ``env["hosts"]`` and ``json.dumps(dict(env))`` work, and gives ``to_json()``.
Paths become strings and tuples lists in ``to_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
from pathlib import PurePath

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterator


def plain(value: Any) -> Any:
    """A JSON-ready copy of a snapshot value: paths as str, tuples as lists, nested mappings."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, SnapshotMapping):
        return value.to_dict()
    if hasattr(type(value), "_fields") and not isinstance(value, tuple):
        return {name: plain(getattr(value, name)) for name in type(value)._fields}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class FrozenDict(dict):
    """A ``dict`` that refuses every change: read-only like a mapping proxy, yet ``json.dumps`` takes it."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("snapshot mappings are read-only")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        return (FrozenDict, (dict(self),))


class FrozenList(list):
    """A ``list`` that refuses every change; equal to the same plain list, and JSON-ready."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("snapshot lists are read-only")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse  # type: ignore[assignment]
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        return (FrozenList, (list(self),))


def deep_freeze(value: Any) -> Any:
    """Nested dicts and lists become ``FrozenDict``/``FrozenList``; everything else as is."""
    if isinstance(value, dict):
        return FrozenDict({k: deep_freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(deep_freeze(v) for v in value)
    return value


class SnapshotMapping(Mapping):
    """Mixin for frozen records: a read-only mapping over their fields."""

    def __getitem__(self, key: str) -> Any:
        if key in self._field_names():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    @classmethod
    def _field_names(cls) -> tuple:
        return cls._fields  # type: ignore[attr-defined]

    def to_dict(self) -> dict:
        return {name: plain(getattr(self, name)) for name in self._field_names()}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
