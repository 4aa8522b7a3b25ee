"""Several worker processes of the embedded server (``servers/prefork.py``), end to end.

Each test starts a real ``python -m trainenv.serving`` with ``TRAINENV_SERVING_WORKERS`` and talks
HTTP over 127.0.0.1. The handler answers with its process id, can hold a request (it writes a
``held-<pid>-<n>`` file, then sleeps) and, in ``model_fn``, lets the first worker load at once
while every other waits for a ``release`` file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import SERVERS, Server, clean_environ, make_base

HANDLER = """
import os, time
from pathlib import Path

def model_fn(model_dir):
    shared = Path(os.environ["TEST_DIR"])
    if os.environ.get("TEST_FAIL_LOAD"):
        raise RuntimeError("no weights here")
    if os.environ.get("TEST_CRASH_LOAD"):  # a native library that takes the process down
        os.kill(os.getpid(), 9)
    if os.environ.get("TEST_CRASH_LATE"):  # the same, after loading for a while
        time.sleep(float(os.environ["TEST_CRASH_LATE"]))
        os.kill(os.getpid(), 9)
    try:
        os.close(os.open(shared / "first", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:  # not the first worker: wait for the test's go-ahead
        (shared / f"loading-{os.getpid()}").touch()
        while not (shared / "release").exists():
            time.sleep(0.01)
    return None

def predict_fn(data, model):
    if isinstance(data, dict) and "hold" in data:
        Path(os.environ["TEST_DIR"], f"held-{os.getpid()}-{data['hold']}").touch()
        time.sleep(data["seconds"])
    return {"pid": os.getpid()}
"""


def start(
    tmp_path: Path, workers: int = 2, release: bool = True, argv=None, **extra: str
) -> tuple[Server, Path]:
    shared = tmp_path / "shared"
    shared.mkdir()
    if release:
        (shared / "release").touch()
    env = {"TRAINENV_SERVING_WORKERS": str(workers), "TRAINENV_SERVING_THREADS": "16", "TEST_DIR": str(shared)}
    env.update(extra)
    return Server(make_base(tmp_path / "base", HANDLER), env, argv=argv), shared


def pid_of(srv: Server) -> int:
    status, _, body = srv.post(b"[1]")
    assert status == 200, body
    return int(json.loads(body)["pid"])


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def hold_on_every_worker(srv: Server, shared: Path, seconds: float, workers: int = 2):
    """Send held requests (one connection each) until every worker holds some; the threads and
    their results (a pid, or the exception)."""
    results: dict[int, object] = {}
    threads = []

    def send(n: int) -> None:
        try:
            status, _, body = srv.post(json.dumps({"hold": n, "seconds": seconds}).encode())
            results[n] = json.loads(body)["pid"] if status == 200 else status
        except Exception as exc:  # noqa: BLE001 - a connection cut by a killed worker
            results[n] = exc

    for n in range(24):
        thread = threading.Thread(target=send, args=(n,))
        thread.start()
        threads.append(thread)
        wait_until(lambda: len(list(shared.glob("held-*"))) == n + 1, 10, f"request {n} held")
        if len({p.name.split("-")[1] for p in shared.glob("held-*")}) == workers:
            return threads, results
    raise AssertionError("24 connections all went to the same worker")


def held_by(shared: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for path in shared.glob("held-*"):
        pid = int(path.name.split("-")[1])
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def test_n_workers_are_n_processes_on_one_port(tmp_path):
    srv, _ = start(tmp_path, workers=3)
    try:
        srv.wait_ready()
        seen = set()
        for _ in range(300):
            seen.add(pid_of(srv))
            if len(seen) == 3:
                break
        assert len(seen) == 3, seen
        assert seen == children(srv.proc.pid), (seen, children(srv.proc.pid))
        assert "starting 3 worker processes" in srv.log
        assert "ready: all 3 workers have loaded the model" in srv.log
    finally:
        assert srv.stop() == 0, srv.log


@pytest.mark.parametrize("kind", SERVERS)
def test_ping_is_503_until_every_worker_loaded_and_stays_200_while_a_replacement_loads(tmp_path, kind):
    srv, shared = start(tmp_path, release=False, TRAINENV_SERVER=kind)
    waiting = "not ready: 1 more worker process(es) still loading the model"
    # A stdlib worker answers while it loads; a gunicorn worker accepts only once loaded.
    expected = {"not ready: the model is loading", waiting} if kind == "stdlib" else {waiting}
    try:
        srv.wait_for(r"ready: model loaded", 10)  # the first worker
        loading = wait_until(lambda: list(shared.glob("loading-*")), 10, "the second worker loading")
        messages = set()  # from either worker: the loaded one says who it waits for
        for _ in range(200):
            status, _, body = srv.request("GET", "/ping")
            assert status == 503, body
            messages.add(json.loads(body)["message"])
            if messages == expected:
                break
        assert messages == expected, messages
        assert srv.request("GET", "/v2/health/ready")[0] == 503
        (shared / "release").touch()
        srv.wait_ready(10)

        # Kill the worker that waited; its replacement waits for "release" again.
        (shared / "release").unlink()
        victim = int(loading[0].name.split("-")[1])
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(list(shared.glob("loading-*"))) == 2, 10, "the replacement loading")
        statuses = {srv.request("GET", "/ping")[0] for _ in range(20)}
        answers = {srv.post(b"[1]")[0] for _ in range(20)}
        assert statuses == {200} and answers == {200}, (statuses, answers)
        (shared / "release").touch()
        wait_until(lambda: srv.log.count("ready: model loaded") == 3, 10, "the replacement loaded")
    finally:
        assert srv.stop() == 0, srv.log


def test_a_killed_worker_is_replaced_and_only_its_requests_fail(tmp_path):
    srv, shared = start(tmp_path)
    try:
        srv.wait_ready()
        first = children(srv.proc.pid)
        threads, results = hold_on_every_worker(srv, shared, seconds=2.0)
        counts = held_by(shared)
        victim, survivor = sorted(counts)
        os.kill(victim, signal.SIGKILL)
        for thread in threads:
            thread.join(15)
        failed = [r for r in results.values() if isinstance(r, Exception)]
        answered = [r for r in results.values() if not isinstance(r, Exception)]
        assert len(failed) == counts[victim], results
        assert answered == [survivor] * counts[survivor], results
        srv.wait_for(rf"worker {victim} died of SIGKILL \(perhaps out of memory\?\)", 10)
        replacement = wait_until(lambda: children(srv.proc.pid) - first, 10, "a new worker")
        seen = set()
        deadline = time.monotonic() + 10
        while not seen & replacement and time.monotonic() < deadline:
            seen.add(pid_of(srv))
        assert seen & replacement, (seen, replacement)
        assert victim not in seen
    finally:
        assert srv.stop() == 0, srv.log


def test_sigterm_drains_every_worker_then_exits_0(tmp_path):
    srv, shared = start(tmp_path)
    try:
        srv.wait_ready()
        workers = children(srv.proc.pid)
        threads, results = hold_on_every_worker(srv, shared, seconds=1.5)
        srv.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(15)
    finally:
        code = srv.wait_exit(15)
    assert code == 0, srv.log
    assert sorted(set(results.values())) == sorted(workers), results
    assert "SIGTERM: stopping 2 workers" in srv.log
    assert srv.log.count("stopped: all requests finished") == 2, srv.log
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_a_worker_whose_model_fails_to_load_stops_the_server_with_78(tmp_path):
    srv, _ = start(tmp_path, TEST_FAIL_LOAD="1")
    assert srv.wait_exit(20) == 78, srv.log
    assert "no weights here" in srv.log


def test_a_bad_worker_count_exits_78_naming_the_variable(tmp_path):
    base = make_base(tmp_path, HANDLER)
    for variable, value in (("TRAINENV_SERVING_WORKERS", "0"), ("TRAINENV_SERVING_WORKERS", "two")):
        proc = subprocess.run(
            [sys.executable, "-m", "trainenv.serving"],
            env=clean_environ(TRAINENV_BASE_DIR=str(base), **{variable: value}),
            capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 78, proc.stderr
        assert f"{variable}: '{value}' is not a worker count" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sigint_to_the_whole_process_group_drains_like_sigterm(tmp_path):
    """Ctrl-C reaches every process of the group: workers ignore SIGINT and drain on the one
    SIGTERM the supervisor sends, so requests in flight still finish."""
    srv, shared = start(tmp_path)
    try:
        srv.wait_ready()
        threads, results = hold_on_every_worker(srv, shared, seconds=1.5)
        os.killpg(srv.proc.pid, signal.SIGINT)
        for thread in threads:
            thread.join(15)
    finally:
        code = srv.wait_exit(15)
    assert code == 0, srv.log
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert "SIGINT: stopping 2 workers" in srv.log and "not waiting any longer" not in srv.log


def test_a_worker_past_the_startup_timeout_stops_the_server_with_124(tmp_path):
    srv, _ = start(tmp_path, release=False, TRAINENV_SERVING_STARTUP_TIMEOUT="1")
    assert srv.wait_exit(20) == 124, srv.log
    assert "not ready within the start-up timeout of 1 s" in srv.log


def test_workers_stop_when_the_supervisor_is_killed(tmp_path):
    srv, _ = start(tmp_path)
    try:
        srv.wait_ready()
        workers = children(srv.proc.pid)
        assert len(workers) == 2
    finally:
        srv.proc.kill()
        srv.proc.wait(5)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 15, "orphaned workers exit")


def test_workers_that_keep_dying_before_loading_stop_the_server_with_78(tmp_path):
    srv, _ = start(tmp_path, TEST_CRASH_LOAD="1")
    assert srv.wait_exit(30) == 78, srv.log
    assert "the 5th worker in a row to die before loading it; stopping" in srv.log
    assert srv.log.count("died of SIGKILL (perhaps out of memory?); requests it held failed; starting a new worker") >= 4


# The supervisor once counted a death only within 5 s of the start (QUICK_DEATH_S): a model that
# died later restarted forever. Shrinking that window (harmless since it is gone) stands in for a
# model that loads for minutes, so the test takes a second, not half a minute.
_NO_QUICK_WINDOW = [
    sys.executable, "-c",
    "import runpy; import trainenv.serving.servers.prefork as p; p.QUICK_DEATH_S = 0.0; "
    "runpy.run_module('trainenv.serving', run_name='__main__', alter_sys=True)",
]


def test_workers_that_keep_dying_late_in_loading_stop_the_server_with_78(tmp_path):
    srv, _ = start(tmp_path, argv=_NO_QUICK_WINDOW, TEST_CRASH_LATE="0.3")
    assert srv.wait_exit(15) == 78, srv.log
    assert "the 5th worker in a row to die before loading it; stopping" in srv.log


def test_sigterm_to_the_whole_process_group_still_drains(tmp_path):
    """systemd's KillMode=control-group, ``kill -TERM -PGID``, ``tini -g``: each worker gets the
    group's SIGTERM and the supervisor's; the second must not cut its drain short."""
    srv, shared = start(tmp_path)
    try:
        srv.wait_ready()
        threads, results = hold_on_every_worker(srv, shared, seconds=1.5)
        os.killpg(os.getpgid(srv.proc.pid), signal.SIGTERM)
        for thread in threads:
            thread.join(15)
    finally:
        code = srv.wait_exit(15)
    assert code == 0, srv.log
    assert results and all(isinstance(r, int) for r in results.values()), (results, srv.log)
    assert "not waiting any longer" not in srv.log and "still running" not in srv.log, srv.log
    assert srv.log.count("stopped: all requests finished") == 2, srv.log


def test_a_second_sigterm_to_the_supervisor_cuts_the_drain_short(tmp_path):
    srv, shared = start(tmp_path)
    try:
        srv.wait_ready()
        threads, results = hold_on_every_worker(srv, shared, seconds=5)
        srv.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM: stopping 2 workers" in srv.log, 5, "the first SIGTERM handled")
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.wait_exit(4)
    finally:
        for thread in threads:
            thread.join(15)
    assert code == 0, srv.log
    assert "SIGTERM again: workers stop waiting" in srv.log
    assert srv.log.count("SIGQUIT again: not waiting any longer") == 2, srv.log
