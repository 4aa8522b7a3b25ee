"""What users see of the launch plan, pinned for every settings source.

For each source of a setting (a ``trainenv train`` option, a ``TRAINENV_*`` variable,
``trainenv.yaml``, a platform file or variable: ``resourceconfig.json``, ``SAGEMAKER_PROGRAM``,
``SAGEMAKER_SUBMIT_DIRECTORY``, OCI Data Science's ``CODE_ENTRYPOINT`` and ``OCI__LAUNCH_CMD``)
the real commands ``trainenv env --format json``, ``trainenv env --format shell`` and
``trainenv train --dry-run`` must print the same argv and the same environment, with the values
pinned here; plus what the README promises for names and arguments.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from support import PYTHON, eval_in_sh, tree_state_of

TRAIN_PY = "print('ran')\n"


def dry_run_view(text: str) -> tuple:
    """``(argv, {name: value})`` from ``trainenv train --dry-run``'s output."""
    argv = json.loads(re.search(r"^argv +(.*)$", text, re.MULTILINE).group(1))
    environment = {}
    section = text.split("environment (set by trainenv):\n", 1)[1]
    for line in section.splitlines():
        match = re.match(r"  ([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if match:
            environment[match.group(1)] = match.group(2)
    return argv, environment


class Views:
    """The three views of one job's plan, from the real commands."""

    def __init__(self, run_trainenv, base: Path, options=(), **environ: str) -> None:
        extra = {"TRAINENV_BASE_DIR": str(base), "TRAINENV_RUN_DIR": str(base.parent / "run"), **environ}
        before = tree_state_of(base.parent)
        dry = run_trainenv("train", "--dry-run", *options, extra_env=extra)
        shell = run_trainenv("env", "--format", "shell", *options, extra_env=extra)
        data = run_trainenv("env", "--format", "json", *options, extra_env=extra)
        for result in (dry, shell, data):
            assert result.returncode == 0, result.stderr
        assert tree_state_of(base.parent) == before, "env and --dry-run only read"
        self.argv, self.environment = dry_run_view(dry.stdout)
        self.shell = eval_in_sh(shell.stdout)
        self.json = json.loads(data.stdout)

    def check_same(self) -> None:
        assert self.shell == self.environment
        assert self.json["launch"]["environment"] == self.environment
        assert self.json["launch"]["argv"] == self.argv


def code(base: Path, name: str = "train.py") -> Path:
    (base / "usercode" / name).write_text(TRAIN_PY)
    return base / "usercode" / name


SM_NAMES = 32  # AWS's SM_* set for one node, no channel, no topology: 31 names, plus SM_HP_LR


def test_flag(run_trainenv, job_tree):
    base = job_tree(hyperparameters={"lr": "0.1"})
    script = code(base)
    views = Views(run_trainenv, base, ("--compat", "sagemaker", "--entry-point", "train.py"))
    views.check_same()
    assert views.argv == [PYTHON, str(script), "--lr", "0.1"]
    assert sum(n.startswith("SM_") for n in views.environment) == SM_NAMES
    assert views.environment["SM_USER_ENTRY_POINT"] == "train.py"
    assert not any(n.startswith("PAI_") for n in views.environment)


def test_trainenv_variable(run_trainenv, job_tree):
    base = job_tree(hyperparameters={"lr": "0.1"}, channels=["train"])
    script = code(base)
    views = Views(run_trainenv, base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_COMPAT="pai,vertex")
    views.check_same()
    assert views.argv == [PYTHON, str(script), "--lr", "0.1"]
    env = views.environment
    assert env["PAI_HPS_LR"] == "0.1" and env["AIP_TRAINING_DATA_URI"] == str(base / "input/data/train")
    assert env["TRAINENV_ENV_FILE"] == str(base.parent / "run" / f"trainenv-job-{os.uname().nodename}" / "env.json")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(base / "usercode") and env["PYTHONUNBUFFERED"] == "1"


def test_trainenv_yaml(run_trainenv, job_tree):
    base = job_tree(hyperparameters={"lr": "0.1"}, settings="entry_point: train.py\ncompat: sagemaker\n")
    script = code(base)
    views = Views(run_trainenv, base)
    views.check_same()
    assert views.argv == [PYTHON, str(script), "--lr", "0.1"]
    assert sum(n.startswith("SM_") for n in views.environment) == SM_NAMES


def test_resourceconfig_two_nodes(run_trainenv, job_tree):
    base = job_tree(hyperparameters={"lr": "0.1"}, resource_config={"current_host": "algo-2", "hosts": ["algo-1", "algo-2"]})
    code(base)
    views = Views(run_trainenv, base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_COMPAT="none")
    views.check_same()
    env = views.environment
    assert {k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "NPROC_PER_NODE", "RANK", "WORLD_SIZE")} == {
        "MASTER_ADDR": "algo-1", "MASTER_PORT": "29500", "NODE_RANK": "1", "NNODES": "2", "NPROC_PER_NODE": "1",
        "RANK": "1", "WORLD_SIZE": "2",
    }
    assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": 1}


