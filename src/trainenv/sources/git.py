"""Cloning a git source with the system ``git``.

Shallow (``--depth 1``) with submodules (``git submodule update``, run only when the clone has
a ``.gitmodules``); a ``TRAINENV_GIT_REF`` that is a branch or tag is
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

from trainenv.errors import ConfigError, SourceError, shown
from trainenv.redact import redact_text, redact_urls

_TAIL_LINES = 5
_MAX_KEY_BYTES = 64 * 1024
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@]*)@")


def _environ(ssh_key: str | None) -> dict[str, str]:
    """git's environment: no credential prompt; ssh in batch mode unless the job chose its ssh.

    With a key file, ssh uses that key and no other, and accepts an unknown host key (a job's
    container has no ``known_hosts``; a key already known must still match).
    """
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    if ssh_key is not None:
        import shlex

        env.pop("GIT_SSH", None)
        env["GIT_SSH_COMMAND"] = (f"ssh -i {shlex.quote(ssh_key)} -o IdentitiesOnly=yes -o BatchMode=yes "
                                  "-o StrictHostKeyChecking=accept-new")
    elif "GIT_SSH" not in env:
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


def _private_key(path: str, where: str, into: str) -> str:
    """A copy of the key file at ``into/id`` that only we can read; its path.

    ssh ignores a key that others may read, and a platform's mounted secret often is (0644).
    A key without a final newline gets one (ssh refuses it otherwise).
    """
    try:
        with open(path, "rb") as file:
            key = file.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ConfigError.at(where, None, f"{shown(path)}: cannot read the ssh key file: {exc.strerror or exc}") from None
    if len(key) > _MAX_KEY_BYTES or not key.strip():
        raise ConfigError.at(where, None, f"{shown(path)}: not an ssh private key (empty, or over {_MAX_KEY_BYTES} bytes)")
    copy = os.path.join(into, "id")
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key if key.endswith(b"\n") else key + b"\n")
    return copy


class _Git:
    """git runs for one clone: the executable, the options every run takes, the URL, the environment."""

    def __init__(self, git: str, url: str, env: dict[str, str]) -> None:
        self.base = [git, *(["-c", "protocol.file.allow=always"] if url.startswith("file://") else [])]
        self.url = url
        self.env = env

    def run(self, args: list[str], cwd: str | None = None) -> str:
        """Run git in a process group of its own; its redacted last error lines, or ``""`` on success.

        Anything raised meanwhile (``SignalError`` from a SIGTERM) kills the whole group first, so no
        helper (ssh, git-remote-https) outlives the fetch.
        """
        import signal
        import subprocess

        with subprocess.Popen(
            [*self.base, *args], cwd=cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
        ) as process:
            try:
                _, stderr = process.communicate()
            except BaseException:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        if process.returncode == 0:
            return ""
        userinfo = _URL_USERINFO.match(self.url)
        secrets = [part for part in userinfo.group("userinfo").split(":") if len(part) >= 4] if userinfo else []
        lines = [line for line in stderr.splitlines() if line.strip()][-_TAIL_LINES:]
        return redact_urls(redact_text("\n".join(lines), secrets)) or f"git exited with status {process.returncode}"

    def checkout(self, dest: str, ref: str) -> str:
        """Check out ``ref`` (a tag or commit, else a branch as ``origin/<ref>``) as a detached HEAD."""
        checkout = ["-c", "advice.detachedHead=false", "checkout", "--quiet", "--no-guess", "--detach"]
        error = self.run([*checkout, ref, "--"], cwd=dest)
        if error and not self.run([*checkout, f"origin/{ref}", "--"], cwd=dest):
            return ""
        return error

    def submodules(self, dest: str, shallow: bool) -> str:
        """Check out the clone's submodules, recursively, when it has any (a ``.gitmodules``).

        Not ``clone --recurse-submodules``: that runs ``git submodule`` (~20 ms) even when there is none.
        """
        if not os.path.isfile(os.path.join(dest, ".gitmodules")):
            return ""
        depth = ["--depth", "1"] if shallow else []
        return self.run(["submodule", "--quiet", "update", "--init", "--recursive", *depth], cwd=dest)


def clone(url: str, dest: str, ref: str | None, ssh_key: tuple[str, str] | None = None) -> None:
    """Clone ``url`` at ``ref`` (default branch when None) into the new dir ``dest``.

    Shallow first; a commit (or a server that cannot serve a shallow clone) takes the whole
    history. The clone's ``origin`` is left without the URL's credentials. ``ssh_key``: a key
    file and the setting that named it; a private copy of it is used and removed afterwards.
    """
    import shutil
    import tempfile

    executable = shutil.which("git")
    if executable is None:
        raise SourceError("TRAINENV_SOURCE: a git source needs git on PATH, and there is none")
    key_dir = tempfile.mkdtemp(prefix="trainenv-ssh-") if ssh_key is not None else None
    try:
        key = _private_key(ssh_key[0], ssh_key[1], key_dir) if ssh_key is not None and key_dir is not None else None
        git = _Git(executable, url, _environ(key))
        error = git.run(["clone", "--quiet", "--depth", "1", *(["--branch", ref] if ref else []), "--", url, dest])
        error = error or git.submodules(dest, shallow=True)
        if error:
            shutil.rmtree(dest, ignore_errors=True)
            if ref is None:
                error = git.run(["clone", "--quiet", "--", url, dest])
            else:
                error = git.run(["clone", "--quiet", "--no-checkout", "--", url, dest]) or git.checkout(dest, ref)
            error = error or git.submodules(dest, shallow=False)
        if not error and redact_urls(url) != url:  # the job's code dir keeps no credential
            error = git.run(["remote", "set-url", "origin", _URL_USERINFO.sub(r"\g<scheme>", url)], cwd=dest)
    finally:
        if key_dir is not None:
            shutil.rmtree(key_dir, ignore_errors=True)
    if error:
        at = f" at {ref!r}" if ref else ""
        tail = " | ".join(error.splitlines())
        raise SourceError(f"TRAINENV_SOURCE: cannot clone {redact_urls(url)}{at}: {tail}")
