"""Multi-node launch through the real engines (``trainenv.launchers``, ``trainenv.nodes``).

Fast tests (always run): the argv, hostfile, environment and peers ``build_plan`` produces for
every case; the peer wait against real sockets; node 0's link and the real
``python -m trainenv.nodes wait-for-master`` processes; and real ``trainenv train``
runs for the one-line errors (torch missing, mpirun missing, a master that never comes).

Engine tests (``-m distributed``): two real ``trainenv train`` nodes run the examples in
``examples/distributed/`` under torchrun (gloo all-reduce, 2 nodes x 2 processes) and Open
MPI (mpi4py allreduce, 4 ranks on 2 fake hosts), on loopback and in network namespaces with
their own hostnames, and a rank that fails makes every node fail with a failure file.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import pytest

from distributed_harness import (
    NetnsCluster,
    json_lines,
    launcher_environ,
    need_netns,
    report_wall_time,
    start,
    wait_all,
    write_rsh_agent,
)
from support import (
    PYTHON,
    REPO,
    TRAINENV,
    failure,
    free_port,
    free_port_pair,
    make_tree,
    need_mpi,
    need_tool,
    need_torch,
    needs_mpirun,
    run_trainenv,
)
from trainenv.launchers import mpi_exported_names
from trainenv.nodes import NodeLink, PeerTimeout, relayed_failure, wait_for_peers
from trainenv.environment import build_training_env
from trainenv.errors import ConfigError
from trainenv.layout import JobTree
from trainenv.plan import LaunchPlan, build_plan
from trainenv.settings import resolve_settings

EXAMPLES = REPO / "examples" / "distributed"
TORCH_EXAMPLE = (EXAMPLES / "torch_allreduce.py").read_text()
MPI_EXAMPLE = (EXAMPLES / "mpi_allreduce.py").read_text()
TORCH_TIMEOUT = 240.0  # ~15 s alone; 6 interpreters import torch on 2 cores
MPI_TIMEOUT = 90.0
_bases = itertools.count()


class Lines:
    """A console that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def info(self, text: str) -> None:
        self.lines.append(text)

    debug = error = info


# -- building plans --------------------------------------------------------------------------


def plan_for(
    tmp_path: Path,
    environ: Optional[Mapping[str, Optional[str]]] = None,
    *,
    code: Optional[Mapping[str, str]] = None,
    resource_config: Optional[dict] = None,
    hyperparameters: Optional[dict] = None,
    hostname: str = "vm",
) -> LaunchPlan:
    """``build_plan`` for a fresh job tree; ``environ`` values of None remove the name."""
    base = tmp_path / f"ml{next(_bases)}"
    make_tree(base, code if code is not None else {"train.py": "print(1)\n"}, hyperparameters, resource_config=resource_config)
    env_vars: Dict[str, str] = {
        "PATH": os.environ.get("PATH", os.defpath),
        "TRAINENV_BASE_DIR": str(base),
        "TRAINENV_RUN_DIR": str(tmp_path / "run"),
        "TRAINENV_ENTRY_POINT": "train.py",
    }
    for name, value in (environ or {}).items():
        if value is None:
            env_vars.pop(name, None)
        else:
            env_vars[name] = value
    settings = resolve_settings({}, env_vars, {})
    env = build_training_env(env_vars, layout=JobTree.resolve(env_vars), settings={}, hostname=hostname)
    return build_plan(env, settings, env_vars)


def cluster(current: str, hosts=("node0", "node1"), **extra) -> dict:
    return {"current_host": current, "hosts": list(hosts), **extra}


def torchrun_prefix() -> List[str]:
    return [PYTHON, "-m", "torch.distributed.run"]


# -- torchrun plans ---------------------------------------------------------------------------


