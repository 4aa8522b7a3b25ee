"""Asking the job's interpreter, before the job depends on it, whether it can import a module.

``require_module`` runs ``python -c`` with a probe that finds the module without importing it
(about 20 ms), in the job's environment and working dir. A module it cannot find, or an
interpreter that cannot run at all, is a ``ConfigError`` naming where the interpreter or the
need came from, so the job fails before it starts rather than halfway.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Mapping

from trainenv.errors import ConfigError, shown

_PROBE = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 3)"


def require_module(
    python: str, module: str, env: Mapping[str, str], cwd: str, *, python_source: str, source: str, missing: str
) -> None:
    """``ConfigError`` unless ``python`` can import ``module``: ``missing`` (naming ``source``)
    when the module is not there, a message naming ``python_source`` when ``python`` does not run."""
    import subprocess

    try:
        done = subprocess.run(
            [python, "-c", _PROBE, module], env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError.at(python_source, None, f"cannot run the interpreter {shown(python)}: {problem}") from None
    if done.returncode == 3:
        raise ConfigError.at(source, None, missing)
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or [f"exit status {done.returncode}"]
        raise ConfigError.at(python_source, None, f"the interpreter {shown(python)} does not start: {lines[-1]}")
