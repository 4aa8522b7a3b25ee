"""Log throughput: a job printing 1,000,000 lines, run directly vs under ``trainenv train``.

Usage::

    python benchmarks/bench_logs.py               # tables; about 2 min on 2 cores
    python benchmarks/bench_logs.py --json
    python benchmarks/bench_logs.py --lines 200000 --runs 5
    python benchmarks/bench_logs.py --only long-line --long-line-mb 200

The entry point prints ``step <i> loss 0.<n>`` lines with ``print()``, to stdout or to
stderr. Every command writes to regular files (truncated each run; ``--target devnull``: to
``/dev/null`` in the timed runs), and the output is checked once before timing: all lines
arrive, in order, prefixed where asked.

Compared, interleaved, each against the direct run of the same script with the same
environment the job gets under trainenv (``PYTHONUNBUFFERED=1``, as trainenv sets it for every job):

* stdout: trainenv hands the job its own stdout (no pipe), so only the launch cost shows;
* stderr: trainenv reads the job's stderr through a pipe to keep the last 64 KiB for the
  failure report and copies it on unchanged;
* ``trainenv train --log-prefix``: both streams through pipes, split into lines, each line
  prefixed with ``[host:rank] ``.

A second table: one **over-long line** (``--long-line-mb``, default 200 MB, written in 64 KiB
blocks with no newline), run directly and under ``trainenv train --log-prefix``, which sends it
on in 64 KiB pieces (the second and later marked ``[host:rank]+ ``). It reports throughput,
the ratio to the direct run and the launcher's peak RSS (``VmHWM`` of the job's parent, read by
the job as it ends): time must grow linearly with the line and memory must not grow at all.
``--only long-line`` runs just this table.

Goal: every trainenv row ≤ 1.1× its direct run. One more row, for information: the same
script directly *without* ``PYTHONUNBUFFERED`` (block-buffered stdout), which shows what the
contract's unbuffered output costs a print-heavy job. sagemaker's ``train`` is not run here:
by default it hands the job its own stdout and stderr, so it has no streaming cost; its
``capture_error=True`` path is quadratic (40,000 lines took 13.4 s when measured on this machine).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import _bench as b

LINES_SCRIPT = """\
import os, sys
out = sys.stderr if os.environ.get("BENCH_STREAM") == "stderr" else sys.stdout
for i in range(int(os.environ["BENCH_LINES"])):
    print(f"step {i} loss 0.{i % 997:03d}", file=out)
out.flush()
times = os.times()
with open(os.environ["BENCH_CPU_FILE"], "a") as handle:  # the job's own CPU, one line a run
    handle.write(f"{times.user + times.system}\\n")
"""


LONG_LINE_SCRIPT = """\
import os, sys
block = b"x" * 65536
out = sys.stdout.buffer
for _ in range(int(os.environ["BENCH_BLOCKS"])):
    out.write(block)
out.write(b"\\n")
out.flush()
if os.environ.get("BENCH_RSS_FILE"):  # under trainenv: the launcher's peak RSS so far, in KiB
    with open(f"/proc/{os.getppid()}/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_RSS_FILE"], "a") as handle:
        handle.write(peak + "\\n")
