"""Overhead of ``trainenv local --image`` over a bare ``podman run`` of the same image and job.

Usage::

    python benchmarks/bench_local_image.py            # builds the image (~10 s), then ~1 min of runs
    python benchmarks/bench_local_image.py --runs 20 --json

The image is built offline into a temp podman state dir (``tests/image_support.py``; removed at
the end). Timed, in interleaved rounds (a new seeded order each round, after one warm-up run of
each, ``--warmup``), medians of wall time per run:

- ``bare``: ``podman run --rm <host flags> --network none -e TRAINENV_COMMAND=true IMG train``
  (trainenv train runs ``true`` in the container: the same job);
- ``local``: ``trainenv local --image IMG --command true --network loopback`` (job dir, image
  inspect, create, start --attach, exit code, rm by label);
- ``floor``: ``podman run --rm <host flags> --network none IMG true`` (no trainenv at all).

SageMaker's local mode needs docker compose, which this machine does not have: not compared.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from image_support import Podman, PodmanUnavailable, build_image_offline  # noqa: E402

IMAGE = "localhost/trainenv-bench:cpu"


def _time(argv: List[str], env: Dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=300)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv[:6])} ... exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trainenv-bench-image-"))
    had_var_lib = Path("/var/lib/containers").exists()
    try:
        podman = Podman(work / "podman")
        build_image_offline(podman, work, REPO, IMAGE)
    except PodmanUnavailable as exc:
        print(f"cannot run containers here: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 1
    try:
        env = dict(podman.env, TRAINENV_CONTAINER_ENGINE=shlex.join([str(podman.executable), *podman.state_args]))
        trainenv = str(REPO / ".venv" / "bin" / "trainenv")
        jobs = work / "jobs"
        jobs.mkdir()
        commands = {
            "floor": podman.run_argv(IMAGE, "true"),
            "bare": podman.run_argv(IMAGE, "train", options=["-e", "TRAINENV_COMMAND=true"]),
            "local": [trainenv, "local", "--image", IMAGE, "--command", "true", "--network", "loopback"],
        }
        for _ in range(args.warmup):
            for argv in commands.values():
                _time(argv, env, jobs)
        times: Dict[str, List[float]] = {name: [] for name in commands}
        rng = random.Random(12)
        for _ in range(args.runs):
            order = list(commands)
            rng.shuffle(order)
            for name in order:
                times[name].append(_time(commands[name], env, jobs))
        medians = {name: statistics.median(values) for name, values in times.items()}
        result = {
            "runs": args.runs,
            "median_s": {name: round(value, 4) for name, value in medians.items()},
            "local_over_bare": round(medians["local"] / medians["bare"], 3),
            "local_minus_bare_s": round(medians["local"] - medians["bare"], 4),
            "bare_over_floor": round(medians["bare"] / medians["floor"], 3),
            "compose": "not available on this machine",
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for name, value in medians.items():
                print(f"{name:6} median {value * 1000:8.1f} ms  ({shlex.join(commands[name][-4:])})")
            print(f"local / bare = {result['local_over_bare']}  (+{result['local_minus_bare_s'] * 1000:.0f} ms); "
                  f"bare / floor = {result['bare_over_floor']}; docker compose: not available")
        return 0
    finally:
        podman.reset()
        shutil.rmtree(work, ignore_errors=True)
        if not had_var_lib:  # podman's blob-info cache ignores --root (podman 4.3)
            shutil.rmtree("/var/lib/containers", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
