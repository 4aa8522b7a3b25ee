#!/usr/bin/env python3
"""Serving benchmark: trainenv's stdlib and gunicorn servers next to plain stdlib baselines.

Loopback only, bounded in time. What it measures, for a trivial echo handler (so the numbers
are server overhead; any real model dominates them):

1. **Start-up**: from ``Popen`` to the first ``GET /ping`` 200 (polled every 5 ms), then to the
   first ``POST /invocations`` 200; the median of ``--starts`` runs.
2. **Throughput and latency**: small-JSON ``POST /invocations`` (an 8-float JSON body)
   at 1 and 16 keep-alive connections for ``--seconds`` each, after a 2 s warm-up: requests/s,
   p50, p99, errors (any non-200, reset or 5 s stall).
3. **Soak**: ``--soak`` seconds at 16 connections against each trainenv server; must end with 0 errors.

The load generator is this file run as ``bench_serving.py load ...`` in its own process: one
thread, non-blocking sockets and ``selectors``, pre-built request bytes, just enough response
parsing (status line, ``Content-Length``, ``Connection``). It runs on the same 2 cores as the
server, so it competes with it, as ``wrk`` did for the anchors below.

Servers:

* ``trainenv serve (CLI)``: the image's entry point, start-up only (it adds click's import).
* ``trainenv stdlib``: ``python -m trainenv.serving`` (defaults: 4 handler threads, access log on).
* ``trainenv gunicorn``: the same with ``TRAINENV_SERVER=gunicorn``, 2 workers x 4 threads.
* ``baseline plain``: ``http.server.ThreadingHTTPServer`` as shipped (HTTP/1.0, backlog 5).
* ``baseline tuned``: the same with HTTP/1.1 keep-alive, one buffered write, backlog 128.

Run: ``.venv/bin/python benchmarks/bench_serving.py`` (about 4 minutes; ``--quick`` about 1.5).
Bytecode caches are written and reused (one untimed start first), as for an installed package.
Exit status 1 if a soak run saw any error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BODY = b"[[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]"


HANDLER = """
def predict_fn(data, model):
    return data
