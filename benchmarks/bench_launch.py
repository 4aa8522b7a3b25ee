"""Launcher overhead: ``trainenv train`` vs running the script directly vs AWS's ``train``.

Usage::

    python benchmarks/bench_launch.py             # tables; about 100 s (+~50 s once to build the baseline venv)
    python benchmarks/bench_launch.py --json
    python benchmarks/bench_launch.py --no-sagemaker --runs 10

Trees: a fake SageMaker tree (tests/data/sagemaker_research_tree: 8 hyperparameters as
JSON-encoded strings, channels ``train`` and ``validation``, one host) and the same job in
trainenv's layout; the entry point is a trivial ``train.py`` (``print(sys.argv)``).

1. **Launch overhead** (interleaved): ``python usercode/train.py <the hyperparameter args>`` ·
   ``trainenv train`` (``TRAINENV_ENTRY_POINT=train.py``) · sagemaker's ``train``
   (``SAGEMAKER_PROGRAM=train.py``, ``SM_STUDIO_LOCAL_MODE=true``). Goal: ≤ 25 ms over direct,
   i.e. little beyond the launcher's own interpreter start (sagemaker: ≈ 515 ms measured earlier).
   The *cpu* columns (user+sys of the launcher and its child, from ``wait4``) are steadier
   than wall time on a shared machine.
2. **Launcher peak RSS**: the entry point reads ``VmHWM`` from ``/proc/<ppid>/status`` while
   it runs, median of 5. Goal: ≤ 25 MB.
3. **Already-installed requirements** (interleaved; pip and sagemaker, ~1 s a run, get fewer
   runs than the trainenv commands): ``requirements.txt`` = ``psutil``, which
   both venvs have. trainenv with its skip marker (second and later runs) and without it (a
   fresh ``TMPDIR`` each run, so the installer runs and finds nothing to do) vs
   ``pip install -r`` alone (pip's no-op) vs sagemaker's ``train`` with the same file. Goal: the
   marker case ≤ 50 ms over ``trainenv train`` without requirements.
4. ``-X importtime`` of the ``trainenv train`` process: what the launcher imports.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import _bench as b

RSS_SCRIPT = """\
import json, os
def status(pid):
    with open(f"/proc/{pid}/status") as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}
print("RSS " + json.dumps({"launcher": status(os.getppid()), "child": status(os.getpid())}))
"""
REQUIREMENT = "psutil"


def trainenv_argv(python: str) -> List[str]:
    """The ``trainenv`` console script next to the venv's interpreter (absolute)."""
    script = Path(python).parent / "trainenv"
    return [str(script), "train"] if script.exists() else [python, "-m", "trainenv", "train"]


def user_args(python: str, env: Dict[str, str]) -> List[str]:
    code = "import json, trainenv; print(json.dumps(list(trainenv.training_env().user_args)))"
    out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def launch(python: str, sm_python: Optional[str], work: Path, runs: int, warmup: int) -> Dict[str, Any]:
    tree = b.make_trainenv_tree(work / "ml", {"train.py": b.TRIVIAL_SCRIPT})
    env = b.base_env(TRAINENV_BASE_DIR=str(tree), TRAINENV_ENTRY_POINT="train.py")
    code_dir = str(tree / "usercode")
    commands = [
        b.Command("python train.py (direct)", [python, f"{code_dir}/train.py", *user_args(python, env)], b.base_env(),
                  cwd=code_dir),
        b.Command("trainenv train", trainenv_argv(python), env),
    ]
    if sm_python:
        sm_tree = b.make_sagemaker_tree(work / "opt_ml", {"train.py": b.TRIVIAL_SCRIPT})
        commands.append(b.Command("sagemaker train", [str(Path(sm_python).parent / "train")],
                                  b.sagemaker_env(sm_tree, "train.py")))
    b.interleaved(commands, runs, warmup)
    results = {c.name: b.command_result(c) for c in commands}
    direct = results["python train.py (direct)"]["wall_ms"]["median"]
    direct_min = results["python train.py (direct)"]["wall_ms"]["min"]
    direct_cpu = results["python train.py (direct)"]["cpu_ms"]["median"]
    for result in results.values():
        result["over_direct_ms"] = round(result["wall_ms"]["median"] - direct, 1)
        result["min_over_direct_min_ms"] = round(result["wall_ms"]["min"] - direct_min, 1)
        result["cpu_over_direct_ms"] = round(result["cpu_ms"]["median"] - direct_cpu, 1)
        result["x_direct"] = b.ratio(result["wall_ms"]["median"], direct)
    return results


