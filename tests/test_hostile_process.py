"""Jobs that misbehave on purpose: a line of megabytes, processes that escape the job's session.

Each test runs a real ``trainenv train`` (or ``trainenv local``) and checks what is left after
it returns: the launcher's memory, the job's output, stray processes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import TRAINENV, alive, job_environ, make_tree, need_pid_namespace, run_train, run_trainenv

LONG_LINE = """
import os, sys
chunk = bytes(range(32, 127)) * 700  # 66,500 bytes, not a multiple of 64 KiB
out = sys.stdout.buffer
for _ in range(int(os.environ["CHUNKS"])):
    out.write(chunk)  # one line of megabytes, never a newline
out.write(b"\\nshort\\n" + b"t" * 70000)  # and a last line without a newline
out.flush()
"""

def test_a_line_of_megabytes_is_split_in_linear_time_and_bounded_memory(tmp_path):
    chunks = 1000  # a 66.5 MB line
    base = make_tree(tmp_path, {"train.py": LONG_LINE})
    out_path = tmp_path / "stdout"
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], 'wb'))\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"  # KiB, the launcher's peak
        "sys.exit(code)\n"
    )
    started = time.monotonic()
    done = run_trainenv(
        "train", "--log-prefix", prefix=[sys.executable, "-c", wrapper, str(out_path)],
        env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_CURRENT_HOST="", CHUNKS=str(chunks)),
        text=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    elapsed = time.monotonic() - started
    peak_kib = int(done.stdout.decode().split()[-1])
    assert peak_kib < 60 * 1024, f"launcher peak RSS {peak_kib} KiB for a {chunks * 66500} byte line"
    assert elapsed < 120  # quadratic copying of the partial line took minutes
    host = os.uname().nodename
    prefix, more = f"[{host}:0] ".encode(), f"[{host}:0]+ ".encode()
    lines, pieces = [], []
    with open(out_path, "rb") as handle:
        for raw in handle:
            assert raw.endswith(b"\n")
            if raw.startswith(more):
                lines[-1].update(raw[len(more):-1])
                pieces[-1] += 1
            else:
                assert raw.startswith(prefix), raw[:40]
                assert len(raw) - len(prefix) - 1 <= 64 * 1024
                lines.append(hashlib.sha256(raw[len(prefix):-1]))
                pieces.append(1)
    expected = [bytes(range(32, 127)) * 700 * chunks, b"short", b"t" * 70000]
    assert [h.hexdigest() for h in lines] == [hashlib.sha256(e).hexdigest() for e in expected]
    assert pieces == [-(-len(e) // (64 * 1024)) for e in expected]


# The job starts a process in a session of its own, then exits. The shell's background child is
# not a group leader, so setsid(1) does not fork: $! is the sleep itself once it has exec'd.
ESCAPE = 'setsid sleep 1000 & while [ "$(cat /proc/$!/comm 2>/dev/null)" != sleep ]; do :; done; echo $! > "$MARK"'


def _gone_or_kill(pid: int) -> bool:
    """Whether ``pid`` is gone; kill it if not, so no test leaves a process behind."""
    if not alive(pid):
        return True
    os.kill(pid, signal.SIGKILL)
    return False


def _run_escape(argv: list, mark: Path, **options) -> subprocess.CompletedProcess:
    """Run ``argv``; whatever happens, kill the escaped sleep if it is still there afterwards."""
    try:
        # Output to files: a surviving sleep would hold a pipe open and block the read.
        with open(mark.with_suffix(".out"), "wb") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=60, **options)
        done.stderr = mark.with_suffix(".out").read_bytes()
        return done
    finally:
        if mark.exists() and mark.read_text().strip():
            done_pid = int(mark.read_text())
            mark.with_suffix(".alive").write_text(str(not _gone_or_kill(done_pid)))


def test_a_process_in_its_own_session_does_not_outlive_the_job(tmp_path):
    base = make_tree(tmp_path)
    mark = tmp_path / "escaped.pid"
    done = _run_escape([*TRAINENV, "train"], mark, env=job_environ(base, TRAINENV_COMMAND=ESCAPE, MARK=str(mark)))
    assert done.returncode == 0, done.stderr.decode()
    assert mark.with_suffix(".alive").read_text() == "False", "the setsid sleep outlived trainenv train"


def test_local_mode_ends_what_the_job_left_too(tmp_path):
    mark = tmp_path / "escaped.pid"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINENV_")}
    done = _run_escape([*TRAINENV, "local", "--command", ESCAPE], mark, cwd=tmp_path, env=dict(env, MARK=str(mark)))
    assert done.returncode == 0, done.stderr.decode()
    assert mark.with_suffix(".alive").read_text() == "False", "the setsid sleep outlived trainenv local"


CHECKPOINTING_ESCAPEE = """
import os, signal, subprocess, sys, time
code = ("import os, signal, sys, time\\n"
        "def on_term(*_):\\n    open(os.environ['MARK'], 'w').write('TERM')\\n    sys.exit(0)\\n"
        "signal.signal(signal.SIGTERM, on_term)\\nopen(os.environ['MARK'] + '.up', 'w').write(str(os.getpid()))\\n"
        "time.sleep(600)\\n")
subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
while not os.path.exists(os.environ["MARK"] + ".up"):
    time.sleep(0.01)
"""


def test_as_pid_1_what_the_job_left_gets_sigterm_before_the_end(tmp_path):
    need_pid_namespace()
    base = make_tree(tmp_path, {"train.py": CHECKPOINTING_ESCAPEE})
    mark = tmp_path / "escapee"
    done = run_trainenv(
        "train", prefix=["unshare", "--pid", "--fork", "--mount-proc"],
        env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", MARK=str(mark)), text=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    # Not the kernel's SIGKILL when PID 1 exits: SIGTERM first, with time to act on it.
    assert mark.read_text() == "TERM"


def test_sigterm_to_trainenv_reaches_a_process_in_its_own_session(tmp_path):
    script = CHECKPOINTING_ESCAPEE + "open(os.environ['MARK'] + '.ready', 'w').close()\ntime.sleep(600)\n"
    base = make_tree(tmp_path, {"train.py": script})
    mark = tmp_path / "escapee"
    launcher = subprocess.Popen([*TRAINENV, "train"], env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", MARK=str(mark)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{mark}.ready").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, "the job never got ready"
            time.sleep(0.02)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
    finally:
        escapee = Path(f"{mark}.up")
        if escapee.exists() and escapee.read_text():
            _gone_or_kill(int(escapee.read_text()))
    assert launcher.returncode == 128 + signal.SIGTERM
    assert mark.exists() and mark.read_text() == "TERM"


# -- signals before the job starts, and settings that reach their consumers ------------------


def _read_until(stream, needle: bytes, timeout: float = 30) -> bytes:
    """Lines of ``stream`` up to the first holding ``needle`` (the test fails if it never comes)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        line = stream.readline()
        assert line, seen.decode(errors="replace")
        seen += line
    return seen


