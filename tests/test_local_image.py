"""``trainenv local --image``: the job in real containers (podman), and ``trainenv local --env``.

The container tests (``-m container``) build one image for the session (``image_support``:
offline, all podman state in a temp dir that ``podman system reset`` removes) and skip with the
reason where podman cannot run a container. They never use a bridge network: multi-node runs
use ``--network loopback`` (every node in one holder container's network namespace, no
outside network); the bridge route and GPU passing are checked through ``--dry-run`` argv.
A second image, with torch CPU (``build_torch_image``: skips with the reason when there is no
torch wheel on disk), runs a real 2-node torchrun job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from image_support import Podman, PodmanUnavailable, build_torch_image, offline_image
from support import TRAINENV, clean_environ, run_trainenv, tree_state_of, write_script

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/trainenv-local-test:cpu"
TORCH_IMAGE = "localhost/trainenv-local-test:torch"
REPORT = re.compile(r"REPORT (\{.*\})")


class Engine:
    """The session's podman, as ``TRAINENV_CONTAINER_ENGINE`` names it (its own state dir)."""

    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self.variable = shlex.join([str(podman.executable), *podman.state_args])

    def environ(self, **extra: str) -> Dict[str, str]:
        return clean_environ(TRAINENV_CONTAINER_ENGINE=self.variable, TMPDIR=self.podman.env["TMPDIR"], **extra)

    def left(self) -> List[str]:
        """Every container and network trainenv labelled, in any state."""
        containers = self.podman("ps", "-a", "-q", "--filter", "label=trainenv.run").stdout.split()
        networks = self.podman("network", "ls", "-q", "--filter", "label=trainenv.run").stdout.split()
        return containers + networks


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    try:
        with offline_image("trainenv-local-image-", REPO, IMAGE) as podman:
            yield Engine(podman)
    except PodmanUnavailable as exc:
        pytest.skip(str(exc))


TRAIN_PY = """\
import json, os, sys
channel = os.environ["TRAINENV_CHANNEL_TRAIN"]
try:
    open(os.path.join(channel, "written"), "w").close()
    writable = True
except OSError:
    writable = False
with open(os.path.join(os.environ["TRAINENV_MODEL_DIR"], "model.txt"), "w") as f:
    f.write("weights\\n")
print("REPORT " + json.dumps({
    "argv": sys.argv[1:], "data": open(os.path.join(channel, "data.csv")).read(),
    "input_writable": writable, "my_var": os.environ.get("MY_VAR"),
    "token": os.environ.get("HF_TOKEN"), "max_run": os.environ.get("TRAINENV_MAX_RUN_SECONDS"),
}), flush=True)
sys.exit(3)
"""


