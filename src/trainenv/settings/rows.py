"""One row type for every setting trainenv reads, and the parsers its values go through.

A ``Setting`` is one row: its name (also its key in ``trainenv.yaml``), its command-line flag,
its variable, how to parse a raw value, its default and its help. A row with ``flag=""`` has
no command-line option, and one with ``in_file=False`` no ``trainenv.yaml`` key (the value
belongs to the machine or the platform, not to the job's code). The training and serving
tables are tuples of rows; the CLI options, the variable lookups, ``--help``, ``trainenv env``
and the README tables all come from them. A parser takes a raw value (a string from a variable
or flag, or YAML data) and returns the typed value, or raises ``ValueError`` with what was
expected.
"""


from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable

from trainenv.frozen import frozen


def text(value: Any) -> str:
    """Any scalar as a string; a list or mapping is refused."""
    if isinstance(value, (dict, list)):
        raise ValueError("expected a string")
    return str(value)


def choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return text

    return parse


def number(kind: type, minimum: float, maximum: float | None = None) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            number = kind(str(value).strip())
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
        if number in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        if number != number or number < minimum or (maximum is not None and number > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return number

    return parse


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def string_items(value: list[Any] | tuple[Any, ...]) -> tuple[str, ...]:
    """A YAML list's items as strings; a nested list or mapping is refused."""
    for index, item in enumerate(value):
        if isinstance(item, (dict, list, tuple)):
            raise ValueError(f"item {index} is a {type(item).__name__}, expected a string")
    return tuple(str(item) for item in value)


def words(value: Any) -> tuple[str, ...]:
    """A list of strings: a YAML list, a JSON list (``'["a==1", "b>2"]'``), or a string split like
    a shell would (``"a==1 'b>2'"``)."""
    if isinstance(value, (list, tuple)):
        return string_items(value)
    if text(value).lstrip().startswith("["):
        import json

        try:
            items = json.loads(text(value))
        except ValueError as exc:
            raise ValueError(f"not a JSON list: {exc}") from None
        if not isinstance(items, list):
            raise ValueError("expected a JSON list of strings")
        if any(not isinstance(item, str) for item in items):
            raise ValueError("expected a JSON list of strings")
        return tuple(items)
    import shlex  # deferred: most launches have no word list to split

    try:
        return tuple(shlex.split(text(value)))
    except ValueError as exc:
        raise ValueError(f"cannot split: {exc}") from None


@frozen
class Setting:
    """One setting: where its value may come from, how it is parsed, and its help."""

    name: str
    flag: str  # "" when there is no command-line option
    variable: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = "VALUE"
    choices: tuple[str, ...] = ()
    in_file: bool = True  # may be set in trainenv.yaml under its name
    fallbacks: tuple[str, ...] = ()  # platform variables read after ``variable``, in order
