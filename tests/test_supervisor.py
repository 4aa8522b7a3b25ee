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


# -- how the job is started (trainenv.spawn): what subprocess.Popen gave it, without subprocess

CHILD_VIEW = """\
import json, os, signal, sys
def is_open(fd):
    try:
        return bool(os.fstat(fd))
    except OSError:
        return False
fds = [fd for fd in range(3, 1024) if is_open(fd)]
print(json.dumps({'cwd': os.getcwd(), 'pgid': os.getpgid(0), 'pid': os.getpid(), 'fds': fds,
                  'env': dict(os.environ)}), file=sys.stderr)
"""


def test_the_job_starts_in_its_own_group_with_its_env_and_cwd_and_none_of_our_fds(tmp_path):
    import json

    inherited_r, inherited_w = os.pipe()
    os.set_inheritable(inherited_w, True)  # given to us by our parent: the job must not get it
    ours = os.getcwd()
    try:
        result = Supervisor([PY, "-c", CHILD_VIEW], {"ONLY": "this"}, str(tmp_path)).run()
    finally:
        os.close(inherited_r)
        os.close(inherited_w)
    seen = json.loads(result.stderr_tail)
    assert result.exit_code == 0 and os.getcwd() == ours
    assert seen["cwd"] == str(tmp_path) and seen["pgid"] == seen["pid"] != os.getpgid(0)
    assert seen["env"]["ONLY"] == "this" and set(seen["env"]) <= {"ONLY", "LC_CTYPE"}  # LC_CTYPE: Python's locale coercion
    assert inherited_w not in seen["fds"] and seen["fds"] == []
    shown = Supervisor(["/bin/sh", "-c", "exec grep SigIgn /proc/self/status >&2"], {}, str(tmp_path)).run()
    ignored = int(shown.stderr_tail.split()[-1], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1)) == 0  # Python ignores SIGPIPE: the job does not


def test_a_bare_program_name_is_looked_up_on_the_jobs_path_and_a_relative_one_in_its_cwd(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "only-here"
    tool.write_text("#!/bin/sh\necho found >&2\nexit 3\n")
    tool.chmod(0o755)
    found = Supervisor(["only-here"], {"PATH": f"/nonexistent:{bin_dir}"}, str(tmp_path)).run()
    assert (found.exit_code, found.stderr_tail.strip()) == (3, "found")
    missing = Supervisor(["only-here"], {"PATH": "/nonexistent"}, str(tmp_path)).run()
    assert missing.exit_code == 127 and "only-here" in missing.exec_error
    relative = Supervisor(["./bin/only-here"], {}, str(tmp_path)).run()
    assert relative.exit_code == 3


def test_a_missing_cwd_is_reported_and_ours_is_kept(tmp_path):
    ours = os.getcwd()
    result = Supervisor([PY, "-c", "pass"], {}, str(tmp_path / "gone")).run()
    assert result.exit_code == 127 and result.exec_error and os.getcwd() == ours