"""


def verify_long_line(path: str, size: int, prefix: str) -> Optional[str]:
    """None if ``path`` holds the line as prefixed pieces of at most 64 KiB adding up to ``size``."""
    first, more = prefix.encode(), prefix[:-1].encode() + b"+ "
    total = pieces = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.startswith(more):
                body = raw[len(more):-1]
            elif raw.startswith(first) and pieces == 0:
                body = raw[len(first):-1]
            else:
                continue  # the launcher's own lines
            if len(body) > 65536 or body.strip(b"x"):
                return f"piece {pieces}: {len(body)} bytes, {body[:40]!r}"
            total += len(body)
            pieces += 1
    return None if total == size else f"{total} bytes in {pieces} pieces, want {size}"


def verify(path: str, lines: int, prefix: Optional[str]) -> Optional[str]:
    """None if ``path`` holds every job line in order (extra launcher lines allowed)."""
    expected = 0
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if prefix is not None:
                if line.startswith(prefix):
                    line = line[len(prefix):]
                elif line.startswith("step "):
                    return f"a job line without the prefix {prefix!r}: {line[:80]!r}"
                else:
                    continue  # the launcher's own lines are not prefixed
            if not line.startswith("step "):
                continue
            want = f"step {expected} loss 0.{expected % 997:03d}"
            if line != want:
                return f"line {expected}: got {line[:80]!r}, want {want!r}"
            expected += 1
    return None if expected == lines else f"{expected} job lines, want {lines}"


def main() -> None:
    parser = b.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines the job prints (default 1,000,000)")
    parser.add_argument("--target", choices=("file", "devnull"), default="file",
                        help="where the output goes in the timed runs (the check run always writes files)")
    parser.add_argument("--long-line-mb", type=int, default=200, help="size of the over-long line (default 200 MB)")
    parser.add_argument("--only", choices=("lines", "long-line"), default=None, help="run one table only")
    args = parser.parse_args()
    runs, warmup = args.runs or 3, args.warmup or 1  # the checked run is the warm-up
    python = b.trainenv_python(args.python)
    info = b.machine(python)
    work = b.scratch("bench-logs-")
    report: Dict[str, Any] = {"results": {}, "goals": []}
    try:
        if args.only != "long-line":
            report = measure(python, work, args.lines, runs, warmup, args.target)
        if args.only != "lines":
            report["long_line"] = measure_long_line(python, work, args.long_line_mb, runs)
            report["goals"] += report["long_line"]["goals"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["busy_after_pct"] = b.cpu_busy()
    report.update({"benchmark": "logs", "machine": info, "runs": runs, "warmup": warmup})
    b.emit(report, args.json, render(report))


def measure(python: str, work: Path, lines: int, runs: int, warmup: int, target: str) -> Dict[str, Any]:
    tree = b.make_trainenv_tree(work / "ml", {"lines.py": LINES_SCRIPT}, hyperparameters={})
    code_dir = str(tree / "usercode")
    out, err = str(work / "stdout.txt"), str(work / "stderr.txt")
    trainenv = [str(Path(python).parent / "trainenv"), "train"]
    host = _current_host(python, tree)
    prefix = f"[{host}:0] "

    cpu_files: List[str] = []

    def cpu_file() -> str:
        cpu_files.append(str(work / f"cpu-{len(cpu_files)}.txt"))
        return cpu_files[-1]

    def direct_env(stream: str, unbuffered: bool = True) -> Dict[str, str]:
        env = b.base_env(BENCH_LINES=str(lines), BENCH_STREAM=stream, PYTHONPATH=code_dir, BENCH_CPU_FILE=cpu_file())
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"
        return env

    def trainenv_env(stream: str) -> Dict[str, str]:
        return b.base_env(BENCH_LINES=str(lines), BENCH_STREAM=stream, TRAINENV_BASE_DIR=str(tree),
                          TRAINENV_ENTRY_POINT="lines.py", BENCH_CPU_FILE=cpu_file())

    direct = [python, f"{code_dir}/lines.py"]
    cases = [
        # (command, file to check, expected prefix, direct baseline's name)
        (b.Command("stdout: direct", direct, direct_env("stdout"), code_dir, out, err), out, None, None),
        (b.Command("stdout: trainenv train", trainenv, trainenv_env("stdout"), None, out, err), out, None, "stdout: direct"),
        (b.Command("stdout: trainenv train --log-prefix", trainenv + ["--log-prefix"], trainenv_env("stdout"), None, out, err),
         out, prefix, "stdout: direct"),
        (b.Command("stderr: direct", direct, direct_env("stderr"), code_dir, out, err), err, None, None),
        (b.Command("stderr: trainenv train (piped, tail kept)", trainenv, trainenv_env("stderr"), None, out, err),
         err, None, "stderr: direct"),
        (b.Command("stderr: trainenv train --log-prefix", trainenv + ["--log-prefix"], trainenv_env("stderr"), None, out, err),
         err, prefix, "stderr: direct"),
        (b.Command("stdout: direct, block-buffered (no PYTHONUNBUFFERED)", direct, direct_env("stdout", False), code_dir, out, err),
         out, None, "stdout: direct"),
    ]
    for cmd, path, expected_prefix, _ in cases:
        wall, _, code = b.run_once(cmd)
        problem = f"exit status {code}" if code != 0 else verify(path, lines, expected_prefix)
        if problem:
            b.log(f"[{cmd.name}] output check failed: {problem}\n{Path(err).read_text(errors='replace')[-2000:]}")
            raise SystemExit(1)
        b.log(f"  checked {cmd.name}: {lines} lines in {wall:.1f} s")
    commands = [case[0] for case in cases]
    for cmd in commands:
        if target == "devnull":
            cmd.stdout = cmd.stderr = None
        else:
            # Untimed: flush the previous run's 20+ MB of dirty pages, so that writeback
            # (ext4 starts it at close after a truncate) does not land in the next run.
            cmd.before = os.sync
    b.interleaved(commands, runs, warmup, checked=True)
    results: Dict[str, Any] = {}
    for cmd, _, _, baseline in cases:
        result = b.command_result(cmd)
        result["wall_s"] = round(result["wall_ms"]["median"] / 1000, 3)
        result["baseline"] = baseline
        # The launcher's own CPU: the run's CPU (launcher + job, from wait4) minus what the
        # job reported for itself; robust where wall time on a shared VM is not.
        job_cpu = [float(x) for x in Path(cmd.env["BENCH_CPU_FILE"]).read_text().split()][-runs:]
        result["launcher_cpu_ms"] = b.summary([max(0.0, total - job) for total, job in zip(cmd.cpu, job_cpu)])
        results[cmd.name] = result
    for result in results.values():
        base = results[result["baseline"]] if result["baseline"] else None
        result["x_direct"] = b.ratio(result["wall_ms"]["median"], base["wall_ms"]["median"]) if base else None
        result["x_direct_by_min"] = b.ratio(result["wall_ms"]["min"], base["wall_ms"]["min"]) if base else None
        result["cpu_x_direct"] = b.ratio(result["cpu_ms"]["median"], base["cpu_ms"]["median"]) if base else None
    goals: List[Dict[str, Any]] = []
    for name, result in results.items():
        if name.startswith(("stdout: trainenv", "stderr: trainenv")):
            goals.append(b.goal(f"{name} vs direct", result["x_direct"], 1.1, "x"))
    return {"lines": lines, "target": target, "prefix": prefix, "results": results, "goals": goals}


def measure_long_line(python: str, work: Path, megabytes: int, runs: int) -> Dict[str, Any]:
    """One line of ``megabytes`` MB: direct vs ``trainenv train --log-prefix``, both to a file."""
    tree = b.make_trainenv_tree(work / "ml-long", {"long.py": LONG_LINE_SCRIPT}, hyperparameters={})
    code_dir = str(tree / "usercode")
    blocks = megabytes * 1_000_000 // 65536
    size = blocks * 65536
    out, err, rss_file = str(work / "long-out.txt"), str(work / "long-err.txt"), str(work / "rss.txt")
    prefix = f"[{_current_host(python, tree)}:0] "
    direct = b.Command("long line: direct", [python, f"{code_dir}/long.py"],
                       b.base_env(BENCH_BLOCKS=str(blocks), PYTHONUNBUFFERED="1", PYTHONPATH=code_dir), code_dir, out, err)
    trainenv = [str(Path(python).parent / "trainenv"), "train", "--log-prefix"]

    def launched_env(count: int) -> Dict[str, str]:
        return b.base_env(BENCH_BLOCKS=str(count), BENCH_RSS_FILE=rss_file, TRAINENV_BASE_DIR=str(tree),
                          TRAINENV_ENTRY_POINT="long.py")

    launched = b.Command("long line: trainenv train --log-prefix", trainenv, launched_env(blocks), None, out, err)
    quarter = b.Command("a quarter of the line: trainenv train --log-prefix", trainenv, launched_env(blocks // 4), None, out, err)
    wall, _, code = b.run_once(launched)
    problem = f"exit status {code}" if code != 0 else verify_long_line(out, size, prefix)
    if problem:
        b.log(f"[{launched.name}] output check failed: {problem}\n{Path(err).read_text(errors='replace')[-2000:]}")
        raise SystemExit(1)
    b.log(f"  checked {launched.name}: {size:,} bytes in {wall:.1f} s")
    commands = (direct, launched, quarter)
    for cmd in commands:
        cmd.before = os.sync
    b.interleaved(commands, runs, 1, checked=True)
    peaks = [int(x) for x in Path(rss_file).read_text().split()]
    results = {cmd.name: b.command_result(cmd) for cmd in commands}
    for cmd in commands:
        share = 4 if cmd is quarter else 1
        results[cmd.name]["mb_per_s"] = round(size / share / 1e6 / (results[cmd.name]["wall_ms"]["median"] / 1000), 1)
    ratio = b.ratio(results[launched.name]["wall_ms"]["median"], results[direct.name]["wall_ms"]["median"])
    growth = b.ratio(results[launched.name]["wall_ms"]["median"], results[quarter.name]["wall_ms"]["median"])
    peak_mb = round(max(peaks) / 1024, 1)
    # No ratio goal against the direct run: writing a cached file runs at memory speed, so
    # any pipe in between shows; what matters is linear time and flat memory.
    goals = [b.goal("long line: 4x the line, time (linear: 4x)", growth, 4.4, "x"),
             b.goal("long line: launcher peak RSS", peak_mb, 25, " MB")]
    return {"bytes": size, "prefix": prefix, "results": results, "x_direct": ratio, "x_quarter": growth,
            "launcher_peak_rss_mb": peak_mb, "goals": goals}


def _current_host(python: str, tree: Path) -> str:
    import json
    import subprocess

    code = "import json, trainenv; print(json.dumps(trainenv.training_env().current_host))"
    result = subprocess.run([python, "-c", code], env=b.base_env(TRAINENV_BASE_DIR=str(tree)),
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def render(report: Dict[str, Any]) -> str:
    lines = ["bench_logs", b.machine_text(report["machine"])]
    if report["results"]:
        lines += render_lines(report)
    if "long_line" in report:
        long = report["long_line"]
        lines += ["", f"one line of {long['bytes']:,} bytes (no newline), to a file; {report['runs']} interleaved runs"]
        rows = [[name, r["wall_ms"]["median"] / 1000, r["wall_ms"]["min"] / 1000, r["mb_per_s"]]
                for name, r in long["results"].items()]
        lines.append(b.table(["command", "median s", "min s", "MB/s"], rows))
        lines.append(f"trainenv x direct: {long['x_direct']}; x its quarter-size run: {long['x_quarter']}; "
                     f"launcher peak RSS: {long['launcher_peak_rss_mb']} MB")
    lines += ["", "goals:", b.goals_text(report["goals"])]
    return "\n".join(lines)


def render_lines(report: Dict[str, Any]) -> List[str]:
    lines = ["",
             f"{report['lines']:,} lines printed by the job to {'a file' if report['target'] == 'file' else '/dev/null'}; "
             f"{report['runs']} interleaved runs after "
             f"{report['warmup']} warm-up (s; cpu = launcher + job; launcher cpu = cpu minus what the job reports)"]
    rows = []
    for name, r in report["results"].items():
        launcher = r["launcher_cpu_ms"]["median"] / 1000 if r["baseline"] else None
        rows.append([name, r["wall_ms"]["median"] / 1000, r["wall_ms"]["min"] / 1000, r["cpu_ms"]["median"] / 1000,
                     launcher, r["x_direct"], r["x_direct_by_min"], r["cpu_x_direct"]])
    lines.append(b.table(["command", "median s", "min s", "cpu s", "launcher cpu s", "x direct", "(by min)", "(cpu)"], rows))
    spreads = []
    for name in ("stdout: direct", "stderr: direct"):
        wall = report["results"][name]["wall_ms"]
        spreads.append(f"{name.split(':')[0]} {100 * (wall['max'] / wall['min'] - 1):.0f} %")
    lines.append("run-to-run spread of the direct runs (max/min - 1): " + ", ".join(spreads)
                 + "; ratios closer to 1.0 than that cannot be told apart")
    return lines


if __name__ == "__main__":
    main()
