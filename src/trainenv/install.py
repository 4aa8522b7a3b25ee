"""Install the job's requirements into the entry point's interpreter (CONTRACT §1, exit 69).

Usage (the launcher, once per node, before it starts the entry point)::

    result = install_requirements(
        InstallRequest(python="/opt/venv/bin/python", requirements_file=code_dir / "requirements.txt",
                       extra_requirements=("einops==0.8.0",), cwd=code_dir, env=child_env),
        log=logger.info,
    )
    # result.installer in {"uv", "pip", "skipped", "none"}; InstallError on failure (exit 69)

**What runs.** Nothing at all when there is no requirements file, the file holds only comments
and options (``--index-url ...`` but no requirement, ``-r`` or ``-e`` line) and there are no
extra requirements: the result is ``"none"``. Otherwise one command, an argv list (never a
shell string), run in ``cwd`` with ``env``, stdin closed:

* ``uv pip install --python <python> -r <file> <extras...>`` when uv is found: ``uv`` on the
  ``PATH`` of ``env``, else the ``uv`` Python package importable by the launcher
  (``uv.find_uv_bin()``). ``--python`` names the target explicitly, so uv installs into it
  whether or not it is a venv; no ``--system`` is needed (checked with uv 0.13.9).
* ``<python> -m pip install --disable-pip-version-check --no-input --progress-bar off -r <file>
  <extras...>`` otherwise, with ``PYTHONUNBUFFERED=1`` so its lines arrive as they are printed.

``TRAINENV_INSTALLER`` (read from ``env``) chooses: ``auto`` (default: uv if found, else pip),
``uv`` (uv or an ``InstallError``; never falls back) or ``pip`` (never uv). Any other value is
a ``ConfigError``. Extra requirements are requirement specifiers; one that starts with ``-``
is a ``ConfigError`` (options belong in requirements.txt, where both installers parse them).

**pip's settings reach uv.** uv reads neither ``PIP_*`` variables nor ``pip.conf``. So that an
image or platform configured for pip (a private index, a mirror, a CA bundle) behaves the same
under uv, the installer's environment gets, for each pip setting below that is set and whose
uv counterpart is not set in ``env``:

| pip setting (``PIP_*`` variable or ``pip.conf``) | uv gets |
|---|---|
| ``index-url`` | ``UV_INDEX_URL`` (unless ``UV_INDEX_URL``/``UV_DEFAULT_INDEX`` is set) |
| ``extra-index-url`` | ``UV_EXTRA_INDEX_URL``, space-separated (unless it or ``UV_INDEX`` is set) |
| ``find-links`` | ``UV_FIND_LINKS``, comma-separated |
| ``trusted-host`` | ``UV_INSECURE_HOST`` |
| ``constraint`` | ``UV_CONSTRAINT`` |
| ``timeout`` / ``default-timeout``, ``retries`` | ``UV_HTTP_TIMEOUT``, ``UV_HTTP_RETRIES`` |
| ``cert``, ``client-cert`` | ``SSL_CERT_FILE``, ``SSL_CLIENT_CERT`` |
| ``proxy`` | ``HTTPS_PROXY`` and ``HTTP_PROXY`` (unless any proxy variable is set) |
| ``pre``, ``break-system-packages`` (true) | ``UV_PRERELEASE=allow``, ``UV_BREAK_SYSTEM_PACKAGES=1`` |
| ``no-index`` (true) | the ``--no-index`` flag |

pip's own precedence is kept: ``[install]`` over ``[global]``, ``PIP_*`` over the files, the
files in pip's order (``$XDG_CONFIG_DIRS/pip/pip.conf``, ``/etc/pip.conf``, ``~/.pip/pip.conf``,
``~/.config/pip/pip.conf``, ``<prefix>/pip.conf``, ``$PIP_CONFIG_FILE``; ``PIP_CONFIG_FILE=/dev/null``
means no files). When a uv config exists (``UV_CONFIG_FILE``, ``~/.config/uv/uv.toml``,
``/etc/uv/uv.toml``, ``$XDG_CONFIG_DIRS/uv/uv.toml``) only the ``PIP_*`` variables are carried
over, not ``pip.conf``. Differences that remain: with several indexes uv takes a package from
the first index that has it, trying extra indexes before the main one, where pip takes the best
version from any (``UV_INDEX_STRATEGY=unsafe-best-match`` restores pip's way); pip's
``--only-binary``/``--no-binary`` are not carried over; a project ``uv.toml`` above ``cwd`` is
uv's business.

**Falling back from uv to pip** (``auto`` only, and only if the target has pip), with one log
line, when uv could not start or died of a signal, or its output shows a uv-specific refusal: a
requirements line it cannot parse (pip's dialect is larger: ``--global-option``, ...), an option
it ignored, an ``EXTERNALLY-MANAGED`` interpreter (pip may be configured to override that), an
interpreter it cannot query, an unknown argument. pip's verdict is then the final one.

**Retry.** A failed install whose output shows a network error (connection
refused/reset/aborted, timed out, temporary failure in name resolution, network unreachable,
HTTP 5xx, ``ProtocolError``, ``IncompleteRead``, "Connection broken", ...) and no local error
(a missing file, an invalid requirement) is run once more, and the retry is logged. pip reports
an unreachable index as "No matching distribution", so the network signs decide, not that line.
A requirement that simply does not exist is not retried. Both installers retry requests
themselves first (pip ``--retries``, default 5; uv ``UV_HTTP_RETRIES``, default 3).

**Skipping a repeat.** After a successful install a marker file is written (atomically: a
temporary file, then ``os.replace``) under ``marker_dir``, default
``<tempfile.gettempdir()>/trainenv-<euid>/installed/``, named by the sha256 of: the
requirements file's bytes and those of the local files it includes with ``-r``/``-c``
(recursively), the extra requirements, the interpreter path as given (a venv's ``bin/python``
is a symlink to the base interpreter, so the realpath alone would confuse venvs), its realpath
and that file's size and mtime (which change when the interpreter is replaced, without
spawning it), and the venv's ``pyvenv.cfg`` version. The marker lists every ``*.dist-info``
that was in the target's site-packages right after the install. The next call with the same
key is ``"skipped"`` only if all of those are still there (under 1 ms: a hash, a few ``stat``
calls, one ``listdir``). A changed file reinstalls; a container restarted from its image, whose
site-packages was reset while ``/tmp`` survived (a Kubernetes ``emptyDir``), reinstalls too.

The marker is container-local on purpose: ``/ml`` may be a volume shared by every node of the
job (NFS, EFS, a PVC) and outlives the container, while each node installs into its own
container filesystem; a marker there would make node 1 skip because node 0 installed. The
marker directory is created with mode 0700 and ignored (install runs, no marker written) when
it is a symlink, owned by another user or group/world-writable, so nobody else can plant
markers. Concurrent launchers in one container serialize on a lock file next to the marker.
Not fingerprinted: the contents of local directories or wheels named in requirements.txt, and
newer versions appearing on an index for unpinned requirements. Delete the marker directory to
force a reinstall.

**Progress and secrets.** The installer's stdout and stderr are read as one stream, line by
line as they come. Logged (prefixed ``uv:``/``pip:``): "Looking in indexes", "Collecting",
"Processing", "Downloading", "Building wheel", ``Successfully installed``/``+ pkg==ver``,
warnings, errors and anything unrecognised; dropped: "Requirement already satisfied", cache,
metadata and uninstall chatter, and uv's count lines. Then one summary line:
``requirements installed with uv in 1.3 s (2 new: a, b)``. Every logged line, the error
message and the tail go through ``redact_text`` with the values of secret-looking variables in
``env`` and every ``user:password@`` found in ``env``, the requirements file or the extras.

**Failure.** ``InstallError`` (category ``InstallError``, exit 69), one line:
``requirements install failed (pip exit 1): ERROR: Invalid requirement: ... ; see the log
above``; its ``tail`` attribute holds the last 40 output lines (each cut to 400 characters),
redacted, for ``output/failure``. A target interpreter that does not exist or cannot run, and
one without pip when uv is unavailable, are ``InstallError`` too, with ``tail`` empty or the
interpreter's stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Mapping, Optional, Tuple

from trainenv.errors import ConfigError, InstallError, shown
from trainenv.frozen import frozen
from trainenv.redact import redact_text, secret_values

__all__ = [
    "INSTALLER_VARIABLE",
    "InstallRequest",
    "InstallResult",
    "install_requirements",
    "default_marker_dir",
    "find_uv",
    "pip_settings",
    "uv_environment",
]

INSTALLER_VARIABLE = "TRAINENV_INSTALLER"
INSTALLER_CHOICES = ("auto", "uv", "pip")
TAIL_LINES = 40
_TAIL_LINE_CHARS = 400
_LOG_LINE_CHARS = 1000
_SUMMARY_CHARS = 300
_PROBE_TIMEOUT = 60.0
_MAX_INCLUDE_DEPTH = 10


@frozen
class InstallRequest:
    """What to install, into which interpreter, from where and with which environment."""

    python: str
    requirements_file: Optional[Path]
    extra_requirements: Tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    marker_dir: Optional[Path] = None


@frozen
class InstallResult:
    """``installer``: ``"uv"``, ``"pip"``, ``"skipped"`` or ``"none"``; ``packages``: new names."""

    installer: str
    seconds: float
    packages: Tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Reading requirements files (pure)

_COMMENT = re.compile(r"(^|\s+)#.*$")
_REQUIREMENT_OPTIONS = ("-r", "--requirement", "-e", "--editable")
_INCLUDE_OPTIONS = ("-r", "--requirement", "-c", "--constraint")


def _logical_lines(text: str) -> List[str]:
    """Lines as pip reads them: ``\\`` continuations joined, comments and blanks dropped."""
    lines: List[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        line = _COMMENT.sub("", pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    tail = _COMMENT.sub("", pending).strip()
    if tail:
        lines.append(tail)
    return lines


def _option_value(line: str, names: Iterable[str]) -> Optional[str]:
    """The value of ``-r x``, ``-rx``, ``--requirement x`` or ``--requirement=x``; else None."""
    for name in names:
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if name.startswith("--"):
            if rest[:1] in ("=", " ", "\t"):
                return rest[1:].strip() or None
        elif rest:
            return rest.lstrip(" \t=") or None
    return None


def _has_requirements(lines: Iterable[str]) -> bool:
    """True if a line is a requirement, or an option that brings requirements (-r, -e)."""
    for line in lines:
        if not line.startswith("-"):
            return True
        if _option_value(line, _REQUIREMENT_OPTIONS) is not None:
            return True
    return False


def _included_files(text: str, base: Path) -> List[Path]:
    """Local files named by ``-r``/``-c`` lines, relative to the including file's directory."""
    found = []
    for line in _logical_lines(text):
        value = _option_value(line, _INCLUDE_OPTIONS)
        if value is None or "://" in value:
            continue
        path = Path(value).expanduser()
        found.append(path if path.is_absolute() else base / path)
    return found


