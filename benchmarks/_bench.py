"""Shared helpers of the side-by-side benchmarks (not a benchmark itself).

Each ``bench_*.py`` script compares trainenv with a baseline in one run: the commands are
timed in interleaved rounds (a new, seeded order every round, so no command always follows
the same one) after a warm-up, so a noisy neighbour or a CPU frequency change hits every
command alike. A run is one
``os.posix_spawn`` + ``os.wait4``, timed with ``time.perf_counter``; the harness adds the
same ~1 ms to every command, so differences and ratios are not biased by it.

The baseline for "what AWS ships" is ``sagemaker-training==5.1.4`` in its own venv under
``benchmarks/.cache/`` (built on first use from the same base CPython as the trainenv venv;
about 50 s here and ~320 MB). If that install fails, the reason is saved and printed, and the
sagemaker columns are skipped until ``benchmarks/.cache/sagemaker-training-5.1.4`` is
deleted. ``--no-sagemaker`` skips them on purpose.

Interpreters are always absolute paths (never a pyenv shim, which adds ~190 ms a launch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
SAGEMAKER_VERSION = "5.1.4"
SAGEMAKER_DIR = CACHE / f"sagemaker-training-{SAGEMAKER_VERSION}"

# Variables of the calling shell that would change what the launchers under test do.
_DROPPED_PREFIXES = ("TRAINENV_", "SM_", "SAGEMAKER_", "PET_", "AIP_", "PAI_")
_DROPPED_NAMES = {
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "PYTHONPROFILEIMPORTTIME", "VIRTUAL_ENV", "TF_CONFIG", "CLUSTER_SPEC", "MASTER_ADDR",
    "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "TRAINING_JOB_NAME",
}


# -- command line --------------------------------------------------------------------------

def arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--python", default=None,
                        help="interpreter of the trainenv venv (default: <repo>/.venv/bin/python)")
    parser.add_argument("--no-sagemaker", action="store_true",
                        help="skip the sagemaker-training columns (no venv is built)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per command first")
    return parser


def trainenv_python(option: Optional[str]) -> str:
    """The trainenv venv's interpreter as an absolute path (the venv symlink, not resolved)."""
    if option:
        return os.path.abspath(option)
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else os.path.abspath(sys.executable)


def base_env(**extra: str) -> Dict[str, str]:
    """The caller's environment without anything that steers trainenv or sagemaker."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_NAMES
    }
    env.update(extra)
    return env


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- timing ----------------------------------------------------------------------------------

@dataclass
class Command:
    """One command under test. ``stdout``/``stderr``: a path (truncated each run) or None (/dev/null)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Optional[str] = None
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    before: Optional[Callable[[], None]] = None  # untimed, before every run
    times: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)

    def display(self) -> str:
        return " ".join(self.argv)


