#!/usr/bin/env python3
"""Serving side by side: trainenv's embedded server (one process, and N pre-forked workers) next to
FastAPI + uvicorn with 1 and N workers, on the same model and the same small JSON request.

Every server serves the same 3-feature linear model in pure Python on ``POST /invocations``
(``[[5.1, 3.5, 1.4]]`` -> ``[3.175]``, checked before the load), with its defaults (access log on,
for trainenv 4 handler threads per process; uvicorn with uvloop + httptools):

| name | command |
|---|---|
| ``trainenv-1p`` | ``python -m trainenv.serving`` (one process) |
| ``trainenv-Np`` | the same with ``TRAINENV_SERVING_WORKERS=N`` (pre-forked workers on one socket) |
| ``trainenv-gunicorn-Nw`` | ``TRAINENV_SERVER=gunicorn``, N workers (only with ``--gunicorn``) |
| ``uvicorn-1w`` / ``uvicorn-Nw`` | ``uvicorn app:app --workers 1`` / ``N`` (FastAPI, ``async def``, ``await request.json()``) |
| ``kserve-1w`` / ``kserve-Nw`` | KServe's ``ModelServer(workers=1 / N)`` with a ``kserve.Model`` (only with ``--kserve``) |
| ``trainenv-1p-v2`` / ``trainenv-Np-v2`` | the trainenv servers above, on the KServe v2 route (only with ``--kserve``) |

With ``--kserve``, KServe's ModelServer and trainenv are compared on ``POST
/v2/models/model/infer`` with the same v2 JSON request (one ``FP32`` input of shape ``[1, 3]``);
KServe runs from its own venv under ``benchmarks/.cache/kserve`` (``pip install kserve``, built on
first use).

Method: every server is started once and stays up. For each concurrency (16 and 64 keep-alive
connections), each server gets a 2 s warm-up, then ``--rounds`` rounds of ``wrk -t1 -c C -d S``;
the order of the servers is shuffled (seeded) every round, so a noisy neighbour hits all alike.
Per run: req/s, p50/p99 (wrk), errors (non-2xx, socket errors, timeouts), the server's CPU per
request (utime+stime of its whole process tree, from ``/proc``) and its peak RSS (sum over the
tree, sampled every 0.2 s). The report gives medians per server and, per pair (trainenv vs
uvicorn at the same process count), the median of the per-round ratios. wrk shares the machine
with the servers, as in production load tests on one box.

FastAPI + uvicorn run from their own venv under ``benchmarks/.cache/fastapi-uvicorn`` (built on
first use with pip: ``fastapi``, ``uvicorn[standard]``), never the project's venv. ``wrk`` must be
on ``PATH`` (Debian: ``apt-get install wrk``).

Run: ``.venv/bin/python benchmarks/bench_serving_peers.py`` (about 4 minutes; ``--quick``: 1 round
of 5 s, about 1 minute; ``--json`` for the raw numbers). To judge a change to the server, copy
``src/`` before it and pass ``--baseline <copy>``: both trainenv servers then also run from the
copy (``*-base``), in the same interleaved rounds, with the per-round ratios current / base.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

BODY = "[[5.1, 3.5, 1.4]]"
ANSWER = [3.175]
PEER_DIR = _bench.CACHE / "fastapi-uvicorn"
KSERVE_DIR = _bench.CACHE / "kserve"
V2_PATH = "/v2/models/model/infer"
V2_BODY = '{"id":"1","inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[5.1,3.5,1.4]}]}'
KSERVE_APP = """
import sys
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from linear import predict


class Linear(Model):
    def __init__(self):
        super().__init__("model")
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None):
        tensor = payload.inputs[0]
        width = tensor.shape[-1]
        flat = list(tensor.data)
        out = predict([flat[i:i + width] for i in range(0, len(flat), width)])
        output = InferOutput(name="output0", shape=[len(out)], datatype="FP64", data=out)
        return InferResponse(model_name=self.name, response_id=payload.id or "0", infer_outputs=[output])


if __name__ == "__main__":
    ModelServer(http_port=int(sys.argv[1]), workers=int(sys.argv[2]), enable_grpc=False).start([Linear()])
"""
MODEL = """
WEIGHTS, BIAS = (0.5, -0.25, 1.0), 0.1

def predict(rows):
    return [sum(w * x for w, x in zip(WEIGHTS, row)) + BIAS for row in rows]
"""
HANDLER = """
from linear import predict

def model_fn(model_dir):
    return predict

def predict_fn(data, model):
    return model(data)
"""
FASTAPI_APP = """
from fastapi import FastAPI, Request
from linear import predict

app = FastAPI()

@app.get("/ping")
async def ping():
    return {"status": "ready"}

@app.post("/invocations")
async def invocations(request: Request):
    return predict(await request.json())
