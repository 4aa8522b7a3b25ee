"""``trainenv local``: the README demo, a job dir per run, bad inputs (nothing real is ever deleted)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from support import REPO, TRAINENV, clean_environ, run_trainenv

QUICKSTART = REPO / "examples" / "quickstart"


def local(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_trainenv("local", *args, text=False, cwd=tmp_path)


def job_dirs(tmp_path: Path) -> list:
    parent = tmp_path / "trainenv-jobs"
    return sorted(parent.iterdir()) if parent.exists() else []


def test_the_readme_demo_trains_a_model(tmp_path):
    job = tmp_path / "demo"
    done = local(
        tmp_path, "--source-dir", str(QUICKSTART), "--entry-point", "train.py", "--job-dir", str(job),
        "--input", f"train={QUICKSTART / 'data'}", "--hp", "epochs=200", "--hp", "lr=0.1",
    )
    assert done.returncode == 0, done.stderr.decode()
    model = json.loads((job / "output" / "model" / "model.json").read_text())
    assert abs(model["w"] - 3) < 0.1 and abs(model["b"] - 1) < 0.1  # the data is y = 3x + 1 + noise
    assert f"job dir:    {job}" in done.stderr.decode()
    assert f"model dir:  {job / 'output' / 'model'}" in done.stderr.decode()
    hps = json.loads((job / "input" / "config" / "hyperparameters.json").read_text())
    assert hps == {"epochs": "200", "lr": "0.1"}  # strings, as a platform writes them
    data = job / "input" / "data" / "train"
    assert data.is_symlink() and data.resolve() == (QUICKSTART / "data").resolve()  # linked, not copied
    assert list((job / "run").glob("*/env.json"))  # trainenv's own files stay in the job dir


def test_hps_file_file_input_and_each_run_gets_a_fresh_job_dir(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "show.py").write_text(
        "import json, os, sys\nfrom trainenv import training_env\nenv = training_env()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'channels': list(env.channels),"
        " 'files': sorted(os.listdir(env.channel_dirs['one']))}))\n"
    )
    (tmp_path / "hps.json").write_text(json.dumps({"layers": [1, 2], "lr": 0.5}))
    single = tmp_path / "points.csv"
    single.write_text("x,y\n")
    done = local(tmp_path, "--source-dir", str(source), "--entry-point", "show.py", "--hps-file", str(tmp_path / "hps.json"),
                 "--hp", "lr=0.1", "--input", f"one={single}", "--input", f"two={source}")
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert seen == {"argv": ["--layers", "[1,2]", "--lr", "0.1"], "channels": ["one", "two"], "files": ["points.csv"]}
    [first] = job_dirs(tmp_path)
    assert f"job dir:    {first}" in done.stderr.decode()
    again = local(tmp_path, "--source-dir", str(source), "--entry-point", "show.py", "--input", f"one={single}")
    assert json.loads(again.stdout.decode().strip().splitlines()[-1])["channels"] == ["one"]
    assert len(job_dirs(tmp_path)) == 2  # a new job dir; the first one is left as it was
    assert sorted(p.name for p in (first / "input" / "data").iterdir()) == ["one", "two"]
    assert source.is_dir() and single.is_file()


def test_bad_inputs_are_config_errors_and_delete_nothing(tmp_path):
    used = tmp_path / "used"
    (used / "usercode").mkdir(parents=True)
    (used / "usercode" / "precious.py").write_text("keep me")
    cases = [
        (["--job-dir", str(used)], "is not empty"),
        (["--input", f"train={tmp_path / 'missing'}"], "does not exist"),
        (["--input", "../up=."], "invalid channel name"),
        (["--input", "novalue"], "expected CHANNEL=VALUE"),
        (["--hp", "bad name=1"], "invalid hyperparameter name"),
        (["--source-dir", str(tmp_path / "nowhere")], "is not a directory"),
    ]
    for args, expected in cases:
        done = local(tmp_path, *args)
        assert done.returncode == 78, (args, done.stderr)
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, lines)
    assert (used / "usercode" / "precious.py").read_text() == "keep me"
    assert not (tmp_path / "trainenv-jobs").exists()  # a bad input creates no job dir


SHOW_OWN = """
import json, os, sys, time
from trainenv import training_env
sync = os.environ["SYNC"]
me = sys.argv[sys.argv.index("--name") + 1]
open(os.path.join(sync, me + ".started"), "w").close()
while not os.path.exists(os.path.join(sync, "go")):  # both jobs are laid out and running
    time.sleep(0.01)
