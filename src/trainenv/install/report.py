"""Reading the installer's output: what to log, what went wrong, and the failure message.

**Progress.** The installer's stdout and stderr are read as one stream, line by line as they
come. Logged (prefixed ``uv:``/``pip:``): "Looking in indexes", "Collecting", "Processing",
"Downloading", "Building wheel", ``Successfully installed``/``+ pkg==ver``, warnings, errors and
anything unrecognised; dropped: "Requirement already satisfied", cache, metadata and uninstall
chatter, and uv's count lines. The caller then logs one summary line:
``requirements installed with uv in 1.3 s (2 new: a, b)``.

**Secrets.** Every logged line, the error message and the tail go through ``redact_text`` with
the values of secret-looking variables in the environment and every ``user:password@`` found
in it, in the requirements file or in the extras (``credentials_in``).

**What went wrong.** Each line is also checked for signs of a network error (connection
refused/reset/aborted, timed out, temporary failure in name resolution, network unreachable,
HTTP 5xx, ``ProtocolError``, ``IncompleteRead``, "Connection broken", ...), of a local error (a
missing file, an invalid requirement) and of a uv-specific refusal (a requirements line it
cannot parse, an ``EXTERNALLY-MANAGED`` interpreter, an interpreter it cannot query, an unknown
argument); the caller decides on a retry or a fallback to pip from these.

**Failure.** ``InstallError`` (category ``InstallError``, exit 69), one line:
``requirements install failed (pip exit 1): ERROR: Invalid requirement: ... ; <the fix>; see the
log above``; a uv failure also says how to switch to pip (``TRAINENV_INSTALLER=pip``). Its
``tail`` attribute holds the last 40 output lines (each cut to 400 characters), redacted, for
the failure file.
"""

from __future__ import annotations

import re
from collections import deque

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

from trainenv.errors import InstallError
from trainenv.install.installers import INSTALLER_VARIABLE
from trainenv.redact import redact_text

TAIL_LINES = 40
_TAIL_LINE_CHARS = 400
_LOG_LINE_CHARS = 1000
_SUMMARY_CHARS = 300

_QUIET = re.compile(
    r"^\s*(?:Requirement already satisfied|Using cached|Obtaining dependency information"
    r"|Preparing metadata|Getting requirements to build|Installing build dependencies"
    r"|Installing backend dependencies|Created wheel for|Stored in directory"
    r"|Installing collected packages|Attempting uninstall|Found existing installation"
    r"|Uninstalling |Successfully uninstalled|Using Python \S+ environment at"
    r"|(?:Resolved|Prepared|Installed|Uninstalled|Audited|Checked) \d+ packages? in"
    r"|- \S+==|[━╸╺]|$)"
)
# What the network error was (preferred in messages) and signs that there was one.
_NETWORK_CAUSE = re.compile(
    r"connection (?:reset|refused|aborted)|timed out|temporary failure in name resolution"
    r"|network is unreachable|HTTP error 5\d\d|server error \(5\d\d"
    r"|\b5\d\d (?:Internal Server Error|Server Error|Service Unavailable|Bad Gateway|Gateway Time-?out)"
    r"|IncompleteRead|RemoteDisconnected|connection closed before message completed",
    re.IGNORECASE,
)
_NETWORK_SIGN = re.compile(
    r"ConnectionResetError|ConnectionRefusedError|ConnectTimeout|ReadTimeout|ProtocolError"
    r"|Connection broken|NewConnectionError|Max retries exceeded|error sending request|tcp connect error",
    re.IGNORECASE,
)
_LOCAL = re.compile(
    r"No such file or directory|does not exist|Invalid requirement|is not a valid wheel filename"
    r"|Couldn't parse requirement|Could not open requirements file|Distribution not found at",
    re.IGNORECASE,
)
_UV_SPECIFIC = re.compile(
    r"externally.managed|Failed to (?:inspect|query) Python interpreter|No interpreter found"
    r"|Querying Python at|unsupported option|Couldn't parse requirement|Unexpected '-', expected"
    r"|unexpected argument",
    re.IGNORECASE,
)
_ERROR_LINE = re.compile(r"^(?:ERROR|error):")
_DETAIL_LINE = re.compile(r"^\s*(?:cause:|Caused by:|Hint:|hint:)")
_PIP_INSTALLED = re.compile(r"^Successfully installed (.+)$")
_UV_INSTALLED = re.compile(r"^\s*\+ ([A-Za-z0-9][A-Za-z0-9._-]*)")
_URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/\s@:]+)(?::([^/\s@]+))?@")


