"""Code sources: time to the first line of user code, ``TRAINENV_SOURCE`` vs fetching by hand.

Usage::

    python benchmarks/bench_sources.py            # tables; about 1 minute
    python benchmarks/bench_sources.py --json
    python benchmarks/bench_sources.py --runs 10

The job's ``train.py`` writes ``time.monotonic()`` (one clock for every process here) to the file
``$FIRST_LINE`` as its first statement; a run's *first line* is that instant minus the instant the
command was spawned, its *total* the time until it exited. Commands are timed in interleaved
rounds (``_bench``), each round from a clean state (the code dir or the by-hand dir emptied,
untimed), in one run:

1. **archive**: ``code.tar.gz`` holding ``train.py`` and 10 MiB of data in 40 files (half random
   bytes, half repetitive text: ~6.9 MB compressed). ``trainenv train`` with
   ``TRAINENV_SOURCE=code.tar.gz`` (each member checked, extracted beside the code dir, moved in)
   vs ``sh -c 'tar xzf code.tar.gz -C dir && cd dir && exec python train.py'``.
2. **git**: a repository of 400 files (~1.6 MB) plus ``train.py``, served over ``file://``.
   ``trainenv train`` with ``TRAINENV_SOURCE=file://…`` (a shallow clone, submodules included)
   vs ``sh -c 'git clone --quiet --depth 1 file://… dir && cd dir && exec python train.py'``.

Each table also has ``trainenv train`` with the code already in place (no source): the
launcher's own share of the time.
"""

from __future__ import annotations

import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import _bench as b

TRAIN = (
    "import os, time\n"
    "with open(os.environ['FIRST_LINE'], 'w') as handle:\n"
    "    handle.write(repr(time.monotonic()))\n"
)
DATA_BYTES = 10 * 1024 * 1024
DATA_FILES = 40
GIT_FILES = 400


def trainenv_argv(python: str) -> List[str]:
    script = Path(python).parent / "trainenv"
    return [str(script), "train"] if script.exists() else [python, "-m", "trainenv", "train"]