env = training_env()
print(json.dumps({"hps": dict(env.hyperparameters), "model_dir": env.model_dir, "env_file": os.environ["TRAINENV_ENV_FILE"],
                  "hps_file": json.load(open(os.path.join(env.config_dir, "hyperparameters.json")))}))
"""


def test_two_local_jobs_started_together_share_nothing(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "show.py").write_text(SHOW_OWN)
    sync = tmp_path / "sync"
    sync.mkdir()
    jobs = {}
    try:
        for name, lr in (("a", "0.1"), ("b", "0.2")):
            jobs[name] = subprocess.Popen(
                [*TRAINENV, "local", "--source-dir", str(source), "--entry-point", "show.py", "--hp", f"name={name}",
                 "--hp", f"lr={lr}"],
                cwd=tmp_path, env=clean_environ(SYNC=str(sync)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + 60
            while not (sync / f"{name}.started").exists():
                assert time.monotonic() < deadline and jobs[name].poll() is None, jobs[name].communicate()
                time.sleep(0.02)
        (sync / "go").touch()
        seen = {}
        for name, job in jobs.items():
            out, err = job.communicate(timeout=60)
            assert job.returncode == 0, err.decode()
            seen[name] = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.communicate()
    assert seen["a"]["hps"] == {"name": "a", "lr": 0.1} and seen["a"]["hps_file"] == {"name": "a", "lr": "0.1"}
    assert seen["b"]["hps"] == {"name": "b", "lr": 0.2} and seen["b"]["hps_file"] == {"name": "b", "lr": "0.2"}
    assert seen["a"]["model_dir"] != seen["b"]["model_dir"]
    assert seen["a"]["env_file"] != seen["b"]["env_file"]
    assert len(job_dirs(tmp_path)) == 2


def test_the_job_runs_in_a_copy_of_the_source_dir_which_is_never_written_to(tmp_path):
    source = tmp_path / "project"
    source.mkdir()
    (source / "train.py").write_text("import os\nopen('scratch.txt', 'w').write('mine')\nprint(sorted(os.listdir('.')))\n")
    (source / "link").symlink_to("train.py")
    before = sorted(p.name for p in source.iterdir())
    for _ in range(2):  # the source dir is the cwd: the jobs dir inside it is never copied
        done = run_trainenv("local", "--source-dir", ".", "--entry-point", "train.py", text=False, cwd=source)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().strip() == "['link', 'scratch.txt', 'train.py']"
    assert sorted(p.name for p in source.iterdir() if p.name != "trainenv-jobs") == before
    [first, second] = sorted((source / "trainenv-jobs").iterdir())
    assert (first / "usercode" / "scratch.txt").read_text() == "mine"
    assert (second / "usercode" / "link").is_symlink()


def test_local_takes_every_launch_setting_of_train(tmp_path):
    show = "import os\nprint(os.environ.get('SM_MODEL_DIR', 'no-sm'))\nimport time\ntime.sleep(float(os.environ['NAP']))\n"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "show.py").write_text(show)
    (tmp_path / "src" / "requirements.txt").write_text("no-such-package-xyz==1.0\n")
    args = ["--source-dir", str(tmp_path / "src"), "--entry-point", "show.py", "--compat", "sagemaker", "--no-install"]
    done = run_trainenv("local", *args, extra_env={"NAP": "0"}, text=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip().endswith("/output/model")  # sagemaker's names; requirements not installed
    limited = run_trainenv("local", *args, "--max-run-seconds", "1", "--grace-seconds", "1", extra_env={"NAP": "60"},
                           text=False, cwd=tmp_path)
    assert limited.returncode == 124, limited.stderr.decode()
