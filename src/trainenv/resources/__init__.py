"""What this node gives the job: CPUs, memory and GPUs.

Every function here only reads. The cgroup readers take ``root`` (default ``"/"``): every
file is read below it (``<root>/proc/self/cgroup``, ``<root>/sys/fs/cgroup/...``), so tests
point them at a fake tree. Nothing is cached; each call reads afresh (``cpus_and_memory()``
finds the process's cgroups once for both; ``oom_kill_counter()`` finds the OOM file once and
reads it on each call).

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

from trainenv.resources.cgroups import (
    cpu_count,
    cpu_quota,
    cpus_and_memory,
    memory_bytes,
    memory_limit_bytes,
    memory_usage_bytes,
    oom_kill_count,
    oom_kill_counter,
    physical_memory_bytes,
)
from trainenv.resources.gpus import Gpu, gpus

__all__ = [
    "Gpu",
    "cpu_count",
    "cpu_quota",
    "cpus_and_memory",
    "gpus",
    "memory_bytes",
    "memory_limit_bytes",
    "memory_usage_bytes",
    "oom_kill_count",
    "oom_kill_counter",
    "physical_memory_bytes",
]
