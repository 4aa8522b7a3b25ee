"""trainenv.resources: CPUs, memory and OOM counters from fake cgroup trees and real processes;
GPUs through a fake ``pynvml`` (this machine has none) and through the real one's no-GPU path."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import types
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import need_tool
from trainenv.errors import ConfigError, InternalError
from trainenv.resources import (
    Gpu,
    cpu_count,
    cpu_quota,
    cpus_and_memory,
    gpus,
    memory_bytes,
    memory_limit_bytes,
    memory_usage_bytes,
    oom_kill_count,
    oom_kill_counter,
    physical_memory_bytes,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
FOUR = {0, 1, 2, 3}
PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
V1_UNLIMITED = "9223372036854771712"


def put(root: Path, relative: str, text: str) -> Path:
    path = root / relative.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mountinfo(*lines: str) -> str:
    base = ["22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw", "23 22 0:5 / /proc rw - proc proc rw"]
    return "\n".join(base + list(lines)) + "\n"


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------------------
# CPUs


def test_v2_quota_is_rounded_up(tmp_path):
    put(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000\n")
    assert cpu_quota(str(tmp_path)) == 1.5
    assert cpu_count(str(tmp_path), affinity=FOUR) == 2


@pytest.mark.parametrize("directory", ["cpu", "cpu,cpuacct"])
def test_v1_quota_is_rounded_up(tmp_path, directory):
    put(tmp_path, f"sys/fs/cgroup/{directory}/cpu.cfs_quota_us", "150000\n")
    put(tmp_path, f"sys/fs/cgroup/{directory}/cpu.cfs_period_us", "100000\n")
    assert cpu_count(str(tmp_path), affinity=FOUR) == 2


def test_v2_max_means_affinity(tmp_path):
    put(tmp_path, "sys/fs/cgroup/cpu.max", "max 100000\n")
    assert cpu_quota(str(tmp_path)) is None
    assert cpu_count(str(tmp_path), affinity={0, 1, 5}) == 3


def test_v1_minus_one_means_affinity(tmp_path):
    put(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    put(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    assert cpu_count(str(tmp_path), affinity=FOUR) == 4


@pytest.mark.parametrize(
    "quota, period, cpus, expected",
    [
        (50000, 100000, 4, 1),  # half a CPU still gets one process
        (100000, 100000, 8, 1),
        (100001, 100000, 8, 2),
        (250000, 100000, 8, 3),  # quota smaller than affinity
        (250000, 100000, 2, 2),  # quota larger than affinity
        (800000, 200000, 4, 4),
    ],
)
def test_quota_against_affinity(tmp_path, quota, period, cpus, expected):
    put(tmp_path, "sys/fs/cgroup/cpu.max", f"{quota} {period}\n")
    assert cpu_count(str(tmp_path), affinity=set(range(cpus))) == expected


def test_short_forms_use_default_period(tmp_path):
    put(tmp_path, "sys/fs/cgroup/cpu.max", "200000\n")
    assert cpu_count(str(tmp_path), affinity=FOUR) == 2
    put(tmp_path, "sys/fs/cgroup/cpu.max", "max\n")
    assert cpu_count(str(tmp_path), affinity=FOUR) == 4
    (tmp_path / "sys/fs/cgroup/cpu.max").unlink()
    put(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "300000\n")  # no period file
    assert cpu_count(str(tmp_path), affinity=FOUR) == 3


def test_no_cgroup_files_means_affinity(tmp_path):
    assert cpu_quota(str(tmp_path)) is None
    assert cpu_count(str(tmp_path), affinity=FOUR) == 4
    assert cpu_count(str(tmp_path)) == len(os.sched_getaffinity(0))
    assert cpu_count(str(tmp_path), affinity=set()) == 1


def test_v2_uses_the_process_cgroup_and_the_smallest_ancestor(tmp_path):
    put(tmp_path, "proc/self/mountinfo", mountinfo("30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw"))
    put(tmp_path, "proc/self/cgroup", "0::/job/step\n")
    put(tmp_path, "sys/fs/cgroup/job/step/cpu.max", "max 100000\n")
    put(tmp_path, "sys/fs/cgroup/job/cpu.max", "100000 100000\n")
    put(tmp_path, "sys/fs/cgroup/other/cpu.max", "50000 100000\n")  # a sibling: not ours
    assert cpu_count(str(tmp_path), affinity=FOUR) == 1
    put(tmp_path, "sys/fs/cgroup/job/step/cpu.max", "50000 200000\n")
    assert cpu_quota(str(tmp_path)) == 0.25


def test_mountinfo_wins_over_the_usual_place(tmp_path):
    put(tmp_path, "proc/self/mountinfo", mountinfo(r"30 22 0:26 / /run/my\040cg rw - cgroup2 cgroup2 rw"))
    put(tmp_path, "proc/self/cgroup", "0::/\n")
    put(tmp_path, "run/my cg/cpu.max", "200000 100000\n")
    put(tmp_path, "sys/fs/cgroup/cpu.max", "100000 100000\n")  # not a mount: ignored
    assert cpu_count(str(tmp_path), affinity=FOUR) == 2


def test_hybrid_tree_reads_v1_cpu_and_v2_unified(tmp_path):
    put(
        tmp_path,
        "proc/self/mountinfo",
        mountinfo(
            "31 22 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755",
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct",
            "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
            "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd",
            "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw",
        ),
    )
    put(tmp_path, "proc/self/cgroup", "9:name=systemd:/\n4:memory:/box/1\n1:cpu,cpuacct:/box/1\n0::/\n")
    put(tmp_path, "sys/fs/cgroup/cpu,cpuacct/box/1/cpu.cfs_quota_us", "150000\n")
    put(tmp_path, "sys/fs/cgroup/cpu,cpuacct/box/1/cpu.cfs_period_us", "100000\n")
    put(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    put(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    put(tmp_path, "sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n")
    put(tmp_path, "sys/fs/cgroup/memory/box/1/memory.limit_in_bytes", "268435456\n")
    put(tmp_path, "sys/fs/cgroup/memory/box/memory.limit_in_bytes", V1_UNLIMITED + "\n")
    put(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", V1_UNLIMITED + "\n")
    assert cpu_count(str(tmp_path), affinity=FOUR) == 2
    assert memory_bytes(str(tmp_path)) == 268435456


@pytest.mark.parametrize("mount_root", ["/libpod_parent/libpod-0123abcd", "/"])
def test_podman_style_tree_falls_back_to_the_mount_root(tmp_path, mount_root):
    """In podman, /proc/self/cgroup names the host path; the mount already is that cgroup."""
    put(
        tmp_path,
        "proc/self/mountinfo",
        mountinfo(
            f"32 31 0:29 {mount_root} /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct",
            f"35 31 0:32 {mount_root} /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory",
        ),
    )
    put(tmp_path, "proc/self/cgroup", "4:memory:/libpod_parent/libpod-0123abcd\n1:cpu,cpuacct:/libpod_parent/libpod-0123abcd\n")
    put(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000\n")
    put(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    put(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "536870912\n")
    put(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", "1234\n")
    assert not (tmp_path / "sys/fs/cgroup/cpu,cpuacct/libpod_parent").exists()
    assert cpu_count(str(tmp_path), affinity=FOUR) == 2
    assert memory_bytes(str(tmp_path)) == 536870912
    assert memory_usage_bytes(str(tmp_path)) == 1234


def test_proc_cgroup_without_mountinfo_joins_the_usual_place(tmp_path):
    put(tmp_path, "proc/self/cgroup", "0::/a/b\n")
    put(tmp_path, "sys/fs/cgroup/a/b/cpu.max", "100000 100000\n")
    put(tmp_path, "sys/fs/cgroup/a/b/memory.max", "1048576\n")
    assert cpu_count(str(tmp_path), affinity=FOUR) == 1
    assert memory_bytes(str(tmp_path)) == 1048576


def test_taskset_limits_a_real_process():
    need_tool("taskset", "util-linux")
    code = "import os; from trainenv.resources import cpu_count; print(cpu_count(), os.cpu_count())"
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        capture_output=True, text=True, check=True, env=child_env(), timeout=60,
    ).stdout.split()
    assert out[0] == "1"
    if os.cpu_count() and os.cpu_count() > 1:
        assert out[1] != "1"  # what multiprocessing.cpu_count() would have claimed


def test_real_v1_cgroup_quota_of_a_parent_caps_a_child_process():
    """A real cgroup v1 hierarchy: the parent has half a CPU, the child's own cgroup none."""
    top = "/sys/fs/cgroup/cpu"
    if os.geteuid() != 0 or not os.path.isfile(os.path.join(top, "cpu.cfs_quota_us")):
        pytest.skip("needs root and a cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell the quota from the affinity")
    parent = os.path.join(top, f"trainenv-test-{os.getpid()}-{uuidlib.uuid4().hex[:8]}")
    child = os.path.join(parent, "inner")
    try:
        os.mkdir(parent)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc}")
    try:
        os.mkdir(child)
        Path(parent, "cpu.cfs_quota_us").write_text("50000")
        code = "from trainenv.resources import cpu_count; print(open('/proc/self/cgroup').read()); print(cpu_count())"
        script = 'echo $$ > "$1/cgroup.procs" && exec "$2" -c "$3"'
        result = subprocess.run(
            ["/bin/sh", "-c", script, "sh", child, sys.executable, code],
            capture_output=True, text=True, env=child_env(), timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f"cpu:{child[len(top):]}" in result.stdout or f"cpu,cpuacct:{child[len(top):]}" in result.stdout
        assert result.stdout.split()[-1] == "1"
    finally:
        for directory in (child, parent):
            for _ in range(50):
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# Memory, OOM count, usage


def test_memory_v2_limit(tmp_path):
    put(tmp_path, "sys/fs/cgroup/memory.max", "536870912\n")
    assert memory_bytes(str(tmp_path)) == 536870912
    assert memory_limit_bytes(str(tmp_path)) == 536870912


def test_memory_v1_limit(tmp_path):
    put(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "536870912\n")
    assert memory_bytes(str(tmp_path)) == 536870912


@pytest.mark.parametrize(
    "relative, text",
    [
        ("sys/fs/cgroup/memory.max", "max\n"),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", V1_UNLIMITED + "\n"),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "-1\n"),
        ("sys/fs/cgroup/memory.max", f"{PHYSICAL + 4096}\n"),  # above physical: no limit
        ("sys/fs/cgroup/memory.max", f"{PHYSICAL}\n"),
    ],
)
def test_unlimited_memory_is_physical(tmp_path, relative, text):
    put(tmp_path, relative, text)
    assert memory_limit_bytes(str(tmp_path)) is None
    assert memory_bytes(str(tmp_path)) == PHYSICAL


def test_no_memory_files_is_physical(tmp_path):
    assert physical_memory_bytes() == PHYSICAL
    assert memory_bytes(str(tmp_path)) == PHYSICAL


def test_memory_smallest_ancestor_wins(tmp_path):
    put(tmp_path, "proc/self/mountinfo", mountinfo("30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw"))
    put(tmp_path, "proc/self/cgroup", "0::/pod/container\n")
    put(tmp_path, "sys/fs/cgroup/pod/container/memory.max", "max\n")
    put(tmp_path, "sys/fs/cgroup/pod/memory.max", "1073741824\n")
    assert memory_bytes(str(tmp_path)) == 1073741824


def test_oom_kill_count_v2(tmp_path):
    put(tmp_path, "sys/fs/cgroup/memory.events", "low 0\nhigh 4\nmax 9\noom 3\noom_kill 2\noom_group_kill 0\n")
    assert oom_kill_count(str(tmp_path)) == 2


def test_oom_kill_count_v1(tmp_path):
    put(tmp_path, "sys/fs/cgroup/memory/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    assert oom_kill_count(str(tmp_path)) == 5


def test_oom_kill_count_unknown(tmp_path):
    assert oom_kill_count(str(tmp_path)) is None
    put(tmp_path, "sys/fs/cgroup/memory/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n")  # kernel < 4.13
    assert oom_kill_count(str(tmp_path)) is None


def test_oom_kill_count_reads_only_the_process_cgroup(tmp_path):
    put(tmp_path, "proc/self/mountinfo", mountinfo("30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw"))
    put(tmp_path, "proc/self/cgroup", "0::/job\n")
    put(tmp_path, "sys/fs/cgroup/job/memory.events", "oom 1\noom_kill 1\n")
    put(tmp_path, "sys/fs/cgroup/memory.events", "oom 7\noom_kill 7\n")
    assert oom_kill_count(str(tmp_path)) == 1


def test_memory_usage(tmp_path):
    assert memory_usage_bytes(str(tmp_path)) is None
    put(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", "4096\n")
    assert memory_usage_bytes(str(tmp_path)) == 4096
    put(tmp_path, "sys/fs/cgroup/memory.current", "8192\n")  # v2 first
    assert memory_usage_bytes(str(tmp_path)) == 8192


def test_this_machine_reads_without_error():
    assert 1 <= cpu_count() <= len(os.sched_getaffinity(0))
    assert 0 < memory_bytes() <= PHYSICAL
    count, usage = oom_kill_count(), memory_usage_bytes()
    assert count is None or count >= 0
    assert usage is None or usage > 0


# ---------------------------------------------------------------------------------------
# Malformed cgroup files


@pytest.mark.parametrize(
    "relative, text",
    [
        ("sys/fs/cgroup/cpu.max", ""),
        ("sys/fs/cgroup/cpu.max", "abc"),
        ("sys/fs/cgroup/cpu.max", "150000 0"),
        ("sys/fs/cgroup/cpu.max", "-5 100000"),
        ("sys/fs/cgroup/cpu.max", "0 100000"),
        ("sys/fs/cgroup/cpu.max", "1.5 100000"),
        ("sys/fs/cgroup/cpu.max", "max 100000 7"),
        ("sys/fs/cgroup/cpu.max", "max abc"),
        ("sys/fs/cgroup/cpu.max", "\u0661\u0662 100000"),  # Arabic-Indic digits: int() would take them
        ("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-2"),
        ("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "abc"),
        ("sys/fs/cgroup/cpu/cpu.cfs_quota_us", ""),
        ("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "0"),
        ("sys/fs/cgroup/memory.max", ""),
        ("sys/fs/cgroup/memory.max", "-1"),
        ("sys/fs/cgroup/memory.max", "512M"),
        ("sys/fs/cgroup/memory.max", "max 1"),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "lots"),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "-2"),
    ],
)
def test_malformed_limit_names_file_and_value(tmp_path, relative, text):
    path = put(tmp_path, relative, text)
    reader = cpu_count if "/cpu" in relative else memory_bytes
    with pytest.raises(ConfigError) as caught:
        reader(str(tmp_path))
    message = str(caught.value)
    assert str(path) in message
    assert repr(text.strip()) in message
    assert "\n" not in message


def test_zero_period_names_the_period_file(tmp_path):
    put(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "50000\n")
    period = put(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "0\n")
    with pytest.raises(ConfigError, match=f"^{period}: '0': "):
        cpu_count(str(tmp_path))


@pytest.mark.parametrize(
    "relative, text, reader",
    [
        ("sys/fs/cgroup/memory.events", "oom 1\noom_kill many\n", oom_kill_count),
        ("sys/fs/cgroup/memory.current", "n/a\n", memory_usage_bytes),
        ("sys/fs/cgroup/memory/memory.usage_in_bytes", "\n", memory_usage_bytes),
    ],
)
def test_malformed_counters_name_file(tmp_path, relative, text, reader):
    path = put(tmp_path, relative, text)
    with pytest.raises(ConfigError, match=f"^{path}: "):
        reader(str(tmp_path))


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hypothesis-root")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_cpu_max_parses_or_is_a_config_error(scratch_root, text):
    put(scratch_root, "sys/fs/cgroup/cpu.max", text)
    try:
        count = cpu_count(str(scratch_root), affinity=FOUR)
    except ConfigError as exc:
        assert "cpu.max" in str(exc)
    else:
        assert 1 <= count <= 4


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_memory_max_parses_or_is_a_config_error(scratch_root, text):
    put(scratch_root, "sys/fs/cgroup/memory.max", text)
    try:
        value = memory_bytes(str(scratch_root))
    except ConfigError as exc:
        assert "memory.max" in str(exc)
    else:
        assert 0 <= value <= PHYSICAL


@given(quota=st.integers(1, 10**9), period=st.integers(1, 10**7), cpus=st.integers(1, 256))
@settings(max_examples=200, deadline=None)
def test_valid_quota_is_min_of_affinity_and_ceiling(quota, period, cpus):
    with tempfile.TemporaryDirectory() as root:
        put(Path(root), "sys/fs/cgroup/cpu.max", f"{quota} {period}\n")
        assert cpu_count(root, affinity=set(range(cpus))) == max(1, min(cpus, math.ceil(quota / period)))


def test_import_loads_neither_pynvml_nor_psutil():
    code = "import sys, trainenv.resources; print([m for m in ('pynvml', 'psutil') if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env(), timeout=60
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------
# GPUs: a fake pynvml with the real names


@dataclass
class FakeDevice:
    name: str
    uuid: str
    memory: int
    migs: list = field(default_factory=list)  # (slot, FakeDevice, gi, ci)
    mig_capable: bool = False
    bytes_name: bool = False


class FakeHandle:
    """A fresh object per lookup, like pynvml's ctypes handles."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device


def fake_pynvml(devices, init_error=None, fail_on=None):
    """A ``pynvml`` module over ``devices``; ``calls`` records init/shutdown.

    ``init_error`` names the NVMLError subclass nvmlInit raises; ``fail_on="name"`` makes
    nvmlDeviceGetName raise as a GPU that fell off the bus does.
    """
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

        def __str__(self):
            return {12: "NVML Shared Library Not Found", 3: "Not Supported", 6: "Not Found"}.get(
                self.value, f"NVML error {self.value}"
            )

    class NVMLError_LibraryNotFound(NVMLError):
        def __init__(self):
            super().__init__(12)

    class NVMLError_NotSupported(NVMLError):
        def __init__(self):
            super().__init__(3)

    class NVMLError_NotFound(NVMLError):
        def __init__(self):
            super().__init__(6)

    class NVMLError_GpuIsLost(NVMLError):
        def __init__(self):
            super().__init__(15)

    calls = []
    module.calls = calls
    module.NVMLError = NVMLError
    module.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    module.NVMLError_NotSupported = NVMLError_NotSupported
    module.NVMLError_NotFound = NVMLError_NotFound
    module.NVMLError_GpuIsLost = NVMLError_GpuIsLost
    module.NVML_DEVICE_MIG_ENABLE = 1

    def check(name):
        if fail_on == name:
            raise NVMLError_GpuIsLost()

    def nvmlInit():
        calls.append("init")
        if init_error is not None:
            raise getattr(module, init_error)()

    def nvmlShutdown():
        calls.append("shutdown")

    def nvmlDeviceGetCount():
        return len(devices)

    def nvmlDeviceGetHandleByIndex(index):
        if not 0 <= index < len(devices):
            raise NVMLError(2)
        return FakeHandle(devices[index])

    def nvmlDeviceGetName(handle):
        check("name")
        device = handle.device
        return device.name.encode() if device.bytes_name else device.name

    def nvmlDeviceGetUUID(handle):
        return handle.device.uuid

    def nvmlDeviceGetMemoryInfo(handle):
        return types.SimpleNamespace(total=handle.device.memory, free=handle.device.memory, used=0)

    def nvmlDeviceGetMigMode(handle):
        if not handle.device.mig_capable:
            raise NVMLError_NotSupported()
        mode = 1 if handle.device.migs else 0
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(handle):
        return 7 if handle.device.mig_capable else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(handle, slot):
        for mig_slot, mig, gi, ci in handle.device.migs:
            if mig_slot == slot:
                mig_handle = FakeHandle(mig)
                mig_handle.ids = (gi, ci)
                return mig_handle
        raise NVMLError_NotFound()

    def nvmlDeviceGetGpuInstanceId(handle):
        return handle.ids[0]

    def nvmlDeviceGetComputeInstanceId(handle):
        return handle.ids[1]

    for function in (
        nvmlInit, nvmlShutdown, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex, nvmlDeviceGetName,
        nvmlDeviceGetUUID, nvmlDeviceGetMemoryInfo, nvmlDeviceGetMigMode, nvmlDeviceGetMaxMigDeviceCount,
        nvmlDeviceGetMigDeviceHandleByIndex, nvmlDeviceGetGpuInstanceId, nvmlDeviceGetComputeInstanceId,
    ):
        setattr(module, function.__name__, function)
    return module


GIB = 1 << 30
U0 = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
U1 = "GPU-12ab34cd-0000-1111-2222-333344445555"
U2 = "GPU-12ab9999-aaaa-bbbb-cccc-ddddeeeeffff"
U3 = "GPU-fedcba98-7654-3210-0123-456789abcdef"


def four_gpus():
    return [
        FakeDevice("NVIDIA A100-SXM4-80GB", U0, 80 * GIB),
        FakeDevice("NVIDIA A100-SXM4-80GB", U1, 80 * GIB, bytes_name=True),  # old pynvml: bytes
        FakeDevice("Tesla T4", U2, 16 * GIB),
        FakeDevice("Tesla T4", U3, 15 * GIB),
    ]


@pytest.fixture
def nvml(monkeypatch):
    module = fake_pynvml(four_gpus())
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def uuids(result):
    return [gpu.uuid for gpu in result]


def test_all_gpus_without_visibility_variables(nvml):
    result = gpus({})
    assert result == (
        Gpu(0, "NVIDIA A100-SXM4-80GB", U0, 80 * GIB),
        Gpu(1, "NVIDIA A100-SXM4-80GB", U1, 80 * GIB),  # bytes decoded
        Gpu(2, "Tesla T4", U2, 16 * GIB),
        Gpu(3, "Tesla T4", U3, 15 * GIB),
    )
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize("value", ["all", "ALL", " all "])
def test_all(nvml, value):
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": value})) == [U0, U1, U2, U3]


def test_indices_keep_the_list_order_and_renumber(nvml):
    result = gpus({"CUDA_VISIBLE_DEVICES": "3, 1"})
    assert uuids(result) == [U3, U1]
    assert [gpu.index for gpu in result] == [0, 1]
    assert result[0].memory_bytes == 15 * GIB


def test_uuids_and_unique_prefixes(nvml):
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": f"{U2},GPU-8932"})) == [U2, U0]
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": "GPU-12AB34"})) == [U1]


def test_ambiguous_prefix_is_a_config_error(nvml):
    with pytest.raises(ConfigError, match=r"^CUDA_VISIBLE_DEVICES: 'GPU-12ab': matches 2 GPUs"):
        gpus({"CUDA_VISIBLE_DEVICES": "GPU-12ab"})
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize("value", ["none", "void", "", "  ", "-1", "-1,0"])
def test_no_gpus_without_touching_nvml(nvml, value):
    assert gpus({"CUDA_VISIBLE_DEVICES": value}) == ()
    assert nvml.calls == []


def test_negative_index_ends_the_list_as_in_cuda(nvml):
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": "2,-1,0"})) == [U2]


def test_index_out_of_range(monkeypatch):
    module = fake_pynvml(four_gpus()[:2])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    with pytest.raises(ConfigError) as caught:
        gpus({"CUDA_VISIBLE_DEVICES": "0,7"})
    assert str(caught.value) == "CUDA_VISIBLE_DEVICES: '7': no such GPU (this node has 2: 0, 1)"
    assert module.calls == ["init", "shutdown"]


def test_unknown_uuid(nvml):
    with pytest.raises(ConfigError, match=r"^CUDA_VISIBLE_DEVICES: 'GPU-0000': no such GPU \(this node has 4: GPU-8932"):
        gpus({"CUDA_VISIBLE_DEVICES": "GPU-0000"})


@pytest.mark.parametrize("value", ["0,0", f"1,{U1}", "GPU-8932,0"])
def test_same_gpu_twice(nvml, value):
    with pytest.raises(ConfigError, match="names the same GPU as"):
        gpus({"CUDA_VISIBLE_DEVICES": value})


@pytest.mark.parametrize("value", ["abc", "0,cuda:1", "1.5", "+1"])
def test_syntax_error_even_without_nvml(monkeypatch, value):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(ConfigError, match=r"^CUDA_VISIBLE_DEVICES: '.*': not a GPU index"):
        gpus({"CUDA_VISIBLE_DEVICES": value})


def test_cuda_visible_devices_wins_over_nvidia(nvml):
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": "1", "NVIDIA_VISIBLE_DEVICES": "0"})) == [U1]
    assert gpus({"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "all"}) == ()


def test_nvidia_visible_devices(nvml):
    assert uuids(gpus({"NVIDIA_VISIBLE_DEVICES": f"{U3},{U0}"})) == [U3, U0]
    assert uuids(gpus({"NVIDIA_VISIBLE_DEVICES": "2"})) == [U2]
    assert uuids(gpus({"NVIDIA_VISIBLE_DEVICES": "all"})) == [U0, U1, U2, U3]
    assert uuids(gpus({"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"})) == [U0, U1, U2, U3]
    assert gpus({"NVIDIA_VISIBLE_DEVICES": "void"}) == ()
    with pytest.raises(ConfigError, match=r"^NVIDIA_VISIBLE_DEVICES: '9': no such GPU"):
        gpus({"NVIDIA_VISIBLE_DEVICES": "0,9"})


def test_nvidia_indices_already_applied_by_the_runtime(monkeypatch):
    """Host GPUs 2,3 injected into a container show up there as NVML 0,1."""
    module = fake_pynvml(four_gpus()[2:])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert uuids(gpus({"NVIDIA_VISIBLE_DEVICES": "2,3"})) == [U2, U3]
    with pytest.raises(ConfigError, match="'2': no such GPU"):
        gpus({"CUDA_VISIBLE_DEVICES": "2,3"})  # CUDA indices never refer to host numbering


MIG_A = "MIG-4b8e2a10-9a0c-5d1e-8f00-0123456789ab"
MIG_B = "MIG-4b8e2a10-77aa-5d1e-8f00-ba9876543210"


@pytest.fixture
def mig_nvml(monkeypatch):
    parent = FakeDevice(
        "NVIDIA A100-SXM4-40GB", U0, 40 * GIB, mig_capable=True,
        migs=[
            (0, FakeDevice("NVIDIA A100-SXM4-40GB MIG 3g.20gb", MIG_A, 20 * GIB), 1, 0),
            (3, FakeDevice("NVIDIA A100-SXM4-40GB MIG 1g.5gb", MIG_B, 5 * GIB), 9, 0),
        ],
    )
    other = FakeDevice("NVIDIA A100-SXM4-40GB", U1, 40 * GIB, mig_capable=True)  # MIG off
    module = fake_pynvml([parent, other])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def test_mig_devices_replace_their_parent_in_all(mig_nvml):
    result = gpus({})
    assert uuids(result) == [MIG_A, MIG_B, U1]
    assert [gpu.memory_bytes for gpu in result] == [20 * GIB, 5 * GIB, 40 * GIB]
    assert result[1].name == "NVIDIA A100-SXM4-40GB MIG 1g.5gb"


def test_mig_uuids_prefixes_and_legacy_form(mig_nvml):
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": MIG_B})) == [MIG_B]
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": "MIG-4b8e2a10-77"})) == [MIG_B]
    assert uuids(gpus({"CUDA_VISIBLE_DEVICES": f"MIG-{U0}/1/0,1"})) == [MIG_A, U1]
    assert uuids(gpus({"NVIDIA_VISIBLE_DEVICES": f"{MIG_A},{MIG_B}"})) == [MIG_A, MIG_B]


def test_unknown_or_ambiguous_mig(mig_nvml):
    with pytest.raises(ConfigError, match=r"'MIG-ffff': no such MIG device \(this node has 2: MIG-4b8e"):
        gpus({"CUDA_VISIBLE_DEVICES": "MIG-ffff"})
    with pytest.raises(ConfigError, match="matches 2 MIG devices"):
        gpus({"CUDA_VISIBLE_DEVICES": "MIG-4b8e2a10"})
    with pytest.raises(ConfigError, match="no such MIG device"):
        gpus({"CUDA_VISIBLE_DEVICES": f"MIG-{U0}/2/0"})
    with pytest.raises(ConfigError, match="names the same GPU"):
        gpus({"CUDA_VISIBLE_DEVICES": f"{MIG_A},MIG-{U0}/1/0"})


def test_init_failure_is_no_gpus_with_one_debug_line(monkeypatch, caplog):
    failing = fake_pynvml(four_gpus(), init_error="NVMLError_LibraryNotFound")
    monkeypatch.setitem(sys.modules, "pynvml", failing)
    with caplog.at_level(logging.DEBUG, logger="trainenv.resources"):
        assert gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == ()
    assert failing.calls == ["init"]  # no shutdown after a failed init
    records = [r for r in caplog.records if r.name == "trainenv.resources"]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG
    assert "NVML Shared Library Not Found" in records[0].getMessage()


def test_missing_pynvml_is_no_gpus(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with caplog.at_level(logging.DEBUG, logger="trainenv.resources"):
        assert gpus({}) == ()
    assert [r.levelno for r in caplog.records if r.name == "trainenv.resources"] == [logging.DEBUG]


def test_nvml_failure_after_init_is_internal_and_shuts_down(monkeypatch):
    module = fake_pynvml(four_gpus(), fail_on="name")
    monkeypatch.setitem(sys.modules, "pynvml", module)
    with pytest.raises(InternalError, match="NVML failed while listing GPUs: NVML error 15"):
        gpus({})
    assert module.calls == ["init", "shutdown"]


@settings(max_examples=300, deadline=None)
@given(value=st.text(alphabet=st.sampled_from(list("0123456789,- GPUMIabcdefl/v")) | st.characters(), max_size=30))
def test_any_visibility_value_gives_gpus_or_a_config_error(value):
    module = fake_pynvml(four_gpus())
    with mock.patch.dict(sys.modules, {"pynvml": module}):
        try:
            result = gpus({"CUDA_VISIBLE_DEVICES": value})
        except ConfigError as exc:
            assert str(exc).startswith("CUDA_VISIBLE_DEVICES: ")
        else:
            assert [gpu.index for gpu in result] == list(range(len(result)))
            assert len(set(uuids(result))) == len(result)
    assert module.calls in ([], ["init", "shutdown"])


def test_real_nvml_without_a_gpu_is_fast_and_empty():
    """The real pynvml (nvidia-ml-py) on a machine without a driver: () quickly, no exception."""
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver")
    pytest.importorskip("pynvml")
    code = (
        "import time; t = time.perf_counter(); from trainenv.resources import gpus; "
        "r = gpus({}); print(repr(r), time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True,
        env=child_env(), timeout=60,
    ).stdout.split()
    assert out[0] == "()"
    assert float(out[1]) < 0.2, f"gpus({{}}) took {out[1]} s"


COUNT_CGROUP_READS = """\
import collections, json, os, sys
opened = collections.Counter()
def hook(event, args):
    if event == "open" and not isinstance(args[0], int):
        path = os.fsdecode(os.fspath(args[0]))
        if path in ("/proc/self/mountinfo", "/proc/self/cgroup"):
            opened[path] += 1
sys.addaudithook(hook)
try:
    from trainenv.cli import main
    main(["train"])
finally:
    sys.stderr.write("OPENED=" + json.dumps(opened) + "\\n")
"""


def test_a_launch_finds_its_cgroups_once_for_the_snapshot_and_once_for_the_oom_counter(tmp_path):
    from support import job_environ, make_tree

    base = make_tree(tmp_path / "job", code={"train.py": "pass\n"})
    done = subprocess.run([sys.executable, "-c", COUNT_CGROUP_READS], env=job_environ(base, TRAINENV_ENTRY_POINT="train.py"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    opened = json.loads(next(line for line in done.stderr.splitlines() if line.startswith("OPENED="))[len("OPENED="):])
    # CPUs and memory share one look (cpus_and_memory); the OOM count before and after the
    # job reads only its own file (oom_kill_counter).
    assert opened == {"/proc/self/mountinfo": 2, "/proc/self/cgroup": 2}, opened


def test_oom_kill_counter_finds_the_file_once_and_reads_it_on_each_call(tmp_path):
    put(tmp_path, "/proc/self/cgroup", "0::/job\n")
    put(tmp_path, "/proc/self/mountinfo", "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    events = put(tmp_path, "/sys/fs/cgroup/job/memory.events", "oom 0\noom_kill 0\n")
    count = oom_kill_counter(str(tmp_path))
    assert count() == 0
    events.write_text("oom 1\noom_kill 1\n")
    assert count() == 1 == oom_kill_count(str(tmp_path))
    assert cpus_and_memory(str(tmp_path)) == (cpu_count(str(tmp_path)), memory_bytes(str(tmp_path)))
