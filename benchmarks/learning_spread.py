"""The spread the learning tests' bars rely on: every test marked `learning`, rerun at several seeds and under
each CPU kernel path torch can take here, with the statistics each test asserts (tests/conftest.py
`record_learning`) collected into one table.

A learning test's verdict must hold on any correct machine (CONTRIBUTING.md, "Tests that learn"). A floating-point
trajectory differs by kernel path (AVX512, AVX2, default) and by seed, so each bar is read against the spread
of its statistic over both: the table gives, per statistic, its values, mean, standard deviation, the worst run,
and the margin of the mean over the bar in standard deviations. A run that fails is a row too (its values were
recorded before the assertion).

    python benchmarks/learning_spread.py [--seeds 0 1 2] [--paths unset avx2 default] [--jobs 2] [-- pytest args]
    python benchmarks/learning_spread.py --runs 2:unset 0:default --add earlier.json   (chosen runs, joined)
    (e.g. -- -k "not rl_raises_reward"; PRISM_SLOW=1 in the environment adds the README demo, ~10 min a run)
Writes benchmarks/results/learning-spread.json and .md. Each run is one pytest process with
PRISM_LEARNING_SEED and ATEN_CPU_CAPABILITY set; --jobs runs that many at once (the verdicts do not depend
on load, only the wall time does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_one(seed: int, path: str, pytest_args: list[str], record: Path) -> dict:
    """One pytest run of the learning tests at this seed and kernel path; returns its outcome."""
    env = dict(os.environ, PRISM_LEARNING_SEED=str(seed), PRISM_LEARNING_RECORD=str(record))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if path != "unset":
        env["ATEN_CPU_CAPABILITY"] = path
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "learning", *pytest_args]   # -q: addopts
    started = datetime.datetime.now(datetime.timezone.utc)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = record.with_suffix(".log")
    log.write_text(proc.stdout + proc.stderr)   # copied out with --keep-logs
    tail = [line.strip("= ") for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)][-1:]
    tail = tail or [f"no pytest summary; stderr: {proc.stderr.strip()[-300:]}"]
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    print(f"seed {seed}, kernels {path}: exit {proc.returncode}; {tail[0]}", flush=True)
    return {"seed": seed, "kernels": path, "exit": proc.returncode, "summary": tail[0], "failed": failed,
            "started": started.isoformat(timespec="seconds")}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (test, statistic): values by run, mean, sd, the worst run against the bar, margin in sd."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["test"], row["name"]), []).append(row)
    table = []
    for (test, name), runs in sorted(groups.items()):
        values = [r["value"] for r in runs]
        bar, above = runs[0]["bar"], runs[0]["above"]
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        worst = min(values) if above else max(values)
        passes = [v >= bar if above else v <= bar for v in values]   # the test's own assertion decides strictness
        spread = sd > 1e-6 * max(1.0, abs(mean))   # float noise in identical runs is no spread
        margin = (mean - bar if above else bar - mean) / sd if spread else None
        table.append({"test": test, "statistic": name, "bar": bar, "direction": ">=" if above else "<=",
                      "n": len(values), "mean": mean, "sd": sd, "worst": worst, "all_pass": all(passes),
                      "margin_sd": margin,
                      "runs": [{"seed": r["seed"], "kernels": r["kernels"], "capability": r["capability"],
                                "value": r["value"]} for r in runs]})
    return table


def markdown(result: dict) -> str:
    args = " ".join(result["pytest_args"])
    lines = [f"# The learning tests' spread ({result['date']}, {result['machine']})", "",
             f"Seeds {result['seeds']} x kernel paths {result['paths']}; pytest args `{args}`.",
             "Margin: (mean - bar) / sd, in the bar's direction. A statistic named `reported` is recorded, not "
             "asserted.", "",
             "| test | statistic | bar | n | mean | sd | worst | margin (sd) | all pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["table"]:
        margin = "-" if row["margin_sd"] is None else f"{row['margin_sd']:.1f}"
        lines.append(f"| {row['test'].split('::')[-1]} | {row['statistic']} | {row['direction']} {row['bar']:g} | "
                     f"{row['n']} | {row['mean']:.3f} | {row['sd']:.3f} | {row['worst']:.3f} | {margin} | "
                     f"{'yes' if row['all_pass'] else 'NO'} |")
    lines += ["", "Runs:", ""] + [f"- seed {r['seed']}, {r['kernels']}: exit {r['exit']}, {r['summary']}"
                                   + (f"; failed {r['failed']}" if r["failed"] else "") for r in result["runs"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--paths", nargs="+", default=["unset", "avx2", "default"])
    parser.add_argument("--runs", nargs="*", default=[], help="SEED:PATH pairs instead of seeds x paths")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "learning-spread"))
    parser.add_argument("--keep-logs", default="", help="a folder to keep each run's pytest output in")
    parser.add_argument("--add", nargs="*", default=[], help="earlier results (JSON) whose runs join this table")
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(seed, path) for path in args.paths for seed in args.seeds]
        if args.runs:
            jobs = [(int(seed), path) for seed, path in (r.split(":") for r in args.runs)]
            args.seeds, args.paths = sorted({s for s, _ in jobs}), list(dict.fromkeys(p for _, p in jobs))
        records = {job: Path(tmp) / f"{job[0]}-{job[1]}.jsonl" for job in jobs}
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda job: run_one(*job, pytest_args, records[job]), jobs))
        rows = [json.loads(line) for job in jobs if records[job].exists()
                for line in records[job].read_text().splitlines()]
        if args.keep_logs:
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for job in jobs:
                log = records[job].with_suffix(".log")
                Path(args.keep_logs, f"learning-{job[0]}-{job[1]}.log").write_text(log.read_text())
    for earlier in map(lambda p: json.loads(Path(p).read_text()), args.add):
        runs = earlier["runs"] + runs
        rows += [{"test": t["test"], "name": t["statistic"], "bar": t["bar"],
                  "above": t["direction"].startswith(">"), **r} for t in earlier["table"] for r in t["runs"]]
        args.seeds = sorted(set(args.seeds) | set(earlier["seeds"]))
        args.paths = list(dict.fromkeys(earlier["paths"] + args.paths))
    import torch

    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"torch best kernels {torch.backends.cpu.get_cpu_capability()}", "load_average": os.getloadavg(),
              "seeds": args.seeds, "paths": args.paths, "pytest_args": pytest_args, "runs": runs,
              "table": summarize(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
