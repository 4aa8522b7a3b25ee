"""``python -m trainenv.runtimes.function TARGET [-- ARGS]``: call an entry function.

``TARGET`` is ``pkg.mod:func`` (imported from the code dir or the installed packages) or
``/path/file.py:func`` (imported under its own stem, so its ``if __name__ == "__main__"`` block
does not run). Without ``ARGS``, ``func(**hyperparameters)`` is called in this process, with the
snapshot's hyperparameters (``TRAINENV_ENV_FILE``), decoded: numbers stay numbers. With the
job's own arguments (``trainenv train -- ARGS``), they are read by OCI Data Science's
``ENTRY_FUNCTION`` rules instead (``ads_arguments``): ``--k v`` is the keyword ``k="v"``, a bare
``--k`` is ``k=None``, anything else is positional, every value a string; the hyperparameters are
not passed. ``sys.argv`` is the file or module, then those arguments (none without them).

| the function                          | exit status                                  |
|---------------------------------------|----------------------------------------------|
| returns                               | 0 (the value is ignored)                     |
| calls ``sys.exit(n)``                 | ``n``                                        |
| raises                                | 1, the traceback on stderr                   |
| cannot take its arguments             | 78, one ``trainenv: ConfigError: ...`` line  |

A hyperparameter the function has no parameter for (and no ``**kwargs``), a required parameter
no hyperparameter gives, a module that is not there or a name it does not define is trainenv's
``ConfigError``: the last stderr line starts with ``errors.CHILD_CONFIG_ERROR`` and the exit
status is 78, which the runner reports as a ``ConfigError`` (``trainenv.outcome``). The check
happens before the call, so the function never starts with arguments it cannot take.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType
    from typing import Any, Callable, Mapping

from trainenv.errors import CHILD_CONFIG_ERROR, EXIT_CONFIG, ConfigError

_MODULE = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"  # compiled on first use (re caches it)


def parse_target(entry: str) -> tuple[str, str] | None:
    """``(module or .py path, function name)`` of ``pkg.mod:func`` / ``file.py:func``, else None."""
    import re

    where, colon, name = entry.rpartition(":")
    if not colon or not re.fullmatch(_MODULE, name):
        return None
    if where.endswith(".py") or re.fullmatch(_MODULE, where):
        return where, name
    return None


def import_target(where: str) -> ModuleType:
    """The module ``where`` names: a ``.py`` file under its stem, else a module by name."""
    import importlib

    if where.endswith(".py"):
        import importlib.util

        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ConfigError(f"entry function: {path} does not exist")
        stem = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(stem, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"entry function: cannot import {path}")
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # its sibling modules import as they would for a script
        module = importlib.util.module_from_spec(spec)
        sys.modules[stem] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (where == missing or where.startswith(missing + ".")):
            raise ConfigError(f"entry function: no module {where!r} in the code dir nor installed") from None
        raise  # the module itself failed to import something: the job's error


def find_function(module: ModuleType, where: str, name: str) -> Callable[..., Any]:
    value: Any = module
    for part in name.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"entry function: {where} has no {name!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ConfigError(f"entry function: {where}:{name} is a {type(value).__name__}, not a function")
    func: Callable[..., Any] = value
    return func


def ads_arguments(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """``(args, kwargs)`` from argv by ADS's rules: ``--k v`` → ``k="v"``, bare ``--k`` → ``None``.

    A token is a key when it starts with ``--`` and is longer than that (``--k=v`` is the key
    ``k=v``); a key takes the next token as its value unless that is a key too; the last value
    of a repeated key wins; everything else is positional, in order.
    """
    args: list[str] = []
    kwargs: dict[str, str | None] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--") and len(token) > 2:
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is not None and not (following.startswith("--") and len(following) > 2):
                kwargs[token[2:]] = following
                index += 1
            else:
                kwargs[token[2:]] = None
        else:
            args.append(token)
        index += 1
    return args, kwargs


def check_call(func: Callable[..., Any], label: str, args: list[Any], kwargs: Mapping[str, Any], source: str) -> None:
    """Raise ``ConfigError`` unless ``func(*args, **kwargs)`` binds (``source``: where they come from)."""
    import inspect

    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # no signature to read (a builtin): the call itself decides
    params = list(signature.parameters.values())
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in params if p.kind in by_name]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        for key in kwargs:
            if key not in names:
                raise ConfigError.at(source, key, f"{label}() has no parameter {key!r} (it takes: {', '.join(names) or 'none'})")
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError.at(source, None, f"{label}(): {exc}") from None


def check_interpreter(python: str, env: Mapping[str, str], cwd: str, source: str) -> None:
    """``ConfigError`` unless the job's interpreter can import trainenv, which runs the function.

    The runner calls it before launching, only when the job runs another interpreter than
    trainenv's own (``TRAINENV_PYTHON`` or a conda pack's) (~20 ms: the package is found, not imported).
    """
    from trainenv.interpreter import require_module

    require_module(
        python, "trainenv", env, cwd, python_source=source, source=source,
        missing=f"an entry function runs in trainenv's runtime, but {python} cannot import trainenv; "
        f"install trainenv in that environment ({source} chose it)",
    )


def main(argv: list[str]) -> int:
    """Import the target, check and call it; exit statuses as in the module docstring."""
    from trainenv.environment import training_env
    from trainenv.frozen import plain
    from trainenv.layout import JobTree

    try:
        target = parse_target(argv[0]) if argv and (len(argv) == 1 or argv[1] == "--") else None
        if target is None:
            raise ConfigError(f"usage: python -m trainenv.runtimes.function pkg.mod:func|file.py:func [-- ARGS] (got {argv!r})")
        where, name = target
        args: list[Any] = []
        kwargs: dict[str, Any]
        if len(argv) > 1:
            args, kwargs = ads_arguments(argv[2:])
            source = "the job's arguments"
        else:
            env = training_env()
            kwargs = plain(env.hyperparameters)
            source = JobTree(env.base_dir).hyperparameters_file
        sys.argv = [where, *argv[2:]]  # what the job sees: its file or module, then its own arguments
        module = import_target(where)
        func = find_function(module, where, name)
        label = f"{os.path.basename(where) if where.endswith('.py') else where}:{name}"
        check_call(func, label, args, kwargs, source)
    except ConfigError as exc:
        sys.stderr.write(f"{CHILD_CONFIG_ERROR}{exc}\n")
        return EXIT_CONFIG
    func(*args, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
