"""``trainenv train`` end to end: real launcher, real child processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import TRAINENV, failure, job_environ, make_tree, need_pid_namespace, need_uv, run_train, run_trainenv, start_train

ARGV_SCRIPT = "import json, sys\nprint(json.dumps(sys.argv[1:]))\n"


def test_script_gets_hyperparameters_as_args_in_file_order(tmp_path):
    base = make_tree(tmp_path, {"train.py": ARGV_SCRIPT}, {"zeta": "1", "alpha": "true", "layers": "[1, 2]", "name": "x y"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == ["--zeta", "1", "--alpha", "true", "--layers", "[1,2]", "--name", "x y"]
    for sub in ("model", "checkpoints", "tensorboard"):
        assert (base / "output" / sub).is_dir()
    assert not (base / "output" / "failure").exists()


def test_module_shell_and_executable_entry_points(tmp_path):
    base = make_tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/main.py": ARGV_SCRIPT,
            "run.sh": 'echo "sh:$1:$2"\n',
            "tool": "#!/bin/sh\necho \"tool:$1:$2\"\n",
        },
        {"lr": "0.1"},
    )
    os.chmod(base / "usercode" / "tool", 0o755)
    module = run_train(base, TRAINENV_ENTRY_POINT="-m pkg.main")
    assert module.returncode == 0 and json.loads(module.stdout) == ["--lr", "0.1"]
    shell = run_train(base, TRAINENV_ENTRY_POINT="run.sh")
    assert shell.stdout.decode().strip() == "sh:--lr:0.1"
    tool = run_train(base, TRAINENV_ENTRY_POINT="tool")
    assert tool.stdout.decode().strip() == "tool:--lr:0.1"


def test_command_runs_in_code_dir_without_args_and_pai_command_file(tmp_path):
    base = make_tree(tmp_path, {}, {"lr": "0.1"})
    done = run_train(base, TRAINENV_COMMAND='echo "$PWD $PAI_USER_ARGS $#"')
    assert done.stdout.decode().split() == [str(base / "usercode"), "--lr", "0.1", "0"]
    (base / "input" / "config" / "execution").mkdir()
    (base / "input" / "config" / "execution" / "command.sh").write_text("echo from-command-sh $PAI_HPS_LR\n")
    done = run_train(base)
    assert done.returncode == 0 and done.stdout.decode().strip() == "from-command-sh 0.1"


def test_child_environment_snapshot_and_pythonpath(tmp_path):
    script = (
        "import os, json\n"
        "from trainenv import training_env\n"
        "env = training_env()\n"
        "print(json.dumps({'pp': os.environ['PYTHONPATH'], 'unbuf': os.environ['PYTHONUNBUFFERED'],\n"
        "  'file': os.environ['TRAINENV_ENV_FILE'], 'hps': dict(env.hyperparameters), 'cpus': env.num_cpus,\n"
        "  'model': os.environ['TRAINENV_MODEL_DIR'], 'pai_model': os.environ['PAI_OUTPUT_MODEL'],\n"
        "  'platform_hps': os.environ['PAI_HPS'], 'omp': os.environ.get('OMP_NUM_THREADS')}))\n"
    )
    base = make_tree(tmp_path, {"train.py": script}, {"lr": "0.5"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", PYTHONPATH="/inherited/path", PAI_HPS='{"platform":"kept"}')
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout)
    assert seen["pp"] == f"{base / 'usercode'}{os.pathsep}/inherited/path"  # never the launcher's sys.path
    assert seen["unbuf"] == "1"
    assert seen["hps"] == {"lr": 0.5}
    assert seen["model"] == seen["pai_model"] == str(base / "output" / "model")
    assert seen["platform_hps"] == '{"platform":"kept"}'  # a platform value is never overwritten
    snapshot = json.loads(Path(seen["file"]).read_text())
    assert snapshot["num_cpus"] == seen["cpus"] and snapshot["hyperparameters"] == {"lr": 0.5}
    assert oct(os.stat(seen["file"]).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "entry, setup, expected",
    [
        ("missing.py", None, "does not exist"),
        ("tool", "not-executable", "is not executable"),
        ("adir", "directory", "is a directory"),
        ("-m 1bad", None, "expected '-m package.module'"),
    ],
)
def test_bad_entry_points_are_config_errors(tmp_path, entry, setup, expected):
    base = make_tree(tmp_path)
    if setup == "not-executable":
        (base / "usercode" / "tool").write_text("#!/bin/sh\n")
    if setup == "directory":
        (base / "usercode" / "adir").mkdir()
    done = run_train(base, TRAINENV_ENTRY_POINT=entry)
    assert done.returncode == 78
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_ENTRY_POINT:") and expected in first


def test_no_entry_point_names_every_way_to_set_one(tmp_path):
    base = make_tree(tmp_path)
    done = run_train(base)
    assert done.returncode == 78
    assert "TRAINENV_ENTRY_POINT" in failure(base) and "command.sh" in failure(base)


def test_missing_module_is_a_user_error_with_the_message(tmp_path):
    base = make_tree(tmp_path)
    done = run_train(base, TRAINENV_ENTRY_POINT="-m no_such_module_xyz")
    assert done.returncode == 1
    assert failure(base).splitlines()[0].startswith("UserError:")
    assert "No module named no_such_module_xyz" in failure(base)


def test_exit_status_passes_through(tmp_path):
    base = make_tree(tmp_path, {"train.py": "import sys\nsys.exit(3)\n"})
    assert run_train(base, TRAINENV_ENTRY_POINT="train.py").returncode == 3
    assert failure(base).startswith("UserError: script train.py exited with status 3")


def test_exception_traceback_leads_the_failure_file(tmp_path):
    noise = "print('x' * 200, file=__import__('sys').stderr)\n" * 100
    base = make_tree(tmp_path, {"train.py": noise + "raise ValueError('learning rate must be positive')\n"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 1
    text = failure(base)
    assert "ValueError: learning rate must be positive" in text[:1024]
    assert "Traceback (most recent call last)" in text
    assert text.count("x" * 200) == 0  # the tail starts at the last traceback


@pytest.mark.parametrize("code, signum", [("import os\nos.abort()\n", signal.SIGABRT), ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", signal.SIGKILL)])
def test_death_by_signal_is_128_plus_n(tmp_path, code, signum):
    base = make_tree(tmp_path, {"train.py": code})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 128 + signum
    assert failure(base).startswith(f"Signal: script train.py was killed by {signal.Signals(signum).name}")


def test_time_limit_stops_the_job_with_124(tmp_path):
    base = make_tree(tmp_path, {"train.py": "import time\ntime.sleep(60)\n"})
    started = time.monotonic()
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_MAX_RUN_SECONDS="1", TRAINENV_GRACE_SECONDS="2")
    assert done.returncode == 124
    assert time.monotonic() - started < 15
    assert failure(base).startswith("Timeout:")


CHECKPOINTER = """
import os, signal, sys, time
out = os.environ['TRAINENV_CHECKPOINT_DIR']
def on_term(signum, frame):
    with open(os.path.join(out, 'ckpt.tmp'), 'w') as f:
        for i in range(10):
            f.write('block %d\\n' % i); f.flush(); time.sleep(0.1)
    os.replace(os.path.join(out, 'ckpt.tmp'), os.path.join(out, 'ckpt'))
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(os.path.join(out, 'ready'), 'w').close()
while True:
    time.sleep(0.05)
