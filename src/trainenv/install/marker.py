"""The skip marker: requirements installed once in this container are not installed again.

After a successful install a marker file is written (atomically: a temporary file, then
``os.replace``) under the marker dir, default ``<tempfile.gettempdir()>/trainenv-<euid>/installed/``,
named by the sha256 of: the requirements file's bytes and those of the local files it includes
with ``-r``/``-c`` (recursively), the extra requirements, the interpreter path as given (a
venv's ``bin/python`` is a symlink to the base interpreter, so the realpath alone would
confuse venvs), its realpath and that file's size and mtime (which change when the interpreter
is replaced, without spawning it), and the venv's ``pyvenv.cfg`` version. The marker lists
every ``*.dist-info`` that was in the target's site-packages right after the install. The next
install with the same key is skipped only if all of those are still there (under 1 ms: a hash,
a few ``stat`` calls, one ``listdir``). A changed file reinstalls; a container restarted from
its image, whose site-packages was reset while ``/tmp`` survived (a Kubernetes ``emptyDir``),
reinstalls too.

The marker is container-local on purpose: the job's base dir may be a volume shared by every
node of the job (NFS, EFS, a PVC) and outlives the container, while each node installs into its
own container filesystem; a marker there would make node 1 skip because node 0 installed. The
marker dir is created with mode 0700 and ignored (install runs, no marker written) when it is a
symlink, owned by another user or group/world-writable, so nobody else can plant markers.
Concurrent launchers in one container serialize on a lock file next to the marker. Not
fingerprinted: the contents of local directories or wheels named in requirements.txt, and newer
versions appearing on an index for unpinned requirements. Delete the marker dir to force a
reinstall.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from io import BufferedRandom
    from typing import Any, Callable, Mapping

from trainenv.install.requirements import included_files

_MAX_INCLUDE_DEPTH = 10
_LOCK_POLL = 0.1


def default_marker_dir() -> Path:
    """``<tempdir>/trainenv-<euid>/installed``: container-local (see the module docstring)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"trainenv-{os.geteuid()}" / "installed"


def marker_chain(marker_dir: Path | None) -> list[Path]:
    """The directories that must be trusted: the default's ``trainenv-<euid>`` and itself."""
    if marker_dir is not None:
        return [Path(marker_dir)]
    leaf = default_marker_dir()
    return [leaf.parent, leaf]


def trusted_dir(path: Path) -> bool:
    """A real directory (not a symlink) of ours that nobody else can write to."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def ensure_marker_dir(chain: list[Path]) -> bool:
    """Create the marker dirs (mode 0700); whether they can be trusted."""
    for directory in chain:
        try:
            if directory is chain[-1]:
                directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return False
    return all(trusted_dir(directory) for directory in chain)


def marker_holds(path: Path, key: str) -> bool | None:
    """None: no marker. True: every distribution recorded after the install is still there."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("key") != key:
        return False
    dists = data.get("dists")
    if not isinstance(dists, dict) or not dists:
        return False
    for directory, names in dists.items():
        try:
            if not set(names) <= _dist_entries(directory):
                return False
        except (OSError, TypeError):
            return False
    return True


def record(
    marker: Path, key: str, installer: str, python: str, info: Mapping[str, Any], packages: tuple[str, ...],
    log: Callable[[str], None],
) -> None:
    """Write the skip marker; a failure only costs the next launch a reinstall."""
    try:
        dists = {d: sorted(_dist_entries(d)) for d in info.get("dirs", []) if os.path.isdir(d)}
        if not dists:
            return
        _write_marker(marker, {
            "key": key, "installer": installer, "python": python,
            "version": info.get("version"), "packages": list(packages), "dists": dists,
            "installed_at": time.time(),
        })
    except OSError as exc:
        log(f"could not write the install marker {marker}: {exc.strerror or exc}")


def lock(path: Path, check: Callable[[], None], log: Callable[[str], None]) -> BufferedRandom | None:
    """An exclusive ``flock`` on ``path``, released when the returned file is closed (None when
    the file cannot be opened). While another launcher holds it, ``check`` runs every 0.1 s and
    may raise (a stop signal) to give up waiting."""
    import fcntl

    try:
        handle = open(path, "a+b")
    except OSError:
        return None
    waiting = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if not waiting:
                log("another launcher is installing the same requirements; waiting for it")
                waiting = True
        except OSError:
            return handle
        try:
            check()
        except BaseException:
            handle.close()
            raise
        time.sleep(_LOCK_POLL)


def fingerprint(requirements_file: Path | None, text: bytes | None, extras: tuple[str, ...], python: str) -> str:
    """The marker's key (see the module docstring for what it covers)."""
    digest = hashlib.sha256()

    def add(label: str, value: bytes) -> None:
        digest.update(label.encode() + b"\0" + len(value).to_bytes(8, "big") + value)

    if text is not None and requirements_file is not None:
        add("requirements", text)
        seen = {os.path.realpath(requirements_file)}
        pending = [(text, Path(requirements_file).parent, 0)]
        while pending:
            content, base, depth = pending.pop()
            if depth >= _MAX_INCLUDE_DEPTH:
                continue
            for included in included_files(content.decode("utf-8", "replace"), base):
                real = os.path.realpath(included)
                if real in seen:
                    continue
                seen.add(real)
                try:
                    data = Path(real).read_bytes()
                except OSError:
                    add("include-missing:" + str(included), b"")
                    continue
                add("include:" + str(included), data)
                pending.append((data, included.parent, depth + 1))
    add("extras", "\0".join(extras).encode())
    real = os.path.realpath(python)
    info = os.stat(real)
    add("python", python.encode())
    add("python-real", real.encode())
    add("python-file", f"{info.st_size}:{info.st_mtime_ns}".encode())
    pyvenv = Path(python).parent.parent / "pyvenv.cfg"
    try:
        version = [ln for ln in pyvenv.read_text(encoding="utf-8").splitlines() if ln.startswith("version")]
    except (OSError, UnicodeDecodeError):
        version = []
    add("pyvenv-version", "\n".join(version).encode())
    return digest.hexdigest()


def _dist_entries(directory: str) -> set[str]:
    return {e for e in os.listdir(directory) if e.endswith((".dist-info", ".egg-info"))}


def _write_marker(path: Path, data: Mapping[str, Any]) -> None:
    from trainenv.files import write_atomic

    write_atomic(path, json.dumps(data, sort_keys=True))
