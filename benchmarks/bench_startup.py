"""Start-up cost: ``import trainenv`` + ``training_env()``, and ``to_env_vars()`` at scale.

Usage::

    python benchmarks/bench_startup.py            # tables; about 40 s (+~50 s once to build the baseline venv)
    python benchmarks/bench_startup.py --json     # the same figures as JSON
    python benchmarks/bench_startup.py --no-sagemaker --runs 10

(a) **Import + snapshot**, side by side, each a fresh interpreter, interleaved:
    ``python -c pass`` (the floor) · ``import trainenv; trainenv.training_env()`` on the fake
    SageMaker tree · the same inside a job (``TRAINENV_ENV_FILE`` set, the snapshot is loaded) ·
    ``import sagemaker_training.environment`` and ``Environment()`` on the same tree in
    SageMaker's layout (its own venv's floor subtracted). Goals over the floor: ≤ 8 ms in a job,
    ≤ 15 ms outside one.
    Then ``-X importtime`` (median of 15): everything trainenv's call imports beyond the floor,
    its top modules, and a check that click, yaml, psutil and pynvml were NOT imported.
(b) **``to_env_vars()`` at scale**: 1,000 hosts (``resourceconfig.json``) × 100 channels ×
    1,000 hyperparameters, built through a tree, timed in-process (median of 20 calls). Goal:
    < 100 ms. Prints the total size of the variables and the largest one; sagemaker's
    ``Environment().to_env_vars()`` on the same input beside it.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

import _bench as b

HEAVY = ("click", "yaml", "psutil", "pynvml", "boto3")
TRAINENV_CODE = "import trainenv; trainenv.training_env()"
SAGEMAKER_IMPORT = "import sagemaker_training.environment"
SAGEMAKER_ENV = "from sagemaker_training import environment; environment.Environment()"


# -- (a) import + snapshot ------------------------------------------------------------------------

def part_a(python: str, sm_python: Optional[str], runs: int, warmup: int, work: Path) -> Dict[str, Any]:
    tree = b.make_trainenv_tree(work / "ml", {"train.py": b.TRIVIAL_SCRIPT})
    env = b.base_env(TRAINENV_BASE_DIR=str(tree))
    snapshot = work / "env.json"
    subprocess.run([python, "-c", f"import trainenv; open({str(snapshot)!r}, 'w').write(trainenv.training_env().to_json())"],
                   env=env, check=True)
    commands = [
        b.Command("python -c pass", [python, "-c", "pass"], env),
        b.Command("trainenv: import + training_env()", [python, "-c", TRAINENV_CODE], env),
        b.Command("trainenv: same, in a job (TRAINENV_ENV_FILE)", [python, "-c", TRAINENV_CODE],
                  dict(env, TRAINENV_ENV_FILE=str(snapshot))),
    ]
    if sm_python:
        sm_tree = b.make_sagemaker_tree(work / "opt_ml", {"train.py": b.TRIVIAL_SCRIPT})
        sm_env = b.sagemaker_env(sm_tree, "train.py")
        commands += [
            b.Command("sagemaker venv: python -c pass", [sm_python, "-c", "pass"], sm_env),
            b.Command("sagemaker: import ...environment", [sm_python, "-c", SAGEMAKER_IMPORT], sm_env),
            b.Command("sagemaker: import + Environment()", [sm_python, "-c", SAGEMAKER_ENV], sm_env),
        ]
    b.interleaved(commands, runs, warmup)
    results = {c.name: b.command_result(c) for c in commands}
    floor = results["python -c pass"]["wall_ms"]["median"]
    sm_floor = results.get("sagemaker venv: python -c pass", {}).get("wall_ms", {}).get("median")
    cpu_floors = {side: results.get(name, {}).get("cpu_ms", {}).get("median")
                  for side, name in (("trainenv", "python -c pass"), ("sagemaker", "sagemaker venv: python -c pass"))}
    for name, result in results.items():
        own_floor = sm_floor if name.startswith("sagemaker") else floor
        result["over_floor_ms"] = round(result["wall_ms"]["median"] - own_floor, 2)
        cpu_floor = cpu_floors["sagemaker" if name.startswith("sagemaker") else "trainenv"]
        result["cpu_over_floor_ms"] = round(result["cpu_ms"]["median"] - cpu_floor, 2) if cpu_floor is not None else None
        result["x_floor"] = b.ratio(result["wall_ms"]["median"], floor)
    out: Dict[str, Any] = {"commands": results}
    out["importtime_trainenv"] = b.importtime(python, TRAINENV_CODE, env, 15)
    modules = b.loaded_modules(python, TRAINENV_CODE, env)
    floor_modules = b.loaded_modules(python, "pass", env)
    out["modules_loaded_beyond_floor"] = len(set(modules) - set(floor_modules))
    out["heavy_imported"] = {name: name in modules for name in HEAVY}
    if sm_python:
        out["importtime_sagemaker"] = b.importtime(sm_python, SAGEMAKER_IMPORT, sm_env, 15)
        sm_modules = b.loaded_modules(sm_python, SAGEMAKER_IMPORT, sm_env)
        sm_floor_modules = b.loaded_modules(sm_python, "pass", sm_env)
        out["sagemaker_modules_loaded_beyond_floor"] = len(set(sm_modules) - set(sm_floor_modules))
    return out


# -- (b) to_env_vars() at scale --------------------------------------------------------------------

SCALE_HOSTS, SCALE_CHANNELS, SCALE_HPS = 1000, 100, 1000

_SCALE_CHILD = textwrap.dedent(
    """
    import json, os, statistics, sys, time
    side, reps = sys.argv[1], int(sys.argv[2])

    def measure(call):
        for _ in range(3):
            call()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times), min(times)

    def sizes(variables):
        total = sum(len(k.encode()) + len(str(v).encode()) + 2 for k, v in variables.items())
        name = max(variables, key=lambda k: len(str(variables[k]).encode()))
        return {"count": len(variables), "total_bytes": total, "largest": name,
                "largest_bytes": len(str(variables[name]).encode()),
                "over_128KiB": sum(1 for v in variables.values() if len(str(v).encode()) + 64 > 131072),
                "omitted": json.loads(variables.get("TRAINENV_OMITTED", "[]"))}

    if side == "trainenv":
        import trainenv
        from trainenv.exports import to_env_vars
        start = time.perf_counter()
        env = trainenv.training_env()
        build = (time.perf_counter() - start) * 1000
        out = {"build_ms": build}
        for label, compat in (("default", None), ("all", ("pai", "sagemaker", "vertex"))):
            call = (lambda: to_env_vars(env)) if compat is None else (lambda c=compat: to_env_vars(env, c))
            median, low = measure(call)
            out[label] = dict(sizes(call()), median_ms=median, min_ms=low)
    else:
        from sagemaker_training import environment
        start = time.perf_counter()
        env = environment.Environment()
        build = (time.perf_counter() - start) * 1000
        median, low = measure(env.to_env_vars)
        out = {"build_ms": build, "default": dict(sizes(env.to_env_vars()), median_ms=median, min_ms=low)}
    print(json.dumps(out))
    """
)


def scale_inputs() -> tuple:
    hosts = [f"algo-{i}" for i in range(1, SCALE_HOSTS + 1)]
    resource_config = {
        "current_host": "algo-1", "hosts": hosts, "current_instance_type": "ml.p4d.24xlarge",
        "current_group_name": "homogeneousCluster",
        "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": "ml.p4d.24xlarge",
                             "hosts": hosts}],
        "network_interface_name": "eth0",
    }
    kinds = ("0.001", "128", "true", "[1, 2, 3]", "\"adamw\"", "{\"beta1\": 0.9, \"beta2\": 0.999}")
    hyperparameters = {f"param_{i:04d}": kinds[i % len(kinds)] for i in range(SCALE_HPS)}
    channels = {f"channel_{i:03d}": {"ContentType": "application/x-parquet", "TrainingInputMode": "File",
                                     "S3DistributionType": "ShardedByS3Key"} for i in range(SCALE_CHANNELS)}
    return resource_config, hyperparameters, channels


def part_b(python: str, sm_python: Optional[str], work: Path) -> Dict[str, Any]:
    resource_config, hyperparameters, channels = scale_inputs()
    out: Dict[str, Any] = {"hosts": SCALE_HOSTS, "channels": SCALE_CHANNELS, "hyperparameters": SCALE_HPS}
    sides = [("trainenv", python, work / "scale_ml", "TRAINENV_BASE_DIR")]
    if sm_python:
        sides.append(("sagemaker", sm_python, work / "scale_opt_ml", "SAGEMAKER_BASE_DIR"))
    for side, interpreter, base, variable in sides:
        config = base / "input" / "config"
        b.write_json(config / "hyperparameters.json", hyperparameters)
        b.write_json(config / "inputdataconfig.json", channels)
        b.write_json(config / "resourceconfig.json", resource_config)
        for channel in channels:
            (base / "input" / "data" / channel).mkdir(parents=True, exist_ok=True)
        (base / ("usercode" if side == "trainenv" else "code")).mkdir(parents=True, exist_ok=True)
        env = b.base_env(**{variable: str(base)})
        if side == "sagemaker":
            env = b.sagemaker_env(base, "train.py")
        result = subprocess.run([interpreter, "-c", _SCALE_CHILD, side, "20"], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            b.log(f"to_env_vars at scale ({side}) failed:\n{result.stderr[-3000:]}")
            out[side] = {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
            continue
        out[side] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# -- report ------------------------------------------------------------------------------------------

def main() -> None:
    parser = b.arg_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    runs, warmup = args.runs or 30, args.warmup or 3
    python = b.trainenv_python(args.python)
    sm_python, sm_status = b.sagemaker_venv(python, args.no_sagemaker)
    info = b.machine(python)
    work = b.scratch("bench-startup-")
    try:
        a = part_a(python, sm_python, runs, warmup, work)
        scale = part_b(python, sm_python, work)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    info["busy_after_pct"] = b.cpu_busy()
    commands = a["commands"]
    trainenv_over = commands["trainenv: import + training_env()"]["over_floor_ms"]
    in_job_over = commands["trainenv: same, in a job (TRAINENV_ENV_FILE)"]["over_floor_ms"]
    sm_env_over = commands.get("sagemaker: import + Environment()", {}).get("over_floor_ms")
    tv = scale.get("trainenv", {})
    goals = [
        b.goal("import trainenv + training_env() in a job (loads the snapshot) over python -c pass", in_job_over, 8, "ms",
               "import json alone is ~7 ms"),
        b.goal("import trainenv + training_env() outside a job (builds the snapshot) over python -c pass", trainenv_over, 15, "ms",
               f"sagemaker import + Environment(): {sm_env_over} ms" if sm_env_over is not None else None),
        b.goal(f"to_env_vars() at {SCALE_HOSTS} hosts x {SCALE_CHANNELS} channels x {SCALE_HPS} hps",
               tv.get("default", {}).get("median_ms"), 100, "ms"),
        b.goal("heavy modules imported by training_env() (click, yaml, psutil, pynvml)",
               float(sum(a["heavy_imported"][m] for m in ("click", "yaml", "psutil", "pynvml"))), 0, "modules"),
    ]
    report = {"benchmark": "startup", "machine": info, "sagemaker": sm_status, "runs": runs, "warmup": warmup,
              "import": a, "to_env_vars_at_scale": scale, "goals": goals}
    b.emit(report, args.json, render(report))


def render(report: Dict[str, Any]) -> str:
    a, scale = report["import"], report["to_env_vars_at_scale"]
    rows = []
    for name, r in a["commands"].items():
        rows.append([name, r["wall_ms"]["median"], r["wall_ms"]["min"], r["over_floor_ms"], r["x_floor"],
                     r["cpu_ms"]["median"], r["cpu_over_floor_ms"]])
    commands = a["commands"]
    lines = [
        "bench_startup", b.machine_text(report["machine"]),
        f"sagemaker-training {b.SAGEMAKER_VERSION}: {report['sagemaker']}",
        "",
        f"(a) fresh interpreter, {report['runs']} interleaved runs each after {report['warmup']} warm-up (ms)",
        b.table(["command", "median", "min", "over floor", "x floor", "cpu", "cpu over floor"], rows),
    ]
    sm_over = commands.get("sagemaker: import + Environment()", {}).get("over_floor_ms")
    te_over = commands["trainenv: import + training_env()"]["over_floor_ms"]
    if sm_over is not None and te_over > 0:
        lines.append(f"ratio: sagemaker's import + Environment() costs {sm_over / te_over:.1f}x trainenv's "
                     f"import + training_env() ({sm_over:.1f} vs {te_over:.1f} ms over the floor)")
    it = a["importtime_trainenv"]
    lines += ["", f"-X importtime, trainenv import + training_env(), beyond `-c pass` (median of 15): "
                  f"{it['total_ms']:.1f} ms (min {it['min_ms']:.1f}); {a['modules_loaded_beyond_floor']} modules",
              "  top (cumulative ms, biggest child): " + b.importtime_text(it)]
    if "importtime_sagemaker" in a:
        st = a["importtime_sagemaker"]
        lines += [f"-X importtime, import sagemaker_training.environment: {st['total_ms']:.1f} ms "
                  f"(min {st['min_ms']:.1f}); {a['sagemaker_modules_loaded_beyond_floor']} modules",
                  "  top (cumulative ms, biggest child): " + b.importtime_text(st)]
    heavy = a["heavy_imported"]
    lines.append("heavy modules after training_env(): " + ", ".join(
        f"{name} {'IMPORTED' if loaded else 'not imported'}" for name, loaded in heavy.items()))
    lines += ["", f"(b) to_env_vars() for {scale['hosts']} hosts x {scale['channels']} channels x "
                  f"{scale['hyperparameters']} hyperparameters (in-process, median of 20 calls)"]
    rows = []
    for side in ("trainenv", "sagemaker"):
        data = scale.get(side)
        if not data:
            continue
        if "error" in data:
            rows.append([side, "error: " + data["error"][:60], None, None, None, None, None])
            continue
        for label, r in data.items():
            if not isinstance(r, dict):
                continue
            what = f"{side} to_env_vars({'' if label == 'default' else 'pai+sagemaker+vertex'})"
            rows.append([what, r["median_ms"], r["count"], r["total_bytes"], f"{r['largest']} ({r['largest_bytes']} B)",
                         r["over_128KiB"], len(r.get("omitted", []))])
    lines.append(b.table(["call", "median ms", "vars", "total bytes", "largest value", ">128KiB", "omitted"], rows))
    te_ms = scale.get("trainenv", {}).get("default", {}).get("median_ms")
    sm_ms = scale.get("sagemaker", {}).get("default", {}).get("median_ms")
    if te_ms and sm_ms:
        lines.append(f"ratio: sagemaker / trainenv to_env_vars() = {sm_ms / te_ms:.2f}")
    builds = ", ".join(f"{s} {scale[s]['build_ms']:.0f} ms" for s in ("trainenv", "sagemaker") if "build_ms" in scale.get(s, {}))
    if builds:
        lines.append(f"building the snapshot from the tree (first call in the process): {builds}")
    lines += ["", "goals:", b.goals_text(report["goals"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