"""


def _wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigterm_gives_the_job_its_grace_to_checkpoint(tmp_path):
    base = make_tree(tmp_path, {"train.py": CHECKPOINTER})
    launcher = start_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_GRACE_SECONDS="10")
    _wait_for(base / "output" / "checkpoints" / "ready")
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=30)
    assert launcher.returncode == 0  # the job's own status after a clean checkpoint
    assert (base / "output" / "checkpoints" / "ckpt").read_text().count("block") == 10


STUBBORN = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import signal, time, os\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nopen(os.environ["MARK"], "w").write(str(os.getpid()))\\ntime.sleep(600)'])
time.sleep(600)
"""


def test_grandchild_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    base = make_tree(tmp_path, {"train.py": STUBBORN})
    mark = tmp_path / "grandchild.pid"
    launcher = start_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_GRACE_SECONDS="1", MARK=str(mark))
    _wait_for(mark)
    while not mark.read_text():
        time.sleep(0.01)
    grandchild = int(mark.read_text())
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + signal.SIGTERM  # the main process died of the forwarded SIGTERM
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild that ignores SIGTERM survived the launcher")


def test_large_output_passes_through_unchanged(tmp_path):
    code = (
        "import sys\n"
        "line = b'0123456789abcdefghijklmnopqrstuvwxyz' * 3 + b'\\n'\n"
        "block = line * 10000\n"
        "for _ in range(48):\n    sys.stdout.buffer.write(block)\n    sys.stderr.buffer.write(block[:1000])\n"
        "sys.stdout.buffer.write(b'no newline at the end')\n"
    )
    base = make_tree(tmp_path, {"train.py": code})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", timeout=120)
    assert done.returncode == 0
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 3 + b"\n"
    assert done.stdout == line * 10000 * 48 + b"no newline at the end"  # ~52 MB, byte for byte
    assert (line * 10000)[:1000] * 48 in done.stderr