def test_torchrun_static_on_every_node(tmp_path):
    node0 = plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "torchrun", "TRAINENV_NPROC_PER_NODE": "2"},
                     resource_config=cluster("node0"), hyperparameters={"lr": 0.1})
    script = node0.entry.target
    assert list(node0.argv) == torchrun_prefix() + [
        "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", "0", "--rdzv-backend", "static",
        "--rdzv-endpoint", "node0:29500", "--max-restarts", "0", script, "--lr", "0.1",
    ]
    assert node0.peers == () and node0.hostfile is None  # node 0 hosts the store and waits for nobody
    node1 = plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "torchrun", "TRAINENV_NPROC_PER_NODE": "2"},
                     resource_config=cluster("node1"))
    assert node1.argv[node1.argv.index("--node-rank") + 1] == "1"
    assert node1.peers == (("node0", 29501),)  # node 0's trainenv, on MASTER_PORT + 1
    # The node-level names every node gets (see trainenv.exports).
    for plan, rank in ((node0, "0"), (node1, "1")):
        env = plan.env
        assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["NNODES"], env["NPROC_PER_NODE"]) == ("node0", "29500", "2", "2")
        assert env["NODE_RANK"] == env["PET_NODE_RANK"] == env["TRAINENV_NODE_RANK"] == rank
        assert (env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"], env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("node0", "29500", "2", "2")
        assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": int(rank)}
        assert env["OMP_NUM_THREADS"] == "1"
        assert "RANK" not in env and "WORLD_SIZE" not in env  # process-level: torchrun sets them


def test_torchrun_keeps_platform_values_and_takes_the_port_from_setting_then_platform(tmp_path):
    platform = {"TRAINENV_DISTRIBUTION": "torchrun", "MASTER_PORT": "23456", "OMP_NUM_THREADS": "4",
                "TRAINENV_NPROC_PER_NODE": "2"}
    plan = plan_for(tmp_path, platform, resource_config=cluster("node1"))
    assert "node0:23456" in plan.argv and plan.peers == (("node0", 23457),)
    assert plan.env["OMP_NUM_THREADS"] == "4"  # a platform value is never overwritten
    plan = plan_for(tmp_path, {**platform, "TRAINENV_MASTER_PORT": "29999"}, resource_config=cluster("node1"))
    assert "node0:29999" in plan.argv and plan.peers == (("node0", 30000),)
    assert plan.env["MASTER_PORT"] == "23456"  # still the platform's: only TRAINENV_* are overwritten


def test_torchrun_pai_style_ranks_without_host_list(tmp_path):
    plan = plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "torchrun", "MASTER_ADDR": "10.0.0.5", "RANK": "1",
                               "WORLD_SIZE": "3", "NPROC_PER_NODE": "4"})
    argv = list(plan.argv)
    assert argv[3:11] == ["--nnodes", "3", "--nproc-per-node", "4", "--node-rank", "1", "--rdzv-backend", "static"]
    assert plan.peers == (("10.0.0.5", 29501),)


def test_torchrun_c10d_node_zero_hosts_the_store(tmp_path):
    environ = {"TRAINENV_DISTRIBUTION": "torchrun", "TRAINENV_RDZV_BACKEND": "c10d", "TRAINENV_JOB_NAME": "job7",
               "PET_RDZV_CONF": "read_timeout=300"}
    node0 = plan_for(tmp_path, environ, resource_config=cluster("node0"))
    node1 = plan_for(tmp_path, environ, resource_config=cluster("node1"))
    for plan, is_host in ((node0, "1"), (node1, "0")):
        argv = list(plan.argv)
        assert "--node-rank" not in argv  # c10d assigns ranks; torchrun would ignore it
        assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
        assert argv[argv.index("--rdzv-endpoint") + 1] == "node0:29500"
        assert argv[argv.index("--rdzv-id") + 1] == "job7"
        assert argv[argv.index("--rdzv-conf") + 1] == f"read_timeout=300,is_host={is_host}"
    assert node0.peers == () and node1.peers == (("node0", 29501),)


def test_torchrun_follows_the_platforms_backend_and_restarts_unless_set(tmp_path):
    environ = {"TRAINENV_DISTRIBUTION": "torchrun", "PET_RDZV_BACKEND": "c10d", "PET_MAX_RESTARTS": "3"}
    argv = list(plan_for(tmp_path, environ, resource_config=cluster("node1")).argv)
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d" and argv[argv.index("--max-restarts") + 1] == "3"
    environ.update(TRAINENV_RDZV_BACKEND="static", TRAINENV_MAX_RESTARTS="1")
    argv = list(plan_for(tmp_path, environ, resource_config=cluster("node1")).argv)
    assert argv[argv.index("--rdzv-backend") + 1] == "static" and argv[argv.index("--max-restarts") + 1] == "1"


def test_torchrun_elastic_pet_source_passes_no_node_rank(tmp_path):
    environ = {"TRAINENV_DISTRIBUTION": "torchrun", "PET_NNODES": "1:4", "PET_RDZV_BACKEND": "c10d",
               "PET_RDZV_ENDPOINT": "job-worker-0:29400", "PET_RDZV_ID": "run-9", "PET_NPROC_PER_NODE": "2"}
    plan = plan_for(tmp_path, environ)
    assert list(plan.argv)[3:] == [
        "--nnodes", "1:4", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "job-worker-0:29400",
        "--rdzv-id", "run-9", "--max-restarts", "0", plan.entry.target,
    ]
    assert plan.peers == ()  # the rendezvous host is not known in advance
    assert "NODE_RANK" not in plan.env and "TRAINENV_NODE_RANK" not in plan.env


def test_torchrun_one_node_is_standalone_and_one_process_gets_no_omp_setting(tmp_path):
    plan = plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "torchrun", "OMP_NUM_THREADS": None})
    assert list(plan.argv)[3:] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "1", "--max-restarts", "0", plan.entry.target]
    assert plan.peers == () and "OMP_NUM_THREADS" not in plan.env
    assert "MASTER_ADDR" not in plan.env  # one node: nothing cluster-level is exported


