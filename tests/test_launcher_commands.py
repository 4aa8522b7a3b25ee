"""Launcher-aware commands (``trainenv.launcher_commands``): node arguments added to the user's
torchrun, accelerate or deepspeed command, never one the user gave.

Unit tests build the argv; the option tables are checked against the launchers' real argument
parsers (torch always; accelerate and deepspeed when installed); real ``trainenv train`` runs
show the argv with ``--dry-run``, refuse a DeepSpeed without ``--no_ssh``, run a plain
``torchrun train.py`` on two nodes over 127.0.0.1 and ``accelerate launch`` with two processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path
from typing import List

import pytest

from distributed_harness import json_lines, launcher_environ, report_wall_time, start, wait_all
from support import PYTHON, REPO, TRAINENV, failure, free_port, free_port_pair, make_tree, need_torch, run_trainenv
from trainenv import launcher_commands as lc
from trainenv.errors import ConfigError
from trainenv.launcher_commands import NodeFacts, extend_argv, extend_string, given_options

BIN = str(Path(PYTHON).parent)  # torchrun, accelerate and deepspeed are installed next to the interpreter
TWO = NodeFacts(2, 1, 4, "10.0.0.1", 29600, "job7", ("10.0.0.1", "10.0.0.2"), "/run/hostfile")
ONE = NodeFacts(1, 0, 2, "vm", 29500, "job7", (), "/run/hostfile")
TORCH_EXAMPLE = (REPO / "examples" / "distributed" / "torch_allreduce.py").read_text()


def _extended(argv: List[str], facts: NodeFacts = TWO) -> List[str]:
    done = extend_argv(argv, facts)
    assert done is not None
    return list(done.argv)


def _value(argv: List[str], option: str) -> str:
    return argv[argv.index(option) + 1]


# -- recognising and extending ---------------------------------------------------------------


def test_torchrun_gets_every_missing_node_argument_and_keeps_the_programs_own():
    assert _extended(["torchrun", "train.py", "--nnodes", "9"]) == [
        "torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4",
        "--master_addr", "10.0.0.1", "--master_port", "29600", "train.py", "--nnodes", "9",
    ]


@pytest.mark.parametrize("given", [["--nproc-per-node", "8"], ["--nproc_per_node", "8"], ["--nproc-per-node=8"], ["--nproc_per=8"]])
def test_an_option_the_user_gave_is_kept_in_either_spelling(given):
    argv = _extended(["torchrun", *given, "--master-port=1234", "train.py"])
    assert argv[-len(given) - 2:] == [*given, "--master-port=1234", "train.py"]  # the user's, unchanged and last
    added = argv[1:-len(given) - 2]
    assert "--nproc_per_node" not in added and "--master_port" not in added
    assert _value(argv, "--nnodes") == "2" and _value(argv, "--node_rank") == "1"


def test_python_m_torch_distributed_run_is_recognised_with_any_python():
    for python in ("python", "python3", "/usr/bin/python3.11", PYTHON):
        argv = _extended([python, "-m", "torch.distributed.run", "-m", "pkg.train"])
        assert argv[:5] == [python, "-m", "torch.distributed.run", "--nnodes", "2"] and argv[-2:] == ["-m", "pkg.train"]
    assert extend_argv(["python", "-m", "torch.distributed.launch", "x.py"], TWO) is None
    assert extend_argv(["python", "train.py"], TWO) is None and extend_argv(["accelerate", "config"], TWO) is None


def test_torchrun_with_a_rendezvous_backend_gets_rdzv_arguments():
    argv = _extended(["torchrun", "--rdzv-backend", "c10d", "train.py"])
    assert argv == ["torchrun", "--nnodes", "2", "--nproc_per_node", "4", "--rdzv_endpoint", "10.0.0.1:29600",
                    "--rdzv_id", "job7", "--rdzv-backend", "c10d", "train.py"]
    assert _value(_extended(["torchrun", "--rdzv_backend=static", "t.py"]), "--node_rank") == "1"


def test_torchrun_on_one_node_is_standalone_unless_a_rendezvous_is_named():
    assert _extended(["torchrun", "t.py"], ONE) == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "2", "t.py"]
    argv = _extended(["torchrun", "--master_port", "4000", "t.py"], ONE)
    assert "--standalone" not in argv and _value(argv, "--master_port") == "4000" and argv.count("--master_port") == 1
    assert _extended(["torchrun", "--standalone", "t.py"], TWO) == ["torchrun", "--nproc_per_node", "4", "--standalone", "t.py"]


def test_torchrun_without_a_node_rank_uses_c10d():
    elastic = NodeFacts(3, None, 1, "w-0", 29400, "job", (), "")
    argv = _extended(["torchrun", "t.py"], elastic)
    assert "--node_rank" not in argv and _value(argv, "--rdzv_backend") == "c10d" and _value(argv, "--rdzv_endpoint") == "w-0:29400"
    kubeflow = NodeFacts(3, None, 1, "w-0", 29400, "job", (), "", "1:4", "job-worker-0:23456")
    argv = _extended(["torchrun", "t.py"], kubeflow)
    assert _value(argv, "--nnodes") == "1:4" and _value(argv, "--rdzv_endpoint") == "job-worker-0:23456"


def test_accelerate_gets_machines_and_total_processes():
    assert _extended(["accelerate", "launch", "--num-processes", "3", "train.py", "--num_machines", "5"]) == [
        "accelerate", "launch", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
        "--main_process_port", "29600", "--num-processes", "3", "train.py", "--num_machines", "5",
    ]
    assert _extended(["accelerate", "launch", "t.py"], ONE) == ["accelerate", "launch", "--num_machines", "1", "--num_processes", "2", "t.py"]
    with pytest.raises(ConfigError, match="--machine_rank"):
        extend_argv(["accelerate", "launch", "t.py"], NodeFacts(2, None, 1, "h", 1, "j"))


def test_deepspeed_on_several_nodes_runs_without_ssh_over_a_hostfile():
    done = extend_argv(["deepspeed", "--master_port=7000", "train.py", "--deepspeed_config", "ds.json"], TWO)
    assert done is not None and done.launcher == "deepspeed"
    assert list(done.argv) == [
        "deepspeed", "--hostfile", "/run/hostfile", "--num_nodes", "2", "--num_gpus", "4", "--node_rank", "1",
        "--master_addr", "10.0.0.1", "--no_ssh", "--master_port=7000", "train.py", "--deepspeed_config", "ds.json",
    ]
    assert done.hostfile == "/run/hostfile" and done.hostfile_text == "10.0.0.1 slots=4\n10.0.0.2 slots=4\n"
    own = extend_argv(["deepspeed", "-H", "/my/hosts", "--include", "a:0", "--num_accelerators", "1", "t.py"], TWO)
    assert own is not None and own.hostfile is None and "--hostfile" not in own.argv
    assert "--num_nodes" not in own.argv and "--num_gpus" not in own.argv  # DeepSpeed refuses them with --include
    assert _extended(["deepspeed", "t.py"], ONE) == ["deepspeed", "--num_gpus", "2", "--master_port", "29500", "t.py"]


def test_a_string_command_runs_as_a_list_unless_it_uses_shell_syntax():
    plain = extend_string("torchrun  'my train.py' --lr 0.1", "/bin/sh", ONE)
    assert plain is not None and list(plain.argv) == ["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "2", "my train.py", "--lr", "0.1"]
    shell = extend_string("deepspeed train.py --out \"$OUT dir\" && echo done", "/bin/sh", ONE)
    assert shell is not None and list(shell.argv) == [
        "/bin/sh", "-c", "deepspeed --num_gpus 2 --master_port 29500 train.py --out \"$OUT dir\" && echo done",
    ]
    assert extend_string("echo torchrun", "/bin/sh", ONE) is None and extend_string("torchrun 'x", "/bin/sh", ONE) is None


def test_given_options_stop_at_the_program():
    assert given_options("torchrun", ["-m", "--nnodes", "2", "pkg.mod", "--node_rank", "3"]) == {"module": None, "nnodes": "2"}
    assert given_options("deepspeed", ["--num_accelerators=2", "--no_ssh", "t.py"]) == {"num_gpus": "2", "no_ssh": None}


# -- the option tables against the real parsers ----------------------------------------------


def _parser_options(parser: argparse.ArgumentParser):
    options, flags = set(), set()
    for action in parser._actions:
        names = {o.lstrip("-").replace("-", "_") for o in action.option_strings if o.startswith("--")}
        options |= names
        if action.option_strings and action.nargs == 0:
            flags |= names
    return options, flags


def _check_tables(launcher: str, parser: argparse.ArgumentParser, prefixes=()):
    options, flags = _parser_options(parser)
    known, known_flags = lc._known(launcher)
    aliases = set(lc._ALIASES.get(launcher, {}))
    assert flags <= known_flags, flags - known_flags  # a flag taken for a value would hide the program
    missing = {o for o in options - known - aliases if not o.startswith(prefixes)}
    assert not missing, missing


def test_torchrun_tables_match_the_real_parser():
    need_torch()
    from torch.distributed.run import get_args_parser

    _check_tables("torchrun", get_args_parser())


def test_accelerate_tables_match_the_real_parser():
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    from accelerate.commands.launch import launch_command_parser

    _check_tables("accelerate", launch_command_parser(), prefixes=("megatron_lm_", "parallelism_config_"))


def _deepspeed_parse(argv: List[str]) -> argparse.Namespace:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    from deepspeed.launcher.runner import parse_args

    return parse_args(argv)


def test_deepspeed_argv_parses_with_the_real_deepspeed_parser():
    done = extend_argv(["deepspeed", "train.py", "--deepspeed_config", "ds.json"], TWO)
    assert done is not None
    args = _deepspeed_parse(list(done.argv[1:]))
    assert (args.hostfile, args.num_nodes, args.num_gpus, args.node_rank) == ("/run/hostfile", 2, 4, 1)
    assert (args.master_addr, args.master_port, args.no_ssh) == ("10.0.0.1", 29600, True)
    assert (args.user_script, args.user_args) == ("train.py", ["--deepspeed_config", "ds.json"])
    import deepspeed.launcher.runner as runner

    parser_calls = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        parser_calls.append(self)
        return original(self, *a, **k)

    argparse.ArgumentParser.parse_args = capture
    try:
        runner.parse_args(["t.py"])
    finally:
        argparse.ArgumentParser.parse_args = original
    _check_tables("deepspeed", parser_calls[0])


# -- real trainenv train ---------------------------------------------------------------------


def _environ(base: Path, **extra: str):
    return launcher_environ(base.parent, TRAINENV_BASE_DIR=str(base), TRAINENV_RUN_DIR=str(base / "run"),
                            PATH=BIN + os.pathsep + os.environ.get("PATH", os.defpath), **extra)


def test_dry_run_shows_the_extended_argv(tmp_path):
    base = make_tree(tmp_path / "ml", {"train.py": "print(1)\n"})
    done = run_trainenv("train", "--dry-run", env=_environ(
        base, TRAINENV_COMMAND='["torchrun", "--nproc-per-node", "2", "train.py"]',
        MASTER_ADDR="10.0.0.9", MASTER_PORT="23456", RANK="1", WORLD_SIZE="2"))
    assert done.returncode == 0, done.stderr
    argv_line = next(line for line in done.stdout.splitlines() if line.startswith("argv"))
    assert argv_line.split(None, 1)[1] == (
        '["torchrun", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.9", "--master_port", "23456", '
        '"--nproc-per-node", "2", "train.py"]'
    )
    done = run_trainenv("train", "--dry-run", env=_environ(
        base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_DISTRIBUTION="accelerate", TRAINENV_NPROC_PER_NODE="2"))
    assert done.returncode == 0, done.stderr
    assert f'"{PYTHON}", "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "2", "{base}/usercode/train.py"' in done.stdout
    assert not (base / "run").exists() and not (base / "output" / "failure").exists()  # --dry-run writes nothing


def test_a_command_launcher_other_than_the_distribution_is_a_config_error(tmp_path):
    base = make_tree(tmp_path / "ml", {"train.py": "print(1)\n"})
    done = run_trainenv("train", env=_environ(base, TRAINENV_COMMAND="deepspeed train.py", TRAINENV_DISTRIBUTION="torchrun"))
    assert done.returncode == 78, done.stderr
    first = failure(base).splitlines()[0]
    assert first == ("ConfigError: TRAINENV_DISTRIBUTION: torchrun: the command starts its own launcher (deepspeed); "
                     "set the distribution to none or deepspeed, or run the program without the launcher")


def test_deepspeed_without_no_ssh_is_a_config_error_naming_the_version(tmp_path):
    # An older DeepSpeed first on the path (the code dir is): its metadata is all the check reads.
    meta = "Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.14.0\n"
    base = make_tree(tmp_path / "ml", {"train.py": "print(1)\n", "deepspeed-0.14.0.dist-info/METADATA": meta})
    if not Path(BIN, "deepspeed").exists():
        pytest.skip("deepspeed is not installed")
    done = run_trainenv("train", env=_environ(base, TRAINENV_COMMAND="deepspeed train.py", MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="2"), timeout=120)
    assert done.returncode == 78, done.stderr
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_COMMAND: deepspeed 0.14.0 has no --no_ssh"), first
    assert "deepspeed>=0.14.5" in first


@pytest.mark.distributed
def test_plain_torchrun_command_on_two_nodes(tmp_path, record_property):
    """``torchrun torch_allreduce.py`` as the command on both nodes; trainenv adds the node arguments."""
    need_torch()
    port = free_port_pair()
    procs, t0 = [], time.monotonic()
    for node in (0, 1):
        base = make_tree(tmp_path / f"node{node}", {"torch_allreduce.py": TORCH_EXAMPLE})
        env = _environ(base, TRAINENV_COMMAND="torchrun --nproc-per-node 2 torch_allreduce.py", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), RANK=str(node), WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
        procs.append(start([*TRAINENV, "train"], env=env, log_dir=tmp_path))
    results = wait_all(procs, 240.0)
    report_wall_time(record_property, "plain_torchrun_command", time.monotonic() - t0)
    for result in results:
        assert result.returncode == 0, result.describe()
    ranks = sorted((r for result in results for r in json_lines(result.stdout) if "rank" in r), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and all(r["world"] == 4 and r["sum"] == 10 for r in ranks)
    assert {r["rank"] for r in json_lines(results[1].stdout)} == {2, 3}  # node 1's torchrun got --node_rank 1


def test_accelerate_launch_two_processes_on_one_node(tmp_path):
    need_torch()
    if not Path(BIN, "accelerate").exists():
        pytest.skip("accelerate is not installed")
    script = (
        "import json, os\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "print(json.dumps({'rank': dist.get_rank(), 'world': dist.get_world_size(), 'local': os.environ['LOCAL_RANK']}), flush=True)\n"
        "dist.destroy_process_group()\n"
    )
    base = make_tree(tmp_path / "ml", {"train.py": script})
    # accelerate starts several processes on one node through torchrun (--multi_gpu) or mpirun;
    # the script's gloo group needs no GPU. Without trainenv's --num_processes 2 it runs one.
    env = _environ(base, TRAINENV_COMMAND="accelerate launch --multi_gpu train.py", TRAINENV_NPROC_PER_NODE="2",
                   HF_HOME=str(tmp_path / "hf"), GLOO_SOCKET_IFNAME="lo")
    results = wait_all([start([*TRAINENV, "train"], env=env, log_dir=tmp_path)], 180.0)
    assert results[0].returncode == 0, results[0].describe()
    ranks = sorted((r["rank"], r["world"]) for r in json_lines(results[0].stdout) if "rank" in r)
    assert ranks == [(0, 2), (1, 2)], results[0].describe()


ALLREDUCE = (
    "import json, torch, torch.distributed as dist\n"
    "dist.init_process_group('gloo')\n"
    "value = torch.tensor([float(dist.get_rank() + 1)])\n"
    "dist.all_reduce(value)\n"
    "print(json.dumps({'rank': dist.get_rank(), 'world': dist.get_world_size(), 'sum': value.item()}), flush=True)\n"
    "dist.destroy_process_group()\n"
)


def test_plain_torchrun_command_on_one_node_gets_the_processes_per_node(tmp_path):
    """One node exports no PET_* names: without --nproc_per_node torchrun would start one process."""
    need_torch()
    base = make_tree(tmp_path / "ml", {"train.py": ALLREDUCE})
    env = _environ(base, TRAINENV_COMMAND="torchrun train.py", TRAINENV_NPROC_PER_NODE="2", GLOO_SOCKET_IFNAME="lo")
    result = wait_all([start([*TRAINENV, "train"], env=env, log_dir=tmp_path)], 180.0)[0]
    assert result.returncode == 0, result.describe()
    assert sorted((r["rank"], r["world"]) for r in json_lines(result.stdout)) == [(0, 2), (1, 2)], result.describe()


@pytest.mark.distributed
def test_plain_accelerate_command_on_two_nodes(tmp_path, record_property):
    """``accelerate launch --multi_gpu train.py`` on two nodes × 2 processes: trainenv adds
    --num_machines, --machine_rank, --num_processes (the total), --main_process_ip/port."""
    need_torch()
    if not Path(BIN, "accelerate").exists():
        pytest.skip("accelerate is not installed")
    port = free_port_pair()
    procs, t0 = [], time.monotonic()
    for node in (0, 1):
        base = make_tree(tmp_path / f"node{node}", {"train.py": ALLREDUCE})
        env = _environ(base, TRAINENV_COMMAND="accelerate launch --multi_gpu train.py", TRAINENV_NPROC_PER_NODE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(node), WORLD_SIZE="2",
                       HF_HOME=str(tmp_path / f"hf{node}"), GLOO_SOCKET_IFNAME="lo")
        procs.append(start([*TRAINENV, "train"], env=env, log_dir=tmp_path))
    results = wait_all(procs, 240.0)
    report_wall_time(record_property, "plain_accelerate_command", time.monotonic() - t0)
    for result in results:
        assert result.returncode == 0, result.describe()
    ranks = sorted((r["rank"], r["world"], r["sum"]) for result in results for r in json_lines(result.stdout) if "rank" in r)
    assert ranks == [(rank, 4, 10.0) for rank in range(4)], "\n".join(r.describe() for r in results)
    assert {r["rank"] for r in json_lines(results[1].stdout) if "rank" in r} == {2, 3}  # node 1 got --machine_rank 1


@pytest.mark.distributed
def test_plain_deepspeed_command_on_two_nodes_without_ssh(tmp_path, record_property):
    """``deepspeed train.py`` on two nodes: each runs its own launcher (--no_ssh) over trainenv's hostfile."""
    need_torch()
    if not Path(BIN, "deepspeed").exists():
        pytest.skip("deepspeed is not installed")
    port = free_port_pair()
    procs, bases, t0 = [], [], time.monotonic()
    for node in (0, 1):
        base = make_tree(tmp_path / f"node{node}", {"train.py": ALLREDUCE})
        bases.append(base)
        env = _environ(base, TRAINENV_COMMAND="deepspeed train.py", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       RANK=str(node), WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
        procs.append(start([*TRAINENV, "train"], env=env, log_dir=tmp_path))
    results = wait_all(procs, 240.0)
    report_wall_time(record_property, "plain_deepspeed_command", time.monotonic() - t0)
    for result in results:
        assert result.returncode == 0, result.describe()
    ranks = [(r["rank"], r["world"], r["sum"]) for result in results for r in json_lines(result.stdout) if "rank" in r]
    assert sorted(ranks) == [(0, 2, 3.0), (1, 2, 3.0)], "\n".join(r.describe() for r in results)
    hostfiles = list((bases[1] / "run").rglob("hostfile"))
    assert [p.read_text() for p in hostfiles] == ["node0 slots=1\nnode1 slots=1\n"]


def test_distribution_deepspeed_runs_the_entry_point_under_deepspeed(tmp_path):
    need_torch()
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    script = ALLREDUCE + "import sys; print(json.dumps({'args': sys.argv[1:]}), flush=True)\n"
    base = make_tree(tmp_path / "ml", {"train.py": script}, hyperparameters={"lr": 0.5})
    env = _environ(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_DISTRIBUTION="deepspeed", TRAINENV_NPROC_PER_NODE="2",
                   TRAINENV_MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    result = wait_all([start([*TRAINENV, "train"], env=env, log_dir=tmp_path)], 180.0)[0]
    assert result.returncode == 0, result.describe()
    lines = json_lines(result.stdout)
    assert sorted((r["rank"], r["world"]) for r in lines if "rank" in r) == [(0, 2), (1, 2)], result.describe()
    assert sorted(r["args"] for r in lines if "args" in r) == [["--local_rank=0", "--lr", "0.5"], ["--local_rank=1", "--lr", "0.5"]]


def test_trainenv_local_extends_a_torchrun_command(tmp_path):
    need_torch()
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text(ALLREDUCE)
    env = launcher_environ(tmp_path, PATH=BIN + os.pathsep + os.environ.get("PATH", os.defpath), GLOO_SOCKET_IFNAME="lo")
    argv = [*TRAINENV, "local", "--source-dir", str(source), "--job-dir", str(tmp_path / "job"),
            "--command", "torchrun train.py", "--nproc-per-node", "2"]
    result = wait_all([start(argv, env=env, log_dir=tmp_path)], 180.0)[0]
    assert result.returncode == 0, result.describe()
    assert sorted((r["rank"], r["world"]) for r in json_lines(result.stdout)) == [(0, 2), (1, 2)], result.describe()
