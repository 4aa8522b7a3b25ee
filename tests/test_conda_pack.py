"""TRAINENV_CONDA_PACK: a conda-pack archive unpacked once per node, its interpreter running the
requirements install and the job, through a real ``trainenv train`` (and ``trainenv local``).

No conda here, so each test builds a pack-shaped archive: a relocatable environment (a venv made
with ``--copies``, so ``bin/python`` is a real interpreter whose ``sys.prefix`` is wherever the
prefix lands; pip reached through a ``.pth`` file), a file and a script holding conda-pack's placeholder prefix, and a real
``bin/conda-unpack`` that, as conda-pack's does, rewrites the placeholder to its own prefix (the
dir it runs in) and logs each run to ``$CONDA_UNPACK_LOG``.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fixtures_wheels import build_wheel
from support import TRAINENV, job_environ, make_tree, run_train, run_trainenv, tree_state_of

PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"  # conda-pack's placeholder prefix

CONDA_UNPACK = """#!/usr/bin/env python
import os, sys, time
PLACEHOLDER = "/opt/anaconda1anaconda2" "anaconda3"
prefix = os.path.abspath(os.path.dirname(os.path.dirname(__file__)))
time.sleep(float(os.environ.get("CONDA_UNPACK_SLEEP", "0")))
for relative in ("etc/where.txt", "bin/hello"):
    path = os.path.join(prefix, relative)
    with open(path) as handle:
        text = handle.read()
    with open(path, "w") as handle:
        handle.write(text.replace(PLACEHOLDER, prefix))
with open(os.environ["CONDA_UNPACK_LOG"], "a") as log:
    log.write(f"{sys.prefix} {prefix}\\n")
"""

FAILING_UNPACK = """#!/bin/sh
echo "reading https://packer:hunter2secret@conda.example.com/env" >&2
echo "conda-unpack: cannot rewrite lib/libfoo.so: Permission denied" >&2
exit 1
"""

# Where the job ran, and proof that the rewritten prefix still holds where the pack stays.
TRAIN = """import os, subprocess, sys
print("prefix", os.path.realpath(sys.prefix))
print("conda_prefix", os.environ["CONDA_PREFIX"])
print("path0", os.environ["PATH"].split(os.pathsep)[0])
print("hello", subprocess.run(["hello"], capture_output=True, text=True, check=True).stdout.strip())
print("where", open(os.path.join(os.environ["CONDA_PREFIX"], "etc", "where.txt")).read().strip())
try:
    import tinypkg_conda
    print("tinypkg", tinypkg_conda.__file__)
except ImportError:
    pass
"""


def _environment(tmp_path: Path) -> Path:
    """A relocatable prefix: a venv (``--copies``) with the placeholder files and conda-unpack."""
    prefix = tmp_path / "packed" / "env"
    subprocess.run([sys.executable, "-m", "venv", "--copies", "--without-pip", str(prefix)], check=True)
    (prefix / "etc").mkdir()
    (prefix / "etc" / "where.txt").write_text(PLACEHOLDER + "\n")
    hello = prefix / "bin" / "hello"
    hello.write_text(f'#!/bin/sh\nexec "{PLACEHOLDER}/bin/python" -c "import sys; print(sys.prefix)"\n')
    hello.chmod(0o755)
    # A distribution only the pack has: the test's wheel needs it, so its install can only
    # succeed under the pack's interpreter (never into trainenv's own environment by mistake).
    [site] = prefix.glob("lib/python3.*/site-packages")
    import pip  # the pack installs with the tests' own pip (a path, not a copy; the base may have none)

    (site / "tests_pip.pth").write_text(str(Path(pip.__file__).parents[1]) + "\n")
    anchor = site / "condapack_anchor-1.0.dist-info"
    anchor.mkdir()
    (anchor / "METADATA").write_text("Metadata-Version: 2.1\nName: condapack_anchor\nVersion: 1.0\n")
    (anchor / "RECORD").write_text("")
    return prefix


def make_pack(tmp_path: Path, name: str = "pack.tar.gz", unpack: str | None = CONDA_UNPACK, python: bool = True,
              extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    """A conda-pack-shaped ``.tar.gz``: the prefix's contents at the top, as conda-pack writes them."""
    prefix = _environment(tmp_path)
    if unpack is not None:
        script = prefix / "bin" / "conda-unpack"
        script.write_text(unpack)
        script.chmod(0o755)
    if not python:
        for entry in (prefix / "bin").glob("python*"):
            entry.unlink()
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(prefix.iterdir()):
            tar.add(entry, arcname=entry.name)
        for member in extra:
            tar.addfile(member, io.BytesIO(b"pwned") if member.size else None)
    return archive


