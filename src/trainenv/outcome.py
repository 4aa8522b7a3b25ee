"""How a job ended: exit status, category, reason, and the failure file.

| how it ended                              | category        | exit status            |
|-------------------------------------------|-----------------|------------------------|
| entry point exited 0                      | (success)       | 0                      |
| entry point exited N != 0                 | ``UserError``   | N                      |
| died of signal N, cgroup ``oom_kill`` rose| ``OutOfMemory`` | 128+N                  |
| died of signal N                          | ``Signal``      | 128+N                  |
| stopped by the time limit                 | ``Timeout``     | 124                    |
| bad job config                            | ``ConfigError`` | 78                     |
| a runtime child refused the config (78)   | ``ConfigError`` | 78                     |
| requirements install failed               | ``InstallError``| 69                     |
| the code could not be fetched (source)    | ``SourceError`` | 69                     |
| a bug in trainenv                         | ``InternalError``| 70                    |

``output/failure`` starts with ``<Category>: <reason>``, then the last exception line of the
entry point's stderr, then the tail of that stderr from its last traceback; the first 1024
characters always say what went wrong, and secrets are redacted. A run starts by removing the
failure file of an earlier run; one the user's code writes during the run is kept as it is.
"""

from __future__ import annotations

import os
import re
import signal

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

from trainenv.errors import CHILD_CONFIG_ERROR, EXIT_CONFIG, EXIT_TIMEOUT
from trainenv.files import write_atomic
from trainenv.frozen import frozen
from trainenv.redact import redact_text

FAILURE_FILE_LIMIT = 8 * 1024
FIRST_PART = 1024
_EXCEPTION_LINE = r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning|Fault)\b"  # compiled on first failure (re caches it)


@frozen
class Outcome:
    exit_code: int
    category: str | None  # None on success
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


def decode_wait_status(status: int) -> tuple[int, int | None]:
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


def exception_line(stderr_tail: str) -> str | None:
    """The last line that looks like ``SomeError: message``, if any."""
    for line in reversed(stderr_tail.splitlines()):
        stripped = line.strip()
        if re.match(_EXCEPTION_LINE, stripped):
            return stripped
    return None


def child_config_error(stderr_tail: str) -> str | None:
    """The reason a runtime child gave for exiting 78 (its last stderr line), if it gave one."""
    lines = stderr_tail.rstrip("\n").rsplit("\n", 1)
    last = lines[-1]
    return last[len(CHILD_CONFIG_ERROR):] if last.startswith(CHILD_CONFIG_ERROR) else None


def classify(
    *,
    what: str,
    exit_code: int,
    signal_number: int | None,
    stderr_tail: str,
    timed_out: bool = False,
    stopped_by: int | None = None,
    oom_killed: bool = False,
    runtime: bool = False,
) -> Outcome:
    """Turn how the main process ended into an ``Outcome``.

    ``runtime``: the main process is a trainenv runtime (``trainenv.runtimes``); its exit 78
    with a last stderr line ``errors.CHILD_CONFIG_ERROR ...`` is a ``ConfigError`` with that reason.
    """
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
    refused = child_config_error(stderr_tail) if runtime and exit_code == EXIT_CONFIG else None
    if refused:
        return Outcome(EXIT_CONFIG, "ConfigError", refused)
    cause = f" after trainenv received {signal_name(stopped_by)}" if stopped_by else ""
    found = exception_line(stderr_tail)
    detail = f": {found}" if found else ""
    return Outcome(exit_code, "UserError", f"{what} exited with status {exit_code}{cause}{detail}", stderr_tail)


def failure_text(outcome: Outcome, secrets: Iterable[str] = ()) -> str:
    """The failure file's content: the first line and the traceback, redacted, then fitted.

    Redacting comes first: a secret cut in two by fitting would no longer be recognised.
    """
    first = redact_text(f"{outcome.category}: {outcome.reason}", secrets)
    if len(first) > FIRST_PART - 24:
        first = first[: FIRST_PART - 27] + "..."
    body = redact_text(last_traceback(outcome.tail), secrets).strip("\n")
    room = FAILURE_FILE_LIMIT - len(first) - 2
    if len(body) > room:
        kept = body[-(room - 4):]
        body = "...\n" + (kept.split("\n", 1)[1] if "\n" in kept else kept)  # no half line at the cut
    return first + "\n" + (body + "\n" if body else "")


def remove_failure_file(path: str) -> None:
    """Remove the failure file an earlier run left (a run starts clean); raises ``OSError``."""
    if not os.path.lexists(path):
        return  # also on a read-only volume, where unlink fails even for a missing file
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_failure_file(path: str, text: str) -> bool:
    """Write ``path`` atomically unless it exists; returns whether trainenv wrote it.

    The runner removed any earlier failure file when the run started, so one that exists now
    was written by the user's code during this run: it is the user's report and is kept.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        return False  # a dir there is no report: writing over it fails with an OSError
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, text)
    return True
