"""Shared fixtures: thin wrappers over the helpers in ``support.py``.

| fixture           | gives |
|-------------------|-------|
| ``job_tree``      | ``make(**parts) -> Path``: ``support.make_tree`` under ``tmp_path`` (a new base dir each call, with ``input/data`` and ``output/model``) |
| ``research_tree`` | a fresh copy of ``tests/data/sagemaker_research_tree`` (a fake SageMaker job as the platform lays it out) |
| ``tree_state``    | ``support.tree_state_of``: equal before/after = nothing created, changed or deleted |
| ``clean_environ`` | ``support.clean_environ()``: ``os.environ`` without platform, cluster or secret-named variables |
| ``run_trainenv``  | ``support.run_trainenv``: ``run(*args, env=, extra_env=, cwd=, prefix=) -> CompletedProcess`` (text) |
| ``fake_nvml_dir`` | a directory holding a fake ``pynvml`` module (``FAKE_NVML_GPUS`` GPUs, default 2), preloaded by a ``sitecustomize``; put it on ``PYTHONPATH`` |
| ``fake_nvml``     | that module as ``sys.modules["pynvml"]`` for in-process tests (trainenv's hardware cache emptied) |
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

import support

RESEARCH_TREE = support.TESTS_DIR / "data" / "sagemaker_research_tree"
FAKE_PYNVML = support.TESTS_DIR / "data" / "fake_pynvml.py"


@pytest.fixture
def job_tree(tmp_path: Path) -> Callable[..., Path]:
    """``make(name="ml", **parts)``: ``support.make_tree`` at ``tmp_path/name`` (``name-2``, ... on later calls)."""
    counter = [0]

    def make(name: str = "ml", **parts: Any) -> Path:
        counter[0] += 1
        base = tmp_path / (name if counter[0] == 1 else f"{name}-{counter[0]}")
        base.mkdir()
        return support.make_tree(base, dirs=("input/data", "output/model"), **parts)

    return make


@pytest.fixture
def research_tree(tmp_path: Path) -> Path:
    """A private copy of the fake SageMaker job in ``tests/data``."""
    base = tmp_path / "research-ml"
    shutil.copytree(RESEARCH_TREE, base)
    return base


@pytest.fixture
def tree_state() -> Callable[[Path], dict]:
    return support.tree_state_of


@pytest.fixture
def clean_environ() -> dict:
    return support.clean_environ()


@pytest.fixture
def run_trainenv() -> Callable[..., Any]:
    return support.run_trainenv


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fake-pynvml")
    shutil.copy(FAKE_PYNVML, directory / "pynvml.py")
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
