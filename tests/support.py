"""Shared test helpers: one place for what several test files need (add to it; do not rewrite it).

- job trees: ``make_tree`` (trainenv's layout), ``build_env`` (its TrainingEnv, in process),
  ``tree_state_of`` (a digest: equal before/after = nothing changed), ``failure`` (the failure file)
- environments: ``clean_environ`` (without platform, cluster or secret-named variables),
  ``job_environ`` (that, for a job tree)
- the command: ``TRAINENV`` (its argv), ``run_trainenv`` (run, capture, timeout),
  ``run_train`` / ``start_train`` (``trainenv train`` on a tree, foreground / background)
- processes and checks: ``free_port``, ``write_script``, ``alive``, ``one_line_error``, ``eval_in_sh``
- engines: ``need_torch``, ``need_mpi``, ``need_uv``, ``need_tool``, ``need_pid_namespace`` (skip
  the calling test); ``needs_mpirun``, ``needs_uv``, ``without_ml_dir`` (skip marks); ``SERVERS``
- serving: ``Server`` (a real server on 127.0.0.1, waited for), ``make_base``, ``error_of``

Fixtures in ``conftest.py`` wrap these. Specialised harnesses stay apart: ``distributed_harness``
(fake clusters, their ``need_netns``, Open MPI's rsh agent), ``fixtures_wheels`` (wheels, an index).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
PYTHON = sys.executable


# The ``trainenv`` command: the console script next to this interpreter, else ``python -m trainenv``.
_SCRIPT = Path(PYTHON).with_name("trainenv")
TRAINENV: List[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "trainenv"]


# -- job trees -------------------------------------------------------------------------------------

Content = Union[Mapping[str, Any], Sequence[Any], str, bytes, None]


def _encode(content: Content) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    return json.dumps(content).encode("utf-8")


def make_tree(
    base: Path,
    code: Optional[Mapping[str, str]] = None,
    hyperparameters: Content = None,
    *,
    input_data_config: Content = None,
    resource_config: Content = None,
    channels: Iterable[str] = (),
    output_channels: Iterable[str] = (),
    settings: Optional[str] = None,
    files: Optional[Mapping[str, Union[str, bytes]]] = None,
    dirs: Iterable[str] = (),
) -> Path:
    """A job tree in trainenv's layout at ``base`` (made if missing); returns ``base``.

    ``usercode/`` holds ``code`` (name -> text); ``input/config/`` the JSON files given (a dict
    or list as JSON, ``str`` as UTF-8, ``bytes`` as is) and ``settings`` as ``trainenv.yaml``.
    ``channels``: dirs under ``input/data`` with one file each; ``output_channels``: dirs under
    ``output``; ``dirs``: empty dirs; ``files``: any file (paths relative to ``base``).
    """
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (base / "usercode").mkdir(exist_ok=True)
    for relative in dirs:
        (base / relative).mkdir(parents=True, exist_ok=True)
    for filename, content in (
        ("hyperparameters.json", hyperparameters),
        ("inputdataconfig.json", input_data_config),
        ("resourceconfig.json", resource_config),
    ):
        if content is not None:
            (config / filename).write_bytes(_encode(content))
    if settings is not None:
        (config / "trainenv.yaml").write_text(settings)
    for channel in channels:
        directory = base / "input" / "data" / channel
        directory.mkdir(parents=True)
        (directory / "part-0000").write_text("1,2\n")
    for channel in output_channels:
        (base / "output" / channel).mkdir(parents=True)
    written = {f"usercode/{name}": text for name, text in (code or {}).items()}
    for relative, content in {**written, **(files or {})}.items():
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode(content))
    return base


def tree_state_of(root: Path) -> dict:
    """``{relative path: digest}`` for every dir, file and link below ``root`` (inclusive)."""
    state: dict = {}
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(directory, root)
        state[rel_dir] = "dir:%o" % stat.S_IMODE(os.lstat(directory).st_mode)
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                state[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                state[rel] = "file:%o:%d:%s" % (stat.S_IMODE(info.st_mode), info.st_size, digest.hexdigest())
    return state


def build_env(base: Path, **environ: str) -> Any:
    """The ``TrainingEnv`` trainenv builds, in this process, for the job tree at ``base``."""
    from trainenv.environment import build_training_env

    return build_training_env({"TRAINENV_BASE_DIR": str(base), **environ})


def failure(base: Path) -> str:
    """The failure file trainenv wrote for the job tree at ``base``."""
    return (base / "output" / "failure").read_text()


# -- environments ----------------------------------------------------------------------------------

# Variables a platform, a launcher or trainenv sets: a child process must not inherit them
# from the machine or the CI.
PLATFORM_PREFIXES = (
    "TRAINENV_", "SM_", "SAGEMAKER_", "PAI_", "AIP_", "PET_", "TORCHELASTIC_", "ROLE_", "OMPI_", "PMIX_", "OCI__",
)
PLATFORM_NAMES = frozenset(
    {
        "TF_CONFIG", "CLUSTER_SPEC", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
        "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "NODE_RANK",
        "NNODES", "NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
        "TRAINING_JOB_NAME", "CURRENT_HOST", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
        # OCI Data Science's markers and node count (its other names count only with a marker)
        "JOB_RUN_OCID", "JOB_RUN_ENTRYPOINT", "NODE_COUNT", "INITIAL_CLUSTER_SIZE",
    }
)


def clean_environ(**extra: str) -> Dict[str, str]:
    """``os.environ`` less platform/cluster variables and secret-named ones, plus ``extra``.

    Secret-named values are left out because trainenv masks them in what it prints.
    """
    from trainenv.redact import is_secret_name

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(PLATFORM_PREFIXES) and k not in PLATFORM_NAMES and not is_secret_name(k)
    }
    env.update(extra)
    return env


def job_environ(base: Path, **extra: str) -> Dict[str, str]:
    """:func:`clean_environ` for the job tree at ``base`` (its run dir is ``base/run``), plus ``extra``."""
    return clean_environ(**{"TRAINENV_BASE_DIR": str(base), "TRAINENV_RUN_DIR": str(base / "run"), **extra})


# -- the command -----------------------------------------------------------------------------------


def run_trainenv(
    *args: str,
    env: Optional[Mapping[str, str]] = None,
    extra_env: Optional[Mapping[str, str]] = None,
    cwd: Optional[Path] = None,
    prefix: Sequence[str] = (),
    text: bool = True,
    timeout: float = 120,
    **options: Any,
) -> subprocess.CompletedProcess:
    """Run ``trainenv *args`` (after ``prefix``) to the end and capture its output.

    The environment is ``env`` (default :func:`clean_environ`) updated with ``extra_env``;
    ``options`` go to :func:`subprocess.run`.
    """
    environ = dict(clean_environ() if env is None else env)
    environ.update(extra_env or {})
    return subprocess.run(
        [*prefix, *TRAINENV, *args],
        env=environ,
        cwd=str(cwd) if cwd is not None else None,
        capture_output=True,
        text=text,
        errors="surrogateescape" if text else None,
        timeout=timeout,
        **options,
    )


def run_train(base: Path, *args: str, text: bool = False, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    """``trainenv train *args`` on the job tree at ``base``, ``extra`` added to its environment."""
    return run_trainenv("train", *args, env=job_environ(base, **extra), text=text, timeout=timeout)


def start_train(base: Path, *args: str, **extra: str) -> subprocess.Popen:
    """:func:`run_train` in the background: a Popen with stdout and stderr piped (bytes)."""
    return subprocess.Popen(
        [*TRAINENV, "train", *args], env=job_environ(base, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


# -- processes -------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (bind port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A free port whose successor is free too: a multi-node job's ``MASTER_PORT`` (node 0 of a
    multi-node trainenv job listens on ``MASTER_PORT + 1`` for the others)."""
    for _ in range(50):
        port = free_port()
        if port < 65535:
            try:
                with socket.socket() as probe:
                    probe.bind(("", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports")


def write_script(path: Path, text: str, *, executable: bool = False) -> Path:
    path.write_text(text)
    if executable:
        path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- checks ----------------------------------------------------------------------------------------


def one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    """The ConfigError's message, checked to be one line that contains every fragment."""
    from trainenv.errors import EXIT_CONFIG

    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert excinfo.value.exit_code == EXIT_CONFIG
    return message


def eval_in_sh(exports: str, names: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Run the export lines in a real ``sh`` and read ``names`` back (default: every exported name)."""
    if names is None:
        names = re.findall(r"^export ([A-Za-z_][A-Za-z0-9_]*)=", exports, re.MULTILINE)
    script = 'eval "$EXPORTS"; for n in "$@"; do eval "printf \'%s\\0%s\\0\' \\"\\$n\\" \\"\\${$n}\\""; done'
    out = subprocess.run(
        ["sh", "-c", script, "sh", *names],
        env={"PATH": os.environ["PATH"], "EXPORTS": exports},
        capture_output=True, check=True,
    ).stdout.decode("utf-8")
    parts = out.split("\0")[:-1]
    return dict(zip(parts[0::2], parts[1::2]))


# -- engines: skip a test when what it needs is missing --------------------------------------------


def _have_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def need_tool(name: str, hint: str = "") -> str:
    """The path of command ``name``; skip the calling test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed" + (f" ({hint})" if hint else ""))
    return path


def need_torch() -> None:
    """Skip the calling test when torch is missing."""
    if not _have_module("torch"):
        pytest.skip("torch is not installed (scripts/test with TRAINENV_TEST_FULL=1 installs it)")


def need_mpi() -> None:
    """Skip the calling test when Open MPI or mpi4py is missing."""
    need_tool("mpirun", "apt-get install openmpi-bin")
    if not _have_module("mpi4py"):
        pytest.skip("mpi4py is not installed")


def _find_uv() -> Optional[str]:
    from trainenv.install.installers import find_uv

    return find_uv(os.environ)


def need_uv() -> str:
    """The path of uv; skip the calling test when trainenv would not find one."""
    uv = _find_uv()
    if uv is None:
        pytest.skip("uv is not installed")
    return uv


@functools.lru_cache(maxsize=None)
def _pid_namespace_error() -> Optional[str]:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return None if probe.returncode == 0 else probe.stderr.decode(errors="replace").strip()


def need_pid_namespace() -> None:
    """Skip the calling test when ``unshare --pid --fork --mount-proc`` does not work here."""
    error = _pid_namespace_error()
    if error is not None:
        pytest.skip(f"cannot make a PID namespace here: {error}")


needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)")
needs_uv = pytest.mark.skipif(_find_uv() is None, reason="uv is not installed")
without_ml_dir = pytest.mark.skipif(os.path.isdir("/ml"), reason="/ml exists on this machine: not local mode")

SERVERS = [
    "stdlib",
    pytest.param("gunicorn", marks=pytest.mark.skipif(not _have_module("gunicorn"), reason="gunicorn not installed")),
]
"""Parametrizes a serving test over the stdlib server and (when installed) gunicorn."""


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
        full_env = clean_environ(
            TRAINENV_BASE_DIR=str(base),
            TRAINENV_SERVING_HOST="127.0.0.1",
            TRAINENV_SERVING_PORT="0",
            PYTHONUNBUFFERED="1",
        )
        if env.get("TRAINENV_SERVER") == "gunicorn":  # the stdlib server runs one process unless told
            full_env["TRAINENV_SERVING_WORKERS"] = "2"
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
        _STARTED.append(self.proc)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        if wait_listening:
            try:
                line = self.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", 10)
            except BaseException:
                self.stop(5)  # a server that never listened must not outlive its test
                raise
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

    def send_raw(self, data: bytes, *, half_close: bool = False, timeout: float = 10.0) -> bytes:
        """Send ``data`` on a fresh connection (then half-close it if asked); read until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

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
            _kill_group(self.proc)  # and whatever its workers left in its process group
            self._reader.join(2)


_STARTED: List["subprocess.Popen[str]"] = []  # every server started: none may outlive the test run


def _kill_group(proc: "subprocess.Popen[str]") -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


@atexit.register
def _stop_every_server() -> None:
    for proc in _STARTED:
        _kill_group(proc)


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
