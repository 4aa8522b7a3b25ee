"""``trainenv env``: the installed command on real job trees.

Formats (json, yaml, shell: eval-ed by a real ``sh``), secrets, exit 78 with a one-line
message on every kind of bad input (the tree untouched), local mode, a non-root user with a
read-only HOME running a ``pip install .`` copy, and ``taskset``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from support import REPO, eval_in_sh, make_tree, need_tool, run_train, run_trainenv, without_ml_dir
from trainenv import resources
from trainenv.environment import TrainingEnv, build_training_env
from trainenv.errors import EXIT_CONFIG
from trainenv.exports import to_env_vars
from trainenv.values import normalize

ALL_COMPAT = "pai,sagemaker,vertex"
HP = "input/config/hyperparameters.json"
IDC = "input/config/inputdataconfig.json"
RC = "input/config/resourceconfig.json"


def env_json(run_trainenv, base: Path, *args: str, **extra: str) -> dict:
    result = run_trainenv("env", "--format", "json", *args, extra_env={"TRAINENV_BASE_DIR": str(base), **extra})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------
# Formats


def test_json_is_the_snapshot_and_the_plan(run_trainenv, research_tree):
    data = env_json(run_trainenv, research_tree, SAGEMAKER_PROGRAM="train.py")
    launch = data.pop("launch")
    expected = build_training_env({"TRAINENV_BASE_DIR": str(research_tree)}).to_dict()
    assert data == expected
    assert list(data) == list(TrainingEnv._field_names())
    assert launch["entry_point"]["source"] == "SAGEMAKER_PROGRAM"
    assert launch["argv"] == [sys.executable, str(research_tree / "usercode/train.py"), *expected["user_args"]]
    assert launch["settings"]["compat"] == {"value": ["pai"], "source": "default"}


def test_without_an_entry_point_the_plan_has_no_argv(run_trainenv, job_tree):
    launch = env_json(run_trainenv, job_tree(hyperparameters={"lr": "0.1"}))["launch"]
    assert launch["entry_point"] is None and launch["argv"] == []
    assert launch["environment"]["TRAINENV_HP_LR"] == "0.1"


def test_a_bad_entry_point_exits_78_with_one_line(run_trainenv, job_tree, tree_state, tmp_path):
    base = job_tree()
    before = tree_state(tmp_path)
    result = run_trainenv("env", "--format", "shell", extra_env={"TRAINENV_BASE_DIR": str(base), "TRAINENV_ENTRY_POINT": "missing.py"})
    assert result.returncode == EXIT_CONFIG and result.stdout == ""
    assert result.stderr.splitlines() == [f"trainenv: ConfigError: TRAINENV_ENTRY_POINT: 'missing.py': {base}/usercode/missing.py does not exist"]
    assert tree_state(tmp_path) == before


def test_yaml_is_the_same_data(run_trainenv, research_tree):
    result = run_trainenv("env", "--format", "yaml", extra_env={"TRAINENV_BASE_DIR": str(research_tree)})
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == env_json(run_trainenv, research_tree)


def test_serving_snapshot(run_trainenv, tmp_path):
    result = run_trainenv("env", "--serving", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), dict)
    assert list(tmp_path.iterdir()) == []


def test_env_file_is_what_env_prints(run_trainenv, research_tree, tmp_path):
    data = build_training_env({"TRAINENV_BASE_DIR": str(research_tree)}).to_dict()
    data["num_cpus"] = 77
    snapshot = tmp_path / "env.json"
    snapshot.write_text(json.dumps(data))
    assert env_json(run_trainenv, research_tree, TRAINENV_ENV_FILE=str(snapshot))["num_cpus"] == 77


HOSTILE = [
    "$(touch {marker})",
    "`touch {marker}`",
    "'; touch {marker}; '",
    '"; touch {marker}; "',
    "it's",
    "back\\slash \\n",
    "multi\nline\n",
    "tab\there",
    "$HOME ${PATH}",
    "",
    "café ☕",
]


def test_shell_format_is_safe_to_eval(run_trainenv, job_tree, tmp_path):
    marker = tmp_path / "pwned"
    values = [v.replace("{marker}", str(marker)) for v in HOSTILE]
    base = job_tree(
        hyperparameters={f"v{i}": json.dumps(v) for i, v in enumerate(values)},
        channels=["train"],
        resource_config={"current_host": "h-1", "hosts": ["h-1", "h-2"]},
    )
    result = run_trainenv("env", "--format", "shell", extra_env={"TRAINENV_BASE_DIR": str(base), "TRAINENV_COMPAT": ALL_COMPAT})
    assert result.returncode == 0, result.stderr
    expected = to_env_vars(build_training_env({"TRAINENV_BASE_DIR": str(base)}), tuple(ALL_COMPAT.split(",")))
    lines = result.stdout.splitlines()
    assert lines[0].startswith("export TRAINENV_")
    assert all(re.match(r"export [A-Z0-9_]+=", line) for line in lines if line.startswith("export"))
    back = eval_in_sh(result.stdout, list(expected))
    assert back == expected
    for i, value in enumerate(values):
        assert back[f"TRAINENV_HP_V{i}"] == value
    assert not marker.exists()


def test_shell_format_follows_trainenv_compat(run_trainenv, research_tree):
    activated = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # else PATH, VIRTUAL_ENV too

    def names(compat: str) -> set:
        result = run_trainenv("env", "--format", "shell", extra_env={"TRAINENV_BASE_DIR": str(research_tree), "TRAINENV_COMPAT": compat,
                                                                      "PATH": activated})
        assert result.returncode == 0, result.stderr
        return {line.split("=", 1)[0].split()[1].split("_")[0] for line in result.stdout.splitlines()}

    python = {"PYTHONPATH", "PYTHONUNBUFFERED"}
    assert names("none") == {"TRAINENV"} | python
    assert names("pai") == {"TRAINENV", "PAI"} | python
    assert names(ALL_COMPAT) == {"TRAINENV", "PAI", "SM", "AIP"} | python


# ---------------------------------------------------------------------------------------
# Secrets

SECRET = "hunter2hunter2"
URL_PASSWORD = "pw123456"


SECRET_NAMES = [
    "my_token", "client_secret", "db_password", "passwd", "api_key", "aws_credentials", "Auth-Token", "HF_TOKEN",
    "wandbApiKey", "MyAPIKey", "ssh.pwd", "gpg_passphrase", "x-auth", "service_credential", "dbPassword",
]
NOT_SECRET_NAMES = ["tokenizer", "max_tokens", "key_dim", "monkey_patch", "author", "auth_header", "API_KEY_2", "keyboard"]


@pytest.fixture
def secret_tree(job_tree):
    hps = {name: json.dumps(f"{SECRET}-{i}") for i, name in enumerate(SECRET_NAMES)}
    hps.update({name: json.dumps(f"shown-{i}") for i, name in enumerate(NOT_SECRET_NAMES)})
    hps.update({"db": json.dumps(f"postgres://bob:{URL_PASSWORD}@db.internal:5432/x"), "lr": "0.1"})
    return job_tree(hyperparameters=hps)


def run_format(run_trainenv, base: Path, fmt: str) -> str:
    result = run_trainenv("env", "--format", fmt, extra_env={"TRAINENV_BASE_DIR": str(base), "TRAINENV_COMPAT": ALL_COMPAT})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_secret_names_are_masked(run_trainenv, secret_tree):
    data = json.loads(run_format(run_trainenv, secret_tree, "json"))
    for name in SECRET_NAMES:
        assert data["hyperparameters"][name] == "***", name
        assert data["launch"]["environment"][f"TRAINENV_HP_{normalize(name)}"] == "***", name
    for i, name in enumerate(NOT_SECRET_NAMES):
        assert data["hyperparameters"][name] == f"shown-{i}", name
    assert data["hyperparameters"]["db"] == "postgres://***@db.internal:5432/x"
    assert data["hyperparameters"]["lr"] == 0.1
    assert yaml.safe_load(run_format(run_trainenv, secret_tree, "yaml"))["hyperparameters"]["api_key"] == "***"


def test_shell_format_leaves_secrets_out_with_a_comment(run_trainenv, secret_tree):
    shell = run_format(run_trainenv, secret_tree, "shell")
    assert "***" not in shell
    for name in SECRET_NAMES:
        for prefix in ("TRAINENV_HP_", "PAI_HPS_", "SM_HP_"):
            # wandbApiKey becomes WANDBAPIKEY: no longer a secret name, but its value is one
            kind = "holds a secret" if name in ("wandbApiKey", "MyAPIKey") else "secret"
            assert f"\n# {prefix}{normalize(name)}: {kind}, left out (--show-secrets shows it)\n" in shell
    for name in ("TRAINENV_HPS", "TRAINENV_HP_DB", "SM_TRAINING_ENV"):
        assert f"\n# {name}: holds a secret, left out (--show-secrets shows it)\n" in shell
    back = eval_in_sh(shell, re.findall(r"^export ([A-Z0-9_]+)=", shell, re.MULTILINE))
    assert "TRAINENV_HP_HF_TOKEN" not in back and "TRAINENV_HPS" not in back
    for i, name in enumerate(NOT_SECRET_NAMES):
        assert back[f"TRAINENV_HP_{normalize(name)}"] == f"shown-{i}"


@pytest.mark.parametrize("fmt", ["json", "shell"])
def test_show_secrets_prints_them(run_trainenv, secret_tree, fmt):
    result = run_trainenv(
        "env", "--format", fmt, "--show-secrets", extra_env={"TRAINENV_BASE_DIR": str(secret_tree), "TRAINENV_COMPAT": ALL_COMPAT}
    )
    assert result.returncode == 0, result.stderr
    if fmt == "json":
        data = json.loads(result.stdout)
        assert data["hyperparameters"]["HF_TOKEN"] == f"{SECRET}-7"
        assert data["launch"]["environment"]["TRAINENV_HP_HF_TOKEN"] == f"{SECRET}-7"
    else:
        back = eval_in_sh(result.stdout, ["TRAINENV_HP_HF_TOKEN", "TRAINENV_HPS"])
        assert back["TRAINENV_HP_HF_TOKEN"] == f"{SECRET}-7"
        assert json.loads(back["TRAINENV_HPS"])["db"] == f"postgres://bob:{URL_PASSWORD}@db.internal:5432/x"


def test_url_credentials_in_an_error_are_redacted(run_trainenv, job_tree):
    base = job_tree()
    result = run_trainenv(
        "env", extra_env={"TRAINENV_BASE_DIR": str(base), "TF_CONFIG": f'{{"cluster": "https://bob:{URL_PASSWORD}@tf.internal/"'}
    )
    assert result.returncode == EXIT_CONFIG and "TF_CONFIG" in result.stderr
    assert URL_PASSWORD not in result.stderr and "https://***@tf.internal/" in result.stderr


@pytest.mark.parametrize("fmt", ["json", "yaml", "shell"])
def test_url_credentials_are_never_printed(run_trainenv, secret_tree, fmt):
    assert URL_PASSWORD not in run_format(run_trainenv, secret_tree, fmt)


def strings_in(value) -> list:
    """Every string a reader of this value could recover: nested JSON decoded, shell words split."""
    found: list = []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += strings_in(key) + strings_in(inner)
    elif isinstance(value, list):
        for inner in value:
            found += strings_in(inner)
    elif isinstance(value, str):
        found.append(value)
        if value[:1] in "[{":
            try:
                found += strings_in(json.loads(value))
            except ValueError:
                pass
        try:
            words = shlex.split(value)
        except ValueError:
            words = []
        if len(words) > 1:
            found += words
    return found


def printed_strings(run_trainenv, base: Path, fmt: str) -> list:
    """What ``trainenv env --format fmt`` shows, parsed back the way its reader would."""
    out = run_format(run_trainenv, base, fmt)
    if fmt == "json":
        data = json.loads(out)
    elif fmt == "yaml":
        data = yaml.safe_load(out)
    else:
        data = eval_in_sh(out, re.findall(r"^export ([A-Z0-9_]+)=", out, re.MULTILINE))
    return [out] + strings_in(data)


@pytest.mark.parametrize("fmt", ["json", "yaml", "shell"])
def test_secret_values_are_never_printed(run_trainenv, secret_tree, fmt):
    leaks = [s for s in printed_strings(run_trainenv, secret_tree, fmt) if SECRET in s]
    assert leaks == []


# A password as people write them: quotes, a backslash, a newline (JSON and sh escape each).
AWKWARD_SECRET = 'S3cr"et\\pa\'ss\nword'


@pytest.mark.parametrize(
    "fmt",
    [
        "json",
        "yaml",
        "shell",
    ],
)
def test_secret_values_with_quotes_are_never_printed(run_trainenv, job_tree, fmt):
    base = job_tree(hyperparameters={"db_password": json.dumps(AWKWARD_SECRET), "lr": "0.1"})
    leaks = [s for s in printed_strings(run_trainenv, base, fmt) if "S3cr" in s or "ss\nword" in s]
    assert leaks == []


def test_shell_format_survives_a_secret_that_is_also_a_name_part(run_trainenv, research_tree):
    path = research_tree / HP
    path.write_text(json.dumps({"api_key": "HOST", "lr": "0.1"}))
    out = run_format(run_trainenv, research_tree, "shell")
    names = re.findall(r"^export ([^=]+)=", out, re.MULTILINE)
    assert all(re.fullmatch(r"[A-Z0-9_]+", name) for name in names)
    back = eval_in_sh(out, names)
    assert back["TRAINENV_CURRENT_HOST"] == "algo-1" and "TRAINENV_HP_API_KEY" not in back
    assert "# TRAINENV_HP_API_KEY: secret, left out (--show-secrets shows it)" in out.splitlines()


@pytest.mark.parametrize("fmt", ["json", "yaml", "shell"])
def test_nested_secret_names_are_never_printed(run_trainenv, job_tree, fmt):
    base = job_tree(hyperparameters={"cfg": json.dumps({"password": "nested-secret-1", "depth": 3}), "lr": "0.1"})
    leaks = [s for s in printed_strings(run_trainenv, base, fmt) if "nested-secret-1" in s]
    assert leaks == []


# ---------------------------------------------------------------------------------------
# Bad input: exit 78, one line naming the source and the key, nothing created or deleted


def case_malformed_json(job_tree, ctx):
    base = job_tree(hyperparameters='{"lr": 0.1,\n  "epochs": }\n')
    return base, {}, [str(base / HP), "line 2 column 13"]


def case_top_level_list(job_tree, ctx):
    base = job_tree(hyperparameters='["lr", "0.1"]')
    return base, {}, [str(base / HP), "top level must be a JSON object"]


def case_non_utf8(job_tree, ctx):
    base = job_tree(hyperparameters=b'{"name": "caf\xe9"}')
    return base, {}, [str(base / HP), "not valid UTF-8"]


def case_50_mb(job_tree, ctx):
    base = job_tree(hyperparameters=b'{"lr": "')
    with open(base / HP, "r+b") as handle:
        handle.truncate(50 * 1024 * 1024)
    return base, {}, [str(base / HP), "larger than 10 MiB"]


def hp_name_case(name):
    def case(job_tree, ctx):
        base = job_tree(hyperparameters=json.dumps({"lr": "1", name: "2"}))
        return base, {}, [str(base / HP), repr(name), "invalid hyperparameter name"]

    return case


def channel_case(name):
    def case(job_tree, ctx):
        base = job_tree(input_data_config=json.dumps({"train": {}, name: {}}))
        return base, {}, [str(base / IDC), repr(name), "invalid channel name"]

    return case


def case_channel_dir_newline(job_tree, ctx):
    base = job_tree(channels=["train", "bad\nname"])
    return base, {}, [str(base / "input/data"), "'bad\\nname'"]


def rc_case(config, *fragments):
    def case(job_tree, ctx):
        base = job_tree(resource_config=config)
        return base, {}, [str(base / RC), *fragments]

    return case


def case_cuda_missing_gpu(job_tree, ctx):
    return job_tree(), {"CUDA_VISIBLE_DEVICES": "0,7", "PYTHONPATH": str(ctx["nvml"])}, ["CUDA_VISIBLE_DEVICES", "'7'", "no such GPU", "this node has 2"]


def case_cuda_syntax(job_tree, ctx):
    return job_tree(), {"CUDA_VISIBLE_DEVICES": "first"}, ["CUDA_VISIBLE_DEVICES", "'first'"]


def case_tf_config_json(job_tree, ctx):
    return job_tree(), {"TF_CONFIG": '{"cluster": {"worker": ["a:2222"]'}, ["TF_CONFIG", "not valid JSON"]


def case_tf_config_index(job_tree, ctx):
    tf = {"cluster": {"worker": ["a:2222", "b:2222"]}, "task": {"type": "worker", "index": 2}}
    return job_tree(), {"TF_CONFIG": json.dumps(tf)}, ["TF_CONFIG", "task.index", "out of range"]


def case_bad_yaml(job_tree, ctx):
    base = job_tree(settings="distribution: [torchrun\n")
    return base, {}, [str(base / "input/config/trainenv.yaml"), "invalid YAML at line 2"]


def case_bad_compat(job_tree, ctx):
    return job_tree(), {"TRAINENV_COMPAT": "pai,bogus"}, ["TRAINENV_COMPAT", "'bogus'"]


def case_env_file(job_tree, ctx):
    base = job_tree()
    snapshot = base / "snapshot.json"
    snapshot.write_text("{nope")
    return base, {"TRAINENV_ENV_FILE": str(snapshot)}, [str(snapshot), "line 1 column 2"]


def case_lone_surrogate(job_tree, ctx):
    base = job_tree(hyperparameters='{"lr": "0.1", "label": "\\ud800"}')
    return base, {}, [str(base / HP), "label"]


def case_nul(job_tree, ctx):
    base = job_tree(hyperparameters='{"lr": "0.1", "label": "a\\u0000b"}')
    return base, {}, [str(base / HP), "label", "NUL"]


def case_bare_nan(job_tree, ctx):
    base = job_tree(hyperparameters='{"lr": NaN}')
    return base, {}, [str(base / HP), "NaN"]


def case_5000_digits(job_tree, ctx):
    base = job_tree(hyperparameters='{"seed": ' + "1" * 5000 + "}")
    return base, {}, [str(base / HP)]


def case_yaml_bad_date(job_tree, ctx):
    base = job_tree(settings="max_run_seconds: 2020-13-45\n")
    return base, {}, [str(base / "input/config/trainenv.yaml")]


def case_name_collision(job_tree, ctx):
    base = job_tree(hyperparameters={"learning-rate": "1", "learning_rate": "2"})
    return base, {}, [str(base / HP), "'learning-rate'"]


def bad(name, case):
    return pytest.param(case, id=name)


BAD_INPUT = [
    bad("malformed-json", case_malformed_json),
    bad("top-level-list", case_top_level_list),
    bad("non-utf8", case_non_utf8),
    bad("50-mb-file", case_50_mb),
    bad("hp-name-space", hp_name_case("learning rate")),
    bad("hp-name-newline", hp_name_case("lr\n")),
    bad("hp-name-equals", hp_name_case("lr=0.1")),
    bad("hp-name-non-ascii", hp_name_case("rätt")),
    bad("channel-slash", channel_case("a/b")),
    bad("channel-dotdot", channel_case("..")),
    bad("channel-nul", channel_case("tr\x00ain")),
    bad("channel-newline", channel_case("tr\nain")),
    bad("channel-dir-newline", case_channel_dir_newline),
    bad("current-host-not-in-hosts", rc_case({"current_host": "algo-3", "hosts": ["algo-1", "algo-2"]}, "current_host", "'algo-3'")),
    bad("duplicate-hosts", rc_case({"current_host": "algo-1", "hosts": ["algo-1", "algo-1"]}, "hosts", "twice")),
    bad("empty-hosts", rc_case({"current_host": "algo-1", "hosts": []}, "hosts", "empty")),
    bad("cuda-gpu-that-does-not-exist", case_cuda_missing_gpu),
    bad("cuda-syntax", case_cuda_syntax),
    bad("tf-config-not-json", case_tf_config_json),
    bad("tf-config-index", case_tf_config_index),
    bad("bad-yaml", case_bad_yaml),
    bad("bad-compat", case_bad_compat),
    bad("broken-env-file", case_env_file),
    bad("hp-value-lone-surrogate", case_lone_surrogate),
    bad("hp-value-nul", case_nul),
    bad("hp-5000-digit-number", case_5000_digits),
    bad("hp-bare-nan", case_bare_nan),
    bad("yaml-impossible-date", case_yaml_bad_date),
    bad("hp-name-collision", case_name_collision),
]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_78_with_one_line(run_trainenv, job_tree, tree_state, tmp_path, fake_nvml_dir, case):
    base, extra, fragments = case(job_tree, {"nvml": fake_nvml_dir})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = tree_state(tmp_path)
    result = run_trainenv(
        "env", "--format", "shell" if "TRAINENV_COMPAT" in extra else "json",
        extra_env={"TRAINENV_BASE_DIR": str(base), **extra}, cwd=cwd,
    )
    assert result.returncode == EXIT_CONFIG, result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("trainenv: ConfigError: ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------
# Local mode, non-root, read-only HOME, an installed copy, taskset


@without_ml_dir
def test_local_mode_without_ml(run_trainenv, tmp_path):
    cwd = tmp_path / "laptop"
    cwd.mkdir()
    result = run_trainenv("env", "--format", "json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["local_mode"] is True and data["base_dir"] == str(cwd / "trainenv-job")
    assert data["num_nodes"] == 1 and data["channels"] == []
    assert list(cwd.iterdir()) == []


@pytest.fixture
def shared_dir():
    """A directory every user can read (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="trainenv-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def open_up(root: Path) -> None:
    """Make everything below ``root`` readable (and executables executable) by every user."""
    for directory, _dirnames, filenames in os.walk(root):
        os.chmod(directory, 0o755)
        for name in filenames:
            path = os.path.join(directory, name)
            mode = os.stat(path).st_mode
            os.chmod(path, 0o755 if mode & 0o100 else 0o644)


def as_nobody() -> list:
    """A command prefix that drops to uid/gid 65534 (nothing when already unprivileged)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    pytest.skip("neither setpriv nor runuser to drop privileges")


def nobody_env(**extra: str) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent-readonly", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def check_local_run(result, cwd: Path) -> None:
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["local_mode"] is True and data["base_dir"] == str(cwd / "trainenv-job")
    assert data["channels"] == ["train", "validation"]
    assert data["hyperparameters"]["layers"] == [1, 2]
    assert data["hosts"] == ["algo-1"] and data["job_name"] == "job-123"


@without_ml_dir
def test_non_root_with_read_only_home_in_local_mode(run_trainenv, research_tree, shared_dir, tree_state):
    prefix = as_nobody()
    probe = subprocess.run([*prefix, sys.executable, "-c", "import trainenv"], env=nobody_env(), capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot run this interpreter: {probe.stderr.decode()[-200:]}")
    shutil.copytree(research_tree, shared_dir / "trainenv-job")
    open_up(shared_dir)
    before = tree_state(shared_dir)
    result = run_trainenv("env", "--format", "json", env=nobody_env(), cwd=shared_dir, prefix=prefix)
    check_local_run(result, shared_dir)
    assert not os.path.exists("/nonexistent-readonly")
    assert tree_state(shared_dir) == before


@without_ml_dir
def test_pip_install_dot_then_env_as_non_root(research_tree, shared_dir, tree_state):
    """``pip install .`` (a real build, not the editable install) and run its console script."""
    try:
        import setuptools  # noqa: F401  (the build backend, used without build isolation: no network)
    except ImportError:
        pytest.skip("setuptools is not installed in this venv")
    project = shared_dir / "project"
    project.mkdir()
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, project / name)
    target = shared_dir / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(project)],
        check=True, capture_output=True,
    )
    script = target / "bin" / "trainenv"
    assert script.exists()
    work = shared_dir / "work"
    work.mkdir()
    shutil.copytree(research_tree, work / "trainenv-job")
    open_up(shared_dir)
    prefix = as_nobody()
    env = nobody_env(PYTHONPATH=str(target))
    where = subprocess.run([*prefix, sys.executable, "-c", "import trainenv; print(trainenv.__file__)"], env=env, cwd=work, capture_output=True, text=True)
    if where.returncode != 0:
        pytest.skip(f"uid 65534 cannot run this interpreter: {where.stderr[-200:]}")
    assert where.stdout.strip().startswith(str(target)), "the installed copy, not the source tree"
    before = tree_state(work)
    result = subprocess.run([*prefix, str(script), "env", "--format", "json"], env=env, cwd=work, capture_output=True, text=True)
    check_local_run(result, work)
    assert tree_state(work) == before


def test_taskset_one_cpu(run_trainenv, research_tree):
    need_tool("taskset", "util-linux")
    cpu = min(os.sched_getaffinity(0))
    data = env_json(run_trainenv, research_tree)
    result = run_trainenv(
        "env", "--format", "json", extra_env={"TRAINENV_BASE_DIR": str(research_tree)}, prefix=["taskset", "-c", str(cpu)]
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_cpus"] == 1
    assert data["num_cpus"] == resources.cpu_count(), "without taskset: this process's own count"


def test_a_bad_choice_given_as_an_option_is_a_config_error_with_a_failure_file(tmp_path):
    """As its variable would be: exit 78, one line naming the option, a failure file (not click's exit 2)."""
    base = make_tree(tmp_path, {"train.py": "print('must not run')\n"})
    done = run_train(base, "--entry-point", "train.py", "--distribution", "bogus")
    assert done.returncode == 78
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("ConfigError: option --distribution: 'bogus'"), first
    served = run_trainenv("serve", "--server", "bogus", extra_env={"TRAINENV_BASE_DIR": str(tmp_path)})
    assert served.returncode == 78 and "--server" in served.stderr