def _script(path: Path, text: str, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_script(path, text, executable=executable)


def _job(tmp_path: Path, name: str, text: str) -> Path:
    source = tmp_path / "src"
    _script(source / name, text)
    return source


@pytest.mark.container
def test_single_node_run_in_the_image(engine: Engine, tmp_path: Path) -> None:
    source = _job(tmp_path, "train.py", TRAIN_PY)
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.csv").write_text("x,label\n1,0\n")
    before = tree_state_of(source), tree_state_of(data)
    proc = run_trainenv(
        "local", "--image", IMAGE, "--source-dir", str(source), "--entry-point", "train.py",
        "--input", f"train={data}", "--hp", "lr=0.1", "--env", "MY_VAR=hello world",
        "--env", "HF_TOKEN=s3cr3t-value", "--max-run-seconds", "600", "--network", "loopback",
        env=engine.environ(), cwd=tmp_path, timeout=180,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    report = json.loads(REPORT.search(proc.stdout).group(1))  # type: ignore[union-attr]
    assert report == {
        "argv": ["--lr", "0.1"], "data": "x,label\n1,0\n", "input_writable": False,
        "my_var": "hello world", "token": "s3cr3t-value", "max_run": "600",
    }
    assert "s3cr3t-value" not in proc.stderr
    output = Path(re.search(r"output dir: (\S+)", proc.stderr).group(1))  # type: ignore[union-attr]
    assert (output / "model" / "model.txt").read_text() == "weights\n"  # kept on the host
    assert (output / "failure").read_text().startswith("UserError")
    assert (tree_state_of(source), tree_state_of(data)) == before  # never written to
    assert engine.left() == []


TWO_NODES_PY = """\
import json, os, socket, sys
config = json.load(open("/ml/input/config/resourceconfig.json"))
print("REPORT " + json.dumps({
    "current_host": config["current_host"], "hosts": config["hosts"],
    "rank": os.environ["TRAINENV_NODE_RANK"], "nodes": os.environ["TRAINENV_NUM_NODES"],
    "hostname": socket.gethostname(), "master": socket.gethostbyname(os.environ["MASTER_ADDR"]),
}), flush=True)
open(os.path.join(os.environ["TRAINENV_MODEL_DIR"], "rank"), "w").write(os.environ["TRAINENV_NODE_RANK"])
sys.exit(4 + int(os.environ["TRAINENV_NODE_RANK"]))
"""


@pytest.mark.container
def test_two_nodes_in_two_containers(engine: Engine, tmp_path: Path) -> None:
    """No torch or MPI in the test image: each node reports its own resourceconfig and rank;
    node 1's exit status (4) is the command's, node 2's is 5."""
    source = _job(tmp_path, "two.py", TWO_NODES_PY)
    proc = run_trainenv(
        "local", "--image", IMAGE, "--source-dir", str(source), "--entry-point", "two.py",
        "--nodes", "2", "--network", "loopback", env=engine.environ(), cwd=tmp_path, timeout=180,
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr
    reports = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"\[node-(\d)\] REPORT (\{.*\})$", line)
        if match:
            reports[match.group(1)] = json.loads(match.group(2))
    assert reports == {
        str(i + 1): {"current_host": f"algo-{i + 1}", "hosts": ["algo-1", "algo-2"], "rank": str(i),
                     "nodes": "2", "hostname": f"algo-{i + 1}", "master": "127.0.0.1"}
        for i in range(2)
    }
    job_dir = Path(re.search(r"job dir: +(\S+)", proc.stderr).group(1))  # type: ignore[union-attr]
    assert (job_dir / "output" / "model" / "rank").read_text() == "0"
    assert (job_dir / "nodes" / "algo-2" / "output" / "model" / "rank").read_text() == "1"
    assert engine.left() == []


@pytest.fixture(scope="session")
def torch_image(engine: Engine) -> str:
    """The test image with torch CPU installed from the wheel on disk (skips with the reason)."""
    start = time.monotonic()
    try:
        build_torch_image(engine.podman, Path(engine.podman.env["TMPDIR"]), IMAGE, TORCH_IMAGE)
    except PodmanUnavailable as exc:
        pytest.skip(str(exc))
    print(f"torch image built in {time.monotonic() - start:.0f} s")
    return TORCH_IMAGE


ALL_REDUCE_PY = """\
import json, os, socket
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value.item(),
          "host": socket.gethostname()}
with open(os.path.join(os.environ["TRAINENV_MODEL_DIR"], "result.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


@pytest.mark.container
def test_torchrun_all_reduce_across_two_containers(engine: Engine, torch_image: str, tmp_path: Path) -> None:
    """A real 2-node torchrun job (1 process per node): a gloo all_reduce over the nodes' shared
    loopback gives both ranks 1 + 2."""
    source = _job(tmp_path, "reduce.py", ALL_REDUCE_PY)
    job_dir = tmp_path / "job"
    proc = run_trainenv(
        "local", "--image", torch_image, "--source-dir", str(source), "--entry-point", "reduce.py",
        "--job-dir", str(job_dir), "--nodes", "2", "--network", "loopback", "--distribution", "torchrun",
        "--nproc-per-node", "1", env=engine.environ(), cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads((job_dir / "output" / "model" / "result.json").read_text()),
               json.loads((job_dir / "nodes" / "algo-2" / "output" / "model" / "result.json").read_text())]
    assert results == [{"rank": rank, "world": 2, "sum": 3.0, "host": f"algo-{rank + 1}"} for rank in range(2)]
    assert engine.left() == []


SLOW_PY = """\
import os, signal, sys, time
def checkpoint(signum, frame):
    open(os.path.join(os.environ["TRAINENV_CHECKPOINT_DIR"], "ckpt"), "w").write(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, checkpoint)
open(os.path.join(os.environ["TRAINENV_CHECKPOINT_DIR"], "started"), "w").close()
time.sleep(120)
"""


@pytest.mark.container
def test_sigterm_stops_and_removes_every_container(engine: Engine, tmp_path: Path) -> None:
    source = _job(tmp_path, "slow.py", SLOW_PY)
    job_dir = tmp_path / "job"
    proc = subprocess.Popen(
        [*TRAINENV, "local", "--image", IMAGE, "--source-dir", str(source), "--entry-point", "slow.py",
         "--job-dir", str(job_dir), "--nodes", "2", "--network", "loopback", "--grace-seconds", "5"],
        env=engine.environ(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        started = [job_dir / "output" / "checkpoints" / "started",
                   job_dir / "nodes" / "algo-2" / "output" / "checkpoints" / "started"]
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in started) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(path.exists() for path in started), proc.communicate(timeout=60)
        assert len(engine.podman("ps", "-q", "--filter", "label=trainenv.run").stdout.split()) == 3  # holder + 2
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, out + err
    assert (job_dir / "output" / "checkpoints" / "ckpt").read_text() == "15"  # the job got its grace
    assert engine.left() == []


@pytest.mark.container
def test_engine_failing_halfway_leaves_nothing(engine: Engine, tmp_path: Path) -> None:
    """The engine refuses node 2's container: node 1's and the holder are removed, exit 78."""
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "podman", f"""#!/bin/sh
case "$*" in
    *" create "*"--name trainenv-"*"-algo-2"*) echo "Error: no space left on device" >&2; exit 125 ;;
esac
exec {engine.variable} "$@"
""", executable=True)
    source = _job(tmp_path, "two.py", TWO_NODES_PY)
    proc = run_trainenv(
        "local", "--image", IMAGE, "--source-dir", str(source), "--entry-point", "two.py",
        "--nodes", "2", "--network", "loopback", cwd=tmp_path, timeout=180,
        env=dict(engine.environ(), TRAINENV_CONTAINER_ENGINE=str(bin_dir / "podman")),
    )
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("-algo-2: Error: no space left on device")
    assert engine.left() == []


@pytest.mark.container
def test_image_that_does_not_exist(engine: Engine, tmp_path: Path) -> None:
    source = _job(tmp_path, "train.py", "")
    proc = run_trainenv("local", "--image", "localhost/no-such-image:1", "--source-dir", str(source),
                        env=engine.environ(), cwd=tmp_path)
    assert proc.returncode == 78
    assert proc.stderr.count("\n") == 1 and "'localhost/no-such-image:1'" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no job dir
    assert engine.left() == []


# --- no engine needed ---------------------------------------------------------------------------


def test_missing_input_starts_nothing(tmp_path: Path) -> None:
    engine_log = tmp_path / "engine.log"
    _script(tmp_path / "bin" / "podman", f"#!/bin/sh\necho \"$*\" >> {engine_log}\n", executable=True)
    proc = run_trainenv("local", "--image", "img", "--input", f"train={tmp_path / 'nope'}", cwd=tmp_path,
                        env=clean_environ(TRAINENV_CONTAINER_ENGINE=str(tmp_path / "bin" / "podman")))
    assert proc.returncode == 78
    assert proc.stderr == f"trainenv: ConfigError: --input: train: '{tmp_path / 'nope'}' does not exist\n"
    assert not engine_log.exists() and sorted(os.listdir(tmp_path)) == ["bin"]


@pytest.mark.parametrize("how", ["variable", "path"])
def test_engine_missing(tmp_path: Path, how: str) -> None:
    if how == "variable":
        env = clean_environ(TRAINENV_CONTAINER_ENGINE="/nonexistent")
        expected = "TRAINENV_CONTAINER_ENGINE: '/nonexistent' is not an executable on PATH"
    else:
        env = {k: v for k, v in clean_environ().items() if k != "TRAINENV_CONTAINER_ENGINE"}
        env["PATH"] = str(tmp_path)  # neither docker nor podman
        expected = "no container engine answers (docker: not on PATH; podman: not on PATH)"
    proc = run_trainenv("local", "--image", "img", cwd=tmp_path, env=env)
    assert proc.returncode == 78
    assert proc.stderr.startswith(f"trainenv: ConfigError: {expected}") and proc.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


def _dry_run(tmp_path: Path, engine_name: str, *args: str) -> List[List[str]]:
    """The engine command lines ``--dry-run`` prints, with a stand-in engine that does not answer."""
    fake = _script(tmp_path / "bin" / engine_name, "#!/bin/sh\nexit 1\n", executable=True)
    proc = run_trainenv("local", "--image", "img:1", "--dry-run", "--job-dir", str(tmp_path / "job"), *args,
                        cwd=tmp_path, env=clean_environ(TRAINENV_CONTAINER_ENGINE=str(fake)))
    assert proc.returncode == 0, proc.stderr
    assert "does not answer: assuming img:1 has an ENTRYPOINT" in proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _option(argv: List[str], flag: str) -> List[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == flag]


@pytest.mark.parametrize("engine_name, gpus, expected", [
    ("docker", "all", [["--gpus", "all"]]),
    ("docker", "2", [["--gpus", "2"], ["--gpus", '"device=2,3"']]),
    ("podman", "all", [["--device", "nvidia.com/gpu=all"]]),
    ("podman", "2", [["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1"],
                     ["--device", "nvidia.com/gpu=2", "--device", "nvidia.com/gpu=3"]]),
])
def test_dry_run_passes_gpus(tmp_path: Path, engine_name: str, gpus: str, expected: List[List[str]]) -> None:
    lines = _dry_run(tmp_path, engine_name, "--gpus", gpus, "--nodes", str(len(expected)))
    creates = [argv for argv in lines if "create" in argv and "--hostname" in argv]
    assert len(creates) == len(expected)
    for argv, flags in zip(creates, expected):
        found = [argv[i:i + 2] for i, word in enumerate(argv) if word in ("--gpus", "--device")]
        assert [word for pair in found for word in pair] == flags


def test_dry_run_bridge_network_for_two_nodes(tmp_path: Path) -> None:
    lines = _dry_run(tmp_path, "docker", "--nodes", "2", "--entry-point", "train.py",
                     "--env", "HF_TOKEN=s3cr3t", "--env", "A=b c", "--source", "https://me:pw123@git.example/r.git",
                     "--", "--epochs", "2")
    assert "s3cr3t" not in str(lines) and "pw123" not in str(lines)
    assert lines[0][1:3] == ["network", "create"]
    network = lines[0][-1]
    assert re.fullmatch(r"trainenv-[0-9a-f]{12}", network)
    creates, starts = lines[1:3], lines[3:]
    for index, argv in enumerate(creates):
        host = f"algo-{index + 1}"
        assert _option(argv, "--network") == [network] and _option(argv, "--network-alias") == [host]
        assert _option(argv, "--hostname") == [host]
        assert _option(argv, "--label") == [f"trainenv.run={network[len('trainenv-'):]}"]
        env = _option(argv, "-e")
        # the secret's value and the URL's credentials: never on the command line
        assert env == ["HF_TOKEN", "A=b c", "TRAINENV_ENTRY_POINT=train.py", "TRAINENV_SOURCE"]
        mounts = {spec.split(":")[1]: spec for spec in _option(argv, "-v")}
        assert mounts["/ml/input/config/resourceconfig.json"] == (
            f"{tmp_path / 'job' / 'nodes' / host / 'resourceconfig.json'}:/ml/input/config/resourceconfig.json:ro")
        assert argv[-5:] == ["img:1", "train", "--", "--epochs", "2"]
    assert [argv[-3:] for argv in starts] == [["start", "--attach", creates[i][creates[i].index("--name") + 1]]
                                              for i in range(2)]
    config = json.loads((tmp_path / "job" / "nodes" / "algo-2" / "resourceconfig.json").read_text())
    assert config == {"current_host": "algo-2", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes: '0': expected a number from 1 to 64"),
    (["--network", "overlay"], "--network: 'overlay': expected one of bridge, shared, loopback"),
    (["--gpus", "two"], "--gpus: 'two': expected all or a positive number"),
])
def test_bad_container_options(tmp_path: Path, args: List[str], message: str) -> None:
    proc = run_trainenv("local", "--image", "img", *args, cwd=tmp_path,
                        env=clean_environ(TRAINENV_CONTAINER_ENGINE="/nonexistent"))
    assert (proc.returncode, proc.stderr) == (78, f"trainenv: ConfigError: {message}\n")


def test_local_env_reaches_the_job_without_an_image(tmp_path: Path) -> None:
    proc = run_trainenv("local", "--env", "MY_VAR=from --env", "--command", 'echo "MY_VAR=$MY_VAR"',
                        cwd=tmp_path, env=clean_environ())
    assert proc.returncode == 0, proc.stderr
    assert "MY_VAR=from --env" in proc.stdout


def test_bridge_falls_back_to_shared_when_the_engine_cannot_make_a_network(tmp_path: Path) -> None:
    """A stand-in engine (every call logged) that cannot create networks: the run says so, goes
    on in the shared mode, and removes what it created."""
    log = tmp_path / "calls.log"
    fake = _script(tmp_path / "bin" / "podman", f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in
    *"network create"*) echo "Error: netavark: iptables is not installed" >&2; exit 125 ;;
    *"start --attach"*) echo "ran"; exit 0 ;;
esac
exit 0
""", executable=True)
    proc = run_trainenv("local", "--image", "img:1", "--nodes", "2", "--job-dir", str(tmp_path / "job"),
                        cwd=tmp_path, env=clean_environ(TRAINENV_CONTAINER_ENGINE=str(fake)))
    assert proc.returncode == 0, proc.stderr
    assert "cannot create a bridge network (Error: netavark: iptables is not installed): using --network shared" \
        in proc.stderr
    calls = []
    for line in log.read_text().splitlines():
        words = line.split()
        while words[0].startswith("--"):  # the host flags trainenv added: pairs
            words = words[2:]
        calls.append(words)
    assert [call[0] for call in calls] == ["image", "network", "create", "create", "create", "start", "start",
                                           "start", "rm", "rm", "rm", "network"]
    holder = [call for call in calls if "create" in call and "--entrypoint" in call]
    assert len(holder) == 1
    holder_name = holder[0][holder[0].index("--name") + 1]
    nodes = [call for call in calls if "create" in call and "--hostname" in call]
    assert [_option(call, "--network") for call in nodes] == [[f"container:{holder_name}"]] * 2
    removed = [call[-1] for call in calls if call[:2] == ["rm", "-f"]]
    assert sorted(removed) == sorted([holder_name, *(node[node.index("--name") + 1] for node in nodes)])
    assert sorted(proc.stdout.splitlines()) == ["[node-1] ran", "[node-2] ran"]
    for host in ("algo-1", "algo-2"):  # rewritten for the shared mode before any container
        config = json.loads((tmp_path / "job" / "nodes" / host / "resourceconfig.json").read_text())
        assert config["network_interface_name"] == "lo"


