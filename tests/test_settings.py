"""trainenv.settings: one table of launch settings, resolved flag → TRAINENV_* → trainenv.yaml → default.

Bad values are ConfigErrors naming where they came from (the option, the variable, or the
file and key) and the value; a fuzzer checks that nothing else ever escapes.
"""

from __future__ import annotations

from trainenv.frozen import FrozenRecordError, fields
from pathlib import Path
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainenv.config import read_file_settings
from trainenv.errors import EXIT_CONFIG, ConfigError
from trainenv.settings import (
    CLUSTER_KEYS,
    SETTINGS,
    SETTINGS_BY_NAME,
    LaunchSettings,
    resolve_settings,
)

YAML = "/ml/input/config/trainenv.yaml"


def resolve(flags=None, environ=None, file_settings=None):
    return resolve_settings(flags or {}, environ or {}, file_settings or {}, YAML)


def config_error(flags=None, environ=None, file_settings=None, *fragments):
    with pytest.raises(ConfigError) as excinfo:
        resolve(flags, environ, file_settings)
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.value.exit_code == EXIT_CONFIG
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------
# The table


def test_table_matches_launch_settings():
    names = [name for name in fields(LaunchSettings) if name != "sources"]
    assert [s.name for s in SETTINGS] == names
    defaults = LaunchSettings()
    for setting in SETTINGS:
        assert getattr(defaults, setting.name) == setting.default, setting.name
        assert setting.variable == "TRAINENV_" + setting.name.upper()
        assert setting.flag.split("/")[0] in ("", "--" + setting.name.replace("_", "-"))
        assert setting.help.strip()
    flags = [s.flag for s in SETTINGS if s.flag]
    assert len(set(flags)) == len(flags)


def test_every_launch_variable_is_a_row():
    # The variables trainenv reads to launch a job, each validated once, with a one-line error.
    rows = {s.variable: s for s in SETTINGS}
    assert rows["TRAINENV_INSTALLER"].choices == ("auto", "uv", "pip")
    assert rows["TRAINENV_LOG_LEVEL"].choices == ("quiet", "info", "debug")
    assert not rows["TRAINENV_RUN_DIR"].flag and not rows["TRAINENV_RUN_DIR"].in_file
    assert not rows["TRAINENV_JOB_NAME"].flag and not rows["TRAINENV_JOB_NAME"].in_file
    assert not rows["TRAINENV_LOG_LEVEL"].in_file
    defaults = LaunchSettings()
    assert (defaults.installer, defaults.log_level, defaults.run_dir, defaults.job_name) == ("auto", "info", None, None)
    resolved = resolve(
        {"log_level": "debug"},
        {"TRAINENV_INSTALLER": "PIP", "TRAINENV_RUN_DIR": "/var/run/te", "TRAINENV_JOB_NAME": "job-7", "TRAINENV_LOG_LEVEL": "quiet"},
    )
    assert (resolved.installer, resolved.log_level, resolved.run_dir, resolved.job_name) == ("pip", "debug", "/var/run/te", "job-7")
    assert resolved.sources["job_name"] == "TRAINENV_JOB_NAME"
    assert resolve(file_settings={"installer": "uv"}).installer == "uv"


def test_variable_only_settings_are_not_file_keys_nor_flags():
    config_error({}, {}, {"run_dir": "/tmp/x"}, YAML, "run_dir", "set TRAINENV_RUN_DIR instead")
    config_error({}, {}, {"log-level": "debug"}, YAML, "log-level", "set TRAINENV_LOG_LEVEL instead")
    # A flag value for a setting without a flag (no CLI passes one) is not a source.
    assert resolve({"job_name": "from-flag"}).job_name is None


def test_the_readme_table_is_the_settings_table():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("| setting | option | variable | default |")
    lines = readme[start:].split("\n\n", 1)[0].splitlines()[2:]
    rows = [tuple(cell.strip() for cell in line.strip("|").split("|")[:3]) for line in lines]
    expected = [(f"`{s.name}`", f"`{s.flag}`" if s.flag else "—", f"`{s.variable}`") for s in SETTINGS]
    assert rows == expected


