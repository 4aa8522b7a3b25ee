"""Who takes the work: the connection loop or a handler thread, and which worker process.

* ``InlineLane`` lets the connection loop answer a buffered request on its own thread while the
  handler is fast, and rescues the loop when one is not (see the class).
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


class InlineLane:
    """When the connection loop answers a request itself instead of handing it to a thread.

    A hand-over to a handler thread costs two thread switches and two GIL hand-overs; for a
    handler that answers in tens of microseconds that is most of the request's cost. So the loop
    runs a whole buffered request on its own thread when ``ready()`` (the server says: a handler
    slot is free, nothing waits for a thread, no batching) and the handler has been fast: when the
    moving average of the inline runs' wall time (weight 1/4 for the newest) passes ``budget_s``,
    every request goes to the threads for ``cooldown_s``. An average, because on a busy machine
    a fast run is now and then preempted for a few milliseconds; a handler that sleeps, waits on
    I/O or a GPU, or computes for milliseconds crosses it within a few runs.

    The loop polls no connection while it runs a request. A watcher thread, awake only while
    requests run inline, looks every ``rescue_s``: a run older than that (a handler that turned
    slow or hangs, a client that does not read its answer) gets ``on_stuck()``, which starts a
    new loop thread; the stuck one retires when its request ends. So a slow request delays the
    other connections by at most about ``2 * rescue_s``, once per ``cooldown_s``."""

    def __init__(
        self, ready: Callable[[], bool], on_stuck: Callable[[], None], *,
        budget_s: float = 0.002, cooldown_s: float = 1.0, rescue_s: float = 0.01, idle_s: float = 1.0,
    ) -> None:
        self.ready = ready
        self.on_stuck = on_stuck
        self.budget_s = budget_s
        self.cooldown_s = cooldown_s
        self.rescue_s = rescue_s
        self.idle_s = idle_s
        self.slow_until = 0.0  # no inline runs before this time.monotonic()
        self.average = 0.0  # seconds per inline run, a moving average
        self.started = 0.0  # the start of the run in progress; 0.0 when none
        self.runs = 0
        self.last = 0.0  # the end of the last run
        self.stopped = False
        self._awake = False
        self._wanted = threading.Event()
        self._watcher: threading.Thread | None = None

    def allows(self, now: float) -> bool:
        return now >= self.slow_until and self.ready()

    def run(self, job: Callable[[], None], now: float) -> None:
        """Run ``job`` on this (the loop's) thread; ``now`` is ``time.monotonic()`` of ``allows``."""
        self.runs += 1
        self.started = now
        if not self._awake:
            self._wake_watcher()
        try:
            job()
        finally:
            end = time.monotonic()
            if self.started == now:  # a rescued run ends while the new loop thread's may be running
                self.started = 0.0
            self.last = end
            self.average += (end - now - self.average) * 0.25
            if self.average > self.budget_s:
                self._cool_down(end)

    def _cool_down(self, now: float) -> None:
        """Threads only for ``cooldown_s``; then inline runs try again from half the budget."""
        self.slow_until = now + self.cooldown_s
        self.average = self.budget_s / 2

    def stop(self) -> None:
        self.stopped = True
        self._wanted.set()

    def _wake_watcher(self) -> None:
        self._awake = True
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="trainenv-inline-watch", daemon=True)
            self._watcher.start()
        self._wanted.set()

    def _watch(self) -> None:
        rescued = 0
        while not self.stopped:
            self._wanted.wait()
            time.sleep(self.rescue_s)
            started, run = self.started, self.runs
            now = time.monotonic()
            if started and now - started >= self.rescue_s and run != rescued and not self.stopped:
                rescued = run
                self._cool_down(now)
                self.on_stuck()
            elif not started and now - self.last >= self.idle_s:
                self._awake = False  # asleep until the next run wakes it
                self._wanted.clear()
                if self.started:  # a run began while we decided: it would not have woken us
                    self._awake = True
                    self._wanted.set()


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
