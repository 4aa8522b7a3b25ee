"""``epoll`` with one-shot registrations, for the connection loop (``servers.connections``).

A connection the loop hands out (to a handler thread, or answered on the loop's own thread) is
not watched until ``arm`` re-arms it, from whichever thread answered, with one system call; so
one event never reaches two threads. Where ``epoll`` is missing, a plain selector emulates the
one-shot registrations through a wake-up pipe. ``wake`` interrupts ``poll`` from any thread.
"""

from __future__ import annotations

import os
import select
import selectors
from collections import deque


class Poller:
    """``epoll`` with one-shot registrations, or a selector that emulates them (see the module docstring)."""

    def __init__(self) -> None:
        self.epoll = select.epoll() if hasattr(select, "epoll") else None
        self.selector: selectors.BaseSelector | None = None
        self.pending: deque[int] = deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        if self.epoll is not None:
            self.epoll.register(self.wake_r, select.EPOLLIN)
        else:
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.wake_r, selectors.EVENT_READ)

    def add(self, fd: int) -> None:
        """Watch a new connection; from any thread."""
        if self.epoll is not None:
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
        else:
            self.arm(fd)

    def arm(self, fd: int) -> None:
        """Watch a connection again after it was handed out; from any thread."""
        if self.epoll is not None:
            self.epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
        else:
            self.pending.append(fd)
            self.wake()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def disarm(self, fd: int) -> None:
        """Stop watching ``fd`` until ``arm`` (in the loop's thread)."""
        if self.epoll is not None:
            self.epoll.modify(fd, select.EPOLLONESHOT)
        else:
            self.forget(fd)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` for good (before it is closed)."""
        try:
            if self.epoll is not None:
                self.epoll.unregister(fd)
            elif self.selector is not None:
                self.selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def poll(self, timeout: float) -> list[int]:
        if self.epoll is not None:
            return [fd for fd, _ in self.epoll.poll(timeout)]
        assert self.selector is not None
        while self.pending:
            try:
                self.selector.register(self.pending.popleft(), selectors.EVENT_READ)
            except (KeyError, ValueError, OSError):
                pass
        ready = [key.fd for key, _ in self.selector.select(timeout)]
        for fd in ready:
            if fd != self.wake_r:
                self.forget(fd)  # one-shot
        return ready

    def close(self) -> None:
        for closable in (self.epoll, self.selector):
            if closable is not None:
                closable.close()
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
