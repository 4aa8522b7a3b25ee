"""``import trainenv`` is cheap and has no side effects; the start paths import little.

In fresh interpreters: which heavy modules get imported, which files get opened (under
``strace`` when the machine has it), whether anything is created, spawned or exported.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import support

HEAVY = ("click", "yaml", "psutil", "pynvml")
HOT_PATH = (
    "trainenv",
    "trainenv.errors",
    "trainenv.redact",
    "trainenv.layout",
    "trainenv.frozen",
    "trainenv.config",
    "trainenv.exports",
    "trainenv.settings",
    "trainenv.environment",
    "trainenv.cli",
)


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINENV_", "PYTHON"))}
    # Python's own bytecode cache is not trainenv's doing; keep it out of the picture.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def python(code: str, cwd: Path, **extra: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=child_env(**extra), capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("module", HOT_PATH)
def test_import_loads_no_heavy_module(tmp_path, module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    assert python(code, tmp_path).strip() == ""


def test_import_creates_nothing_and_sets_no_variable(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    code = (
        "import os, json; before = dict(os.environ)\n"
        "import trainenv\n"
        "from trainenv import ConfigError, TrainingEnv\n"
        "print(json.dumps(dict(os.environ) == before))"
    )
    assert python(code, cwd, HOME=str(home)).strip() == "true"
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


def test_building_a_snapshot_sets_no_variable(research_tree, monkeypatch):
    from trainenv.environment import build_training_env
    from trainenv.exports import to_env_vars

    monkeypatch.setenv("TRAINENV_BASE_DIR", str(research_tree))
    before = dict(os.environ)
    to_env_vars(build_training_env(), ("pai", "sagemaker", "vertex"))
    assert dict(os.environ) == before


def test_lazy_public_names():
    import trainenv

    for name in trainenv.__all__:
        assert getattr(trainenv, name) is not None
    from trainenv.environment import TrainingEnv, training_env
    from trainenv.errors import ConfigError

    assert trainenv.TrainingEnv is TrainingEnv and trainenv.training_env is training_env
    assert trainenv.ConfigError is ConfigError
    with pytest.raises(AttributeError):
        trainenv.no_such_name  # noqa: B018
    assert trainenv.__version__ == importlib.metadata.version("trainenv")


# ---------------------------------------------------------------------------------------
# strace: every file the import opens, and every directory or process it makes

SYSCALLS = "openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,execve,fork,vfork"
_OPEN = re.compile(r'^\d+\s+(open|openat)\((?:AT_FDCWD, )?"(?P<path>[^"]*)", (?P<flags>[A-Z_|0-9]+)')
_CALL = re.compile(r"^\d+\s+(?P<call>[a-z0-9_]+)\(")


def strace(code: str, cwd: Path, out: Path) -> list:
    subprocess.run(
        ["strace", "-f", "-qq", "-e", f"trace={SYSCALLS}", "-o", str(out), sys.executable, "-c", code],
        cwd=cwd, env=child_env(), check=True, capture_output=True,
    )
    return out.read_text().splitlines()


def opened(lines: list) -> list:
    found = []
    for line in lines:
        match = _OPEN.match(line)
        if match and "ENOENT" not in line and "ENOTDIR" not in line:
            found.append((match.group("path"), match.group("flags")))
    return found


def strace_works(tmp_path: Path) -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-qq", "-o", str(tmp_path / "probe.txt"), "true"], capture_output=True)
    return probe.returncode == 0


def test_import_under_strace_opens_only_python_files(tmp_path):
    if not strace_works(tmp_path):
        pytest.skip("strace is not installed or cannot trace here (apt-get install strace)")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    baseline = opened(strace("pass", cwd, tmp_path / "baseline.txt"))
    lines = strace("import trainenv", cwd, tmp_path / "import.txt")
    info = json.loads(python("import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix] + sys.path))", cwd))
    roots = {os.path.realpath(p or str(cwd)) for p in info} | {os.path.abspath(p or str(cwd)) for p in info}
    roots.discard("/")

    startup = {path for path, _ in baseline}
    new = [(path, flags) for path, flags in opened(lines) if path not in startup]
    assert any(re.search(r"/trainenv/(__pycache__/)?__init__\.(py|cpython-\d+\.pyc)$", path) for path, _ in new)
    outside = [path for path, _ in new if not any(path == r or path.startswith(r + os.sep) for r in roots)]
    assert outside == [], f"opened outside python's prefix and sys.path: {outside}"
    writes = [(path, flags) for path, flags in opened(lines) if re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", flags)]
    assert writes == []
    calls = [m.group("call") for m in map(_CALL.match, lines) if m]
    assert calls.count("execve") == 1, "the interpreter itself, nothing else"
    for call in ("creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "fork", "vfork"):
        assert call not in calls, [line for line in lines if line.split()[1].startswith(call + "(")]
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------------------
# typing: annotations only need it under TYPE_CHECKING, so the start paths never import it


def imported_modules(stderr: str) -> set:
    """The modules ``python -X importtime`` reported importing, from its stderr."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_train_start_path_imports_no_typing_and_no_heavy_module(tmp_path):
    base = support.make_tree(tmp_path / "job", code={"train.py": "print('trained')\n"})
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainenv", "train"],
        env=support.job_environ(base, TRAINENV_ENTRY_POINT="train.py"),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "trained" in result.stdout
    modules = imported_modules(result.stderr)
    assert {"trainenv.runner", "trainenv.supervisor", "trainenv.plan"} <= modules
    assert modules & {"typing", *HEAVY} == set()