def test_torchrun_processes_per_node(run_trainenv, job_tree):
    base = job_tree(resource_config={"current_host": "algo-1", "hosts": ["algo-1", "algo-2"]})
    script = code(base)
    views = Views(
        run_trainenv, base, ("--master-port", "24000"),
        TRAINENV_ENTRY_POINT="train.py", TRAINENV_DISTRIBUTION="torchrun", TRAINENV_NPROC_PER_NODE="3", TRAINENV_COMPAT="none",
    )
    views.check_same()
    assert views.argv == [
        PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "3", "--node-rank", "0",
        "--rdzv-backend", "static", "--rdzv-endpoint", "algo-1:24000", "--max-restarts", "0", str(script),
    ]
    env = views.environment
    assert env["NPROC_PER_NODE"] == "3" and env["MASTER_PORT"] == "24000" and env["OMP_NUM_THREADS"] == "1"


def test_sagemaker_program(run_trainenv, job_tree):
    base = job_tree(hyperparameters={"lr": "0.1"})
    script = code(base, "entry.py")
    views = Views(run_trainenv, base, SAGEMAKER_PROGRAM="entry.py", TRAINENV_COMPAT="sagemaker")
    views.check_same()
    assert views.argv == [PYTHON, str(script), "--lr", "0.1"]
    assert views.environment["SM_USER_ENTRY_POINT"] == "entry.py" and views.environment["SM_MODULE_NAME"] == "entry"


def test_sagemaker_submit_directory_and_requirements(run_trainenv, job_tree, tmp_path):
    import tarfile

    archive = tmp_path / "sourcedir.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("entry.py")
        tar.addfile(info)
    base = job_tree(hyperparameters={"lr": "0.1"})
    views = Views(run_trainenv, base, SAGEMAKER_PROGRAM="entry.py", SAGEMAKER_SUBMIT_DIRECTORY=str(archive),
                  SAGEMAKER_REQUIREMENTS="req.txt", TRAINENV_COMPAT="none")
    views.check_same()
    assert views.argv == [PYTHON, str(base / "usercode" / "entry.py"), "--lr", "0.1"]  # named before the fetch
    settings = views.json["launch"]["settings"]
    assert settings["source"] == {"value": str(archive), "source": "SAGEMAKER_SUBMIT_DIRECTORY"}
    assert views.json["launch"]["requirements"]["file"] == str(base / "usercode" / "req.txt")


def test_ads_variables(run_trainenv, job_tree):
    base = job_tree(hyperparameters={"lr": "0.1"}, files={"usercode/src/train.py": TRAIN_PY})
    views = Views(run_trainenv, base, JOB_RUN_OCID="ocid1.x", WORKING_DIR="src", CODE_ENTRYPOINT="train.py",
                  PYTHON_PATH="../lib", TRAINENV_COMPAT="none")
    views.check_same()
    code_dir = base / "usercode"
    assert views.argv == [PYTHON, str(code_dir / "src" / "train.py"), "--lr", "0.1"]
    assert views.environment["PYTHONPATH"].split(os.pathsep)[:3] == [str(code_dir / "src"), str(code_dir), str(code_dir / "lib")]
    assert views.json["launch"]["cwd"] == str(code_dir / "src")
    assert views.json["launch"]["settings"]["entry_point"] == {"value": "src/train.py", "source": "CODE_ENTRYPOINT"}


def test_ads_launch_command(run_trainenv, job_tree):
    base = job_tree(hyperparameters={"lr": "0.1"})
    views = Views(run_trainenv, base, OCI__LAUNCH_CMD="python train.py", TRAINENV_COMPAT="none")
    views.check_same()
    assert views.argv == ["/bin/sh", "-c", "python train.py"]
    env = views.environment
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": os.uname().nodename, "MASTER_PORT": "29500",
    }


def test_readme_names_and_arguments(run_trainenv, job_tree):
    """README: ``learning-rate`` → ``LEARNING_RATE``; ``--flag true``, ``--layers [1,2]``; ``--h`` stays ``--h``."""
    base = job_tree(hyperparameters={"learning-rate": "0.1", "flag": "true", "layers": "[1, 2]", "h": "x y"})
    script = code(base)
    views = Views(run_trainenv, base, TRAINENV_ENTRY_POINT="train.py")
    views.check_same()
    assert views.argv == [PYTHON, str(script), "--learning-rate", "0.1", "--flag", "true", "--layers", "[1,2]", "--h", "x y"]
    env = views.environment
    assert env["TRAINENV_HP_LEARNING_RATE"] == "0.1" and env["PAI_HPS_LAYERS"] == "[1,2]"
    assert env["PAI_USER_ARGS"] == "--learning-rate 0.1 --flag true --layers '[1,2]' --h 'x y'"