def test_log_prefix(tmp_path):
    base = make_tree(tmp_path, {"train.py": "import sys\nprint('a'); print('b', file=sys.stderr); sys.stdout.write('c')\n"})
    done = run_train(base, "--log-prefix", "--entry-point", "train.py", TRAINENV_CURRENT_HOST="", timeout=60)
    assert done.returncode == 0, done.stderr
    host = os.uname().nodename
    assert done.stdout.decode().splitlines() == [f"[{host}:0] a", f"[{host}:0] c"]
    assert f"[{host}:0] b" in done.stderr.decode()


def test_huge_hyperparameters_do_not_hit_e2big(tmp_path):
    hps = {f"param_{i}": "v" * 2500 for i in range(60)}
    script = "import json, os, sys\nprint(len(sys.argv) - 1, len(os.environ.get('TRAINENV_HPS', '')), os.environ.get('TRAINENV_OMITTED'))\n"
    base = make_tree(tmp_path, {"train.py": script}, hps)
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_COMPAT="pai,sagemaker")
    assert done.returncode == 0, done.stderr.decode()
    count, hps_len, omitted = done.stdout.decode().split(" ", 2)
    assert count == "120" and hps_len == "0"
    assert {"TRAINENV_HPS", "PAI_HPS", "SM_HPS", "SM_TRAINING_ENV"} <= set(json.loads(omitted))


def test_user_failure_file_is_kept_and_a_stale_one_replaced(tmp_path):
    own = "import os, sys\nopen(os.path.join(os.environ['TRAINENV_OUTPUT_DIR'], 'failure'), 'w').write('MyReason: disk full')\nsys.exit(2)\n"
    base = make_tree(tmp_path, {"train.py": own})
    assert run_train(base, TRAINENV_ENTRY_POINT="train.py").returncode == 2
    assert failure(base) == "MyReason: disk full"
    (base / "usercode" / "train.py").write_text("import sys\nsys.exit(5)\n")
    assert run_train(base, TRAINENV_ENTRY_POINT="train.py").returncode == 5
    assert failure(base).startswith("UserError: script train.py exited with status 5")


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    base = make_tree(tmp_path, {"train.py": "open('ran', 'w')\n"}, {"lr": "0.1", "api_token": "tok-123456"})
    done = run_train(base, "--dry-run", TRAINENV_ENTRY_POINT="train.py", PIP_INDEX_URL="https://user:pw-98765@pypi.example/simple")
    assert done.returncode == 0
    out = done.stdout.decode()
    assert "train.py" in out and "TRAINENV_HP_LR=0.1" in out
    assert "tok-123456" not in out and "pw-98765" not in out
    assert not (base / "usercode" / "ran").exists() and not (base / "output").exists()


