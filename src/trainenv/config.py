"""Reading and validating the job's config files into plain data.

Every reader takes a path, returns plain Python data, and raises ``ConfigError`` with a
one-line message naming the file, the key and the value when the content is invalid. An
optional file that is absent reads as empty; a present one must be valid. Nothing is written.

| file (under ``input/config/``) | reader | shape |
|---|---|---|
| ``hyperparameters.json``  | ``read_hyperparameters``  | object; string values that parse as JSON are decoded |
| ``inputdataconfig.json``  | ``read_input_data_config`` | object of objects, keyed by channel |
| ``resourceconfig.json``   | ``read_resource_config``  | object (validated by ``trainenv.cluster``) |
| ``trainenv.yaml``         | ``read_file_settings``    | mapping of launch settings (``trainenv.settings``) |

Every reader is bounded, so hostile input ends as a ``ConfigError``, never as a crash, a hang
or unbounded memory: a file may hold at most ``MAX_CONFIG_BYTES`` (``trainenv.yaml``:
``MAX_SETTINGS_BYTES``); data may nest at most ``MAX_DEPTH`` levels (the top-level object is
level 1; a hyperparameter string holding JSON counts from where it sits); and ``trainenv.yaml``
may hold at most ``MAX_YAML_NODES`` values once every alias is expanded, and no alias that
refers to a value containing it (a "billion laughs" file is refused while it is read).
"""

from __future__ import annotations

import json
import os
import re

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterable

    from yaml import Node, SafeLoader

from trainenv.errors import ConfigError, shown

MAX_CONFIG_BYTES = 10 * 1024 * 1024
MAX_SETTINGS_BYTES = 1024 * 1024
MAX_NAME_LENGTH = 256
MAX_DEPTH = 100
MAX_YAML_NODES = 10_000
TOO_DEEP = f"nested too deeply: more than {MAX_DEPTH} levels (the limit for config data)"

# Hyperparameter names: what argparse, Hydra and env-var normalization can all carry.
_HP_NAME = r"[A-Za-z0-9_+][A-Za-z0-9_.:+/\-]*\Z"  # patterns compile on first use (re caches them)
# Channel names become directory names below input/data and output/.
_CHANNEL_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z"

# Hyperparameters that platforms add for themselves, not for the user's script.
PLATFORM_HP_PREFIXES = ("sagemaker_",)
PLATFORM_HP_NAMES = frozenset({"_tuning_objective_metric"})


def read_bytes(path: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes | None:
    """The file's bytes, ``None`` if it does not exist; a ConfigError if unreadable or too big."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError.at(path, None, "is a directory, expected a file") from None
    except OSError as exc:
        raise ConfigError.at(path, None, f"cannot read: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise ConfigError.at(
            path, None, f"larger than {max_bytes // (1024 * 1024)} MiB; keep large data in an input channel"
        )
    return data


def decode_text(path: str, data: bytes) -> str:
    """UTF-8, a leading byte order mark dropped (as ``utf-8-sig`` does, without loading that codec)."""
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + len(data) - len(body)  # the offset in the file, the mark included
        raise ConfigError.at(path, None, f"not valid UTF-8 (byte {at}: {data[at:at + 1]!r})") from None


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(Exception):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(path: object, text: str) -> Any:
    """Parse strict JSON (no NaN/Infinity); errors name the file with line and column.

    Duplicate keys, numbers out of float range and integers too long to convert are errors.
    """
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_not_json_constant, parse_float=_finite_float
        )
    except json.JSONDecodeError as exc:
        raise ConfigError.at(path, None, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise ConfigError.at(path, str(exc.args[0]), "key appears more than once") from None
    except RecursionError:
        raise ConfigError.at(path, None, TOO_DEEP) from None
    except ValueError as exc:  # parse_float/parse_constant, and int()'s digit limit
        raise ConfigError.at(path, _locate_bad_number(text), f"invalid JSON value: {str(exc)[:80]}") from None


class _BadNumber:
    pass


def _locate_bad_number(text: str) -> str | None:
    """The key path of the first NaN, Infinity, out-of-range or over-long number, if found."""

    def number(kind: type) -> Any:
        def parse(literal: str) -> Any:
            try:
                value = kind(literal)
            except ValueError:
                return _BadNumber()
            return _BadNumber() if value in (float("inf"), float("-inf")) else value

        return parse

    try:
        data = json.loads(text, parse_constant=lambda _: _BadNumber(), parse_float=number(float), parse_int=number(int))
    except (ValueError, RecursionError):
        return None

    def find(value: Any, where: str) -> str | None:
        if isinstance(value, _BadNumber):
            return where or "(top level)"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, inner in items:
            found = find(inner, f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None

    return find(data, "")


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Levels of lists and dicts in ``value`` (a scalar is 0), counted up to ``limit + 1``.

    Iterative, so it never recurses however deep the data is; it stops once past ``limit``.
    """
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, (list, tuple)):
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((inner, level + 1) for inner in item)
    return deepest


