"""Helpers for tests that run a real ``trainenv train`` on a temporary job tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

TRAINENV = str(Path(sys.executable).with_name("trainenv"))


def make_tree(base: Path, files: Mapping[str, str] = {}, hyperparameters: Optional[dict] = None) -> Path:
    """A PAI-style tree under ``base``: ``usercode/`` with ``files``, and a config dir."""
    (base / "usercode").mkdir(parents=True, exist_ok=True)
    (base / "input" / "config").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = base / "usercode" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if hyperparameters is not None:
        (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    return base


def job_environ(base: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINENV_", "PAI_", "SM_"))}
    env.update(TRAINENV_BASE_DIR=str(base), TRAINENV_RUN_DIR=str(base / "run"))
    env.update(extra)
    return env


def run_train(base: Path, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TRAINENV, "train", *args], env=job_environ(base, **extra), capture_output=True, timeout=timeout
    )


def start_train(base: Path, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [TRAINENV, "train", *args], env=job_environ(base, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def failure(base: Path) -> str:
    return (base / "output" / "failure").read_text()
