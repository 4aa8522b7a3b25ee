"""Choosing the installer and knowing the target interpreter.

``TRAINENV_INSTALLER`` (read from the job's environment) chooses: ``auto`` (default: uv if
found, else pip), ``uv`` (uv or an ``InstallError``; never falls back) or ``pip`` (never uv).
Any other value is a ``ConfigError``.

* uv is ``uv`` on the ``PATH`` of the job's environment, else the binary of the ``uv`` Python
  package the launcher can import (``uv.find_uv_bin()``). It runs as
  ``uv pip install --python <python> [--no-index] -r <file> <extras...>``: ``--python`` names
  the target explicitly, so uv installs into it whether or not it is a venv (no ``--system``).
* pip runs as ``<python> -m pip install --disable-pip-version-check --no-input --progress-bar
  off -r <file> <extras...>`` with ``PYTHONUNBUFFERED=1``, so its lines arrive as printed.

The target interpreter is probed once (one ~20 ms spawn, in ``/`` so that a ``json.py`` in the
code dir cannot shadow the stdlib) for its version, prefix, site-packages dirs and whether it
has pip. One that does not exist or cannot run is an ``InstallError``.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Mapping, Sequence

from trainenv.errors import ConfigError, InstallError, shown
from trainenv.redact import redact_text

INSTALLER_VARIABLE = "TRAINENV_INSTALLER"
INSTALLER_CHOICES = ("auto", "uv", "pip")
_PROBE_TIMEOUT = 60.0
_PROBE_LINES = 40
_PROBE_LINE_CHARS = 300
_PROBE = (
    "import importlib.util, json, sys, sysconfig\n"
    "print(json.dumps({'version': sys.version.split()[0], 'prefix': sys.prefix,"
    " 'dirs': sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}),"
    " 'pip': importlib.util.find_spec('pip') is not None}))\n"
)


def installer_mode(env: Mapping[str, str]) -> str:
    """``auto``, ``uv`` or ``pip`` from ``TRAINENV_INSTALLER``; else a ``ConfigError``."""
    raw = env.get(INSTALLER_VARIABLE, "")
    mode = raw.strip().lower() or "auto"
    if mode not in INSTALLER_CHOICES:
        raise ConfigError.at(
            INSTALLER_VARIABLE, None, f"must be one of {', '.join(INSTALLER_CHOICES)}, got {shown(raw)}"
        )
    return mode


def find_uv(env: Mapping[str, str]) -> str | None:
    """``uv`` on ``env``'s PATH, else the binary of the ``uv`` package the launcher can import."""
    import shutil

    found = shutil.which("uv", path=env.get("PATH", os.defpath))
    if found:
        return found
    import importlib.util

    try:
        if importlib.util.find_spec("uv") is None:
            return None
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, OSError, ValueError):
        return None


def pip_command(python: str, args: Sequence[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """pip's argv and environment for ``args`` (``-r <file>`` and extras)."""
    argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--progress-bar", "off", *args]
    return argv, {**env, "PYTHONUNBUFFERED": "1"}


def uv_command(uv: str, python: str, flags: Sequence[str], args: Sequence[str], env: Mapping[str, str],
               added: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv's argv and environment: ``added`` holds pip's settings translated (``pip_to_uv``)."""
    return [uv, "pip", "install", "--python", python, *flags, *args], {**env, **added}


def resolve_python(python: str, env: Mapping[str, str]) -> str:
    """The target interpreter as an absolute path (a bare name is looked up on ``env``'s PATH)."""
    if not os.path.isabs(python):
        import shutil

        found = shutil.which(python, path=env.get("PATH", os.defpath))
        python = os.path.abspath(found or python)
    if not os.path.exists(python):
        raise InstallError(
            f"requirements install failed: the target python {python} does not exist; "
            "check the interpreter the entry point uses"
        )
    return python


def probe(python: str, env: Mapping[str, str], secrets: list[str]) -> dict[str, Any]:
    """Version, prefix, site-packages dirs and pip presence of the target interpreter."""
    import json
    import subprocess

    try:
        done = subprocess.run(
            [python, "-c", _PROBE], cwd=os.sep, env=dict(env), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=_PROBE_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(
            f"requirements install failed: cannot run the target python {python}: {exc}; "
            "check the interpreter the entry point uses"
        ) from None
    stderr = redact_text(done.stderr.decode("utf-8", "replace"), secrets)
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        info = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        raise InstallError(
            f"requirements install failed: the target python {python} did not start "
            f"(exit {done.returncode}): {last[0][:_PROBE_LINE_CHARS]}; check the interpreter the "
            "entry point uses",
            tail="\n".join(stderr.splitlines()[-_PROBE_LINES:]),
        )
    return info