def test_sigterm_during_the_peer_wait_ends_it_at_once_with_a_signal_failure(tmp_path):
    """Node 1 waits (up to 10 minutes) for a node 0 that never comes: SIGTERM ends the wait, exit 143."""
    base = make_tree(tmp_path, {"train.py": "print('must not run')\n"})
    (base / "input" / "config" / "resourceconfig.json").write_text(
        '{"current_host": "127.0.0.2", "hosts": ["127.0.0.1", "127.0.0.2"]}'
    )
    proc = subprocess.Popen(
        [*TRAINENV, "train", "--entry-point", "train.py", "--distribution", "torchrun", "--master-port", "9"],
        env=job_environ(base),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _read_until(proc.stderr, b"waiting for node 0")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()
    assert time.monotonic() - started < 5
    text = (base / "output" / "failure").read_text()
    assert text.startswith("Signal: trainenv received SIGTERM before the job started"), text
    assert b"must not run" not in out


def test_log_level_and_installer_options_reach_the_launcher(tmp_path):
    """``--log-level quiet`` silences trainenv's info lines; ``--installer pip`` is the installer used."""
    base = make_tree(tmp_path, {"train.py": "print('ran')\n", "requirements.txt": "# nothing to install\npip\n"})
    done = run_train(base, "--entry-point", "train.py", "--installer", "pip", "--log-level", "debug", timeout=120, TMPDIR=str(tmp_path))
    assert done.returncode == 0, done.stderr.decode()
    assert b"pip" in done.stderr and b"with uv" not in done.stderr, done.stderr.decode()
    quiet = run_train(base, "--entry-point", "train.py", "--no-install", "--log-level", "quiet")
    assert quiet.returncode == 0 and quiet.stdout == b"ran\n"
    assert quiet.stderr == b"", quiet.stderr.decode()


def test_a_cluster_error_in_usercode_trainenv_yaml_names_that_file(tmp_path):
    base = make_tree(tmp_path, {"train.py": "", "trainenv.yaml": "hosts: []\n"})
    done = run_train(base, "--entry-point", "train.py")
    assert done.returncode == 78
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert str(base / "usercode" / "trainenv.yaml") in first, first


def test_a_secret_hyperparameter_is_scrubbed_from_errors_raised_while_planning(tmp_path):
    """The entry point is checked while the plan is built: its error may quote a secret value."""
    base = make_tree(tmp_path, {}, {"hf_token": "hf_sEcReT1234567"})
    done = run_train(base, TRAINENV_ENTRY_POINT="hf_sEcReT1234567")
    assert done.returncode == 78
    assert b"sEcReT" not in done.stderr and "sEcReT" not in (base / "output" / "failure").read_text()


@pytest.mark.parametrize("mode, owner", [(0o777, None), (0o700, 65534)])
def test_a_run_dir_others_can_write_or_own_is_refused(tmp_path, mode, owner):
    """The snapshot the job reads lives in the run dir: a dir another user controls is a ConfigError."""
    if owner is not None and os.geteuid() != 0:
        pytest.skip("only root can create a dir owned by another user")
    base = make_tree(tmp_path / "job", {"train.py": "print('must not run')\n"})
    parent = tmp_path / "runs"
    leaf = parent / "trainenv-job-node"
    leaf.mkdir(parents=True)
    os.chmod(parent, 0o700)
    os.chmod(leaf, mode)
    if owner is not None:
        os.chown(leaf, owner, owner)
    done = subprocess.run(
        [*TRAINENV, "train"],
        env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_RUN_DIR=str(parent), TRAINENV_CURRENT_HOST="node",
                        TRAINENV_HOSTS='["node"]'),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 78, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith(f"ConfigError: run dir {leaf} "), first
    assert "must not run" not in done.stdout


def test_a_command_too_long_for_one_argument_is_a_config_error_not_an_exec_error(tmp_path):
    """A 200 KB ``command:`` cannot be one argv string (the kernel's 128 KiB): 78 naming where it came from."""
    base = make_tree(tmp_path, {"trainenv.yaml": "command: 'echo " + "x" * 200_000 + "'\n"})
    done = run_train(base, text=True)
    assert done.returncode == 78, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("ConfigError: ") and "trainenv.yaml" in first and "128 KiB" in first, first
    assert len(done.stderr) < 5000  # the command is not logged whole


def test_a_command_job_without_a_code_dir_runs_in_a_fresh_one(tmp_path):
    base = tmp_path / "job"
    (base / "input" / "config").mkdir(parents=True)
    done = run_train(base, TRAINENV_COMMAND="pwd", text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(base / "usercode")


def test_a_command_sh_that_is_not_text_is_a_config_error_naming_it(tmp_path):
    """Read through the config readers: bad UTF-8 (or an unreadable or huge file) is 78 naming the file."""
    base = make_tree(tmp_path, {"train.py": ""})
    script = base / "input" / "config" / "execution" / "command.sh"
    script.parent.mkdir(parents=True)
    script.write_bytes(b"echo \xff\xfe\n")
    done = run_train(base, text=True)
    assert done.returncode == 78, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith(f"ConfigError: {script}: not valid UTF-8"), first


def test_an_interactive_job_reads_the_terminal_instead_of_stopping(tmp_path):
    """Under a terminal (``trainenv local`` on a laptop) the job gets the foreground: ``input()`` works.

    Without it the job, in a process group of its own, is stopped by SIGTTIN at its first read.
    """
    import fcntl
    import pty
    import select
    import termios

    base = make_tree(tmp_path, {"train.py": "name = input()\nprint('hello', name)\n"})
    leader, follower = pty.openpty()

    def own_the_terminal() -> None:  # as a login shell would: a session whose terminal is the pty
        os.setsid()
        fcntl.ioctl(follower, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*TRAINENV, "train"], env=job_environ(base, TRAINENV_ENTRY_POINT="train.py"),
        stdin=follower, stdout=follower, stderr=subprocess.DEVNULL, preexec_fn=own_the_terminal,
    )
    os.close(follower)
    seen = b""
    try:
        os.write(leader, b"ada\n")  # typed ahead: the terminal keeps it until the job reads
        deadline = time.monotonic() + 30
        while b"hello ada" not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:  # the job and trainenv closed the terminal
                    break
        assert b"hello ada" in seen, seen
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(leader)
