"""What this node gives the job: CPUs, memory and GPUs (CONTRACT §2, "Resources").

Every function here only reads. The cgroup readers take ``root`` (default ``"/"``): every
file is read below it (``<root>/proc/self/cgroup``, ``<root>/sys/fs/cgroup/...``), so tests
point them at a fake tree. Nothing is cached; each call reads afresh.

CPUs: ``cpu_count()``
    The scheduler affinity (``os.sched_getaffinity(0)``, which already reflects ``taskset``
    and the cpuset controller) capped by the cgroup CPU quota, rounded up, at least 1.
    ``os.cpu_count()`` / ``multiprocessing.cpu_count()`` count the machine and ignore both.

    * v2 ``cpu.max``: ``max <period>`` is no limit; ``<quota> <period>`` is quota/period CPUs
      (``150000 100000`` -> 1.5 -> 2). A lone ``max`` or ``<quota>`` (the short forms the
      kernel accepts on write) takes the kernel's default period, 100000.
    * v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: quota ``-1`` is no limit; a missing
      period file means the kernel default, 100000.

Memory: ``memory_bytes()``
    The smallest cgroup limit (v2 ``memory.max``, ``max`` = none; v1
    ``memory.limit_in_bytes``, where "unlimited" reads 9223372036854771712) and physical
    memory. A limit at or above physical memory therefore counts as no limit.

Which cgroup
    The process's cgroup per hierarchy comes from ``/proc/self/cgroup`` (``0::/path`` for
    v2, ``N:cpu,cpuacct:/path`` for v1), and where each hierarchy is mounted from
    ``/proc/self/mountinfo`` (fstype ``cgroup2``, or ``cgroup`` with the controller among
    its super options). The cgroup's directory is the mount point joined with the path
    relative to the mount's root. When that directory does not exist the mount point itself
    is used: inside podman (cgroup v1) ``/proc/self/cgroup`` shows the host path
    ``/libpod_parent/libpod-<id>`` while the mount is already that cgroup. Without a
    mountinfo that lists cgroup mounts (a fake tree), the usual places are used:
    ``/sys/fs/cgroup`` (pure v2), ``/sys/fs/cgroup/unified`` (hybrid v2) and
    ``/sys/fs/cgroup/<controller>[,...]`` (v1). v1 and v2 are both consulted; a controller
    lives in only one of them, and the other simply has no such file.

    Limits are read from the process's cgroup **and every ancestor up to the mount point**,
    and the smallest wins: a parent's ``cpu.max`` or ``memory.max`` binds its children
    though the child's own file says ``max``. (Many tools read only the leaf and miss that;
    above the mount point, e.g. the host's cgroups seen from a container, nothing is
    visible, so nothing is read.) ``oom_kill_count()`` and ``memory_usage_bytes()`` read the
    process's own cgroup only; its counters already include its descendants.

    A missing or unreadable file means "no limit" / "unknown". A file whose content is not
    what the kernel writes (empty, non-numeric, a negative quota other than ``-1``, period
    0) raises ``ConfigError`` naming the file and the value.

OOM and usage: ``oom_kill_count()``, ``memory_usage_bytes()``
    ``oom_kill N`` from v2 ``memory.events`` or v1 ``memory.oom_control`` (kernel >= 4.13),
    and v2 ``memory.current`` / v1 ``memory.usage_in_bytes``; ``None`` when unknown. The
    supervisor compares the OOM count before and after the job to tell an OOM kill from
    any other SIGKILL.

GPUs: ``gpus(environ)``
    Through NVML (``pynvml``, from the ``nvidia-ml-py`` package, imported on first use).
    No ``pynvml``, no driver library or no GPU -> ``()`` after one debug log line, in well
    under 0.2 s. NVML is always shut down again.

    Visibility, first set wins: ``CUDA_VISIBLE_DEVICES``, then ``NVIDIA_VISIBLE_DEVICES``.
    The value is ``all``, ``none``, ``void``, the empty string (no GPUs), or a comma list of

    * ``N``: NVML's device index (CUDA's order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; on a
      node of identical GPUs the two orders agree anyway);
    * ``GPU-<uuid>``, or any unique prefix of it, as CUDA accepts;
    * ``MIG-<uuid>`` (prefixes too), or the older ``MIG-GPU-<uuid>/<gi>/<ci>`` form;
    * a negative number ends the list, as it does for CUDA: ``CUDA_VISIBLE_DEVICES=-1`` is
      the common way to hide every GPU.

    The result keeps the list's order, and ``Gpu.index`` is the position in it, 0..n-1:
    what the job's code calls ``cuda:<index>``. With ``all`` (or nothing set), every GPU is
    listed in NVML order, a GPU in MIG mode as its MIG devices.

    ``NVIDIA_VISIBLE_DEVICES`` is applied by the NVIDIA container runtime when the container
    starts, and inside the container NVML numbers the injected GPUs from 0. So when it is
    a list of indices naming exactly as many GPUs as NVML sees, all of them are taken (in
    NVML order); a path (the device plugin's ``volume-mounts`` strategy) means ``all``.

    CUDA silently truncates the list at the first entry it does not know; a job on the
    wrong GPUs is worse than a clear stop, so an entry naming no GPU (index out of range,
    unknown or ambiguous UUID prefix, a GPU named twice) raises ``ConfigError`` naming the
    variable and the value, e.g. ``CUDA_VISIBLE_DEVICES: '7': no such GPU (this node has
    2: 0, 1)``. A syntax error (``abc``) raises even where NVML is missing; whether a GPU
    exists can only be checked where it is present. An NVML failure after a successful
    ``nvmlInit`` (a GPU fell off the bus) raises ``InternalError``.
"""