def test_contract_settings_are_present():
    # The documented launch settings (docs/contract.md, section 3), under these variables.
    for name, variable in [
        ("entry_point", "TRAINENV_ENTRY_POINT"),
        ("command", "TRAINENV_COMMAND"),
        ("distribution", "TRAINENV_DISTRIBUTION"),
        ("nproc_per_node", "TRAINENV_NPROC_PER_NODE"),
        ("max_run_seconds", "TRAINENV_MAX_RUN_SECONDS"),
        ("grace_seconds", "TRAINENV_GRACE_SECONDS"),
        ("compat", "TRAINENV_COMPAT"),
    ]:
        assert SETTINGS_BY_NAME[name].variable == variable
    assert SETTINGS_BY_NAME["distribution"].choices == ("none", "torchrun", "mpi", "accelerate", "deepspeed")
    assert LaunchSettings().compat == ("pai",) and LaunchSettings().distribution == "none"


def test_defaults_and_their_source():
    resolved = resolve()
    assert resolved == LaunchSettings()
    assert set(resolved.sources.values()) == {"default"}
    assert resolved.interpreter == sys.executable


def test_resolved_settings_are_frozen():
    resolved = resolve()
    with pytest.raises(FrozenRecordError):
        resolved.distribution = "mpi"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Precedence: flag, variable, file, default


def test_flag_beats_variable_beats_file_beats_default():
    file_settings = {"grace_seconds": 5, "distribution": "mpi", "max_run_seconds": 60}
    environ = {"TRAINENV_GRACE_SECONDS": "7", "TRAINENV_DISTRIBUTION": "torchrun"}
    flags = {"grace_seconds": "9"}
    resolved = resolve(flags, environ, file_settings)
    assert resolved.grace_seconds == 9.0 and resolved.sources["grace_seconds"] == "option --grace-seconds"
    assert resolved.distribution == "torchrun" and resolved.sources["distribution"] == "TRAINENV_DISTRIBUTION"
    assert resolved.max_run_seconds == 60.0 and resolved.sources["max_run_seconds"] == f"{YAML}: max_run_seconds"
    assert resolved.nproc_per_node is None and resolved.sources["nproc_per_node"] == "default"


def test_empty_variable_and_null_file_value_count_as_unset():
    resolved = resolve(environ={"TRAINENV_DISTRIBUTION": ""}, file_settings={"distribution": None})
    assert resolved.distribution == "none" and resolved.sources["distribution"] == "default"


def test_a_false_flag_still_wins():
    resolved = resolve({"install": False}, {"TRAINENV_INSTALL": "true"})
    assert resolved.install is False and resolved.sources["install"] == "option --install"


def test_file_keys_may_use_dashes():
    resolved = resolve(file_settings={"max-run-seconds": "30", "nproc-per-node": 2})
    assert (resolved.max_run_seconds, resolved.nproc_per_node) == (30.0, 2)
    assert resolved.sources["max_run_seconds"] == f"{YAML}: max-run-seconds"


def test_cluster_keys_are_tolerated_in_the_file():
    assert set(CLUSTER_KEYS) == {"hosts", "current_host"}
    assert resolve(file_settings={"hosts": ["a", "b"], "current_host": "a"}) == LaunchSettings()


def test_settings_from_a_real_yaml_file(tmp_path):
    path = tmp_path / "trainenv.yaml"
    path.write_text(
        "entry_point: train.py\n"
        "distribution: TorchRun\n"
        "compat: [sagemaker, vertex]\n"
        "requirements: \"numpy==2.* 'pandas>=2'\"\n"
        "install: no\n"
        "mpi_options: [--bind-to, none]\n"
    )
    file_settings, source = read_file_settings([path])
    resolved = resolve_settings({}, {}, file_settings, source)
    assert resolved.entry_point == "train.py" and resolved.distribution == "torchrun"
    assert resolved.compat == ("sagemaker", "vertex")
    assert resolved.requirements == ("numpy==2.*", "pandas>=2")
    assert resolved.install is False
    assert resolved.mpi_options == ("--bind-to", "none")
    assert resolved.sources["compat"] == f"{path}: compat"


# ---------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    "text, expected",
    [("pai", ("pai",)), ("none", ()), ("sagemaker, pai", ("sagemaker", "pai")), ("PAI,pai", ("pai",))],
)
def test_compat_values(text, expected):
    assert resolve(environ={"TRAINENV_COMPAT": text}).compat == expected