def test_secrets_never_reach_the_log_or_failure_file(tmp_path):
    script = "import os, sys\nprint('token is', os.environ['MY_SERVICE_TOKEN'], file=sys.stderr)\nsys.exit(1)\n"
    base = make_tree(tmp_path, {"train.py": script}, {"db_password": "hunter2-pass"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", MY_SERVICE_TOKEN="tok-abcdef-999")
    assert done.returncode == 1
    text = failure(base)
    assert "tok-abcdef-999" not in text and "token is ***" in text
    launcher_lines = [l for l in done.stderr.decode().splitlines() if l.startswith("trainenv:")]
    assert not any("hunter2-pass" in l or "tok-abcdef-999" in l for l in launcher_lines)


def test_settings_from_trainenv_yaml_and_bad_yaml(tmp_path):
    base = make_tree(tmp_path, {"train.py": ARGV_SCRIPT, "trainenv.yaml": "entry_point: train.py\n"}, {"a": "1"})
    done = run_train(base)
    assert done.returncode == 0 and json.loads(done.stdout) == ["--a", "1"]
    (base / "input" / "config" / "trainenv.yaml").write_text("entry_point: [unclosed\n")
    assert run_train(base).returncode == 78
    first = failure(base).splitlines()[0]
    assert "trainenv.yaml" in first and "invalid YAML at line" in first


def test_bad_config_value_names_variable_and_value(tmp_path):
    base = make_tree(tmp_path, {"train.py": ""})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_GRACE_SECONDS="soon")
    assert done.returncode == 78
    assert failure(base).splitlines()[0] == "ConfigError: TRAINENV_GRACE_SECONDS: 'soon': expected a number"


def test_hostile_channel_name_is_rejected_and_nothing_is_touched(tmp_path):
    base = make_tree(tmp_path, {"train.py": ""})
    (base / "input" / "config" / "inputdataconfig.json").write_text(json.dumps({"../escape": {}}))
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 78
    assert "invalid channel name" in failure(base).splitlines()[0]
    assert not (tmp_path.parent / "escape").exists()


ORPHANS = """
import os, time
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            time.sleep(0.2)  # the grandchild: an orphan from birth, re-parented to PID 1
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
time.sleep(1.5)
zombies = []
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            if open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z':
                zombies.append(pid)
        except OSError:
            pass
print('pid1', open('/proc/1/cmdline').read().replace('\\0', ' ').strip(), 'zombies', len(zombies))
"""


def test_as_pid_1_reaps_orphans(tmp_path):
    need_pid_namespace()
    base = make_tree(tmp_path, {"train.py": ORPHANS})
    done = run_trainenv(
        "train", prefix=["unshare", "--pid", "--fork", "--mount-proc"],
        env=job_environ(base, TRAINENV_ENTRY_POINT="train.py"), text=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "trainenv train" in out  # the orphans' new parent really was trainenv
    assert out.strip().endswith("zombies 0"), out


def test_sigterm_to_pid_1_launcher_reaches_the_job(tmp_path):
    need_pid_namespace()
    base = make_tree(tmp_path, {"train.py": CHECKPOINTER})
    launcher = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc", *TRAINENV, "train"],
        env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_GRACE_SECONDS="10"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(base / "output" / "checkpoints" / "ready")
    # What `docker stop` does: SIGTERM to the namespace's PID 1 (unshare itself ignores it).
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGTERM)
    launcher.communicate(timeout=30)
    assert launcher.returncode == 0
    assert (base / "output" / "checkpoints" / "ckpt").read_text().count("block") == 10


def test_requirements_are_installed_before_the_entry_point(tmp_path):
    from fixtures_wheels import build_wheel

    need_uv()
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "trainenv_e2e_dep", "1.0")
    target = tmp_path / "target-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    python = str(target / "bin" / "python")
    script = "import trainenv_e2e_dep, sys\nprint('dep ok', sys.executable)\n"
    base = make_tree(tmp_path / "job", {"train.py": script})
    (base / "usercode" / "requirements.txt").write_text(f"--no-index\n--find-links {wheels}\ntrainenv_e2e_dep==1.0\n")
    marker = tmp_path / "markers"
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_PYTHON=python, TRAINENV_INSTALLER="uv",
                     TMPDIR=str(marker), PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == f"dep ok {python}"
    again = run_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_PYTHON=python, TRAINENV_INSTALLER="uv",
                      TMPDIR=str(marker), PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    assert again.returncode == 0 and b"already installed in this container" in again.stderr