def _open_target(path: Optional[str]) -> int:
    if path is None:
        return os.open(os.devnull, os.O_WRONLY)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def run_once(cmd: Command) -> tuple:
    """Spawn, wait; ``(wall seconds, user+sys CPU seconds, exit status)``."""
    if cmd.before is not None:
        cmd.before()
    fds = [os.open(os.devnull, os.O_RDONLY), _open_target(cmd.stdout), _open_target(cmd.stderr)]
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
    argv = list(cmd.argv)
    cwd = os.getcwd()
    try:
        if cmd.cwd:
            os.chdir(cmd.cwd)  # posix_spawn has no cwd argument before Python 3.13
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, dict(cmd.env), file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
    finally:
        os.chdir(cwd)
        for fd in fds:
            os.close(fd)
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def check(cmd: Command) -> None:
    """One untimed run with output captured; exit with the output if it fails."""
    if cmd.before is not None:
        cmd.before()
    result = subprocess.run(list(cmd.argv), env=dict(cmd.env), cwd=cmd.cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        log(f"[{cmd.name}] failed with status {result.returncode}: {cmd.display()}")
        log(result.stdout.decode(errors="replace")[-2000:])
        log(result.stderr.decode(errors="replace")[-4000:])
        sys.exit(1)


def interleaved(commands: Sequence[Command], runs: int, warmup: int, checked: bool = False) -> None:
    """Warm up each command, then time ``runs`` rounds, in a new (seeded) order every round.

    The first warm-up run captures the output and stops on failure (``check``); with
    ``checked`` the caller has made that run already.
    """
    for cmd in commands:
        if not checked:
            check(cmd)
        for _ in range(max(0, warmup - 1)):
            run_once(cmd)
    for round_number in range(runs):
        order = list(commands)
        random.Random(round_number).shuffle(order)  # no command always follows the same one
        for cmd in order:
            wall, cpu, code = run_once(cmd)
            if code != 0:
                log(f"[{cmd.name}] exited {code} in a timed run: {cmd.display()}")
                sys.exit(1)
            cmd.times.append(wall)
            cmd.cpu.append(cpu)


def summary(values: Sequence[float], scale: float = 1000.0) -> Dict[str, Any]:
    """Median, min, max, mean and stdev of ``values`` (seconds → ms by default)."""
    scaled = [v * scale for v in values]
    return {
        "median": round(statistics.median(scaled), 3),
        "min": round(min(scaled), 3),
        "max": round(max(scaled), 3),
        "mean": round(statistics.fmean(scaled), 3),
        "stdev": round(statistics.stdev(scaled), 3) if len(scaled) > 1 else 0.0,
        "n": len(scaled),
    }


def command_result(cmd: Command) -> Dict[str, Any]:
    return {"command": cmd.display(), "wall_ms": summary(cmd.times), "cpu_ms": summary(cmd.cpu)}


# -- output ------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or not base:
        return None
    return round(value / base, 2)


def goal(name: str, measured: Optional[float], limit: float, unit: str, baseline: Optional[str] = None) -> Dict[str, Any]:
    """A goal row: ``measured <= limit``; None when it could not be measured."""
    met = None if measured is None else measured <= limit
    row = {"goal": name, "limit": limit, "measured": measured, "unit": unit, "met": met}
    if baseline:
        row["baseline"] = baseline
    return row


def goals_text(goals: Sequence[Dict[str, Any]]) -> str:
    lines = []
    for g in goals:
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
        measured = "-" if g["measured"] is None else f"{g['measured']:.1f}"
        extra = f"  ({g['baseline']})" if g.get("baseline") else ""
        lines.append(f"  {verdict:>12}: {g['goal']}: {measured} {g['unit']} (goal <= {g['limit']:g} {g['unit']}){extra}")
    return "\n".join(lines)


def machine(python: str) -> Dict[str, Any]:
    """Where and when: CPU, cores, kernel, interpreter, trainenv version and commit."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    version = subprocess.run([python, "-c", "import sys, trainenv; print(trainenv.__version__, sys.version.split()[0])"],
                             capture_output=True, text=True, env=base_env()).stdout.split()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": version[1] if len(version) > 1 else "?",
        "trainenv": version[0] if version else "?",
        "commit": (commit + ("+dirty src" if dirty else "")) or "?",
        "interpreter": python,
        "busy_before_pct": cpu_busy(),
    }


def machine_text(info: Mapping[str, Any]) -> str:
    text = (f"{info['date']}; {info['cpu']}, {info['affinity']}/{info['cores']} CPUs, Linux {info['kernel']}, "
            f"CPython {info['python']}; trainenv {info['trainenv']} @ {info['commit']}")
    busy = [info.get("busy_before_pct"), info.get("busy_after_pct")]
    text += "\nother CPU load before/after the runs: " + " / ".join("?" if b is None else f"{b:.0f}%" for b in busy)
    if any(b is not None and b > 15 for b in busy):
        text += "  WARNING: something else is using the CPUs, the figures are noisy"
    return text


def cpu_busy(seconds: float = 1.0) -> Optional[float]:
    """Percent of all CPUs busy over ``seconds`` while this benchmark sleeps (other load)."""
    def sample() -> tuple:
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(100.0 * (total - (idle1 - idle0)) / total, 1) if total > 0 else None


def emit(report: Dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(text)


# -- the sagemaker-training baseline ---------------------------------------------------------

def base_interpreter(python: str) -> str:
    """The CPython the trainenv venv was made from, so both venvs run the same interpreter."""
    out = subprocess.run([python, "-c", "import sys; print(getattr(sys, '_base_executable', sys.executable))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out or python


def sagemaker_venv(python: str, skip: bool) -> tuple:
    """``(venv python or None, reason)``; builds the venv on first use (see the module docstring)."""
    if skip:
        return None, "skipped (--no-sagemaker)"
    venv = SAGEMAKER_DIR / "venv"
    status_file = SAGEMAKER_DIR / "status.json"
    if status_file.exists():
        status = json.loads(status_file.read_text(encoding="utf-8"))
        if status.get("ok") and (venv / "bin" / "train").exists():
            return str(venv / "bin" / "python"), "cached"
        if not status.get("ok"):
            return None, f"install failed earlier: {status.get('reason')} (delete {SAGEMAKER_DIR} to retry)"
    shutil.rmtree(SAGEMAKER_DIR, ignore_errors=True)
    SAGEMAKER_DIR.mkdir(parents=True)
    install_log = SAGEMAKER_DIR / "install.log"
    log(f"building the baseline venv: sagemaker-training=={SAGEMAKER_VERSION} into {venv} (once; ~50 s) ...")
    started = time.monotonic()
    reason = None
    with open(install_log, "w", encoding="utf-8") as out:
        steps = [
            ("python -m venv", [base_interpreter(python), "-m", "venv", str(venv)]),
            (f"pip install sagemaker-training=={SAGEMAKER_VERSION}",
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
              f"sagemaker-training=={SAGEMAKER_VERSION}"]),
        ]
        for what, step in steps:
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            try:
                result = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, env=base_env(), timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                reason = f"`{what}`: {exc}"
                break
            if result.returncode != 0:
                reason = f"`{what}` exited {result.returncode}: {_last_error(install_log)}"
                break
    if reason is None and not (venv / "bin" / "train").exists():
        reason = "the install succeeded but left no `train` console script"
    status = {"ok": reason is None, "reason": reason, "seconds": round(time.monotonic() - started, 1),
              "log": str(install_log)}
    status_file.write_text(json.dumps(status), encoding="utf-8")
    if reason:
        log(f"sagemaker-training install failed: {reason}; see {install_log}")
        return None, f"install failed: {reason}"
    log(f"  done in {status['seconds']} s")
    return str(venv / "bin" / "python"), "installed now"


def _last_error(path: Path) -> str:
    lines = [l.strip() for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if l.lower().startswith("error")]
    return (errors or lines or ["no output"])[-1][:300]


# -- the fake job trees ------------------------------------------------------------------------

# The hyperparameters of a fake SageMaker job (tests/data/sagemaker_research_tree), as the SDK
# writes them (JSON-encoded strings); trainenv's tree gets the same file.
SAGEMAKER_HPS = {
    "lr": "0.1", "epochs": "3", "flag": "true", "layers": "[1, 2]", "cfg": "{\"a\": 1}",
    "name": "\"x y\"", "sagemaker_job_name": "\"job-123\"", "sagemaker_region": "\"us-west-2\"",
}
INPUT_DATA_CONFIG = {
    "train": {"ContentType": "text/csv", "TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
              "RecordWrapperType": "None"},
    "validation": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"},
}
RESOURCE_CONFIG = {
    "current_host": "algo-1", "hosts": ["algo-1"], "current_instance_type": "ml.m5.xlarge",
    "current_group_name": "homogeneousCluster",
    "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "ml.m5.xlarge",
                         "hosts": ["algo-1"]}],
    "network_interface_name": "eth0",
}
TRIVIAL_SCRIPT = "import sys\nprint(sys.argv)\n"


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def make_trainenv_tree(base: Path, scripts: Mapping[str, str], hyperparameters: Optional[Mapping[str, Any]] = None,
                       resource_config: Optional[Mapping[str, Any]] = None) -> Path:
    """A trainenv job tree (README, "The container contract") equivalent to the fake SageMaker tree."""
    config = base / "input" / "config"
    write_json(config / "hyperparameters.json", SAGEMAKER_HPS if hyperparameters is None else hyperparameters)
    write_json(config / "inputdataconfig.json", INPUT_DATA_CONFIG)
    write_json(config / "resourceconfig.json", RESOURCE_CONFIG if resource_config is None else resource_config)
    for channel in INPUT_DATA_CONFIG:
        (base / "input" / "data" / channel).mkdir(parents=True, exist_ok=True)
    code = base / "usercode"
    code.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (code / name).write_text(text, encoding="utf-8")
    return base


def make_sagemaker_tree(base: Path, scripts: Mapping[str, str]) -> Path:
    """The fake SageMaker ``/opt/ml`` tree."""
    config = base / "input" / "config"
    write_json(config / "hyperparameters.json", SAGEMAKER_HPS)
    write_json(config / "inputdataconfig.json", INPUT_DATA_CONFIG)
    write_json(config / "resourceconfig.json", RESOURCE_CONFIG)
    for channel in INPUT_DATA_CONFIG:
        (base / "input" / "data" / channel).mkdir(parents=True, exist_ok=True)
    for directory in ("model", "output"):
        (base / directory).mkdir(parents=True, exist_ok=True)
    code = base / "code"
    code.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (code / name).write_text(text, encoding="utf-8")
    return base


def sagemaker_env(base: Path, program: str, **extra: str) -> Dict[str, str]:
    """What ``train`` needs to run locally: the tree, the program, no DNS wait (local mode)."""
    return base_env(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_PROGRAM=program, SM_STUDIO_LOCAL_MODE="true", **extra)


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# -- import cost -----------------------------------------------------------------------------------

def importtime(python: str, code: Optional[str], env: Mapping[str, str], runs: int,
               argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``-X importtime`` over ``runs`` fresh interpreters: what is imported beyond ``-c pass``.

    ``total_ms``: the median sum of the cumulative times of the top-level imports that
    ``-c pass`` does not make (``-X importtime`` itself inflates times ~1.5x). ``top``: the
    biggest top-level imports (median cumulative ms) with their biggest direct child.
    ``argv``, if given, replaces ``-c code`` (e.g. a console script); its lines are picked
    out of whatever else it writes to stderr.
    """
    floor_names = set(_import_tree(_importtime_lines(python, ["-c", "pass"], env)))
    totals: List[float] = []
    per_module: Dict[str, List[float]] = {}
    children: Dict[str, Dict[str, List[float]]] = {}
    for _ in range(runs):
        tree = _import_tree(_importtime_lines(python, list(argv) if argv else ["-c", code or "pass"], env))
        extra = {name: node for name, node in tree.items() if name not in floor_names}
        totals.append(sum(node[0] for node in extra.values()) / 1000.0)
        for name, (cumulative, kids) in extra.items():
            per_module.setdefault(name, []).append(cumulative / 1000.0)
            for kid, kid_us in kids.items():
                children.setdefault(name, {}).setdefault(kid, []).append(kid_us / 1000.0)
    top = []
    for name, values in sorted(per_module.items(), key=lambda item: -statistics.median(item[1]))[:8]:
        kids = sorted(((k, statistics.median(v)) for k, v in children.get(name, {}).items()), key=lambda x: -x[1])
        top.append({"module": name, "ms": round(statistics.median(values), 1),
                    "biggest_child": [kids[0][0], round(kids[0][1], 1)] if kids else None})
    return {"total_ms": round(statistics.median(totals), 1), "min_ms": round(min(totals), 1), "top": top}


def importtime_text(result: Mapping[str, Any]) -> str:
    parts = []
    for entry in result["top"]:
        child = entry["biggest_child"]
        parts.append(f"{entry['module']} {entry['ms']:.1f}" + (f" ({child[0]} {child[1]:.1f})" if child else ""))
    return ", ".join(parts)


def _importtime_lines(python: str, args: List[str], env: Mapping[str, str]) -> List[str]:
    result = subprocess.run([python, "-X", "importtime", *args], env=dict(env), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        log(result.stderr[-3000:])
        sys.exit(1)
    return [line for line in result.stderr.splitlines() if line.startswith("import time:")]


def _import_tree(lines: List[str]) -> Dict[str, tuple]:
    """``{top-level name: (cumulative µs, {direct child: cumulative µs})}`` (children print first)."""
    top: Dict[str, tuple] = {}
    pending: Dict[str, int] = {}
    for line in lines:
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        field_ = parts[2]
        depth = (len(field_) - len(field_.lstrip(" ")) - 1) // 2
        name, cumulative = field_.strip(), int(parts[1])
        if depth == 1:
            pending[name] = pending.get(name, 0) + cumulative
        elif depth == 0:
            total, kids = top.get(name, (0, {}))
            kids.update(pending)
            top[name] = (total + cumulative, kids)
            pending = {}
    return top


def loaded_modules(python: str, code: str, env: Mapping[str, str]) -> List[str]:
    """``sorted(sys.modules)`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([python, "-c", probe], env=dict(env), capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])
