"""Platform variables read as settings (``trainenv.settings.platforms``): SageMaker's, OCI Data
Science's (ADS, only with its markers) and PAI's file inputs, each through the real
``trainenv train`` / ``trainenv local`` / ``trainenv env`` on a temp job tree, with the examples
under ``examples/``."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from support import PYTHON, REPO, TRAINENV, failure, job_environ, need_tool, run_trainenv, tree_state_of

EXAMPLES = REPO / "examples"
ADS = EXAMPLES / "ads"
MARKER = {"JOB_RUN_OCID": "ocid1.datasciencejobrun.oc1..test"}


def env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an example's env file (values shell-quoted), comments skipped."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = " ".join(shlex.split(value))
    return values


def ads_tree(job_tree, code: Path = ADS / "code", **parts) -> Path:
    base = job_tree(**parts)
    shutil.copytree(code, base / "usercode", dirs_exist_ok=True)
    return base


def train(base: Path, *args: str, **environ: str) -> subprocess.CompletedProcess:
    """``trainenv train`` on ``base``; the venv's bin first on PATH (``python`` in commands)."""
    path = os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", "")
    return run_trainenv("train", *args, env=job_environ(base, PATH=path, **environ))


def launch_view(base: Path, *args: str, **environ: str) -> dict:
    """The ``launch`` part of ``trainenv env --format json``."""
    result = run_trainenv("env", "--format", "json", *args, env=job_environ(base, **environ))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def setting(view: dict, name: str) -> tuple:
    entry = view["launch"]["settings"][name]
    return entry["value"], entry["source"]


# -- the examples ------------------------------------------------------------------------------


