"""The serving log: levels, redaction and one sink for every line the server writes.

``ServingLog(sink, level, secrets)`` formats ``"<LEVEL> <message>"`` and hands each line to
``sink`` (``run_server``'s ``log`` argument; by default stderr with a ``trainenv-serve[pid]``
prefix). Lines below ``level`` are dropped before they are formatted. Every line goes through
``trainenv.redact.redact_text`` with the secret values of the environment, so a secret that
ends up in an exception message or a traceback is shown as ``***``. Access lines for health
checks (``/ping`` and the readiness routes) answered 2xx or 503 are DEBUG, other requests
INFO (SageMaker's 5-second ``/ping`` would otherwise flood the log; a health route answered
405 or 500 is worth seeing).
"""

from __future__ import annotations

import os
import sys
import threading

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Sequence

from trainenv.redact import redact_text

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


def stderr_sink(line: str) -> None:
    """The default sink: one write per line to stderr, tagged with the process id."""
    try:
        sys.stderr.write(f"trainenv-serve[{os.getpid()}] {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class ServingLog:
    """Levelled, redacted lines to one sink; safe to call from any thread."""

    def __init__(
        self, sink: Callable[[str], None] | None, level: str = "INFO", secrets: Sequence[str] = ()
    ) -> None:
        self.sink = sink or stderr_sink
        self.threshold = LEVELS.get(level, 20)
        self.secrets = tuple(secrets)
        self._lock = threading.Lock()

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def _emit(self, level: str, message: str, detail: str = "") -> None:
        if LEVELS[level] < self.threshold:
            return
        text = f"{level} {message}"
        if detail:
            text = f"{text}\n{detail.rstrip()}"
        text = redact_text(text, self.secrets)
        with self._lock:
            for line in text.split("\n"):
                self.sink(line)

    def debug(self, message: str) -> None:
        self._emit("DEBUG", message)

    def info(self, message: str) -> None:
        self._emit("INFO", message)

    def warning(self, message: str, detail: str = "") -> None:
        self._emit("WARNING", message, detail)

    def error(self, message: str, detail: str = "") -> None:
        self._emit("ERROR", message, detail)