# ---------------------------------------------------------------------------------------------
# pip's configuration, carried over to uv (reads config files; no subprocess)

_TRUE = ("1", "true", "yes", "on", "y", "t")
_PIP_ALIASES = {"default-timeout": "timeout"}
# pip option, uv-side variables it fills, variables whose presence means "already set for uv",
# kind: "one" (single value), a separator for lists, or "flag" (true/false)
_PIP_TO_UV: Tuple[Tuple[str, Tuple[str, ...], Tuple[str, ...], str], ...] = (
    ("index-url", ("UV_INDEX_URL",), ("UV_INDEX_URL", "UV_DEFAULT_INDEX"), "one"),
    ("extra-index-url", ("UV_EXTRA_INDEX_URL",), ("UV_EXTRA_INDEX_URL", "UV_INDEX"), " "),
    ("find-links", ("UV_FIND_LINKS",), ("UV_FIND_LINKS",), ","),
    ("trusted-host", ("UV_INSECURE_HOST",), ("UV_INSECURE_HOST",), " "),
    ("constraint", ("UV_CONSTRAINT",), ("UV_CONSTRAINT",), " "),
    ("timeout", ("UV_HTTP_TIMEOUT",), ("UV_HTTP_TIMEOUT",), "one"),
    ("retries", ("UV_HTTP_RETRIES",), ("UV_HTTP_RETRIES",), "one"),
    ("cert", ("SSL_CERT_FILE",), ("SSL_CERT_FILE",), "one"),
    ("client-cert", ("SSL_CLIENT_CERT",), ("SSL_CLIENT_CERT",), "one"),
    (
        "proxy",
        ("HTTPS_PROXY", "HTTP_PROXY"),
        ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"),
        "one",
    ),
    ("pre", ("UV_PRERELEASE",), ("UV_PRERELEASE",), "flag:allow"),
    ("break-system-packages", ("UV_BREAK_SYSTEM_PACKAGES",), ("UV_BREAK_SYSTEM_PACKAGES",), "flag:1"),
)


