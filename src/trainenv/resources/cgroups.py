"""cgroup and scheduler readers: CPUs, memory limit, OOM and usage counters (see the package docstring)."""

from __future__ import annotations

import math
import os
import re
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Iterator

from trainenv.errors import ConfigError, shown
from trainenv.frozen import frozen


def debug(message: str, *args: object) -> None:
    """One debug line, when the process uses ``logging`` at all.

    A process that never imported ``logging`` configured no handler, so the record would be
    dropped anyway: importing it just to drop a line would cost milliseconds on every start.
    """
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.getLogger("trainenv.resources").debug(message, *args)


DEFAULT_CFS_PERIOD_US = 100_000
"""The kernel's CFS period when none is given (``cpu.max`` short form, v1 period file)."""

_READ_LIMIT = 64 * 1024
DIGITS = re.compile(r"[0-9]+", re.ASCII)
_SIGNED = r"-?[0-9]+"  # v1 only: compiled on first use (re caches it)


# ---------------------------------------------------------------------------------------
# Finding this process's cgroup directories


@frozen
class _Mount:
    """One cgroup hierarchy's mount: v1 (with its controllers) or v2."""

    version: int
    controllers: frozenset[str]
    root: str  # the cgroup path that the mount point shows (mountinfo field 4)
    point: str  # the mount point, already below the caller's ``root``


def _below(root: str, path: str) -> str:
    """``path`` (absolute, as the kernel prints it) inside the tree at ``root``."""
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def _read(path: str) -> str | None:
    """The text of a small kernel file; ``None`` when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read(_READ_LIMIT)
    except OSError as exc:
        if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            debug("cannot read %s: %s", path, exc)
        return None


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo_mounts(root: str) -> list[_Mount]:
    """The cgroup mounts listed in ``<root>/proc/self/mountinfo`` (lines it cannot parse are skipped)."""
    text = _read(_below(root, "/proc/self/mountinfo"))
    mounts = []
    for line in (text or "").splitlines():
        fields = line.split(" ")
        # id parent major:minor root point options [optional...] - fstype source superopts
        try:
            dash = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < dash + 2:
            continue
        fstype = fields[dash + 1]
        if fstype == "cgroup2":
            controllers: frozenset[str] = frozenset()
            version = 2
        elif fstype == "cgroup":
            options = fields[dash + 3] if len(fields) > dash + 3 else ""
            controllers = frozenset(options.split(","))
            version = 1
        else:
            continue
        mounts.append(_Mount(version, controllers, _unescape(fields[3]), _below(root, _unescape(fields[4]))))
    return mounts


def _conventional_mounts(root: str) -> list[_Mount]:
    """Where cgroups usually are, for trees without a mountinfo: ``/sys/fs/cgroup[/...]``."""
    base = _below(root, "/sys/fs/cgroup")
    mounts = []
    for point in (os.path.join(base, "unified"), base):
        if os.path.isdir(point):
            mounts.append(_Mount(2, frozenset(), "/", point))
    try:
        names = sorted(os.listdir(base))
    except OSError:
        names = []
    for name in names:
        point = os.path.join(base, name)
        if name != "unified" and os.path.isdir(point):
            mounts.append(_Mount(1, frozenset(name.split(",")), "/", point))
    return mounts


def _proc_cgroups(root: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; the v2 hierarchy's key is ``""``."""
    text = _read(_below(root, "/proc/self/cgroup"))
    paths: dict[str, str] = {}
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            paths[""] = path
        else:
            for controller in controllers.split(","):
                if controller:
                    paths.setdefault(controller, path)
    return paths


def _leaf(mount: _Mount, cgroup_path: str | None) -> str:
    """This process's cgroup directory in ``mount``, or the mount point when that is absent."""
    if cgroup_path is None:
        return mount.point
    path = os.path.normpath(cgroup_path)
    top = os.path.normpath(mount.root)
    if top == "/":
        relative = path.lstrip("/")
    elif path == top:
        relative = ""
    elif path.startswith(top + "/"):
        relative = path[len(top) + 1 :]
    else:
        relative = path.lstrip("/")
    if relative in ("", ".") or relative.startswith(".."):
        return mount.point
    candidate = os.path.join(mount.point, relative)
    return candidate if os.path.isdir(candidate) else mount.point


def _up_to(leaf: str, top: str) -> list[str]:
    """``leaf`` and its parents up to and including ``top``."""
    chain = [leaf]
    while leaf != top and leaf.startswith(top.rstrip("/") + "/"):
        leaf = os.path.dirname(leaf)
        chain.append(leaf)
    return chain


