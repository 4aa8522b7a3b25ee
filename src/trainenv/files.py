"""Writing trainenv's own files whole or not at all: ``write_atomic``."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from os import PathLike


def write_atomic(path: str | PathLike[str], text: str, mode: int = 0o644) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it and ``os.replace``.

    A reader sees the old content or the new one, never half a file. ``mode`` is the new
    file's permission bits (less the umask): ``0o600`` for a file that may hold secrets. The
    parent dir must exist; on any error the temporary file is removed and the error raised.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        os.unlink(temporary)  # left by a crashed writer with our pid: start clean, mode included
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
