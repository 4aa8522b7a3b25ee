"""Conda packs (``TRAINENV_CONDA_PACK``): a conda-pack archive whose interpreter runs the job.

A conda pack is an environment packed by conda-pack (an OCI Data Science ``CONDA_ENV_*`` pack
the platform fetched, say): a local ``.tar.gz``/``.tgz`` of a prefix with ``bin/python`` and
``bin/conda-unpack``. ``plan_pack`` (pure; called by the plan) names its prefix,
``<run dir's parent>/conda/<first 16 hex digits of the pack's sha256>`` (``$TRAINENV_RUN_DIR``,
default ``$TMPDIR/trainenv-<uid>``), so every job on the node with the same pack shares one
prefix and a second run finds it ready. The requirements install and the job both run
``<prefix>/bin/python``, with ``<prefix>/bin`` first on ``PATH`` and ``CONDA_PREFIX`` set, as
``conda activate`` would.

``unpack`` (the runner, after ``--dry-run`` returns and before the install, on every node) makes
the prefix once. conda-unpack rewrites the pack's placeholder prefix to the dir it runs in (its
own location), so the pack is extracted, and conda-unpack run, in the dir where it stays:
``<sha>.<random>/env`` beside the prefix. Only then is the prefix published, in one atomic step:
the symlink ``<sha>`` → ``<sha>.<random>/env``. A crash halfway leaves an unlinked dir no run
trusts (safe to delete); of two jobs unpacking the same pack at once, the first link wins and the
other discards its copy. The archive goes through the checks of ``trainenv.sources.archive`` (no
member outside the prefix, no link out, no device, ``TRAINENV_SOURCE_MAX_BYTES``); a pack
without ``bin/python``, or a failing conda-unpack (its last error lines, redacted), is a
``SourceError`` (69) and publishes nothing.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Mapping

from trainenv.errors import ConfigError, SourceError, shown
from trainenv.frozen import frozen

PACK_SUFFIXES = (".tar.gz", ".tgz")
PLATFORM_SCHEMES = ("s3://", "oci://", "gs://")
SETTING = "TRAINENV_CONDA_PACK"
_TAIL_LINES = 5
_CHUNK = 1 << 20


def parse_pack(value: str) -> str:
    """The setting's value: a local ``.tar.gz``/``.tgz`` path (``ValueError`` saying what is expected)."""
    path = value.strip()
    if path.lower().startswith(PLATFORM_SCHEMES):
        scheme = path.split(":", 1)[0]
        raise ValueError(f"the platform fetches {scheme}:// packs, not trainenv; point {SETTING} at the local copy it made")
    if not path.lower().endswith(PACK_SUFFIXES):
        raise ValueError(f"expected a conda-pack archive: a local {' or '.join(PACK_SUFFIXES)} file")
    return path


@frozen
class CondaPack:
    """A conda pack of the plan: the archive, the prefix it is unpacked to, and where it was set."""

    archive: str  # absolute path
    prefix: str  # <conda dir>/<sha16>: the symlink to the unpacked environment
    source: str  # the flag, variable or file key that set it

    @property
    def python(self) -> str:
        return os.path.join(self.prefix, "bin", "python")

    def environ(self, path: str) -> dict[str, str]:
        """The variables ``conda activate`` would set: ``<prefix>/bin`` before ``path``, ``CONDA_PREFIX``."""
        bin_dir = os.path.join(self.prefix, "bin")
        return {"PATH": bin_dir + (os.pathsep + path if path else ""), "CONDA_PREFIX": self.prefix}


def plan_pack(value: str, source: str, python_source: str | None, run_parent: str) -> CondaPack:
    """The plan's conda pack for the setting's ``value`` (reads the archive once, to hash it).

    A missing file, or an interpreter also chosen by the ``python`` setting (``python_source``),
    is a ``ConfigError`` naming the sources.
    """
    from trainenv.layout import absolute_path

    if python_source is not None:
        raise ConfigError(
            f"both an interpreter ({python_source}) and a conda pack ({source}) are set; "
            "the pack's bin/python is the job's interpreter: use one"
        )
    archive = absolute_path(value.strip())
    if not os.path.isfile(archive):
        problem = "is a directory, expected a file" if os.path.isdir(archive) else "does not exist"
        raise ConfigError.at(source, None, f"{shown(value)}: {archive} {problem}")
    try:
        digest = _sha256(archive)
    except OSError as exc:
        raise ConfigError.at(source, None, f"{shown(value)}: cannot read {archive}: {exc.strerror or exc}") from None
    return CondaPack(archive, os.path.join(run_parent, "conda", digest[:16]), source)


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _ready(prefix: str) -> bool:
    return os.path.isfile(os.path.join(prefix, "bin", "python"))


