"""The stdlib server's connections: one selector thread owns every connection between requests.

``ConnectionLoop`` runs in one thread per process. It accepts (``TCP_NODELAY``; one connection
over ``max_connections`` gets an immediate 503), and it reads every connection without blocking
until a whole request is buffered: the head, then the body too (``Content-Length`` or chunked,
up to ``max_body`` bytes). Only then is ``handle(connection)`` called, which answers it and gives
the connection back (``resume``) or closes it: on a ``Dispatcher`` thread, or, for a request
whose head and ``Content-Length`` body (if any) are all in the buffer, on the loop's own thread
while the ``InlineLane`` allows it (the handler has been fast; a loop stuck in a slow request is
replaced by a new loop thread, which also gets the events the stuck one had taken and not yet
read; the stuck one retires once its request ends). So:

* **Threads do not grow with connections.** Idle keep-alive connections, and clients that send
  their head or body slowly (slowloris), cost a buffer, never a thread; the handler threads only
  ever see complete requests. Exceptions, read on the handler's thread: a body announced with
  ``Expect: 100-continue`` (``100 Continue`` must wait until the app wants the body), a body over
  ``max_body`` (answered 413 before reading), and a request the strict parser will refuse.
* **Timeouts.** An idle connection closes after ``keepalive_s``; a request that makes no
  progress for ``read_timeout_s`` is dropped (a stalled head) or handed over marked ``stalled``
  (a stalled body: the app answers 408).
* **Lingering close** (``linger``): after the answer, the loop reads and drops what the client
  still sends (up to a byte budget, 2 s), so the client reads the answer instead of a reset.
* **One ``epoll`` with one-shot registrations** (``servers.poller``): a connection being answered
  is not watched; ``resume`` re-arms it from the answering thread with one system call.

How long to buffer: ``trainenv.serving.servers.buffering``; which thread and which worker
process take the work: ``trainenv.serving.servers.dispatch``.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import deque

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable

    from trainenv.serving.logsink import ServingLog
    from trainenv.serving.servers.dispatch import Balance, Dispatcher

from trainenv.serving.servers.buffering import LENGTH, NO_BODY, NOW, body_framing, chunked_end, head_end
from trainenv.serving.servers.dispatch import InlineLane
from trainenv.serving.servers.http11 import MAX_HEADERS, MAX_LINE
from trainenv.serving.servers.poller import Poller

IDLE, READING, BUSY, LINGER = 0, 1, 2, 3
MAX_HEAD = (MAX_LINE + 2) * (MAX_HEADERS + 2)
_SWEEP_S = 0.25
_BUSY_BODY = b'{"error":"service_unavailable","message":"too many open connections; retry later"}'
_BUSY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class Connection:
    """One client connection: its socket, what it has sent so far, whose turn it is."""

    __slots__ = ("sock", "fd", "remote", "buf", "state", "since", "head", "need", "scan", "stalled", "answered",
                 "budget", "whole")

    def __init__(self, sock: socket.socket, remote: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.remote = remote
        self.buf = bytearray()
        self.state = IDLE
        self.since = time.monotonic()  # last progress (or the start of idling)
        self.head = -1  # end of the head in buf, once found
        self.need = 0  # a fixed body: buf length that completes it; -1 chunked
        self.scan = 0  # where the head / chunk scan resumes
        self.stalled = False  # handed over because the body stalled: reading more times out at once
        self.answered = False  # the watchdog answered 504 and closed
        self.budget = 0  # lingering: bytes still to drop
        self.whole = False  # the buffer holds the head and its whole Content-Length body (or none)

    def complete(self, max_body: int) -> bool:
        """Whether the buffer holds a request to hand over (or one the parser must see now)."""
        buf = self.buf
        if self.head < 0:
            end = head_end(buf, self.scan)
            if end < 0:
                self.scan = max(0, len(buf) - 2)
                last_line = len(buf) - buf.rfind(b"\n") - 1
                return len(buf) > MAX_HEAD or last_line > MAX_LINE + 1 or buf.count(b"\n") > MAX_HEADERS + 2
            self.head = end
            kind, length = body_framing(bytes(buf[:end]))
            if kind in (NO_BODY, NOW) or length > max_body:
                self.whole = kind == NO_BODY
                return True
            self.need = end + length if kind == LENGTH else -1
            self.scan = end
        if self.need >= 0:
            self.whole = len(buf) >= self.need
            return self.whole
        self.scan, end = chunked_end(buf, self.scan, self.head + max_body + 65536)
        return end != -1

    def reset(self) -> None:
        """A new request starts (the buffer may already hold it)."""
        self.head, self.need, self.scan, self.stalled, self.answered, self.whole = -1, 0, 0, False, False, False


class ConnectionLoop:
    """The selector thread of one process (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        handle: Callable[[Connection], None],
        dispatcher: Dispatcher,
        log: ServingLog,
        *,
        max_connections: int,
        keepalive_s: float,
        read_timeout_s: float,
        max_body: int,
        balance: Balance | None = None,
        inline_ready: Callable[[], bool] | None = None,
    ) -> None:
        self.sock = sock
        self.balance = balance
        self.handle = handle
        self.dispatcher = dispatcher
        self.log = log
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.read_timeout_s = read_timeout_s
        self.max_body = max_body
        self.lock = threading.Lock()
        self.connections: dict[int, Connection] = {}
        self.busy = 0
        self.accepting = True
        self.serving = False  # accept_forever has started
        self.draining = False
        self.closing = False
        self.stopped = threading.Event()  # accepting has stopped
        self.poller = Poller()
        self.generation = 0  # the loop thread serving this generation polls; older ones retire
        self.batch: deque[int] = deque()  # the events the loop thread has taken and not yet read
        self.sweeping = threading.Lock()
        self.lane = None if inline_ready is None else InlineLane(inline_ready, self._take_over)

    # -- the loop -------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Read connections until ``close_all()`` (the loop's own thread; a new one after ``_take_over``)."""
        poller = self.poller
        generation = self.generation
        next_sweep = time.monotonic() + _SWEEP_S
        try:
            while not self.closing:
                self.batch = batch = deque(poller.poll(_SWEEP_S))
                while batch:
                    try:
                        fd = batch.popleft()  # ``_take_over`` may take the rest from another thread
                    except IndexError:
                        break
                    if fd == poller.wake_r:
                        try:
                            os.read(poller.wake_r, 4096)
                        except OSError:
                            pass
                        continue
                    conn = self.connections.get(fd)
                    if conn is not None:
                        self._readable(conn)
                if generation != self.generation:
                    return  # a new loop thread took over while this one ran a request
                now = time.monotonic()
                if now >= next_sweep or self.draining:
                    next_sweep = now + _SWEEP_S
                    self._sweep(now)
        finally:
            if generation == self.generation:
                if self.lane is not None:
                    self.lane.stop()
                with self.lock:
                    left = list(self.connections.values())
                    self.connections.clear()
                for conn in left:
                    _close(conn.sock)
                poller.close()

    def _take_over(self) -> None:
        """The loop thread is stuck in a request (from the lane's watcher): a new one polls from now on."""
        if self.closing:
            return
        self.generation += 1
        batch = self.batch  # the events the stuck thread had taken and not read: the new thread's now
        while batch:
            try:
                fd = batch.popleft()
            except IndexError:
                break
            conn = self.connections.get(fd)
            if conn is not None:
                self._arm(conn)
        threading.Thread(target=self.serve_forever, name="trainenv-connections", daemon=True).start()

    def accept_forever(self) -> None:
        """Accept connections until ``stop_accepting()`` (a thread of its own). ``accept`` blocks: the
        kernel hands a new connection to the worker process that has waited longest, so the
        connections of a burst spread evenly over the workers sharing the socket."""
        with self.lock:
            if not self.accepting:
                self.stopped.set()
                return
            self.serving = True
        balance = self.balance
        try:
            self.sock.setblocking(True)
            while self.accepting:
                if balance is not None:
                    balance.publish(len(self.connections))
                    balance.wait_turn(len(self.connections))
                try:
                    sock, address = self.sock.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self.log.warning(f"cannot accept a connection: {exc.strerror}; pausing 0.1 s")
                        time.sleep(0.1)
                    elif exc.errno not in (errno.EINTR, errno.ECONNABORTED, errno.EPROTO):
                        return
                    continue
                if len(self.connections) >= self.max_connections:
                    _refuse(sock)
                    continue
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
                remote = str(address[0]) if isinstance(address, tuple) and address else "-"
                conn = Connection(sock, remote)
                with self.lock:
                    self.connections[conn.fd] = conn
                self.poller.add(conn.fd)
        finally:
            if balance is not None:
                balance.publish(balance.NOT_ACCEPTING)
            self.stopped.set()

    def _readable(self, conn: Connection) -> None:
        """Read what the connection has; answer a complete request (on this thread when the lane
        allows, else on a handler thread), or watch it again."""
        try:
            data = conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":  # the client closed (or the connection broke)
            self.close(conn)
            return
        if conn.state == LINGER:
            if data is not None:
                conn.budget -= len(data)
            if conn.budget <= 0:
                self.close(conn)
            else:
                self._arm(conn)
            return
        if data is not None:
            conn.buf += data
            conn.since = time.monotonic()
            conn.state = READING
        if conn.buf and conn.complete(self.max_body):
            self._dispatch(conn, inline=True)
        elif self.draining and not conn.buf:
            self.close(conn)
        else:
            self._arm(conn)

    def _arm(self, conn: Connection) -> None:
        try:
            self.poller.arm(conn.fd)
        except OSError:
            self.close(conn)

    def _dispatch(self, conn: Connection, inline: bool = False) -> None:
        with self.lock:
            conn.state = BUSY
            self.busy += 1
        lane = self.lane
        if inline and lane is not None and conn.whole:
            now = time.monotonic()
            if lane.allows(now):
                lane.run(lambda: self.handle(conn), now)
                return
        self.dispatcher.submit(lambda: self.handle(conn))

    def _sweep(self, now: float) -> None:
        """Close what timed out (and, when draining, every idle connection); hand over stalled bodies."""
        if not self.sweeping.acquire(blocking=False):
            return  # a retiring loop thread's last sweep: never two at once
        try:
            self._sweep_locked(now)
        finally:
            self.sweeping.release()

    def _sweep_locked(self, now: float) -> None:
        with self.lock:
            conns = [c for c in self.connections.values() if c.state != BUSY]
        for conn in conns:
            if conn.state == IDLE:
                if self.draining or now - conn.since >= self.keepalive_s:
                    self.close(conn)
            elif conn.state == LINGER:
                if now >= conn.since:
                    self.close(conn)
            elif now - conn.since >= self.read_timeout_s:
                if conn.head >= 0:  # the head is in: the app answers 408 for the body
                    self.poller.disarm(conn.fd)
                    conn.stalled = True
                    self._dispatch(conn)
                else:
                    self.close(conn)

    # -- from the handler threads ---------------------------------------------------------------

    def done(self) -> None:
        """The request of a connection handed out is answered (or answered by the watchdog)."""
        with self.lock:
            self.busy -= 1

    def resume(self, conn: Connection) -> bool:
        """Keep-alive, after ``done``: True when the next request is already buffered whole (the
        caller answers it now); otherwise the loop watches the connection again."""
        conn.reset()
        if self.draining or self.closing:
            self.close(conn)
            return False
        conn.since = time.monotonic()
        if conn.buf:  # pipelined
            conn.state = READING
            if conn.complete(self.max_body):
                with self.lock:
                    conn.state = BUSY
                    self.busy += 1
                return True
        else:
            conn.state = IDLE
        self._arm(conn)
        return False

    def linger(self, conn: Connection, budget: int, seconds: float) -> None:
        """Half-close, then let the loop drop up to ``budget`` more bytes for ``seconds``, then close."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        budget -= len(conn.buf)
        conn.buf.clear()
        if budget <= 0:
            self.close(conn)
            return
        conn.budget = budget
        conn.since = time.monotonic() + seconds  # the deadline
        conn.state = LINGER
        self._arm(conn)

    def close(self, conn: Connection) -> None:
        with self.lock:
            if self.connections.get(conn.fd) is conn:
                del self.connections[conn.fd]
            if self.balance is not None and self.accepting:
                self.balance.publish(len(self.connections))
        self.poller.forget(conn.fd)
        _close(conn.sock)

    # -- stopping -------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused from now on."""
        with self.lock:
            serving = self.serving
            self.accepting = False
        if serving:  # wake our blocked accept: a connection to ourselves (another worker may get one)
            address = _loopback(self.sock)
            for _ in range(100):
                if self.stopped.wait(0.02) or address is None:
                    break
                try:
                    with socket.socket(self.sock.family, socket.SOCK_STREAM) as knock:
                        knock.settimeout(0.5)
                        knock.connect(address)
                except OSError:
                    pass
            self.stopped.wait(5.0)
        self.stopped.set()
        try:
            self.sock.close()
        except OSError:
            pass

    def drain(self, deadline: float) -> int:
        """Close idle connections, wait for busy ones until ``deadline``; how many were cut."""
        self.draining = True
        self.poller.wake()
        while True:
            with self.lock:
                busy = self.busy
                lingering = sum(1 for c in self.connections.values() if c.state == LINGER)
            if (busy == 0 and lingering == 0) or time.monotonic() >= deadline:
                return busy
            time.sleep(0.02)

    def close_all(self) -> None:
        """End the loop (its thread closes what is left)."""
        self.closing = True
        self.poller.wake()


def _loopback(sock: socket.socket) -> tuple[str, int] | None:
    """Where to connect to reach ``sock`` from this machine."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return str(host), int(port)


def _refuse(sock: socket.socket) -> None:
    try:
        sock.setblocking(False)
        sock.send(_BUSY_503)
    except OSError:
        pass
    finally:
        _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