def _empty(directory: Path) -> None:
    """Remove what a run left (untimed), keeping the dir itself when asked for the code dir."""
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def make_archive(work: Path) -> Path:
    """``code.tar.gz``: ``train.py`` + 10 MiB in 40 files, half incompressible, half text."""
    rng = random.Random(7)
    content = work / "archive-content"
    (content / "data").mkdir(parents=True)
    (content / "train.py").write_text(TRAIN)
    size = DATA_BYTES // DATA_FILES
    line = b"epoch,step,loss,accuracy,learning_rate\n"
    for index in range(DATA_FILES):
        if index % 2:
            data = rng.randbytes(size)
        else:
            data = (line + b"".join(f"{i},{i * 7},{rng.random():.6f},0.5,0.001\n".encode() for i in range(size // 30)))[:size]
        (content / "data" / f"part-{index:03d}.bin").write_bytes(data)
    archive = work / "code.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(content.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


def make_repo(work: Path) -> str:
    """A bare repository of ``train.py`` + 400 small modules; its ``file://`` URL."""
    source = work / "repo-work"
    package = source / "pkg"
    package.mkdir(parents=True)
    (source / "train.py").write_text(TRAIN)
    for index in range(GIT_FILES):
        body = "".join(f"def f{index}_{n}(x):\n    return x * {n} + {index}\n\n" for n in range(80))
        (package / f"mod_{index:03d}.py").write_text(body)
    env = b.base_env(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
                     GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")
    for step in (["git", "init", "--quiet", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "--quiet", "-m", "code"]):
        subprocess.run(step, cwd=source, env=env, check=True)
    bare = work / "repo.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(source), str(bare)], env=env, check=True)
    return f"file://{bare}"


class Timed(b.Command):
    """A command whose job writes its first-line instant to ``$FIRST_LINE``."""

    def __init__(self, name: str, argv: Sequence[str], env: Dict[str, str], first_line: Path, clean: Path, **kwargs: Any) -> None:
        super().__init__(name, argv, dict(env, FIRST_LINE=str(first_line)), before=lambda: _empty(clean), **kwargs)
        self.first_line = first_line
        self.firsts: List[float] = []


def run_rounds(commands: Sequence[Timed], runs: int, warmup: int) -> None:
    """Warm up, then ``runs`` interleaved rounds; each run's first-line time and total."""
    for command in commands:
        b.check(command)
        for _ in range(max(0, warmup - 1)):
            b.run_once(command)
    for round_number in range(runs):
        order = list(commands)
        random.Random(round_number).shuffle(order)
        for command in order:
            wall, cpu, code = b.run_once(command)  # its clock starts after the (untimed) clean-up
            ended = time.monotonic()  # CLOCK_MONOTONIC, as perf_counter and the job's time.monotonic()
            if code != 0:
                b.log(f"[{command.name}] exited {code}: {command.display()}")
                sys.exit(1)
            first = float(command.first_line.read_text())
            command.times.append(wall)
            command.cpu.append(cpu)
            command.firsts.append(first - (ended - wall))


def scenario(commands: Sequence[Timed], by_hand: str) -> Dict[str, Any]:
    base = statistics.median(next(c for c in commands if c.name == by_hand).firsts)
    results = {}
    for command in commands:
        first = b.summary(command.firsts)
        results[command.name] = {
            "command": command.display(),
            "first_line_ms": first,
            "total_ms": b.summary(command.times),
            "x_by_hand": b.ratio(first["median"], base * 1000),
        }
    return results


def archive_scenario(python: str, work: Path, runs: int, warmup: int) -> Dict[str, Any]:
    archive = make_archive(work)
    job = b.make_trainenv_tree(work / "ml-archive", {}, hyperparameters={})
    ready = b.make_trainenv_tree(work / "ml-ready", {"train.py": TRAIN}, hyperparameters={})
    by_hand_dir = work / "by-hand-archive"
    by_hand_dir.mkdir()
    first = work / "first-line-archive"
    env = b.base_env(TRAINENV_ENTRY_POINT="train.py")
    commands = [
        Timed("trainenv train, TRAINENV_SOURCE=code.tar.gz", trainenv_argv(python),
              dict(env, TRAINENV_BASE_DIR=str(job), TRAINENV_SOURCE=str(archive)), first, job / "usercode"),
        Timed("by hand: tar xzf + python train.py", ["/bin/sh", "-c", 'tar xzf "$1" -C "$2" && cd "$2" && exec "$3" train.py',
                                                     "sh", str(archive), str(by_hand_dir), python],
              b.base_env(), first, by_hand_dir),
        Timed("trainenv train, code already there", trainenv_argv(python), dict(env, TRAINENV_BASE_DIR=str(ready)), first,
              work / "nothing"),
    ]
    run_rounds(commands, runs, warmup)
    result = scenario(commands, "by hand: tar xzf + python train.py")
    result["archive_bytes"] = archive.stat().st_size
    return result


def git_scenario(python: str, work: Path, runs: int, warmup: int) -> Dict[str, Any]:
    url = make_repo(work)
    job = b.make_trainenv_tree(work / "ml-git", {}, hyperparameters={})
    ready = b.make_trainenv_tree(work / "ml-ready-git", {"train.py": TRAIN}, hyperparameters={})
    by_hand_dir = work / "by-hand-git"
    first = work / "first-line-git"
    env = b.base_env(TRAINENV_ENTRY_POINT="train.py")
    commands = [
        Timed("trainenv train, TRAINENV_SOURCE=file://", trainenv_argv(python),
              dict(env, TRAINENV_BASE_DIR=str(job), TRAINENV_SOURCE=url), first, job / "usercode"),
        Timed("by hand: git clone --depth 1 + python train.py",
              ["/bin/sh", "-c", 'rm -rf "$2" && git clone --quiet --depth 1 "$1" "$2" && cd "$2" && exec "$3" train.py',
               "sh", url, str(by_hand_dir), python],
              b.base_env(), first, work / "nothing"),
        Timed("trainenv train, code already there", trainenv_argv(python), dict(env, TRAINENV_BASE_DIR=str(ready)), first,
              work / "nothing"),
    ]
    run_rounds(commands, runs, warmup)
    return scenario(commands, "by hand: git clone --depth 1 + python train.py")


def text_report(info: Dict[str, Any], archive: Dict[str, Any], git: Dict[str, Any]) -> str:
    lines = [b.machine_text(info), ""]
    for title, results in (("archive source (10 MiB of data)", archive), ("git source (file://, 401 files)", git)):
        rows = [
            [name, r["first_line_ms"]["median"], r["first_line_ms"]["min"], r["total_ms"]["median"], r["x_by_hand"]]
            for name, r in results.items() if isinstance(r, dict)
        ]
        lines += [title, b.table(["command", "first line ms (median)", "min", "total ms (median)", "x by hand"], rows), ""]
    return "\n".join(lines)


def main() -> None:
    parser = b.arg_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    runs, warmup = args.runs or 15, args.warmup or 2
    python = b.trainenv_python(args.python)
    info = b.machine(python)
    work = b.scratch("bench-sources-")
    try:
        archive = archive_scenario(python, work, runs, warmup)
        git = git_scenario(python, work, runs, warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["busy_after_pct"] = b.cpu_busy()
    report = {"machine": info, "archive": archive, "git": git}
    b.emit(report, args.json, text_report(info, archive, git))


if __name__ == "__main__":
    main()
