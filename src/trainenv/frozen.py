"""Frozen records and read-only snapshot containers.

``@frozen`` is the part of ``@dataclass(frozen=True)`` trainenv uses, without its start-up
cost: ``dataclasses`` imports ``inspect`` and compiles six methods per class with ``exec``
(about 10 ms for the import and 1-3 ms a class, paid on every job start). ``@frozen`` reads
the class's annotations once and shares generic methods instead; type checkers see it as a
dataclass transform.

    @frozen
    class Point:
        x: int
        y: int = 0

    Point(1) == Point(x=1, y=0); Point(1).x = 2  # raises FrozenRecordError

Fields are the annotated names in order (a subclass appends its own); a class attribute gives
a default; ``__post_init__`` runs after ``__init__``; names in ``_hidden`` stay out of
``repr`` and names in ``_not_compared`` out of ``==`` and ``hash``. ``fields(obj)`` and
``replace(obj, **changes)`` mirror their dataclasses namesakes.

``FrozenDict``/``FrozenList``/``deep_freeze`` make nested snapshot data read-only, and
``SnapshotMapping`` makes a record a read-only ``Mapping`` over its fields, so ``dict(env)``,
``env["hosts"]`` and ``json.dumps(dict(env))`` work; ``plain`` gives its JSON-ready form.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, ClassVar, Iterator, NoReturn, TypeVar

    from typing_extensions import dataclass_transform

    _T = TypeVar("_T")
    # The bases as type checkers see them; at run time the plain (unsubscripted) classes.
    _DictBase = dict[Any, Any]
    _ListBase = list[Any]
    _MappingBase = Mapping[str, Any]
else:
    _DictBase, _ListBase, _MappingBase = dict, list, Mapping

    def dataclass_transform(**_: object) -> object:
        """At run time a no-op: the decorator only informs type checkers."""
        return lambda function: function

_MISSING = object()


class FrozenRecordError(AttributeError):
    """Assigning to or deleting a field of a frozen record."""


@dataclass_transform(frozen_default=True)
def frozen(cls: type[_T]) -> type[_T]:
    """Make ``cls`` a frozen record (see the module docstring)."""
    names: list[str] = []
    defaults: dict[str, Any] = {}
    for base in reversed(cls.__mro__[1:]):
        for name in getattr(base, "_fields", ()):
            if name not in names:
                names.append(name)
        defaults.update(getattr(base, "_defaults", {}))
    for name in cls.__dict__.get("__annotations__", {}):
        if name.startswith("_"):
            continue
        if name not in names:
            names.append(name)
        if name in cls.__dict__:
            defaults[name] = cls.__dict__[name]
    setattr(cls, "_fields", tuple(names))
    setattr(cls, "_defaults", defaults)
    for method in (_init, _setattr, _delattr, _repr, _eq, _hash):
        dunder = method.__name__.replace("_", "__", 1) + "__"
        if dunder not in cls.__dict__:  # a method the class writes itself wins
            setattr(cls, dunder, method)
    return cls


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names = cls._fields
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} fields, got {len(args)} positional arguments")
    values = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"{cls.__name__}() got an unexpected field {name!r}")
        if name in values:
            raise TypeError(f"{cls.__name__}() got field {name!r} twice")
        values[name] = value
    for name in names:
        value = values.get(name, cls._defaults.get(name, _MISSING))
        if value is _MISSING:
            raise TypeError(f"{cls.__name__}() is missing field {name!r}")
        object.__setattr__(self, name, value)
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")


def _delattr(self: Any, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")


def _repr(self: Any) -> str:
    hidden = getattr(type(self), "_hidden", ())
    shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in type(self)._fields if n not in hidden)
    return f"{type(self).__name__}({shown})"


def _values(self: Any) -> tuple[Any, ...]:
    ignored = getattr(type(self), "_not_compared", ())
    return tuple(getattr(self, n) for n in type(self)._fields if n not in ignored)


def _eq(self: Any, other: object) -> object:
    if type(other) is not type(self):
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def fields(record: Any) -> tuple[str, ...]:
    """The field names of a record or record class, in order."""
    names: tuple[str, ...] = record._fields
    return names


def replace(record: Any, **changes: Any) -> Any:
    """A copy of ``record`` with some fields changed."""
    values = {n: getattr(record, n) for n in type(record)._fields}
    values.update(changes)
    return type(record)(**values)

def plain(value: Any) -> Any:
    """A JSON-ready copy of a snapshot value: paths as str, tuples as lists, nested mappings."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, SnapshotMapping):
        return value.to_dict()
    if hasattr(type(value), "_fields") and not isinstance(value, tuple):
        return {name: plain(getattr(value, name)) for name in type(value)._fields}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class FrozenDict(_DictBase):
    """A ``dict`` that refuses every change: read-only like a mapping proxy, yet ``json.dumps`` takes it."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("snapshot mappings are read-only")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> Any:
        return (FrozenDict, (dict(self),))


class FrozenList(_ListBase):
    """A ``list`` that refuses every change; equal to the same plain list, and JSON-ready."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("snapshot lists are read-only")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> Any:
        return (FrozenList, (list(self),))


def deep_freeze(value: Any) -> Any:
    """Nested dicts and lists become ``FrozenDict``/``FrozenList``; everything else as is."""
    if isinstance(value, dict):
        return FrozenDict({k: deep_freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(deep_freeze(v) for v in value)
    return value


class SnapshotMapping(_MappingBase):
    """Mixin for frozen records: a read-only mapping over their fields."""

    _fields: ClassVar[tuple[str, ...]]  # set by ``@frozen``

    def __getitem__(self, key: str) -> Any:
        if key in self._field_names():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return cls._fields

    def to_dict(self) -> dict[str, Any]:
        return {name: plain(getattr(self, name)) for name in self._field_names()}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