@pytest.mark.parametrize("network, interface", [("bridge", "eth0"), ("shared", "lo"), ("loopback", "lo")])
def test_resourceconfig_names_the_interface_the_nodes_share(tmp_path: Path, network: str, interface: str) -> None:
    """In the shared modes the nodes reach each other on the loopback (the loopback mode has no
    eth0): gloo, NCCL and Open MPI are pointed at ``lo``."""
    _dry_run(tmp_path, "podman", "--nodes", "2", "--network", network)
    configs = [tmp_path / "job" / "input" / "config" / "resourceconfig.json",
               *(tmp_path / "job" / "nodes" / f"algo-{i}" / "resourceconfig.json" for i in (1, 2))]
    assert [json.loads(path.read_text())["network_interface_name"] for path in configs] == [interface] * 3


@pytest.mark.container
def test_source_archive_and_an_image_without_entrypoint(engine: Engine, tmp_path: Path) -> None:
    """``--source code.tar.gz`` is mounted for trainenv in the container to extract; an image with
    no ENTRYPOINT runs ``trainenv train`` itself."""
    import tarfile

    context = tmp_path / "context"
    _script(context / "Dockerfile", f"FROM {IMAGE}\nENTRYPOINT []\nCMD []\n")
    engine.podman("build", "--pull=never", "--network", "none", *engine.podman.limits,
                  "-t", "localhost/trainenv-no-entrypoint:cpu", str(context))
    inspected = engine.podman("image", "inspect", "--format", "{{json .Config.Entrypoint}}",
                              "localhost/trainenv-no-entrypoint:cpu").stdout.strip()
    assert inspected in ("null", "[]")
    code = _job(tmp_path, "job.py", "import sys\nprint('REPORT {\"from\": \"archive\"}')\nsys.exit(7)\n")
    with tarfile.open(tmp_path / "code.tar.gz", "w:gz") as tar:
        tar.add(code / "job.py", "job.py")
    for image, command in ((IMAGE, ["train"]), ("localhost/trainenv-no-entrypoint:cpu", ["trainenv", "train"])):
        proc = run_trainenv("local", "--image", image, "--dry-run", env=engine.environ(), cwd=tmp_path)
        creates = [shlex.split(line) for line in proc.stdout.splitlines() if " create " in line]
        assert creates[0][-len(command) - 1:] == [image, *command], proc.stdout + proc.stderr
        proc = run_trainenv("local", "--image", image, "--source", str(tmp_path / "code.tar.gz"),
                            "--entry-point", "job.py", "--network", "loopback",
                            env=engine.environ(), cwd=tmp_path, timeout=180)
        assert proc.returncode == 7, proc.stdout + proc.stderr
        assert 'REPORT {"from": "archive"}' in proc.stdout
    assert engine.left() == []


def test_dry_run_picks_the_engine_a_real_run_would(tmp_path: Path) -> None:
    """docker first on PATH but not answering, podman answering: the dry run prints podman
    command lines, as a real run would use podman (it said docker before)."""
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "docker", "#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n", executable=True)
    _script(bin_dir / "podman", "#!/bin/sh\n"
            'for arg in "$@"; do case "$arg" in version) exit 0;; inspect) echo \'["/entry"]\'; exit 0;; esac; done\n'
            "exit 1\n", executable=True)
    environ = clean_environ()
    environ["PATH"] = f"{bin_dir}{os.pathsep}{environ.get('PATH', os.defpath)}"
    proc = run_trainenv("local", "--image", "img:1", "--dry-run", "--job-dir", str(tmp_path / "job"),
                        cwd=tmp_path, env=environ)
    assert proc.returncode == 0, proc.stderr
    assert "does not answer" not in proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines and all(argv[0] == str(bin_dir / "podman") for argv in lines), proc.stdout