from __future__ import annotations

import math
import os
import re
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterator, Mapping, Sequence

from trainenv.errors import ConfigError, InternalError, shown
from trainenv.frozen import frozen

__all__ = [
    "Gpu",
    "cpu_count",
    "cpu_quota",
    "gpus",
    "memory_bytes",
    "memory_limit_bytes",
    "memory_usage_bytes",
    "oom_kill_count",
    "physical_memory_bytes",
]

# The kernel driver's device nodes: without any of them NVML cannot load, so pynvml
# (tens of milliseconds to import) is not even imported.
NVIDIA_DRIVER_MARKERS = ("dev/nvidiactl", "proc/driver/nvidia", "dev/dxg")


def _debug(message: str, *args: object) -> None:
    """One debug line, when the process uses ``logging`` at all.

    A process that never imported ``logging`` configured no handler, so the record would be
    dropped anyway: importing it just to drop a line would cost milliseconds on every start.
    """
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.getLogger(__name__).debug(message, *args)


def nvidia_driver_present(root: str = "/") -> bool:
    return any(os.path.exists(os.path.join(root, marker)) for marker in NVIDIA_DRIVER_MARKERS)

DEFAULT_CFS_PERIOD_US = 100_000
"""The kernel's CFS period when none is given (``cpu.max`` short form, v1 period file)."""

_READ_LIMIT = 64 * 1024
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_SIGNED = re.compile(r"-?[0-9]+", re.ASCII)


# ---------------------------------------------------------------------------------------
# Finding this process's cgroup directories


@frozen
class _Mount:
    """One cgroup hierarchy's mount: v1 (with its controllers) or v2."""

    version: int
    controllers: frozenset
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
            _debug("cannot read %s: %s", path, exc)
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
            controllers: frozenset = frozenset()
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
    if not _DIGITS.fullmatch(period) or int(period) == 0:
        raise _bad(path, text, expected)
    if quota == "max":
        return None
    if not _DIGITS.fullmatch(quota) or int(quota) == 0:
        raise _bad(path, text, expected)
    return int(quota) / int(period)


def _parse_cfs(quota_path: str, quota_text: str, period_path: str, period_text: str | None) -> float | None:
    """v1 ``cpu.cfs_quota_us`` (+ period) -> CPUs, ``None`` for no limit (-1)."""
    quota = quota_text.strip()
    if not _SIGNED.fullmatch(quota) or int(quota) == 0 or (int(quota) < 0 and int(quota) != -1):
        raise _bad(quota_path, quota_text, "-1 or a positive number of microseconds")
    if int(quota) == -1:
        return None
    if period_text is None:
        period = DEFAULT_CFS_PERIOD_US
    else:
        stripped = period_text.strip()
        if not _DIGITS.fullmatch(stripped) or int(stripped) == 0:
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
    if not _DIGITS.fullmatch(value):
        raise _bad(path, text, "'max' or a number of bytes" if not v1 else "a number of bytes")
    return int(value)