def _pip_key(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _PIP_ALIASES.get(key, key)


def _config_home(env: Mapping[str, str]) -> Tuple[str, str, List[str]]:
    home = env.get("HOME") or os.path.expanduser("~")
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    config_dirs = [d for d in (env.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep) if d]
    return home, config_home, config_dirs


def _pip_config_files(env: Mapping[str, str], prefix: Optional[str]) -> List[str]:
    """pip's config files in pip's load order (later ones win)."""
    config_file = env.get("PIP_CONFIG_FILE")
    if config_file == os.devnull:
        return []
    home, config_home, config_dirs = _config_home(env)
    files = [os.path.join(d, "pip", "pip.conf") for d in config_dirs] + ["/etc/pip.conf"]
    if not (config_file and os.path.exists(config_file)):
        files += [os.path.join(home, ".pip", "pip.conf"), os.path.join(config_home, "pip", "pip.conf")]
    if prefix:
        files.append(os.path.join(prefix, "pip.conf"))
    if config_file:
        files.append(config_file)
    return files


def _uv_config_present(env: Mapping[str, str]) -> bool:
    if env.get("UV_NO_CONFIG"):
        return False
    if env.get("UV_CONFIG_FILE"):
        return True
    _, config_home, config_dirs = _config_home(env)
    candidates = [os.path.join(config_home, "uv", "uv.toml"), "/etc/uv/uv.toml"]
    candidates += [os.path.join(d, "uv", "uv.toml") for d in config_dirs]
    return any(os.path.isfile(path) for path in candidates)


def pip_settings(env: Mapping[str, str], prefix: Optional[str] = None, files: bool = True) -> dict:
    """pip's effective install settings: config files (``[global]`` then ``[install]``), then
    ``PIP_*`` variables. Keys are pip option names (``index-url``); values are raw strings.

    ``prefix`` is the target interpreter's ``sys.prefix`` (its site ``pip.conf``).
    """
    import configparser

    sections: dict = {"global": {}, "install": {}}
    for path in _pip_config_files(env, prefix) if files else []:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section, values in sections.items():
            if parser.has_section(section):
                values.update((_pip_key(k), v) for k, v in parser.items(section))
    settings = dict(sections["global"])
    settings.update(sections["install"])
    for name, value in env.items():
        if name.startswith("PIP_") and len(name) > 4:
            settings[_pip_key(name[4:])] = value
    return settings


def uv_environment(env: Mapping[str, str], prefix: Optional[str] = None) -> Tuple[dict, List[str]]:
    """What to add to uv's environment so it honours pip's settings, and extra uv flags.

    Returns ``(variables, flags)``; a variable is only added when neither it nor an equivalent
    uv setting is in ``env`` (the table in the module docstring).
    """
    settings = pip_settings(env, prefix, files=not _uv_config_present(env))
    added: dict = {}
    for option, targets, blockers, kind in _PIP_TO_UV:
        value = settings.get(option)
        if value is None or any(name in env for name in blockers):
            continue
        if kind.startswith("flag:"):
            if value.strip().lower() not in _TRUE:
                continue
            converted = kind[len("flag:"):]
        elif kind == "one":
            converted = value.strip()
        else:
            converted = kind.join(value.split())
        if converted:
            for target in targets:
                added[target] = converted
    flags = ["--no-index"] if settings.get("no-index", "").strip().lower() in _TRUE else []
    return added, flags


# ---------------------------------------------------------------------------------------------
# Finding the installer

def find_uv(env: Mapping[str, str]) -> Optional[str]:
    """``uv`` on ``env``'s PATH, else the binary of the ``uv`` package the launcher can import."""
    found = shutil.which("uv", path=env.get("PATH", os.defpath))
    if found:
        return found
    import importlib.util

    try:
        if importlib.util.find_spec("uv") is None:
            return None
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, OSError, ValueError):
        return None


