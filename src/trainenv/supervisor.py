"""The supervisor: run one job process the way a good PID 1 does.

The contract, in one sentence: start the job in its own process group, pass its output
through, forward signals to all of the job, reap every child that dies, and return the job's
own exit status once the main process is gone.

**The loop.** Signal handlers do nothing themselves: Python's C-level handler writes the
signal number to a wakeup pipe (``signal.set_wakeup_fd``). One loop waits (``poll``) on
that pipe and the job's stderr (and stdout, with line prefixes), then each tick:

1. dispatches every signal read from the pipe: ``SIGTERM``/``SIGINT`` → ``stop``; ``SIGHUP``,
   ``SIGQUIT``, ``SIGUSR1``, ``SIGUSR2`` → forwarded to the job's processes; ``SIGCHLD`` → wake up;
2. copies what the job wrote (``trainenv.streams``: unchanged, or line by line behind a log
   prefix, a line over 64 KiB in pieces), keeping the last 64 KiB of stderr; the writes happen
   on a thread of their own, so a reader of our output that stalls never stops this loop (past
   1 MiB unwritten it stops reading the job's pipes until the reader catches up);
3. on ``SIGCHLD``, a closed pipe or a quiet tick, reaps with ``waitpid(-1, WNOHANG)`` until
   nothing is left; only the main process's status
   counts, orphans re-parented to us (as PID 1 or as a child subreaper) are reaped and logged
   at debug;
4. checks the deadlines: the time limit (``max_run_seconds``) calls ``stop``; the end of the
   grace period sends ``SIGKILL`` to the job's processes.

**The job's processes** are its process group plus every process below trainenv (found in
``/proc``): the runner makes trainenv a child subreaper (or it is PID 1), so a process the job
started in a session of its own (``setsid``, a daemon) is re-parented to trainenv when its
parent exits, and stays within reach. Signals go to the group and to each such process.

**Stopping** is one path: ``stop`` sends the signal (``SIGTERM`` for the time limit) to the
job's processes and starts the grace period; a second ``SIGTERM``/``SIGINT`` cuts it short.
When the main process exits, every process it left gets ``SIGTERM``, at most 2 s (or the
grace, if shorter), then ``SIGKILL``, so nothing the job started outlives it.

**Exit status:** the main process's own, or 128+N when it died of signal N (shell
convention); 127/126 when it could not be executed. The job sees no trace of the
supervisor: default signal dispositions, the plan's environment, its own session. When trainenv
owns a terminal (stdin a tty, its group in the foreground), the job's group gets the terminal,
so ``input()`` and ``pdb`` work and Ctrl-C reaches the job as it would without trainenv; trainenv
takes the terminal back when the job is over.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping, Sequence

    # read end, write end, the previous wakeup fd, the previous handlers
    _Installed = tuple[int, int, int, dict[int, Any]]

from trainenv.frozen import frozen
from trainenv.spawn import reaped, spawn
from trainenv.streams import Output, Stream, grow_pipe

COALESCE_SECONDS = 0.002
PAUSED_CHECK_SECONDS = 0.02  # while the output is full: the longest wait for room before signals are read
FLUSH_SECONDS = 10.0  # at the end, how long the job's last output may take to be written
LEFTOVER_GRACE = 2.0
TICK = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARD_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_CHILD_SUBREAPER = 36


@frozen
class RunResult:
    exit_code: int
    signal_number: int | None
    timed_out: bool
    stopped_by: int | None
    oom_killed: bool
    stderr_tail: str
    seconds: float
    exec_error: str | None = None


def become_subreaper() -> bool:
    """Adopt the job's orphans when we are not PID 1 (Linux); returns whether it worked."""
    if os.getpid() == 1:
        return True
    if not sys.platform.startswith("linux"):
        return False
    args = (PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:  # ctypes' C core alone: the same call ctypes makes, without ~2 ms of ctypes' own imports
        import _ctypes

        libc = _ctypes.dlopen(None)  # type: ignore[arg-type]  # None: this program and its libraries (typeshed says str)
        return bool(_ctypes.call_function(_ctypes.dlsym(libc, "prctl"), args) == 0)
    except (ImportError, AttributeError, OSError):
        pass
    try:  # an interpreter whose _ctypes lacks those helpers
        import ctypes

        return bool(ctypes.CDLL(None).prctl(*args) == 0)
    except (OSError, AttributeError):
        return False


class Supervisor:
    """Runs one job process to completion; see the module docstring."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        *,
        grace_seconds: float = 30.0,
        max_run_seconds: float | None = None,
        log_prefix: str | None = None,
        debug: Callable[[str], None] = lambda _: None,
        info: Callable[[str], None] = lambda _: None,
        oom_count: Callable[[], int | None] = lambda: None,
        before_spawn: Callable[[], None] = lambda: None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.grace_seconds = grace_seconds
        self.max_run_seconds = max_run_seconds
        self.prefix = log_prefix.encode() if log_prefix else None
        self.debug = debug
        self.info = info
        self.oom_count = oom_count
        self.before_spawn = before_spawn  # runs once our handlers are in place: may raise to spawn nothing
        self.pid: int | None = None  # the job's main process, the leader of its process group
        self.foreign: frozenset[int] = frozenset()  # processes below us from before the job: not the job's
        self.main_status: int | None = None
        self.stopped_by: int | None = None
        self.timed_out = False
        self.kill_at: float | None = None
        self.deadline: float | None = None
        self.streams: dict[int, Stream] = {}
        self.output = Output()
        self.paused = False  # the job's pipes are not polled while the output is full
        self.poller = select.poll()
        self.watched: dict[int, Stream | None] = {}  # polled fds: the job's pipes, and None for the wakeup pipe

    # -- signals -----------------------------------------------------------------------

    def _install_signals(self) -> _Installed:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        previous: dict[int, Any] = {}
        for number in STOP_SIGNALS + FORWARD_SIGNALS + (signal.SIGCHLD,):
            previous[number] = signal.signal(number, _enqueue_only)
        return read_fd, write_fd, previous_fd, previous

    def _restore_signals(self, installed: _Installed) -> None:
        read_fd, write_fd, previous_fd, previous = installed
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)

    def handle_signal(self, number: int) -> None:
        if number == signal.SIGCHLD:
            return  # reaping happens every tick
        if number in STOP_SIGNALS:
            self.stop(number)
        else:
            self.info(f"forwarding {signal.Signals(number).name} to the job")
            self._signal_job(number)

    def stop(self, number: int, timed_out: bool = False) -> None:
        """Signal the job's processes and start the grace period; a repeat ends it at once."""
        if self.main_status is not None:
            return
        now = time.monotonic()
        if self.kill_at is not None:
            if number in STOP_SIGNALS and not timed_out:
                self.info(f"second {signal.Signals(number).name}: killing the job now")
                self.kill_at = now
            return
        self.timed_out = timed_out
        self.stopped_by = None if timed_out else number
        why = "time limit reached" if timed_out else f"received {signal.Signals(number).name}"
        self.info(f"{why}: sending {signal.Signals(number).name} to the job, SIGKILL in {self.grace_seconds:g} s")
        self._signal_job(number)
        self.kill_at = now + self.grace_seconds

    def _signal_job(self, number: int) -> None:
        """Signal the job's process group, and each process of the job outside it."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, number)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.debug("cannot signal the job's process group (permission denied)")
        for pid, group in self._strays().items():
            if group != self.pid:  # the group got it already
                try:
                    os.kill(pid, number)
                except (ProcessLookupError, PermissionError):
                    pass

    def _strays(self) -> dict[int, int]:
        """``{pid: process group}`` of every live process below us that is not ``foreign``.

        With trainenv as PID 1 or a child subreaper, whatever the job started ends up below us,
        even in a session of its own (``setsid``) after its parent exited.
        """
        if not _has_children():
            return {}
        return {pid: group for pid, group in _descendants(os.getpid()).items() if pid not in self.foreign}

    # -- reaping -------------------------------------------------------------------------

    def reap(self) -> None:
        """Reap every child that exited (``spawn.reaped``); keep the main process's status."""
        for pid, status in reaped():
            if pid == self.pid:
                self.main_status = status
            else:
                self.debug(f"reaped orphan {pid}")

    # -- output --------------------------------------------------------------------------

    def _pump(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for signals and output; True when reaping is due.

        Reaping is due on ``SIGCHLD`` and on a quiet tick. After a read that did not fill
        the buffer, a 2 ms pause lets the pipe fill up: a chatty job then costs a few hundred
        reads a second instead of one per line, at most 2 ms later on screen. While more output
        waits to be written than ``Output`` holds, it waits for room (20 ms at most) and then
        reads only signals: the job's pipes fill up and the job waits, not this loop.
        """
        full = self.output.full and not self.output.wait_room(min(timeout, PAUSED_CHECK_SECONDS))
        if full != self.paused:
            self._pause(full)
        if full:
            timeout = 0.0  # waited for room already: only signals now
        events = self.poller.poll(int(timeout * 1000) + 1 if timeout > 0 else 0)
        reap_due = not events
        partial_read = False
        for fd, _ in events:  # readable, or closed (POLLHUP): a read tells which
            stream = self.watched[fd]
            if stream is None:
                try:
                    data = os.read(fd, 512)
                except (BlockingIOError, InterruptedError):
                    continue
                for number in data:
                    reap_due |= number == signal.SIGCHLD
                    self.handle_signal(number)
            else:
                if not stream.pump():
                    self._unwatch(fd)
                    reap_due = True
                elif not stream.last_read_full:
                    partial_read = True
        if partial_read and not reap_due:
            time.sleep(COALESCE_SECONDS)
        return reap_due

    def _timeout(self, now: float) -> float:
        candidates = [TICK]
        for moment in (self.deadline, self.kill_at):
            if moment is not None:
                candidates.append(max(0.0, moment - now))
        return min(candidates)

    # -- the run -------------------------------------------------------------------------

    def _spawn(self) -> None:
        if _has_children():  # only when embedded in a process with children of its own
            self.foreign = frozenset(_descendants(os.getpid()))
        pipes = {2: os.pipe()}
        if self.prefix:  # else the job writes to our stdout itself
            pipes[1] = os.pipe()
        try:
            self.pid = spawn(self.argv, self.env, self.cwd, pipes[1][1] if 1 in pipes else None, pipes[2][1])
        except BaseException:
            for read_end, write_end in pipes.values():
                os.close(read_end)
                os.close(write_end)
            raise
        for target, (fd, write_end) in pipes.items():
            os.close(write_end)
            keep_tail = target == 2
            os.set_blocking(fd, False)
            grow_pipe(fd)
            stream = Stream(fd, target, self.prefix, keep_tail, self.output)
            self.streams[target] = stream
            self._watch(fd, stream)

    def _hand_over_terminal(self) -> bool:
        """Give the terminal to the job's group when it is ours (stdin a tty, our group in front).

        The job then reads the terminal (``input()``, ``pdb``) instead of stopping on SIGTTIN,
        as when it runs on its own; Ctrl-C reaches it directly. A read it tried before it got
        the terminal left it stopped: SIGCONT resumes it.
        """
        try:
            if self.pid is None or not os.isatty(0) or os.tcgetpgrp(0) != os.getpgrp():
                return False
        except OSError:
            return False
        if not _set_foreground(self.pid):
            return False
        self._signal_job(signal.SIGCONT)
        return True

    def run(self) -> RunResult:
        started = time.monotonic()
        terminal = False
        installed = self._install_signals()
        self._watch(installed[0], None)
        oom_before = self.oom_count()
        try:
            self.before_spawn()
            try:
                self._spawn()
            except OSError as exc:
                code = 127 if exc.errno == errno.ENOENT else 126
                return RunResult(code, None, False, None, False, "", 0.0, exec_error=f"cannot execute {self.argv[0]!r}: {exc.strerror}")
            terminal = self._hand_over_terminal()
            if self.max_run_seconds:
                self.deadline = started + self.max_run_seconds
            while self.main_status is None:
                now = time.monotonic()
                if self.deadline is not None and now >= self.deadline and self.kill_at is None:
                    self.stop(signal.SIGTERM, timed_out=True)
                if self.kill_at is not None and now >= self.kill_at:
                    self.info("grace period over: sending SIGKILL to the job")
                    self._signal_job(signal.SIGKILL)
                    self.kill_at = now + self.grace_seconds + TICK
                if self._pump(self._timeout(time.monotonic())):
                    self.reap()
            self._end_leftovers()
            self._drain()
            self.output.flush(FLUSH_SECONDS)
        finally:
            if terminal:
                _set_foreground(os.getpgrp())
            self.poller.unregister(installed[0])
            del self.watched[installed[0]]
            self._restore_signals(installed)  # closes the wakeup pipe
        from trainenv.outcome import decode_wait_status

        assert self.main_status is not None
        code, number = decode_wait_status(self.main_status)
        oom_after = self.oom_count()
        oom = number == signal.SIGKILL and oom_before is not None and oom_after is not None and oom_after > oom_before
        tail = self.streams[2].tail_text() if 2 in self.streams else ""
        return RunResult(code, number, self.timed_out, self.stopped_by, bool(oom), tail, time.monotonic() - started)

    def _job_alive(self) -> bool:
        """Whether any process of the job is left: in its group, or anywhere below us."""
        assert self.pid is not None
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return bool(self._strays())

    def _end_leftovers(self) -> None:
        """The main process is gone: stop every process it left (SIGTERM, grace, SIGKILL), reap them."""
        if not self._job_alive():
            return
        self.debug("the job's main process exited; stopping the processes it left")
        self._signal_job(signal.SIGTERM)
        until = time.monotonic() + min(LEFTOVER_GRACE, self.grace_seconds)
        while self._job_alive() and time.monotonic() < until:
            self._pump(0.05)
            self.reap()
        if self._job_alive():
            self._signal_job(signal.SIGKILL)
        for _ in range(50):
            self.reap()
            if not self._job_alive():
                break
            time.sleep(0.01)

    def _drain(self) -> None:
        """Copy what is still in the pipes, for at most 1 s: stop when they close or time is up."""
        quiet_until = time.monotonic() + 1.0
        while any(stream is not None for stream in self.watched.values()):
            if time.monotonic() > quiet_until:
                break
            self._pump(0.05)
        for fd, stream in list(self.watched.items()):
            if stream is not None:
                self._unwatch(fd)

    def _watch(self, fd: int, stream: Stream | None) -> None:
        if stream is None or not self.paused:
            self.poller.register(fd, select.POLLIN)
        self.watched[fd] = stream

    def _unwatch(self, fd: int) -> None:
        """Stop polling one of the job's pipes, and close it."""
        if not self.paused:
            self.poller.unregister(fd)
        del self.watched[fd]
        os.close(fd)

    def _pause(self, paused: bool) -> None:
        """Stop (or resume) reading the job's pipes; signals are still read."""
        for fd, stream in self.watched.items():
            if stream is not None:
                if paused:
                    self.poller.unregister(fd)
                else:
                    self.poller.register(fd, select.POLLIN)
        self.paused = paused


def _has_children() -> bool:
    """Whether this process has any child, running or not (one cheap system call)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False
    except (AttributeError, OSError):  # no waitid: assume there may be
        return True


def _set_foreground(group: int) -> bool:
    """Make ``group`` the terminal's foreground group (SIGTTOU ignored meanwhile, as a shell does)."""
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(0, group)
        return True
    except OSError:
        return False
    finally:
        signal.signal(signal.SIGTTOU, previous)


def _descendants(root: int) -> dict[int, int]:
    """``{pid: process group}`` of every live (not zombie) process below ``root``, from ``/proc``."""
    parents: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != b"Z":
            parents.setdefault(int(fields[1]), []).append(int(name))
            groups[int(name)] = int(fields[2])
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for child in parents.get(stack.pop(), ()):
            if child not in found:
                found[child] = groups[child]
                stack.append(child)
    return found


def _enqueue_only(signum: int, frame: object) -> None:
    """The Python-level handler: nothing. The C handler already queued the number."""
