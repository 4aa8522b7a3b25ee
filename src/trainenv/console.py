"""trainenv's own log lines: ``trainenv: <message>`` on stderr, redacted, one write each.

``TRAINENV_LOG_LEVEL`` = ``quiet`` (errors only), ``info`` (default) or ``debug``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Iterable, Mapping, TextIO

from trainenv.redact import redact_text

_LEVELS = {"quiet": 0, "info": 1, "debug": 2}


class Console:
    """Writes trainenv's messages; every line goes through ``redact_text``."""

    def __init__(self, level: str = "info", secrets: Iterable[str] = (), stream: TextIO | None = None) -> None:
        self.level = _LEVELS.get(level.lower(), 1)
        self.secrets = tuple(secrets)
        self.stream = stream if stream is not None else sys.stderr
        self.diverted: Callable[[bytes], None] | None = None

    def divert(self, write: Callable[[bytes], None] | None) -> None:
        """Hand the encoded lines to ``write`` instead of writing them (``None``: write again).
        While a job runs, its supervisor writes our lines in order with the job's, on a thread of
        its own, so a stalled reader of stderr never blocks us."""
        self.diverted = write

    def set_level(self, level: str) -> None:
        """``quiet``, ``info`` or ``debug`` (the ``log_level`` setting, validated there)."""
        self.level = _LEVELS.get(level.lower(), 1)

    def _write(self, text: str) -> None:
        lines = redact_text(text, self.secrets).splitlines() or [""]
        if self.diverted is not None:
            self.diverted("".join(f"trainenv: {line}\n" for line in lines).encode("utf-8", "replace"))
            return
        try:
            self.stream.write("".join(f"trainenv: {line}\n" for line in lines))
            self.stream.flush()
        except (OSError, ValueError):  # the reader went away (`| head`): the job's outcome still counts
            pass

    def info(self, text: str) -> None:
        if self.level >= 1:
            self._write(text)

    def debug(self, text: str) -> None:
        if self.level >= 2:
            self._write(text)

    def error(self, text: str) -> None:
        self._write(text)


def console_for(environ: Mapping[str, str] = os.environ, secrets: Iterable[str] = ()) -> Console:
    return Console(environ.get("TRAINENV_LOG_LEVEL", "info"), secrets)
