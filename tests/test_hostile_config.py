"""Hostile job config, end to end: a real ``trainenv train`` in a temp tree for each input.

Deep JSON or YAML, YAML alias bombs, symlink loops under ``input/data`` and bad values hidden
behind a variable must end with exit 78 and a ``ConfigError`` failure file naming the file (or
variable) and key, or, for the symlink loops, with the job running; never exit 70, a hang or
unbounded memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import failure, job_environ, make_tree, run_train, run_trainenv
MAX_DEPTH = 100  # trainenv.config.MAX_DEPTH, the documented cap

TRAIN_PY = "import os\nprint('CHANNELS=' + os.environ['TRAINENV_CHANNELS'])\n"


def tree(tmp_path: Path, **config: str) -> Path:
    """A job tree whose ``train.py`` prints its channels; ``config`` = file name → text."""
    base = make_tree(tmp_path / "job", {"train.py": TRAIN_PY})
    for name, text in config.items():
        (base / "input" / "config" / name).write_text(text)
    return base


def config_failure(done: subprocess.CompletedProcess, base: Path, *fragments: str) -> str:
    """Exit 78 and a failure file whose first line is a ConfigError holding every fragment."""
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 78, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: "), first
    for fragment in fragments:
        assert fragment in first, f"{fragment!r} not in {first!r}"
    return first


def nested(levels: int) -> object:
    """``levels`` lists inside one another (valid JSON, built without recursion)."""
    return json.loads("[" * levels + "]" * levels)


DEEP = 500
LIMIT = f"{MAX_DEPTH} levels"


# ---------------------------------------------------------------------------------------
# 1. Deep JSON in every reader


@pytest.mark.parametrize("levels", [DEEP, 5000])
def test_deep_hyperparameters_file(tmp_path, levels):
    text = '{"lr": 0.1, "deep": ' + "[" * levels + "]" * levels + "}"
    base = tree(tmp_path, **{"hyperparameters.json": text})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    config_failure(done, base, "hyperparameters.json", LIMIT)


@pytest.mark.parametrize("levels", [DEEP, 5000])
def test_deep_json_in_a_hyperparameter_string(tmp_path, levels):
    text = json.dumps({"lr": "0.1", "deep": "[" * levels + "]" * levels})
    base = tree(tmp_path, **{"hyperparameters.json": text})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    config_failure(done, base, "hyperparameters.json", "deep", LIMIT)


def test_hyperparameters_at_the_limit_still_run(tmp_path):
    # The top-level object is level 1: a value of MAX_DEPTH - 1 lists is the deepest allowed.
    text = json.dumps({"deep": nested(MAX_DEPTH - 1), "as_text": json.dumps(nested(MAX_DEPTH - 1))})
    base = tree(tmp_path, **{"hyperparameters.json": text})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.mark.parametrize(
    "filename, text",
    [
        ("inputdataconfig.json", json.dumps({"train": {"ContentType": "csv", "x": nested(DEEP)}})),
        ("resourceconfig.json", json.dumps({"current_host": "algo-1", "hosts": ["algo-1"], "x": nested(DEEP)})),
        ("trainenv.yaml", "requirements: " + "[" * DEEP + "]" * DEEP + "\n"),
        ("trainenv.yaml", "compat:\n" + "".join("  " * i + "- \n" for i in range(1, DEEP))),
    ],
    ids=["inputdataconfig", "resourceconfig", "yaml-flow", "yaml-block"],
)
def test_deep_config_files(tmp_path, filename, text):
    base = tree(tmp_path, **{filename: text})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    config_failure(done, base, filename, LIMIT)


@pytest.mark.parametrize(
    "variable, value",
    [
        ("TF_CONFIG", {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}, "x": nested(DEEP)}),
        ("CLUSTER_SPEC", {"cluster": {"workerpool0": ["a:1"]}, "task": {"type": "workerpool0", "index": 0}, "x": nested(DEEP)}),
        ("TRAINENV_HOSTS", ["a", nested(DEEP)]),
    ],
)
def test_deep_json_in_cluster_variables(tmp_path, variable, value):
    base = tree(tmp_path)
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", **{variable: json.dumps(value)})
    config_failure(done, base, variable, LIMIT)


# ---------------------------------------------------------------------------------------
# 2. YAML alias bombs: refused while loading, memory stays small

PEAK_RSS = """\
import resource, subprocess, sys, time
limit = 2 * 1024 ** 3  # a launcher that expands the bomb dies here instead of swapping the machine
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
start = time.monotonic()
done = subprocess.run(sys.argv[1:], capture_output=True, preexec_fn=cap)
took = time.monotonic() - start
sys.stderr.buffer.write(done.stderr)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, took)
"""


def run_measured(base: Path, **extra: str) -> tuple:
    """``(exit status, peak RSS in KiB, seconds)`` of a real ``trainenv train``, under a 2 GiB cap."""
    done = run_trainenv("train", prefix=[sys.executable, "-c", PEAK_RSS], env=job_environ(base, **extra), text=False)
    status, rss, took = done.stdout.decode().split()
    return int(status), int(rss), float(took), done.stderr.decode(errors="replace")


def alias_bomb(key: str, levels: int = 9) -> str:
    """Billion laughs under ``key``: ``9 ** levels`` strings once every alias is expanded."""
    lines = [f"{key}:", '  - &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        lines.append(f"  - &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text",
    [alias_bomb("requirements"), alias_bomb("compat"), "hosts: &h [a, *h]\n"],
    ids=["requirements", "compat", "recursive-alias"],
)
def test_yaml_alias_bomb_is_refused_with_little_memory(tmp_path, text):
    base = tree(tmp_path, **{"trainenv.yaml": text})
    status, rss_kib, took, stderr = run_measured(base, TRAINENV_ENTRY_POINT="train.py")
    assert status == 78, stderr[-2000:]
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: ") and "trainenv.yaml" in first, first
    assert rss_kib < 150 * 1024, f"launcher peak RSS {rss_kib} KiB"
    assert took < 20, took  # about 0.2 s; generous for a loaded CI machine


def test_yaml_aliases_of_modest_size_still_work(tmp_path):
    text = "requirements: &pins [numpy, pandas]\nmpi_options: *pins\n"
    base = tree(tmp_path, **{"trainenv.yaml": text})
    done = run_train(base, "--dry-run", TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 0, done.stderr.decode()[-2000:]


# ---------------------------------------------------------------------------------------
# 3. Symlink loops and dangling links under input/data (and output/)


def channels_of(done: subprocess.CompletedProcess) -> list:
    line = next(l for l in done.stdout.decode().splitlines() if l.startswith("CHANNELS="))
    return json.loads(line[len("CHANNELS="):])


def test_symlink_loops_and_dangling_links_do_not_stop_the_job(tmp_path):
    base = tree(tmp_path)
    data = base / "input" / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "file.csv").write_text("a,b\n")
    os.symlink("loop2", data / "train" / "loop1")  # a loop inside a channel
    os.symlink("loop1", data / "train" / "loop2")
    os.symlink("..", data / "train" / "up")  # a cycle through a parent
    os.symlink("self", data / "self")  # the channel dir itself is a loop
    os.symlink(str(tmp_path / "nowhere"), data / "dangling")
    os.symlink("train", data / "alias")  # a link to a real dir is a channel
    (base / "output").mkdir()
    os.symlink("outloop", base / "output" / "outloop")
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert channels_of(done) == ["alias", "train"]
    assert os.path.islink(data / "self") and os.path.islink(data / "dangling"), "nothing is removed"


def test_a_loop_named_in_inputdataconfig_is_still_its_channel(tmp_path):
    base = tree(tmp_path, **{"inputdataconfig.json": json.dumps({"self": {}})})
    (base / "input" / "data").mkdir(parents=True)
    os.symlink("self", base / "input" / "data" / "self")
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert channels_of(done) == ["self"]


# ---------------------------------------------------------------------------------------
# 4. Every source is validated, also when a higher one wins


def test_a_bad_file_value_is_reported_when_a_variable_overrides_it(tmp_path):
    base = tree(tmp_path, **{"trainenv.yaml": "grace_seconds: soon\n"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_GRACE_SECONDS="5")
    config_failure(done, base, "trainenv.yaml: grace_seconds", "'soon'")


def test_a_bad_file_value_is_reported_when_a_flag_overrides_it(tmp_path):
    base = tree(tmp_path, **{"trainenv.yaml": "distribution: horovod\n"})
    done = run_train(base, "--distribution", "none", TRAINENV_ENTRY_POINT="train.py")
    config_failure(done, base, "trainenv.yaml: distribution", "'horovod'")


def test_a_bad_variable_is_reported_when_a_flag_overrides_it(tmp_path):
    base = tree(tmp_path)
    done = run_train(base, "--max-restarts", "1", TRAINENV_ENTRY_POINT="train.py", TRAINENV_MAX_RESTARTS="many")
    config_failure(done, base, "TRAINENV_MAX_RESTARTS", "'many'")


@pytest.mark.parametrize(
    "variable, value",
    [("TRAINENV_INSTALLER", "conda"), ("TRAINENV_LOG_LEVEL", "loud")],
)
def test_bad_launcher_variables_are_config_errors_at_start(tmp_path, variable, value):
    base = tree(tmp_path)  # no requirements: the installer would never be asked
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", **{variable: value})
    config_failure(done, base, variable, repr(value))


# ---------------------------------------------------------------------------------------
# 6. The train path: no PyYAML without a trainenv.yaml, each config file read once

COUNT_OPENS = """\
import collections, json, os, sys
opened = collections.Counter()
def hook(event, args):
    if event == "open" and not isinstance(args[0], int):
        path = os.fsdecode(os.fspath(args[0]))
        if "/input/config/" in path:
            opened[path.rsplit("/", 1)[-1]] += 1
