"""Frozen records: the part of ``@dataclass(frozen=True)`` trainenv uses, without its start-up cost.

``dataclasses`` imports ``inspect`` and compiles six methods per class with ``exec``: about
10 ms for the import and 1-3 ms a class, paid on every job start for a dozen classes.
``@frozen`` reads the class's annotations once and shares generic methods instead.

    @frozen
    class Point:
        x: int
        y: int = 0

    Point(1) == Point(x=1, y=0); Point(1).x = 2  # raises FrozenRecordError

Fields are the annotated names in order (a subclass appends its own); a class attribute gives
a default; ``__post_init__`` runs after ``__init__``; names in ``_hidden`` stay out of
``repr`` and names in ``_not_compared`` out of ``==`` and ``hash``. ``fields(obj)`` and ``replace(obj, **changes)`` mirror their dataclasses namesakes.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Tuple

_MISSING = object()


class FrozenRecordError(AttributeError):
    """Assigning to or deleting a field of a frozen record."""


def frozen(cls: type) -> type:
    """Make ``cls`` a frozen record (see the module docstring)."""
    names: list = []
    defaults: dict = {}
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
    cls._fields = tuple(names)
    cls._defaults = defaults
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


def _values(self: Any) -> tuple:
    ignored = getattr(type(self), "_not_compared", ())
    return tuple(getattr(self, n) for n in type(self)._fields if n not in ignored)


def _eq(self: Any, other: Any) -> Any:
    if type(other) is not type(self):
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def fields(record: Any) -> Tuple[str, ...]:
    """The field names of a record or record class, in order."""
    return record._fields


def replace(record: Any, **changes: Any) -> Any:
    """A copy of ``record`` with some fields changed."""
    values = {n: getattr(record, n) for n in type(record)._fields}
    values.update(changes)
    return type(record)(**values)
