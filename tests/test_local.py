"""``trainenv local``: the README demo, and its bad inputs (nothing real is ever deleted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
TRAINENV = str(Path(sys.executable).with_name("trainenv"))
QUICKSTART = ROOT / "examples" / "quickstart"


def local(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINENV_")}
    env["TRAINENV_RUN_DIR"] = str(tmp_path / "run")
    return subprocess.run([TRAINENV, "local", *args], cwd=tmp_path, env=env, capture_output=True, timeout=120)


def test_the_readme_demo_trains_a_model(tmp_path):
    done = local(
        tmp_path, "--source-dir", str(QUICKSTART), "--entry-point", "train.py",
        "--input", f"train={QUICKSTART / 'data'}", "--hp", "epochs=200", "--hp", "lr=0.1",
    )
    assert done.returncode == 0, done.stderr.decode()
    model = json.loads((tmp_path / "trainenv-job" / "output" / "model" / "model.json").read_text())
    assert abs(model["w"] - 3) < 0.1 and abs(model["b"] - 1) < 0.1  # the data is y = 3x + 1 + noise
    assert f"model dir:  {tmp_path / 'trainenv-job' / 'output' / 'model'}" in done.stderr.decode()
    hps = json.loads((tmp_path / "trainenv-job" / "input" / "config" / "hyperparameters.json").read_text())
    assert hps == {"epochs": "200", "lr": "0.1"}  # strings, as a platform writes them
    data = tmp_path / "trainenv-job" / "input" / "data" / "train"
    assert data.is_symlink() and data.resolve() == (QUICKSTART / "data").resolve()  # linked, not copied


def test_hps_file_file_input_and_rerun_refreshes_links(tmp_path):
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
    again = local(tmp_path, "--source-dir", str(source), "--entry-point", "show.py", "--input", f"one={single}")
    assert json.loads(again.stdout.decode().strip().splitlines()[-1])["channels"] == ["one"]
    assert source.is_dir() and single.is_file()  # only trainenv's links went away


def test_bad_inputs_are_config_errors_and_delete_nothing(tmp_path):
    job = tmp_path / "trainenv-job"
    (job / "usercode").mkdir(parents=True)
    (job / "usercode" / "precious.py").write_text("keep me")
    source = tmp_path / "src"
    source.mkdir()
    cases = [
        (["--source-dir", str(source), "--entry-point", "x.py"], "is not a symlink trainenv made"),
        (["--input", f"train={tmp_path / 'missing'}"], "does not exist"),
        (["--input", "../up=."], "invalid channel name"),
        (["--input", "novalue"], "expected CHANNEL=VALUE"),
        (["--hp", "bad name=1"], "invalid hyperparameter name"),
    ]
    for args, expected in cases:
        done = local(tmp_path, *args)
        assert done.returncode == 78, (args, done.stderr)
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, lines)
    assert (job / "usercode" / "precious.py").read_text() == "keep me"