def _job(tmp_path: Path, name: str = "job", **code: str) -> Path:
    return make_tree(tmp_path / name, code={"train.py": TRAIN, **code})


def _train(base: Path, pack: Path, log: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    extra.setdefault("TRAINENV_ENTRY_POINT", "train.py")
    return run_train(base, *args, text=True, TRAINENV_CONDA_PACK=str(pack), CONDA_UNPACK_LOG=str(log), **extra)


def _seen(stdout: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)


def _conda_dir(base: Path) -> Path:
    return base / "run" / "conda"  # job_environ's TRAINENV_RUN_DIR is base/run


def _published(base: Path) -> list[Path]:
    root = _conda_dir(base)
    return sorted(p for p in root.iterdir() if p.is_symlink()) if root.exists() else []


def _unpack_runs(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# -- the pack's interpreter runs the install and the job ------------------------------------------


def test_the_job_and_its_requirements_run_under_the_packs_python(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "tinypkg_conda", "1.0", requires=("condapack_anchor",))
    base = _job(tmp_path, **{"requirements.txt": "tinypkg_conda==1.0\n"})
    pack, log = make_pack(tmp_path), tmp_path / "unpack.log"
    done = _train(base, pack, log, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), TRAINENV_INSTALLER="pip")
    assert done.returncode == 0, done.stderr
    [link] = _published(base)
    prefix = os.path.realpath(link)
    seen = _seen(done.stdout)
    assert seen["prefix"] == prefix  # the job ran the pack's bin/python
    assert seen["conda_prefix"] == str(link) and seen["path0"] == str(link / "bin")  # as `conda activate` would
    assert seen["hello"] == seen["where"] == prefix  # conda-unpack rewrote the prefix to where the pack stays
    # requirements.txt was installed by the pack's interpreter, into the pack
    assert seen["tinypkg"].startswith(str(link / "lib")) or os.path.realpath(seen["tinypkg"]).startswith(prefix)
    import importlib.util

    assert importlib.util.find_spec("tinypkg_conda") is None  # not into trainenv's own environment
    [run] = _unpack_runs(log)
    assert run == f"{prefix} {prefix}"  # conda-unpack ran once, with the pack's python, in its final home
    assert f"unpacking conda pack {pack}" in done.stderr


def test_a_second_run_with_the_same_pack_skips_the_unpack(tmp_path: Path) -> None:
    base, pack, log = _job(tmp_path), make_pack(tmp_path), tmp_path / "unpack.log"
    first = _train(base, pack, log)
    assert first.returncode == 0, first.stderr
    second = _train(base, pack, log)
    assert second.returncode == 0, second.stderr
    assert len(_unpack_runs(log)) == 1  # conda-unpack's run counter stays at 1
    assert "already unpacked" in second.stderr
    assert _seen(second.stdout)["prefix"] == _seen(first.stdout)["prefix"]
    assert len(list(_conda_dir(base).iterdir())) == 2  # the link and the one environment it names


def test_a_pack_whose_environment_is_gone_is_unpacked_again_and_a_crashed_copy_is_never_trusted(tmp_path: Path) -> None:
    base, pack, log = _job(tmp_path), make_pack(tmp_path), tmp_path / "unpack.log"
    assert _train(base, pack, log).returncode == 0
    [link] = _published(base)
    crashed = Path(os.path.realpath(link)).parent
    (crashed / "env" / "bin" / "python").unlink()  # as a crash or a cleaner would leave it
    done = _train(base, pack, log)
    assert done.returncode == 0, done.stderr
    assert len(_unpack_runs(log)) == 2
    assert Path(os.path.realpath(link)).parent != crashed  # a fresh copy, not the half one


def test_two_jobs_racing_on_one_node_share_one_prefix(tmp_path: Path) -> None:
    pack, log = make_pack(tmp_path), tmp_path / "unpack.log"
    run_dir = tmp_path / "node-run"
    started = []
    for name in ("a", "b"):
        base = _job(tmp_path, name)
        env = job_environ(
            base, TRAINENV_RUN_DIR=str(run_dir), TRAINENV_ENTRY_POINT="train.py", TRAINENV_CONDA_PACK=str(pack),
            CONDA_UNPACK_LOG=str(log), CONDA_UNPACK_SLEEP="1",
        )
        started.append(subprocess.Popen([*TRAINENV, "train"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=120) for process in started]
    for process, (stdout, stderr) in zip(started, outputs):
        assert process.returncode == 0, stderr
    entries = sorted((run_dir / "conda").iterdir())
    links = [entry for entry in entries if entry.is_symlink()]
    assert len(links) == 1 and len(entries) == 2  # one prefix; the loser discarded its copy
    prefix = os.path.realpath(links[0])
    assert [_seen(stdout)["prefix"] for stdout, _ in outputs] == [prefix, prefix]
    assert _seen(outputs[0][0])["hello"] == prefix  # the winner's conda-unpack rewrote its own home


def test_an_entry_function_runs_in_the_pack_and_needs_trainenv_there(tmp_path: Path) -> None:
    code = {"job.py": "import sys\ndef main(lr):\n    print('function', sys.prefix, lr)\n"}
    base, pack, log = _job(tmp_path, **code), make_pack(tmp_path), tmp_path / "unpack.log"
    without = _train(base, pack, log, TRAINENV_ENTRY_POINT="job.py:main")
    assert without.returncode == 78, without.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("ConfigError: TRAINENV_CONDA_PACK: ") and "cannot import trainenv" in first
    (base / "input" / "config" / "hyperparameters.json").write_text('{"lr": "0.5"}')
    src = str(Path(__import__("trainenv").__file__).parents[1])  # trainenv made importable by the pack's python
    done = _train(base, pack, log, TRAINENV_ENTRY_POINT="job.py:main", PYTHONPATH=src)
    assert done.returncode == 0, done.stderr
    [link] = _published(base)
    assert f"function {link} 0.5" in done.stdout


# -- bad packs: 69, nothing published --------------------------------------------------------------


def _link_out() -> tarfile.TarInfo:
    member = tarfile.TarInfo("lib/escape")
    member.type, member.linkname = tarfile.SYMTYPE, "/etc"
    return member


def _traversal() -> tarfile.TarInfo:
    member = tarfile.TarInfo("../../outside.txt")
    member.size = 5
    return member


@pytest.mark.parametrize("member", [_traversal, _link_out], ids=["traversal", "link_out"])
def test_a_hostile_pack_is_refused_whole(tmp_path: Path, member) -> None:
    base, log = _job(tmp_path), tmp_path / "unpack.log"
    pack = make_pack(tmp_path, extra=(member(),))
    done = _train(base, pack, log)
    assert done.returncode == 69, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith(f"SourceError: TRAINENV_CONDA_PACK: {pack}: member ") and "outside the prefix" in first
    assert not (tmp_path / "outside.txt").exists() and not (base / "outside.txt").exists()
    assert list(_conda_dir(base).iterdir()) == []  # nothing published, no copy left
    assert _unpack_runs(log) == []


def test_an_archive_refused_halfway_leaves_no_dir_behind(tmp_path: Path) -> None:
    """Members are checked as the archive streams by: one refused late removes what came before."""
    from trainenv.errors import SourceError
    from trainenv.sources.archive import extract_archive

    pack = make_pack(tmp_path, extra=(_traversal(),))  # the whole environment first, the bad member last
    dest = tmp_path / "dest"
    with pytest.raises(SourceError, match="would land outside the prefix; nothing was extracted"):
        extract_archive(str(pack), str(dest), 10**9, setting="TRAINENV_CONDA_PACK", into="the prefix")
    assert not dest.exists() and not (tmp_path / "outside.txt").exists()


def test_a_pack_without_bin_python_is_a_source_error(tmp_path: Path) -> None:
    base, log = _job(tmp_path), tmp_path / "unpack.log"
    pack = make_pack(tmp_path, python=False)
    done = _train(base, pack, log)
    assert done.returncode == 69, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first == f"SourceError: TRAINENV_CONDA_PACK: {pack} has no bin/python: not a conda-pack archive of an environment with Python"
    assert list(_conda_dir(base).iterdir()) == []


def test_a_failing_conda_unpack_is_a_source_error_with_its_last_lines_redacted(tmp_path: Path) -> None:
    base, log = _job(tmp_path), tmp_path / "unpack.log"
    pack = make_pack(tmp_path, unpack=FAILING_UNPACK)
    done = _train(base, pack, log)
    assert done.returncode == 69, done.stderr
    text = (base / "output" / "failure").read_text()
    first = text.splitlines()[0]
    assert first.startswith(f"SourceError: TRAINENV_CONDA_PACK: {pack}: bin/conda-unpack exited with status 1: ")
    assert "cannot rewrite lib/libfoo.so: Permission denied" in first
    assert "hunter2secret" not in text + done.stderr and "https://***@conda.example.com" in first
    assert list(_conda_dir(base).iterdir()) == []  # nothing a later run would trust


def test_sigterm_during_the_unpack_stops_it_and_publishes_nothing(tmp_path: Path) -> None:
    base, pack, log = _job(tmp_path), make_pack(tmp_path), tmp_path / "unpack.log"
    env = job_environ(
        base, TRAINENV_ENTRY_POINT="train.py", TRAINENV_CONDA_PACK=str(pack), CONDA_UNPACK_LOG=str(log), CONDA_UNPACK_SLEEP="60"
    )
    process = subprocess.Popen([*TRAINENV, "train"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(_conda_dir(base).glob("*/env/bin/conda-unpack")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # conda-unpack is sleeping by now
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert (base / "output" / "failure").read_text().startswith("Signal: ")
    assert list(_conda_dir(base).iterdir()) == []  # the copy removed, no link
    assert _unpack_runs(log) == []


# -- settings: 78, naming the source ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("oci://bucket@ns/envs/pack.tar.gz", "TRAINENV_CONDA_PACK: 'oci://***@ns/envs/pack.tar.gz': the platform fetches oci:// packs, not trainenv"),
        ("s3://bucket/pack.tar.gz", "the platform fetches s3:// packs"),
        ("pack.zip", "TRAINENV_CONDA_PACK: 'pack.zip': expected a conda-pack archive: a local .tar.gz or .tgz file"),
        ("/nowhere/pack.tar.gz", "TRAINENV_CONDA_PACK: '/nowhere/pack.tar.gz': /nowhere/pack.tar.gz does not exist"),
    ],
)
def test_a_bad_pack_value_is_a_config_error_naming_it(tmp_path: Path, value: str, fragment: str) -> None:
    base = _job(tmp_path)
    done = run_train(base, text=True, TRAINENV_ENTRY_POINT="train.py", TRAINENV_CONDA_PACK=value)
    assert done.returncode == 78, done.stderr
    first = (base / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("ConfigError: ") and fragment in first, first
    assert not (base / "run" / "conda").exists()


def test_a_pack_and_an_interpreter_together_are_a_config_error(tmp_path: Path) -> None:
    base, pack = _job(tmp_path), make_pack(tmp_path)
    done = run_train(base, "--python", sys.executable, text=True, TRAINENV_ENTRY_POINT="train.py", TRAINENV_CONDA_PACK=str(pack))
    assert done.returncode == 78, done.stderr
    assert "both an interpreter (option --python) and a conda pack (TRAINENV_CONDA_PACK) are set" in (base / "output" / "failure").read_text()


# -- read-only views and trainenv local -------------------------------------------------------------


def test_dry_run_and_env_show_the_packs_interpreter_and_unpack_nothing(tmp_path: Path) -> None:
    base, pack = _job(tmp_path), make_pack(tmp_path)
    before = tree_state_of(tmp_path)
    dry = run_train(base, "--dry-run", text=True, TRAINENV_ENTRY_POINT="train.py", TRAINENV_CONDA_PACK=str(pack))
    assert dry.returncode == 0, dry.stderr
    shown = run_trainenv("env", extra_env={"TRAINENV_BASE_DIR": str(base), "TRAINENV_RUN_DIR": str(base / "run"),
                                           "TRAINENV_ENTRY_POINT": "train.py", "TRAINENV_CONDA_PACK": str(pack)})
    assert shown.returncode == 0, shown.stderr
    assert tree_state_of(tmp_path) == before  # nothing unpacked, nothing written
    import hashlib
    import json

    prefix = base / "run" / "conda" / hashlib.sha256(pack.read_bytes()).hexdigest()[:16]
    python = str(prefix / "bin" / "python")
    assert f'argv          ["{python}", "{base / "usercode" / "train.py"}"]' in dry.stdout
    assert f"conda pack    {pack} -> {prefix} (unpacked at launch; {python} runs the install and the job)" in dry.stdout
    assert f"  CONDA_PREFIX={prefix}\n" in dry.stdout and f"  PATH={prefix / 'bin'}{os.pathsep}" in dry.stdout
    launch = json.loads(shown.stdout)["launch"]
    assert launch["python"] == python and launch["conda_pack"] == {"archive": str(pack), "prefix": str(prefix)}
    assert launch["settings"]["conda_pack"] == {"value": str(pack), "source": "TRAINENV_CONDA_PACK"}


def test_trainenv_local_runs_the_job_with_the_pack(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text(TRAIN)
    pack, log = make_pack(tmp_path), tmp_path / "unpack.log"
    job = tmp_path / "local-job"
    done = run_trainenv(
        "local", "--source-dir", str(source), "--entry-point", "train.py", "--job-dir", str(job), "--conda-pack", str(pack),
        extra_env={"CONDA_UNPACK_LOG": str(log)}, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    [link] = [p for p in (job / "run" / "conda").iterdir() if p.is_symlink()]
    assert _seen(done.stdout)["prefix"] == os.path.realpath(link)
    assert len(_unpack_runs(log)) == 1
