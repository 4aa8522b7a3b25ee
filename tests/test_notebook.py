"""Notebook entry points (``*.ipynb``): a real ``trainenv train`` (and ``trainenv local``) runs a
real notebook through nbclient and an ipykernel kernel, on a temp job tree each time."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import REPO, alive, failure, make_tree, run_train, run_trainenv, start_train

nbformat = pytest.importorskip("nbformat", reason="the notebook extra is not installed (pip install -e '.[notebook]')")
pytest.importorskip("nbclient", reason="the notebook extra is not installed (pip install -e '.[notebook]')")
pytest.importorskip("ipykernel", reason="the notebook extra is not installed (pip install -e '.[notebook]')")

SHOW = "import json\nprint(json.dumps({'lr': lr, 'epochs': epochs, 'name': name, 'types': [type(lr).__name__, type(epochs).__name__]}))"


def notebook(*cells: tuple) -> str:
    """A notebook's JSON: each cell ``source`` (code), ``(source, tags)`` or ``("md", text)``."""
    v4 = nbformat.v4
    nb = v4.new_notebook()
    for cell in cells:
        if isinstance(cell, str):
            nb.cells.append(v4.new_code_cell(cell))
        elif cell[0] == "md":
            nb.cells.append(v4.new_markdown_cell(cell[1]))
        else:
            nb.cells.append(v4.new_code_cell(cell[0], metadata={"tags": list(cell[1])}))
    return nbformat.writes(nb)


def executed(base: Path, name: str = "train.ipynb"):
    return nbformat.read(str(base / "output" / name), as_version=4)


def stdout_lines(done) -> list:
    return done.stdout.decode().splitlines()


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 60) -> str:
    """The stdout read so far once ``pattern`` matches it (the process still running or not)."""
    text, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            text += chunk
            if re.search(pattern, text.decode(errors="replace")):
                return text.decode()
            if not chunk:
                break
    raise AssertionError(f"no {pattern!r} in the job's stdout: {text!r} (exit {proc.poll()}; stderr: {proc.stderr.read() if proc.poll() is not None else ''})")


def stop(proc: subprocess.Popen, *pids: int) -> None:
    """Leave nothing running: the job (and any kernel pid given) killed if still alive."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- hyperparameters, copies, kernel ---------------------------------------------------------------


def test_hyperparameters_are_injected_after_the_parameters_cell_and_numbers_stay_numbers(tmp_path):
    code = {"train.ipynb": notebook(("md", "# title"), ("lr = 0.5\nepochs = 1\nname = 'default'", ["parameters"]), SHOW)}
    base = make_tree(tmp_path, code, {"lr": "0.1", "epochs": "3", "name": "x y"})
    before = (base / "usercode" / "train.ipynb").read_bytes()
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(stdout_lines(done)[-1]) == {"lr": 0.1, "epochs": 3, "name": "x y", "types": ["float", "int"]}
    cells = executed(base).cells
    assert [c.metadata.get("tags") for c in cells] == [None, ["parameters"], ["injected-parameters"], None]
    assert "epochs = 3" in cells[2].source and "name = 'x y'" in cells[2].source
    assert (base / "usercode" / "train.ipynb").read_bytes() == before  # the input is never written
    assert not (base / "output" / "failure").exists()


def test_without_a_parameters_cell_they_go_on_top(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": notebook(SHOW)}, {"lr": 2, "epochs": "7", "name": "[1, 2]"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(stdout_lines(done)[-1]) == {"lr": 2, "epochs": 7, "name": [1, 2], "types": ["int", "int"]}
    assert executed(base).cells[0].metadata["tags"] == ["injected-parameters"]


def test_a_hyperparameter_that_is_not_a_python_name_is_a_config_error(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": notebook("open('ran', 'w').write('yes')")}, {"learning-rate": "0.1"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: ") and "hyperparameters.json: learning-rate: not a Python name" in first, first
    assert not (base / "usercode" / "ran").exists()


def test_the_kernel_runs_in_the_notebooks_dir_with_the_job_interpreter_and_the_code_dir_importable(tmp_path):
    """A ``python3`` kernelspec elsewhere on JUPYTER_PATH must not be used: the job's interpreter runs the kernel."""
    cell = "import os, sys, helper\nprint(os.getcwd())\nprint(sys.executable)\nprint(helper.X)"
    base = make_tree(tmp_path, {"notebooks/train.ipynb": notebook(cell), "helper.py": "X = 'from the code dir'\n"})
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": ["/bin/false", "{connection_file}"], "display_name": "other", "language": "python"}))
    done = run_train(base, TRAINENV_ENTRY_POINT="notebooks/train.ipynb", JUPYTER_PATH=str(tmp_path / "jupyter"))
    assert done.returncode == 0, done.stderr.decode()
    assert stdout_lines(done)[-3:] == [str(base / "usercode" / "notebooks"), sys.executable, "from the code dir"]
    assert (base / "output" / "train.ipynb").is_file()


