"""The distributed test harness drives the real engines: torchrun (gloo) and Open MPI (mpi4py).

The engine tests (marked ``distributed``) run a real all-reduce across fake nodes and check
every rank's answer, so a harness that only looks like it works (all ranks on one node, a
world of 1) fails here. Their wall times are printed (``pytest -s``) and recorded as test
properties. The harness's own mechanics (teardown, deadlines) are fast and always run.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from distributed_harness import (
    MPI_ALLREDUCE,
    TORCH_ALLREDUCE,
    NetnsCluster,
    json_lines,
    launcher_environ,
    mpirun_argv,
    need_netns,
    report_wall_time,
    start,
    wait_all,
    write_rsh_agent,
)
from support import PYTHON, alive, free_port, need_mpi, need_torch, write_script

TORCH_TIMEOUT = 180.0  # ~10 s here; 6 interpreters importing torch on 2 cores
MPI_TIMEOUT = 60.0




def _torchrun(node_rank: int, master_addr: str, port: int, script: Path) -> List[str]:
    return [
        PYTHON, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node_rank),
        "--master-addr", master_addr, "--master-port", str(port),
        str(script),
    ]


def _ranks(results, expected_world: int) -> List[dict]:
    for result in results:
        assert result.returncode == 0, result.describe()
    ranks = sorted((r for result in results for r in json_lines(result.stdout)), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(expected_world)), "\n".join(
        r.describe() for r in results
    )
    expected_sum = expected_world * (expected_world + 1) // 2
    for r in ranks:
        assert r["world"] == expected_world
        assert r["sum"] == expected_sum
    return ranks


@pytest.mark.distributed
def test_torchrun_two_nodes_on_loopback(tmp_path, record_property):
    need_torch()
    script = write_script(tmp_path / "allreduce.py", TORCH_ALLREDUCE)
    port = free_port()
    env = launcher_environ(tmp_path, GLOO_SOCKET_IFNAME="lo")  # gloo would bind to the hostname's address
    t0 = time.monotonic()
    procs = [start(_torchrun(n, "127.0.0.1", port, script), env=env, log_dir=tmp_path) for n in (0, 1)]
    results = wait_all(procs, TORCH_TIMEOUT)
    report_wall_time(record_property, "torchrun_loopback", time.monotonic() - t0)

    ranks = _ranks(results, 4)
    assert [r["group_rank"] for r in ranks] == [0, 0, 1, 1]
    assert [r["local_rank"] for r in ranks] == [0, 1, 0, 1]
    # Node 0's launcher printed ranks 0-1, node 1's ranks 2-3: two real launchers took part.
    assert {r["rank"] for r in json_lines(results[1].stdout)} == {2, 3}


@pytest.mark.distributed
def test_torchrun_two_namespaced_nodes_with_own_hostnames(tmp_path, record_property):
    need_torch()
    need_netns()
    script = write_script(tmp_path / "allreduce.py", TORCH_ALLREDUCE)
    env = launcher_environ(tmp_path)
    with NetnsCluster(2, tmp_path) as cluster:
        port = 29555  # each namespace has its own, empty port space
        t0 = time.monotonic()
        procs = [
            cluster.start(n, _torchrun(n, "node0", port, script), env=env, log_dir=tmp_path)
            for n in (0, 1)
        ]
        results = wait_all(procs, TORCH_TIMEOUT)
        report_wall_time(record_property, "torchrun_netns", time.monotonic() - t0)

    ranks = _ranks(results, 4)
    assert [r["host"] for r in ranks] == ["node0", "node0", "node1", "node1"]
    assert {r["master_addr"] for r in ranks} == {"node0"}
    assert [r["group_rank"] for r in ranks] == [0, 0, 1, 1]


def test_netns_teardown_leaves_nothing(tmp_path):
    need_netns()
    hosts_before = Path("/etc/hosts").read_text()
    with NetnsCluster(3, tmp_path) as cluster:
        sleeper = cluster.start(2, ["sleep", "300"], env=launcher_environ(tmp_path), log_dir=tmp_path)
        names = list(cluster.namespaces)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(name in listed for name in names)
    assert sleeper.popen.poll() is not None  # killed by teardown, not left running
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    assert Path("/etc/hosts").read_text() == hosts_before  # the machine's own file, untouched


@pytest.mark.distributed
def test_mpirun_four_ranks_on_two_fake_hosts_through_the_agent(tmp_path, record_property):
    need_mpi()
    script = write_script(tmp_path / "mpi_allreduce.py", MPI_ALLREDUCE)
    agent = write_rsh_agent(tmp_path / "fake-rsh", log=tmp_path / "agent.log")
    argv = mpirun_argv(["localhost:2", "fakenode1:2"], 4, agent, "lo", [PYTHON, script])
    t0 = time.monotonic()
    (result,) = wait_all([start(argv, env=launcher_environ(tmp_path), log_dir=tmp_path)], MPI_TIMEOUT)
    report_wall_time(record_property, "mpirun_loopback", time.monotonic() - t0)

    _ranks([result], 4)
    # The second host's daemon was started through the agent, as ssh would on a real cluster.
    assert (tmp_path / "agent.log").read_text().split() == ["fakenode1"]


@pytest.mark.distributed
def test_mpirun_across_namespaced_nodes(tmp_path, record_property):
    need_mpi()
    need_netns()
    script = write_script(tmp_path / "mpi_allreduce.py", MPI_ALLREDUCE)
    with NetnsCluster(2, tmp_path) as cluster:
        agent = write_rsh_agent(tmp_path / "fake-rsh", cluster, log=tmp_path / "agent.log")
        argv = mpirun_argv(["node0:2", "node1:2"], 4, agent, cluster.subnet, [PYTHON, script])
        t0 = time.monotonic()
        proc = cluster.start(0, argv, env=launcher_environ(tmp_path), log_dir=tmp_path)
        (result,) = wait_all([proc], MPI_TIMEOUT)
        report_wall_time(record_property, "mpirun_netns", time.monotonic() - t0)

    ranks = _ranks([result], 4)
    assert [r["host"] for r in ranks] == ["node0", "node0", "node1", "node1"]
    assert (tmp_path / "agent.log").read_text().split() == ["node1"]


def test_wait_all_kills_the_whole_tree_at_the_deadline(tmp_path):
    """A hung job ends at the deadline, including grandchildren in their own session."""
    child = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = start([PYTHON, "-c", child], env=launcher_environ(tmp_path), log_dir=tmp_path)
    t0 = time.monotonic()
    (result,) = wait_all([proc], 1.5)
    assert result.timed_out
    assert time.monotonic() - t0 < 6
    grandchild = int(result.stdout.split()[0])
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_wait_all_cuts_the_wait_short_once_a_node_failed(tmp_path):
    env = launcher_environ(tmp_path)
    failing = start([PYTHON, "-c", "import sys; sys.exit(3)"], env=env, log_dir=tmp_path)
    waiting = start(["sleep", "300"], env=env, log_dir=tmp_path)
    t0 = time.monotonic()
    failed, hung = wait_all([failing, waiting], 120, grace_after_failure=1.0)
    assert time.monotonic() - t0 < 10
    assert failed.returncode == 3 and not failed.timed_out
    assert hung.timed_out


def test_netns_setup_failure_still_tears_down(tmp_path, monkeypatch):
    need_netns()
    cluster = NetnsCluster(2, tmp_path)

    def broken() -> None:
        raise RuntimeError("setup broke after the namespaces were made")

    monkeypatch.setattr(cluster, "_write_node_exec", broken)
    with pytest.raises(RuntimeError, match="setup broke"):
        with cluster:
            pass  # pragma: no cover
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in cluster.namespaces)


def test_login_env_agent_starts_the_command_from_a_bare_environment(tmp_path):
    """Like sshd: the remote command sees a login environment, not the caller's variables."""
    agent = write_rsh_agent(tmp_path / "fake-rsh", log=tmp_path / "agent.log", login_env=True)
    env = launcher_environ(tmp_path, CALLER_ONLY="leaked", PATH="/nowhere:" + os.environ.get("PATH", ""))
    done = subprocess.run(
        [str(agent), "-x", "fakenode1", 'echo "[$CALLER_ONLY]" "$PATH" "$HOME"'],
        env=env, capture_output=True, text=True, timeout=10,
    )
    assert done.returncode == 0, done.stderr
    seen, path, home = done.stdout.split()
    assert seen == "[]" and "/nowhere" not in path and home == pwd.getpwuid(os.getuid()).pw_dir
    assert (tmp_path / "agent.log").read_text().split() == ["fakenode1"]