sys.addaudithook(hook)
try:
    from trainenv.cli import main
    main(["train"])
finally:
    sys.stderr.write("OPENED=" + json.dumps(opened) + "\\n")
"""


@pytest.mark.parametrize("with_yaml", [False, True])
def test_train_reads_each_config_file_once_and_yaml_only_when_there_is_one(tmp_path, with_yaml):
    files = {
        "hyperparameters.json": json.dumps({"lr": "0.1"}),
        "inputdataconfig.json": json.dumps({"train": {}}),
        "resourceconfig.json": json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}),
    }
    if with_yaml:
        files["trainenv.yaml"] = "entry_point: train.py\n"
    base = tree(tmp_path, **files)
    env = job_environ(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_CURRENT_HOST="algo-1")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", COUNT_OPENS], env=env, capture_output=True, timeout=60)
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert ("yaml" in imported) is with_yaml
    assert not imported & {"click", "psutil", "pynvml"}
    opened = json.loads(next(line for line in stderr.splitlines() if line.startswith("OPENED="))[len("OPENED="):])
    # Each file once (an absent trainenv.yaml: one attempt); nothing reads one twice.
    assert opened == {name: 1 for name in [*files, "trainenv.yaml"]}, opened


def test_a_hostile_snapshot_file_is_a_config_error_not_a_recursion_error(tmp_path):
    """``training_env()`` inside a job reads TRAINENV_ENV_FILE: a 900-level file is refused in one line."""
    from trainenv.environment import training_env
    from trainenv.errors import ConfigError

    env_file = tmp_path / "env.json"
    env_file.write_text('{"hyperparameters": {"x": ' + "[" * 900 + "]" * 900 + "}}", encoding="utf-8")
    with pytest.raises(ConfigError, match="nested too deeply"):
        training_env({"TRAINENV_ENV_FILE": str(env_file)})