def test_failed_install_exits_69_before_the_entry_point(tmp_path):
    base = make_tree(tmp_path, {"train.py": "open('ran', 'w')\n"})
    (base / "usercode" / "requirements.txt").write_text("./no-such-package-1.0-py3-none-any.whl\n")
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", TMPDIR=str(tmp_path / "markers"), timeout=120)
    assert done.returncode == 69
    text = failure(base)
    assert text.startswith("InstallError: requirements install failed")
    assert "no-such-package" in text
    assert not (base / "usercode" / "ran").exists()


def test_a_failure_file_of_an_earlier_run_is_removed_when_a_run_starts(tmp_path):
    base = make_tree(tmp_path, {"train.py": "import sys\nsys.exit(4)\n"})
    assert run_train(base, TRAINENV_ENTRY_POINT="train.py").returncode == 4
    assert failure(base).startswith("UserError:")
    (base / "usercode" / "train.py").write_text("print('fine')\n")
    assert run_train(base, TRAINENV_ENTRY_POINT="train.py").returncode == 0
    assert not (base / "output" / "failure").exists()  # the stale report is gone after a success
    own = "import os\nopen(os.path.join(os.environ['TRAINENV_OUTPUT_DIR'], 'failure'), 'w').write('Mine: noted')\n"
    (base / "usercode" / "train.py").write_text(own)
    assert run_train(base, TRAINENV_ENTRY_POINT="train.py").returncode == 0
    assert failure(base) == "Mine: noted"  # written by the job during this run: kept


def test_a_failing_dry_run_and_env_write_nothing(tmp_path, tree_state):
    base = make_tree(tmp_path / "job", {"train.py": ""})
    (base / "output").mkdir()
    (base / "output" / "failure").write_text("Old: report\n")
    (base / "input" / "config" / "hyperparameters.json").write_text("{not json")
    before = tree_state(tmp_path)
    for command in (["train", "--dry-run"], ["env"]):
        done = run_trainenv(*command, env=job_environ(base, TRAINENV_ENTRY_POINT="train.py"), text=False, timeout=60)
        assert done.returncode == 78, (command, done.stderr)
        assert "ConfigError:" in done.stderr.decode() and "hyperparameters.json" in done.stderr.decode()
    assert tree_state(tmp_path) == before  # no failure file, no dirs, no run dir


def test_an_output_dir_that_cannot_be_created_is_a_config_error_naming_it(tmp_path):
    base = make_tree(tmp_path, {"train.py": "open('ran', 'w')\n"})
    (base / "output").mkdir()
    (base / "output" / "model").write_text("a file where the model dir should be")
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py")
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: cannot create ") and str(base / "output" / "model") in first
    assert not (base / "usercode" / "ran").exists()
    run_dir = tmp_path / "blocked-run"
    run_dir.write_text("a file where the run dir's parent should be")
    (base / "output" / "model").unlink()
    done = run_train(base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_RUN_DIR=str(run_dir))
    assert done.returncode == 78, done.stderr.decode()
    assert failure(base).startswith(f"ConfigError: cannot create {run_dir}")


