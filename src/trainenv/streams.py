"""Copying the job's output to ours: as read, or line by line behind a prefix.

Without a prefix the bytes pass through unchanged (no re-chunking), which costs one read and
one write per chunk. With one (``TRAINENV_LOG_PREFIX``), each line starts with ``[host:rank] ``;
a line longer than ``LINE_LIMIT`` (64 KiB) goes out in pieces of that size, the second and
later marked ``[host:rank]+ ``: a job that writes megabytes without a newline costs linear time
and at most ``LINE_LIMIT`` bytes of buffer. The last ``TAIL_BYTES`` of stderr are kept for the
failure report.

The writes themselves happen on a thread of their own (``Output``): a reader of our stdout or
stderr that stalls (a log driver, a pipe nobody reads) must never stop the supervisor, which
still has signals to forward and a time limit to keep.
"""

from __future__ import annotations

import os
import time
from collections import deque

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    import threading


TAIL_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
LINE_LIMIT = 64 * 1024  # with a log prefix, longer lines are sent in pieces of this size
PIPE_SIZE = 1024 * 1024
PENDING_LIMIT = 1024 * 1024  # bytes read from the job and not yet written out, before reading pauses
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), spelled out to work on Python 3.9


def write_all(fd: int, data: bytes) -> bool:
    """Write everything to ``fd``; False once the reader is gone (the job keeps running)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            time.sleep(0.001)
            continue
        except OSError:
            return False
        view = view[written:]
    return True


def continued_prefix(prefix: bytes) -> bytes:
    """The mark of a continued piece of an over-long line: ``[host:0] `` → ``[host:0]+ ``."""
    return prefix[:-1] + b"+ " if prefix.endswith(b" ") else prefix + b"+ "


class Output:
    """Writes to our output fds on one thread of its own, in the order given.

    ``write`` never blocks. While more than ``limit`` bytes wait (``full``), the supervisor stops
    reading the job's pipes, so the job blocks on its own writes, as it would writing to the
    stalled reader directly. A fd whose reader is gone (``EPIPE``) is dropped from then on; the
    job keeps running. ``flush(seconds)`` waits until everything is written, or gives up. The
    thread (and ``threading``, a few milliseconds of the launch) comes with the first write."""

    def __init__(self, limit: int = PENDING_LIMIT) -> None:
        self.limit = limit
        self.pending = 0
        self.closed: set[int] = set()
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._changed: threading.Condition | None = None

    @property
    def full(self) -> bool:
        return self.pending >= self.limit

    def write(self, fd: int, data: bytes) -> None:
        if not data or fd in self.closed:
            return
        if self._changed is None:
            import threading

            self._changed = threading.Condition()
            threading.Thread(target=self._run, args=(self._changed,), name="trainenv-output", daemon=True).start()
        with self._changed:
            self._chunks.append((fd, data))
            self.pending += len(data)
            self._changed.notify_all()

    def wait_room(self, seconds: float) -> bool:
        """Wait up to ``seconds`` until at most half of ``limit`` waits; whether it is no longer full."""
        deadline = time.monotonic() + seconds
        if self._changed is None:
            return True
        with self._changed:
            while self.pending > self.limit // 2:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self.pending < self.limit

    def flush(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for everything to be written; whether it was."""
        deadline = time.monotonic() + seconds
        if self._changed is None:
            return True
        with self._changed:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _run(self, changed: threading.Condition) -> None:
        while True:
            with changed:
                while not self._chunks:
                    changed.wait()
                fd, data = self._chunks.popleft()
            if fd not in self.closed and not write_all(fd, data):
                self.closed.add(fd)
            with changed:
                self.pending -= len(data)
                changed.notify_all()


class Stream:
    """One of the job's output pipes, copied to one of ours.

    Without a prefix the bytes pass through as read. With one, each line gets it; a line
    longer than ``LINE_LIMIT`` goes out in pieces of ``LINE_LIMIT`` bytes, each after the
    first marked with ``continued_prefix``, so a job that never writes a newline costs
    linear time and at most ``LINE_LIMIT`` bytes of buffer.
    """

    def __init__(self, fd: int, target: int, prefix: bytes | None, keep_tail: bool, output: Output) -> None:
        self.fd = fd
        self.target = target
        self.output = output
        self.prefix = prefix
        self.first = prefix or b""  # the mark of a line's first piece
        self.more = continued_prefix(prefix) if prefix else b""
        self.continued = False  # the bytes that follow continue a line already partly sent
        self.keep_tail = keep_tail
        self.tail = bytearray()
        self.partial = b""
        self.last_read_full = False

    def pump(self) -> bool:
        """Read once and pass it on; False at end of file."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            if self.prefix and self.partial:
                self._emit(b"".join(self._pieces(self.partial)))
                self.partial = b""
            return False
        if self.keep_tail:
            self.tail += data
            if len(self.tail) > 2 * TAIL_BYTES:
                del self.tail[:-TAIL_BYTES]
        if self.prefix is None:
            self._emit(data)
        else:
            self._emit(self._prefixed(data))
        self.last_read_full = len(data) == READ_SIZE
        return True

    def _prefixed(self, data: bytes) -> bytes:
        """The complete lines (and whole pieces of an over-long last line) of what was read."""
        text = self.partial + data  # at most LINE_LIMIT + READ_SIZE bytes
        cut = text.rfind(b"\n") + 1
        out = []
        if cut:
            # A line longer than LINE_LIMIT covers a whole half-LINE_LIMIT window without a
            # newline; no such window means every line fits: prefix them all in one pass.
            half = LINE_LIMIT // 2
            if all(text.find(b"\n", k * half, (k + 1) * half) >= 0 for k in range(cut // half)):
                mark = self.more if self.continued else self.first
                out.append(mark + text[:cut - 1].replace(b"\n", b"\n" + self.first) + b"\n")
            else:
                for line in text[:cut - 1].split(b"\n"):
                    out += self._pieces(line)
                    self.continued = False
            self.continued = False
        rest = text[cut:]
        while len(rest) > LINE_LIMIT:  # an over-long line so far: send its whole pieces now
            out += self._pieces(rest[:LINE_LIMIT])
            self.continued = True
            rest = rest[LINE_LIMIT:]
        self.partial = rest
        return b"".join(out)

    def _pieces(self, line: bytes) -> list[bytes]:
        """``line`` (no newline) as prefixed pieces of at most ``LINE_LIMIT`` bytes."""
        pieces = []
        for start in range(0, max(len(line), 1), LINE_LIMIT):
            pieces.append((self.more if self.continued else self.first) + line[start:start + LINE_LIMIT] + b"\n")
            self.continued = True
        return pieces

    def _emit(self, data: bytes) -> None:
        self.output.write(self.target, data)

    def tail_text(self) -> str:
        return bytes(self.tail[-TAIL_BYTES:]).decode("utf-8", "replace")


def grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe, so a job that writes bursts blocks less; the default is fine too."""
    try:
        import fcntl

        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, OSError):
        pass
