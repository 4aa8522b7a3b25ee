"""A request buffered before a thread parses it: framing scans, the buffered input, socket I/O.

The connection loop (``trainenv.serving.servers.connections``) reads without blocking until a
whole request is in a connection's buffer. These decide how long that is:

* ``head_end`` finds the blank line that ends the head;
* ``body_framing`` says what body follows: none, ``Content-Length`` bytes, chunked, or "hand it
  over now" (``Expect: 100-continue``, or framing the strict parser will refuse anyway);
* ``chunked_end`` finds the end of a chunked body, resuming where it stopped.

They only decide how long to buffer; ``trainenv.serving.servers.http11`` still judges the request.
``BufferedInput`` reads the request being answered: the buffer, then (when ``live``) the socket
with the read timeout. ``recv_wait`` and ``send_all`` are ``recv`` and ``sendall`` for the
non-blocking sockets of the loop, with a timeout.
"""

from __future__ import annotations

import select
import socket
import sys
import time

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Protocol

    class Connection(Protocol):
        """What ``BufferedInput`` needs of a connection (``servers.connections.Connection``)."""

        sock: socket.socket
        buf: bytearray
        stalled: bool

from trainenv.serving.servers.http11 import MAX_HEADERS, MAX_LINE


NO_BODY, LENGTH, CHUNKED, NOW = 0, 1, 2, 3


def head_end(buf: bytearray, start: int = 0) -> int:
    """The index just past the blank line that ends the head in ``buf`` (searched from ``start``), or -1."""
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if lf < 0 or crlf < lf:
        return crlf + 3
    return lf + 2


def body_framing(head: bytes) -> tuple[int, int]:
    """``(kind, length)`` of the body after ``head``: ``NO_BODY``, ``LENGTH`` (``length`` bytes),
    ``CHUNKED``, or ``NOW`` (hand the request over without its body: ``Expect: 100-continue``,
    framing the parser will refuse)."""
    low = head.lower()
    if b"\nexpect:" in low:
        return NOW, 0
    chunked = b"\ntransfer-encoding:" in low
    at = low.find(b"\ncontent-length:")
    if at < 0:
        return (CHUNKED, 0) if chunked else (NO_BODY, 0)
    end = low.find(b"\n", at + 16)
    value = low[at + 16 : end].strip()
    if chunked or not value.isdigit() or len(value) > 18 or low.find(b"\ncontent-length:", at + 16) >= 0:
        return NOW, 0
    return LENGTH, int(value)


def chunked_end(buf: bytearray, pos: int, limit: int) -> tuple[int, int]:
    """Scan chunk framing in ``buf`` from ``pos`` (the start of a chunk-size line): ``(where to
    resume, end)``, ``end`` being -1 while incomplete, else the index past the body, or past the
    buffer when the framing is malformed or passes ``limit`` (the parser answers those)."""
    while True:
        newline = buf.find(b"\n", pos)
        if newline < 0:
            return pos, (len(buf) if len(buf) - pos > MAX_LINE or len(buf) > limit else -1)
        size_text = bytes(buf[pos:newline]).split(b";", 1)[0].strip()
        if not size_text or not all(c in b"0123456789abcdefABCDEF" for c in size_text) or len(size_text) > 16:
            return pos, len(buf)
        size = int(size_text, 16)
        if size == 0:
            line = newline + 1
            for _ in range(MAX_HEADERS + 1):
                newline = buf.find(b"\n", line)
                if newline < 0:
                    return pos, (len(buf) if len(buf) > limit else -1)
                if newline - line <= 1 and bytes(buf[line:newline]) in (b"", b"\r"):
                    return pos, newline + 1
                line = newline + 1
            return pos, len(buf)
        data_end = newline + 1 + size
        if data_end > limit:
            return pos, len(buf)
        if len(buf) < data_end + 2:
            if len(buf) == data_end + 1 and buf[data_end] != 10 and buf[data_end] != 13:
                return pos, len(buf)
            return pos, -1
        if buf[data_end : data_end + 2] == b"\r\n":
            pos = data_end + 2
        elif buf[data_end] == 10:
            pos = data_end + 1
        else:
            return pos, len(buf)


def _wait(sock: socket.socket, event: int, seconds: float) -> bool:
    poller = select.poll()
    poller.register(sock, event)
    return bool(poller.poll(max(0.0, seconds) * 1000.0))


def recv_wait(sock: socket.socket, size: int, timeout: float) -> bytes:
    """``recv`` on a non-blocking socket, waiting up to ``timeout`` for data (``TimeoutError``)."""
    deadline = 0.0
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            pass
        now = time.monotonic()
        if not deadline:
            deadline = now + timeout
        if now >= deadline or not _wait(sock, select.POLLIN, deadline - now):
            raise TimeoutError("timed out")


def send_all(sock: socket.socket, data: bytes, timeout: float) -> None:
    """``sendall`` on a non-blocking socket: usually one ``send``; waits up to ``timeout`` when the
    client does not read (``TimeoutError``)."""
    view = memoryview(data)
    sent = 0
    deadline = 0.0
    while sent < len(data):
        try:
            sent += sock.send(view[sent:])
            continue
        except BlockingIOError:
            pass
        now = time.monotonic()
        if not deadline:
            deadline = now + timeout
        if now >= deadline or not _wait(sock, select.POLLOUT, deadline - now):
            raise TimeoutError("timed out")


class BufferedInput:
    """Reads the request being answered: the buffer, then the socket when ``live`` (see the module docstring)."""

    __slots__ = ("conn", "timeout", "live")

    def __init__(self, conn: Connection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.live = False  # while the head is parsed, the buffer is all there is

    def _fill(self) -> bool:
        if not self.live:
            return False
        if self.conn.stalled:
            raise TimeoutError("timed out")
        data = recv_wait(self.conn.sock, 65536, self.timeout)
        self.conn.buf += data
        return bool(data)

    def read(self, size: int | None = -1) -> bytes:
        buf = self.conn.buf
        if size is None or size < 0:
            while self._fill():
                pass
            size = len(buf)
        while len(buf) < size and self._fill():
            pass
        data = bytes(buf[:size])
        del buf[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        buf = self.conn.buf
        limit = sys.maxsize if size is None or size < 0 else size
        start = 0
        while True:
            newline = buf.find(b"\n", start, limit)
            if newline >= 0:
                end = newline + 1
                break
            if len(buf) >= limit:
                end = limit
                break
            start = len(buf)
            if not self._fill():
                end = len(buf)
                break
        data = bytes(buf[:end])
        del buf[:end]
        return data
