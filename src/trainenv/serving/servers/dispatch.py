"""Who takes the work: handler threads within a process, connections across worker processes.

* ``Dispatcher`` runs each complete request on a thread, oldest first; threads are started on
  demand up to ``max_threads`` and then kept. Requests beyond that wait, unparsed, for a thread.
* ``Balance`` spreads a burst of new connections evenly over the worker processes that share
  one listening socket (see the class).
"""

from __future__ import annotations

import threading
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable


class Dispatcher:
    """Runs jobs on threads started on demand (at most ``max_threads``), oldest job first.

    ``backlog()`` is how many jobs wait for a thread. When more than ``overflow_after`` wait, a new
    job runs at once on a thread of its own (which then ends): the app's pool counts the backlog
    as queued requests, so it answers that one 503 at once, as when its own queue is full."""

    def __init__(self, max_threads: int, overflow_after: int, name: str = "trainenv-http") -> None:
        import queue

        self.max_threads = max_threads
        self.overflow_after = overflow_after
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0

    @property
    def threads(self) -> int:
        return self._threads

    def backlog(self) -> int:
        return max(0, self._queued - self._idle)

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            backlog = self._queued + 1 - self._idle
            spawn = backlog > 0 and self._threads < self.max_threads
            overflow = not spawn and backlog > self.overflow_after
            if not overflow:
                self._queued += 1
            if spawn:
                self._threads += 1
        if overflow:
            try:
                threading.Thread(target=job, name=self.name, daemon=True).start()
                return
            except RuntimeError:  # no more threads: it waits its turn
                with self._lock:
                    self._queued += 1
        self._jobs.put(job)
        if spawn:
            try:
                threading.Thread(target=self._work, name=self.name, daemon=True).start()
            except RuntimeError:  # no more threads: the ones there are will get to it
                with self._lock:
                    self._threads -= 1

    def _work(self) -> None:
        jobs, lock = self._jobs, self._lock
        while True:
            with lock:
                self._idle += 1
            job = jobs.get()
            with lock:
                self._idle -= 1
                self._queued -= 1
            job()


class Balance:
    """Spreads the connections of one port over the worker processes sharing it: each worker
    publishes its open-connection count in shared memory, and one that has more than another
    accepting worker waits (up to ``wait_s``) before its next ``accept``, so the kernel hands the
    next connection to a worker blocked in ``accept`` with fewer. ``NOT_ACCEPTING`` marks a worker
    that does not accept (loading, stopping, dead)."""

    NOT_ACCEPTING = 0x7FFFFFFF

    def __init__(self, counts: memoryview, slot: int, wait_s: float = 0.002) -> None:
        self.counts = counts
        self.slot = slot
        self.wait_s = wait_s

    def publish(self, count: int) -> None:
        self.counts[self.slot] = count

    def wait_turn(self, mine: int) -> None:
        deadline = 0.0
        while True:
            fewest = min(self.counts)
            if mine <= fewest:
                return
            now = time.monotonic()
            if not deadline:
                deadline = now + self.wait_s
            elif now >= deadline:
                return
            time.sleep(0.0002)