def _installer_mode(env: Mapping[str, str]) -> str:
    raw = env.get(INSTALLER_VARIABLE, "")
    mode = raw.strip().lower() or "auto"
    if mode not in INSTALLER_CHOICES:
        raise ConfigError.at(
            INSTALLER_VARIABLE, None, f"must be one of {', '.join(INSTALLER_CHOICES)}, got {shown(raw)}"
        )
    return mode


# ---------------------------------------------------------------------------------------------
# The skip marker

def default_marker_dir() -> Path:
    """``<tempdir>/trainenv-<euid>/installed``: container-local (see the module docstring)."""
    return Path(tempfile.gettempdir()) / f"trainenv-{os.geteuid()}" / "installed"


def _trusted_dir(path: Path) -> bool:
    """A real directory (not a symlink) of ours that nobody else can write to."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _marker_chain(request: InstallRequest) -> List[Path]:
    """The directories that must be trusted: the default's ``trainenv-<euid>`` and itself."""
    if request.marker_dir is not None:
        return [Path(request.marker_dir)]
    leaf = default_marker_dir()
    return [leaf.parent, leaf]


def _ensure_marker_dir(chain: List[Path]) -> bool:
    for directory in chain:
        try:
            if directory is chain[-1]:
                directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return False
    return all(_trusted_dir(directory) for directory in chain)


