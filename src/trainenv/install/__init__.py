"""Install the job's requirements into the entry point's interpreter (exit 69 on failure).

Usage (the launcher, once per node, before it starts the entry point)::

    result = install_requirements(
        InstallRequest(python="/opt/venv/bin/python", requirements_file=code_dir / "requirements.txt",
                       extra_requirements=("einops==0.8.0",), cwd=code_dir, env=child_env),
        log=logger.info,
    )
    # result.installer in {"uv", "pip", "skipped", "none"}; InstallError on failure (exit 69)

**What runs.** Nothing at all when there is no requirements file, the file holds only comments
and options and there are no extra requirements: the result is ``"none"``. Nothing either when
the same requirements were installed in this container before and are still there:
``"skipped"``. Otherwise one installer command, uv or pip (chosen by ``TRAINENV_INSTALLER``),
with pip's settings (``PIP_*``, ``pip.conf``) carried over to uv.

**Falling back from uv to pip** (``auto`` only, and only if the target has pip), with one log
line, when uv could not start or died of a signal, or its output shows a uv-specific refusal.
pip's verdict is then the final one.

**Retry.** A failed install whose output shows a network error and no local error is run once
more, and the retry is logged. pip reports an unreachable index as "No matching distribution",
so the network signs decide, not that line. A requirement that simply does not exist is not
retried. Both installers retry requests themselves first (pip ``--retries``, default 5; uv
``UV_HTTP_RETRIES``, default 3).

One module a concern, each with the details in its docstring:

| module | concern |
|---|---|
| ``requirements`` | reading requirements files and extra requirements (pure) |
| ``installers`` | ``TRAINENV_INSTALLER``, finding uv, the commands, probing the target interpreter |
| ``pip_to_uv`` | pip's settings translated for uv, and pip's index semantics |
| ``marker`` | the skip marker: fingerprint, private marker dir, lock |
| ``run`` | running one command in its own process group; SIGTERM/SIGINT during the install |
| ``report`` | reading the output: what is logged, redaction, retry signs, the error message |

Importing this package loads none of them; ``install_requirements`` imports what its path
needs (the "none" path reads one file; the "skipped" path adds a hash and a few ``stat`` calls),
and ``find_uv``, ``pip_settings``, ``uv_environment``, ``default_marker_dir`` and
``INSTALLER_VARIABLE`` are loaded from their modules when first imported from this package.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path
    from typing import Any, Callable, Mapping

    from trainenv.install.report import Attempt
    from trainenv.install.run import StopSignals

from trainenv.errors import InstallError
from trainenv.frozen import frozen

__all__ = [
    "InstallRequest", "InstallResult", "install_requirements",
    "INSTALLER_VARIABLE", "default_marker_dir", "find_uv", "pip_settings", "uv_environment",
]
# The other public names, each loaded from its module on first use (``__getattr__``).
_LAZY = {
    "INSTALLER_VARIABLE": "installers", "find_uv": "installers", "default_marker_dir": "marker",
    "pip_settings": "pip_to_uv", "uv_environment": "pip_to_uv",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


@frozen
class InstallRequest:
    """What to install, into which interpreter, from where and with which environment."""

    python: str
    requirements_file: Path | None
    extra_requirements: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    marker_dir: Path | None = None
    installer: str = ""  # auto, uv or pip (the launch setting); empty: read TRAINENV_INSTALLER from env


@frozen
class InstallResult:
    """``installer``: ``"uv"``, ``"pip"``, ``"skipped"`` or ``"none"``; ``packages``: new names."""

    installer: str
    seconds: float
    packages: tuple[str, ...] = ()


def install_requirements(request: InstallRequest, log: Callable[[str], None]) -> InstallResult:
    """Install ``request``'s requirements unless there are none or they are installed already.

    Raises ``InstallError`` (with ``.tail``) when the install fails, ``ConfigError`` for a bad
    ``TRAINENV_INSTALLER`` or extra requirement, and ``SignalError`` (exit 128+N) when trainenv
    receives SIGTERM or SIGINT meanwhile. See the package docstring.
    """
    from trainenv.install.installers import installer_mode, resolve_python
    from trainenv.install.requirements import clean_extras, read_requirements

    started = time.monotonic()
    mode = request.installer or installer_mode(request.env)
    extras = clean_extras(request.extra_requirements)
    text, wanted = read_requirements(request.requirements_file, extras)
    if not wanted:
        return InstallResult("none", time.monotonic() - started)

    from trainenv.install import marker as markers

    python = resolve_python(request.python, request.env)
    key = markers.fingerprint(request.requirements_file, text, extras, python)
    chain = markers.marker_chain(request.marker_dir)
    marker = chain[-1] / f"{key}.json"
    if all(markers.trusted_dir(directory) for directory in chain) and markers.marker_holds(marker, key):
        seconds = time.monotonic() - started
        log(f"requirements already installed in this container ({marker}); skipping ({seconds * 1000:.0f} ms)")
        return InstallResult("skipped", seconds)

    from trainenv.install.run import StopSignals

    usable = markers.ensure_marker_dir(chain)
    if not usable:
        log(f"marker directory {chain[-1]} is not private to this user; installing without a skip marker")
    with StopSignals() as stops:
        lock = markers.lock(chain[-1] / f"{key}.lock", stops.check, log) if usable else None
        try:
            if usable and markers.marker_holds(marker, key):
                seconds = time.monotonic() - started
                log(f"requirements installed meanwhile by another launcher ({marker}); skipping")
                return InstallResult("skipped", seconds)
            if usable and marker.exists():
                log("site-packages changed since these requirements were installed; installing again")
            result, info = _install(request, python, text, extras, mode, log, started, stops)
            if usable:
                markers.record(marker, key, result.installer, python, info, result.packages, log)
            return result
        finally:
            if lock is not None:
                lock.close()


def _install(
    request: InstallRequest,
    python: str,
    text: bytes | None,
    extras: tuple[str, ...],
    mode: str,
    log: Callable[[str], None],
    started: float,
    stops: StopSignals,
) -> tuple[InstallResult, dict[str, Any]]:
    """Run the installer (with fallback and retry); the result and the target's probe info."""
    import os

    from trainenv.install import installers
    from trainenv.install.pip_to_uv import uv_environment
    from trainenv.install.report import credentials_in, failure, summary
    from trainenv.redact import redact_text, secret_values

    env = request.env
    requirement_text = text.decode("utf-8", "replace") if text is not None else ""
    secrets = secret_values(env)
    secrets += [s for s in credentials_in(list(env.values()) + [requirement_text, *extras]) if s not in secrets]
    secrets.sort(key=len, reverse=True)

    variable = installers.INSTALLER_VARIABLE
    uv = installers.find_uv(env) if mode != "pip" else None
    if mode == "uv" and uv is None:
        raise InstallError(
            f"requirements install failed: {variable}=uv but uv is neither on PATH nor "
            f"importable; install uv in the image or set {variable}=auto"
        )
    info = installers.probe(python, env, secrets)
    stops.check()
    if uv is None and not info.get("pip"):
        why = f"{variable}=pip" if mode == "pip" else "uv was not found"
        raise InstallError(
            f"requirements install failed: the target python {python} has no pip module ({why}); "
            "install pip into that interpreter (python -m ensurepip) or put uv in the image"
        )

    sources = []
    path = request.requirements_file if text is not None else None  # None: nothing for -r
    if path is not None:
        sources.append(os.path.basename(path))
    if extras:
        sources.append(f"{len(extras)} extra")
    args = (["-r", os.path.abspath(path)] if path is not None else []) + list(extras)
    added, flags = uv_environment(env, info.get("prefix")) if uv is not None else ({}, [])

    installer = "uv" if uv is not None else "pip"
    log(
        f"installing requirements ({' + '.join(sources)}) into {python} "
        f"(Python {info.get('version', '?')}) with {installer}"
    )
    if installer == "uv" and (added or flags):
        log(f"uv: pip's settings passed on as {', '.join(sorted(added) + flags)}")
    retried = False
    while True:
        if installer == "uv" and uv is not None:
            argv, child_env = installers.uv_command(uv, python, flags, args, env, added)
        else:
            argv, child_env = installers.pip_command(python, args, env)
        attempt = _run(installer, argv, str(request.cwd), child_env, secrets, log, stops)
        stops.check(attempt.tail_text())
        if attempt.returncode == 0:
            break
        if installer == "uv" and mode == "auto" and info.get("pip") and (attempt.crashed or attempt.uv_specific):
            log(f"uv could not do this install ({summary(attempt)}); falling back to pip")
            installer = "pip"
            continue
        if attempt.network and not attempt.local and not retried and not attempt.crashed:
            retried = True
            log(f"{installer} failed with a network error ({attempt.network}); retrying once")
            continue
        raise failure(attempt, retried)

    seconds = time.monotonic() - started
    packages = tuple(dict.fromkeys(attempt.packages))
    new = f"{len(packages)} new: {', '.join(packages)}" if packages else "nothing new"
    log(redact_text(f"requirements installed with {installer} in {seconds:.1f} s ({new})", secrets))
    return InstallResult(installer, seconds, packages), info


def _run(installer: str, argv: list[str], cwd: str, env: Mapping[str, str], secrets: list[str],
         log: Callable[[str], None], stops: StopSignals) -> Attempt:
    """One run of the installer: its output read into an ``Attempt`` and logged as it comes."""
    from trainenv.install.report import Attempt
    from trainenv.install.run import run_installer

    attempt = Attempt(installer, secrets)

    def on_line(line: str) -> None:
        shown = attempt.read(line)
        if shown is not None:
            log(shown)

    def on_stop(what: str) -> None:
        log(f"{what}: stopping {installer}")

    finished = run_installer(argv, cwd, env, on_line, stops, on_stop)
    attempt.returncode, attempt.start_error = finished.returncode, finished.start_error
    return attempt