class _Cgroups:
    """This process's cgroup directories under ``root``, read once per public call."""

    def __init__(self, root: str) -> None:
        self.mounts = _mountinfo_mounts(root) or _conventional_mounts(root)
        self.paths = _proc_cgroups(root)

    def _mounts(self, version: int, controller: str) -> Iterator[tuple[_Mount, str | None]]:
        seen = set()
        for mount in self.mounts:
            if mount.version != version or (version == 1 and controller not in mount.controllers):
                continue
            key = os.path.realpath(mount.point)
            if key in seen:
                continue
            seen.add(key)
            yield mount, self.paths.get("" if version == 2 else controller)

    def leaves(self, version: int, controller: str) -> list[str]:
        """The process's own cgroup directory in each matching hierarchy."""
        return [_leaf(mount, path) for mount, path in self._mounts(version, controller)]

    def chains(self, version: int, controller: str) -> list[str]:
        """The process's cgroup directory and its ancestors, in each matching hierarchy."""
        dirs = []
        for mount, path in self._mounts(version, controller):
            dirs.extend(_up_to(_leaf(mount, path), mount.point))
        return dirs


# ---------------------------------------------------------------------------------------
# Parsing cgroup files


def _bad(path: str, text: str, expected: str) -> ConfigError:
    return ConfigError.at(path, shown(text.strip()), f"not a valid cgroup value (expected {expected})")


def _parse_cpu_max(path: str, text: str) -> float | None:
    """v2 ``cpu.max`` -> CPUs (quota/period), ``None`` for no limit."""
    expected = "'max <period>' or '<quota> <period>'"
    fields = text.split()
    if not 1 <= len(fields) <= 2:
        raise _bad(path, text, expected)
    quota = fields[0]
    period = fields[1] if len(fields) == 2 else str(DEFAULT_CFS_PERIOD_US)
    if not DIGITS.fullmatch(period) or int(period) == 0:
        raise _bad(path, text, expected)
    if quota == "max":
        return None
    if not DIGITS.fullmatch(quota) or int(quota) == 0:
        raise _bad(path, text, expected)
    return int(quota) / int(period)


def _parse_cfs(quota_path: str, quota_text: str, period_path: str, period_text: str | None) -> float | None:
    """v1 ``cpu.cfs_quota_us`` (+ period) -> CPUs, ``None`` for no limit (-1)."""
    quota = quota_text.strip()
    if not re.fullmatch(_SIGNED, quota, re.ASCII) or int(quota) == 0 or (int(quota) < 0 and int(quota) != -1):
        raise _bad(quota_path, quota_text, "-1 or a positive number of microseconds")
    if int(quota) == -1:
        return None
    if period_text is None:
        period = DEFAULT_CFS_PERIOD_US
    else:
        stripped = period_text.strip()
        if not DIGITS.fullmatch(stripped) or int(stripped) == 0:
            raise _bad(period_path, period_text, "a positive number of microseconds")
        period = int(stripped)
    return int(quota) / period


def _parse_memory_limit(path: str, text: str, *, v1: bool) -> int | None:
    """v2 ``memory.max`` (``max`` or bytes) / v1 ``memory.limit_in_bytes`` (bytes, -1) -> bytes."""
    value = text.strip()
    if not v1 and value == "max":
        return None
    if v1 and value == "-1":
        return None
    if not DIGITS.fullmatch(value):
        raise _bad(path, text, "'max' or a number of bytes" if not v1 else "a number of bytes")
    return int(value)


def _parse_bytes(path: str, text: str) -> int:
    value = text.strip()
    if not DIGITS.fullmatch(value):
        raise _bad(path, text, "a number of bytes")
    return int(value)


