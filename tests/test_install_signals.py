"""SIGTERM/SIGINT while requirements install: a real ``trainenv train``, a real installer.

The requirement is a local source tree whose build backend hangs (and ignores SIGTERM), so the
process tree is trainenv -> pip or uv -> the build backend. A stop must end that whole tree,
exit 128+N and write the failure file, also when trainenv is PID 1 of a PID namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import TRAINENV, failure, job_environ, make_tree, need_pid_namespace, need_uv

BACKEND = '''\
import os, signal, time

def _hang(*args, **kwargs):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
    with open({mark!r}, "a") as handle:
        handle.write(f"{{os.getpid()}}\\n")
    time.sleep(600)

get_requires_for_build_wheel = prepare_metadata_for_build_wheel = build_wheel = _hang
'''


def _hanging_job(tmp_path: Path) -> "tuple[Path, Path, dict]":
    """A job whose requirements.txt names a source tree whose build never ends."""
    mark = tmp_path / "backend.pids"
    source = tmp_path / "hangpkg"
    source.mkdir()
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "hang_backend"\nbackend-path = ["."]\n'
    )
    (source / "hang_backend.py").write_text(BACKEND.format(mark=str(mark)))
    base = make_tree(tmp_path / "job", {"train.py": "open('ran', 'w')\n"})
    (base / "usercode" / "requirements.txt").write_text(f"--no-index\n{source}\n")
    extra = {
        "TRAINENV_ENTRY_POINT": "train.py",
        "TMPDIR": str(tmp_path / "tmp"),
        "PIP_CONFIG_FILE": os.devnull,
        "UV_NO_CONFIG": "1",
        "PIP_CACHE_DIR": str(tmp_path / "pip-cache"),
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
    }
    (tmp_path / "tmp").mkdir()
    return base, mark, extra


def _wait_for_backend(mark: Path, launcher: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (mark.exists() and mark.read_text().endswith("\n")):
        if launcher.poll() is not None:
            out, err = launcher.communicate()
            pytest.fail(f"trainenv ended before the build started ({launcher.returncode}): {err.decode()[-2000:]}")
        assert time.monotonic() < deadline, "the build backend never started"
        time.sleep(0.05)


def _processes_mentioning(token: str) -> "list[int]":
    """Live (non-zombie) processes whose command line or cwd contains ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if state != "Z" and (token in cmdline or token in cwd):
            found.append(int(entry))
    return found


def _survivors(tmp_path: Path, mark: "Path | None", timeout: float = 10) -> "list[int]":
    """The installer's processes still alive ``timeout`` seconds after trainenv ended
    (``mark``: the backend's pids, when they are pids of this namespace)."""
    pids = {int(p) for p in mark.read_text().split()} if mark is not None else set()
    deadline = time.monotonic() + timeout
    while True:
        alive = set(_processes_mentioning(str(tmp_path)))
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.add(pid)
        if not alive or time.monotonic() > deadline:
            return sorted(alive)
        time.sleep(0.1)


def _kill_all(pids: "list[int]") -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("installer,stop", [("pip", signal.SIGTERM), ("uv", signal.SIGTERM), ("uv", signal.SIGINT)])
def test_stop_signal_during_install_stops_the_installer_tree(tmp_path, installer, stop):
    if installer == "uv":
        need_uv()
    base, mark, extra = _hanging_job(tmp_path)
    launcher = subprocess.Popen(
        [*TRAINENV, "train"], env=job_environ(base, TRAINENV_INSTALLER=installer, **extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _wait_for_backend(mark, launcher)
        launcher.send_signal(stop)
        _, err = launcher.communicate(timeout=30)
        survivors = _survivors(tmp_path, mark)
        assert launcher.returncode == 128 + stop, err.decode()[-2000:]
        first = failure(base).splitlines()[0]
        assert first == f"Signal: requirements install stopped: trainenv received {stop.name}"
        assert survivors == [], "installer processes outlived trainenv"
        assert not (base / "usercode" / "ran").exists()
        assert "Traceback" not in err.decode()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
        _kill_all(_processes_mentioning(str(tmp_path)))


def test_sigterm_to_pid_1_during_install(tmp_path):
    need_pid_namespace()
    need_uv()
    base, mark, extra = _hanging_job(tmp_path)
    launcher = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc", *TRAINENV, "train"],
        env=job_environ(base, TRAINENV_INSTALLER="uv", **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _wait_for_backend(mark, launcher)
        # What `docker stop` does: SIGTERM to the namespace's PID 1 (unshare itself ignores it).
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)
        _, err = launcher.communicate(timeout=30)
        assert launcher.returncode == 143, err.decode()[-2000:]
        assert failure(base).splitlines()[0] == "Signal: requirements install stopped: trainenv received SIGTERM"
        assert _survivors(tmp_path, None) == []  # the backend's pids are the namespace's
    finally:
        if launcher.poll() is None:
            launcher.kill()  # --kill-child: the namespace and everything in it go too
            launcher.communicate()
        _kill_all(_processes_mentioning(str(tmp_path)))


def test_sigterm_while_waiting_for_another_launchers_install(tmp_path):
    """Another launcher holds the install lock of the same requirements: a stop ends the wait."""
    import fcntl
    import sys

    from trainenv.install.marker import fingerprint

    base, mark, extra = _hanging_job(tmp_path)
    requirements = base / "usercode" / "requirements.txt"
    key = fingerprint(requirements, requirements.read_bytes(), (), sys.executable)
    markers = tmp_path / "tmp" / f"trainenv-{os.geteuid()}" / "installed"
    markers.mkdir(parents=True, mode=0o700)
    markers.parent.chmod(0o700)
    with open(markers / f"{key}.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        launcher = subprocess.Popen(
            [*TRAINENV, "train"], env=job_environ(base, TRAINENV_PYTHON=sys.executable, **extra),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        lines: list = []
        reader = threading.Thread(target=lambda: lines.extend(launcher.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while not any(b"waiting for it" in line for line in lines):
                assert time.monotonic() < deadline and launcher.poll() is None, b"".join(lines).decode()
                time.sleep(0.05)
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=30)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
            reader.join(timeout=10)
    assert launcher.returncode == 143, b"".join(lines).decode()
    assert failure(base).splitlines()[0] == "Signal: requirements install stopped: trainenv received SIGTERM"
    assert not mark.exists()  # no installer ever started


def test_stop_signals_restore_the_previous_handlers():
    from trainenv.install.run import StopSignals

    def mine(number, frame):
        pass

    previous_term = signal.signal(signal.SIGTERM, mine)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_wakeup = signal.set_wakeup_fd(write_fd)
    try:
        with StopSignals() as stops:
            assert signal.getsignal(signal.SIGTERM) not in (mine, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not stops.received and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stops.received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.set_wakeup_fd(write_fd) == write_fd
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        signal.signal(signal.SIGTERM, previous_term)
        os.close(read_fd)
        os.close(write_fd)
