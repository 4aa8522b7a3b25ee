"""Safe extraction of a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` source into a new dir.

Every member is checked before it is written: a member with an absolute path or a ``..``
part, a link pointing outside the dir (or absolute), a member written through a link, a device
file or fifo, a link inside a zip refuses the whole archive (``SourceError``), and whatever was
written is removed with the new dir. The total size is capped: the sizes the archive declares,
and for a zip also the bytes actually written (a member that decompresses to more than it
declares). A tar is read in one pass (stream mode: a compressed one is decompressed once, each
member checked as its header is read, before its data is written), about twice as fast as
listing the members first and extracting them in a second pass. A single top-level folder is
kept as it is, not stripped.
"""

from __future__ import annotations

import os
import posixpath

from trainenv.errors import SourceError

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from tarfile import TarInfo
    from typing import Iterable, Iterator

_CHUNK = 1 << 20


def _member_path(name: str) -> str:
    """The member's normalized relative path, or ``""`` when it would land outside the dir."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return ""
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return ""
    return posixpath.normpath(name.replace("\\", "/"))


def _refuse(archive: str, member: str, problem: str, setting: str) -> SourceError:
    return SourceError(f"{setting}: {archive}: member {member!r} {problem}; nothing was extracted")


def _too_big(archive: str, max_bytes: int, setting: str, how: str = "") -> SourceError:
    return SourceError(f"{setting}: {archive}: over {max_bytes} bytes once extracted{how} (TRAINENV_SOURCE_MAX_BYTES); nothing was extracted")


def _inside(path: str) -> bool:
    return path not in ("", "..") and not path.startswith(("../", "/"))


def _checked(archive: str, members: Iterable[TarInfo], max_bytes: int, setting: str, into: str) -> Iterator[TarInfo]:
    """Each member, handed on (to be written) only once it passed the checks, in archive order."""
    links: set[str] = set()
    total = 0
    for member in members:
        path = _member_path(member.name)
        if not path:
            raise _refuse(archive, member.name, f"would land outside {into}", setting)
        if any(path == link or path.startswith(link + "/") for link in links):
            raise _refuse(archive, member.name, "is written through a link", setting)
        if member.issym() or member.islnk():
            target = member.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target)) if member.issym() else _member_path(target)
            if target.startswith("/") or not _inside(resolved):
                raise _refuse(archive, member.name, f"links to {target!r}, outside {into}", setting)
            links.add(path)
        elif not (member.isfile() or member.isdir()):
            raise _refuse(archive, member.name, "is a device file or fifo", setting)
        total += max(0, member.size)
        if total > max_bytes:
            raise _too_big(archive, max_bytes, setting)
        yield member


def _extract_tar(archive: str, dest: str, max_bytes: int, setting: str, into: str) -> None:
    import tarfile

    with tarfile.open(archive, "r|*") as tar:  # one pass: each member checked before it is written
        tar.extractall(dest, members=_checked(archive, tar, max_bytes, setting, into), filter="data")


def _extract_zip(archive: str, dest: str, max_bytes: int, setting: str, into: str) -> None:
    import stat
    import zipfile

    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        declared = 0
        for info in infos:
            mode = info.external_attr >> 16
            if not _member_path(info.filename):
                raise _refuse(archive, info.filename, f"would land outside {into}", setting)
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _refuse(archive, info.filename, "is a link, device file or fifo", setting)
            declared += info.file_size
            if declared > max_bytes:
                raise _too_big(archive, max_bytes, setting)
        written = 0
        for info in infos:
            target = os.path.join(dest, _member_path(info.filename))
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with bundle.open(info) as source, open(target, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise _too_big(archive, max_bytes, setting, ", more than it declares")
                    sink.write(chunk)
            if stat.S_IMODE(info.external_attr >> 16) & 0o111:
                os.chmod(target, 0o755)


def extract_archive(archive: str, dest: str, max_bytes: int, *, setting: str = "TRAINENV_SOURCE", into: str = "the code dir") -> None:
    """Extract ``archive`` into the new dir ``dest``; refuse it whole (``SourceError``) when unsafe.

    On any failure ``dest`` is removed again. Messages name ``setting`` (the variable that gave
    the archive) and ``into`` (what ``dest`` is).
    """
    import shutil
    import tarfile
    import zipfile

    if not os.path.isfile(archive):
        raise SourceError(f"{setting}: {archive!r} is not a file")
    os.makedirs(dest)
    try:
        if archive.lower().endswith(".zip"):
            _extract_zip(archive, dest, max_bytes, setting, into)
        else:
            _extract_tar(archive, dest, max_bytes, setting, into)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise SourceError(f"{setting}: {archive}: cannot extract: {exc}") from None
    except BaseException:  # refused (SourceError), or stopped by a signal: nothing half-written stays
        shutil.rmtree(dest, ignore_errors=True)
        raise