def test_read_only_output_is_a_config_error_with_the_reason_on_stderr(tmp_path):
    base = make_tree(tmp_path, {"train.py": "open('ran', 'w')\n"})
    output = base / "output"
    output.mkdir()
    # A read-only bind mount: read-only even for root, as a platform's read-only volume is.
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(output), "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.decode().strip()}")
    done = run_trainenv(
        "train", prefix=["unshare", "--mount", "sh", "-c", script, "sh", str(output)],
        env=job_environ(base, TRAINENV_ENTRY_POINT="train.py"), text=False, timeout=60,
    )
    assert done.returncode == 78, done.stderr.decode()
    stderr = done.stderr.decode()
    assert f"ConfigError: cannot create {output / 'model'}: Read-only file system" in stderr
    assert "cannot write the failure file" in stderr and "Traceback" not in stderr
    assert not (base / "usercode" / "ran").exists() and not (output / "failure").exists()


def test_the_launcher_ends_without_the_interpreters_tear_down_and_loses_no_output(tmp_path):
    """``trainenv train`` flushes and leaves with ``os._exit``: an ``atexit`` hook (here from a
    ``sitecustomize`` every interpreter loads) runs in the job, not in the launcher."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os\n"
        f"atexit.register(lambda: open(os.path.join({str(hooks)!r}, f'exit-{{os.getpid()}}'), 'w').close())\n"
    )
    base = make_tree(tmp_path / "job", code={"train.py": "import sys\nprint('out ' * 20000)\nsys.exit(3)\n"})
    launcher = subprocess.Popen([*TRAINENV, "train"], env=job_environ(base, TRAINENV_ENTRY_POINT="train.py", PYTHONPATH=str(hooks)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 3, err
    assert out.decode().count("out ") == 20000
    assert err.decode().rstrip().splitlines()[-1].startswith("trainenv: UserError:")  # the last line, flushed
    exited = sorted(p.name for p in hooks.glob("exit-*"))
    assert len(exited) == 1 and exited != [f"exit-{launcher.pid}"]  # the job's hook ran, the launcher's did not


def test_a_log_reader_that_goes_away_does_not_change_the_outcome(tmp_path):
    """``trainenv train 2>&1 | head -1``: the job succeeds, so trainenv exits 0, with no traceback."""
    base = make_tree(tmp_path, {"train.py": "print('one'); print('two'); print('three')\n"})
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read trainenv's log
    try:
        done = subprocess.run([*TRAINENV, "train"], env=job_environ(base, TRAINENV_ENTRY_POINT="train.py"),
                              stdout=subprocess.DEVNULL, stderr=write_end, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 0
    assert not (base / "output" / "failure").exists()


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests run from a venv here only")
def test_a_command_finds_the_job_interpreter_of_a_venv_that_is_not_activated(tmp_path):
    """trainenv runs from a venv whose bin/ is not on PATH (a newcomer's `.venv/bin/trainenv`):
    `python` in a command is the job's interpreter, VIRTUAL_ENV names its venv; with the venv's
    bin/ already on PATH nothing is added."""
    show = "python -c 'import os, sys; print(sys.executable); print(os.environ.get(\"VIRTUAL_ENV\", \"-\")); print(os.environ[\"PATH\"])'"
    bin_dir = os.path.dirname(sys.executable)
    base = make_tree(tmp_path / "ml")
    plain_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if os.path.normpath(p) != bin_dir)
    done = run_train(base, text=True, TRAINENV_COMMAND=show, PATH=plain_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3:] == [sys.executable, sys.prefix, bin_dir + os.pathsep + plain_path]
    activated = bin_dir + os.pathsep + plain_path
    again = run_train(base, text=True, TRAINENV_COMMAND=show, PATH=activated)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-3:] == [sys.executable, os.environ.get("VIRTUAL_ENV", "-"), activated]