def test_torchrun_every_entry_point_kind(tmp_path):
    code = {"pkg/__init__.py": "", "pkg/main.py": "", "run.sh": "echo hi\n"}
    hps = {"lr": "0.1"}
    base_env = {"TRAINENV_DISTRIBUTION": "torchrun"}

    def tail(entry: Optional[str], **extra: str) -> List[str]:
        plan = plan_for(tmp_path, {**base_env, "TRAINENV_ENTRY_POINT": entry, **extra}, code=code, hyperparameters=hps)
        argv = list(plan.argv)
        return argv[argv.index("--max-restarts") + 2:]

    assert tail("-m pkg.main") == ["--module", "pkg.main", "--lr", "0.1"]
    shell = tail("run.sh")
    assert shell[:2] == ["--no-python", "/bin/sh"] and shell[2].endswith("/usercode/run.sh") and shell[3:] == ["--lr", "0.1"]
    assert tail(None, TRAINENV_COMMAND="echo $RANK") == ["--no-python", "/bin/sh", "-c", "echo $RANK"]
    exe = tail("true")
    assert exe == ["--no-python", shutil.which("true"), "--lr", "0.1"]


def test_torchrun_ipv6_master_is_bracketed(tmp_path):
    plan = plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "torchrun"}, resource_config=cluster("fd00::2", hosts=("fd00::1", "fd00::2")))
    assert "[fd00::1]:29500" in plan.argv and plan.peers == (("fd00::1", 29501),)


# -- MPI plans --------------------------------------------------------------------------------


def mpi_plan(tmp_path, current: str, **extra: Optional[str]) -> LaunchPlan:
    environ = {"TRAINENV_DISTRIBUTION": "mpi", "TRAINENV_NPROC_PER_NODE": "2", "HF_TOKEN": "hf-secret-value-123",
               "MY_SETTING": "x", "OMPI_MCA_btl": "self,tcp", "HOME": "/root", **extra}
    return plan_for(tmp_path, environ, resource_config=cluster(current, network_interface_name="eth1"),
                    hyperparameters={"lr": 0.1})


@needs_mpirun
def test_mpi_node_zero_runs_mpirun_over_a_hostfile(tmp_path):
    plan = mpi_plan(tmp_path, "node0")
    argv = list(plan.argv)
    assert argv[0] == shutil.which("mpirun")
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)
    assert plan.hostfile == str(tmp_path / "run" / "trainenv-job-node0" / "hostfile")
    assert plan.hostfile_text == "node0 slots=2\nnode1 slots=2\n"
    assert argv[argv.index("--hostfile") + 1] == plan.hostfile and argv[argv.index("-np") + 1] == "4"
    joined = " ".join(argv)
    assert "--mca plm_rsh_agent ssh" in joined and "--bind-to none --map-by slot" in joined
    assert "--mca btl_tcp_if_include eth1" in joined and "--mca oob_tcp_if_include eth1" in joined
    assert argv[-4:] == [plan.settings.interpreter, plan.entry.target, "--lr", "0.1"]
    assert plan.peers == ()
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    for name in ("TRAINENV_HPS", "PAI_HPS", "PATH", "PYTHONPATH", "MASTER_ADDR", "NNODES", "OMP_NUM_THREADS", "MY_SETTING", "HF_TOKEN"):
        assert name in exported, name
    for name in ("TRAINENV_NODE_RANK", "NODE_RANK", "PET_NODE_RANK", "TF_CONFIG", "TRAINENV_CURRENT_HOST",
                 "TRAINENV_ENV_FILE", "HOME", "OMPI_MCA_btl"):
        assert name not in exported, name
    assert set(exported) <= set(plan.env)  # every -x name has a value in mpirun's environment
    # Secrets travel by name only: never on the command line, nor in --dry-run.
    assert "hf-secret-value-123" not in joined and "hf-secret-value-123" not in plan.describe()