@pytest.mark.parametrize("text, expected", [("1", True), ("yes", True), ("On", True), ("0", False), ("no", False), ("off", False), ("FALSE", False)])
def test_boolean_values(text, expected):
    assert resolve(environ={"TRAINENV_LOG_PREFIX": text}).log_prefix is expected


def test_word_lists_split_like_a_shell():
    resolved = resolve(environ={"TRAINENV_REQUIREMENTS": "a==1 'b > 2' c"})
    assert resolved.requirements == ("a==1", "b > 2", "c")


def test_numbers_and_bounds():
    assert resolve(environ={"TRAINENV_NPROC_PER_NODE": " 8 "}).nproc_per_node == 8
    assert resolve(environ={"TRAINENV_MASTER_PORT": "65535"}).master_port == 65535
    assert resolve(environ={"TRAINENV_GRACE_SECONDS": "0"}).grace_seconds == 0.0
    assert resolve(environ={"TRAINENV_MAX_RUN_SECONDS": "0.5"}).max_run_seconds == 0.5


BAD = [
    pytest.param({}, {"TRAINENV_DISTRIBUTION": "horovod"}, {}, ["TRAINENV_DISTRIBUTION", "'horovod'", "none, torchrun, mpi"], id="distribution"),
    pytest.param({}, {"TRAINENV_NPROC_PER_NODE": "0"}, {}, ["TRAINENV_NPROC_PER_NODE", "'0'"], id="nproc-zero"),
    pytest.param({}, {"TRAINENV_NPROC_PER_NODE": "two"}, {}, ["TRAINENV_NPROC_PER_NODE", "'two'", "integer"], id="nproc-text"),
    pytest.param({}, {"TRAINENV_NPROC_PER_NODE": "1.5"}, {}, ["TRAINENV_NPROC_PER_NODE", "'1.5'"], id="nproc-fraction"),
    pytest.param({}, {}, {"nproc_per_node": True}, [YAML, "nproc_per_node", "True"], id="nproc-bool"),
    pytest.param({}, {"TRAINENV_MAX_RUN_SECONDS": "-1"}, {}, ["TRAINENV_MAX_RUN_SECONDS", "'-1'"], id="max-run-negative"),
    pytest.param({}, {"TRAINENV_MAX_RUN_SECONDS": "nan"}, {}, ["TRAINENV_MAX_RUN_SECONDS", "'nan'"], id="max-run-nan"),
    pytest.param({}, {"TRAINENV_GRACE_SECONDS": "soon"}, {}, ["TRAINENV_GRACE_SECONDS", "'soon'"], id="grace-text"),
    pytest.param({}, {"TRAINENV_MASTER_PORT": "70000"}, {}, ["TRAINENV_MASTER_PORT", "'70000'", "between 1 and 65535"], id="port-range"),
    pytest.param({}, {"TRAINENV_COMPAT": "pai,aws"}, {}, ["TRAINENV_COMPAT", "'aws'"], id="compat-env"),
    pytest.param({}, {}, {"compat": ["sagemaker", "azure"]}, [YAML, "compat", "'azure'"], id="compat-file"),
    pytest.param({}, {"TRAINENV_INSTALL": "maybe"}, {}, ["TRAINENV_INSTALL", "'maybe'", "true or false"], id="install"),
    pytest.param({}, {"TRAINENV_MPI_OPTIONS": "--x 'unclosed"}, {}, ["TRAINENV_MPI_OPTIONS", "cannot split"], id="mpi-options-quote"),
    pytest.param({}, {}, {"entry_point": ["train.py"]}, [YAML, "entry_point", "['train.py']"], id="entry-point-list"),
    pytest.param({"max_restarts": "-3"}, {}, {}, ["option --max-restarts", "'-3'"], id="flag"),
    pytest.param({}, {}, {"distrib": "mpi"}, [YAML, "distrib", "unknown setting"], id="unknown-key"),
]


@pytest.mark.parametrize("flags, environ, file_settings, fragments", BAD)
def test_bad_values_name_their_source_and_value(flags, environ, file_settings, fragments):
    config_error(flags, environ, file_settings, *fragments)