class Attempt:
    """What one run of the installer showed, filled in line by line while its output streams."""

    def __init__(self, installer: str, secrets: list[str]) -> None:
        self.installer = installer
        self.secrets = secrets
        self.returncode: int | None = None  # None: it did not start
        self.start_error = ""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.packages: list[str] = []
        self.network_cause = ""  # e.g. "Connection refused"
        self.network_sign = ""  # e.g. "NewConnectionError"
        self.local = False
        self.uv_specific = False

    def read(self, line: str) -> str | None:
        """Take one output line; return it redacted and prefixed for the log, or None (chatter)."""
        clean = redact_text(line, self.secrets)
        self.tail.append(clean[:_TAIL_LINE_CHARS])
        cause = _NETWORK_CAUSE.search(line)
        if cause and not self.network_cause:
            self.network_cause = cause.group(0)
        sign = _NETWORK_SIGN.search(line)
        if sign and not self.network_sign:
            self.network_sign = sign.group(0)
        self.local = self.local or bool(_LOCAL.search(line))
        self.uv_specific = self.uv_specific or bool(_UV_SPECIFIC.search(line))
        self.packages.extend(_installed_names(line))
        if _QUIET.match(line):
            return None
        return f"{self.installer}: {clean.strip()[:_LOG_LINE_CHARS]}"

    @property
    def network(self) -> str:
        """What the network error was, or "" when the output shows none."""
        return self.network_cause or self.network_sign

    @property
    def crashed(self) -> bool:
        """It did not start or died of a signal."""
        return self.returncode is None or self.returncode < 0

    def tail_text(self) -> str:
        return "\n".join(self.tail)


def _installed_names(line: str) -> list[str]:
    """Names in pip's ``Successfully installed a-1.0 b-2.0`` or uv's `` + a==1.0``, normalized
    as PEP 503 does (``Tiny_Pkg`` -> ``tiny-pkg``) so both installers report the same names."""
    match = _PIP_INSTALLED.match(line)
    if match:
        names = [item.rsplit("-", 1)[0] for item in match.group(1).split()]
    else:
        match = _UV_INSTALLED.match(line)
        names = [match.group(1).split("==")[0]] if match else []
    return [re.sub(r"[-_.]+", "-", name).lower() for name in names]


def credentials_in(texts: Iterable[str]) -> list[str]:
    """Passwords (and token-style user names) of ``scheme://user:password@`` in ``texts``."""
    found = set()
    for text in texts:
        for match in _URL_CREDENTIALS.finditer(text):
            user, password = match.group(1), match.group(2)
            if password and len(password) >= 4:
                found.add(password)
            elif not password and len(user) >= 8:
                found.add(user)
    return sorted(found, key=len, reverse=True)


def summary(attempt: Attempt) -> str:
    """The installer's own error line, with its most specific cause or hint."""
    if attempt.start_error:
        return attempt.start_error
    lines = list(attempt.tail)
    index = max((i for i, line in enumerate(lines) if _ERROR_LINE.match(line)), default=None)
    if index is None:
        text = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    else:
        text = lines[index].strip()
        details = [line.strip() for line in lines[index + 1:] if _DETAIL_LINE.match(line)]
        if details:
            text += f" ({details[-1]})"
    if len(text) > _SUMMARY_CHARS:
        text = text[: _SUMMARY_CHARS - 3] + "..."
    return text


def failure(attempt: Attempt, retried: bool) -> InstallError:
    """The ``InstallError`` for a failed attempt: what failed, why, and the fix."""
    status = "did not start" if attempt.returncode is None else f"exit {attempt.returncode}"
    after = ", after a retry" if retried else ""
    if attempt.network and not attempt.local:
        fix = (
            f"network error ({attempt.network}): check the index URL, proxy and network "
            "(PIP_INDEX_URL, UV_INDEX_URL, HTTPS_PROXY)"
        )
    elif attempt.returncode is None:
        fix = "check that the installer is installed in the image"
    elif attempt.installer == "uv" and attempt.uv_specific:
        fix = f"uv cannot do this install: set {INSTALLER_VARIABLE}=pip (or auto) to use pip"
    else:
        fix = "fix requirements.txt or the extra requirements"
    if attempt.installer == "uv" and not attempt.uv_specific:
        fix += f" (to install with pip instead, set {INSTALLER_VARIABLE}=pip)"
    return InstallError(
        f"requirements install failed ({attempt.installer} {status}{after}): {summary(attempt)}; "
        f"{fix}; see the log above",
        tail=attempt.tail_text(),
    )