def check_depth(source: object, value: Any, limit: int = MAX_DEPTH) -> None:
    """A ConfigError naming the top-level key under which ``value`` nests deeper than ``limit``."""
    if nesting_depth(value, limit) <= limit:
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            if nesting_depth(inner, limit - 1) > limit - 1:
                raise ConfigError.at(source, shown(key), TOO_DEEP)
    raise ConfigError.at(source, None, TOO_DEEP)


def check_launchable(source: object, key: object, value: Any) -> None:
    """Every string inside ``value`` must survive ``exec``: no NUL, valid UTF-8 (no lone surrogates)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError.at(source, shown(key), "contains a NUL character, which no argument or variable can carry")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError.at(source, shown(key), "contains an invalid Unicode character (a lone surrogate)") from None
    elif isinstance(value, dict):
        for inner_key, inner in value.items():
            check_launchable(source, inner_key, inner_key)
            check_launchable(source, inner_key, inner)
    elif isinstance(value, list):
        for inner in value:
            check_launchable(source, key, inner)


def read_json_object(path: str) -> dict[str, Any] | None:
    """A JSON file whose top level must be an object; ``None`` when the file is absent."""
    data = read_bytes(path)
    if data is None:
        return None
    value = parse_json(path, decode_text(path, data))
    if not isinstance(value, dict):
        raise ConfigError.at(path, None, f"top level must be a JSON object, got {type(value).__name__}")
    check_depth(path, value)
    return value


def decode_hyperparameter(value: Any, source: object = "hyperparameters", key: object = None) -> Any:
    """PAI and SageMaker write every value as a string: ``"0.1"`` → 0.1, ``"[1,2]"`` → [1, 2].

    A string that parses as JSON is decoded (one level); any other string is kept as is.
    ``"NaN"``, ``"Infinity"`` and ``"1e999"`` stay strings: they are not finite JSON numbers.
    JSON nested deeper than a hyperparameter may be (``MAX_DEPTH`` - 1 levels) is a
    ``ConfigError`` naming ``source`` and ``key``.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text or text[0] not in '-0123456789tfn"[{':
        return value
    try:
        decoded = json.loads(text, parse_constant=_not_json_constant, parse_float=_finite_float)
    except ValueError:
        return value
    except RecursionError:
        pass
    else:
        if nesting_depth(decoded, MAX_DEPTH - 1) <= MAX_DEPTH - 1:
            return decoded
    raise ConfigError.at(source, shown(key) if key is not None else None, TOO_DEEP)


def check_hyperparameter_name(source: object, name: str) -> None:
    if not isinstance(name, str) or not re.match(_HP_NAME, name) or len(name) > MAX_NAME_LENGTH:
        raise ConfigError.at(
            source, shown(name), "invalid hyperparameter name: use ASCII letters, digits and _ . - : + / (no spaces, '=' or control characters)"
        )


def is_platform_hyperparameter(name: str) -> bool:
    return name in PLATFORM_HP_NAMES or name.startswith(PLATFORM_HP_PREFIXES)