def peak_rss(python: str, sm_python: Optional[str], work: Path, runs: int = 5) -> Dict[str, Any]:
    tree = b.make_trainenv_tree(work / "ml_rss", {"rss.py": RSS_SCRIPT})
    cases = [("trainenv train", trainenv_argv(python), b.base_env(TRAINENV_BASE_DIR=str(tree), TRAINENV_ENTRY_POINT="rss.py"))]
    if sm_python:
        sm_tree = b.make_sagemaker_tree(work / "opt_ml_rss", {"rss.py": RSS_SCRIPT})
        cases.append(("sagemaker train", [str(Path(sm_python).parent / "train")], b.sagemaker_env(sm_tree, "rss.py")))
    out: Dict[str, Any] = {}
    for name, argv, env in cases:
        launcher: List[int] = []
        child: List[int] = []
        for _ in range(runs):
            result = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            line = next((l for l in result.stdout.splitlines() if l.startswith("RSS ")), None)
            if result.returncode != 0 or line is None:
                b.log(f"[{name}] RSS run failed ({result.returncode}):\n{result.stdout[-1000:]}\n{result.stderr[-2000:]}")
                break
            data = json.loads(line[4:])
            launcher.append(data["launcher"]["VmHWM"])
            child.append(data["child"]["VmHWM"])
        if launcher:
            out[name] = {"launcher_vmhwm_mb": round(statistics.median(launcher) / 1024, 1),
                         "launcher_vmhwm_max_mb": round(max(launcher) / 1024, 1),
                         "child_vmhwm_mb": round(statistics.median(child) / 1024, 1), "n": len(launcher)}
    return out


