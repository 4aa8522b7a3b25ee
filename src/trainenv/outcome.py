"""How a job ended: exit status, category, reason, and the failure file (CONTRACT §5).

| how it ended                              | category        | exit status            |
|-------------------------------------------|-----------------|------------------------|
| entry point exited 0                      | (success)       | 0                      |
| entry point exited N != 0                 | ``UserError``   | N                      |
| died of signal N, cgroup ``oom_kill`` rose| ``OutOfMemory`` | 128+N                  |
| died of signal N                          | ``Signal``      | 128+N                  |
| stopped by the time limit                 | ``Timeout``     | 124                    |
| bad job config                            | ``ConfigError`` | 78                     |
| requirements install failed               | ``InstallError``| 69                     |
| a bug in trainenv                         | ``InternalError``| 70                    |

``output/failure`` starts with ``<Category>: <reason>``, then the last exception line of the
entry point's stderr, then the tail of that stderr from its last traceback; the first 1024
characters always say what went wrong, and secrets are redacted. A failure file written by
the user's code during the run is kept as it is.
"""

from __future__ import annotations

import os
import re
import signal

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable, Optional, Tuple

from trainenv.errors import EXIT_TIMEOUT
from trainenv.frozen import frozen
from trainenv.redact import redact_text

FAILURE_FILE_LIMIT = 8 * 1024
FIRST_PART = 1024
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning|Fault)\b.*")


@frozen
class Outcome:
    exit_code: int
    category: Optional[str]  # None on success
    reason: str
    tail: str = ""

    @property
    def failed(self) -> bool:
        return self.category is not None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def decode_wait_status(status: int) -> Tuple[int, Optional[int]]:
    """``(exit status as a shell reports it, signal number or None)`` from a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return 128 + number, number
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return 128 + 127, None


def last_traceback(stderr_tail: str) -> str:
    """The tail of stderr from its last ``Traceback`` (or the whole tail when there is none)."""
    marker = stderr_tail.rfind("Traceback (most recent call last):")
    return stderr_tail[marker:] if marker >= 0 else stderr_tail


def exception_line(stderr_tail: str) -> Optional[str]:
    """The last line that looks like ``SomeError: message``, if any."""
    for line in reversed(stderr_tail.splitlines()):
        stripped = line.strip()
        if _EXCEPTION_LINE.match(stripped):
            return stripped
    return None


def classify(
    *,
    what: str,
    exit_code: int,
    signal_number: Optional[int],
    stderr_tail: str,
    timed_out: bool = False,
    stopped_by: Optional[int] = None,
    oom_killed: bool = False,
) -> Outcome:
    """Turn how the main process ended into an ``Outcome``."""
    if timed_out:
        return Outcome(EXIT_TIMEOUT, "Timeout", f"{what} stopped: the time limit (max_run_seconds) was reached", stderr_tail)
    if signal_number is not None:
        name = signal_name(signal_number)
        if oom_killed:
            return Outcome(exit_code, "OutOfMemory", f"{what} was killed by {name}: the cgroup's oom_kill count rose (out of memory)", stderr_tail)
        cause = f" after trainenv received {signal_name(stopped_by)}" if stopped_by else ""
        return Outcome(exit_code, "Signal", f"{what} was killed by {name}{cause}", stderr_tail)
    if exit_code == 0:
        return Outcome(0, None, f"{what} succeeded")
    cause = f" after trainenv received {signal_name(stopped_by)}" if stopped_by else ""
    found = exception_line(stderr_tail)
    detail = f": {found}" if found else ""
    return Outcome(exit_code, "UserError", f"{what} exited with status {exit_code}{cause}{detail}", stderr_tail)


def failure_text(outcome: Outcome, secrets: Iterable[str] = ()) -> str:
    """The failure file's content: the first line and the traceback, fitted and redacted."""
    first = f"{outcome.category}: {outcome.reason}"
    if len(first) > FIRST_PART - 24:
        first = first[: FIRST_PART - 27] + "..."
    body = last_traceback(outcome.tail).strip("\n")
    room = FAILURE_FILE_LIMIT - len(first) - 2
    if len(body) > room:
        body = "...\n" + body[-(room - 4):]
    text = first + "\n" + (body + "\n" if body else "")
    return redact_text(text, secrets)


@frozen
class FileState:
    """Identity of a file at a moment, to tell a file written during the run from an old one."""

    exists: bool
    inode: int = 0
    mtime_ns: int = 0
    size: int = 0


def file_state(path: str) -> FileState:
    try:
        st = os.stat(path)
    except OSError:
        return FileState(False)
    return FileState(True, st.st_ino, st.st_mtime_ns, st.st_size)


def write_failure_file(path: str, text: str, before: Optional[FileState] = None) -> bool:
    """Write ``path`` atomically unless the user's code wrote it during this run.

    ``before`` is the file's state when the launch started: a file that is unchanged since
    then is a stale report of an earlier attempt and is replaced; a new or changed one is the
    user's and is kept. Returns whether trainenv wrote the file.
    """
    now = file_state(path)
    if now.exists and (before is None or now != before):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)
    return True
