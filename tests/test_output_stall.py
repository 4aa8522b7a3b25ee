"""A reader of trainenv's output that stalls (a log driver, a pipe nobody reads) must not stop the
supervisor: the time limit and signals still reach the job, and the output is not lost.

Each test runs a real ``trainenv train`` whose stderr (and stdout, with a log prefix) is a pipe
the test does not read for seconds, while the job writes megabytes to it."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from support import alive, make_tree, start_train

CHATTY = """
import os, sys, time
open(os.environ["PID_FILE"], "w").write(str(os.getpid()))
line = b"x" * 1023 + b"\\n"
for _ in range(4096):  # 4 MiB: more than every pipe and buffer on the way holds
    sys.stderr.buffer.write(line)
sys.stderr.buffer.write(b"the last line\\n")
sys.stderr.flush()
time.sleep(60)
"""


def _job_pid(path, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError("the job never started")


@contextlib.contextmanager
def stalled_job(tmp_path, code: str = CHATTY, **extra: str):
    """A ``trainenv train`` of ``code`` whose output nobody reads until the test says (``proc.communicate``);
    yields ``(proc, the job's pid)``; the launcher never outlives the test."""
    base = make_tree(tmp_path / "ml", {"train.py": code})
    pid_file = tmp_path / "job.pid"
    proc = start_train(base, TRAINENV_ENTRY_POINT="train.py", PID_FILE=str(pid_file), **extra)
    try:
        yield proc, _job_pid(pid_file)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("prefix", ["0", "1"], ids=["plain", "prefixed"])
def test_the_time_limit_is_kept_while_nobody_reads_the_output(tmp_path, prefix):
    with stalled_job(tmp_path, TRAINENV_MAX_RUN_SECONDS="1.5", TRAINENV_LOG_PREFIX=prefix) as (proc, job):
        time.sleep(4.0)  # nobody reads: the job is blocked on its writes, trainenv must not be
        assert not alive(job), "the time limit did not stop the job while the output was stalled"
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 124, err[-2000:]
    # what trainenv had taken in (up to its 1 MiB of unwritten output) is not lost
    assert err.count(b"x" * 1023) + out.count(b"x" * 1023) >= 1024
    assert b"time limit" in err


def test_sigterm_reaches_the_job_while_nobody_reads_the_output(tmp_path):
    with stalled_job(tmp_path) as (proc, job):
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(job), "SIGTERM was not forwarded while the output was stalled"
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]


def test_everything_a_job_writes_arrives_when_the_reader_catches_up(tmp_path):
    """A reader that pauses 2 s, then reads: all 4 MiB and the last line arrive, in order."""
    with stalled_job(tmp_path, CHATTY.replace("time.sleep(60)", "")) as (proc, _):
        time.sleep(2.0)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    body = err[err.index(b"x" * 1023):]
    assert body.count(b"x" * 1023 + b"\n") == 4096
    assert body.index(b"the last line\n") > body.rindex(b"x" * 1023)
