"""The supervisor loop with real children and a fake OOM counter (no memory cgroup here)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from trainenv.outcome import classify, decode_wait_status, failure_text, Outcome
from trainenv.supervisor import Supervisor

PY = sys.executable


def run(code: str, **options) -> object:
    return Supervisor([PY, "-c", code], dict(os.environ), os.getcwd(), **options).run()


def test_exit_status_and_stderr_tail():
    result = run("import sys; print('E' * 10, file=sys.stderr); sys.exit(7)")
    assert result.exit_code == 7 and result.signal_number is None
    assert "EEEEEEEEEE" in result.stderr_tail


def test_sigkill_with_rising_oom_count_is_out_of_memory():
    counts = iter([4, 5])
    result = run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", oom_count=lambda: next(counts))
    assert result.exit_code == 137 and result.oom_killed
    outcome = classify(what="x", exit_code=137, signal_number=9, stderr_tail="", oom_killed=True)
    assert outcome.category == "OutOfMemory"


def test_sigkill_without_oom_evidence_is_a_signal():
    result = run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", oom_count=lambda: 4)
    assert result.exit_code == 137 and not result.oom_killed


def test_unexecutable_program_gives_127_and_126(tmp_path):
    missing = Supervisor([str(tmp_path / "nope")], {}, str(tmp_path)).run()
    assert missing.exit_code == 127 and "cannot execute" in missing.exec_error
    plain = tmp_path / "plain"
    plain.write_text("data")
    denied = Supervisor([str(plain)], {}, str(tmp_path)).run()
    assert denied.exit_code == 126


def test_second_sigterm_cuts_the_grace_short():
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)"
    supervisor = Supervisor([PY, "-c", code], dict(os.environ), os.getcwd(), grace_seconds=30)

    def send_twice():
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_twice, daemon=True).start()
    started = time.monotonic()
    result = supervisor.run()
    assert result.signal_number == signal.SIGKILL and result.stopped_by == signal.SIGTERM
    assert time.monotonic() - started < 10  # not the 30 s grace
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_decode_wait_status_and_failure_text_limits():
    assert decode_wait_status(3 << 8) == (3, None)
    assert decode_wait_status(signal.SIGTERM) == (143, signal.SIGTERM)
    tail = "noise\n" * 5000 + "Traceback (most recent call last):\n  File x\nKeyError: 'k'\n"
    text = failure_text(Outcome(1, "UserError", "script train.py exited with status 1: KeyError: 'k'", tail))
    assert text.splitlines()[0].startswith("UserError:") and "KeyError: 'k'" in text[:1024]
    assert "noise" not in text and len(text) <= 8 * 1024
    assert "s3cret-value" not in failure_text(Outcome(1, "UserError", "r", "password=s3cret-value\n"), ["s3cret-value"])
