"""The probe (issue 24): what it costs, and whether its ranking predicts training better than the step-0 error does.

    python benchmarks/bench_probe.py --time      # `projection probe`, 4 candidates, K = 100, on the demo
    python benchmarks/bench_probe.py --rank      # the probe on the convergence benchmark's starts, against its ranking

--time runs the command as a user would (a fresh process, start-up included), first with an empty cache (the
teacher computes its targets), then again (the targets come from the cache). Target: under 60 s on the 2-core
machine.

--rank probes every start of the convergence benchmark's headline student (half width, half depth; random init, the
default and `bench_convergence.STARTS` but `layers: recoverable`, itself chosen by probes) with K = 100 on the
demo's calibration set (its held-out digits, the set a user would give), and compares three rankings of the starts
with the benchmark's (mean final validation loss of 3 seeds at each start's best rate, distilled for N = 200 and
N = 400 steps): the probe's (held-out velocity error after K steps), the step-0 error's (the same error before
training) and, for reference, the benchmark's own step-0 validation loss. Spearman's rank correlation (1: the same
order). Needs the benchmark's results (benchmarks/results/convergence_budgets.jsonl); writes
benchmarks/results/probe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results" / "probe.json"
PROBE_STEPS = 100
TIME_TARGET = 60.0


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties take their mean rank)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in order[i:j + 1]:
                out[k] = (i + j) / 2 + 1
            i = j + 1
        return out
    ra, rb = ranks(a), ranks(b)
    ma, mb = mean(ra), mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def time_probe(threads: int) -> dict[str, float]:
    """Seconds of `projection probe` with 4 candidates (random, default and two strategies), K = 100, in a fresh
    process: with an empty cache, then with the targets cached."""
    from projection.demo.folder import write_demo

    work = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    demo = write_demo(work / "demo")
    for name, text in (("activation", "width: activation\n"), ("influence", "layers: influence\n")):
        (work / f"{name}.yaml").write_text(text)
    command = [sys.executable, "-m", "projection", "probe", "--teacher", str(demo / "teacher-wan"), "--student",
               str(demo / "student-diffusers.yaml"), "--strategies", str(work / "activation.yaml"),
               str(work / "influence.yaml"), "--steps", str(PROBE_STEPS)]
    env = {**os.environ, "PROJECTION_CACHE": str(work / "cache"), "OMP_NUM_THREADS": str(threads)}
    out = {}
    for label in ("empty cache", "targets cached"):
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        out[label] = time.perf_counter() - started
        print(f"{label}: {out[label]:.1f} s\n{done.stdout}", flush=True)
    return out


def probed_starts() -> dict[str, dict]:
    """The benchmark's starts the probe ranks: every one but `layers: recoverable`, which is itself chosen by
    probes (a strategy with no projection until they ran)."""
    import bench_convergence as bc
    from projection.core.strategy import RECOVERABLE

    return {name: fields for name, fields in bc.STARTS.items() if fields.get("layers") != RECOVERABLE}


def benchmark_ranking() -> dict[str, dict[int, float]]:
    """Per start, per N in STARTS_BUDGETS: the benchmark's mean final validation loss of 3 seeds at its best rate."""
    import bench_convergence as bc

    rep = bc.Report(bc.load_results(bc.RESULTS))
    found: dict[str, dict[int, float]] = {}
    for name in (bc.RANDOM, bc.DEFAULT, *probed_starts()):
        rates = bc.RANDOM_RATES if name == bc.RANDOM else bc.PROJECTED_RATES
        for n in bc.STARTS_BUDGETS:
            _, runs = rep.chosen((bc.HEADLINE, "distill", "all", name, 0.0, n), rates)
            if len(runs) >= 3:
                found.setdefault(name, {})[n] = mean(d["final_val_loss"] for d in runs[:3])
                found[name]["val_loss_0"] = mean(d["val_loss_0"] for d in runs[:3])
    return found


def rank(threads: int) -> dict:
    import torch

    import bench_convergence as bc
    from projection.core.strategy import Strategy
    from projection.demo.teacher import ASSETS, demo_calibration
    from projection.engine.projector import Projector
    from projection.probe import ProbeConfig, candidates, probe

    torch.set_num_threads(threads)  # a program's choice
    trained, starts = benchmark_ranking(), probed_starts()
    missing = [n for n in (bc.RANDOM, bc.DEFAULT, *starts) if len(trained.get(n, {})) < 3]
    if missing:
        raise SystemExit(f"the convergence benchmark has not finished these starts: {', '.join(missing)}")
    projector = Projector.open(str(ASSETS / "teacher-wan"), {"layout": "wanlite", **bc.SHAPES[bc.HEADLINE]})
    found = candidates({name: Strategy(**fields) for name, fields in starts.items()})
    started = time.perf_counter()
    result = probe(projector, demo_calibration(), found, ProbeConfig(steps=PROBE_STEPS), "cpu",
                   cache=Path(tempfile.mkdtemp(prefix="bench-probe-cache-")),
                   progress=lambda i, n, what: print(f"[{i}/{n}] {what}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - started
    names = [o.name for o in result.outcomes]
    probe_error = [o.error for o in result.outcomes]
    step0 = [o.error_0 for o in result.outcomes]
    rows = {o.name: {"probe_error": o.error, "probe_rate": o.rate, "error_0": o.error_0,
                     **{f"loss_{n}": trained[o.name][n] for n in bc.STARTS_BUDGETS},
                     "val_loss_0": trained[o.name]["val_loss_0"]} for o in result.outcomes}
    correlation = {}
    for n in bc.STARTS_BUDGETS:
        truth = [trained[name][n] for name in names]
        correlation[n] = {"probe": spearman(probe_error, truth), "step-0 error": spearman(step0, truth),
                          "step-0 validation loss": spearman([trained[name]["val_loss_0"] for name in names], truth)}
    return {"starts": rows, "spearman": correlation, "probe_steps": PROBE_STEPS, "probe_seconds": seconds,
            "calibration": result.calibration, "threads": threads, "load_average": os.getloadavg()}


def markdown(found: dict) -> str:
    lines = ["| start | probe: error after 100 steps | step-0 error | benchmark: final val loss, N = 200 | N = 400 |",
             "|---|---|---|---|---|"]
    for name, r in sorted(found["starts"].items(), key=lambda kv: kv[1]["loss_200"]):
        lines.append(f"| {name} | {r['probe_error']:.4f} | {r['error_0']:.4f} | {r['loss_200']:.4f} | "
                     f"{r['loss_400']:.4f} |")
    lines += ["", "| ranking by | Spearman with the benchmark at N = 200 | at N = 400 |", "|---|---|---|"]
    for what in ("probe", "step-0 error", "step-0 validation loss"):
        lines.append(f"| {what} | {found['spearman'][200][what]:+.2f} | {found['spearman'][400][what]:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", action="store_true", help="time `projection probe` with 4 candidates")
    parser.add_argument("--rank", action="store_true", help="the probe's ranking against the benchmark's")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.time:
        saved["time"] = {**time_probe(args.threads), "target": TIME_TARGET, "threads": args.threads,
                         "load_average": os.getloadavg()}
    if args.rank:
        saved["rank"] = rank(args.threads)
        print(markdown(saved["rank"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
