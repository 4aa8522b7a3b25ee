"""Shared fixtures: job trees on disk, tree digests, the ``trainenv`` command, a fake NVML.

| fixture           | gives |
|-------------------|-------|
| ``job_tree``      | ``make(**parts) -> Path``: writes a /ml-style job tree under ``tmp_path``, returns its base dir |
| ``research_tree`` | a fresh copy of ``tests/data/sagemaker_research_tree`` (the research notes' fake SageMaker job, §3.8) |
| ``tree_state``    | ``state(path) -> dict``: every entry below ``path`` with a digest; equal before/after = nothing created, changed or deleted |
| ``clean_environ`` | ``os.environ`` without any platform or trainenv variable, for child processes |
| ``run_trainenv``  | ``run(*args, env=, extra_env=, cwd=, prefix=) -> CompletedProcess`` of the installed ``trainenv`` script |
| ``fake_nvml_dir`` | a directory holding a fake ``pynvml`` module (``FAKE_NVML_GPUS`` GPUs, default 2), preloaded by a ``sitecustomize``; put it on ``PYTHONPATH`` |
| ``fake_nvml``     | that module as ``sys.modules["pynvml"]`` for in-process tests (trainenv's hardware cache emptied) |

``job_tree`` writes each config file from a dict (as JSON), a ``str`` (as UTF-8) or ``bytes``
(as is); ``None`` leaves the file out. Every call makes a new base dir, so one test may build
several trees.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import pytest

TESTS_DIR = Path(__file__).resolve().parent
RESEARCH_TREE = TESTS_DIR / "data" / "sagemaker_research_tree"

# Variables a platform or trainenv sets; a child process must not inherit them from CI.
PLATFORM_PREFIXES = ("TRAINENV_", "SM_", "SAGEMAKER_", "PAI_", "AIP_", "PET_")
PLATFORM_NAMES = frozenset(
    {
        "TF_CONFIG", "CLUSTER_SPEC", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
        "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "NODE_RANK",
        "NNODES", "NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
        "TRAINING_JOB_NAME", "CURRENT_HOST",
    }
)

Content = Union[Mapping[str, Any], Sequence[Any], str, bytes, None]

FAKE_PYNVML = '''\
"""A fake pynvml (tests only; this machine has no GPU): FAKE_NVML_GPUS GPUs, default 2."""
import os

NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, total):
        self.total = total


class _Handle:
    def __init__(self, index):
        self.index = index


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return int(os.environ.get("FAKE_NVML_GPUS", "2"))


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError("Invalid Argument")
    return _Handle(index)


def nvmlDeviceGetUUID(handle):
    return "GPU-%08d-1111-2222-3333-444444444444" % handle.index


def nvmlDeviceGetName(handle):
    return "Fake GPU 80GB"


def nvmlDeviceGetMemoryInfo(handle):
    return _Memory(80 * 1024 ** 3)


def nvmlDeviceGetMigMode(handle):
    raise NVMLError("Not Supported")
'''


def _encode(content: Content) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    return json.dumps(content).encode("utf-8")


@pytest.fixture
def job_tree(tmp_path: Path) -> Callable[..., Path]:
    """``make(...)``: a job tree in trainenv's layout (CONTRACT §1), returned as its base dir.

    Parts: ``hyperparameters``, ``input_data_config``, ``resource_config`` (the three
    ``input/config`` JSON files), ``channels`` (dirs under ``input/data``, each with one file),
    ``output_channels`` (extra dirs under ``output``), ``settings`` (``input/config/trainenv.yaml``
    text), ``code`` (``usercode`` files) and ``files`` (any path relative to the base dir).
    """
    counter = [0]

    def make(
        hyperparameters: Content = None,
        input_data_config: Content = None,
        resource_config: Content = None,
        channels: Iterable[str] = (),
        output_channels: Iterable[str] = (),
        settings: Optional[str] = None,
        code: Optional[Mapping[str, str]] = None,
        files: Optional[Mapping[str, Union[str, bytes]]] = None,
        name: str = "ml",
    ) -> Path:
        counter[0] += 1
        base = tmp_path / (name if counter[0] == 1 else f"{name}-{counter[0]}")
        config = base / "input" / "config"
        config.mkdir(parents=True)
        (base / "input" / "data").mkdir()
        (base / "usercode").mkdir()
        (base / "output" / "model").mkdir(parents=True)
        for filename, content in (
            ("hyperparameters.json", hyperparameters),
            ("inputdataconfig.json", input_data_config),
            ("resourceconfig.json", resource_config),
        ):
            if content is not None:
                (config / filename).write_bytes(_encode(content))
        for channel in channels:
            directory = base / "input" / "data" / channel
            directory.mkdir()
            (directory / "part-0000").write_text("1,2\n")
        for channel in output_channels:
            (base / "output" / channel).mkdir()
        if settings is not None:
            (config / "trainenv.yaml").write_text(settings)
        for filename, text in (code or {}).items():
            (base / "usercode" / filename).write_text(text)
        for relative, content in (files or {}).items():
            path = base / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(content))
        return base

    return make


@pytest.fixture
def research_tree(tmp_path: Path) -> Path:
    """A private copy of the research notes' fake SageMaker job (§3.8), in trainenv's layout."""
    base = tmp_path / "research-ml"
    shutil.copytree(RESEARCH_TREE, base)
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


@pytest.fixture
def tree_state() -> Callable[[Path], dict]:
    return tree_state_of


@pytest.fixture
def clean_environ() -> dict:
    """``os.environ`` less platform variables and secret-named ones (``trainenv env`` scrubs those values)."""
    from trainenv.redact import is_secret_name

    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(PLATFORM_PREFIXES) and k not in PLATFORM_NAMES and not is_secret_name(k)
    }


def trainenv_command() -> list:
    """The console script installed next to this interpreter, else ``python -m trainenv``."""
    script = Path(sys.executable).parent / "trainenv"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trainenv"]


@pytest.fixture
def run_trainenv(clean_environ: dict) -> Callable[..., subprocess.CompletedProcess]:
    """``run(*args, env=None, extra_env=None, cwd=None, prefix=())``: the real command, text output."""

    def run(
        *args: str,
        env: Optional[Mapping[str, str]] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        cwd: Optional[Path] = None,
        prefix: Sequence[str] = (),
    ) -> subprocess.CompletedProcess:
        environ = dict(clean_environ if env is None else env)
        environ.update(extra_env or {})
        return subprocess.run(
            [*prefix, *trainenv_command(), *args],
            env=environ,
            cwd=str(cwd) if cwd is not None else None,
            capture_output=True,
            text=True,
            errors="surrogateescape",
            timeout=120,
        )

    return run


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fake-pynvml")
    (directory / "pynvml.py").write_text(FAKE_PYNVML)
    # This machine has no NVIDIA driver, so trainenv would not even import pynvml: preload the
    # fake one, as a process on a GPU machine would find the real one.
    (directory / "sitecustomize.py").write_text("import pynvml  # noqa: F401\n")
    return directory


@pytest.fixture
def fake_nvml(fake_nvml_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fake ``pynvml`` as ``sys.modules["pynvml"]``, with trainenv's hardware cache emptied."""
    spec = importlib.util.spec_from_file_location("pynvml", fake_nvml_dir / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    from trainenv import environment

    monkeypatch.setattr(environment, "_hardware", {})
    return module