"""
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def venv_python(where: Path, packages: List[str]) -> str:
    """The interpreter of a peer's own venv under ``where``; built on first use."""
    venv = where / "venv"
    python = venv / "bin" / "python"
    if not (where / "ok").exists():
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        _bench.log(f"building a peer venv ({', '.join(packages)}) in {venv} (once) ...")
        base = _bench.base_interpreter(_bench.trainenv_python(None))
        for step in ([base, "-m", "venv", str(venv)],
                     [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages]):
            subprocess.run(step, check=True, env=_bench.base_env(), timeout=900)
        (where / "ok").write_text("ok\n")
    return str(python)


def peer_python() -> str:
    """The FastAPI + uvicorn venv's interpreter."""
    return venv_python(PEER_DIR, ["fastapi", "uvicorn[standard]"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    """One server, started once; its process tree's CPU and RSS from /proc."""

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], cwd: Path, port: int,
                 path: str = "/invocations", body: str = BODY, of: "Running | None" = None) -> None:
        self.name, self.port, self.path, self.body = name, port, path, body
        self.script: Path = Path()
        self.proc = of.proc if of is not None else subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.peak_rss = 0

    def answer_ok(self, answer: Any) -> bool:
        if self.path == V2_PATH:
            return isinstance(answer, dict) and answer.get("outputs", [{}])[0].get("data") == ANSWER
        return bool(answer == ANSWER)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{self.path}"
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(url, self.body.encode(), {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    answer = json.loads(response.read())
                if not self.answer_ok(answer):
                    raise SystemExit(f"{self.name} answered {answer}, expected {ANSWER}")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{self.name} exited {self.proc.returncode} at start")
                time.sleep(0.05)
        raise SystemExit(f"{self.name} not ready within {timeout} s")

    def tree(self) -> List[int]:
        parents: Dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    pass
        pids, frontier = [self.proc.pid], [self.proc.pid]
        while frontier:
            frontier = [pid for pid, parent in parents.items() if parent in frontier]
            pids.extend(frontier)
        return pids

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        total = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/status") as status:
                    total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def load(server: Running, connections: int, seconds: float) -> Dict[str, Any]:
    """One wrk run against ``server``, with its CPU per request and peak RSS."""
    done = threading.Event()
    peak = [0.0]

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], server.rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu = server.cpu_seconds()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "2s", "-s", str(server.script),
         f"http://127.0.0.1:{server.port}{server.path}"],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout
    cpu = server.cpu_seconds() - cpu
    done.set()
    sampler.join()
    result = json.loads(out.strip().splitlines()[-1])
    rps = result["requests"] / (result["duration_us"] / 1e6)
    return {"rps": rps, "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
            "errors": result["errors"], "cpu_us": cpu / max(1, result["requests"]) * 1e6, "rss_mib": peak[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--python", default=None, help="interpreter of the trainenv venv (default: <repo>/.venv/bin/python)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the multi-process servers (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--gunicorn", action="store_true", help="also trainenv on gunicorn workers")
    parser.add_argument("--kserve", action="store_true", help="also KServe's ModelServer, on the v2 route")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", default=None, metavar="SRC",
                        help="also trainenv from another source tree (e.g. a copy of src/ before a change), "
                             "named *-base and compared with the current one")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 5.0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH (Debian: apt-get install wrk)")
    python, peer = _bench.trainenv_python(args.python), peer_python()
    n = args.workers
    work = Path(tempfile.mkdtemp(prefix="bench-serving-peers-"))
    (work / "linear.py").write_text(textwrap.dedent(MODEL))
    (work / "app.py").write_text(textwrap.dedent(FASTAPI_APP))
    code = work / "ml" / "model" / "code"
    code.mkdir(parents=True)
    (code / "inference.py").write_text(textwrap.dedent(HANDLER))
    (work / "kserve_app.py").write_text(textwrap.dedent(KSERVE_APP))
    scripts = {}
    for path, body in (("/invocations", BODY), (V2_PATH, V2_BODY)):
        scripts[path] = work / f"post{len(scripts)}.lua"
        scripts[path].write_text(WRK_SCRIPT % body)

    def trainenv(name: str, src: str = "", **extra: str) -> Running:
        port = free_port()
        path = os.pathsep.join([str(work)] + ([src] if src else []))
        env = _bench.base_env(TRAINENV_BASE_DIR=str(work / "ml"), TRAINENV_SERVING_HOST="127.0.0.1",
                              TRAINENV_SERVING_PORT=str(port), PYTHONPATH=path, **extra)
        return Running(name, [python, "-m", "trainenv.serving"], env, work, port)

    def uvicorn(name: str, workers: int) -> Running:
        port = free_port()
        argv = [peer, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
        return Running(name, argv, _bench.base_env(PYTHONPATH=str(work)), work, port)

    def kserve(name: str, workers: int) -> Running:
        port = free_port()
        argv = [kserve_python, str(work / "kserve_app.py"), str(port), str(workers)]
        return Running(name, argv, _bench.base_env(PYTHONPATH=str(work)), work, port, V2_PATH, V2_BODY)

    servers = [
        trainenv("trainenv-1p", TRAINENV_SERVING_WORKERS="1"),
        trainenv(f"trainenv-{n}p", TRAINENV_SERVING_WORKERS=str(n)),
        uvicorn("uvicorn-1w", 1),
        uvicorn(f"uvicorn-{n}w", n),
    ]
    if args.kserve:
        kserve_python = venv_python(KSERVE_DIR, ["kserve"])
        servers += [Running(f"{s.name}-v2", [], {}, work, s.port, V2_PATH, V2_BODY, of=s) for s in servers[:2]]
        servers += [kserve("kserve-1w", 1), kserve(f"kserve-{n}w", n)]
    if args.baseline:
        base_src = str(Path(args.baseline).resolve())
        servers += [trainenv("trainenv-1p-base", base_src, TRAINENV_SERVING_WORKERS="1"),
                    trainenv(f"trainenv-{n}p-base", base_src, TRAINENV_SERVING_WORKERS=str(n))]
    if args.gunicorn:
        servers.append(trainenv(f"trainenv-gunicorn-{n}w", TRAINENV_SERVER="gunicorn", TRAINENV_SERVING_WORKERS=str(n)))
    pairs = [("trainenv-1p", "uvicorn-1w"), (f"trainenv-{n}p", f"uvicorn-{n}w")]
    if args.baseline:
        pairs += [("trainenv-1p-base", "uvicorn-1w"), (f"trainenv-{n}p-base", f"uvicorn-{n}w"),
                  ("trainenv-1p", "trainenv-1p-base"), (f"trainenv-{n}p", f"trainenv-{n}p-base")]
    if args.gunicorn:
        pairs.append((f"trainenv-gunicorn-{n}w", f"uvicorn-{n}w"))
    if args.kserve:
        pairs += [("trainenv-1p-v2", "kserve-1w"), (f"trainenv-{n}p-v2", f"kserve-{n}w")]
    for server in servers:
        server.script = scripts[server.path]
    runs: Dict[str, Dict[int, List[Dict[str, Any]]]] = {s.name: {c: [] for c in args.concurrency} for s in servers}
    rng = random.Random(args.seed)
    try:
        for server in servers:
            server.wait_ready()
        for c in args.concurrency:
            for server in servers:
                load(server, c, 2.0)  # warm-up
            for round_ in range(args.rounds):
                order = servers[:]
                rng.shuffle(order)
                for server in order:
                    result = load(server, c, args.seconds)
                    runs[server.name][c].append(result)
                    _bench.log(f"c={c} round {round_ + 1}: {server.name:24} {result['rps']:8.0f} req/s "
                               f"p99 {result['p99_ms']:.1f} ms, {result['cpu_us']:.0f} us CPU/req")
    finally:
        for server in servers:
            if server.name.endswith("-v2"):
                continue  # the same process as its /invocations twin
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    report: Dict[str, Any] = {"machine": _bench.machine(python), "args": vars(args), "runs": runs, "pairs": {}}
    lines = [_bench.machine_text(report["machine"]), ""]
    for c in args.concurrency:
        rows = []
        for server in servers:
            rs = runs[server.name][c]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            rows.append([server.name, f"{med['rps']:,.0f}", f"{med['p50_ms']:.2f} / {med['p99_ms']:.1f}",
                         sum(r["errors"] for r in rs), f"{med['cpu_us']:.0f}", f"{max(r['rss_mib'] for r in rs):.0f}"])
        lines += [f"c={c}: medians of {args.rounds} interleaved {args.seconds:g} s runs", "",
                  _bench.table(["server", "req/s", "p50 / p99 ms", "errors", "CPU us/req", "peak RSS MiB"], rows), ""]
        rows = []
        for a, b in pairs:
            def per_round(key: str) -> float:
                return statistics.median(x[key] / y[key] for x, y in zip(runs[a][c], runs[b][c]) if y[key])
            ratios = {k: per_round(k) for k in ("rps", "p99_ms", "cpu_us", "rss_mib")}
            report["pairs"][f"{a}/{b}@{c}"] = ratios
            rows.append([f"{a} / {b}", f"**{ratios['rps']:.2f}**", f"{ratios['p99_ms']:.2f}", f"{ratios['cpu_us']:.2f}",
                         f"{ratios['rss_mib']:.2f}"])
        lines += [_bench.table(["pair (c=%d)" % c, "req/s ratio", "p99 ratio", "CPU/req ratio", "RSS ratio"], rows), ""]
    _bench.emit(report, args.json, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