# What the launcher's ~30 ms would otherwise go to: a path object library, a process library
# (threads, locale), the foreign-function library for one prctl call, the selector classes.
NOT_ON_TRAIN_PATH = ("pathlib", "subprocess", "threading", "ctypes", "selectors", "urllib.parse", "ipaddress")


@pytest.mark.parametrize("entry", ["train.py", None])
def test_train_start_path_needs_no_pathlib_subprocess_or_ctypes(tmp_path, entry):
    base = support.make_tree(tmp_path / "job", code={"train.py": "print('trained')\n"})
    extra = {"TRAINENV_ENTRY_POINT": entry} if entry else {}  # None: a ConfigError ends the launch
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainenv", "train"],
        env=support.job_environ(base, **extra), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == (0 if entry else 78), result.stderr
    assert "trainenv.runner" in imported_modules(result.stderr)
    assert imported_modules(result.stderr) & set(NOT_ON_TRAIN_PATH) == set()


def test_training_env_in_a_job_imports_json_and_little_else(tmp_path):
    """Inside a job ``training_env()`` loads the snapshot: no layout, no path or import machinery."""
    base = support.make_tree(tmp_path / "job", code={"train.py": "pass\n"})
    snapshot = tmp_path / "env.json"
    snapshot.write_text(support.build_env(base).to_json())
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import trainenv; print(trainenv.training_env().base_dir)"],
        env=child_env(TRAINENV_ENV_FILE=str(snapshot)), capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.strip() == str(base)
    modules = imported_modules(result.stderr)
    assert "json" in modules
    assert modules & {"pathlib", "importlib", "warnings", "encodings.utf_8_sig", "trainenv.layout", "trainenv.resources", "typing"} == set()


def test_serving_start_path_imports_no_typing(tmp_path):
    base = support.make_base(tmp_path, "def model_fn(model_dir):\n    return None\n\ndef predict_fn(data, model):\n    return data\n")
    server = support.Server(base, {}, argv=[sys.executable, "-X", "importtime", "-m", "trainenv.serving"])
    try:
        server.wait_ready()
        status, _, body = server.post(b'{"x": [1, 2]}')
        assert (status, json.loads(body)) == (200, {"x": [1, 2]})
    finally:
        assert server.stop() == 0
    modules = imported_modules(server.log)
    assert {"trainenv.serving.app", "trainenv.serving.servers.stdlib", "trainenv.serving.handler"} <= modules
    assert "typing" not in modules
