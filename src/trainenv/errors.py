"""trainenv's own failures, each with its category and exit code.

| exception       | category        | exit |
|-----------------|-----------------|------|
| ``ConfigError`` | ``ConfigError`` | 78   |
| ``InstallError``| ``InstallError``| 69   |
| ``SourceError`` | ``SourceError`` | 69   |
| ``InternalError``| ``InternalError``| 70  |
| ``SignalError`` | ``Signal``      | 128+N (SIGTERM/SIGINT before the job started) |

Messages are one line and name the source (file or variable), the key and the value, so the
first line of ``output/failure`` says what to fix.
"""

from __future__ import annotations

EXIT_CONFIG = 78
EXIT_INSTALL = 69
EXIT_INTERNAL = 70
EXIT_TIMEOUT = 124

_MAX_SHOWN_VALUE = 80
# The last stderr line of a runtime child (``trainenv.runtimes``) that exits 78 because the job's
# config does not fit it: the runner reports it as trainenv's ConfigError, not as the job's status.
CHILD_CONFIG_ERROR = "trainenv: ConfigError: "


def shown(value: object) -> str:
    """``repr`` of a value, cut to a readable length, for one-line error messages.

    URL credentials are hidden before the cut, so no part of them survives it.
    """
    from trainenv.redact import redact_urls

    text = redact_urls(repr(value))
    if len(text) > _MAX_SHOWN_VALUE:
        text = text[: _MAX_SHOWN_VALUE - 3] + "..."
    return text


class TrainenvError(Exception):
    """Base class: a failure of trainenv itself, not of the user's code."""

    category = "InternalError"
    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


class ConfigError(TrainenvError, ValueError):
    """The job's configuration (a file, a variable or a flag) is invalid."""

    category = "ConfigError"
    exit_code = EXIT_CONFIG

    @classmethod
    def at(cls, source: object, key: str | None, problem: str) -> ConfigError:
        """``<source>: <key>: <problem>``, e.g. ``/ml/input/config/hyperparameters.json: lr: ...``."""
        where = f"{source}: {key}" if key else f"{source}"
        return cls(f"{where}: {problem}")


class InstallError(TrainenvError):
    """Installing the job's requirements failed; ``tail`` is the installer's redacted output tail."""

    category = "InstallError"
    exit_code = EXIT_INSTALL

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.tail = tail


class SourceError(TrainenvError):
    """The job's code could not be fetched (``TRAINENV_SOURCE``): a bad archive, a failed clone."""

    category = "SourceError"
    exit_code = EXIT_INSTALL


class SignalError(TrainenvError):
    """trainenv received SIGTERM/SIGINT (signal N) before the job started; exit 128+N."""

    category = "Signal"

    def __init__(self, message: str, signal_number: int, tail: str = "") -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
        self.tail = tail


class InternalError(TrainenvError):
    """A bug or an unexpected condition inside trainenv."""