def _parse_oom_kill(path: str, text: str) -> int | None:
    """The ``oom_kill N`` line of ``memory.events`` / ``memory.oom_control``; ``None`` if absent."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "oom_kill":
            if len(fields) != 2 or not DIGITS.fullmatch(fields[1]):
                raise _bad(path, line, "'oom_kill <count>'")
            return int(fields[1])
    return None


# ---------------------------------------------------------------------------------------
# CPUs and memory


def _affinity_count() -> int:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        return len(getaffinity(0))
    count = os.cpu_count()
    if count is None:  # pragma: no cover - platforms without sched_getaffinity nor cpu_count
        import psutil

        count = psutil.cpu_count()
    return count or 1


def cpu_quota(root: str = "/") -> float | None:
    """The cgroup CPU quota in CPUs (v1 or v2, smallest over the ancestors); ``None`` if none."""
    return _cpu_quota(_Cgroups(root))


def _cpu_quota(groups: _Cgroups) -> float | None:
    limits = []
    for directory in groups.chains(2, "cpu"):
        path = os.path.join(directory, "cpu.max")
        text = _read(path)
        if text is not None:
            limits.append(_parse_cpu_max(path, text))
    for directory in groups.chains(1, "cpu"):
        quota_path = os.path.join(directory, "cpu.cfs_quota_us")
        quota_text = _read(quota_path)
        if quota_text is not None:
            period_path = os.path.join(directory, "cpu.cfs_period_us")
            limits.append(_parse_cfs(quota_path, quota_text, period_path, _read(period_path)))
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def cpu_count(root: str = "/", affinity: set[int] | None = None) -> int:
    """CPUs this process may use: affinity capped by the cgroup quota, rounded up, at least 1.

    ``affinity`` replaces ``os.sched_getaffinity(0)`` (for tests).
    """
    return _cpu_count(_Cgroups(root), affinity)


def cpus_and_memory(root: str = "/") -> tuple[int, int]:
    """``(cpu_count(root), memory_bytes(root))``, finding this process's cgroups once."""
    groups = _Cgroups(root)
    return _cpu_count(groups, None), _memory_bytes(groups)


def _cpu_count(groups: _Cgroups, affinity: set[int] | None) -> int:
    count = len(affinity) if affinity is not None else _affinity_count()
    quota = _cpu_quota(groups)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def physical_memory_bytes() -> int:
    """The machine's RAM: ``SC_PAGE_SIZE * SC_PHYS_PAGES``, else psutil."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - Windows
        pages = page_size = -1
    if pages > 0 and page_size > 0:
        return pages * page_size
    import psutil  # pragma: no cover - platforms without sysconf

    return int(psutil.virtual_memory().total)  # pragma: no cover


def memory_limit_bytes(root: str = "/") -> int | None:
    """The smallest cgroup memory limit (v1 or v2, over the ancestors) below physical memory.

    ``None`` when there is none: v1's "unlimited" (9223372036854771712) and any other limit
    at or above physical memory count as no limit.
    """
    return _memory_limit(_Cgroups(root))


def _memory_limit(groups: _Cgroups) -> int | None:
    limits = []
    for version, name in ((2, "memory.max"), (1, "memory.limit_in_bytes")):
        for directory in groups.chains(version, "memory"):
            path = os.path.join(directory, name)
            text = _read(path)
            if text is not None:
                limits.append(_parse_memory_limit(path, text, v1=version == 1))
    physical = physical_memory_bytes()
    found = [limit for limit in limits if limit is not None and limit < physical]
    return min(found) if found else None


def memory_bytes(root: str = "/") -> int:
    """Memory the job may use: the cgroup limit when below physical memory, else physical."""
    return _memory_bytes(_Cgroups(root))


def _memory_bytes(groups: _Cgroups) -> int:
    limit = _memory_limit(groups)
    return physical_memory_bytes() if limit is None else limit


def _first_memory_file(root: str, v2_name: str, v1_name: str) -> tuple[str, str] | None:
    """(path, text) of the first of ``v2_name`` / ``v1_name`` in this process's memory cgroup."""
    groups = _Cgroups(root)
    for version, name in ((2, v2_name), (1, v1_name)):
        for directory in groups.leaves(version, "memory"):
            path = os.path.join(directory, name)
            text = _read(path)
            if text is not None:
                return path, text
    return None


def oom_kill_count(root: str = "/") -> int | None:
    """How many processes the kernel OOM-killed in this cgroup so far; ``None`` if unknown."""
    found = _first_memory_file(root, "memory.events", "memory.oom_control")
    return None if found is None else _parse_oom_kill(*found)


def oom_kill_counter(root: str = "/") -> Callable[[], int | None]:
    """``oom_kill_count`` for repeated calls: the cgroup file is found once, then only read."""
    found = _first_memory_file(root, "memory.events", "memory.oom_control")
    if found is None:
        return lambda: None
    path = found[0]

    def count() -> int | None:
        text = _read(path)
        return None if text is None else _parse_oom_kill(path, text)

    return count


def memory_usage_bytes(root: str = "/") -> int | None:
    """The memory this cgroup uses now (``memory.current`` / ``memory.usage_in_bytes``)."""
    found = _first_memory_file(root, "memory.current", "memory.usage_in_bytes")
    return None if found is None else _parse_bytes(*found)


# ---------------------------------------------------------------------------------------
# GPUs