def requirements(python: str, sm_python: Optional[str], work: Path, runs: int, slow_runs: int, warmup: int) -> Dict[str, Any]:
    """The trainenv commands get ``runs`` interleaved runs; pip and sagemaker (~1 s each) ``slow_runs``."""
    tree = b.make_trainenv_tree(work / "ml_req", {"train.py": b.TRIVIAL_SCRIPT, "requirements.txt": REQUIREMENT + "\n"})
    plain = b.make_trainenv_tree(work / "ml_plain", {"train.py": b.TRIVIAL_SCRIPT})
    marker_tmp = work / "tmp-marker"  # the skip marker lives under $TMPDIR/trainenv-<uid>/installed
    marker_tmp.mkdir()
    fresh_root = work / "tmp-fresh"
    fresh_root.mkdir()
    fresh = {"dir": ""}

    def new_tmpdir() -> None:
        if fresh["dir"]:
            shutil.rmtree(fresh["dir"], ignore_errors=True)
        fresh["dir"] = tempfile.mkdtemp(dir=fresh_root)
        cold.env = dict(cold.env, TMPDIR=fresh["dir"])

    env = b.base_env(TRAINENV_BASE_DIR=str(tree), TRAINENV_ENTRY_POINT="train.py", TMPDIR=str(marker_tmp))
    requirements_file = str(tree / "usercode" / "requirements.txt")
    cold = b.Command("trainenv train, requirements, no marker", trainenv_argv(python), env, before=new_tmpdir)
    commands = [
        b.Command("trainenv train, no requirements", trainenv_argv(python),
                  b.base_env(TRAINENV_BASE_DIR=str(plain), TRAINENV_ENTRY_POINT="train.py", TMPDIR=str(marker_tmp))),
        b.Command("trainenv train, requirements, marker", trainenv_argv(python), env),
        cold,
    ]
    slow = [
        b.Command("pip install -r (no-op, pip alone)",
                  [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r", requirements_file],
                  b.base_env(), cwd=str(tree / "usercode")),
    ]
    if sm_python:
        sm_tree = b.make_sagemaker_tree(work / "opt_ml_req", {"train.py": b.TRIVIAL_SCRIPT, "requirements.txt": REQUIREMENT + "\n"})
        sm_plain = b.make_sagemaker_tree(work / "opt_ml_plain", {"train.py": b.TRIVIAL_SCRIPT})
        sm_train = str(Path(sm_python).parent / "train")
        slow += [
            b.Command("sagemaker train, no requirements", [sm_train], b.sagemaker_env(sm_plain, "train.py")),
            b.Command("sagemaker train, requirements", [sm_train], b.sagemaker_env(sm_tree, "train.py")),
        ]
    b.interleaved(commands, runs, warmup)
    b.interleaved(slow, slow_runs, warmup)
    commands += slow
    installer = subprocess.run(
        [python, "-c", "import sys; from trainenv.install import find_uv; import os; print('uv' if find_uv(os.environ) else 'pip')"],
        env=env, capture_output=True, text=True).stdout.strip() or "?"
    results = {c.name: b.command_result(c) for c in commands}
    base = results["trainenv train, no requirements"]["wall_ms"]["median"]
    sm_base = results.get("sagemaker train, no requirements", {}).get("wall_ms", {}).get("median")
    for name, result in results.items():
        own = sm_base if name.startswith("sagemaker") else base
        result["over_no_requirements_ms"] = None if name.startswith("pip") else round(result["wall_ms"]["median"] - own, 1)
    shutil.rmtree(fresh_root, ignore_errors=True)
    return {"requirement": REQUIREMENT, "installer": installer, "commands": results}


def main() -> None:
    parser = b.arg_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    runs, warmup = args.runs or 20, args.warmup or 3
    python = b.trainenv_python(args.python)
    sm_python, sm_status = b.sagemaker_venv(python, args.no_sagemaker)
    info = b.machine(python)
    work = b.scratch("bench-launch-")
    try:
        launched = launch(python, sm_python, work, runs, warmup)
        rss = peak_rss(python, sm_python, work)
        req = requirements(python, sm_python, work, runs, max(5, runs // 3), 2)
        tree = b.make_trainenv_tree(work / "ml_it", {"train.py": b.TRIVIAL_SCRIPT})
        it_env = b.base_env(TRAINENV_BASE_DIR=str(tree), TRAINENV_ENTRY_POINT="train.py")
        imports = b.importtime(python, None, it_env, 10, argv=trainenv_argv(python))
        modules = launcher_modules(python, it_env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["busy_after_pct"] = b.cpu_busy()
    overhead = launched["trainenv train"]["over_direct_ms"]
    sm_over = launched.get("sagemaker train", {}).get("over_direct_ms")
    rss_te = rss.get("trainenv train", {}).get("launcher_vmhwm_mb")
    rss_sm = rss.get("sagemaker train", {}).get("launcher_vmhwm_mb")
    marker = req["commands"]["trainenv train, requirements, marker"]["over_no_requirements_ms"]
    pip_noop = req["commands"]["pip install -r (no-op, pip alone)"]["wall_ms"]["median"]
    goals = [
        b.goal("trainenv train over running the script directly", overhead, 25, "ms",
               f"sagemaker train: {sm_over} ms" if sm_over is not None else None),
        b.goal("trainenv train over running the script directly, CPU time (user+sys)",
               launched["trainenv train"]["cpu_over_direct_ms"], 25, "ms"),
        b.goal("trainenv launcher peak RSS (VmHWM)", rss_te, 25, "MB",
               f"sagemaker train: {rss_sm} MB" if rss_sm is not None else None),
        b.goal("already-installed requirements.txt (skip marker) over no requirements", marker, 50, "ms",
               f"pip's no-op alone: {pip_noop:.0f} ms"),
    ]
    report = {"benchmark": "launch", "machine": info, "sagemaker": sm_status, "runs": runs,
              "warmup": warmup, "launch": launched, "peak_rss": rss, "requirements": req,
              "launcher_importtime": imports, "launcher_modules": modules, "goals": goals}
    b.emit(report, args.json, render(report))


def launcher_modules(python: str, env: Dict[str, str]) -> Dict[str, Any]:
    """Which heavy modules the ``trainenv train`` process has loaded once the job is done."""
    code = ("import sys, json, trainenv.cli\n"
            "try:\n    trainenv.cli.main(['train'])\nexcept SystemExit:\n    pass\n"
            "print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)")
    result = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    line = next((l for l in result.stderr.splitlines() if l.startswith("MODULES ")), None)
    if line is None:
        return {}
    modules = json.loads(line[8:])
    floor = b.loaded_modules(python, "pass", env)
    return {"count_beyond_floor": len(set(modules) - set(floor)),
            "heavy": {name: name in modules for name in ("click", "yaml", "psutil", "pynvml", "ctypes", "logging",
                                                         "pathlib", "subprocess", "selectors")}}


def render(report: Dict[str, Any]) -> str:
    lines = ["bench_launch", b.machine_text(report["machine"]),
             f"sagemaker-training {b.SAGEMAKER_VERSION}: {report['sagemaker']}", "",
             f"1. launch overhead, trivial train.py, {report['runs']} interleaved runs after {report['warmup']} warm-up (ms)"]
    rows = [[n, r["wall_ms"]["median"], r["wall_ms"]["min"], r["over_direct_ms"], r["min_over_direct_min_ms"],
             r["cpu_ms"]["median"], r["cpu_over_direct_ms"], r["x_direct"]]
            for n, r in report["launch"].items()]
    lines.append(b.table(["command", "median", "min", "over direct", "(by min)", "cpu", "cpu over direct", "x direct"], rows))
    te = report["launch"]["trainenv train"]["over_direct_ms"]
    sm = report["launch"].get("sagemaker train", {}).get("over_direct_ms")
    if sm is not None and te > 0:
        lines.append(f"ratio: sagemaker's launch overhead is {sm / te:.1f}x trainenv's ({sm:.0f} vs {te:.0f} ms)")
    lines += ["", "2. launcher peak RSS (VmHWM of the parent, read by the entry point; median of 5)"]
    rows = [[n, r["launcher_vmhwm_mb"], r["launcher_vmhwm_max_mb"], r["child_vmhwm_mb"]] for n, r in report["peak_rss"].items()]
    lines.append(b.table(["launcher", "MB", "max MB", "entry point MB"], rows))
    rss = report["peak_rss"]
    if "sagemaker train" in rss and "trainenv train" in rss:
        lines.append(f"ratio: sagemaker / trainenv launcher RSS = "
                     f"{rss['sagemaker train']['launcher_vmhwm_mb'] / rss['trainenv train']['launcher_vmhwm_mb']:.1f}")
    req = report["requirements"]
    counts = sorted({r["wall_ms"]["n"] for r in req["commands"].values()}, reverse=True)
    lines += ["", f"3. requirements.txt = {req['requirement']} (already installed); trainenv's installer: {req['installer']}; "
                  f"{' / '.join(map(str, counts))} interleaved runs (trainenv / pip and sagemaker) (ms)"]
    rows = [[name, r["wall_ms"]["median"], r["wall_ms"]["min"], r["over_no_requirements_ms"]] for name, r in req["commands"].items()]
    lines.append(b.table(["command", "median", "min", "over no requirements"], rows))
    cmds = req["commands"]
    marker = cmds["trainenv train, requirements, marker"]["over_no_requirements_ms"]
    sm_req = cmds.get("sagemaker train, requirements", {}).get("over_no_requirements_ms")
    pip_noop = cmds["pip install -r (no-op, pip alone)"]["wall_ms"]["median"]
    if marker is not None and marker >= 1:
        lines.append(f"ratio: pip's no-op alone / trainenv's marker skip = {pip_noop / marker:.0f}x"
                     + (f"; sagemaker's added cost / trainenv's = {sm_req / marker:.0f}x" if sm_req else ""))
    elif marker is not None:
        lines.append(f"trainenv's marker skip adds under 1 ms (within noise); pip's no-op alone takes {pip_noop:.0f} ms"
                     + (f", sagemaker's requirements step {sm_req:.0f} ms" if sm_req else ""))
    it = report["launcher_importtime"]
    lines += ["", f"4. -X importtime of `trainenv train` beyond `-c pass` (median of 10): {it['total_ms']:.1f} ms "
                  f"(min {it['min_ms']:.1f})",
              "  top (cumulative ms, biggest child): " + b.importtime_text(it)]
    mods = report["launcher_modules"]
    if mods:
        lines.append(f"  modules loaded beyond the floor: {mods['count_beyond_floor']}; " + ", ".join(
            f"{k} {'IMPORTED' if v else 'not imported'}" for k, v in mods["heavy"].items()))
    lines += ["", "goals:", b.goals_text(report["goals"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
