"""trainenv.exports: the variables and argv the entry point receives.

The SageMaker name set is checked name for name against what AWS's toolkit produced for the
fake SageMaker job (tests/data); the PAI, Vertex and multi-node sets against the README;
the size cap by exec-ing a real ``/bin/true`` with the result.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from support import build_env, job_environ, make_tree, run_train, run_trainenv
from trainenv.environment import training_env
from trainenv.errors import ConfigError
from trainenv.exports import MAX_VAR_BYTES, OMITTED_NAME, entry_bytes, parse_compat, to_env_vars
from trainenv.values import cmd_value, env_value, normalize, normalized_names, to_cmd_args

ALL_COMPAT = ("pai", "sagemaker", "vertex")


def var_bytes(name: str, value: str) -> int:
    """``NAME=value`` as the kernel counts it (without the NUL)."""
    return len(name.encode()) + 1 + len(value.encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------------------------------
# Names and values


@pytest.mark.parametrize(
    "name, expected",
    [
        ("lr", "LR"),
        ("learning-rate", "LEARNING_RATE"),
        ("model.layers", "MODEL_LAYERS"),
        ("a:b/c+d", "A_B_C_D"),
        ("Mixed_Case9", "MIXED_CASE9"),
        ("validation-1", "VALIDATION_1"),
    ],
)
def test_normalize(name, expected):
    assert normalize(name) == expected


def test_normalized_names_refuses_collisions():
    assert normalized_names(["a-b", "c"], "hyperparameter") == {"a-b": "A_B", "c": "C"}
    with pytest.raises(ConfigError) as excinfo:
        normalized_names(["a-b", "a.b"], "hyperparameter")
    assert "'a-b'" in str(excinfo.value) and "'a.b'" in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    "value, as_env, as_arg",
    [
        ("x y", "x y", "x y"),
        ("", "", ""),
        (True, "true", "true"),
        (False, "false", "false"),
        (None, "", "null"),
        (3, "3", "3"),
        (0.001, "0.001", "0.001"),
        ([1, 2], "[1,2]", "[1,2]"),
        ({"a": [1, "x"]}, '{"a":[1,"x"]}', '{"a":[1,"x"]}'),
        ("café", "café", "café"),
    ],
)
def test_values_as_env_and_as_argv(value, as_env, as_arg):
    assert env_value(value) == as_env
    assert cmd_value(value) == as_arg


def test_cmd_args_keep_file_order_one_element_per_value():
    args = to_cmd_args({"zeta": 1, "alpha": "two words", "h": True, "layers": [1, 2], "cfg": {"a": None}, "none": None})
    assert args == ["--zeta", "1", "--alpha", "two words", "--h", "true", "--layers", "[1,2]", "--cfg", '{"a":null}', "--none", "null"]


def test_argv_reaches_a_real_process_unchanged(job_tree):
    hps = {"name": json.dumps("x y"), "quote": json.dumps("it's \"q\""), "empty": json.dumps(""), "flag": "true"}
    env = build_env(job_tree(hyperparameters=hps))
    out = subprocess.run(
        ["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *env.to_cmd_args()],
        capture_output=True, text=True, check=True,
    ).stdout
    assert json.loads(out) == ["--name", "x y", "--quote", "it's \"q\"", "--empty", "", "--flag", "true"]


@pytest.mark.parametrize(
    "text, expected",
    [("pai", ("pai",)), ("none", ()), ("PAI, sagemaker,pai", ("pai", "sagemaker")), ("vertex,sagemaker", ("vertex", "sagemaker")), ("", ())],
)
def test_parse_compat(text, expected):
    assert parse_compat(text) == expected


@pytest.mark.parametrize("text", ["bogus", "pai,aws", "none,pai"])
def test_parse_compat_refuses_unknown_sets(text):
    with pytest.raises(ConfigError) as excinfo:
        parse_compat(text)
    assert str(excinfo.value).startswith("TRAINENV_COMPAT: ")


# ---------------------------------------------------------------------------------------
# The SageMaker set: name for name with AWS's toolkit on the research tree

AWS_NAMES = {
    "SM_CHANNELS", "SM_CHANNEL_TRAIN", "SM_CHANNEL_VALIDATION", "SM_CURRENT_HOST",
    "SM_CURRENT_INSTANCE_GROUP", "SM_CURRENT_INSTANCE_GROUP_HOSTS", "SM_CURRENT_INSTANCE_TYPE",
    "SM_DISTRIBUTION_INSTANCE_GROUPS", "SM_FRAMEWORK_MODULE", "SM_FRAMEWORK_PARAMS", "SM_HOSTS",
    "SM_HPS", "SM_HP_CFG", "SM_HP_EPOCHS", "SM_HP_FLAG", "SM_HP_LAYERS", "SM_HP_LR", "SM_HP_NAME",
    "SM_INPUT_CONFIG_DIR", "SM_INPUT_DATA_CONFIG", "SM_INPUT_DIR", "SM_INSTANCE_GROUPS",
    "SM_INSTANCE_GROUPS_DICT", "SM_IS_HETERO", "SM_LOG_LEVEL", "SM_MODEL_DIR", "SM_MODULE_DIR",
    "SM_MODULE_NAME", "SM_NETWORK_INTERFACE_NAME", "SM_NUM_CPUS", "SM_NUM_GPUS", "SM_NUM_NEURONS",
    "SM_OUTPUT_DATA_DIR", "SM_OUTPUT_DIR", "SM_OUTPUT_INTERMEDIATE_DIR", "SM_RESOURCE_CONFIG",
    "SM_TRAINING_ENV", "SM_USER_ARGS", "SM_USER_ENTRY_POINT",
}
AWS_TRAINING_ENV_KEYS = {
    "additional_framework_parameters", "channel_input_dirs", "current_host", "current_instance_group",
    "current_instance_group_hosts", "current_instance_type", "distribution_hosts",
    "distribution_instance_groups", "framework_module", "hosts", "hyperparameters", "input_config_dir",
    "input_data_config", "input_dir", "instance_groups", "instance_groups_dict", "is_hetero", "is_master",
    "is_modelparallel_enabled", "is_smddpmprun_installed", "is_smddprun_installed", "job_name", "log_level",
    "master_hostname", "model_dir", "module_dir", "module_name", "network_interface_name", "num_cpus",
    "num_gpus", "num_neurons", "output_data_dir", "output_dir", "output_intermediate_dir", "resource_config",
    "topology", "user_entry_point",
}


def test_sagemaker_names_match_aws_for_the_research_tree(research_tree):
    assert len(AWS_NAMES) == 39 and len(AWS_TRAINING_ENV_KEYS) == 37
    env = build_env(research_tree)
    variables = to_env_vars(env, ("sagemaker",), entry_point="train.py")
    assert {k for k in variables if k.startswith("SM_")} == AWS_NAMES
    assert {k for k in variables if not k.startswith("SM_")} == {k for k in to_env_vars(env, ()) }
    assert set(json.loads(variables["SM_TRAINING_ENV"])) == AWS_TRAINING_ENV_KEYS


def test_sagemaker_values_match_aws_for_the_research_tree(research_tree):
    env = build_env(research_tree)
    v = to_env_vars(env, ("sagemaker",), entry_point="train.py")
    config = research_tree / "input/config"
    # Same text as AWS's toolkit ...
    same = {
        "SM_CURRENT_HOST": "algo-1", "SM_CURRENT_INSTANCE_GROUP": "homogeneousCluster",
        "SM_CURRENT_INSTANCE_GROUP_HOSTS": '["algo-1"]', "SM_CURRENT_INSTANCE_TYPE": "ml.m5.xlarge",
        "SM_DISTRIBUTION_INSTANCE_GROUPS": "[]", "SM_FRAMEWORK_MODULE": "", "SM_FRAMEWORK_PARAMS": "{}",
        "SM_HOSTS": '["algo-1"]', "SM_CHANNELS": '["train","validation"]', "SM_HP_CFG": '{"a":1}',
        "SM_HP_EPOCHS": "3", "SM_HP_FLAG": "true", "SM_HP_LAYERS": "[1,2]", "SM_HP_LR": "0.1",
        "SM_HP_NAME": "x y", "SM_INSTANCE_GROUPS": '["homogeneousCluster"]', "SM_IS_HETERO": "false",
        "SM_LOG_LEVEL": "20", "SM_MODULE_NAME": "train", "SM_NETWORK_INTERFACE_NAME": "eth0",
        "SM_NUM_GPUS": "0", "SM_NUM_NEURONS": "0", "SM_USER_ENTRY_POINT": "train.py",
        "SM_CHANNEL_TRAIN": env.channel_dirs["train"], "SM_CHANNEL_VALIDATION": env.channel_dirs["validation"],
        "SM_INPUT_DIR": f"{research_tree}/input", "SM_INPUT_CONFIG_DIR": str(config),
        "SM_OUTPUT_DIR": env.output_dir, "SM_OUTPUT_DATA_DIR": f"{env.output_dir}/data",
        "SM_OUTPUT_INTERMEDIATE_DIR": f"{env.output_dir}/intermediate",
        "SM_MODEL_DIR": env.model_dir, "SM_MODULE_DIR": env.code_dir, "SM_NUM_CPUS": str(env.num_cpus),
    }
    assert {k: v[k] for k in same} == same
    # ... the same data where AWS sorts keys (we keep file order) ...
    assert json.loads(v["SM_HPS"]) == {"cfg": {"a": 1}, "epochs": 3, "flag": True, "layers": [1, 2], "lr": 0.1, "name": "x y"}
    assert json.loads(v["SM_INPUT_DATA_CONFIG"]) == json.loads((config / "inputdataconfig.json").read_text())
    assert json.loads(v["SM_RESOURCE_CONFIG"]) == json.loads((config / "resourceconfig.json").read_text())
    assert json.loads(v["SM_INSTANCE_GROUPS_DICT"]) == {
        "homogeneousCluster": {"hosts": ["algo-1"], "instance_group_name": "homogeneousCluster", "instance_type": "ml.m5.xlarge"}
    }
    training = json.loads(v["SM_TRAINING_ENV"])
    assert training["hyperparameters"] == json.loads(v["SM_HPS"])
    assert training["master_hostname"] == "algo-1" and training["is_master"] is True
    assert training["channel_input_dirs"] == dict(env.channel_dirs)
    # ... and the documented difference: argv in file order with JSON values, not sorted Python str().
    assert json.loads(v["SM_USER_ARGS"]) == [
        "--lr", "0.1", "--epochs", "3", "--flag", "true", "--layers", "[1,2]", "--cfg", '{"a":1}', "--name", "x y",
    ]


def test_sagemaker_hp_names_are_normalized(job_tree):
    env = build_env(job_tree(hyperparameters={"learning-rate": "0.1", "model.depth": "3"}))
    v = to_env_vars(env, ("sagemaker",))
    assert v["SM_HP_LEARNING_RATE"] == "0.1" and v["SM_HP_MODEL_DEPTH"] == "3"
    assert "SM_HP_LEARNING-RATE" not in v
    assert all(name.replace("_", "").isalnum() and name.isascii() for name in v)


def test_sagemaker_framework_params_hold_unknown_platform_hyperparameters(research_tree):
    path = research_tree / "input/config/hyperparameters.json"
    hps = json.loads(path.read_text())
    hps["sagemaker_mpi_enabled"] = "true"
    path.write_text(json.dumps(hps))
    v = to_env_vars(build_env(research_tree), ("sagemaker",))
    assert json.loads(v["SM_FRAMEWORK_PARAMS"]) == {"sagemaker_mpi_enabled": True}
    assert json.loads(v["SM_DISTRIBUTION_INSTANCE_GROUPS"]) == ["homogeneousCluster"]
    assert "sagemaker_mpi_enabled" not in v["SM_HPS"] and "sagemaker" not in v["SM_USER_ARGS"]


@pytest.mark.parametrize(
    "hp_extra, rc_extra",
    [
        ({"sagemaker_distribution_instance_groups": "5"}, {}),
        ({"sagemaker_distribution_instance_groups": json.dumps([["g"]])}, {}),
        ({}, {"current_group_name": ["homogeneousCluster"]}),
        ({}, {"instance_groups": [{"instance_group_name": "g", "hosts": 5}], "current_group_name": "g"}),
    ],
    ids=["groups-int", "groups-nested-list", "current-group-list", "group-hosts-int"],
)
def test_malformed_sagemaker_platform_values_are_config_errors(research_tree, hp_extra, rc_extra):
    config = research_tree / "input/config"
    hps = json.loads((config / "hyperparameters.json").read_text())
    rc = json.loads((config / "resourceconfig.json").read_text())
    hps.update(hp_extra)
    rc.update(rc_extra)
    (config / "hyperparameters.json").write_text(json.dumps(hps))
    (config / "resourceconfig.json").write_text(json.dumps(rc))
    with pytest.raises(ConfigError) as excinfo:
        to_env_vars(build_env(research_tree), ("sagemaker",))
    assert str(config) in str(excinfo.value)


# ---------------------------------------------------------------------------------------
# The always set, PAI and Vertex

CONTRACT_ALWAYS = {
    "TRAINENV_HPS", "TRAINENV_USER_ARGS", "TRAINENV_CHANNELS", "TRAINENV_MODEL_DIR",
    "TRAINENV_CHECKPOINT_DIR", "TRAINENV_OUTPUT_DIR", "TRAINENV_CODE_DIR", "TRAINENV_HOSTS",
    "TRAINENV_CURRENT_HOST", "TRAINENV_MASTER_HOST", "TRAINENV_NODE_RANK", "TRAINENV_NUM_NODES",
    "TRAINENV_NUM_CPUS", "TRAINENV_NUM_GPUS",
}
MULTI_NODE = {
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "NPROC_PER_NODE", "PET_MASTER_ADDR",
    "PET_MASTER_PORT", "PET_NODE_RANK", "PET_NNODES", "PET_NPROC_PER_NODE", "TF_CONFIG",
}
PROCESS_LEVEL = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}


def test_always_set_is_the_contract_set(research_tree):
    env = build_env(research_tree)
    v = to_env_vars(env, ())
    per_name = {f"TRAINENV_HP_{normalize(n)}" for n in env.hyperparameters} | {
        f"TRAINENV_CHANNEL_{normalize(c)}" for c in env.channels
    }
    assert set(v) == CONTRACT_ALWAYS | per_name | {"TRAINENV_BASE_DIR"}
    assert json.loads(v["TRAINENV_HPS"]) == dict(env.hyperparameters)
    assert json.loads(v["TRAINENV_USER_ARGS"]) == list(env.user_args)
    assert json.loads(v["TRAINENV_CHANNELS"]) == ["train", "validation"]
    assert json.loads(v["TRAINENV_HOSTS"]) == ["algo-1"]
    assert v["TRAINENV_HP_LAYERS"] == "[1,2]" and v["TRAINENV_HP_NAME"] == "x y"
    assert v["TRAINENV_CHANNEL_TRAIN"] == env.channel_dirs["train"]
    assert (v["TRAINENV_NODE_RANK"], v["TRAINENV_NUM_NODES"], v["TRAINENV_NUM_GPUS"]) == ("0", "1", "0")
    assert v["TRAINENV_NUM_CPUS"] == str(env.num_cpus)
    assert all(isinstance(value, str) for value in v.values())


def test_compat_sets_are_selected(research_tree):
    env = build_env(research_tree)
    prefixes = lambda compat: {name.split("_")[0] for name in to_env_vars(env, compat)}  # noqa: E731
    assert prefixes(()) == {"TRAINENV"}
    assert prefixes(("pai",)) == {"TRAINENV", "PAI"}
    assert prefixes(("sagemaker",)) == {"TRAINENV", "SM"}
    assert prefixes(("vertex",)) == {"TRAINENV", "AIP"}
    assert prefixes(ALL_COMPAT) == {"TRAINENV", "PAI", "SM", "AIP"}
    assert to_env_vars(env) == to_env_vars(env, ("pai",)), "pai is the default"


def test_pai_set(research_tree):
    env = build_env(research_tree)
    v = to_env_vars(env, ("pai",))
    pai = {k for k in v if k.startswith("PAI_")}
    assert pai == {
        "PAI_HPS", "PAI_USER_ARGS", "PAI_WORKING_DIR", "PAI_CONFIG_DIR",
        "PAI_HPS_LR", "PAI_HPS_EPOCHS", "PAI_HPS_FLAG", "PAI_HPS_LAYERS", "PAI_HPS_CFG", "PAI_HPS_NAME",
        "PAI_INPUT_TRAIN", "PAI_INPUT_VALIDATION",
        "PAI_OUTPUT_MODEL", "PAI_OUTPUT_CHECKPOINTS", "PAI_OUTPUT_TENSORBOARD",
    }
    # PAI writes every value as a string.
    assert json.loads(v["PAI_HPS"]) == {"lr": "0.1", "epochs": "3", "flag": "true", "layers": "[1,2]", "cfg": '{"a":1}', "name": "x y"}
    assert v["PAI_WORKING_DIR"] == env.code_dir and v["PAI_CONFIG_DIR"] == env.config_dir
    assert v["PAI_OUTPUT_MODEL"] == env.model_dir and v["PAI_INPUT_TRAIN"] == env.channel_dirs["train"]


HOSTILE = [
    "two words",
    "it's",
    'say "hi"',
    "$(touch {marker})",
    "`touch {marker}`",
    "; touch {marker}",
    "",
    "tab\tand\nnewline",
    "back\\slash",
    "--looks-like-a-flag",
    "*",
    "~",
    "$HOME",
    "'",
    "café ☕",
]


def hostile_values(marker: Path) -> list:
    return [value.replace("{marker}", str(marker)) for value in HOSTILE]


def test_pai_user_args_quote_each_token_once(job_tree, tmp_path):
    marker = tmp_path / "pwned"
    values = hostile_values(marker)
    env = build_env(job_tree(hyperparameters={f"v{i}": json.dumps(value) for i, value in enumerate(values)}))
    expected = [item for i, value in enumerate(values) for item in (f"--v{i}", value)]
    assert list(env.user_args) == expected
    pai_user_args = to_env_vars(env, ("pai",))["PAI_USER_ARGS"]
    assert shlex.split(pai_user_args) == expected
    # And a real shell splits it the same way without running anything.
    script = 'eval "set -- $PAI_USER_ARGS"; for a in "$@"; do printf "%s\\0" "$a"; done'
    out = subprocess.run(["sh", "-c", script], env={"PAI_USER_ARGS": pai_user_args, "PATH": os.environ["PATH"]},
                         capture_output=True, check=True).stdout
    assert out.decode("utf-8").split("\0")[:-1] == expected
    assert not marker.exists()


def test_vertex_set(research_tree):
    env = build_env(research_tree)
    v = to_env_vars(env, ("vertex",))
    assert {k for k in v if k.startswith("AIP_")} == {
        "AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR", "AIP_TRAINING_DATA_URI", "AIP_VALIDATION_DATA_URI",
    }
    assert v["AIP_TRAINING_DATA_URI"] == env.channel_dirs["train"]
    assert v["AIP_TENSORBOARD_LOG_DIR"] == env.tensorboard_dir
    assert "CLUSTER_SPEC" not in v


# ---------------------------------------------------------------------------------------
# Several nodes


def three_nodes(job_tree, current="algo-2", **extra):
    return job_tree(
        hyperparameters={"lr": "0.1"},
        resource_config={"current_host": current, "hosts": ["algo-1", "algo-2", "algo-3"], "network_interface_name": "eth1", **extra},
        channels=["train"],
    )


def test_multi_node_names_only_with_several_nodes(research_tree, job_tree):
    single = to_env_vars(build_env(research_tree), ALL_COMPAT)
    assert not MULTI_NODE & set(single) and "CLUSTER_SPEC" not in single and "NCCL_SOCKET_IFNAME" not in single
    several = to_env_vars(build_env(three_nodes(job_tree)), ALL_COMPAT)
    assert MULTI_NODE <= set(several)
    assert not PROCESS_LEVEL & set(single) and not PROCESS_LEVEL & set(several)


def test_multi_node_values(job_tree):
    env = build_env(three_nodes(job_tree))
    v = to_env_vars(env, ALL_COMPAT)
    assert (v["MASTER_ADDR"], v["MASTER_PORT"], v["NODE_RANK"], v["NNODES"], v["NPROC_PER_NODE"]) == ("algo-1", "29500", "1", "3", "1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "NPROC_PER_NODE"):
        assert v["PET_" + name] == v[name]
    assert json.loads(v["TF_CONFIG"]) == {
        "cluster": {"worker": ["algo-1:2222", "algo-2:2222", "algo-3:2222"]},
        "task": {"type": "worker", "index": 1},
        "environment": "cloud",
    }
    spec = json.loads(v["CLUSTER_SPEC"])
    assert spec["cluster"] == {"workerpool0": ["algo-1:2222"], "workerpool1": ["algo-2:2222", "algo-3:2222"]}
    assert spec["task"] == {"type": "workerpool1", "index": 0}
    assert v["NCCL_SOCKET_IFNAME"] == v["GLOO_SOCKET_IFNAME"] == "eth1"
    assert (v["TRAINENV_NODE_RANK"], v["TRAINENV_NUM_NODES"], v["TRAINENV_MASTER_HOST"]) == ("1", "3", "algo-1")
    chosen = to_env_vars(env, (), nproc_per_node=4, master_port=1234)
    assert (chosen["NPROC_PER_NODE"], chosen["MASTER_PORT"], chosen["PET_MASTER_PORT"]) == ("4", "1234", "1234")


def test_platform_master_port_is_kept(job_tree):
    v = to_env_vars(build_env(three_nodes(job_tree, current="algo-1"), MASTER_PORT="23456"), ())
    assert v["MASTER_PORT"] == "23456" and v["NODE_RANK"] == "0"


# ---------------------------------------------------------------------------------------
# Size: no variable over 32 KiB, the omitted ones named, the whole launchable


def test_a_value_over_32_kib_stays_in_the_snapshot_only(job_tree, tmp_path):
    big = "x" * (40 * 1024)
    env = build_env(job_tree(hyperparameters={"big": json.dumps(big), "small": "1"}))
    v = to_env_vars(env, ALL_COMPAT)
    for name in ("TRAINENV_HP_BIG", "PAI_HPS_BIG", "SM_HP_BIG", "TRAINENV_HPS", "TRAINENV_USER_ARGS", "PAI_HPS", "SM_HPS"):
        assert name not in v
    assert set(json.loads(v[OMITTED_NAME])) >= {"TRAINENV_HP_BIG", "PAI_HPS_BIG", "SM_HP_BIG", "TRAINENV_HPS"}
    assert v["TRAINENV_HP_SMALL"] == "1"
    assert all(var_bytes(k, value) <= MAX_VAR_BYTES for k, value in v.items())
    # The full snapshot keeps it, and training_env() inside the job reads it back.
    snapshot = tmp_path / "env.json"
    snapshot.write_text(env.to_json())
    assert training_env({"TRAINENV_ENV_FILE": str(snapshot)}).hyperparameters["big"] == big


@pytest.mark.parametrize("char", ["x", "é", "☕", "😀"])
def test_the_cap_counts_bytes_at_the_boundary(job_tree, char):
    name = "TRAINENV_HP_V"
    room = MAX_VAR_BYTES - len(name) - 1
    width = len(char.encode())
    fits = char * (room // width)
    over = fits + "x" * (room - len(fits.encode()) + 1)
    env = build_env(job_tree(hyperparameters={"v": json.dumps(fits), "w": json.dumps(over)}))
    v = to_env_vars(env, ())
    assert var_bytes(name, v[name]) <= MAX_VAR_BYTES and v[name] == fits
    assert "TRAINENV_HP_W" not in v and "TRAINENV_HP_W" in json.loads(v[OMITTED_NAME])


def big_job(job_tree, value_length: int):
    hosts = [f"algo-{i}" for i in range(1, 1001)]
    return job_tree(
        hyperparameters={f"hp_{i}": json.dumps(f"{i}:" + "v" * value_length) for i in range(1000)},
        input_data_config={f"channel_{i}": {"TrainingInputMode": "File"} for i in range(100)},
        resource_config={"current_host": "algo-500", "hosts": hosts, "network_interface_name": "eth0"},
    )


def test_1000_hosts_100_channels_1000_hyperparameters_is_launchable(job_tree):
    env = build_env(big_job(job_tree, 64))
    assert (env.num_nodes, len(env.channels), len(env.hyperparameters)) == (1000, 100, 1000)
    v = to_env_vars(env, ALL_COMPAT, entry_point="train.py")
    assert all(var_bytes(k, value) <= MAX_VAR_BYTES for k, value in v.items())
    assert OMITTED_NAME in v and "SM_TRAINING_ENV" in json.loads(v[OMITTED_NAME])
    assert len(v["TF_CONFIG"]) > 10_000 and v["NNODES"] == "1000"
    total = sum(var_bytes(k, value) + 1 for k, value in v.items()) + sum(len(a.encode()) + 1 for a in env.user_args)
    assert total < os.sysconf("SC_ARG_MAX")
    # The proof: the kernel takes it.
    subprocess.run(["/bin/true", *env.user_args], env=v, check=True)


def test_the_total_environment_stays_under_the_kernel_limit(job_tree):
    env = build_env(big_job(job_tree, 1000))
    v = to_env_vars(env, ALL_COMPAT)
    subprocess.run(["/bin/true"], env=v, check=True)  # env only: argv is the user's own choice


@pytest.mark.parametrize("value", ["x\u0000y", "\ud800"], ids=["nul", "lone-surrogate"])
def test_every_accepted_value_is_launchable(job_tree, value):
    base = job_tree(hyperparameters=json.dumps({"a": value}))
    try:
        env = build_env(base)
    except ConfigError as exc:
        assert str(base) in str(exc) and "'a'" in str(exc)
        return
    subprocess.run(["/bin/true", *env.user_args], env=to_env_vars(env, ALL_COMPAT), check=True)


@pytest.mark.parametrize("value_length, budget", [(200, 256 * 1024), (1000, 1024 * 1024)], ids=["256KiB", "1MiB"])
def test_total_budget_is_respected(job_tree, value_length, budget):
    env = build_env(big_job(job_tree, value_length))
    v = to_env_vars(env, ALL_COMPAT, total_budget=budget)
    assert sum(entry_bytes(k, value) for k, value in v.items()) <= budget
    if value_length < 256:  # 1000 short TRAINENV_HP_* fit in the budget: only the compat copies go
        assert all(f"TRAINENV_HP_HP_{i}" in v for i in range(1000))


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("document", ['{"a": NaN}', '{"a": "1e999"}', '{"a": -Infinity}'], ids=["bare-nan", "string-1e999", "bare-infinity"])
def test_json_variables_are_strict_json(job_tree, document):
    base = job_tree(hyperparameters=document)
    try:
        env = build_env(base)
    except ConfigError:
        return
    v = to_env_vars(env, ALL_COMPAT)
    for name in ("TRAINENV_HPS", "TRAINENV_USER_ARGS", "SM_HPS", "SM_TRAINING_ENV"):
        strict_json(v[name])
    strict_json(v["TRAINENV_HP_A"])


# ---------------------------------------------------------------------------------------
# argv is capped like the environment: real ``trainenv train`` runs

REPORT = (
    "import json, sys\n"
    "from trainenv import training_env\n"
    "names = [a[2:] for a in sys.argv[1::2]]\n"
    "hps = training_env().hyperparameters\n"
    "print(json.dumps({'argv': names, 'sizes': {k: len(str(v)) for k, v in hps.items()}}))\n"
)


def train_report(tmp_path, hyperparameters, preexec_fn=None):
    """Run a real ``trainenv train`` whose entry point reports the argv names and training_env()."""
    base = make_tree(tmp_path, {"train.py": REPORT}, hyperparameters)
    done = run_trainenv(
        "train", env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_COMPAT="pai,sagemaker"), preexec_fn=preexec_fn
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), [line for line in done.stderr.splitlines() if "left out of the arguments" in line]


def test_one_hyperparameter_of_200_kib_is_left_out_of_argv_with_a_warning(tmp_path):
    report, warnings = train_report(tmp_path, {"lr": "0.1", "vocab": "w" * (200 * 1024), "epochs": "3"})
    assert report["argv"] == ["lr", "epochs"]
    assert report["sizes"]["vocab"] == 200 * 1024, "training_env() still has it"
    assert len(warnings) == 1 and "'vocab'" in warnings[0]


def test_25_hyperparameters_of_100_kib_are_left_out_of_argv(tmp_path):
    hps = {f"blob_{i}": "b" * (100 * 1024) for i in range(25)}
    report, warnings = train_report(tmp_path, {"lr": "0.1", **hps})
    assert report["argv"] == ["lr"]
    assert all(report["sizes"][name] == 100 * 1024 for name in hps)
    assert len(warnings) == 25


def test_argv_and_environment_fit_the_limit_the_kernel_computes(tmp_path):
    """A 1 MiB stack: ARG_MAX is 256 KiB, not the usual 2 MiB; values under the cap, too many together."""
    import resource

    def small_stack():
        resource.setrlimit(resource.RLIMIT_STACK, (1024 * 1024, 1024 * 1024))

    hps = {f"part_{i:02d}": "p" * (8 * 1024) for i in range(40)}  # 320 KiB of argv alone
    report, warnings = train_report(tmp_path, hps, preexec_fn=small_stack)
    kept = report["argv"]
    assert 0 < len(kept) < 40 and kept == sorted(kept), "the largest left out, the order of the rest kept"
    assert len(warnings) == 40 - len(kept)
    assert all(report["sizes"][name] == 8 * 1024 for name in hps)


# ---------------------------------------------------------------------------------------
# Compat sagemaker: what AWS's toolkit gives a job


def test_sagemaker_job_name_is_the_platforms_or_null(research_tree):
    env = build_env(research_tree)  # hyperparameters.json names the job (sagemaker_job_name: job-123)
    assert env.job_name == "job-123"
    assert json.loads(to_env_vars(env, ("sagemaker",))["SM_TRAINING_ENV"])["job_name"] is None
    named = to_env_vars(env, ("sagemaker",), training_job_name="train-2026")
    assert json.loads(named["SM_TRAINING_ENV"])["job_name"] == "train-2026"


def test_sagemaker_job_name_in_a_real_job(tmp_path):
    script = "import json, os\nprint(json.dumps(json.loads(os.environ['SM_TRAINING_ENV'])['job_name']))\n"
    base = make_tree(tmp_path, {"train.py": script})
    for extra, expected in (({}, None), ({"TRAINING_JOB_NAME": "sm-job-7"}, "sm-job-7")):
        done = run_train(base, text=True, TRAINENV_ENTRY_POINT="train.py", TRAINENV_COMPAT="sagemaker", **extra)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == expected


def test_sagemaker_output_data_dir_exists_when_the_job_starts(tmp_path):
    script = "import os\nopen(os.path.join(os.environ['SM_OUTPUT_DATA_DIR'], 'metrics.json'), 'w').write('{}')\n"
    base = make_tree(tmp_path, {"train.py": script})
    done = run_train(base, text=True, TRAINENV_ENTRY_POINT="train.py", TRAINENV_COMPAT="sagemaker")
    assert done.returncode == 0, done.stderr
    assert (base / "output" / "data" / "metrics.json").is_file()


def test_an_inherited_environment_near_the_limit_still_launches(tmp_path):
    """ARG_MAX 256 KiB (1 MiB stack), 220 KiB of it inherited: trainenv's own names give way."""
    import resource


    def small_stack():
        resource.setrlimit(resource.RLIMIT_STACK, (1024 * 1024, 1024 * 1024))

    base = make_tree(tmp_path, {"train.py": REPORT}, {"lr": "0.1", "notes": "n" * 20_000})
    inherited = {"BIG_A": "a" * (110 * 1024), "BIG_B": "b" * (110 * 1024)}
    done = run_trainenv(
        "train", env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", **inherited), timeout=60, preexec_fn=small_stack
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["sizes"] == {"lr": 3, "notes": 20_000}