def test_ads_example_calls_the_entry_function_from_working_dir_with_python_path(job_tree):
    base = ads_tree(job_tree)
    result = train(base, "--", "--epochs", "3", "fast", **env_file(ADS / "job.env"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["epoch 1/3: loss 1.000", "epoch 2/3: loss 0.500", "epoch 3/3: loss 0.333"]
    assert lines[3] == "args ['fast'], options {}, working dir src"  # --epochs went to the keyword
    assert "not run" not in result.stdout  # imported, not run as __main__ (as ADS does)


def test_ads_example_runs_the_same_under_trainenv_local(tmp_path):
    environ = job_environ(tmp_path, **env_file(ADS / "job.env"))
    del environ["TRAINENV_BASE_DIR"], environ["TRAINENV_RUN_DIR"]
    result = run_trainenv("local", "--source-dir", str(ADS / "code"), "--job-dir", str(tmp_path / "job"),
                          "--", "--epochs", "2", env=environ)
    assert result.returncode == 0, result.stderr
    assert "epoch 2/2: loss 0.500" in result.stdout and "working dir src" in result.stdout


def test_ads_launch_command_gets_rank_world_size_and_master_on_one_node(job_tree):
    base = ads_tree(job_tree)
    result = train(base, **env_file(ADS / "launch.env"))
    assert result.returncode == 0, result.stderr
    host = os.uname().nodename
    assert result.stdout.strip() == f"RANK=0 WORLD_SIZE=1 MASTER_ADDR={host} MASTER_PORT=29500 argv ['--tag', 'ads']"


def test_ads_launch_command_never_overwrites_what_the_platform_set(job_tree):
    base = ads_tree(job_tree)
    result = train(base, **env_file(ADS / "launch.env"), MASTER_ADDR="10.1.2.3", MASTER_PORT="23456")
    assert result.returncode == 0, result.stderr
    assert "MASTER_ADDR=10.1.2.3 MASTER_PORT=23456" in result.stdout


def test_ads_git_example_clones_and_names_the_entry_from_the_repository_root(job_tree, tmp_path):
    git = need_tool("git")
    repo = tmp_path / "repo"
    shutil.copytree(ADS / "code", repo)
    commands = (["init", "-q", "-b", "main"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code"])
    for command in commands:
        subprocess.run([git, *command], cwd=repo, check=True, capture_output=True)
    base = job_tree()
    environ = dict(env_file(ADS / "git.env"), GIT_URL=f"file://{repo}")
    result = train(base, "--", "--epochs", "1", **environ)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1: loss 1.000" in result.stdout and "working dir src" in result.stdout
    assert (base / "usercode" / "src" / "train.py").is_file()


def test_ads_git_commit_wins_over_the_branch(job_tree):
    view = launch_view(job_tree(), **MARKER, GIT_URL="https://example.com/r.git", GIT_BRANCH="dev", GIT_COMMIT="abc123")
    assert setting(view, "source") == ("https://example.com/r.git", "GIT_URL")
    assert setting(view, "git_ref") == ("abc123", "GIT_COMMIT")


def sourcedir(tmp_path: Path) -> Path:
    archive = tmp_path / "sourcedir.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((EXAMPLES / "sagemaker" / "code").iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def test_sagemaker_example_runs_from_its_sourcedir_archive(job_tree, tmp_path):
    hps = json.loads((EXAMPLES / "sagemaker" / "hyperparameters.json").read_text())
    base = job_tree(hyperparameters=hps)
    environ = dict(env_file(EXAMPLES / "sagemaker" / "job.env"), SAGEMAKER_SUBMIT_DIRECTORY=str(sourcedir(tmp_path)))
    result = train(base, **environ)
    assert result.returncode == 0, result.stderr
    assert "trained 3 epochs, weight 0.917" in result.stdout
    assert json.loads((base / "output" / "model" / "model.json").read_text())["hosts"] == [os.uname().nodename]
    view = launch_view(base, **environ)
    assert view["launch"]["requirements"]["file"] == str(base / "usercode" / "requirements-job.txt")
    assert setting(view, "requirements_file") == ("requirements-job.txt", "SAGEMAKER_REQUIREMENTS")
    assert setting(view, "entry_point") == ("entry.py", "SAGEMAKER_PROGRAM")


def test_sagemaker_submit_directory_as_a_dir_and_as_the_code_dir(job_tree, tmp_path):
    base = job_tree(hyperparameters={"epochs": "1"})
    code = EXAMPLES / "sagemaker" / "code"
    environ = {"SAGEMAKER_PROGRAM": "entry.py", "TRAINENV_COMPAT": "sagemaker"}
    result = train(base, SAGEMAKER_SUBMIT_DIRECTORY=str(code), **environ)
    assert result.returncode == 0, result.stderr
    assert "trained 1 epochs" in result.stdout and (base / "usercode" / "entry.py").is_file()
    # The code dir itself: nothing to fetch.
    view = launch_view(base, SAGEMAKER_SUBMIT_DIRECTORY=str(base / "usercode"), **environ)
    assert setting(view, "source") == (None, "default")


def test_function_example_gets_decoded_hyperparameters(tmp_path):
    result = run_trainenv("local", "--source-dir", str(EXAMPLES / "function"), "--job-dir", str(tmp_path / "job"),
                          "--hp", "lr=0.1", "--hp", "epochs=3", "--hp", "layers=[16, 8]")
    assert result.returncode == 0, result.stderr
    model = json.loads((tmp_path / "job" / "output" / "model" / "model.json").read_text())
    assert model == {"lr": 0.1, "epochs": 3, "layers": [16, 8], "types": ["float", "int", "list"]}


# -- precedence and origin ---------------------------------------------------------------------


def test_trainenv_variable_beats_code_entrypoint_beats_trainenv_yaml(job_tree):
    base = job_tree(settings="entry_point: from_yaml.py\n", code={n: "" for n in ("from_yaml.py", "from_ads.py", "mine.py")})
    assert setting(launch_view(base), "entry_point") == ("from_yaml.py", f"{base}/input/config/trainenv.yaml: entry_point")
    view = launch_view(base, **MARKER, CODE_ENTRYPOINT="from_ads.py")
    assert setting(view, "entry_point") == ("from_ads.py", "CODE_ENTRYPOINT")
    assert view["launch"]["entry_point"] == {"kind": "script", "target": str(base / "usercode/from_ads.py"), "source": "CODE_ENTRYPOINT"}
    view = launch_view(base, **MARKER, CODE_ENTRYPOINT="from_ads.py", TRAINENV_ENTRY_POINT="mine.py")
    assert setting(view, "entry_point") == ("mine.py", "TRAINENV_ENTRY_POINT")
    # --dry-run names the platform's variable too
    result = run_trainenv("train", "--dry-run", env=job_environ(base, **MARKER, CODE_ENTRYPOINT="from_ads.py"))
    assert "platform      entry_point from CODE_ENTRYPOINT" in result.stdout, result.stdout


def test_a_platform_entry_gives_way_to_a_trainenv_command_and_beats_a_yaml_command(job_tree):
    base = job_tree(settings="command: echo yaml\n", code={"train.py": ""})
    view = launch_view(base, SAGEMAKER_PROGRAM="train.py")
    assert setting(view, "entry_point") == ("train.py", "SAGEMAKER_PROGRAM") and setting(view, "command") == (None, "default")
    view = launch_view(base, SAGEMAKER_PROGRAM="train.py", TRAINENV_COMMAND="echo mine")
    assert setting(view, "command") == ("echo mine", "TRAINENV_COMMAND") and setting(view, "entry_point") == (None, "default")


def test_code_entrypoint_wins_over_job_run_entrypoint_and_launch_cmd_over_both(job_tree):
    base = job_tree(code={"train.py": "", "driver_python.py": ""})
    view = launch_view(base, JOB_RUN_ENTRYPOINT="driver_python.py", CODE_ENTRYPOINT="train.py")
    assert setting(view, "entry_point") == ("train.py", "CODE_ENTRYPOINT")
    view = launch_view(base, JOB_RUN_ENTRYPOINT="driver_python.py")
    assert setting(view, "entry_point") == ("driver_python.py", "JOB_RUN_ENTRYPOINT")
    view = launch_view(base, JOB_RUN_ENTRYPOINT="driver_python.py", CODE_ENTRYPOINT="train.py", OCI__LAUNCH_CMD="torchrun train.py")
    assert setting(view, "command") == ("torchrun train.py", "OCI__LAUNCH_CMD") and setting(view, "entry_point") == (None, "default")
    assert view["launch"]["argv"][:2] == ["torchrun", "--standalone"]  # launcher-aware: one node


def test_without_ads_markers_no_ads_name_is_read(job_tree):
    base = job_tree(code={"train.py": "", "src/x.py": ""})
    generic = {"WORKING_DIR": "src", "NODE_RANK": "1", "NODE_COUNT": "2", "CODE_ENTRYPOINT": "src/x.py",
               "GIT_URL": "https://example.com/r.git", "PYTHON_PATH": "lib", "OCI_REGION": "x"}
    view = launch_view(base, TRAINENV_ENTRY_POINT="train.py", **generic)
    assert view["cluster_source"] == "single" and view["node_rank"] == 0 and view["num_nodes"] == 1
    changed = {name: value for name, value in view["launch"]["settings"].items()
               if value["source"] not in ("default", "TRAINENV_ENTRY_POINT", "TRAINENV_RUN_DIR")}
    assert changed == {}
    assert view["launch"]["cwd"] == str(base / "usercode")
    # the same with a marker: every one of them is read
    view = launch_view(base, TRAINENV_ENTRY_POINT="train.py", MASTER_ADDR="10.0.0.1", OCI__X="1", **generic)
    assert (view["cluster_source"], view["node_rank"], view["num_nodes"]) == ("ADS", 1, 2)
    assert setting(view, "git_entry_dir") == ("src", "WORKING_DIR") and setting(view, "python_path") == (["lib"], "PYTHON_PATH")


def test_ads_cluster_from_worker_count_and_the_pip_variables(job_tree):
    base = job_tree(code={"src/req.txt": "", "src/train.py": ""})
    view = launch_view(base, **MARKER, OCI__WORKER_COUNT="2", NODE_RANK="2", MASTER_ADDR="10.0.0.1",
                       CODE_ENTRYPOINT="train.py", WORKING_DIR="src", OCI__PIP_REQUIREMENTS="req.txt",
                       OCI__PIP_PKG="'numpy>1.2' pandas==2.0")
    assert (view["cluster_source"], view["node_rank"], view["num_nodes"], view["master_host"]) == ("ADS", 2, 3, "10.0.0.1")
    assert setting(view, "entry_point") == ("src/train.py", "CODE_ENTRYPOINT")
    assert setting(view, "requirements_file") == ("src/req.txt", "OCI__PIP_REQUIREMENTS")
    assert view["launch"]["requirements"]["file"] == str(base / "usercode/src/req.txt")
    assert setting(view, "requirements") == (["numpy>1.2", "pandas==2.0"], "OCI__PIP_PKG")
    # INITIAL_CLUSTER_SIZE (the service's) wins over NODE_COUNT (ADS's)
    view = launch_view(base, **MARKER, INITIAL_CLUSTER_SIZE="4", NODE_COUNT="2", NODE_RANK="3", MASTER_ADDR="10.0.0.1",
                       CODE_ENTRYPOINT="src/train.py")
    assert (view["cluster_source"], view["node_rank"], view["num_nodes"]) == ("ADS", 3, 4)


def test_ads_notebook_variables_map_to_the_notebook_entry(job_tree):
    base = job_tree(code={"nb/train.ipynb": "{}"})
    environ = {**MARKER, "JOB_RUN_ENTRYPOINT": "driver_notebook.py", "JOB_RUN_NOTEBOOK": "nb/train.ipynb",
               "NOTEBOOK_EXCLUDE_TAGS": '["skip", "slow"]'}
    view = launch_view(base, **environ)
    assert view["launch"]["entry_point"] == {"kind": "notebook", "target": str(base / "usercode/nb/train.ipynb"), "source": "JOB_RUN_NOTEBOOK"}
    assert setting(view, "notebook_exclude_tags") == (["skip", "slow"], "NOTEBOOK_EXCLUDE_TAGS")
    result = run_trainenv("train", "--dry-run", env=job_environ(base, **environ))
    assert "platform      entry_point from JOB_RUN_NOTEBOOK; notebook_exclude_tags from NOTEBOOK_EXCLUDE_TAGS" in result.stdout
    bad = run_trainenv("env", env=job_environ(base, **{**environ, "NOTEBOOK_EXCLUDE_TAGS": "skip"}))
    assert bad.returncode == 78 and bad.stderr.startswith("trainenv: ConfigError: NOTEBOOK_EXCLUDE_TAGS: 'skip': ")


def test_ads_deepspeed_flag_picks_the_deepspeed_launcher(job_tree):
    base = job_tree(code={"train.py": ""})
    view = launch_view(base, **MARKER, CODE_ENTRYPOINT="train.py", OCI__DEEPSPEED="1")
    assert setting(view, "distribution") == ("deepspeed", "OCI__DEEPSPEED")
    assert setting(launch_view(base, **MARKER, CODE_ENTRYPOINT="train.py", OCI__DEEPSPEED="0"), "distribution") == ("none", "default")


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({**MARKER, "WORKING_DIR": "/abs/dir"}, "ConfigError: WORKING_DIR: '/abs/dir': expected a sub-dir of the code dir"),
        ({**MARKER, "CODE_ENTRYPOINT": "run.sh", "ENTRY_FUNCTION": "main"}, "ConfigError: ENTRY_FUNCTION: 'main': expected a function name in a .py file"),
        ({**MARKER, "CODE_ENTRYPOINT": "train.py", "ENTRY_FUNCTION": "no-such"}, "ConfigError: ENTRY_FUNCTION: 'no-such'"),
        ({**MARKER, "OCI__DEEPSPEED": "maybe"}, "ConfigError: OCI__DEEPSPEED: 'maybe': expected true or false"),
        ({**MARKER, "NODE_COUNT": "two"}, "ConfigError: NODE_COUNT: 'two' is not a non-negative integer"),
        ({**MARKER, "NODE_COUNT": "2", "NODE_RANK": "2"}, "ConfigError: NODE_RANK: 2 is not below the node count 2"),
        ({**MARKER, "NODE_COUNT": "2", "NODE_RANK": "1"}, "ConfigError: NODE_COUNT: 2 nodes but no master address"),
        ({**MARKER, "OCI__PIP_REQUIREMENTS": "missing.txt"}, "ConfigError: OCI__PIP_REQUIREMENTS: 'missing.txt': "),
        ({"SAGEMAKER_SUBMIT_DIRECTORY": "s3://bucket/code/sourcedir.tar.gz"},
         "ConfigError: SAGEMAKER_SUBMIT_DIRECTORY: 's3://bucket/code/sourcedir.tar.gz': SageMaker fetches s3:// code itself"),
        ({"SAGEMAKER_SUBMIT_DIRECTORY": "code.rar"}, "ConfigError: SAGEMAKER_SUBMIT_DIRECTORY: 'code.rar': expected an existing dir"),
        ({"SAGEMAKER_REQUIREMENTS": "../etc/passwd"}, "ConfigError: SAGEMAKER_REQUIREMENTS: '../etc/passwd': expected a file in the code dir"),
        ({"SAGEMAKER_PROGRAM": "missing.py"}, "ConfigError: SAGEMAKER_PROGRAM: 'missing.py': "),
    ],
)
def test_a_bad_platform_value_is_one_line_naming_variable_and_value(job_tree, environ, expected):
    base = job_tree(code={"train.py": "print('ran')\n", "run.sh": "echo ran\n"})
    before = tree_state_of(base / "usercode")
    result = train(base, **{"TRAINENV_ENTRY_POINT": "train.py", **environ} if "ENTRY_FUNCTION" not in environ and "SAGEMAKER_PROGRAM" not in environ else environ)
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert "ran" not in result.stdout and "Traceback" not in result.stderr
    first = failure(base).splitlines()[0]
    assert first.startswith(expected), first
    assert f"trainenv: {expected}" in result.stderr
    assert tree_state_of(base / "usercode") == before  # nothing deleted or overwritten


def test_env_fails_the_same_way_and_writes_nothing(job_tree):
    base = job_tree()
    before = tree_state_of(base)
    result = run_trainenv("env", env=job_environ(base, **MARKER, WORKING_DIR="../up"))
    assert result.returncode == 78
    assert result.stderr.strip() == ("trainenv: ConfigError: WORKING_DIR: '../up': expected a sub-dir of the code dir: "
                                     "a relative path without '..'")
    assert tree_state_of(base) == before


# -- PAI: a file input ---------------------------------------------------------------------------


def test_local_file_input_gives_pai_input_naming_the_file(tmp_path):
    data = tmp_path / "points.csv"
    data.write_text("x,y\n1,2\n")
    (tmp_path / "val").mkdir()
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(
        "import os\nprint(open(os.environ['PAI_INPUT_TRAIN']).read().strip(), os.environ['PAI_INPUT_VAL'])\n"
    )
    job = tmp_path / "job"
    result = run_trainenv("local", "--source-dir", str(code), "--input", f"train={data}", "--input", f"val={tmp_path / 'val'}",
                          "--entry-point", "train.py", "--job-dir", str(job))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["x,y", "1,2", str(job / "input" / "data" / "val")]
    dry = run_trainenv("local", "--input", f"train={data}", "--command", "true", "--dry-run", "--job-dir", str(tmp_path / "dry"))
    assert f"PAI_INPUT_TRAIN={tmp_path / 'dry' / 'input' / 'data' / 'train' / 'points.csv'}" in dry.stdout, dry.stdout


def test_a_directory_source_is_copied_links_kept_and_the_dir_left_alone(job_tree, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text("import os\nprint(os.readlink('data'), open('data').read())\n")
    (code / "real.txt").write_text("hello")
    (code / "data").symlink_to("real.txt")
    before = tree_state_of(code)
    base = job_tree(code={"old.py": ""})
    result = train(base, TRAINENV_SOURCE=str(code), TRAINENV_ENTRY_POINT="train.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["real.txt", "hello"]
    assert not (base / "usercode" / "old.py").exists() and tree_state_of(code) == before
    relative = train(base, TRAINENV_SOURCE="code", TRAINENV_ENTRY_POINT="train.py")
    assert relative.returncode == 78 and "TRAINENV_SOURCE: 'code': expected an archive" in relative.stderr
    around = train(base, TRAINENV_SOURCE=str(base), TRAINENV_ENTRY_POINT="train.py")
    assert around.returncode == 78 and f"TRAINENV_SOURCE: '{base}': holds the code dir" in around.stderr
    assert (base / "usercode" / "train.py").is_file()  # the code fetched before is still there


# -- OCI Data Science's node list (CLUSTER_NODES_METADATA_FILE) ---------------------------------

NODE_LIST = [{"Rank": 1, "IPAddress": "10.0.0.6"}, {"Rank": 0, "IPAddress": "10.0.0.5"}]
SHOW_CLUSTER = "import os\nprint(os.environ['TRAINENV_MASTER_HOST'], os.environ['TRAINENV_CURRENT_HOST'], os.environ['TRAINENV_HOSTS'])\n"


def test_ads_node_list_names_the_master_and_the_hosts_by_rank(job_tree, tmp_path):
    base = job_tree(code={"train.py": ""})
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps(NODE_LIST))
    view = launch_view(base, **MARKER, NODE_COUNT="2", NODE_RANK="1", CLUSTER_NODES_METADATA_FILE=str(nodes),
                       CODE_ENTRYPOINT="train.py")
    assert (view["cluster_source"], view["master_host"], view["current_host"], view["hosts"], view["node_rank"]) == (
        "ADS", "10.0.0.5", "10.0.0.6", ["10.0.0.5", "10.0.0.6"], 1)
    # MASTER_ADDR, when the platform gives it, wins over the list
    view = launch_view(base, **MARKER, NODE_COUNT="2", NODE_RANK="1", CLUSTER_NODES_METADATA_FILE=str(nodes),
                       MASTER_ADDR="10.9.9.9", CODE_ENTRYPOINT="train.py")
    assert view["master_host"] == "10.9.9.9"


def test_the_interface_carrying_this_nodes_listed_address_goes_to_nccl_and_gloo(job_tree, tmp_path):
    """This node is listed as 127.0.0.1, which `lo` carries: NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME
    name it, as ADS sets them; a value the platform set is kept."""
    base = job_tree(code={"train.py": ""})
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps([{"Rank": 0, "IPAddress": "10.0.0.5"}, {"Rank": 1, "IPAddress": "127.0.0.1"}]))
    environ = dict(MARKER, NODE_COUNT="2", NODE_RANK="1", CLUSTER_NODES_METADATA_FILE=str(nodes), CODE_ENTRYPOINT="train.py")
    view = launch_view(base, **environ)
    assert view["network_interface"] == "lo"
    exported = view["launch"]["environment"]
    assert (exported["NCCL_SOCKET_IFNAME"], exported["GLOO_SOCKET_IFNAME"]) == ("lo", "lo")
    kept = launch_view(base, **environ, GLOO_SOCKET_IFNAME="eth7")["launch"]["environment"]
    assert kept.get("GLOO_SOCKET_IFNAME", "eth7") == "eth7" and kept["NCCL_SOCKET_IFNAME"] == "lo"


def test_train_waits_for_the_node_list_and_then_runs(job_tree, tmp_path):
    """The service writes the list as the nodes come up: trainenv waits (saying so once), then runs."""
    base = job_tree(code={"train.py": SHOW_CLUSTER})
    nodes = tmp_path / "nodes.json"
    proc = subprocess.Popen(
        [*TRAINENV, "train"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=job_environ(base, **MARKER, NODE_COUNT="2", NODE_RANK="1", CLUSTER_NODES_METADATA_FILE=str(nodes),
                        CODE_ENTRYPOINT="train.py", TRAINENV_PEER_TIMEOUT_SECONDS="30"),
    )
    time.sleep(1.5)
    nodes.write_text(json.dumps(NODE_LIST[:1]))  # one of two: still waiting
    time.sleep(1.5)
    nodes.write_text(json.dumps(NODE_LIST))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == '10.0.0.5 10.0.0.6 ["10.0.0.5","10.0.0.6"]'
    assert err.count("waiting for the node list") == 1, err


def test_a_node_list_that_never_comes_times_out_with_one_line(job_tree, tmp_path):
    base = job_tree(code={"train.py": "print('ran')\n"})
    missing = tmp_path / "nodes.json"
    result = train(base, **MARKER, NODE_COUNT="2", NODE_RANK="1", CLUSTER_NODES_METADATA_FILE=str(missing),
                   CODE_ENTRYPOINT="train.py", TRAINENV_PEER_TIMEOUT_SECONDS="1.5")
    assert result.returncode == 78 and "ran" not in result.stdout
    assert failure(base).splitlines()[0] == (
        f"ConfigError: CLUSTER_NODES_METADATA_FILE='{missing}': the node list does not exist yet (0 of 2 nodes); "
        "waited 1.5 s (TRAINENV_PEER_TIMEOUT_SECONDS)"
    )


@pytest.mark.parametrize("content, expected", [
    ('{"Rank": 0}', "expected a JSON list of"),
    ("[{", "the node list is not valid JSON"),
    ('[{"Rank": "first", "IPAddress": "10.0.0.5"}]', "[0]: {'Rank': 'first', 'IPAddress': '10.0.0.5'} has no Rank that is a non-negative integer"),
    ('[{"Rank": 0, "IPAddress": "$(reboot)"}]', "[0].IPAddress: '$(reboot)' is not a host name"),
    ('[{"Rank": 0, "IPAddress": "10.0.0.5"}, {"Rank": 0, "IPAddress": "10.0.0.7"}]', "[1]: rank 0 is listed as '10.0.0.5' and as '10.0.0.7'"),
])
def test_a_bad_node_list_is_one_line_naming_the_file_and_entry(job_tree, tmp_path, content, expected):
    base = job_tree(code={"train.py": "print('ran')\n"})
    nodes = tmp_path / "nodes.json"
    nodes.write_text(content)
    result = train(base, **MARKER, NODE_COUNT="2", NODE_RANK="1", CLUSTER_NODES_METADATA_FILE=str(nodes),
                   CODE_ENTRYPOINT="train.py")
    assert result.returncode == 78 and "Traceback" not in result.stderr
    first = failure(base).splitlines()[0]
    assert first.startswith(f"ConfigError: CLUSTER_NODES_METADATA_FILE='{nodes}': ") and expected in first, first
    assert nodes.read_text() == content  # read, never written
