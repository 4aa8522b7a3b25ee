"""Several processes of the embedded server on one port: a small supervisor and N pre-forked workers.

Used when the stdlib server runs with ``workers`` > 1 (``serve --workers N``,
``TRAINENV_SERVING_WORKERS``). ``trainenv.serving.startup`` has already bound the listening socket
and imported the handler module; this process forks N workers that inherit both. Each worker is
one stdlib server (``trainenv.serving.servers.stdlib.run``) on the shared socket: the kernel
hands each new connection to one of them, and a worker's death loses no queued connection. Each
worker publishes its number of open connections in shared memory, and one with more than another
waits briefly before its next ``accept`` (``servers.dispatch.Balance``), so a burst of new
connections spreads evenly. Each
worker builds its own app and runs ``model_fn`` itself, after the fork.

**Readiness.** One byte per worker slot in anonymous shared memory: a worker sets its slot's
byte once its model is loaded. ``/ping`` (and the readiness routes) of every worker is 200 only
once all N bytes are set; the bytes are never cleared, so ``/ping`` stays 200 while a replaced
worker reloads. The first N workers accept at once (answering 503 while they load); a replacement,
once all have loaded, accepts only after its own model is loaded, so no request meets it
unready.

**The supervisor** is gunicorn's arbiter in small: signal handlers only enqueue (and the
``signal.set_wakeup_fd`` pipe wakes the loop; a worker writes one byte to it when it has
loaded); one loop waits, handles the queued signals, reaps every child and keeps the worker
table full.

| event | what the supervisor does |
|---|---|
| a worker dies (any signal or exit status, not stopping) | logged (SIGKILL: "perhaps out of memory?"), replaced at once; only the requests it held fail |
| a worker exits 78 (its model failed to load) or 124 (start-up timeout) | stops the others, exits with that code |
| a worker keeps dying before it has loaded (5 times in a row, however long each had loaded: ``model_fn`` crashes the process) | stops the others, exits 78 |
| SIGTERM or SIGINT | SIGTERM to every worker: each stops accepting and drains its requests in flight for up to ``grace_s``; exit 0 after the last one |
| a second SIGTERM/SIGINT | SIGQUIT to every worker: they stop waiting for their requests |
| ``grace_s`` + 5 s after the stop | SIGKILL to the workers still running |

Workers ignore SIGINT (a Ctrl-C reaches the whole process group; the supervisor passes it on as
one SIGTERM) and stop by themselves when the supervisor is gone. A SIGTERM to the whole group
(systemd's KillMode=control-group, ``kill -TERM -PGID``, ``tini -g``) reaches a worker twice, its
own and the supervisor's: a worker's second SIGTERM changes nothing, only SIGQUIT (as in
gunicorn) cuts its drain short.
"""

from __future__ import annotations

import mmap
import os
import queue
import select
import signal
import sys
import threading
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    import socket
    from typing import Any, Callable

    from trainenv.serving.app import ServingApp
    from trainenv.serving.config import ServingEnv

from trainenv.errors import EXIT_CONFIG, EXIT_INTERNAL, EXIT_TIMEOUT
from trainenv.serving.logsink import ServingLog
from trainenv.serving.servers.dispatch import Balance
from trainenv.spawn import reaped

KILL_AFTER_GRACE_S = 5.0
QUICK_DEATHS_MAX = 5
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def run(env: ServingEnv, sock: socket.socket, new_app: Callable[[ServingLog], ServingApp], log: ServingLog) -> int:
    """Serve ``new_app`` on ``env.workers`` worker processes sharing ``sock``; the exit code."""
    return Supervisor(env, sock, new_app, log).run()


