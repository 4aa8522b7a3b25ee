"""Running one installer command, and stopping it when trainenv is told to stop.

The command is an argv list (never a shell string), run in the code dir with the job's
environment, stdin closed, stdout and stderr merged into one pipe that is read line by line as
it comes (``\\r`` progress redraws keep their last state; a line over 64 KiB is passed on in
pieces). The installer runs in a process group of its own, so the build backends and
compilers it starts are reached together with it.

**SIGTERM and SIGINT during the install** (``StopSignals``, around the whole install step):
the handlers only record the signal; a wakeup pipe (``signal.set_wakeup_fd``) wakes the loop
reading the installer's output. That loop sends ``SIGTERM`` to the installer's process group,
and ``SIGKILL`` to the group once the installer itself has exited (its helpers have nothing
left to do), after ``STOP_GRACE_SECONDS`` (3 s), or at a second signal, whichever comes first.
The install then ends with ``SignalError`` (category ``Signal``, exit 128+N, e.g. 143 for
SIGTERM): ``requirements install stopped: trainenv received SIGTERM``. A signal while waiting
for another launcher's lock or while probing the interpreter ends the install the same way.
The previous handlers and wakeup fd are restored afterwards. This works the same when trainenv
is PID 1, where a signal without a handler would be ignored.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping, Sequence

from trainenv.errors import SignalError
from trainenv.frozen import frozen

STOP_GRACE_SECONDS = 3.0
_TICK = 1.0
_STOPPING_TICK = 0.05
_READ_SIZE = 64 * 1024
_MAX_PARTIAL = 64 * 1024


@frozen
class Finished:
    """How one installer command ended: its exit status (None: it did not start, then
    ``start_error`` says why; negative: killed by that signal)."""

    returncode: int | None
    start_error: str = ""


def run_installer(
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    on_line: Callable[[str], None],
    stops: StopSignals | None = None,
    on_stop: Callable[[str], None] = lambda what: None,
) -> Finished:
    """Run ``argv`` in its own process group, passing each output line to ``on_line`` as it
    comes; a stop signal recorded in ``stops`` ends the whole group (``on_stop`` says so)."""
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return Finished(None, start_error=f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        _pump(proc, on_line, stops, on_stop)
        return Finished(proc.wait())
    finally:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _pump(proc: subprocess.Popen[bytes], on_line: Callable[[str], None], stops: StopSignals | None,
          on_stop: Callable[[str], None]) -> None:
    """Pass each output line of ``proc`` to ``on_line`` until end of file, or until the stop
    sequence (module docstring) has ended the group when ``stops`` recorded a signal."""
    assert proc.stdout is not None  # run_installer pipes it
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    selector = selectors.DefaultSelector()
    selector.register(out, selectors.EVENT_READ)
    received: list[int] = stops.received if stops is not None else []
    if stops is not None and stops.fd >= 0:
        selector.register(stops.fd, selectors.EVENT_READ)
    partial, reading, deadline = b"", True, None
    with selector:
        while True:
            if deadline is None and received:
                on_stop(f"trainenv received {_signal_name(received[0])}")
                _signal_group(proc.pid, signal.SIGTERM)
                deadline = time.monotonic() + STOP_GRACE_SECONDS
            if deadline is not None and (time.monotonic() >= deadline or len(received) > 1 or _exited(proc)):
                _signal_group(proc.pid, signal.SIGKILL)  # the unreaped leader still holds the group id
                return
            if not reading and deadline is None:
                return
            for key, _ in selector.select(_TICK if deadline is None else _STOPPING_TICK):
                if key.fd != out:
                    _drain(key.fd)
                    continue
                data = _read(out)
                if data is None:
                    continue
                if not data:  # end of file
                    reading = False
                    selector.unregister(out)
                    data = b"\n" if partial else b""
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                if len(partial) > _MAX_PARTIAL:
                    lines.append(partial)
                    partial = b""
                for raw in lines:
                    on_line(raw.decode("utf-8", "replace").rstrip("\r").split("\r")[-1])


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, _READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return None


def _drain(fd: int) -> None:
    while _read(fd):
        pass


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has exited, without reaping it where the system allows (so its process
    group id stays reserved for the SIGKILL that follows); macOS has no ``waitid``."""
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(pgid: int, number: int) -> None:
    try:
        os.killpg(pgid, number)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class StopSignals:
    """SIGTERM and SIGINT while requirements install, as a context manager (module docstring).

    ``received`` lists the signals that arrived; ``fd`` is the wakeup pipe's read end (-1
    outside the main thread, where handlers cannot be set and signals keep their handling).
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.fd = -1
        self._write_fd = -1
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1

    def __enter__(self) -> StopSignals:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        try:
            self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            os.close(read_fd)
            os.close(write_fd)
            return self
        self.fd, self._write_fd = read_fd, write_fd
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._record)
        return self

    def _record(self, number: int, frame: object) -> None:
        self.received.append(number)  # nothing else: the reading loop acts on it

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
        if self.fd >= 0:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self.fd)
            os.close(self._write_fd)
            self.fd = self._write_fd = -1

    def check(self, tail: str = "") -> None:
        """Raise ``SignalError`` (exit 128+N) if SIGTERM or SIGINT arrived."""
        if self.received:
            number = self.received[0]
            raise SignalError(f"requirements install stopped: trainenv received {_signal_name(number)}", number, tail)