@pytest.mark.parametrize(
    "flags, environ, file_settings, fragments",
    [
        pytest.param({}, {"TRAINENV_GRACE_SECONDS": "5"}, {"grace_seconds": "soon"}, [f"{YAML}: grace_seconds", "'soon'"], id="file-under-variable"),
        pytest.param({"distribution": "none"}, {}, {"distribution": "horovod"}, [f"{YAML}: distribution", "'horovod'"], id="file-under-flag"),
        pytest.param({"max_restarts": "1"}, {"TRAINENV_MAX_RESTARTS": "many"}, {}, ["TRAINENV_MAX_RESTARTS", "'many'"], id="variable-under-flag"),
        pytest.param({}, {"TRAINENV_REQUIREMENTS": "a"}, {"requirements": [["a"]]}, [f"{YAML}: requirements", "item 0 is a list"], id="nested-list"),
        pytest.param({}, {}, {"compat": [{"pai": 1}]}, [f"{YAML}: compat", "item 0 is a dict"], id="compat-dict-item"),
        pytest.param({}, {"TRAINENV_INSTALLER": "conda"}, {}, ["TRAINENV_INSTALLER", "'conda'", "auto, uv, pip"], id="installer"),
        pytest.param({}, {"TRAINENV_LOG_LEVEL": "loud"}, {}, ["TRAINENV_LOG_LEVEL", "'loud'", "quiet, info, debug"], id="log-level"),
    ],
)
def test_every_source_is_checked_even_when_a_higher_one_wins(flags, environ, file_settings, fragments):
    config_error(flags, environ, file_settings, *fragments)


def test_entry_point_and_command_together():
    config_error(
        {"command": "python train.py"},
        {"TRAINENV_ENTRY_POINT": "train.py"},
        {},
        "TRAINENV_ENTRY_POINT",
        "option --command",
        "use one",
    )


# ---------------------------------------------------------------------------------------
# Fuzzer: any variables and any YAML-shaped file values give settings or a ConfigError

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
variables = st.dictionaries(
    st.sampled_from([s.variable for s in SETTINGS]),
    st.text(max_size=20) | st.sampled_from(["0", "-1", "1e309", "inf", "nan", "65536", "torchrun", "none", "pai,none"]),
    max_size=5,
)
file_keys = st.sampled_from([s.name for s in SETTINGS] + [s.name.replace("_", "-") for s in SETTINGS] + ["hosts", "bogus"])


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(environ=variables, file_settings=st.dictionaries(file_keys, yaml_values, max_size=5))
def test_fuzz_resolve_settings(environ, file_settings):
    try:
        resolved = resolve(environ=environ, file_settings=file_settings)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(resolved, LaunchSettings)
    assert resolved.distribution in ("none", "torchrun", "mpi")
    assert set(resolved.compat) <= {"pai", "sagemaker", "vertex"}
    assert resolved.nproc_per_node is None or 1 <= resolved.nproc_per_node <= 4096
    assert not (resolved.entry_point and resolved.command)


@pytest.mark.parametrize("raw, expected", [
    ('["einops==0.8.0", "numpy"]', ("einops==0.8.0", "numpy")),
    ("einops==0.8.0 'numpy>=1'", ("einops==0.8.0", "numpy>=1")),
])
def test_requirements_take_a_json_list_or_words(raw, expected):
    assert resolve_settings({}, {"TRAINENV_REQUIREMENTS": raw}, {}).requirements == expected


@pytest.mark.parametrize("raw", ['["a", 1]', "[not json", '[["nested"]]'])
def test_a_bad_json_list_of_requirements_names_the_variable(raw):
    with pytest.raises(ConfigError, match="TRAINENV_REQUIREMENTS"):
        resolve_settings({}, {"TRAINENV_REQUIREMENTS": raw}, {})


@pytest.mark.parametrize("variable", ["TRAINENV_MAX_RUN_SECONDS", "TRAINENV_GRACE_SECONDS"])
@pytest.mark.parametrize("raw", ["inf", "1e400", "-inf"])
def test_durations_must_be_finite(variable, raw):
    with pytest.raises(ConfigError, match=f"{variable}: .*finite"):
        resolve_settings({}, {variable: raw}, {})