def _dist_entries(directory: str) -> set:
    return {e for e in os.listdir(directory) if e.endswith((".dist-info", ".egg-info"))}


def _marker_holds(path: Path, key: str) -> Optional[bool]:
    """None: no marker. True: every distribution recorded after the install is still there."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("key") != key:
        return False
    dists = data.get("dists")
    if not isinstance(dists, dict) or not dists:
        return False
    for directory, names in dists.items():
        try:
            if not set(names) <= _dist_entries(directory):
                return False
        except (OSError, TypeError):
            return False
    return True


def _write_marker(path: Path, record: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _fingerprint(request: InstallRequest, text: Optional[bytes], extras: Tuple[str, ...], python: str) -> str:
    digest = hashlib.sha256()

    def add(label: str, value: bytes) -> None:
        digest.update(label.encode() + b"\0" + len(value).to_bytes(8, "big") + value)

    if text is not None and request.requirements_file is not None:
        add("requirements", text)
        seen = {os.path.realpath(request.requirements_file)}
        pending = [(text, Path(request.requirements_file).parent, 0)]
        while pending:
            content, base, depth = pending.pop()
            if depth >= _MAX_INCLUDE_DEPTH:
                continue
            for included in _included_files(content.decode("utf-8", "replace"), base):
                real = os.path.realpath(included)
                if real in seen:
                    continue
                seen.add(real)
                try:
                    data = Path(real).read_bytes()
                except OSError:
                    add("include-missing:" + str(included), b"")
                    continue
                add("include:" + str(included), data)
                pending.append((data, included.parent, depth + 1))
    add("extras", "\0".join(extras).encode())
    real = os.path.realpath(python)
    info = os.stat(real)
    add("python", python.encode())
    add("python-real", real.encode())
    add("python-file", f"{info.st_size}:{info.st_mtime_ns}".encode())
    pyvenv = Path(python).parent.parent / "pyvenv.cfg"
    try:
        version = [ln for ln in pyvenv.read_text(encoding="utf-8").splitlines() if ln.startswith("version")]
    except (OSError, UnicodeDecodeError):
        version = []
    add("pyvenv-version", "\n".join(version).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading the installer's output

class _Lazy:
    """A regex compiled on first use: the skip path never needs the output patterns."""

    __slots__ = ("_args", "_compiled")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self._args = (pattern, flags)
        self._compiled = None

    def __getattr__(self, name: str):
        if self._compiled is None:
            self._compiled = re.compile(*self._args)
        return getattr(self._compiled, name)


_QUIET = _Lazy(
    r"^\s*(?:Requirement already satisfied|Using cached|Obtaining dependency information"
    r"|Preparing metadata|Getting requirements to build|Installing build dependencies"
    r"|Installing backend dependencies|Created wheel for|Stored in directory"
    r"|Installing collected packages|Attempting uninstall|Found existing installation"
    r"|Uninstalling |Successfully uninstalled|Using Python \S+ environment at"
    r"|(?:Resolved|Prepared|Installed|Uninstalled|Audited|Checked) \d+ packages? in"
    r"|- \S+==|[━╸╺]|$)"
)
# What the network error was (preferred in messages) and signs that there was one.
_NETWORK_CAUSE = _Lazy(
    r"connection (?:reset|refused|aborted)|timed out|temporary failure in name resolution"
    r"|network is unreachable|HTTP error 5\d\d|server error \(5\d\d"
    r"|\b5\d\d (?:Internal Server Error|Server Error|Service Unavailable|Bad Gateway|Gateway Time-?out)"
    r"|IncompleteRead|RemoteDisconnected|connection closed before message completed",
    re.IGNORECASE,
)
_NETWORK_SIGN = _Lazy(
    r"ConnectionResetError|ConnectionRefusedError|ConnectTimeout|ReadTimeout|ProtocolError"
    r"|Connection broken|NewConnectionError|Max retries exceeded|error sending request|tcp connect error",
    re.IGNORECASE,
)
_LOCAL = _Lazy(
    r"No such file or directory|does not exist|Invalid requirement|is not a valid wheel filename"
    r"|Couldn't parse requirement|Could not open requirements file|Distribution not found at",
    re.IGNORECASE,
)
_UV_SPECIFIC = _Lazy(
    r"externally.managed|Failed to (?:inspect|query) Python interpreter|No interpreter found"
    r"|Querying Python at|unsupported option|Couldn't parse requirement|Unexpected '-', expected"
    r"|unexpected argument",
    re.IGNORECASE,
)
_ERROR_LINE = _Lazy(r"^(?:ERROR|error):")
_DETAIL_LINE = _Lazy(r"^\s*(?:cause:|Caused by:|Hint:|hint:)")
_PIP_INSTALLED = _Lazy(r"^Successfully installed (.+)$")
_UV_INSTALLED = _Lazy(r"^\s*\+ ([A-Za-z0-9][A-Za-z0-9._-]*)")
_URL_CREDENTIALS = _Lazy(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/\s@:]+)(?::([^/\s@]+))?@")


def _credentials_in(texts: Iterable[str]) -> List[str]:
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


class _Attempt:
    """What one run of the installer showed (filled in while its output streams)."""

    def __init__(self, installer: str, returncode: Optional[int], tail: List[str], packages: List[str]) -> None:
        self.installer = installer
        self.returncode = returncode
        self.tail = tail
        self.packages = packages
        self.network_cause = ""  # e.g. "Connection refused"
        self.network_sign = ""  # e.g. "NewConnectionError"
        self.local = False
        self.uv_specific = False
        self.start_error = ""

    @property
    def network(self) -> str:
        """What the network error was, or "" when the output shows none."""
        return self.network_cause or self.network_sign


def _installed_names(line: str) -> List[str]:
    """Names in pip's ``Successfully installed a-1.0 b-2.0`` or uv's `` + a==1.0``, normalized
    as PEP 503 does (``Tiny_Pkg`` -> ``tiny-pkg``) so both installers report the same names."""
    match = _PIP_INSTALLED.match(line)
    if match:
        names = [item.rsplit("-", 1)[0] for item in match.group(1).split()]
    else:
        match = _UV_INSTALLED.match(line)
        names = [match.group(1).split("==")[0]] if match else []
    return [re.sub(r"[-_.]+", "-", name).lower() for name in names]


def _read_lines(stream) -> Iterator[str]:
    """Lines of a binary pipe as they arrive, decoded leniently; ``\\r`` redraws keep the last."""
    for raw in iter(stream.readline, b""):
        yield raw.decode("utf-8", "replace").rstrip("\r\n").split("\r")[-1]


def _run(
    installer: str,
    argv: List[str],
    request: InstallRequest,
    env: Mapping[str, str],
    log: Callable[[str], None],
    secrets: List[str],
) -> _Attempt:
    """Run one installer command, streaming filtered lines to ``log`` as they come."""
    attempt = _Attempt(installer, None, [], [])
    tail: deque = deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(
            argv,
            cwd=str(request.cwd),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except OSError as exc:
        attempt.start_error = f"cannot run {argv[0]}: {exc.strerror or exc}"
        return attempt
    try:
        assert proc.stdout is not None
        for line in _read_lines(proc.stdout):
            clean = redact_text(line, secrets)
            tail.append(clean[:_TAIL_LINE_CHARS])
            cause = _NETWORK_CAUSE.search(line)
            if cause and not attempt.network_cause:
                attempt.network_cause = cause.group(0)
            sign = _NETWORK_SIGN.search(line)
            if sign and not attempt.network_sign:
                attempt.network_sign = sign.group(0)
            attempt.local = attempt.local or bool(_LOCAL.search(line))
            attempt.uv_specific = attempt.uv_specific or bool(_UV_SPECIFIC.search(line))
            attempt.packages.extend(_installed_names(line))
            if not _QUIET.match(line):
                log(f"{installer}: {clean.strip()[:_LOG_LINE_CHARS]}")
        attempt.returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    attempt.tail = list(tail)
    return attempt


def _summary(attempt: _Attempt) -> str:
    """The installer's own error line, with its most specific cause or hint."""
    if attempt.start_error:
        return attempt.start_error
    lines = attempt.tail
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


