"""Multi-node launch cost: a 2-node x 2-process torchrun job through ``trainenv train`` vs bare torchrun.

Usage::

    python benchmarks/bench_distributed.py              # table; about 2-4 min on 2 cores
    python benchmarks/bench_distributed.py --json --runs 7

Both setups run ``examples/distributed/torch_allreduce.py`` (gloo all-reduce, CPU) as two
"nodes" on this machine over loopback, started at the same moment:

* **bare torchrun**: ``python -m torch.distributed.run --nnodes 2 --nproc-per-node 2
  --node-rank N --rdzv-backend static --rdzv-endpoint 127.0.0.1:PORT torch_allreduce.py``
  on each node;
* **trainenv train**: one ``trainenv train`` per node with its own job tree and PAI DLC's
  variables (``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``, ``RANK=N``, ``WORLD_SIZE=2``,
  ``NPROC_PER_NODE=2``) and ``TRAINENV_DISTRIBUTION=torchrun``: trainenv's start-up, its torch
  check, node 1's wait for node 0's store, then the same torchrun command.

Measured per run: **time to first all-reduce** (from spawning both nodes to the moment the
last rank's ``all_reduce`` returned, from the wall-clock time each rank prints) and the
**wall time** until both nodes exited. Runs alternate between the setups (the order flips
every round) after one untimed warm-up of each; the report gives medians and the ratio.
Goal: trainenv / bare <= 1.1 for the time to first all-reduce. Almost all of either figure
is six interpreters importing torch (~2.5 s each) on the machine's cores, so other load on
the machine makes the figures noisy (the report shows the CPU load seen before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

import _bench as b

EXAMPLE = b.REPO / "examples" / "distributed" / "torch_allreduce.py"
NODES, NPROC = 2, 2
TIMEOUT = 300.0


def free_port() -> int:
    """A TCP port nothing listens on right now, for one run's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def json_objects(text: str) -> List[dict]:
    """Every JSON object in ``text``, wherever it starts (launchers add their own lines)."""
    decoder, found, pos = json.JSONDecoder(), [], text.find("{")
    while pos >= 0:
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        pos = text.find("{", end)
    return found


def trainenv_script(python: str) -> List[str]:
    script = Path(python).parent / "trainenv"
    return [str(script), "train"] if script.exists() else [python, "-m", "trainenv", "train"]


def node_tree(work: Path, name: str) -> Path:
    base = work / name
    (base / "usercode").mkdir(parents=True, exist_ok=True)
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE, base / "usercode" / EXAMPLE.name)
    return base


def commands(setup: str, python: str, work: Path, port: int) -> List[Dict[str, Any]]:
    """argv, env and cwd of each node for one run of ``setup``."""
    common = b.base_env(GLOO_SOCKET_IFNAME="lo", TMPDIR=str(work))
    nodes = []
    for rank in range(NODES):
        base = node_tree(work, f"node{rank}")
        if setup == "bare torchrun":
            argv = [python, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", str(NPROC),
                    "--node-rank", str(rank), "--rdzv-backend", "static", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--max-restarts", "0", str(base / "usercode" / EXAMPLE.name)]
            env = dict(common)
        else:
            argv = trainenv_script(python)
            env = dict(common, TRAINENV_BASE_DIR=str(base), TRAINENV_RUN_DIR=str(base / "run"),
                       TRAINENV_DISTRIBUTION="torchrun", TRAINENV_ENTRY_POINT=EXAMPLE.name, MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(NODES), NPROC_PER_NODE=str(NPROC))
        nodes.append({"argv": argv, "env": env, "cwd": str(base / "usercode"), "out": work / f"{setup[:4]}-{rank}.out",
                      "err": work / f"{setup[:4]}-{rank}.err"})
    return nodes


def run_once(setup: str, python: str, work: Path) -> Dict[str, float]:
    """Start both nodes at once; seconds to the last rank's all-reduce and to both exits."""
    nodes = commands(setup, python, work, free_port())
    procs = []
    started_wall, started = time.time(), time.perf_counter()
    for node in nodes:
        with open(node["out"], "wb") as out, open(node["err"], "wb") as err:
            procs.append(subprocess.Popen(node["argv"], env=node["env"], cwd=node["cwd"], stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=err, start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    wall = time.perf_counter() - started
    times = []
    for node, proc in zip(nodes, procs):
        if proc.returncode != 0:
            b.log(f"[{setup}] a node exited {proc.returncode}: {' '.join(node['argv'])}")
            b.log(Path(node["err"]).read_text(errors="replace")[-3000:])
            raise SystemExit(1)
        times += [row["time"] for row in json_objects(Path(node["out"]).read_text(errors="replace")) if "time" in row]
    if len(times) != NODES * NPROC:
        b.log(f"[{setup}] expected {NODES * NPROC} ranks, saw {len(times)}")
        raise SystemExit(1)
    return {"first_allreduce": max(times) - started_wall, "wall": wall}


def main() -> None:
    parser = b.arg_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    runs, warmup = args.runs or 5, args.warmup if args.warmup is not None else 1
    python = b.trainenv_python(args.python)
    info = b.machine(python)
    work = b.scratch("bench-distributed-")
    setups = ["bare torchrun", "trainenv train"]
    samples: Dict[str, Dict[str, List[float]]] = {s: {"first_allreduce": [], "wall": []} for s in setups}
    try:
        for setup in setups:
            for _ in range(warmup):
                run_once(setup, python, work)
        for round_number in range(runs):
            order = setups if round_number % 2 == 0 else list(reversed(setups))
            for setup in order:
                result = run_once(setup, python, work)
                for key, value in result.items():
                    samples[setup][key].append(value)
                b.log(f"  run {round_number + 1}/{runs} {setup}: first all-reduce {result['first_allreduce']:.2f} s, "
                      f"wall {result['wall']:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["busy_after_pct"] = b.cpu_busy()
    results = {s: {k: b.summary(v, scale=1.0) for k, v in samples[s].items()} for s in setups}
    bare = results["bare torchrun"]["first_allreduce"]["median"]
    ours = results["trainenv train"]["first_allreduce"]["median"]
    ratio = b.ratio(ours, bare)
    goals = [b.goal("time to first all-reduce, trainenv / bare torchrun (median)", ratio, 1.1, "x",
                    f"{ours:.2f} s vs {bare:.2f} s")]
    report = {"benchmark": "distributed", "machine": info, "runs": runs, "warmup": warmup,
              "nodes": NODES, "nproc_per_node": NPROC, "results": results, "samples": samples, "goals": goals}
    rows = []
    for setup in setups:
        first, wall = results[setup]["first_allreduce"], results[setup]["wall"]
        rows.append([setup, first["median"], first["min"], first["max"], wall["median"],
                     b.ratio(first["median"], bare)])
    text = "\n".join([
        "Multi-node launch: 2 nodes x 2 processes, torchrun + gloo all-reduce, on loopback",
        b.machine_text(info),
        "",
        b.table(["setup", "first all-reduce s (median)", "min", "max", "wall s (median)", "ratio"], rows),
        "",
        f"{runs} runs each, interleaved, after {warmup} warm-up run(s) each",
        b.goals_text(goals),
    ])
    b.emit(report, args.json, text)


if __name__ == "__main__":
    main()
