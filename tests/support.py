"""Shared test helpers (add to this file; do not rewrite it).

Serving: ``Server`` runs a real ``python -m trainenv.serving`` (or the given argv) on
127.0.0.1 with an ephemeral port and collects its stderr; ``make_base`` writes a handler as
``<base>/model/code/inference.py``; ``error_of`` checks a JSON error body; ``SERVERS``
parametrizes a test over the stdlib server and (when installed) gunicorn.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

try:
    import gunicorn  # noqa: F401

    HAVE_GUNICORN = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_GUNICORN = False

SERVERS = [
    "stdlib",
    pytest.param("gunicorn", marks=pytest.mark.skipif(not HAVE_GUNICORN, reason="gunicorn not installed")),
]


# -- serving ---------------------------------------------------------------------------------------


class Server:
    """A ``python -m trainenv.serving`` child (or ``argv``); stderr is collected by a thread."""

    def __init__(
        self,
        base: Path,
        env: Dict[str, str],
        wait_listening: bool = True,
        argv: Optional[Sequence[str]] = None,
    ) -> None:
        self.base = base
        self.lines: List[str] = []
        self._lock = threading.Lock()
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TRAINENV_", "SAGEMAKER_", "AIP_", "SM_"))
        }
        full_env.update(
            {
                "TRAINENV_BASE_DIR": str(base),
                "TRAINENV_SERVING_HOST": "127.0.0.1",
                "TRAINENV_SERVING_PORT": "0",
                "TRAINENV_SERVING_WORKERS": "2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        full_env.update(env)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv or [sys.executable, "-m", "trainenv.serving"]),
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        if wait_listening:
            line = self.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", 10)
            self.port = int(re.search(r":(\d+) ", line).group(1))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.lines:
                    if regex.search(line):
                        return line
            if self.proc.poll() is not None:
                self._reader.join(2)
                with self._lock:
                    for line in self.lines:
                        if regex.search(line):
                            return line
                raise AssertionError(f"server exited {self.proc.returncode} before {pattern!r}:\n{self.log}")
            time.sleep(0.01)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.log}")

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[Dict[str, str]] = None,
        timeout: float = 10.0,
    ):
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def post(
        self,
        body: bytes,
        content_type: Optional[str] = "application/json",
        path: str = "/invocations",
        **headers: str,
    ):
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        return self.request("POST", path, body, all_headers)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/ping", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"not ready within {timeout} s:\n{self.log}")

    def wait_exit(self, timeout: float) -> Optional[int]:
        """The exit code of a server expected to stop on its own; killed (and None) if it does not."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            return None
        finally:
            self._reader.join(2)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            self._reader.join(2)


def make_base(root: Path, handler: str) -> Path:
    code = root / "model" / "code"
    code.mkdir(parents=True)
    (code / "inference.py").write_text(textwrap.dedent(handler))
    return root


def error_of(body: bytes) -> dict:
    document = json.loads(body)
    assert set(document) == {"error", "message", "request_id"}, document
    assert "Traceback" not in document["message"]
    return document
