#!/usr/bin/env python3
"""Batching benchmark: the same model served with batching off and on, side by side.

The model has a fixed cost per call and a small cost per input, as a GPU model has (kernel
launches and transfers, then a little per row): ``5 ms + 0.2 ms x inputs``, spent in
``time.sleep`` so it releases the GIL as a GPU call does. Off: ``predict_fn`` per request
(``TRAINENV_SERVING_MAX_BATCH_SIZE=1``). On: ``predict_batch_fn`` with
``TRAINENV_SERVING_MAX_BATCH_SIZE=32`` and the default delay (5 ms), and with no delay (0: batches
form only while all handler threads are busy). The servers are
``python -m trainenv.serving`` (stdlib, one process, 4 handler threads), started once; the load
(small-JSON ``POST /invocations`` on keep-alive connections, ``bench_serving.py load``) goes to one
then the next, at 16 and 64 connections, in ``--rounds`` interleaved rounds (the order alternates
each round), after a warm-up. Printed: req/s, p50 and p99 per configuration (median over the rounds),
the on/off ratios of each round, and the mean batch size the model saw.

Run: ``.venv/bin/python benchmarks/bench_batching.py`` (about 2 minutes; ``--quick`` about 40 s).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List

from bench_serving import free_port, load, wait_status

HANDLER = """
import threading
import time

FIXED_S, PER_ITEM_S = 0.005, 0.0002
_lock = threading.Lock()
_seen = {"calls": 0, "inputs": 0}


def _count(inputs):
    with _lock:
        _seen["calls"] += 1
        _seen["inputs"] += inputs


def predict_fn(data, model):
    _count(1)
    time.sleep(FIXED_S + PER_ITEM_S)
    return [len(data)]


def predict_batch_fn(inputs, model):
    _count(len(inputs))
    time.sleep(FIXED_S + PER_ITEM_S * len(inputs))
    return [[len(data)] for data in inputs]


def execution_parameters_fn():  # the benchmark reads the call count here
    with _lock:
        return dict(_seen)
"""

CONFIGS = {
    "batching off": {"TRAINENV_SERVING_MAX_BATCH_SIZE": "1"},
    "batching on (32, 5 ms)": {"TRAINENV_SERVING_MAX_BATCH_SIZE": "32", "TRAINENV_SERVING_MAX_BATCH_DELAY_MS": "5"},
    "batching on (32, 0 ms)": {"TRAINENV_SERVING_MAX_BATCH_SIZE": "32", "TRAINENV_SERVING_MAX_BATCH_DELAY_MS": "0"},
}


def counts(port: int) -> Dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/execution-parameters")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="2 s runs, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2.0, 2

    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINENV_", "SAGEMAKER_", "AIP_", "SM_"))}
    runs: Dict[str, Dict[int, List[dict]]] = {name: {16: [], 64: []} for name in CONFIGS}
    batch_sizes: Dict[str, float] = {}
    procs: Dict[str, subprocess.Popen] = {}
    ports: Dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        code = Path(tmp) / "ml" / "model" / "code"
        code.mkdir(parents=True)
        (code / "inference.py").write_text(textwrap.dedent(HANDLER))
        try:
            for name, settings in CONFIGS.items():
                ports[name] = free_port()
                env = dict(
                    keep, TRAINENV_BASE_DIR=str(Path(tmp) / "ml"), TRAINENV_SERVING_HOST="127.0.0.1",
                    TRAINENV_SERVING_PORT=str(ports[name]), TRAINENV_SERVING_ACCESS_LOG="false", **settings,
                )
                with open(Path(tmp) / f"{len(procs)}.log", "ab") as log:
                    procs[name] = subprocess.Popen(
                        [sys.executable, "-m", "trainenv.serving"], env=env, stdout=log, stderr=log, start_new_session=True
                    )
                wait_status(ports[name], "GET", "/ping", None, time.monotonic())
                load(ports[name], 16, 1.0)  # warm-up
            before = {name: counts(port) for name, port in ports.items()}
            for round_ in range(args.rounds):
                order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
                for concurrency in (16, 64):
                    for name in order:
                        runs[name][concurrency].append(load(ports[name], concurrency, args.seconds))
                print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
            for name, port in ports.items():
                after = counts(port)
                calls = after["calls"] - before[name]["calls"]
                batch_sizes[name] = (after["inputs"] - before[name]["inputs"]) / calls if calls else 0.0
        finally:
            for proc in procs.values():
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)

    off, *ons = list(CONFIGS)
    print()
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; model: 5 ms + 0.2 ms per input per call;"
          f" {args.rounds} rounds x {args.seconds:g} s")
    print(f"{'configuration':26} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'mean batch':>10}")
    for name in CONFIGS:
        for concurrency, rows in runs[name].items():
            print(
                f"{name:26} {concurrency:>5} {statistics.median(r['rps'] for r in rows):>8.0f}"
                f" {statistics.median(r['p50_ms'] for r in rows):>8.2f} {statistics.median(r['p99_ms'] for r in rows):>8.2f}"
                f" {sum(r['errors'] for r in rows):>6} {batch_sizes[name]:>10.1f}"
            )
    ratios = {
        f"{on} / off, {c} connections": [round(b["rps"] / a["rps"], 2) for a, b in zip(runs[off][c], runs[on][c]) if a["rps"]]
        for on in ons
        for c in (16, 64)
    }
    for what, values in ratios.items():
        print(f"req/s {what}, per round: {', '.join(f'{v:.2f}x' for v in values)}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratios": ratios, "mean_batch": batch_sizes}, indent=2))
    return 1 if any(r["errors"] for rows in runs.values() for c in rows.values() for r in c) else 0


if __name__ == "__main__":
    sys.exit(main())