class Supervisor:
    """The worker table and the one loop (see the module docstring)."""

    def __init__(
        self, env: ServingEnv, sock: socket.socket, new_app: Callable[[ServingLog], ServingApp], log: ServingLog
    ) -> None:
        self.env = env
        self.sock = sock
        self.new_app = new_app
        self.log = log
        self.size = env.workers
        # Shared with the workers: byte i is 1 once slot i has ever loaded (the readiness gate),
        # byte size+i is 1 once the current worker of slot i has loaded.
        self.loaded = mmap.mmap(-1, 2 * self.size)
        # Each worker's open connections, so a burst of new ones spreads evenly (stdlib's Balance).
        self.connections = memoryview(mmap.mmap(-1, 4 * self.size)).cast("i")
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
        self.quick_deaths = [0] * self.size
        self.events: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.stopping = False
        self.kill_at = 0.0
        self.exit_code = 0
        self.all_loaded = False
        self.wake_r = self.wake_w = -1

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        previous = {signum: signal.signal(signum, self._enqueue) for signum in _HANDLED}
        previous_wakeup = signal.set_wakeup_fd(self.wake_w)
        try:
            self.log.info(f"starting {self.size} worker processes")
            for slot in range(self.size):
                self.spawn(slot)
            while self.workers or not self.stopping:
                self._wait(1.0)
                self._handle_signals()
                self.reap()
                self._check_loaded()
                if self.stopping and self.workers and time.monotonic() >= self.kill_at:
                    self._kill_all(signal.SIGKILL)
            return self.exit_code
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in (self.wake_r, self.wake_w):
                os.close(fd)

    def _enqueue(self, signum: int, frame: Any) -> None:
        """Signal handler: enqueue, nothing else."""
        self.events.put(signum)

    def _wait(self, timeout: float) -> None:
        try:
            select.select([self.wake_r], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while True:
            try:
                signum = self.events.get_nowait()
            except queue.Empty:
                return
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.handle_stop(signum)

    def handle_stop(self, signum: int) -> None:
        """SIGTERM/SIGINT: drain every worker; a second one tells them to stop waiting."""
        name = signal.Signals(signum).name
        if self.stopping:
            self.log.info(f"{name} again: workers stop waiting for their requests")
        else:
            self.log.info(
                f"{name}: stopping {len(self.workers)} workers; requests in flight get up to "
                f"{self.env.grace_s:g} s to finish"
            )
            self.stop(0)
            return
        self._kill_all(signal.SIGQUIT)

    def stop(self, exit_code: int) -> None:
        """Stop every worker (SIGTERM, SIGKILL after the grace) and exit with ``exit_code`` after the last."""
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = exit_code
        self.sock.close()  # the workers close theirs: new connections are refused
        self.kill_at = time.monotonic() + self.env.grace_s + KILL_AFTER_GRACE_S
        self._kill_all(signal.SIGTERM)

    def _kill_all(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # -- workers ----------------------------------------------------------------------------------

    def spawn(self, slot: int) -> None:
        """Fork the worker of ``slot``; a replacement accepts only once loaded, unless some slot
        never loaded yet (then ``/ping`` is 503 anyway and it answers at once, like the others)."""
        accept_early = not self.all_loaded
        self.loaded[self.size + slot] = 0
        self.connections[slot] = Balance.NOT_ACCEPTING
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; measured by the tests' real processes
            code = EXIT_INTERNAL
            try:
                code = self._worker(slot, accept_early)
            except BaseException:  # noqa: BLE001 - nothing may escape into the parent's code
                import traceback

                self.log.error("worker failed", traceback.format_exc())
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except (OSError, ValueError):
                        pass
                os._exit(code)
        self.workers[pid] = (slot, time.monotonic())
        self.log.debug(f"worker {pid} started (slot {slot})")

    def _worker(self, slot: int, accept_early: bool) -> int:
        """In the child: undo the supervisor's signal set-up, then serve until told to stop."""
        from trainenv.serving.servers import stdlib

        signal.set_wakeup_fd(-1)
        for signum in _HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)  # until stdlib.run handles it: cut short, never a core dump
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(self.wake_r)
        _stop_when_orphaned(os.getppid())
        loaded, wake_w, size = self.loaded, self.wake_w, self.size

        def new_app(log: ServingLog) -> ServingApp:
            app = self.new_app(log)
            app.peers_loading = lambda: loaded[:size].count(0)
            return app

        def on_loaded(app: ServingApp) -> None:
            loaded[slot] = loaded[size + slot] = 1
            try:
                os.write(wake_w, b"L")
            except OSError:
                pass

        return stdlib.run(
            self.env, self.sock, new_app, self.log,
            accept_early=accept_early, on_loaded=on_loaded, signals=(signal.SIGTERM, signal.SIGQUIT),
            cut=(signal.SIGQUIT,), balance=Balance(self.connections, slot),
        )

    def reap(self) -> None:
        """Reap every child that exited; replace a worker that died unless stopping."""
        for pid, status in reaped():
            entry = self.workers.pop(pid, None)
            if entry is None:
                self.log.debug(f"reaped process {pid} (not a worker)")
                continue
            self._worker_exited(pid, status, *entry)

    def _worker_exited(self, pid: int, status: int, slot: int, started: float) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"exited with status {code}" if code >= 0 else f"died of {_signal_name(-code)}"
        if self.stopping:
            self.log.debug(f"worker {pid} {how}")
            return
        if code in (EXIT_CONFIG, EXIT_TIMEOUT):
            self.log.error(f"worker {pid} {how} (see above); stopping the other workers")
            self.stop(code)
            return
        guess = " (perhaps out of memory?)" if code == -signal.SIGKILL else ""
        if not self.loaded[self.size + slot]:  # however long it had been loading
            self.quick_deaths[slot] += 1
        else:
            self.quick_deaths[slot] = 0
        if self.quick_deaths[slot] >= QUICK_DEATHS_MAX:
            self.log.error(
                f"the model could not be loaded: worker {pid} {how}{guess}, the {QUICK_DEATHS_MAX}th worker in a row "
                "to die before loading it; stopping"
            )
            self.stop(EXIT_CONFIG)
            return
        held = "" if code == 0 else "; requests it held failed"
        self.log.warning(f"worker {pid} {how}{guess}{held}; starting a new worker")
        self.spawn(slot)

    def _check_loaded(self) -> None:
        if not self.all_loaded and not self.loaded[: self.size].count(0):
            self.all_loaded = True
            self.log.info(f"ready: all {self.size} workers have loaded the model")


def _stop_when_orphaned(parent: int) -> None:
    """In a worker: SIGTERM ourselves (drain and exit) once the supervisor is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="trainenv-parent-watch", daemon=True).start()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