"""

BASELINE = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TUNED = sys.argv[2] == "tuned"

class Handler(BaseHTTPRequestHandler):
    if TUNED:
        protocol_version = "HTTP/1.1"
        wbufsize = 65536

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if TUNED:
            self.wfile.flush()

    def do_GET(self):
        self._send(200, b"{}") if self.path == "/ping" else self._send(404, b"{}")

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            self._send(200, json.dumps(json.loads(data)).encode())
        except ValueError:
            self._send(400, b'{"error": "bad json"}')

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128 if TUNED else 5

Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

# Measured earlier (2-core VM, wrk -t1, medians of 3 passes); not rerun here.
ANCHORS = [
    ("sagemaker-containers serve (nginx+gevent x2)", 2.87, 919, 1618, 29.0),
    ("sagemaker-containers worker (gevent x2)", 1.46, 1569, 2741, 227.0),
    ("sagemaker-inference + MMS 1.1.11", 2.50, 1003, 1764, 22.0),
]


# -- load generator (runs in its own process) ---------------------------------------------------


class _Conn:
    __slots__ = ("sock", "buffer", "sent_at", "connected")

    def __init__(self) -> None:
        self.sock: Optional[socket.socket] = None
        self.buffer = b""
        self.sent_at = 0.0
        self.connected = False


def _parse(buffer: bytes) -> Optional[Tuple[int, int, bool]]:
    """(status, total length, must close) of a complete response at the buffer start, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].decode("latin-1").lower()
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    close = lines[0].startswith("http/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        value = value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value == "close" if not lines[0].startswith("http/1.0") else value != "keep-alive"
    total = end + 4 + length
    if len(buffer) < total:
        return None
    return status, total, close


def run_load(port: int, concurrency: int, seconds: float) -> Dict[str, object]:
    request = (
        b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
    )
    selector = selectors.DefaultSelector()
    latencies: List[float] = []
    statuses: Dict[int, int] = {}
    errors: Dict[str, int] = {}
    conns = [_Conn() for _ in range(concurrency)]

    def start(conn: _Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        conn.sock, conn.buffer, conn.connected = sock, b"", False
        conn.sent_at = time.perf_counter()
        selector.register(sock, selectors.EVENT_WRITE, conn)

    def restart(conn: _Conn, reason: Optional[str]) -> None:
        if reason:
            errors[reason] = errors.get(reason, 0) + 1
        if conn.sock is not None:
            try:
                selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
        start(conn)

    def send(conn: _Conn) -> None:
        conn.sent_at = time.perf_counter()
        try:
            conn.sock.sendall(request)  # 180 bytes: fits the socket buffer at once
        except OSError as exc:
            restart(conn, type(exc).__name__)

    started = time.perf_counter()
    deadline = started + seconds
    for conn in conns:
        start(conn)
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        for key, _ in selector.select(timeout=0.05):
            conn = key.data
            if not conn.connected:
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    restart(conn, os.strerror(err))
                    continue
                conn.connected = True
                selector.modify(conn.sock, selectors.EVENT_READ, conn)
                send(conn)
                continue
            try:
                data = conn.sock.recv(65536)
            except OSError as exc:
                restart(conn, type(exc).__name__)
                continue
            if not data:
                restart(conn, "closed before the response" if not conn.buffer else "truncated response")
                continue
            conn.buffer += data
            parsed = _parse(conn.buffer)
            if parsed is None:
                continue
            status, total, close = parsed
            finished = time.perf_counter()
            latencies.append(finished - conn.sent_at)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
            conn.buffer = conn.buffer[total:]
            if close:
                restart(conn, None)
            else:
                send(conn)
        stalled = time.perf_counter() - 5.0
        for conn in conns:
            if conn.sent_at < stalled:
                restart(conn, "no response in 5 s")
    elapsed = time.perf_counter() - started
    for conn in conns:
        if conn.sock is not None:
            conn.sock.close()
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000.0
            if latencies
            else float("nan")
        )

    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "rps": round(ok / elapsed, 1),
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def load(port: int, concurrency: int, seconds: float) -> Dict[str, object]:
    """``run_load`` in a separate process (the client must not share the driver's GIL)."""
    out = subprocess.run(
        [sys.executable, __file__, "load", str(port), str(concurrency), str(seconds)],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    return json.loads(out.stdout)


# -- servers ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: List[str], env: Dict[str, str], log: Path, load: bool = True) -> None:
        self.name, self.argv, self.env, self.log, self.load = name, argv, env, log, load
        self.proc: Optional[subprocess.Popen] = None

    def start(self, port: int) -> float:
        """Start on ``port``; seconds until ``/ping`` answers 200."""
        env = dict(self.env, TRAINENV_SERVING_PORT=str(port))
        argv = [a.replace("{port}", str(port)) for a in self.argv]
        with open(self.log, "ab") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        ready = wait_status(port, "GET", "/ping", None, started)
        return ready - started

    def first_invocation(self, port: int, started_at: float) -> float:
        return wait_status(port, "POST", "/invocations", BODY, started_at) - started_at

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


def wait_status(
    port: int, method: str, path: str, body: Optional[bytes], started: float, limit: float = 30.0
) -> float:
    headers = {"Content-Type": "application/json"} if body else {}
    while time.monotonic() - started < limit:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return time.monotonic()
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.005)
    raise RuntimeError(f"no 200 from {method} {path} on port {port} within {limit} s")


def servers(workdir: Path) -> List[Server]:
    base = workdir / "ml"
    code = base / "model" / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "inference.py").write_text(textwrap.dedent(HANDLER))
    (workdir / "baseline.py").write_text(BASELINE)
    # Bytecode is written and reused, as for an installed package (pip compiles it).
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRAINENV_", "SAGEMAKER_", "AIP_", "SM_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    common = dict(keep, TRAINENV_BASE_DIR=str(base), TRAINENV_SERVING_HOST="127.0.0.1")
    python = sys.executable
    cli = Path(python).with_name("trainenv")
    return [
        Server(
            "trainenv serve (CLI, stdlib; start-up only)",
            [str(cli), "serve"],
            common,
            workdir / "cli.log",
            load=False,
        ),
        Server("trainenv stdlib", [python, "-m", "trainenv.serving"], common, workdir / "stdlib.log"),
        Server(
            "trainenv gunicorn (2x4)",
            [python, "-m", "trainenv.serving"],
            dict(
                common, TRAINENV_SERVER="gunicorn", TRAINENV_SERVING_WORKERS="2", TRAINENV_SERVING_THREADS="4"
            ),
            workdir / "gunicorn.log",
        ),
        Server(
            "baseline plain ThreadingHTTPServer",
            [python, str(workdir / "baseline.py"), "{port}", "plain"],
            keep,
            workdir / "plain.log",
        ),
        Server(
            "baseline tuned ThreadingHTTPServer",
            [python, str(workdir / "baseline.py"), "{port}", "tuned"],
            keep,
            workdir / "tuned.log",
        ),
    ]