def read_hyperparameters(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(user hyperparameters, platform parameters)`` in file order, values decoded.

    Platform parameters are the ``sagemaker_*`` keys (and ``_tuning_objective_metric``) that a
    platform adds for itself; they are kept apart so they never reach the script's argv.
    """
    raw = read_json_object(path) or {}
    user: dict[str, Any] = {}
    platform: dict[str, Any] = {}
    for name, value in raw.items():
        check_hyperparameter_name(path, name)
        check_launchable(path, name, value)
        target = platform if is_platform_hyperparameter(name) else user
        target[name] = decode_hyperparameter(value, path, name)
    return user, platform


def check_channel_name(source: object, name: object) -> str:
    """A channel name must stay a single directory name below ``input/data``."""
    if (
        not isinstance(name, str)
        or not re.match(_CHANNEL_NAME, name)
        or ".." in name
        or len(name) > MAX_NAME_LENGTH
    ):
        raise ConfigError.at(
            source, shown(name), "invalid channel name: use ASCII letters, digits and _ . - (no '/', '..', NUL or newline)"
        )
    return name


def read_input_data_config(path: str) -> dict[str, Any]:
    """``{channel: {ContentType, TrainingInputMode, ...}}``; empty when the file is absent."""
    raw = read_json_object(path) or {}
    for name, value in raw.items():
        check_channel_name(path, name)
        if not isinstance(value, dict):
            raise ConfigError.at(path, name, f"must be a JSON object, got {type(value).__name__}")
        check_launchable(path, name, value)
    return raw


def read_resource_config(path: str) -> dict[str, Any] | None:
    """SageMaker's ``{current_host, hosts, network_interface_name, ...}``; ``None`` if absent."""
    value = read_json_object(path)
    if value is not None:
        for key, inner in value.items():
            check_launchable(path, key, inner)
    return value


def list_channel_dirs(data_dir: str) -> list[str]:
    """Names of the directories directly below ``input/data`` (sorted), each validated.

    A link to a directory is a channel; a dangling link or a symlink loop is not one (and is
    never followed further). Nothing below a channel is read.
    """
    try:
        entries = list(os.scandir(data_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise ConfigError.at(data_dir, None, f"cannot list: {exc.strerror}") from None
    names = [entry.name for entry in entries if is_dir_entry(entry) and not is_ignored_dir(entry.name)]
    for name in names:
        check_channel_name(data_dir, name)
    return sorted(names)


def is_dir_entry(entry: os.DirEntry[str]) -> bool:
    """A directory, or a link that resolves to one; ``False`` for a symlink loop or dangling link."""
    try:
        return entry.is_dir()
    except OSError:  # ELOOP: a symlink loop
        return False


def is_ignored_dir(name: str) -> bool:
    """Dirs a mounted volume brings that are no channel: ``lost+found`` and hidden ones."""
    return name.startswith(".") or name == "lost+found"


class _OverLimit(Exception):
    """A ``trainenv.yaml`` past one of the loader's bounds: ``(problem, line)``."""


def _bounded_loader() -> type[SafeLoader]:
    """PyYAML's ``SafeLoader``, bounded while it composes, before anything is constructed.

    It keeps a running count of the values the document stands for once aliases are expanded
    (each node once, each alias as the size of what it names) and how deep each node nests;
    past ``MAX_YAML_NODES`` or ``MAX_DEPTH``, or on an alias to a node that contains it,
    loading stops at once. Composing reads each alias once, so memory stays small.
    """
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.composing = 0
            self.values = 0  # values so far, aliases expanded
            self.extent: dict[int, tuple[int, int]] = {}  # id(node) -> (values once expanded, levels)

        def count(self, values: int, line: int) -> None:
            self.values += values
            if self.values > MAX_YAML_NODES:
                raise _OverLimit(f"more than {MAX_YAML_NODES} values once its aliases are expanded (the limit for trainenv.yaml)", line)

        def compose_node(self, parent: Node | None, index: Any) -> Node | None:
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                if target is not None:
                    if id(target) not in self.extent:
                        raise _OverLimit(f"alias *{event.anchor} refers to a value that contains it", line)
                    self.count(self.extent[id(target)][0], line)
                return super().compose_node(parent, index)
            self.count(1, line)
            self.composing += 1
            if self.composing > MAX_DEPTH + 1:  # a scalar inside MAX_DEPTH collections is fine
                raise _OverLimit(TOO_DEEP, line)
            node = super().compose_node(parent, index)
            self.composing -= 1
            children: list[Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            extents = [self.extent[id(child)] for child in children]
            size = 1 + sum(extent[0] for extent in extents)
            levels = 0 if isinstance(node, yaml.ScalarNode) else 1 + max((extent[1] for extent in extents), default=0)
            if levels > MAX_DEPTH:
                raise _OverLimit(TOO_DEEP, line)
            self.extent[id(node)] = (size, levels)
            return node

    return BoundedLoader


def _yaml_culprit(text: str) -> str | None:
    """``key (line N)`` of the first top-level value PyYAML cannot construct, if it can tell."""
    try:
        import yaml

        loader = _bounded_loader()(text)
        try:
            node = loader.get_single_node()
            pairs = node.value if isinstance(node, yaml.MappingNode) else []
            for key_node, value_node in pairs:
                try:
                    loader.construct_object(value_node, deep=True)
                except Exception:  # noqa: BLE001 - locating the value that failed is all we want
                    return f"{getattr(key_node, 'value', '?')} (line {value_node.start_mark.line + 1})"
        finally:
            loader.dispose()
    except Exception:  # noqa: BLE001
        return None
    return None


def read_file_settings(paths: Iterable[str]) -> tuple[dict[str, Any], str | None]:
    """The launch settings of the first ``trainenv.yaml`` that exists, as a mapping, and its path.

    ``({}, None)`` when there is none; PyYAML is imported only when there is one.
    """
    for path in paths:
        data = read_bytes(path, MAX_SETTINGS_BYTES)
        if data is None:
            continue
        text = decode_text(path, data)
        import yaml  # deferred: only jobs that have a trainenv.yaml pay for it

        try:
            value = yaml.load(text, Loader=_bounded_loader())  # noqa: S506 - a SafeLoader
        except _OverLimit as exc:
            problem, line = exc.args
            raise ConfigError.at(path, f"line {line}", problem) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError.at(path, None, f"invalid YAML{where}: {problem}") from None
        except RecursionError:
            raise ConfigError.at(path, None, TOO_DEEP) from None
        except (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError) as exc:
            # PyYAML's constructors raise these for values like `2020-13-45` or `!!bool maybe`.
            raise ConfigError.at(path, _yaml_culprit(text), f"invalid YAML value ({type(exc).__name__}: {str(exc)[:60]})") from None
        if value is None:
            return {}, path
        if not isinstance(value, dict):
            raise ConfigError.at(path, None, f"top level must be a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise ConfigError.at(path, shown(key), "setting names must be strings")
        return value, path
    return {}, None
