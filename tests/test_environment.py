"""trainenv.environment: the frozen TrainingEnv snapshot built from real job trees.

Covers: what the snapshot holds for the fake SageMaker job, immutability and the
mapping protocol, the JSON round trip, loading ``TRAINENV_ENV_FILE`` instead of probing,
local mode, "building reads and never writes", and bad cluster / cgroup / GPU input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support import build_env, one_line_error, without_ml_dir
from trainenv import resources
from trainenv.environment import (
    TrainingEnv,
    build_training_env,
    load_training_env,
    training_env,
)
from trainenv.errors import ConfigError
from trainenv.exports import to_env_vars
from trainenv.frozen import FrozenRecordError, fields


# ---------------------------------------------------------------------------------------
# The fake SageMaker job (tests/data/sagemaker_research_tree)


def test_research_tree_snapshot(research_tree):
    env = build_env(research_tree)
    base = str(research_tree)
    assert env.base_dir == base and env.local_mode is False
    assert dict(env.hyperparameters) == {
        "lr": 0.1, "epochs": 3, "flag": True, "layers": [1, 2], "cfg": {"a": 1}, "name": "x y",
    }
    assert dict(env.framework_parameters) == {"sagemaker_job_name": "job-123", "sagemaker_region": "us-west-2"}
    assert env.job_name == "job-123"
    assert env.channels == ("train", "validation")
    assert dict(env.channel_dirs) == {
        "train": f"{base}/input/data/train",
        "validation": f"{base}/input/data/validation",
    }
    assert env.input_data_config["train"]["ContentType"] == "text/csv"
    assert env.model_dir == f"{base}/output/model"
    assert env.checkpoint_dir == f"{base}/output/checkpoints"
    assert env.code_dir == f"{base}/usercode"
    assert env.config_dir == f"{base}/input/config"
    assert env.failure_file == f"{base}/output/failure"
    assert list(env.output_dirs) == ["model", "checkpoints", "tensorboard"]
    assert env.hosts == ("algo-1",) and env.current_host == "algo-1" and env.master_host == "algo-1"
    assert (env.node_rank, env.num_nodes, env.is_master) == (0, 1, True)
    assert env.network_interface == "eth0" and env.cluster_source == "resourceconfig"
    assert env.num_cpus == resources.cpu_count() and env.num_gpus == 0 and env.gpus == ()
    assert env.memory_bytes == resources.memory_bytes()


def test_platform_hyperparameters_never_reach_argv(research_tree):
    env = build_env(research_tree)
    assert env.to_cmd_args() == [
        "--lr", "0.1", "--epochs", "3", "--flag", "true", "--layers", "[1,2]",
        "--cfg", '{"a":1}', "--name", "x y",
    ]
    assert not any("sagemaker" in arg for arg in env.to_cmd_args())
    assert env.user_args == tuple(env.to_cmd_args())


def test_job_name_precedence(research_tree, job_tree):
    assert build_env(research_tree).job_name == "job-123"
    assert build_env(research_tree, TRAINING_JOB_NAME="sm-job").job_name == "sm-job"
    assert build_env(research_tree, TRAINING_JOB_NAME="sm-job", TRAINENV_JOB_NAME="mine").job_name == "mine"
    assert build_env(job_tree()).job_name == "trainenv-job"


# ---------------------------------------------------------------------------------------
# Frozen, a read-only mapping, JSON round trip

MAPPING_FIELDS = ("hyperparameters", "framework_parameters", "channel_dirs", "input_data_config", "output_dirs", "resource_config")


def test_snapshot_is_frozen(research_tree):
    env = build_env(research_tree)
    with pytest.raises(FrozenRecordError):
        env.num_cpus = 99  # type: ignore[misc]
    with pytest.raises(FrozenRecordError):
        del env.hosts  # type: ignore[misc]
    for name in MAPPING_FIELDS:
        mapping = env[name]
        key = next(iter(mapping))
        for method, args in (
            ("__setitem__", ("injected", 1)),
            ("__delitem__", (key,)),
            ("update", ({"injected": 1},)),
            ("pop", (key,)),
            ("popitem", ()),
            ("setdefault", ("injected", 1)),
            ("clear", ()),
            ("__ior__", ({"injected": 1},)),
        ):
            with pytest.raises(TypeError):
                getattr(mapping, method)(*args)
        assert key in mapping and "injected" not in mapping
    for name in ("hosts", "channels", "user_args", "gpus"):
        assert isinstance(env[name], tuple)
    assert env.num_cpus == resources.cpu_count()


@pytest.mark.parametrize("mutate", [
    lambda env: env.hyperparameters["cfg"].__setitem__("a", 2),
    lambda env: env.hyperparameters["layers"].append(3),
    lambda env: env.input_data_config["train"].__setitem__("ContentType", "evil"),
    lambda env: env.resource_config["hosts"].append("algo-2"),
], ids=["hp-dict", "hp-list", "channel-config", "resource-config-list"])
def test_nested_values_are_read_only_too(research_tree, mutate):
    env = build_env(research_tree)
    before = to_env_vars(env, ("sagemaker",))
    with pytest.raises((TypeError, AttributeError)):
        mutate(env)
    assert to_env_vars(env, ("sagemaker",)) == before


def test_snapshot_is_a_mapping(research_tree):
    env = build_env(research_tree)
    names = list(fields(TrainingEnv))
    as_dict = dict(env)
    assert list(as_dict) == names and len(env) == len(names)
    assert env["hosts"] == ("algo-1",) and "hosts" in env and "nope" not in env
    with pytest.raises(KeyError):
        env["nope"]
    assert as_dict["hyperparameters"]["lr"] == 0.1


def test_json_round_trip(research_tree):
    env = build_env(research_tree)
    again = TrainingEnv.from_dict(json.loads(env.to_json()))
    assert again == env
    assert again.to_dict() == env.to_dict()
    assert again.to_json() == env.to_json()
    for name in MAPPING_FIELDS:
        with pytest.raises(TypeError):
            again[name]["injected"] = 1
    assert isinstance(again.hosts, tuple) and isinstance(again.user_args, tuple)


def test_round_trip_keeps_gpus(research_tree, fake_nvml):
    env = build_env(research_tree)
    assert env.num_gpus == 2
    again = TrainingEnv.from_dict(json.loads(env.to_json()))
    assert again == env and again.gpus[1]["uuid"] == env.gpus[1]["uuid"]


def test_json_dumps_of_dict_env(research_tree):
    env = build_env(research_tree)
    assert json.loads(json.dumps(dict(env))) == env.to_dict()


# ---------------------------------------------------------------------------------------
# TRAINENV_ENV_FILE: inside a job the snapshot is loaded, not probed again


def write_snapshot(path: Path, env: TrainingEnv, **changes) -> Path:
    data = env.to_dict()
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_training_env_loads_the_env_file_without_probing(research_tree, tmp_path, monkeypatch):
    snapshot = write_snapshot(tmp_path / "env.json", build_env(research_tree), num_cpus=77, hosts=["h-from-file"])
    # The tree itself is now unreadable as a job: probing it would fail.
    (research_tree / "input/config/hyperparameters.json").write_text("{broken")
    env = training_env({"TRAINENV_ENV_FILE": str(snapshot), "TRAINENV_BASE_DIR": str(research_tree)})
    assert env.num_cpus == 77 and env.hosts == ("h-from-file",)
    monkeypatch.setenv("TRAINENV_ENV_FILE", str(snapshot))
    monkeypatch.setenv("TRAINENV_BASE_DIR", str(research_tree))
    assert training_env().num_cpus == 77


def test_env_file_that_is_not_json(tmp_path):
    path = tmp_path / "env.json"
    path.write_text('{"base_dir": ')
    with pytest.raises(ConfigError) as excinfo:
        load_training_env(str(path))
    one_line_error(excinfo, str(path), "line 1 column")


def test_env_file_that_is_a_list(tmp_path):
    path = tmp_path / "env.json"
    path.write_text("[]")
    with pytest.raises(ConfigError) as excinfo:
        training_env({"TRAINENV_ENV_FILE": str(path)})
    one_line_error(excinfo, str(path))


def test_env_file_missing_fields_names_the_file(tmp_path):
    path = tmp_path / "env.json"
    path.write_text('{"base_dir": "/ml"}')
    with pytest.raises(ConfigError) as excinfo:
        load_training_env(str(path))
    one_line_error(excinfo, str(path), "missing fields")


# ---------------------------------------------------------------------------------------
# Local mode, and building never writes


@without_ml_dir
def test_local_mode_resolves_under_cwd_and_creates_nothing(tmp_path, monkeypatch, tree_state):
    cwd = tmp_path / "laptop"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    env = training_env({})
    assert env.local_mode is True
    assert env.base_dir == str(cwd / "trainenv-job")
    assert env.model_dir == str(cwd / "trainenv-job/output/model")
    assert env.hyperparameters == {} and env.channels == () and env.num_nodes == 1
    assert list(cwd.iterdir()) == []
    other = build_training_env({"TRAINENV_LOCAL_DIR": "jobs/one"})
    assert other.base_dir == str(cwd / "jobs/one") and other.local_mode
    assert list(cwd.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["laptop"]


def test_building_reads_and_never_writes(research_tree, tree_state, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree_state(tmp_path)
    env = build_env(research_tree)
    to_env_vars(env, ("pai", "sagemaker", "vertex"))
    env.to_json()
    assert tree_state(tmp_path) == before
    assert not os.path.exists(env.checkpoint_dir) and not os.path.exists(env.tensorboard_dir)


# ---------------------------------------------------------------------------------------
# Channels and output channels


def test_channels_are_inputdataconfig_then_dirs(job_tree):
    base = job_tree(
        input_data_config={"zeta": {"TrainingInputMode": "File"}, "alpha": {}},
        channels=["alpha", "extra-b", "extra-a"],
        files={"input/data/loose-file": "x"},
    )
    env = build_env(base)
    assert env.channels == ("zeta", "alpha", "extra-a", "extra-b")
    data_dir = Path(env.data_dir)
    for channel, directory in env.channel_dirs.items():
        assert Path(directory).parent == data_dir and Path(directory).name == channel


def test_extra_output_dirs_are_output_channels(job_tree):
    env = build_env(job_tree(output_channels=["profiler", "data"]))
    assert list(env.output_dirs) == ["model", "checkpoints", "tensorboard", "data", "profiler"]
    assert env.output_dirs["profiler"] == str(Path(env.output_dir) / "profiler")


def test_hyperparameter_names_that_collide_after_normalization(job_tree):
    with pytest.raises(ConfigError) as excinfo:
        build_env(job_tree(hyperparameters={"learning-rate": "1", "learning_rate": "2"}))
    one_line_error(excinfo, "'learning-rate'", "'learning_rate'", "LEARNING_RATE")


def test_channel_names_that_collide_after_normalization(job_tree):
    with pytest.raises(ConfigError) as excinfo:
        build_env(job_tree(channels=["train-a", "train_a"]))
    one_line_error(excinfo, "'train-a'", "'train_a'")


def test_name_collision_error_names_the_file(job_tree):
    base = job_tree(hyperparameters={"learning-rate": "1", "learning_rate": "2"})
    with pytest.raises(ConfigError) as excinfo:
        build_env(base)
    one_line_error(excinfo, str(base / "input/config/hyperparameters.json"))


# ---------------------------------------------------------------------------------------
# Bad cluster, cgroup and GPU input: one line naming the source and the key; nothing written


def rc(**values):
    return {"current_host": "algo-1", "hosts": ["algo-1", "algo-2"], **values}


BAD_CLUSTER = [
    pytest.param(rc(current_host="algo-9"), {}, ["resourceconfig.json", "current_host", "'algo-9'"], id="current-host-not-in-hosts"),
    pytest.param(rc(hosts=["algo-1", "algo-1"]), {}, ["resourceconfig.json", "hosts", "'algo-1'", "twice"], id="duplicate-hosts"),
    pytest.param(rc(hosts=[]), {}, ["resourceconfig.json", "hosts", "empty"], id="empty-hosts"),
    pytest.param(rc(hosts="algo-1"), {}, ["resourceconfig.json", "hosts"], id="hosts-not-a-list"),
    pytest.param(rc(hosts=["algo-1", "bad host"]), {}, ["resourceconfig.json", "hosts[1]", "'bad host'"], id="host-with-space"),
    pytest.param({"hosts": ["algo-1"]}, {}, ["resourceconfig.json", "current_host", "missing"], id="no-current-host"),
    pytest.param(None, {"TF_CONFIG": '{"cluster": {"worker": ["a:1"]'}, ["TF_CONFIG", "not valid JSON"], id="tf-config-not-json"),
    pytest.param(None, {"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 5}}'}, ["TF_CONFIG", "task.index", "5"], id="tf-config-index"),
    pytest.param(None, {"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "boss", "index": 0}}'}, ["TF_CONFIG", "task.type", "'boss'"], id="tf-config-type"),
    pytest.param(None, {"TF_CONFIG": '{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}'}, ["TF_CONFIG", "cluster", "twice"], id="tf-config-duplicate"),
    pytest.param(None, {"TRAINENV_HOSTS": '["h1", "h1"]', "TRAINENV_CURRENT_HOST": "h1"}, ["TRAINENV_HOSTS", "'h1'", "twice"], id="trainenv-hosts-duplicate"),
    pytest.param(None, {"TRAINENV_HOSTS": '["h1", "h2"]', "TRAINENV_CURRENT_HOST": "h3"}, ["TRAINENV_CURRENT_HOST", "'h3'"], id="trainenv-current-host"),
    pytest.param(None, {"MASTER_ADDR": "m", "RANK": "-1", "WORLD_SIZE": "2"}, ["RANK", "'-1'"], id="negative-rank"),
    pytest.param(None, {"MASTER_ADDR": "m", "RANK": "2", "WORLD_SIZE": "2"}, ["RANK", "WORLD_SIZE"], id="rank-too-big"),
]


@pytest.mark.parametrize("resource_config, environ, fragments", BAD_CLUSTER)
def test_bad_cluster_input(job_tree, tree_state, resource_config, environ, fragments):
    base = job_tree(hyperparameters={"lr": "0.1"}, resource_config=resource_config)
    before = tree_state(base)
    with pytest.raises(ConfigError) as excinfo:
        build_env(base, **environ)
    one_line_error(excinfo, *fragments)
    if resource_config is not None:
        assert str(base / "input/config/resourceconfig.json") in str(excinfo.value)
    assert tree_state(base) == before


def fake_cgroup(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "relative, text",
    [
        ("sys/fs/cgroup/cpu.max", "abc 100000\n"),
        ("sys/fs/cgroup/cpu.max", "-50000 100000\n"),
        ("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-5\n"),
        ("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "lots\n"),
        ("sys/fs/cgroup/memory.max", "-1\n"),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "12GB\n"),
    ],
    ids=["v2-cpu-text", "v2-cpu-negative", "v1-quota-negative", "v1-quota-text", "v2-memory-negative", "v1-memory-units"],
)
def test_bad_cgroup_values(job_tree, tree_state, tmp_path, relative, text):
    base = job_tree(hyperparameters={"lr": "0.1"})
    root = tmp_path / "fake-root"
    path = fake_cgroup(root, relative, text)
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        build_training_env({"TRAINENV_BASE_DIR": str(base)}, root=str(root))
    one_line_error(excinfo, str(path), repr(text.strip()))
    assert tree_state(tmp_path) == before


def test_a_cgroup_quota_caps_num_cpus(job_tree, tmp_path):
    root = tmp_path / "fake-root"
    fake_cgroup(root, "sys/fs/cgroup/cpu.max", "100000 100000\n")
    env = build_training_env({"TRAINENV_BASE_DIR": str(job_tree())}, root=str(root))
    assert env.num_cpus == 1


def test_gpus_come_from_nvml_and_visibility(job_tree, fake_nvml):
    base = job_tree()
    env = build_env(base)
    assert env.num_gpus == 2
    assert [g["index"] for g in env.gpus] == [0, 1]
    assert env.gpus[0]["name"] == "Fake GPU 80GB" and env.gpus[0]["memory_bytes"] == 80 * 1024**3
    only_second = build_env(base, CUDA_VISIBLE_DEVICES="1")
    assert only_second.num_gpus == 1
    assert only_second.gpus[0]["index"] == 0  # cuda:0 inside the job
    assert only_second.gpus[0]["uuid"].startswith("GPU-00000001")
    assert build_env(base, CUDA_VISIBLE_DEVICES="").num_gpus == 0
    assert build_env(base, CUDA_VISIBLE_DEVICES="-1").num_gpus == 0


@pytest.mark.parametrize(
    "variable, value, fragments",
    [
        ("CUDA_VISIBLE_DEVICES", "7", ["'7'", "no such GPU", "this node has 2"]),
        ("CUDA_VISIBLE_DEVICES", "0,0", ["'0'", "same GPU"]),
        ("CUDA_VISIBLE_DEVICES", "GPU-99", ["'GPU-99'", "no such GPU"]),
        ("CUDA_VISIBLE_DEVICES", "gpu0", ["'gpu0'", "not a GPU index"]),
        ("NVIDIA_VISIBLE_DEVICES", "3", ["'3'", "no such GPU"]),
    ],
)
def test_visible_devices_naming_gpus_that_do_not_exist(job_tree, tree_state, fake_nvml, variable, value, fragments):
    base = job_tree()
    before = tree_state(base)
    with pytest.raises(ConfigError) as excinfo:
        build_env(base, **{variable: value})
    one_line_error(excinfo, variable, *fragments)
    assert tree_state(base) == before