@needs_mpirun
def test_mpi_options_replace_defaults_and_platform_agent_is_kept(tmp_path):
    plan = mpi_plan(tmp_path, "node0", TRAINENV_MPI_OPTIONS="--bind-to core --mca btl_tcp_if_include 10.0.0.0/8 --tag-output",
                    OMPI_MCA_plm_rsh_agent="/etc/mpi/kubexec.sh")
    argv = list(plan.argv)
    joined = " ".join(argv)
    assert "--bind-to none" not in joined and "--map-by" not in joined
    assert "btl_tcp_if_include eth1" not in joined and "--mca oob_tcp_if_include eth1" in joined
    assert "plm_rsh_agent" not in joined  # Kubeflow's kubexec (the platform's) stays in charge
    platform = mpi_plan(tmp_path, "node0", OMPI_MCA_oob_tcp_if_include="ib0", OMPI_MCA_hwloc_base_binding_policy="core")
    joined = " ".join(platform.argv)
    assert "oob_tcp_if_include" not in joined and "--bind-to" not in joined and "--mca btl_tcp_if_include eth1" in joined
    options_at = argv.index("--tag-output")  # the options come last, just before the program
    assert argv[options_at - 5:options_at + 3] == [
        "--bind-to", "core", "--mca", "btl_tcp_if_include", "10.0.0.0/8", "--tag-output", plan.settings.interpreter, plan.entry.target,
    ]
    explicit = mpi_plan(tmp_path, "node0", OMPI_MCA_plm_rsh_agent="/etc/mpi/kubexec.sh", TRAINENV_MPI_RSH_AGENT="ssh -p 2222")
    assert "--mca plm_rsh_agent ssh -p 2222" in " ".join(explicit.argv)


@needs_mpirun
def test_mpi_other_nodes_wait_for_node_zero(tmp_path):
    plan = mpi_plan(tmp_path, "node1", TRAINENV_MASTER_PORT="31000", TRAINENV_PEER_TIMEOUT_SECONDS="45")
    assert list(plan.argv) == [
        sys.executable, "-m", "trainenv.nodes", "wait-for-master", "node0", "31001", "45",
        "--job", "trainenv-job", "--rank", "1", "--host", "node1", "--failure-file", plan.failure_file,
    ]
    assert plan.peers == (("node0", 31001),) and plan.hostfile is None


@needs_mpirun
def test_mpi_one_node_runs_locally(tmp_path):
    plan = plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "mpi", "TRAINENV_NPROC_PER_NODE": "3"})
    assert plan.hostfile_text == "localhost slots=3\n"
    assert "plm_rsh_agent" not in plan.argv and plan.peers == ()


@needs_mpirun
def test_mpi_without_a_host_list_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as error:
        plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "mpi", "MASTER_ADDR": "10.0.0.5", "RANK": "0", "WORLD_SIZE": "2",
                            "PATH": str(Path(shutil.which("mpirun") or "/usr/bin/mpirun").parent)})
    message = str(error.value)
    assert "\n" not in message and message.startswith("TRAINENV_DISTRIBUTION: ")
    assert "MASTER_ADDR" in message and "resourceconfig.json" in message and "TRAINENV_HOSTS" in message


def test_mpi_without_mpirun_is_a_config_error(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(ConfigError) as error:
        plan_for(tmp_path, {"TRAINENV_DISTRIBUTION": "mpi", "PATH": str(empty)}, resource_config=cluster("node0"))
    message = str(error.value)
    assert "\n" not in message and "mpirun is not on PATH" in message and "apt-get install openmpi-bin" in message


def test_exported_names_rule():
    names = ["PATH", "TRAINENV_HPS", "NODE_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SSH_AUTH_SOCK", "HOME",
             "BASH_FUNC_x%%", "AWS_SECRET_ACCESS_KEY", "TF_CONFIG", "_", "LD_LIBRARY_PATH", "1BAD"]
    assert mpi_exported_names(names) == ["AWS_SECRET_ACCESS_KEY", "LD_LIBRARY_PATH", "PATH", "TRAINENV_HPS"]


def test_plan_launch_is_pure(tmp_path):
    """Planning writes nothing: the run dir and hostfile appear only when the runner launches."""
    need_tool("mpirun")
    plan = mpi_plan(tmp_path, "node0")
    assert not Path(plan.hostfile).exists() and not (tmp_path / "run").exists()


# -- waiting for peers ------------------------------------------------------------------------


def test_wait_for_peers_returns_once_the_master_listens(tmp_path):
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later() -> None:
        time.sleep(1.0)
        server.bind(("127.0.0.1", port))
        server.listen()

    thread = threading.Thread(target=listen_later)
    thread.start()
    console = Lines()
    t0 = time.monotonic()
    try:
        wait_for_peers([("127.0.0.1", port)], 30, console)
    finally:
        thread.join()
        server.close()
    assert 0.9 < time.monotonic() - t0 < 10
    assert console.lines[0] == f"waiting for node 0 at 127.0.0.1:{port} (connection refused; limit 30 s)"
    assert console.lines[-1].startswith(f"node 0 (127.0.0.1:{port}) is up after ")


def test_wait_for_peers_times_out_with_one_clear_line():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout) as error:
        wait_for_peers([("127.0.0.1", port)], 1.0, Lines())
    assert time.monotonic() - t0 < 4
    message = str(error.value)
    assert error.value.category == "ConfigError" and error.value.exit_code == 78 and "\n" not in message
    assert message == (
        f"timed out after 1 s waiting for node 0 at 127.0.0.1:{port} (connection refused): check that trainenv runs "
        f"on node 0 and that the master address (MASTER_ADDR, the host list) and port {port} (MASTER_PORT + 1) are "
        "reachable from here, or raise TRAINENV_PEER_TIMEOUT_SECONDS"
    )