# -- driver -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load run (default 10)")
    parser.add_argument("--starts", type=int, default=5, help="start-up trials per server (default 5)")
    parser.add_argument(
        "--soak",
        type=float,
        default=30.0,
        help="soak length at c=16 per trainenv server (default 30; 0 skips)",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 3 starts, 10 s soak")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.starts, args.soak = 3.0, 3, 10.0

    results: Dict[str, Dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        for server in servers(Path(tmp)):
            row: Dict[str, object] = {}
            startup, first = [], []
            try:
                server.start(free_port())  # untimed: writes the bytecode caches
                server.stop()
                for _ in range(args.starts):
                    port = free_port()
                    t0 = time.monotonic()
                    startup.append(server.start(port))
                    first.append(server.first_invocation(port, t0))
                    server.stop()
                if not server.load:
                    results[server.name] = {
                        "startup_s": round(statistics.median(startup), 3),
                        "startup_range_s": [round(min(startup), 3), round(max(startup), 3)],
                        "first_invocation_s": round(statistics.median(first), 3),
                    }
                    continue
                port = free_port()
                server.start(port)
                load(port, 4, 2.0)  # warm-up
                row["c1"] = load(port, 1, args.seconds)
                row["c16"] = load(port, 16, args.seconds)
                if args.soak > 0 and server.name.startswith("trainenv"):
                    row["soak"] = load(port, 16, args.soak)
            finally:
                server.stop()
            row["startup_s"] = round(statistics.median(startup), 3)
            row["startup_range_s"] = [round(min(startup), 3), round(max(startup), 3)]
            row["first_invocation_s"] = round(statistics.median(first), 3)
            results[server.name] = row
            print(f"done: {server.name}", file=sys.stderr)

    print()
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, client: bench_serving.py load (1 process, selectors)"
    )
    print(
        f"{'server':44} {'/ping 200 s':>12} {'1st inv s':>9} {'c=1 req/s':>9} {'c=1 p50':>8} {'c=16 req/s':>10} {'c=16 p50/p99 ms':>16} {'errors':>6}"
    )
    for name, row in results.items():
        if "c1" not in row:
            print(f"{name:44} {row['startup_s']:>12.3f} {row['first_invocation_s']:>9.3f}")
            continue
        c1, c16 = row["c1"], row["c16"]
        errors = c1["errors"] + c16["errors"]
        print(
            f"{name:44} {row['startup_s']:>12.3f} {row['first_invocation_s']:>9.3f} {c1['rps']:>9.0f} {c1['p50_ms']:>8.2f}"
            f" {c16['rps']:>10.0f} {c16['p50_ms']:>7.2f} / {c16['p99_ms']:<6.1f} {errors:>6}"
        )
    for name, startup, rps1, rps16, p99 in ANCHORS:
        print(
            f"{'anchor: ' + name:44} {startup:>12.2f} {'':>9} {rps1:>9} {'':>8} {rps16:>10} {'':>7}   {p99:<6.1f} {'':>6}  (earlier run)"
        )
    for name, row in results.items():
        if "soak" in row:
            soak = row["soak"]
            print(
                f"soak {name}: {soak['seconds']} s at c=16, {soak['requests']} requests, {soak['rps']:.0f} req/s, "
                f"p99 {soak['p99_ms']} ms, errors {soak['errors']} {soak['error_kinds'] or ''}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = any(row.get("soak", {}).get("errors", 0) for row in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "load":
        print(json.dumps(run_load(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