def test_a_notebook_in_the_output_dir_is_not_overwritten(tmp_path):
    base = make_tree(tmp_path, {}, files={"output/train.ipynb": notebook("print('ran')")})
    before = (base / "output" / "train.ipynb").read_bytes()
    done = run_train(base, TRAINENV_ENTRY_POINT=str(base / "output" / "train.ipynb"))
    assert done.returncode == 0, done.stderr.decode()
    assert (base / "output" / "train.ipynb").read_bytes() == before
    assert executed(base, "train.executed.ipynb").cells[0].outputs[0]["text"] == "ran\n"
    assert f"the executed notebook goes to {base / 'output' / 'train.executed.ipynb'}" in done.stderr.decode()


def test_secret_hyperparameters_are_not_written_into_the_copy(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": notebook("print(len(api_key))")}, {"api_key": "abcdefgh-secret-value"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    assert done.returncode == 0, done.stderr.decode()
    assert stdout_lines(done)[-1] == "21"  # the kernel got the value
    assert b"abcdefgh-secret-value" not in (base / "output" / "train.ipynb").read_bytes()


# -- exclude tags -----------------------------------------------------------------------------------

TAGGED = notebook(("print('kept')", []), ("print('SKIPPED one')", ["skip"]), ("print('SKIPPED two')", ["slow", "x"]))


def test_cells_with_an_excluded_tag_are_skipped(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": TAGGED})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb", TRAINENV_NOTEBOOK_EXCLUDE_TAGS='["skip", "slow"]')
    assert done.returncode == 0, done.stderr.decode()
    assert stdout_lines(done) == ["kept"]
    assert [len(c.outputs) for c in executed(base).cells] == [1, 0, 0]


def test_exclude_tags_from_trainenv_yaml(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": TAGGED}, settings="entry_point: train.ipynb\nnotebook_exclude_tags: [skip]\n")
    done = run_train(base)
    assert done.returncode == 0, done.stderr.decode()
    assert stdout_lines(done) == ["kept", "SKIPPED two"]


@pytest.mark.parametrize("value", ["skip", '{"a": 1}', '["a", 1]'])
def test_a_bad_exclude_tags_value_is_a_config_error(tmp_path, value):
    base = make_tree(tmp_path, {"train.ipynb": notebook("open('ran', 'w').write('yes')")})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb", TRAINENV_NOTEBOOK_EXCLUDE_TAGS=value)
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith(f"ConfigError: TRAINENV_NOTEBOOK_EXCLUDE_TAGS: {value!r}: expected a JSON list of strings"), first
    assert not (base / "usercode" / "ran").exists()


# -- failures ---------------------------------------------------------------------------------------


def test_a_failing_cell_fails_the_job_with_its_number_source_and_traceback(tmp_path):
    cells = (("md", "# notes"), "x = 1", "def f():\n    return 1 / 0\ny = 2\nf()\n# more\n# and more\n# the seventh line", "print('never')")
    base = make_tree(tmp_path, {"train.ipynb": notebook(*cells)}, {"lr": "0.1"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    assert done.returncode == 1, done.stderr.decode()
    text = failure(base)
    lines = text.splitlines()
    assert lines[0] == "UserError: notebook train.ipynb exited with status 1: ZeroDivisionError: division by zero", lines[0]
    assert f"Notebook {base / 'usercode' / 'train.ipynb'}, cell 3 (In [3]) failed" in text  # the injected cell is not counted
    assert "    def f():\n        return 1 / 0\n    y = 2\n    f()\n    # more\n    ... (2 more lines)" in text
    assert "----> 4 f()" in text and "----> 2     return 1 / 0" in text and lines[-1] == "ZeroDivisionError: division by zero"
    assert "\x1b[" not in text
    nb = executed(base)  # written on failure too, the later cell not run
    assert nb.cells[3].outputs[0]["output_type"] == "error" and nb.cells[4].outputs == []
    assert b"never" not in done.stdout


@pytest.mark.parametrize(
    "cell, status, first",
    [
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", 137, "Signal: notebook train.ipynb was killed by SIGKILL"),
        ("import os\nos._exit(3)", 3, "UserError: notebook train.ipynb exited with status 3"),
    ],
)
def test_a_kernel_that_dies_ends_the_job_with_its_status(tmp_path, cell, status, first):
    base = make_tree(tmp_path, {"train.ipynb": notebook("print('before')", cell, "print('never')")})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    assert done.returncode == status, done.stderr.decode()
    assert failure(base).startswith(first), failure(base)
    assert "the notebook's kernel" in done.stderr.decode() and "while cell 2 ran" in done.stderr.decode()
    cells = executed(base).cells
    assert cells[0].outputs[0]["text"] == "before\n" and cells[2].outputs == []


def test_a_notebook_that_is_not_one_is_a_config_error(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": "{not json"})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith(f"ConfigError: {base / 'usercode' / 'train.ipynb'}: not a Jupyter notebook"), first


def test_a_missing_notebook_is_a_config_error(tmp_path):
    base = make_tree(tmp_path, {})
    done = run_train(base, TRAINENV_ENTRY_POINT="nope.ipynb")
    assert done.returncode == 78
    assert failure(base).startswith("ConfigError: TRAINENV_ENTRY_POINT: 'nope.ipynb': ") and "does not exist" in failure(base)


def test_arguments_after_dashdash_are_refused_for_a_notebook(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": notebook("open('ran', 'w').write('yes')")})
    done = run_train(base, "--entry-point", "train.ipynb", "--", "--lr", "1")
    assert done.returncode == 78, done.stderr.decode()
    assert failure(base).startswith("ConfigError: option --entry-point: arguments after -- ('--lr 1') cannot reach a notebook")
    assert not (base / "usercode" / "ran").exists()


def test_without_nbclient_the_job_exits_78_naming_the_extra(tmp_path):
    """An interpreter that has trainenv but not the notebook extra: nothing of the notebook runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site] = list(venv.glob("lib/python*/site-packages"))
    (site / "trainenv_src.pth").write_text(str(REPO / "src") + "\n")
    base = make_tree(tmp_path / "job", {"train.ipynb": notebook("open('ran', 'w').write('yes')")})
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb", TRAINENV_PYTHON=str(venv / "bin" / "python"))
    assert done.returncode == 78, done.stderr.decode()
    first = failure(base).splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_ENTRY_POINT: a notebook runs with jupyter's nbclient and ipykernel"), first
    assert "cannot import nbclient" in first and "pip install 'trainenv[notebook]'" in first
    assert not (base / "usercode" / "ran").exists() and not (base / "output" / "train.ipynb").exists()
    # The runtime itself, started without the runner's check, refuses the same way (a ConfigError line, 78).
    nb, out = str(base / "usercode" / "train.ipynb"), str(base / "output" / "train.ipynb")
    direct = subprocess.run([str(venv / "bin" / "python"), "-m", "trainenv.runtimes.notebook", nb, "--output", out],
                            capture_output=True, text=True, timeout=60)
    assert direct.returncode == 78, direct.stderr
    assert direct.stderr.strip().splitlines()[-1].startswith("trainenv: ConfigError: ") and "trainenv[notebook]" in direct.stderr


# -- while it runs: streamed output, signals --------------------------------------------------------

WAIT_FOR_GO = (
    "import os, time\nprint('KERNEL', os.getpid(), flush=True)\n"
    "for _ in range(1200):\n    if os.path.exists('go'):\n        break\n    time.sleep(0.05)\nprint('after go')"
)


def test_cell_output_reaches_the_log_while_the_cell_runs(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": notebook(WAIT_FOR_GO)})
    proc = start_train(base, TRAINENV_ENTRY_POINT="train.ipynb")
    kernel = 0
    try:
        seen = read_until(proc, r"KERNEL (\d+)\n")
        kernel = int(re.search(r"KERNEL (\d+)", seen).group(1))
        assert proc.poll() is None and "after go" not in seen  # the cell is still running
        (base / "usercode" / "go").write_text("")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert "after go" in out.decode()
    finally:
        stop(proc, kernel)


@pytest.mark.parametrize("target, number", [("trainenv", signal.SIGTERM), ("runtime", signal.SIGINT), ("runtime", signal.SIGTERM)])
def test_a_signal_stops_the_kernel_and_the_copy_is_written(tmp_path, target, number):
    base = make_tree(tmp_path, {"train.ipynb": notebook(WAIT_FOR_GO, "print('never')")})
    proc = start_train(base, TRAINENV_ENTRY_POINT="train.ipynb", TRAINENV_GRACE_SECONDS="20")
    kernel = 0
    try:
        kernel = int(re.search(r"KERNEL (\d+)", read_until(proc, r"KERNEL (\d+)\n")).group(1))
        with open(f"/proc/{kernel}/stat") as handle:
            runtime = int(handle.read().rsplit(")", 1)[1].split()[1])  # the kernel's parent
        os.kill(proc.pid if target == "trainenv" else runtime, number)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + number, err.decode()
        assert not alive(kernel) and not alive(runtime)
        assert failure(base).startswith(f"Signal: notebook train.ipynb was killed by {signal.Signals(number).name}")
        cells = executed(base).cells
        assert cells[0].outputs[0]["text"].startswith("KERNEL") and cells[1].outputs == []
    finally:
        stop(proc, kernel)


# -- trainenv local, dry run, the example -----------------------------------------------------------


def test_dry_run_shows_the_notebook_runtime(tmp_path):
    base = make_tree(tmp_path, {"train.ipynb": notebook("print(1)")}, {"lr": "0.1"})
    done = run_train(base, "--dry-run", TRAINENV_ENTRY_POINT="train.ipynb", TRAINENV_NOTEBOOK_EXCLUDE_TAGS='["a"]')
    assert done.returncode == 0, done.stderr.decode()
    [line] = [line for line in stdout_lines(done) if line.startswith("argv ")]
    assert json.loads(line[len("argv "):])[1:] == [
        "-m", "trainenv.runtimes.notebook", str(base / "usercode" / "train.ipynb"),
        "--output", str(base / "output" / "train.ipynb"), "--exclude-tags", '["a"]', "--grace-seconds", "30",
    ]
    assert not (base / "output").exists()


def test_trainenv_local_runs_the_example_notebook(tmp_path):
    job = tmp_path / "job"
    done = run_trainenv(
        "local", "--source-dir", str(REPO / "examples" / "notebook"), "--job-dir", str(job), "--hp", "epochs=300", "--hp", "lr=0.05",
        text=False, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "epochs=300 (int), lr=0.05 (float)" in done.stdout.decode()
    model = json.loads((job / "output" / "model" / "model.json").read_text())
    assert abs(model["w"] - 3) < 0.1 and abs(model["b"] - 1) < 0.1
    cells = executed(job).cells
    assert [c.metadata.get("tags") for c in cells][1:4] == [["parameters"], ["injected-parameters"], None]
    assert cells[4].metadata["tags"] == ["interactive"] and cells[4].outputs == []  # skipped: trainenv.yaml excludes it
    nbformat.validate(executed(job))  # raises when the copy is not a valid notebook


def test_trainenv_local_takes_a_notebook_entry_point(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "nb.ipynb").write_text(notebook(("lr = 1.0", ["parameters"]), "print('lr is', lr)"))
    done = run_trainenv("local", "--source-dir", "src", "--entry-point", "nb.ipynb", "--hp", "lr=0.25", text=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert stdout_lines(done)[-1] == "lr is 0.25"


def test_under_torchrun_each_rank_writes_its_own_copy(tmp_path):
    """2 processes on one node (a real torchrun): rank 0's copy is ``train.ipynb``, rank 1's
    ``train.rank1.ipynb``, each with its own output, neither written over the other."""
    from support import free_port, need_torch

    need_torch()
    code = {"train.ipynb": notebook("import os\nprint('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])")}
    base = make_tree(tmp_path, code)
    done = run_train(base, TRAINENV_ENTRY_POINT="train.ipynb", TRAINENV_DISTRIBUTION="torchrun",
                     TRAINENV_NPROC_PER_NODE="2", TRAINENV_MASTER_PORT=str(free_port()), timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    for name, rank in (("train.ipynb", 0), ("train.rank1.ipynb", 1)):
        outputs = executed(base, name).cells[-1].outputs
        assert "".join(out.get("text", "") for out in outputs) == f"rank {rank} of 2\n", name
    assert sorted(p.name for p in (base / "output").glob("train*.ipynb")) == ["train.ipynb", "train.rank1.ipynb"]
