"""Cloning a git source with the system ``git``.

Shallow (``--depth 1``) with submodules; a ``TRAINENV_GIT_REF`` that is a branch or tag is
cloned shallow at that ref; a commit (or a server that cannot serve a shallow clone, such as a
plain HTTP file server) takes a full clone and a checkout. The clone's ``origin`` is set back to
the URL without its credentials, so the job's code dir holds none. The credential prompt is off (``GIT_TERMINAL_PROMPT=0``, ssh in batch mode), so a missing
credential fails at once. Credentials in the URL never reach a message: the URL and git's last
error lines are redacted. Submodules over ``file://`` are allowed only when the source itself
is a ``file://`` URL (git refuses them by default).
"""

from __future__ import annotations

import os
import re

from trainenv.errors import SourceError
from trainenv.redact import redact_text, redact_urls

_TAIL_LINES = 5
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@]*)@")


def _environ() -> dict[str, str]:
    """git's environment: no credential prompt; ssh in batch mode unless the job chose its ssh."""
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    if "GIT_SSH" not in env:
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


def _run(argv: list[str], url: str, cwd: str | None = None) -> str:
    """Run git in a process group of its own; its redacted last error lines, or ``""`` on success.

    Anything raised meanwhile (``SignalError`` from a SIGTERM) kills the whole group first, so no
    helper (ssh, git-remote-https) outlives the fetch.
    """
    import signal
    import subprocess

    with subprocess.Popen(
        argv, cwd=cwd, env=_environ(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, errors="replace", start_new_session=True,
    ) as process:
        try:
            _, stderr = process.communicate()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    if process.returncode == 0:
        return ""
    userinfo = _URL_USERINFO.match(url)
    secrets = [part for part in userinfo.group("userinfo").split(":") if len(part) >= 4] if userinfo else []
    lines = [line for line in stderr.splitlines() if line.strip()][-_TAIL_LINES:]
    return redact_urls(redact_text("\n".join(lines), secrets)) or f"git exited with status {process.returncode}"


def _checkout(base: list[str], url: str, dest: str, ref: str) -> str:
    """Check out ``ref`` (a tag or commit, else a branch as ``origin/<ref>``) as a detached HEAD."""
    checkout = [*base, "-c", "advice.detachedHead=false", "checkout", "--quiet", "--no-guess", "--detach"]
    error = _run([*checkout, ref, "--"], url, cwd=dest)
    if error and not _run([*checkout, f"origin/{ref}", "--"], url, cwd=dest):
        return ""
    return error


def clone(url: str, dest: str, ref: str | None) -> None:
    """Clone ``url`` at ``ref`` (default branch when None) into the new dir ``dest``.

    Shallow first; a commit (or a server that cannot serve a shallow clone) takes the whole
    history. The clone's ``origin`` is left without the URL's credentials.
    """
    import shutil

    git = shutil.which("git")
    if git is None:
        raise SourceError("TRAINENV_SOURCE: a git source needs git on PATH, and there is none")
    base = [git, *(["-c", "protocol.file.allow=always"] if url.startswith("file://") else [])]
    shallow = [*base, "clone", "--quiet", "--depth", "1", "--recurse-submodules", "--shallow-submodules"]
    error = _run([*shallow, *(["--branch", ref] if ref else []), "--", url, dest], url)
    if error:
        shutil.rmtree(dest, ignore_errors=True)
        if ref is None:
            error = _run([*base, "clone", "--quiet", "--recurse-submodules", "--", url, dest], url)
        else:
            error = _run([*base, "clone", "--quiet", "--no-checkout", "--", url, dest], url)
            if not error:
                error = _checkout(base, url, dest, ref)
            if not error:
                error = _run([*base, "submodule", "--quiet", "update", "--init", "--recursive"], url, cwd=dest)
    if not error and redact_urls(url) != url:  # the job's code dir keeps no credential
        error = _run([git, "remote", "set-url", "origin", _URL_USERINFO.sub(r"\g<scheme>", url)], url, cwd=dest)
    if error:
        at = f" at {ref!r}" if ref else ""
        tail = " | ".join(error.splitlines())
        raise SourceError(f"TRAINENV_SOURCE: cannot clone {redact_urls(url)}{at}: {tail}")