def test_wait_for_peers_names_an_unresolvable_master():
    with pytest.raises(PeerTimeout, match=r"waiting for node 0 at no-such-node\.invalid:29501 \(the name does not resolve\)"):
        wait_for_peers([("no-such-node.invalid", 29501)], 0.5, Lines())


# -- node 0's link and wait-for-master (real processes, no MPI) ------------------------------


def start_waiter(tmp_path: Path, port: int, rank: int, *, job: str = "job", timeout: float = 20) -> subprocess.Popen:
    failure = tmp_path / f"node{rank}" / "output" / "failure"
    return subprocess.Popen(
        [PYTHON, "-m", "trainenv.nodes", "wait-for-master", "127.0.0.1", str(port), f"{timeout:g}",
         "--job", job, "--rank", str(rank), "--host", f"node{rank}", "--failure-file", str(failure)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished(proc: subprocess.Popen, timeout: float = 20) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_node_link_gathers_every_node_then_relays_the_status_and_failure(tmp_path):
    port = free_port_pair() + 1
    console = Lines()
    link = NodeLink.open(port, "job", {1: "node1", 2: "node2"}, console)
    probe = socket.create_connection(("127.0.0.1", port))  # wait_for_peers' probe: connects, leaves
    probe.close()
    stranger = socket.create_connection(("127.0.0.1", port))  # another job's node on a shared network
    stranger.sendall(b'{"hello": "other-job", "rank": 1, "host": "elsewhere"}\n')
    waiters = [start_waiter(tmp_path, port, rank) for rank in (1, 2)]
    link.gather(30)
    assert console.lines[0].startswith("waiting for 2 of 2 nodes to connect on port")
    assert "ignored a hello from node 1 of job 'other-job' (elsewhere): this is node 0 of job 'job'" in console.lines
    stranger.settimeout(5)
    assert stranger.recv(100) == b""  # turned away
    stranger.close()
    failure = tmp_path / "node0-failure"
    failure.write_text("UserError: script train.py exited with status 3: ValueError: bad\nTraceback ...\nValueError: bad\n")
    link.finish(3, str(failure))
    for rank, waiter in zip((1, 2), waiters):
        done = finished(waiter)
        assert done.returncode == 3, done.stderr
        assert "node 0 started the job" in done.stderr
        written = (tmp_path / f"node{rank}" / "output" / "failure").read_text()
        assert written.splitlines()[0] == "UserError: on node 0 (127.0.0.1): script train.py exited with status 3: ValueError: bad"
        assert written.endswith("ValueError: bad\n")
    assert console.lines[-1] == "told 2 other nodes the job ended with status 3"


def test_node_link_success_and_a_node_that_never_comes(tmp_path):
    port = free_port_pair() + 1
    link = NodeLink.open(port, "job", {1: "node1"}, Lines())
    waiter = start_waiter(tmp_path, port, 1)
    link.gather(30)
    link.finish(0, None)
    done = finished(waiter)
    assert done.returncode == 0 and "node 0 reports the job succeeded" in done.stderr
    assert not (tmp_path / "node1" / "output" / "failure").exists()

    link = NodeLink.open(port, "job", {1: "node1", 2: "node2"}, Lines())
    waiter = start_waiter(tmp_path, port, 1)
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout, match=r"timed out after 1\.5 s waiting for node2 \(node 2\) to connect to node 0"):
        link.gather(1.5)
    assert time.monotonic() - t0 < 6
    link.finish(78, text="ConfigError: timed out waiting for node2\n")
    done = finished(waiter)
    assert done.returncode == 78
    assert (tmp_path / "node1" / "output" / "failure").read_text().startswith("ConfigError: on node 0 (127.0.0.1): timed out")


def test_wait_for_master_when_node_zero_vanishes_or_never_listens(tmp_path):
    port = free_port_pair() + 1
    link = NodeLink.open(port, "job", {1: "node1"}, Lines())
    waiter = start_waiter(tmp_path, port, 1)
    link.gather(30)
    for sock in link.ready.values():  # node 0 dies: its connections close without a status
        sock.close()
    done = finished(waiter)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("ConnectionError: node 0 (127.0.0.1:")
    t0 = time.monotonic()
    done = finished(start_waiter(tmp_path, free_port_pair() + 1, 1, timeout=1))
    assert done.returncode == 78 and "ConfigError: timed out after 1 s connecting to node 0" in done.stderr
    assert time.monotonic() - t0 < 6


def test_node_link_port_in_use_is_a_config_error():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"node 0 cannot listen on port {port} \(MASTER_PORT \+ 1\)"):
            NodeLink.open(port, "job", {1: "node1"}, Lines())


