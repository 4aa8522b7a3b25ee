"""A bounded pool of handler threads with a deadline per call: the source of 503 and 504.

``HandlerPool(threads, max_queue)`` runs at most ``threads`` handler calls at once and lets at
most ``max_queue`` more wait. ``run(fn, args, deadline)`` blocks the calling (connection) thread
until the call returns, or raises:

* ``Saturated`` at once when ``threads + max_queue`` calls are already admitted (the app answers
  503 with ``Retry-After``);
* ``DeadlineExceeded`` when ``deadline`` (a ``time.monotonic()`` value) passes first (504).

A Python thread cannot be killed. A call that overruns its deadline keeps running in its
handler thread until it returns on its own; its result is dropped. It still holds its slot
until then, so saturation stays honest: a handler that hangs for good eventually makes the
pool answer 503, and ``overrunning`` says how many calls are in that state. A call whose
deadline passes while it is still queued is never started.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

_allocate_lock = threading.Lock


class Saturated(Exception):
    """Every handler thread is busy and the queue is full."""


class DeadlineExceeded(Exception):
    """The call did not finish before its deadline; ``started`` says if it had begun."""

    def __init__(self, started: bool) -> None:
        super().__init__("deadline exceeded")
        self.started = started


class _Job:
    __slots__ = ("fn", "args", "deadline", "done", "result", "error", "started", "abandoned")

    def __init__(self, fn: Callable, args: Tuple, deadline: float) -> None:
        self.fn = fn
        self.args = args
        self.deadline = deadline
        self.done = _allocate_lock()
        self.done.acquire()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.started = False
        self.abandoned = False


class HandlerPool:
    """``threads`` daemon threads taking jobs from one queue; see the module docstring."""

    def __init__(self, threads: int, max_queue: int, name: str = "trainenv-handler") -> None:
        if threads < 1 or max_queue < 0:
            raise ValueError("HandlerPool needs threads >= 1 and max_queue >= 0")
        self.threads = threads
        self.capacity = threads + max_queue
        self._admitted = 0
        self._overrunning = 0
        self._lock = threading.Lock()
        self._queue: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        self._workers: List[threading.Thread] = []
        for index in range(threads):
            thread = threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            thread.start()
            self._workers.append(thread)

    @property
    def admitted(self) -> int:
        """Calls running or queued, overrunning ones included."""
        return self._admitted

    @property
    def overrunning(self) -> int:
        """Calls past their deadline that are still running."""
        return self._overrunning

    def run(self, fn: Callable, args: Tuple, deadline: float) -> Any:
        with self._lock:
            if self._admitted >= self.capacity:
                raise Saturated()
            self._admitted += 1
        job = _Job(fn, args, deadline)
        self._queue.put(job)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not job.done.acquire(timeout=remaining):
            with self._lock:
                job.abandoned = True
                if job.started and job.done.locked():
                    self._overrunning += 1
            raise DeadlineExceeded(job.started)
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                job.started = not job.abandoned and time.monotonic() < job.deadline
            try:
                if job.started:
                    job.result = job.fn(*job.args)
                else:
                    job.error = DeadlineExceeded(False)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                job.error = exc
            finally:
                with self._lock:
                    self._admitted -= 1
                    if job.abandoned and job.started:
                        self._overrunning -= 1
                    job.done.release()

    def stop(self) -> None:
        """Let idle threads exit (busy ones finish their call first); for tests and clean exits."""
        for _ in self._workers:
            self._queue.put(None)