def _own_dir(path: str) -> None:
    """Create ``path`` (mode 0700) if missing; a link, another user's dir or one others can write
    to is a ``ConfigError`` (its environments run as the job)."""
    import stat

    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"{SETTING}: cannot create {exc.filename or path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{SETTING}: {path} must be a dir of this user's that others cannot write to (the unpacked packs run as the job); "
            "remove it, or set TRAINENV_RUN_DIR to a dir of this user's"
        )


def unpack(
    pack: CondaPack, environ: Mapping[str, str], max_bytes: int, info: Callable[[str], None] = lambda line: None
) -> None:
    """Make ``pack.prefix`` (once per node): extract, run ``bin/conda-unpack``, link atomically.

    ``environ`` is the job's environment; conda-unpack runs in it, with the new environment
    activated. Any failure removes this run's copy and raises ``SourceError`` (69).
    """
    import shutil
    import tempfile
    import time

    root = os.path.dirname(pack.prefix)
    _own_dir(root)
    if _ready(pack.prefix):
        info(f"conda pack {pack.archive}: already unpacked at {pack.prefix}")
        return
    if os.path.islink(pack.prefix):  # a link to an environment that is gone: unpack again
        try:
            os.unlink(pack.prefix)
        except FileNotFoundError:
            pass
    elif os.path.lexists(pack.prefix):
        raise ConfigError(f"{SETTING}: {pack.prefix} is in the way of the unpacked pack (trainenv makes it a link): remove it")
    started = time.monotonic()
    info(f"unpacking conda pack {pack.archive} into {pack.prefix}")
    staging = tempfile.mkdtemp(prefix=os.path.basename(pack.prefix) + ".", dir=root)
    try:
        home = os.path.join(staging, "env")
        _extract(pack, home, max_bytes)
        if not os.path.isfile(os.path.join(home, "bin", "python")):
            raise SourceError(f"{SETTING}: {pack.archive} has no bin/python: not a conda-pack archive of an environment with Python")
        script = os.path.join(home, "bin", "conda-unpack")
        if os.path.isfile(script):
            _conda_unpack(pack, script, home, environ)
        try:
            os.symlink(os.path.relpath(home, root), pack.prefix)
        except FileExistsError:  # another job on this node published the same pack first: use its copy
            if not _ready(pack.prefix):
                raise SourceError(f"{SETTING}: {pack.prefix} appeared meanwhile without bin/python") from None
            info(f"conda pack {pack.archive}: another job unpacked it first at {pack.prefix}")
        else:
            staging = ""  # published: it stays
            info(f"conda pack {pack.archive}: unpacked in {time.monotonic() - started:.1f} s")
    except OSError as exc:
        raise SourceError(f"{SETTING}: {pack.archive}: cannot unpack into {exc.filename or root}: {exc.strerror or exc}") from None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _extract(pack: CondaPack, home: str, max_bytes: int) -> None:
    from trainenv.sources.archive import extract_archive

    extract_archive(pack.archive, home, max_bytes, setting=SETTING, into="the prefix")


def _conda_unpack(pack: CondaPack, script: str, home: str, environ: Mapping[str, str]) -> None:
    """Run the pack's ``bin/conda-unpack`` in its new home; ``SourceError`` with its redacted last lines."""
    import signal
    import subprocess

    from trainenv.redact import redact_text

    env = dict(environ)
    bin_dir = os.path.join(home, "bin")
    env.update(PATH=bin_dir + os.pathsep + environ.get("PATH", os.defpath), CONDA_PREFIX=home)
    try:
        process = subprocess.Popen(
            [script], cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise SourceError(f"{SETTING}: {pack.archive}: cannot run bin/conda-unpack: {exc.strerror or exc}") from None
    with process:
        try:
            output, _ = process.communicate()
        except BaseException:  # a SIGTERM meanwhile: no helper outlives the unpack
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    if process.returncode != 0:
        lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()][-_TAIL_LINES:]
        tail = " | ".join(redact_text(line) for line in lines) or "no output"
        raise SourceError(f"{SETTING}: {pack.archive}: bin/conda-unpack exited with status {process.returncode}: {tail}")
