"""Entry functions (``pkg.mod:func``, ``file.py:func``) and ``TRAINENV_COMMAND`` as a JSON list:
a real ``trainenv train`` (and ``trainenv local``) on a temp job tree each time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import failure, make_tree, run_train, run_trainenv

SHOW = (
    "import json, sys\n"
    "def main(lr, epochs, name='default'):\n"
    "    print(json.dumps({'module': __name__, 'lr': lr, 'epochs': epochs, 'name': name,\n"
    "                      'types': [type(lr).__name__, type(epochs).__name__]}))\n"
)
FILE_CODE = SHOW + "if __name__ == '__main__':\n    print('MAIN BLOCK RAN')\n"
HPS = {"lr": "0.1", "epochs": "3", "name": "x y"}  # strings, as a platform writes them


def shown(done) -> dict:
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def dry_argv(done) -> list:
    """The argv line of ``trainenv train --dry-run``."""
    [line] = [line for line in done.stdout.decode().splitlines() if line.startswith("argv ")]
    return json.loads(line[len("argv "):])


def test_a_function_in_a_package_module_gets_decoded_hyperparameters(tmp_path):
    base = make_tree(tmp_path, {"pkg/__init__.py": "", "pkg/mod.py": SHOW}, HPS)
    done = run_train(base, TRAINENV_ENTRY_POINT="pkg.mod:main")
    assert done.returncode == 0, done.stderr.decode()
    assert shown(done) == {"module": "pkg.mod", "lr": 0.1, "epochs": 3, "name": "x y", "types": ["float", "int"]}
    assert not (base / "output" / "failure").exists()


def test_a_function_in_a_file_is_imported_under_its_stem_without_its_main_block(tmp_path):
    base = make_tree(tmp_path, {"jobs/train.py": FILE_CODE, "jobs/helper.py": "X = 1\n"}, {"lr": 0.5, "epochs": 2})
    done = run_train(base, TRAINENV_ENTRY_POINT="jobs/train.py:main")
    assert done.returncode == 0, done.stderr.decode()
    assert b"MAIN BLOCK RAN" not in done.stdout
    assert shown(done) == {"module": "train", "lr": 0.5, "epochs": 2, "name": "default", "types": ["float", "int"]}


def test_dry_run_shows_the_runtime_argv_without_hyperparameters(tmp_path):
    base = make_tree(tmp_path, {"train.py": FILE_CODE}, HPS)
    done = run_train(base, "--dry-run", TRAINENV_ENTRY_POINT="train.py:main")
    assert done.returncode == 0, done.stderr.decode()
    assert dry_argv(done)[1:] == ["-m", "trainenv.runtimes.function", f"{base / 'usercode' / 'train.py'}:main"]
    assert "function:" in done.stdout.decode()


@pytest.mark.parametrize(
    "body, status, category, fragment",
    [
        ("    sys.exit(3)\n", 3, "UserError", "status 3"),
        ("    raise ValueError('boom in the job')\n", 1, "UserError", "ValueError: boom in the job"),
        ("    return 5\n", 0, None, None),
    ],
)
def test_how_the_function_ends_is_the_exit_status(tmp_path, body, status, category, fragment):
    code = "import sys\ndef main(lr):\n    print('started')\n" + body
    base = make_tree(tmp_path, {"train.py": code}, {"lr": "1"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py:main")
    assert done.returncode == status, done.stderr.decode()
    assert b"started" in done.stdout
    if category is None:
        assert not (base / "output" / "failure").exists()
        return
    text = failure(base)
    assert text.startswith(f"{category}: ") and fragment in text
    if status == 1:
        assert "Traceback (most recent call last):" in text and "in main" in text


def test_a_hyperparameter_the_function_does_not_take_is_a_config_error(tmp_path):
    code = "def main(lr):\n    open('called', 'w').write('yes')\n"
    base = make_tree(tmp_path, {"train.py": code}, {"lr": "1", "bogus_knob": "2"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py:main")
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: ") and "hyperparameters.json: bogus_knob" in first
    assert not (base / "usercode" / "called").exists()  # checked before the call


def test_only_the_runtime_turns_an_exit_78_into_a_config_error(tmp_path):
    code = "import sys\nsys.stderr.write('trainenv: ConfigError: not really\\n')\nsys.exit(78)\n"
    base = make_tree(tmp_path, {"train.py": code})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 78
    assert failure(base).startswith("UserError: ")  # a script's own 78 is the job's status


def test_a_function_with_kwargs_takes_every_hyperparameter(tmp_path):
    code = "import json\ndef main(lr, **rest):\n    print(json.dumps([lr, rest]))\n"
    base = make_tree(tmp_path, {"train.py": code}, {"lr": "1", "b": "[1, 2]", "c": "true"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py:main")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == [1, {"b": [1, 2], "c": True}]


@pytest.mark.parametrize(
    "entry, code, fragment",
    [
        ("train.py:main", {"train.py": "def main(lr, steps):\n    pass\n"}, "steps"),  # a required parameter no hp gives
        ("train.py:nope", {"train.py": "def main():\n    pass\n"}, "'nope'"),
        ("nopkg.mod:main", {}, "'nopkg.mod'"),
        ("missing.py:main", {}, "missing.py does not exist"),
    ],
)
def test_a_function_that_cannot_be_called_is_a_config_error(tmp_path, entry, code, fragment):
    base = make_tree(tmp_path, code, {"lr": "1"} if "lr" in str(code) else {})
    done = run_train(base, TRAINENV_ENTRY_POINT=entry)
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: ") and fragment in first, first


def test_an_import_error_inside_the_module_is_the_jobs_error(tmp_path):
    base = make_tree(tmp_path, {"train.py": "import not_installed_xyz\ndef main():\n    pass\n"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py:main")
    assert done.returncode == 1, done.stderr.decode()
    assert failure(base).startswith("UserError: ") and "not_installed_xyz" in failure(base)


def test_a_function_under_torchrun_runs_on_every_rank(tmp_path):
    pytest.importorskip("torch")
    code = "import os, sys\ndef main(lr):\n    sys.stdout.write(f\"rank {os.environ['RANK']} {lr}\\n\")  # one write: ranks share stdout\n"
    base = make_tree(tmp_path, {"train.py": code}, {"lr": "0.5"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py:main", TRAINENV_DISTRIBUTION="torchrun",
                     TRAINENV_NPROC_PER_NODE="2", timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(line for line in done.stdout.decode().splitlines() if line.startswith("rank")) == ["rank 0 0.5", "rank 1 0.5"]


def test_an_interpreter_without_trainenv_is_a_config_error(tmp_path):
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    base = make_tree(tmp_path / "job", {"train.py": "def main():\n    open('called', 'w').write('yes')\n"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py:main", TRAINENV_PYTHON=str(venv / "bin" / "python"))
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_PYTHON: ") and "cannot import trainenv" in first, first
    assert not (base / "usercode" / "called").exists()
    wrapper = tmp_path / "python"  # another path to an interpreter that has trainenv (a symlink would lose the venv)
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py:main", TRAINENV_PYTHON=str(tmp_path / "python"))
    assert done.returncode == 0, done.stderr.decode()
    assert (base / "usercode" / "called").exists()


def test_trainenv_local_runs_an_entry_function(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text(FILE_CODE)
    done = run_trainenv("local", "--source-dir", "src", "--entry-point", "train.py:main", "--hp", "lr=0.25", "--hp", "epochs=4",
                        text=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert shown(done)["lr"] == 0.25 and shown(done)["types"] == ["float", "int"]


# -- the job's own arguments (trainenv train -- ARGS), by ADS's ENTRY_FUNCTION rules ---------------

ECHO_ARGS = "import json, sys\ndef main(*args, **kwargs):\n    print(json.dumps([list(args), kwargs]))\n    print(json.dumps(sys.argv[1:]))\n"


@pytest.mark.parametrize(
    "argv, args, kwargs",
    [  # ADS's own table (driver_utils ArgumentParser, v2.8.3 on)
        (["a", "--k1", "v1", "--flag", "--k2", "v2", "b"], ["a", "b"], {"k1": "v1", "flag": None, "k2": "v2"}),
        (["--k", "v1", "v2"], ["v2"], {"k": "v1"}),
        (["--k=v"], [], {"k=v": None}),
        (["-x", "1", "--", "z"], ["-x", "1", "--", "z"], {}),
        (["--k", "--"], [], {"k": "--"}),
        (["--k", "1", "--k", "2"], [], {"k": "2"}),
    ],
)
def test_job_arguments_reach_the_function_by_ads_rules(tmp_path, argv, args, kwargs):
    base = make_tree(tmp_path, {"ads.py": ECHO_ARGS}, {"ignored": "1"})
    done = run_train(base, "--entry-point", "ads.py:main", "--", *argv)
    assert done.returncode == 0, done.stderr.decode()
    [call, seen] = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert call == [args, kwargs]  # all strings; the hyperparameters are not passed
    assert seen == argv  # sys.argv[1:] is the job's arguments, as under ADS's driver


def test_a_job_argument_the_function_does_not_take_is_a_config_error(tmp_path):
    base = make_tree(tmp_path, {"ads.py": "def main(a):\n    open('called', 'w').write('yes')\n"})
    done = run_train(base, "--entry-point", "ads.py:main", "--", "--a", "1", "--bogus_opt", "2")
    assert done.returncode == 78, done.stderr.decode()
    assert "the job's arguments: bogus_opt" in failure(base).splitlines()[0]
    assert not (base / "usercode" / "called").exists()


def test_job_arguments_follow_the_hyperparameter_arguments_of_a_script(tmp_path):
    """A container's CMD reaches a script after the hyperparameters, as the contract says."""
    base = make_tree(tmp_path, {"train.py": "import sys; print(sys.argv[1:])\n"}, {"lr": "0.1"})
    done = run_train(base, "--entry-point", "train.py", "--", "--epochs", "3", "data.csv")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "['--lr', '0.1', '--epochs', '3', 'data.csv']"


