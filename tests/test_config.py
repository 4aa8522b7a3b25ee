"""trainenv.config: the readers of hyperparameters.json, inputdataconfig.json,
resourceconfig.json and trainenv.yaml, on real files; bad input of every kind; fuzzers.

Every bad input must give a ``ConfigError`` whose message is one line, names the file and the
key (or the line and column), and leaves the files as they were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from support import one_line_error
from trainenv.config import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_SETTINGS_BYTES,
    MAX_YAML_NODES,
    check_channel_name,
    check_depth,
    check_hyperparameter_name,
    decode_hyperparameter,
    list_channel_dirs,
    nesting_depth,
    read_hyperparameters,
    read_input_data_config,
    read_resource_config,
    read_file_settings,
)
from trainenv.errors import ConfigError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------
# Values: PAI and SageMaker write every hyperparameter as a string


@pytest.mark.parametrize(
    "raw, decoded",
    [
        ("0.1", 0.1),
        ("true", True),
        ("false", False),
        ("[1, 2]", [1, 2]),
        ('"x y"', "x y"),
        ("abc", "abc"),
        ("True", "True"),
        ("007", "007"),
        ("null", None),
        ("1e-3", 0.001),
        ("3", 3),
        ("-2", -2),
        ('{"a": 1}', {"a": 1}),
        ("", ""),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("[1,", "[1,"),
        ("1 2", "1 2"),
        ("0x10", "0x10"),
        ("1_000", "1_000"),
    ],
)
def test_string_values_that_are_json_are_decoded_once(raw, decoded):
    value = decode_hyperparameter(raw)
    assert value == decoded and type(value) is type(decoded)


def test_decoding_is_one_level_only():
    assert decode_hyperparameter('"\\"inner\\""') == '"inner"'
    assert decode_hyperparameter('"[1, 2]"') == "[1, 2]"


@pytest.mark.parametrize("value", [0.1, 3, True, None, [1, "2"], {"a": "true"}])
def test_non_string_values_are_kept(value):
    assert decode_hyperparameter(value) == value


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_decode_never_raises_and_keeps_non_json_strings(text):
    value = decode_hyperparameter(text)
    if isinstance(value, str) and value == text:
        return
    # Decoded: it was JSON (after stripping) and is plain JSON data now.
    assert json.loads(text.strip()) == value or value != value


def test_research_tree_hyperparameters(research_tree):
    hps, platform = read_hyperparameters(research_tree / "input/config/hyperparameters.json")
    assert hps == {"lr": 0.1, "epochs": 3, "flag": True, "layers": [1, 2], "cfg": {"a": 1}, "name": "x y"}
    assert list(hps) == ["lr", "epochs", "flag", "layers", "cfg", "name"], "file order is kept"
    assert platform == {"sagemaker_job_name": "job-123", "sagemaker_region": "us-west-2"}


def test_platform_hyperparameters_are_kept_apart(tmp_path):
    path = write(
        tmp_path / "hyperparameters.json",
        json.dumps(
            {
                "sagemaker_program": '"train.py"',
                "lr": "0.1",
                "sagemaker_mpi_enabled": "true",
                "_tuning_objective_metric": '"loss"',
                "sagemakerish": "1",
            }
        ),
    )
    hps, platform = read_hyperparameters(path)
    assert hps == {"lr": 0.1, "sagemakerish": 1}
    assert platform == {"sagemaker_program": "train.py", "sagemaker_mpi_enabled": True, "_tuning_objective_metric": "loss"}


def test_absent_files_read_as_empty(tmp_path):
    assert read_hyperparameters(tmp_path / "nope.json") == ({}, {})
    assert read_input_data_config(tmp_path / "nope.json") == {}
    assert read_resource_config(tmp_path / "nope.json") is None
    assert read_file_settings([tmp_path / "a.yaml", tmp_path / "b.yaml"]) == ({}, None)
    assert list_channel_dirs(tmp_path / "no-data") == []


def test_utf8_bom_and_unicode_values(tmp_path):
    path = write(tmp_path / "hp.json", "\ufeff" + json.dumps({"label": "café ☕"}, ensure_ascii=False))
    assert read_hyperparameters(path)[0] == {"label": "café ☕"}


@pytest.mark.parametrize("name", ["lr", "learning-rate", "model.layers", "a:b", "x/y", "+plus", "_x", "A9", "h"])
def test_usable_hyperparameter_names(tmp_path, name):
    path = write(tmp_path / "hp.json", json.dumps({name: "1"}))
    assert read_hyperparameters(path)[0] == {name: 1}


def test_input_data_config_and_channel_dirs(research_tree):
    config = read_input_data_config(research_tree / "input/config/inputdataconfig.json")
    assert list(config) == ["train", "validation"]
    assert config["train"]["ContentType"] == "text/csv"
    (research_tree / "input/data/stray-file").write_text("not a channel")
    (research_tree / "input/data/extra").mkdir()
    assert list_channel_dirs(research_tree / "input/data") == ["extra", "train", "validation"]


@pytest.mark.parametrize("name", ["train", "validation-1", "a.b", "A_9", "x" * 256])
def test_usable_channel_names(name):
    assert check_channel_name("src", name) == name


def test_resource_config_is_read_as_is(research_tree):
    config = read_resource_config(research_tree / "input/config/resourceconfig.json")
    assert config["hosts"] == ["algo-1"] and config["current_group_name"] == "homogeneousCluster"


def test_settings_file_in_config_dir_wins_over_code_dir(tmp_path):
    first = write(tmp_path / "input/config/trainenv.yaml", "distribution: torchrun\n")
    second = write(tmp_path / "usercode/trainenv.yaml", "distribution: mpi\n")
    assert read_file_settings([first, second]) == ({"distribution": "torchrun"}, first)
    first.unlink()
    assert read_file_settings([first, second]) == ({"distribution": "mpi"}, second)


def test_empty_settings_file_is_empty(tmp_path):
    path = write(tmp_path / "trainenv.yaml", "# nothing yet\n")
    assert read_file_settings([path]) == ({}, path)


# ---------------------------------------------------------------------------------------
# Bad input: one line, names the file and the key, nothing changed on disk

HP = "hyperparameters.json"
IDC = "inputdataconfig.json"


def read_hp(path):
    return read_hyperparameters(path)


BAD_JSON = [
    pytest.param(HP, '{"lr": 0.1,\n  "epochs": }\n', read_hp, ["line 2 column 13"], id="malformed-json"),
    pytest.param(HP, '["lr", 0.1]', read_hp, ["top level must be a JSON object", "list"], id="top-level-list"),
    pytest.param(HP, '"lr"', read_hp, ["top level must be a JSON object", "str"], id="top-level-string"),
    pytest.param(HP, "null", read_hp, ["top level must be a JSON object"], id="top-level-null"),
    pytest.param(HP, b'{"name": "caf\xe9"}', read_hp, ["not valid UTF-8", "byte 13"], id="latin-1-bytes"),
    pytest.param(HP, b"\xff\xfe{\x00}\x00", read_hp, ["not valid UTF-8"], id="utf-16"),
    pytest.param(HP, b'\xef\xbb\xbf{"name": "caf\xe9"}', read_hp, ["not valid UTF-8", "byte 16: b'\\xe9'"], id="bom-then-latin-1"),
    pytest.param(HP, "", read_hp, ["invalid JSON at line 1 column 1"], id="empty-file"),
    pytest.param(HP, '{"lr": 1, "lr": 2}', read_hp, ["lr", "more than once"], id="duplicate-key"),
    pytest.param(HP, "[" * 100_000, read_hp, ["nested too deeply"], id="deep-nesting"),
    pytest.param(HP, '{"lr": NaN}', read_hp, ["NaN"], id="bare-nan"),
    pytest.param(HP, '{"lr": -Infinity}', read_hp, ["Infinity"], id="bare-infinity"),
    pytest.param(HP, '{"lr": 1e999}', read_hp, ["1e999", "out of range"], id="float-overflow"),
    pytest.param(HP, '{"label": "a\\u0000b"}', read_hp, ["'label'", "NUL"], id="nul-in-value"),
    pytest.param(HP, '{"label": "\\ud800"}', read_hp, ["'label'", "surrogate"], id="lone-surrogate"),
    pytest.param(HP, '{"cfg": {"a\\u0000": 1}}', read_hp, ["NUL"], id="nul-in-nested-key"),
    pytest.param(IDC, '{"train": {"ContentType": "text\\u0000"}}', read_input_data_config, ["'ContentType'", "NUL"], id="nul-in-channel-config"),
    pytest.param("resourceconfig.json", '{"hosts": ["a\\u0000"], "current_host": "a"}', read_resource_config, ["'hosts'", "NUL"], id="nul-in-host"),
    pytest.param(HP, '{"a b": 1}', read_hp, ["'a b'", "invalid hyperparameter name"], id="hp-name-space"),
    pytest.param(HP, '{"a\\nb": 1}', read_hp, ["'a\\nb'", "invalid hyperparameter name"], id="hp-name-newline"),
    pytest.param(HP, '{"a=b": 1}', read_hp, ["'a=b'", "invalid hyperparameter name"], id="hp-name-equals"),
    pytest.param(HP, '{"caf\\u00e9": 1}', read_hp, ["'café'", "invalid hyperparameter name"], id="hp-name-non-ascii"),
    pytest.param(HP, '{"": 1}', read_hp, ["''", "invalid hyperparameter name"], id="hp-name-empty"),
    pytest.param(HP, '{"-x": 1}', read_hp, ["'-x'", "invalid hyperparameter name"], id="hp-name-dash-first"),
    pytest.param(HP, json.dumps({"x" * 257: 1}), read_hp, ["invalid hyperparameter name"], id="hp-name-too-long"),
    pytest.param(IDC, '{"a/b": {}}', read_input_data_config, ["'a/b'", "invalid channel name"], id="channel-slash"),
    pytest.param(IDC, '{"..": {}}', read_input_data_config, ["'..'", "invalid channel name"], id="channel-dotdot"),
    pytest.param(IDC, '{"../etc": {}}', read_input_data_config, ["'../etc'"], id="channel-escape"),
    pytest.param(IDC, '{"a\\u0000b": {}}', read_input_data_config, ["'a\\x00b'", "invalid channel name"], id="channel-nul"),
    pytest.param(IDC, '{"a\\nb": {}}', read_input_data_config, ["'a\\nb'", "invalid channel name"], id="channel-newline"),
    pytest.param(IDC, '{"/abs": {}}', read_input_data_config, ["'/abs'"], id="channel-absolute"),
    pytest.param(IDC, '{".": {}}', read_input_data_config, ["'.'"], id="channel-dot"),
    pytest.param(IDC, '{"": {}}', read_input_data_config, ["''"], id="channel-empty"),
    pytest.param(IDC, '{"train": "File"}', read_input_data_config, ["train", "must be a JSON object", "str"], id="channel-not-object"),
    pytest.param(IDC, "[]", read_input_data_config, ["top level must be a JSON object"], id="idc-top-level-list"),
    pytest.param("resourceconfig.json", "[1]", read_resource_config, ["top level must be a JSON object"], id="rc-top-level"),
]


@pytest.mark.parametrize("filename, content, reader, fragments", BAD_JSON)
def test_bad_json_config_is_a_one_line_config_error(tmp_path, tree_state, filename, content, reader, fragments):
    path = write(tmp_path / "input/config" / filename, content)
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        reader(path)
    one_line_error(excinfo, str(path), *fragments)
    assert tree_state(tmp_path) == before


def test_hyperparameter_name_check_names_source_and_key():
    with pytest.raises(ConfigError) as excinfo:
        check_hyperparameter_name("SRC", "bad name")
    one_line_error(excinfo, "SRC", "'bad name'")


@pytest.mark.parametrize("name", ["a b", "a\nb", "sub\tdir", "caf\u00e9"])
def test_channel_dir_with_unusable_name(tmp_path, tree_state, name):
    data = tmp_path / "input" / "data"
    (data / name).mkdir(parents=True)
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        list_channel_dirs(data)
    one_line_error(excinfo, str(data), repr(name))
    assert tree_state(tmp_path) == before


def sparse_file(path: Path, size: int, head: bytes) -> Path:
    """A file of ``size`` bytes that starts with ``head``; the rest is a hole (instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


FIFTY_MB = 50 * 1024 * 1024


@pytest.mark.parametrize(
    "filename, reader",
    [
        (HP, read_hp),
        (IDC, read_input_data_config),
        ("resourceconfig.json", read_resource_config),
        ("trainenv.yaml", lambda path: read_file_settings([path])),
    ],
)
def test_a_50_mb_config_file_is_refused_without_reading_it_all(tmp_path, tree_state, filename, reader):
    path = sparse_file(tmp_path / "input/config" / filename, FIFTY_MB, b'{"lr": "')
    assert path.stat().st_size == FIFTY_MB > MAX_CONFIG_BYTES
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        reader(path)
    one_line_error(excinfo, str(path), "larger than 1 MiB" if filename == "trainenv.yaml" else "larger than 10 MiB")
    assert tree_state(tmp_path) == before


def test_a_directory_where_a_file_should_be(tmp_path):
    path = tmp_path / HP
    path.mkdir()
    with pytest.raises(ConfigError) as excinfo:
        read_hyperparameters(path)
    one_line_error(excinfo, str(path), "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file(tmp_path):  # pragma: no cover - CI runs as root
    path = write(tmp_path / HP, "{}")
    path.chmod(0)
    with pytest.raises(ConfigError) as excinfo:
        read_hyperparameters(path)
    one_line_error(excinfo, str(path), "cannot read")


BAD_YAML = [
    pytest.param("distribution: [torchrun\n", ["invalid YAML at line 2 column 1"], id="unclosed-flow"),
    pytest.param("a: 1\n b: 2\n", ["invalid YAML at line 2"], id="bad-indent"),
    pytest.param("- torchrun\n", ["top level must be a mapping", "list"], id="top-level-list"),
    pytest.param("just text\n", ["top level must be a mapping", "str"], id="top-level-scalar"),
    pytest.param("1: torchrun\n", ["1", "setting names must be strings"], id="non-string-key"),
    pytest.param("a: !!python/object/apply:os.system [id]\n", ["invalid YAML"], id="unsafe-tag"),
    pytest.param("a: 1\n---\nb: 2\n", ["invalid YAML"], id="two-documents"),
    pytest.param(b"distribution: \xff\n", ["not valid UTF-8"], id="non-utf8"),
    pytest.param("a: " + "[" * 1000, ["line 1", "nested too deeply"], id="deep-nesting"),
]


@pytest.mark.parametrize("content, fragments", BAD_YAML)
def test_bad_settings_file_is_a_one_line_config_error(tmp_path, tree_state, content, fragments):
    path = write(tmp_path / "input/config/trainenv.yaml", content)
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        read_file_settings([path])
    one_line_error(excinfo, str(path), *fragments)
    assert tree_state(tmp_path) == before


BIG_INT = "1" * 5000  # Python refuses int() of more than 4300 digits with a plain ValueError


@pytest.mark.parametrize(
    "filename, content, reader",
    [
        (HP, '{"seed": ' + BIG_INT + "}", read_hp),
        (IDC, '{"train": {"MaxRecords": ' + BIG_INT + "}}", read_input_data_config),
        ("resourceconfig.json", '{"hosts": ["a"], "current_host": "a", "x": ' + BIG_INT + "}", read_resource_config),
    ],
    ids=["hyperparameters", "inputdataconfig", "resourceconfig"],
)
def test_a_5000_digit_json_number_is_a_config_error(tmp_path, filename, content, reader):
    path = write(tmp_path / filename, content)
    with pytest.raises(ConfigError) as excinfo:
        reader(path)
    one_line_error(excinfo, str(path))


@pytest.mark.parametrize("content", ['{\n  "lr": NaN\n}', '{\n  "lr": 1e999\n}', '{\n  "seed": ' + BIG_INT + "\n}"], ids=["nan", "1e999", "5000-digits"])
def test_a_non_finite_or_huge_number_error_names_where(tmp_path, content):
    path = write(tmp_path / HP, content)
    with pytest.raises(ConfigError) as excinfo:
        read_hyperparameters(path)
    message = one_line_error(excinfo, str(path))
    assert "line 2" in message or ": lr:" in message or ": seed:" in message, message


# PyYAML's constructors raise ValueError, KeyError, IndexError or AttributeError for these.
CONSTRUCTOR_ERRORS = [
    pytest.param("max_run_seconds: 2020-13-45\n", id="bad-date"),  # looks like a date, is none
    pytest.param("nproc_per_node: 0b_\n", id="0b_"),
    pytest.param("grace_seconds: !!float x\n", id="float-tag"),
    pytest.param("install: !!bool maybe\n", id="bool-tag"),
    pytest.param("max_restarts: !!int ''\n", id="empty-int"),
    pytest.param("entry_point: !!timestamp x\n", id="timestamp-tag"),
    pytest.param("master_port: " + BIG_INT + "\n", id="5000-digits"),
]


@pytest.mark.parametrize("content", CONSTRUCTOR_ERRORS)
def test_a_yaml_scalar_the_constructor_rejects_is_a_config_error(tmp_path, content):
    path = write(tmp_path / "trainenv.yaml", content)
    with pytest.raises(ConfigError) as excinfo:
        read_file_settings([path])
    one_line_error(excinfo, str(path))


@pytest.mark.parametrize("content", CONSTRUCTOR_ERRORS)
def test_a_yaml_constructor_error_names_the_key_or_line(tmp_path, content):
    path = write(tmp_path / "trainenv.yaml", "# launch settings\n" + content)
    with pytest.raises(ConfigError) as excinfo:
        read_file_settings([path])
    message = one_line_error(excinfo, str(path))
    key = content.split(":", 1)[0]
    assert key in message or "line 2" in message, message


# ---------------------------------------------------------------------------------------
# Fuzzers: any bytes either parse or raise ConfigError, never anything else

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# Hyperparameter files: names of any text; values as JSON or as JSON-encoded strings (PAI/SageMaker).
hp_documents = st.dictionaries(
    st.text(max_size=12),
    json_values | json_values.map(json.dumps),
    max_size=6,
).map(json.dumps)
idc_documents = st.dictionaries(
    st.text(max_size=10),
    json_values | st.dictionaries(st.sampled_from(["ContentType", "TrainingInputMode", "S3DistributionType"]), json_values, max_size=3),
    max_size=4,
).map(json.dumps)


def fuzz_bytes(documents: st.SearchStrategy) -> st.SearchStrategy:
    """Whole documents, cut documents, documents with a byte changed, and arbitrary bytes."""
    encoded = documents.map(lambda text: text.encode("utf-8"))
    cut = encoded.flatmap(lambda data: st.integers(0, len(data)).map(lambda i: data[:i]))
    flipped = encoded.filter(bool).flatmap(
        lambda data: st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(
            lambda change: data[: change[0]] + bytes([change[1]]) + data[change[0] + 1 :]
        )
    )
    return st.one_of(encoded, cut, flipped, st.binary(max_size=200))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def parses_or_config_error(reader, path: Path, data: bytes):
    path.write_bytes(data)
    try:
        return reader(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return None


@FUZZ
@given(data=fuzz_bytes(hp_documents))
def test_fuzz_read_hyperparameters(scratch, data):
    result = parses_or_config_error(read_hyperparameters, scratch / HP, data)
    if result is not None:
        user, platform = result
        for name in list(user) + list(platform):
            check_hyperparameter_name("fuzz", name)  # only usable names get through
        assert not set(user) & set(platform)


@FUZZ
@given(data=fuzz_bytes(idc_documents))
def test_fuzz_read_input_data_config(scratch, data):
    result = parses_or_config_error(read_input_data_config, scratch / IDC, data)
    if result is not None:
        for name, value in result.items():
            check_channel_name("fuzz", name)
            assert isinstance(value, dict)
            assert "/" not in name and name not in (".", "..")


yaml_documents = st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(
    lambda value: yaml.safe_dump(value, allow_unicode=True)
)
yaml_tokens = st.lists(
    st.sampled_from(
        [
            "distribution", "max_run_seconds", "compat", "a", "1", "-1", "0.5", "1e3", "true", "~",
            "2020", "-13", "-45", "0b", "0x", "_", ".", ":", ": ", " ", "\n", "- ", "  ", "[", "]",
            "{", "}", ", ", "'", '"', "&x ", "*x", "!!int ", "!!float ", "!!bool ", "!!timestamp ",
            "!!str ", "!!binary ", "!!set ", "? ", "# c", "---\n", "\t", "é", "\x85",
        ]
    ),
    max_size=14,
).map("".join)


@FUZZ
@example(data=b"max_run_seconds: 2020-13-45\n")
@given(data=st.one_of(fuzz_bytes(yaml_documents), yaml_tokens.map(lambda t: t.encode("utf-8"))))
def test_fuzz_read_file_settings(scratch, data):
    result = parses_or_config_error(lambda path: read_file_settings([path]), scratch / "trainenv.yaml", data)
    if result is not None:
        value, path = result
        assert isinstance(value, dict) and all(isinstance(k, str) for k in value)


# ---------------------------------------------------------------------------------------
# Bounds: nesting depth, YAML aliases, symlink loops


def nested_text(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_nesting_depth_counts_without_recursing():
    assert nesting_depth(1) == 0 and nesting_depth([]) == 1 and nesting_depth({"a": [{}]}) == 3
    assert nesting_depth(json.loads(nested_text(900)), limit=10) == 11  # stops past the limit
    with pytest.raises(ConfigError) as excinfo:
        check_depth("SRC", {"ok": 1, "deep": json.loads(nested_text(MAX_DEPTH))})
    one_line_error(excinfo, "SRC: 'deep'", f"more than {MAX_DEPTH} levels")
    check_depth("SRC", {"deep": json.loads(nested_text(MAX_DEPTH - 1))})


@pytest.mark.parametrize("levels", [MAX_DEPTH, 5000])
def test_a_deep_hyperparameter_string_is_a_config_error(levels):
    with pytest.raises(ConfigError) as excinfo:
        decode_hyperparameter(nested_text(levels), "HP", "layers")
    one_line_error(excinfo, "HP: 'layers'", f"more than {MAX_DEPTH} levels")
    assert decode_hyperparameter(nested_text(MAX_DEPTH - 1)) == json.loads(nested_text(MAX_DEPTH - 1))


@pytest.mark.parametrize(
    "filename, reader",
    [(HP, read_hp), (IDC, read_input_data_config), ("resourceconfig.json", read_resource_config)],
)
def test_every_json_reader_caps_the_depth(tmp_path, filename, reader):
    path = write(tmp_path / filename, json.dumps({"train": {"x": json.loads(nested_text(300))}}))
    with pytest.raises(ConfigError) as excinfo:
        reader(path)
    one_line_error(excinfo, str(path), "'train'", f"more than {MAX_DEPTH} levels")


def billion_laughs(levels: int) -> str:
    lines = ["requirements:", "  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "content, fragments",
    [
        pytest.param(billion_laughs(20), [f"more than {MAX_YAML_NODES} values", "aliases", "line 6"], id="billion-laughs"),
        pytest.param("hosts: &h [a, *h]\n", ["alias *h refers to a value that contains it", "line 1"], id="recursive-alias"),
        pytest.param("a: " + nested_text(MAX_DEPTH), [f"more than {MAX_DEPTH} levels"], id="flow-depth"),
        pytest.param("a: &a " + nested_text(60) + "\nb: " + "[" * 60 + "*a" + "]" * 60, [f"more than {MAX_DEPTH} levels"], id="depth-through-alias"),
    ],
)
def test_yaml_over_a_bound_is_refused_while_loading(tmp_path, tree_state, content, fragments):
    path = write(tmp_path / "trainenv.yaml", content)
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        read_file_settings([path])
    one_line_error(excinfo, str(path), *fragments)
    assert tree_state(tmp_path) == before


def test_yaml_within_the_bounds_loads(tmp_path):
    path = write(tmp_path / "trainenv.yaml", "a: &a " + nested_text(MAX_DEPTH - 1) + "\nb: *a\nc: &c [x, y]\nd: [*c, *c]\n")
    value, _ = read_file_settings([path])
    assert value["b"] is value["a"] and value["d"] == [["x", "y"], ["x", "y"]]
    assert nesting_depth(value) == MAX_DEPTH


def test_a_settings_file_over_its_size_limit(tmp_path):
    path = write(tmp_path / "trainenv.yaml", "# " + "x" * MAX_SETTINGS_BYTES + "\n")
    with pytest.raises(ConfigError) as excinfo:
        read_file_settings([path])
    one_line_error(excinfo, str(path), "larger than 1 MiB")


def test_channel_discovery_skips_symlink_loops_and_dangling_links(tmp_path, tree_state):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    os.symlink("train", data / "alias")
    os.symlink("self", data / "self")
    os.symlink("b", data / "a")
    os.symlink("a", data / "b")
    os.symlink(str(tmp_path / "nowhere"), data / "dangling")
    os.symlink("..", data / "train" / "up")
    before = tree_state(tmp_path)
    assert list_channel_dirs(data) == ["alias", "train"]
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("variable", ["TF_CONFIG", "CLUSTER_SPEC", "TRAINENV_HOSTS"])
@pytest.mark.parametrize("levels", [300, 5000])
def test_cluster_variables_cap_the_depth(variable, levels):
    from trainenv.cluster import discover_cluster

    with pytest.raises(ConfigError) as excinfo:
        discover_cluster({variable: "[" * levels + "]" * levels}, resource_config=None,
                         resource_config_source="rc", settings=None, hostname="h")
    one_line_error(excinfo, variable, f"more than {MAX_DEPTH} levels")