def test_relayed_failure_says_where_it_happened():
    assert relayed_failure("Timeout: stopped\ntail\n", "node0", 124) == "Timeout: on node 0 (node0): stopped\ntail\n"
    assert relayed_failure("", "node0", 137) == "UserError: on node 0 (node0): the job exited with status 137\n"


# -- real `trainenv train`: the one-line errors -----------------------------------------------


def node_env(tmp_path: Path, base: Path, **extra: str) -> Dict[str, str]:
    return launcher_environ(tmp_path, TRAINENV_BASE_DIR=str(base), TRAINENV_RUN_DIR=str(base / "run"), **extra)


def test_torch_missing_for_torchrun_is_a_config_error(tmp_path):
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    base = make_tree(tmp_path / "node", {"train.py": "print(1)\n"})
    done = run_trainenv("train", env=node_env(tmp_path, base, TRAINENV_DISTRIBUTION="torchrun", TRAINENV_ENTRY_POINT="train.py",
                                TRAINENV_PYTHON=str(bare / "bin" / "python")))
    assert done.returncode == 78, done.stderr
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_DISTRIBUTION: torchrun needs torch, but ")
    assert "pip install torch" in first and "TRAINENV_PYTHON" in first
    assert f"trainenv: {first}" in done.stderr


def test_mpirun_missing_is_a_config_error(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    base = make_tree(tmp_path / "node", {"train.py": "print(1)\n"}, resource_config=cluster("node0"))
    done = run_trainenv("train", env=node_env(tmp_path, base, TRAINENV_DISTRIBUTION="mpi", TRAINENV_ENTRY_POINT="train.py", PATH=str(empty)))
    assert done.returncode == 78, done.stderr
    assert failure(base).splitlines()[0] == (
        "ConfigError: TRAINENV_DISTRIBUTION: mpi: mpirun is not on PATH; install Open MPI in the image on every node "
        "(apt-get install openmpi-bin) or choose another distribution"
    )


def test_a_master_that_never_comes_up_times_out(tmp_path):
    need_torch()
    port = free_port_pair()
    base = make_tree(tmp_path / "node1", {"train.py": "print(1)\n"})
    env = node_env(tmp_path, base, TRAINENV_DISTRIBUTION="torchrun", TRAINENV_ENTRY_POINT="train.py",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="1", WORLD_SIZE="2",
                   TRAINENV_PEER_TIMEOUT_SECONDS="2")
    t0 = time.monotonic()
    done = run_trainenv("train", env=env)
    assert done.returncode == 78, done.stderr
    assert time.monotonic() - t0 < 30
    first = failure(base).splitlines()[0]
    assert first.startswith(f"ConfigError: timed out after 2 s waiting for node 0 at 127.0.0.1:{port + 1} (connection refused)")
    assert f"trainenv: waiting for node 0 at 127.0.0.1:{port + 1}" in done.stderr


@needs_mpirun
def test_mpi_node_zero_whose_other_node_never_comes_times_out(tmp_path):
    port = free_port_pair()
    base = make_tree(tmp_path / "node0", {"train.py": "print(1)\n"}, resource_config=cluster("localhost", hosts=("localhost", "fakenode1")))
    done = run_trainenv("train", env=node_env(tmp_path, base, TRAINENV_DISTRIBUTION="mpi", TRAINENV_ENTRY_POINT="train.py",
                                TRAINENV_MASTER_PORT=str(port), TRAINENV_PEER_TIMEOUT_SECONDS="1.5"))
    assert done.returncode == 78, done.stderr
    assert failure(base).splitlines()[0].startswith(
        f"ConfigError: timed out after 1.5 s waiting for fakenode1 (node 1) to connect to node 0 on port {port + 1}"
    )


# -- the real engines (-m distributed) --------------------------------------------------------




def ranks_of(results, world: int) -> List[dict]:
    """Every rank's JSON line, sorted; checks that all ranks took part in one job."""
    for result in results:
        assert result.returncode == 0, result.describe()
    ranks = sorted((r for result in results for r in json_lines(result.stdout) if "rank" in r), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(world)), "\n".join(r.describe() for r in results)
    for r in ranks:
        assert r["world"] == world and r["sum"] == world * (world + 1) // 2
    return ranks


@pytest.mark.distributed
def test_torchrun_two_trainenv_nodes_pai_style_on_loopback(tmp_path, record_property):
    """PAI DLC's node-level MASTER_ADDR/RANK/WORLD_SIZE + NPROC_PER_NODE; 2 nodes x 2 processes."""
    need_torch()
    port = free_port_pair()
    procs = []
    t0 = time.monotonic()
    for node in (0, 1):
        base = make_tree(tmp_path / f"node{node}", {"torch_allreduce.py": TORCH_EXAMPLE})
        env = node_env(tmp_path, base, TRAINENV_DISTRIBUTION="torchrun", TRAINENV_ENTRY_POINT="torch_allreduce.py",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(node), WORLD_SIZE="2",
                       NPROC_PER_NODE="2", GLOO_SOCKET_IFNAME="lo")
        procs.append(start([*TRAINENV, "train"], env=env, log_dir=tmp_path))
    results = wait_all(procs, TORCH_TIMEOUT)
    report_wall_time(record_property, "trainenv_torchrun_loopback", time.monotonic() - t0)

    ranks = ranks_of(results, 4)
    assert [(r["node"], r["local_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["rank"] for r in json_lines(results[1].stdout)} == {2, 3}  # node 1's own torchrun ran 2 and 3
    for r in ranks:
        node = str(r["node"])
        assert r["env"]["NODE_RANK"] == r["env"]["PET_NODE_RANK"] == r["env"]["TRAINENV_NODE_RANK"] == node
        assert (r["env"]["NNODES"], r["env"]["NPROC_PER_NODE"], r["env"]["PET_NNODES"]) == ("2", "2", "2")
        assert (r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) == ("127.0.0.1", str(port))
    assert "script torch_allreduce.py succeeded" in results[1].stderr


@pytest.mark.distributed
def test_torchrun_c10d_two_namespaced_nodes_from_resourceconfig(tmp_path, record_property):
    """Real hostnames (node0, node1) from resourceconfig.json; c10d rendezvous hosted by node 0."""
    need_torch()
    need_netns()
    with NetnsCluster(2, tmp_path) as nodes:
        procs = []
        t0 = time.monotonic()
        for node in (0, 1):
            base = make_tree(tmp_path / f"node{node}", {"torch_allreduce.py": TORCH_EXAMPLE},
                             resource_config=cluster(f"node{node}"))
            env = node_env(tmp_path, base, TRAINENV_DISTRIBUTION="torchrun", TRAINENV_ENTRY_POINT="torch_allreduce.py",
                           TRAINENV_NPROC_PER_NODE="2", TRAINENV_RDZV_BACKEND="c10d")
            procs.append(nodes.start(node, [*TRAINENV, "train"], env=env, log_dir=tmp_path))
        results = wait_all(procs, TORCH_TIMEOUT)
        report_wall_time(record_property, "trainenv_torchrun_netns_c10d", time.monotonic() - t0)

    ranks = ranks_of(results, 4)
    by_host = {r["rank"]: r["host"] for r in ranks}
    assert sorted(by_host.values()) == ["node0", "node0", "node1", "node1"]
    for r in ranks:
        node = int(r["host"][-1])
        assert r["node"] == node and r["env"]["NODE_RANK"] == str(node)
        assert json.loads(r["env"]["TF_CONFIG"])["task"]["index"] == node
        assert json.loads(r["env"]["TF_CONFIG"])["cluster"]["worker"] == ["node0:2222", "node1:2222"]


@pytest.mark.distributed
def test_torchrun_a_failing_rank_fails_every_node(tmp_path, record_property):
    need_torch()
    port = free_port_pair()
    procs, bases = [], []
    t0 = time.monotonic()
    for node in (0, 1):
        base = make_tree(tmp_path / f"node{node}", {"torch_allreduce.py": TORCH_EXAMPLE}, hyperparameters={"fail-rank": 3})
        bases.append(base)
        env = node_env(tmp_path, base, TRAINENV_DISTRIBUTION="torchrun", TRAINENV_ENTRY_POINT="torch_allreduce.py",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(node), WORLD_SIZE="2",
                       NPROC_PER_NODE="2", GLOO_SOCKET_IFNAME="lo", TRAINENV_GRACE_SECONDS="5")
        procs.append(start([*TRAINENV, "train"], env=env, log_dir=tmp_path))
    results = wait_all(procs, TORCH_TIMEOUT, grace_after_failure=60)
    report_wall_time(record_property, "trainenv_torchrun_failure", time.monotonic() - t0)

    for base, result in zip(bases, results):
        assert not result.timed_out and result.returncode not in (0, None), result.describe()
        first = failure(base).splitlines()[0]
        assert first.startswith("UserError: script torch_allreduce.py exited with status 1"), first
    # torchrun's own report names the root cause: rank 3 on node 1 exited 1.
    root_cause = failure(bases[1]).split("Root Cause")[1]
    assert "rank      : 3" in root_cause and "exitcode  : 1" in root_cause
    assert "rank 3: failing on purpose" in results[1].stderr


def mpi_nodes(tmp_path: Path, hosts, *, hyperparameters=None, interface: Optional[str] = None) -> List[Path]:
    bases = []
    for node, host in enumerate(hosts):
        rc = cluster(host, hosts=hosts, **({"network_interface_name": interface} if interface else {}))
        bases.append(make_tree(tmp_path / f"node{node}", {"mpi_allreduce.py": MPI_EXAMPLE},
                               hyperparameters=hyperparameters or {"lr": 0.5}, resource_config=rc))
    return bases


def mpi_env(tmp_path: Path, base: Path, port: int, agent: Path, **extra: str) -> Dict[str, str]:
    return node_env(tmp_path, base, TRAINENV_DISTRIBUTION="mpi", TRAINENV_ENTRY_POINT="mpi_allreduce.py",
                    TRAINENV_NPROC_PER_NODE="2", TRAINENV_MASTER_PORT=str(port), TRAINENV_MPI_RSH_AGENT=str(agent),
                    **extra)


@pytest.mark.distributed
def test_mpi_two_trainenv_nodes_through_a_login_like_agent(tmp_path, record_property):
    """Node 0 runs mpirun; the agent gives the other host's ranks a bare login environment."""
    need_mpi()
    hosts = ("localhost", "fakenode1")
    bases = mpi_nodes(tmp_path, hosts, interface="lo")
    agent = write_rsh_agent(tmp_path / "fake-rsh", log=tmp_path / "agent.log", login_env=True)
    port = free_port_pair()
    t0 = time.monotonic()
    procs = [start([*TRAINENV, "train"], env=mpi_env(tmp_path, base, port, agent, TRAINENV_MPI_OPTIONS="--mca btl self,tcp"),
                   log_dir=tmp_path) for base in reversed(bases)]  # node 1 first: it waits for node 0
    worker, master = wait_all(procs, MPI_TIMEOUT)
    report_wall_time(record_property, "trainenv_mpi_loopback", time.monotonic() - t0)

    ranks = ranks_of([master, worker], 4)
    assert json_lines(worker.stdout) == []  # node 1 runs no rank itself: node 0's mpirun does
    assert [r["local_rank"] for r in ranks] == [0, 1, 0, 1]
    assert all(r["hyperparameters"] == {"lr": 0.5} for r in ranks)  # -x reached the login environment
    assert [r["node_rank_variable"] for r in ranks] == ["0", "0", None, None]  # node 0's facts stay on node 0
    assert (tmp_path / "agent.log").read_text().split() == ["fakenode1"]
    assert "node 0 reports the job succeeded" in worker.stderr
    assert "told 1 other node the job ended with status 0" in master.stderr


@pytest.mark.distributed
def test_mpi_two_namespaced_nodes_with_own_hostnames(tmp_path, record_property):
    need_mpi()
    need_netns()
    with NetnsCluster(2, tmp_path) as nodes:
        bases = mpi_nodes(tmp_path, tuple(nodes.hostnames))
        agent = write_rsh_agent(tmp_path / "fake-rsh", nodes, log=tmp_path / "agent.log", login_env=True)
        options = f"--mca oob_tcp_if_include {nodes.subnet} --mca btl_tcp_if_include {nodes.subnet} --mca btl self,tcp"
        t0 = time.monotonic()
        procs = [nodes.start(node, [*TRAINENV, "train"], env=mpi_env(tmp_path, base, 29500, agent, TRAINENV_MPI_OPTIONS=options),
                             log_dir=tmp_path) for node, base in enumerate(bases)]
        master, worker = wait_all(procs, MPI_TIMEOUT)
        report_wall_time(record_property, "trainenv_mpi_netns", time.monotonic() - t0)

    ranks = ranks_of([master, worker], 4)
    assert [r["host"] for r in ranks] == ["node0", "node0", "node1", "node1"]
    assert (tmp_path / "agent.log").read_text().split() == ["node1"]
    assert worker.returncode == 0


@pytest.mark.distributed
def test_mpi_a_failing_rank_fails_every_node(tmp_path, record_property):
    need_mpi()
    hosts = ("localhost", "fakenode1")
    bases = mpi_nodes(tmp_path, hosts, hyperparameters={"fail-rank": 3}, interface="lo")
    agent = write_rsh_agent(tmp_path / "fake-rsh", login_env=True)
    port = free_port_pair()
    t0 = time.monotonic()
    procs = [start([*TRAINENV, "train"], env=mpi_env(tmp_path, base, port, agent, TRAINENV_MPI_OPTIONS="--mca btl self,tcp"),
                   log_dir=tmp_path) for base in bases]
    master, worker = wait_all(procs, MPI_TIMEOUT)
    report_wall_time(record_property, "trainenv_mpi_failure", time.monotonic() - t0)

    assert master.returncode == 1, master.describe()
    assert worker.returncode == 1, worker.describe()
    first = failure(bases[0]).splitlines()[0]
    assert first == "UserError: script mpi_allreduce.py exited with status 1: RuntimeError: rank 3 fails on purpose (--fail-rank)"
    relayed = failure(bases[1])
    assert relayed.splitlines()[0] == (
        "UserError: on node 0 (localhost): script mpi_allreduce.py exited with status 1: "
        "RuntimeError: rank 3 fails on purpose (--fail-rank)"
    )
    assert "Traceback" in relayed
