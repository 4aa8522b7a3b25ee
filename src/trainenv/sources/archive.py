"""Safe extraction of a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` source into a new dir.

Every member is checked before anything is written: a member with an absolute path or a ``..``
part, a link pointing outside the dir (or absolute), a member written through a link, a device
file or fifo, a link inside a zip refuses the whole archive (``SourceError``). The total size is capped: the sizes
the archive declares, and for a zip also the bytes actually written (a member that decompresses
to more than it declares). A single top-level folder is kept as it is, not stripped.
"""

from __future__ import annotations

import os
import posixpath

from trainenv.errors import SourceError

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from tarfile import TarInfo

_CHUNK = 1 << 20


def _member_path(name: str) -> str:
    """The member's normalized relative path, or ``""`` when it would land outside the dir."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return ""
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return ""
    return posixpath.normpath(name.replace("\\", "/"))


def _refuse(archive: str, member: str, problem: str) -> SourceError:
    return SourceError(f"TRAINENV_SOURCE: {archive}: member {member!r} {problem}; nothing was extracted")


def _too_big(archive: str, max_bytes: int, how: str = "") -> SourceError:
    return SourceError(f"TRAINENV_SOURCE: {archive}: over {max_bytes} bytes once extracted{how} (TRAINENV_SOURCE_MAX_BYTES); nothing was extracted")


def _inside(path: str) -> bool:
    return path not in ("", "..") and not path.startswith(("../", "/"))


def _check_tar(archive: str, members: list[TarInfo], max_bytes: int) -> None:
    links: set[str] = set()
    total = 0
    for member in members:
        path = _member_path(member.name)
        if not path:
            raise _refuse(archive, member.name, "would land outside the code dir")
        if any(path == link or path.startswith(link + "/") for link in links):
            raise _refuse(archive, member.name, "is written through a link")
        if member.issym() or member.islnk():
            target = member.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target)) if member.issym() else _member_path(target)
            if target.startswith("/") or not _inside(resolved):
                raise _refuse(archive, member.name, f"links to {target!r}, outside the code dir")
            links.add(path)
        elif not (member.isfile() or member.isdir()):
            raise _refuse(archive, member.name, "is a device file or fifo")
        total += max(0, member.size)
        if total > max_bytes:
            raise _too_big(archive, max_bytes)


def _extract_tar(archive: str, dest: str, max_bytes: int) -> None:
    import tarfile

    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        _check_tar(archive, members, max_bytes)
        tar.extractall(dest, members=members, filter="data")


def _extract_zip(archive: str, dest: str, max_bytes: int) -> None:
    import stat
    import zipfile

    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        declared = 0
        for info in infos:
            mode = info.external_attr >> 16
            if not _member_path(info.filename):
                raise _refuse(archive, info.filename, "would land outside the code dir")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _refuse(archive, info.filename, "is a link, device file or fifo")
            declared += info.file_size
            if declared > max_bytes:
                raise _too_big(archive, max_bytes)
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
                        raise _too_big(archive, max_bytes, ", more than it declares")
                    sink.write(chunk)
            if stat.S_IMODE(info.external_attr >> 16) & 0o111:
                os.chmod(target, 0o755)


def extract_archive(archive: str, dest: str, max_bytes: int) -> None:
    """Extract ``archive`` into the new dir ``dest``; refuse it whole (``SourceError``) when unsafe."""
    import tarfile
    import zipfile

    if not os.path.isfile(archive):
        raise SourceError(f"TRAINENV_SOURCE: {archive!r} is not a file")
    os.makedirs(dest)
    try:
        if archive.lower().endswith(".zip"):
            _extract_zip(archive, dest, max_bytes)
        else:
            _extract_tar(archive, dest, max_bytes)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise SourceError(f"TRAINENV_SOURCE: {archive}: cannot extract: {exc}") from None