def _failure(attempt: _Attempt, retried: bool) -> InstallError:
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
    return InstallError(
        f"requirements install failed ({attempt.installer} {status}{after}): {_summary(attempt)}; "
        f"{fix}; see the log above",
        tail="\n".join(attempt.tail),
    )


def _plain_error(message: str, tail: str = "") -> InstallError:
    return InstallError(message, tail=tail)


# ---------------------------------------------------------------------------------------------
# The target interpreter

_PROBE = (
    "import importlib.util, json, sys, sysconfig\n"
    "print(json.dumps({'version': sys.version.split()[0], 'prefix': sys.prefix,"
    " 'dirs': sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}),"
    " 'pip': importlib.util.find_spec('pip') is not None}))\n"
)


def _probe(python: str, env: Mapping[str, str], secrets: List[str]) -> dict:
    """Version, prefix, site-packages dirs and pip presence of the target (one ~20 ms spawn).

    Runs in ``/`` so that a ``json.py`` in the code dir cannot shadow the stdlib.
    """
    try:
        done = subprocess.run(
            [python, "-c", _PROBE], cwd=os.sep, env=dict(env), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=_PROBE_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _plain_error(
            f"requirements install failed: cannot run the target python {python}: {exc}; "
            "check the interpreter the entry point uses"
        ) from None
    stderr = redact_text(done.stderr.decode("utf-8", "replace"), secrets)
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        info = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        raise _plain_error(
            f"requirements install failed: the target python {python} did not start "
            f"(exit {done.returncode}): {last[0][:_SUMMARY_CHARS]}; check the interpreter the "
            "entry point uses",
            "\n".join(stderr.splitlines()[-TAIL_LINES:]),
        )
    return info


def _resolve_python(python: str, env: Mapping[str, str]) -> str:
    if not os.path.isabs(python):
        found = shutil.which(python, path=env.get("PATH", os.defpath))
        python = os.path.abspath(found or python)
    if not os.path.exists(python):
        raise _plain_error(
            f"requirements install failed: the target python {python} does not exist; "
            "check the interpreter the entry point uses"
        )
    return python


def _clean_extras(extras: Iterable[str]) -> Tuple[str, ...]:
    cleaned = []
    for extra in extras:
        text = extra.strip()
        if not text:
            continue
        if text.startswith("-"):
            raise ConfigError.at(
                "launch settings", "requirements",
                f"{shown(extra)} is an installer option, not a requirement; put options in requirements.txt",
            )
        cleaned.append(text)
    return tuple(cleaned)


# ---------------------------------------------------------------------------------------------
# The entry point


def install_requirements(request: InstallRequest, log: Callable[[str], None]) -> InstallResult:
    """Install ``request``'s requirements unless there are none or they are installed already.

    Raises ``InstallError`` (with ``.tail``) when the install fails and ``ConfigError`` for a
    bad ``TRAINENV_INSTALLER`` or extra requirement. See the module docstring.
    """
    started = time.monotonic()
    env = request.env
    mode = _installer_mode(env)
    extras = _clean_extras(request.extra_requirements)
    text: Optional[bytes] = None
    wanted = bool(extras)
    if request.requirements_file is not None:
        try:
            text = Path(request.requirements_file).read_bytes()
        except OSError as exc:
            raise _plain_error(
                f"requirements install failed: cannot read {request.requirements_file}: "
                f"{exc.strerror or exc}; check the file's permissions"
            ) from None
        lines = _logical_lines(text.decode("utf-8", "replace"))
        wanted = wanted or _has_requirements(lines)
        if not lines:  # nothing for the installer to read, not even an option
            text = None
    if not wanted:
        return InstallResult("none", time.monotonic() - started)

    python = _resolve_python(request.python, env)
    key = _fingerprint(request, text, extras, python)
    chain = _marker_chain(request)
    marker = chain[-1] / f"{key}.json"
    if all(_trusted_dir(directory) for directory in chain) and _marker_holds(marker, key):
        seconds = time.monotonic() - started
        log(f"requirements already installed in this container ({marker}); skipping ({seconds * 1000:.0f} ms)")
        return InstallResult("skipped", seconds)

    usable = _ensure_marker_dir(chain)
    if not usable:
        log(f"marker directory {chain[-1]} is not private to this user; installing without a skip marker")
    lock = _lock(chain[-1] / f"{key}.lock") if usable else None
    try:
        if usable and _marker_holds(marker, key):
            seconds = time.monotonic() - started
            log(f"requirements installed meanwhile by another launcher ({marker}); skipping")
            return InstallResult("skipped", seconds)
        if usable and marker.exists():
            log("site-packages changed since these requirements were installed; installing again")
        return _install(request, python, text, extras, mode, marker if usable else None, key, log, started)
    finally:
        if lock is not None:
            lock.close()


def _lock(path: Path):
    """An exclusive ``flock`` on ``path``, released when the returned file is closed."""
    import fcntl

    try:
        handle = open(path, "a+b")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        pass
    return handle


def _install(
    request: InstallRequest,
    python: str,
    text: Optional[bytes],
    extras: Tuple[str, ...],
    mode: str,
    marker: Optional[Path],
    key: str,
    log: Callable[[str], None],
    started: float,
) -> InstallResult:
    env = request.env
    requirement_text = text.decode("utf-8", "replace") if text is not None else ""
    secrets = secret_values(env)
    secrets += [s for s in _credentials_in(list(env.values()) + [requirement_text, *extras]) if s not in secrets]
    secrets.sort(key=len, reverse=True)

    uv = find_uv(env) if mode != "pip" else None
    if mode == "uv" and uv is None:
        raise _plain_error(
            f"requirements install failed: {INSTALLER_VARIABLE}=uv but uv is neither on PATH nor "
            f"importable; install uv in the image or set {INSTALLER_VARIABLE}=auto"
        )
    info = _probe(python, env, secrets)
    if uv is None and not info.get("pip"):
        why = f"{INSTALLER_VARIABLE}=pip" if mode == "pip" else "uv was not found"
        raise _plain_error(
            f"requirements install failed: the target python {python} has no pip module ({why}); "
            "install pip into that interpreter (python -m ensurepip) or put uv in the image"
        )

    sources = []
    if text is not None:
        sources.append(Path(request.requirements_file).name)  # type: ignore[arg-type]
    if extras:
        sources.append(f"{len(extras)} extra")
    requirements = os.path.abspath(request.requirements_file) if text is not None else None  # type: ignore[arg-type]
    args = (["-r", requirements] if requirements else []) + list(extras)

    def pip_attempt() -> Tuple[List[str], dict]:
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                "--progress-bar", "off", *args]
        return argv, {**env, "PYTHONUNBUFFERED": "1"}

    added, flags = uv_environment(env, info.get("prefix")) if uv is not None else ({}, [])

    def uv_attempt() -> Tuple[List[str], dict]:
        assert uv is not None
        return [uv, "pip", "install", "--python", python, *flags, *args], {**env, **added}

    installer = "uv" if uv is not None else "pip"
    log(
        f"installing requirements ({' + '.join(sources)}) into {python} "
        f"(Python {info.get('version', '?')}) with {installer}"
    )
    if installer == "uv" and (added or flags):
        log(f"uv: pip's settings passed on as {', '.join(sorted(added) + flags)}")
    retried = False
    while True:
        argv, child_env = uv_attempt() if installer == "uv" else pip_attempt()
        attempt = _run(installer, argv, request, child_env, log, secrets)
        if attempt.returncode == 0:
            break
        crashed = attempt.returncode is None or attempt.returncode < 0
        if installer == "uv" and mode == "auto" and info.get("pip") and (crashed or attempt.uv_specific):
            log(f"uv could not do this install ({_summary(attempt)}); falling back to pip")
            installer = "pip"
            continue
        if attempt.network and not attempt.local and not retried and not crashed:
            retried = True
            log(f"{installer} failed with a network error ({attempt.network}); retrying once")
            continue
        raise _failure(attempt, retried)

    seconds = time.monotonic() - started
    packages = tuple(dict.fromkeys(attempt.packages))
    new = f"{len(packages)} new: {', '.join(packages)}" if packages else "nothing new"
    log(redact_text(f"requirements installed with {installer} in {seconds:.1f} s ({new})", secrets))
    if marker is not None:
        _record(marker, key, installer, python, info, packages, log)
    return InstallResult(installer, seconds, packages)


def _record(
    marker: Path, key: str, installer: str, python: str, info: dict, packages: Tuple[str, ...],
    log: Callable[[str], None],
) -> None:
    """Write the skip marker; a failure only costs the next launch a reinstall."""
    try:
        dists = {d: sorted(_dist_entries(d)) for d in info.get("dirs", []) if os.path.isdir(d)}
        if not dists:
            return
        _write_marker(marker, {
            "key": key, "installer": installer, "python": python,
            "version": info.get("version"), "packages": list(packages), "dists": dists,
            "installed_at": time.time(),
        })
    except OSError as exc:
        log(f"could not write the install marker {marker}: {exc.strerror or exc}")
