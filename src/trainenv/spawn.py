"""Starting the job's process with ``os.posix_spawn``, without importing ``subprocess``; reaping.

The C library's ``posix_spawn`` (a vfork and exec) gives the child what
``subprocess.Popen(argv, env=env, cwd=cwd, process_group=0)`` would, at a fraction of the
import cost on the launch path:

- its own process group (so signals reach all of the job);
- ``SIGPIPE`` and ``SIGXFSZ``, which Python ignores, back to their defaults; handlers the
  supervisor installed are reset by the exec itself; the signal mask is left as it is;
- exactly ``env``, looked up on the ``PATH`` of ``env`` when ``argv[0]`` has no ``/``;
- stdout and stderr on the given pipe ends, or ours;
- no file descriptor of ours but 0-2 (Python's own are close-on-exec; inheritable ones this
  process was given are closed in the child, as ``close_fds`` does);
- a program that cannot be executed raises ``OSError`` with its errno (the first error that is
  not "not found" when several ``PATH`` entries were tried); the supervisor turns it into 127/126.

``posix_spawn`` has no working-directory attribute: ``spawn`` changes into ``cwd`` for the
call and back (through a descriptor of the old one, which need not have a name), so a
relative ``argv[0]`` resolves as it would in the child.

``reaped()`` collects every child that has exited, for the supervisors (the job's and the
serving workers'): ``waitpid(-1, WNOHANG)`` until nothing is left, never blocking.
"""

from __future__ import annotations

import errno
import os
import signal

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Iterator, Mapping, Sequence

RESET_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str, stdout: int | None, stderr: int | None) -> int:
    """Start ``argv`` as described in the module docstring; returns its pid."""
    actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in ((stdout, 1), (stderr, 2)) if fd is not None]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_fds()]
    here = os.open(".", getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY)
    try:
        os.chdir(cwd)
        try:
            return _spawn_first(argv, env, actions)
        finally:
            os.fchdir(here)
    finally:
        os.close(here)


def _spawn_first(argv: Sequence[str], env: Mapping[str, str], actions: list[tuple[Any, ...]]) -> int:
    """Try each candidate program in turn, as ``execvpe`` does; raise the most telling error."""
    program = argv[0]
    candidates = [program] if os.sep in program else [os.path.join(d, program) for d in os.get_exec_path(dict(env))]
    first_error: OSError | None = None
    last_error: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    for candidate in candidates:
        try:
            return os.posix_spawn(candidate, list(argv), env, file_actions=actions, setpgroup=0, setsigdef=RESET_SIGNALS)
        except OSError as exc:
            last_error = exc
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and first_error is None:
                first_error = exc
    raise first_error or last_error


def _inherited_fds() -> list[int]:
    """Inheritable descriptors above 2 (given to us by our parent): closed in the child."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            continue  # the descriptor listdir itself used, closed by now
    return found


def reaped() -> Iterator[tuple[int, int]]:
    """``(pid, wait status)`` of each child that has exited, until none is left; never blocks."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        yield pid, status