def _parse_bytes(path: str, text: str) -> int:
    value = text.strip()
    if not _DIGITS.fullmatch(value):
        raise _bad(path, text, "a number of bytes")
    return int(value)


def _parse_oom_kill(path: str, text: str) -> int | None:
    """The ``oom_kill N`` line of ``memory.events`` / ``memory.oom_control``; ``None`` if absent."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "oom_kill":
            if len(fields) != 2 or not _DIGITS.fullmatch(fields[1]):
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
    groups = _Cgroups(root)
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
    count = len(affinity) if affinity is not None else _affinity_count()
    quota = cpu_quota(root)
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
    groups = _Cgroups(root)
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
    limit = memory_limit_bytes(root)
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


def memory_usage_bytes(root: str = "/") -> int | None:
    """The memory this cgroup uses now (``memory.current`` / ``memory.usage_in_bytes``)."""
    found = _first_memory_file(root, "memory.current", "memory.usage_in_bytes")
    return None if found is None else _parse_bytes(*found)


# ---------------------------------------------------------------------------------------
# GPUs


@frozen
class Gpu:
    """One GPU the job may use.

    ``index`` is the position among the visible GPUs (``cuda:<index>`` in the job's code),
    not NVML's physical index; ``uuid`` is NVML's (``GPU-...`` or, for a MIG device,
    ``MIG-...``) and identifies the device either way.
    """

    index: int
    name: str
    uuid: str
    memory_bytes: int


_NO_GPUS = ("none", "void", "")
_LEGACY_MIG = re.compile(r"MIG-(GPU-[^/]+)/([0-9]+)/([0-9]+)", re.ASCII)


def _visibility(environ: Mapping[str, str]) -> tuple[str, str] | None:
    for variable in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if variable in environ:
            return variable, environ[variable]
    return None


def _entries(variable: str, value: str) -> list[str] | None:
    """The visibility list's entries (syntax checked); ``None`` for all GPUs, ``[]`` for none."""
    whole = value.strip().lower()
    if whole == "all" or (variable == "NVIDIA_VISIBLE_DEVICES" and value.strip().startswith("/")):
        return None
    if whole in _NO_GPUS:
        return []
    entries = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if re.fullmatch(r"-[0-9]+", entry, re.ASCII):
            break  # CUDA stops at a negative index: "-1" hides every GPU
        if not (_DIGITS.fullmatch(entry) or entry.startswith(("GPU-", "MIG-"))):
            raise ConfigError.at(variable, shown(entry), "not a GPU index, GPU-<uuid> or MIG-<uuid>")
        entries.append(entry)
    return entries


def _text(value: Any) -> str:
    """NVML strings: ``str`` in current nvidia-ml-py, ``bytes`` in old versions."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Nvml:
    """The NVML queries ``gpus`` needs, on an initialised ``pynvml`` module."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in self.handles]
        self._migs: list[tuple[Any, str, str]] | None = None

    def mig_handles(self, handle: Any) -> list[Any]:
        """The MIG devices of ``handle``; ``[]`` when MIG is off or unsupported."""
        nvml = self.nvml
        try:
            current = nvml.nvmlDeviceGetMigMode(handle)[0]
        except (nvml.NVMLError, AttributeError):
            return []
        if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return []
        found = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                found.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
            except nvml.NVMLError:  # an empty slot: NVML_ERROR_NOT_FOUND
                continue
        return found

    def migs(self) -> list[tuple[Any, str, str]]:
        """Every MIG device as (handle, uuid, legacy id ``MIG-GPU-<uuid>/<gi>/<ci>``)."""
        if self._migs is None:
            self._migs = []
            for handle, parent_uuid in zip(self.handles, self.uuids):
                for mig in self.mig_handles(handle):
                    try:
                        legacy = "MIG-{}/{}/{}".format(
                            parent_uuid,
                            self.nvml.nvmlDeviceGetGpuInstanceId(mig),
                            self.nvml.nvmlDeviceGetComputeInstanceId(mig),
                        )
                    except (self.nvml.NVMLError, AttributeError):
                        legacy = ""
                    self._migs.append((mig, _text(self.nvml.nvmlDeviceGetUUID(mig)), legacy))
        return self._migs

    def describe(self, index: int, handle: Any) -> Gpu:
        nvml = self.nvml
        return Gpu(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        )


def _listing(names: Sequence[str]) -> str:
    shown_names = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"this node has {len(names)}" + (f": {shown_names}" if names else "")


def _by_uuid(variable: str, entry: str, candidates: Sequence[tuple[Any, str]]) -> Any:
    """The one handle whose UUID starts with ``entry`` (CUDA accepts unique prefixes)."""
    wanted = entry.lower()
    matches = [handle for handle, uuid in candidates if uuid.lower().startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    kind = "MIG device" if entry.startswith("MIG-") else "GPU"
    uuids = [uuid for _, uuid in candidates]
    if not matches:
        raise ConfigError.at(variable, shown(entry), f"no such {kind} ({_listing(uuids)})")
    raise ConfigError.at(variable, shown(entry), f"matches {len(matches)} {kind}s; give more of the UUID")


def _resolve(variable: str, entries: list[str] | None, nvml: _Nvml) -> list[Any]:
    """The handles the visibility list names, in its order."""
    count = len(nvml.handles)
    if entries is None:
        handles = []
        for handle in nvml.handles:
            handles.extend(nvml.mig_handles(handle) or [handle])
        return handles
    if (
        variable == "NVIDIA_VISIBLE_DEVICES"
        and entries
        and all(_DIGITS.fullmatch(e) for e in entries)
        and len(entries) == count
    ):
        return list(nvml.handles)  # the container runtime already injected exactly these
    handles, named = [], {}  # id(handle) -> the entry that named it
    for entry in entries:
        if _DIGITS.fullmatch(entry):
            index = int(entry)
            if index >= count:
                names = [str(i) for i in range(count)]
                raise ConfigError.at(variable, shown(entry), f"no such GPU ({_listing(names)})")
            handle = nvml.handles[index]
        elif entry.startswith("GPU-"):
            handle = _by_uuid(variable, entry, list(zip(nvml.handles, nvml.uuids)))
        elif _LEGACY_MIG.fullmatch(entry):
            matches = [mig for mig, _, ident in nvml.migs() if ident.lower() == entry.lower()]
            if not matches:
                idents = [ident for _, _, ident in nvml.migs() if ident]
                raise ConfigError.at(variable, shown(entry), f"no such MIG device ({_listing(idents)})")
            handle = matches[0]
        else:
            handle = _by_uuid(variable, entry, [(mig, uuid) for mig, uuid, _ in nvml.migs()])
        # Each device's handle is made once per call, so identity means the same device.
        if id(handle) in named:
            raise ConfigError.at(variable, shown(entry), f"names the same GPU as {named[id(handle)]!r}")
        named[id(handle)] = entry
        handles.append(handle)
    return handles


def gpus(environ: Mapping[str, str]) -> tuple[Gpu, ...]:
    """The GPUs the job may use, in ``CUDA_VISIBLE_DEVICES`` order; ``()`` without NVML."""
    visibility = _visibility(environ)
    variable, entries = (None, None) if visibility is None else (visibility[0], _entries(*visibility))
    if entries == []:
        return ()
    if "pynvml" not in sys.modules and not nvidia_driver_present():
        _debug("no GPUs: no NVIDIA driver (none of /%s)", ", /".join(NVIDIA_DRIVER_MARKERS))
        return ()
    try:
        import pynvml
    except ImportError as exc:
        _debug("no GPUs: cannot import pynvml (install nvidia-ml-py): %s", exc)
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        _debug("no GPUs: NVML is not available: %s", exc)
        return ()
    try:
        nvml = _Nvml(pynvml)
        handles = _resolve(variable or "CUDA_VISIBLE_DEVICES", entries, nvml)
        return tuple(nvml.describe(i, handle) for i, handle in enumerate(handles))
    except pynvml.NVMLError as exc:
        raise InternalError(f"NVML failed while listing GPUs: {exc}") from exc
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            _debug("nvmlShutdown failed: %s", exc)