def test_job_arguments_are_refused_for_a_command(tmp_path):
    base = make_tree(tmp_path, {})
    done = run_train(base, "--command", "echo ran", "--", "--lr", "1")
    assert done.returncode == 78 and b"ran" not in done.stdout
    assert "arguments after --" in failure(base) and "a command" in failure(base)


def test_trainenv_local_passes_job_arguments_to_the_function(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ads.py").write_text(ECHO_ARGS)
    done = run_trainenv("local", "--source-dir", "src", "--entry-point", "ads.py:main", "--", "p", "--k", "v", text=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout.splitlines()[0]) == [["p"], {"k": "v"}]


# -- TRAINENV_COMMAND as a JSON list ---------------------------------------------------------------

ARGV = ["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", "two words", "$(echo hi)", "a;b", "*"]


def test_a_json_list_command_is_run_without_a_shell(tmp_path):
    base = make_tree(tmp_path, {"x.txt": "glob bait"}, {"lr": "1"})
    done = run_train(base, TRAINENV_COMMAND=json.dumps(ARGV))
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == ["two words", "$(echo hi)", "a;b", "*"]  # verbatim; no hyperparameters appended


def test_a_yaml_list_command_in_trainenv_yaml(tmp_path):
    settings = "command:\n" + "".join(f"  - {json.dumps(item)}\n" for item in ARGV)
    base = make_tree(tmp_path, {}, settings=settings)
    done = run_train(base)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == ARGV[3:]
    dry = run_train(base, "--dry-run")
    assert dry_argv(dry) == ARGV


@pytest.mark.parametrize(
    "value, fragment",
    [
        ('["python3", 1]', "not a JSON list of strings"),
        ("[python3 train.py", "not a JSON list"),
        ("[]", "needs a program"),
        ('["python3", ["nested"]]', "not a JSON list of strings"),
    ],
)
def test_a_bad_json_list_command_is_a_config_error(tmp_path, value, fragment):
    base = make_tree(tmp_path, {}, {"lr": "1"})
    done = run_train(base, TRAINENV_COMMAND=value)
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_COMMAND: ") and fragment in first, first


def test_a_bad_yaml_list_command_names_the_file_and_key(tmp_path):
    base = make_tree(tmp_path, {}, settings="command:\n  - python3\n  - {a: 1}\n")
    done = run_train(base)
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert "trainenv.yaml: command:" in first and "item 1 is a dict" in first, first


def test_trainenv_local_runs_a_json_list_command(tmp_path: Path):
    (tmp_path / "src").mkdir()
    done = run_trainenv("local", "--source-dir", "src", "--command", json.dumps(ARGV), text=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == ARGV[3:]
