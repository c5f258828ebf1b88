"""Convergence benchmark: students of the trained demo teacher, trained from different initializations.

Every arm of a student shape trains with the same data order, noise, optimizer (AdamW), schedule (warmup, cosine)
and number of steps; only the initialization (and, for random init, the learning rate of a small sweep) differs.
See `projection/convergence.py` for the columns.

    python benchmarks/bench_convergence.py            # the full grid (40 runs, about 70 min on 2 cores, 2 workers)
    python benchmarks/bench_convergence.py --report   # tables (markdown) and assets/convergence.png from results

Results go to benchmarks/results/convergence.jsonl, one line per finished run; a rerun skips finished runs.
Each worker runs torch on one thread, so the numbers do not depend on the machine's core count.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from projection.demo import convergence as cv, digits, teacher as dt  # noqa: E402
from projection.demo.training import TrainConfig  # noqa: E402
from projection.function.calibration import Calibration  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "convergence.jsonl"
PLOT = ROOT / "assets" / "convergence.png"
TRAINING = TrainConfig(steps=1600, batch=64, lr=1e-3, warmup=50, eval_every=50, val_draws=2)
SAMPLER = dt.Sampler(per_class=20)  # 200 samples, 20 Euler steps, no guidance
HEADLINE = "half width, half depth (64 x 4 blocks)"
SHAPES = {
    HEADLINE: {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4},
    "depth only (128 x 4 blocks)": {"num_layers": 4},
    "width only (64 x 8 blocks)": {"dim": 64, "num_heads": 2, "ffn_dim": 256},
}
SWEEP = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)  # random init's rates: the sweep grew until its best was inside it
PROJECTED_SWEEP = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)  # the default strategy's rates; every projected arm uses its best
FIRST = {"width": "first", "heads": "first", "head_dim": "first", "ffn": "first"}
ACTIVATION = {"width": "activation", "heads": "activation", "head_dim": "activation", "ffn": "activation"}
CALIBRATION = 256  # training latents that activation choices rank on (the validation split stays unseen)
ARMS = {  # name -> strategy fields
    "default": {},
    "width: svd-per-matrix (the seeds' method)": {"width": "svd-per-matrix"},
    "naive truncation (first everywhere)": {**FIRST, "layers": "first"},
    "layers: first": {"layers": "first"},
    "layers: last": {"layers": "last"},
    "activation (width, heads, head dim, FFN)": ACTIVATION,
    "layers: influence": {"layers": "influence"},
    "activation + influence": {**ACTIVATION, "layers": "influence"},
    "fit: least-squares": {"fit": "least-squares"},
    "activation + influence + least-squares": {**ACTIVATION, "layers": "influence", "fit": "least-squares"},
    "ffn: wanda": {"ffn": "wanda"},
    "compensate: mean": {"compensate": "mean"},
    "all: activation, ffn wanda, influence, least-squares, compensate": {
        **ACTIVATION, "ffn": "wanda", "layers": "influence", "fit": "least-squares", "compensate": "mean"},
}
SEEDED = ["default", "width: svd-per-matrix (the seeds' method)", "activation + influence",
          "activation + influence + least-squares"]  # the headline rows: every seed (random init too)
DISTILLED = SEEDED  # the distillation table's rows (one seed)
ARMS_BY_SHAPE = {  # arms that differ from the default for that shape
    HEADLINE: list(ARMS),
    "depth only (128 x 4 blocks)": ["default", "layers: first", "layers: last"],
    "width only (64 x 8 blocks)": ["default", "width: svd-per-matrix (the seeds' method)", "width: first"],
}
EXTRA_ARMS = {"width: first": FIRST}


def random_arm(lr: float) -> cv.Arm:
    return cv.Arm(f"random init, lr {lr:g}", None, lr)


def arm(name: str, lr: float) -> cv.Arm:
    return cv.Arm(name, {**ARMS, **EXTRA_ARMS}[name], lr)


def run_key(run: cv.Run) -> str:
    return json.dumps([run.shape, run.objective, run.arm.name, run.arm.lr, run.seed])


_CONTEXT: dict[str, Any] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)  # a program's choice: one thread per worker, two workers on two cores
    train, val = digits.load_digits("train"), digits.load_digits("val")
    latents, context = digits.encode(train.images), digits.label_states(train.labels)
    calibration = Calibration(latents[:CALIBRATION], context[:CALIBRATION],
                              f"the first {CALIBRATION} latents of the demo's training split")
    _CONTEXT["data"] = cv.Data(latents, context, digits.encode(val.images), digits.label_states(val.labels),
                               digits.empty_states(), calibration)
    _CONTEXT["teacher"] = dt.load_teacher()
    classifier = dt.load_demo_classifier()
    _CONTEXT["score"] = lambda model: dt.prompt_accuracy_of(model, classifier, SAMPLER)


def _work(args: tuple[cv.Run, TrainConfig]) -> dict[str, Any]:
    run, training = args
    result = cv.train_run(str(dt.ASSETS / "teacher-wan"), _CONTEXT["teacher"], _CONTEXT["data"], run, training,
                          _CONTEXT["score"])
    return {**result.to_dict(), "key": run_key(run), "load_average": os.getloadavg()}


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_result(d: dict[str, Any]) -> cv.Result:
    r = d["run"]
    run = cv.Run(r["student"], cv.Arm(**r["arm"]), r["seed"], r["objective"], r["shape"])
    return cv.Result(run, d["val_loss_0"], d["error_0"], d["cosine_0"], d["history"], d["final_val_loss"],
                     d["seconds"], d["prompt_accuracy"])


def sweep(results: list[dict[str, Any]], random: bool) -> dict[float, list[float]]:
    """Final validation losses by learning rate (headline student, denoising): random init's, or the default's."""
    found: dict[float, dict[int, float]] = {}
    for d in results:
        r = d["run"]
        if (r["shape"] == HEADLINE and r["objective"] == "denoise"
                and (r["arm"]["strategy"] is None if random else r["arm"]["name"] == "default")):
            found.setdefault(r["arm"]["lr"], {})[r["seed"]] = d["final_val_loss"]
    return {lr: [by_seed[k] for k in sorted(by_seed)] for lr, by_seed in found.items()}


def finalists(results: list[dict[str, Any]]) -> list[float] | None:
    """Random init's two best rates on seed 0; they are run on seed 1 too, and the better mean wins (one seed
    can pick a rate at the edge of stability)."""
    seed0 = {d["run"]["arm"]["lr"]: d["final_val_loss"] for d in results if d["run"]["shape"] == HEADLINE
             and d["run"]["objective"] == "denoise" and d["run"]["arm"]["strategy"] is None and d["run"]["seed"] == 0}
    if not all(lr in seed0 for lr in SWEEP):
        return None
    return sorted(SWEEP, key=lambda lr: seed0[lr])[:2]


def best_lr(results: list[dict[str, Any]], random: bool) -> float | None:
    """Random init: of the two finalists, the lower mean final loss over seeds 0 and 1. The default strategy: the
    lowest final loss of its sweep on seed 0 (every projected arm then uses it). None until that is known."""
    losses = sweep(results, random)
    if random:
        best = finalists(results)
        if best is None or any(len(losses.get(lr, [])) < 2 for lr in best):
            return None
        return min(best, key=lambda lr: sum(losses[lr]) / len(losses[lr]))
    if not all(lr in losses for lr in PROJECTED_SWEEP):
        return None
    return min(PROJECTED_SWEEP, key=lambda lr: losses[lr][0])


def jobs(results: list[dict[str, Any]], seeds: int) -> tuple[list[cv.Run], list[cv.Run]]:
    """(the two learning-rate sweeps, the runs that use their best rates)."""
    now = [cv.Run(SHAPES[HEADLINE], random_arm(lr), 0, "denoise", HEADLINE) for lr in SWEEP]
    now += [cv.Run(SHAPES[HEADLINE], arm("default", lr), 0, "denoise", HEADLINE) for lr in PROJECTED_SWEEP]
    now += [cv.Run(SHAPES[HEADLINE], random_arm(lr), 1, "denoise", HEADLINE) for lr in finalists(results) or []]
    rate, projected = best_lr(results, True), best_lr(results, False)
    if rate is None or projected is None:
        return now, []
    base = random_arm(rate)
    later = [cv.Run(SHAPES[HEADLINE], base, seed, "denoise", HEADLINE) for seed in range(1, seeds)]
    later += [cv.Run(SHAPES[HEADLINE], arm(name, projected), seed, "denoise", HEADLINE)
              for seed in range(seeds) for name in ARMS_BY_SHAPE[HEADLINE] if seed == 0 or name in SEEDED]
    for shape in list(SHAPES)[1:]:
        later += [cv.Run(SHAPES[shape], a, 0, "denoise", shape)
                  for a in [base, *(arm(n, projected) for n in ARMS_BY_SHAPE[shape])]]
    later += [cv.Run(SHAPES[HEADLINE], a, 0, "distill", HEADLINE)
              for a in [base, *(arm(n, projected) for n in DISTILLED)]]
    return now, later


def chosen(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs the tables show: random init at its best rate, every projected arm at the default's best rate."""
    rate, projected = best_lr(results, True), best_lr(results, False)
    return [d for d in results if d["run"]["arm"]["lr"] == (rate if d["run"]["arm"]["strategy"] is None
                                                            else projected)]


def run_all(path: Path, training: TrainConfig, seeds: int, workers: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        for phase in range(3):  # the seed-0 sweeps, random init's finalists on seed 1, then the rest
            results = load_results(path)
            done = {d["key"] for d in results}
            todo = [r for r in jobs(results, seeds)[min(phase, 1)] if run_key(r) not in done]
            print(f"phase {phase + 1}: {len(todo)} runs", flush=True)
            for d in pool.imap_unordered(_work, [(r, training) for r in todo]):
                with path.open("a") as f:
                    f.write(json.dumps(d) + "\n")
                print(f"{d['run']['shape']:<40} {d['run']['objective']:<8} {d['run']['arm']['name']:<44} "
                      f"seed {d['run']['seed']}  error_0 {d['error_0']:.3f}  final {d['final_val_loss']:.4f}  "
                      f"acc {d['prompt_accuracy']:.2f}  {d['seconds']:.0f} s", flush=True)


def fmt(spread: dict[str, float] | None, digits_: int = 3, pct: bool = False) -> str:
    if spread is None:
        return "—"
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.{digits_}f}")
    if spread["n"] == 1:
        return f(spread["mean"])
    return f"{f(spread['mean'])} ({f(spread['min'])}–{f(spread['max'])})"


def report(path: Path, plot: Path | None) -> str:
    results = load_results(path)
    rate, projected = best_lr(results, True), best_lr(results, False)
    if rate is None or projected is None:
        return "(the learning-rate sweeps are not complete)"
    out = ["**Learning-rate sweeps** (headline student, denoising): final validation loss, seed 0 / seed 1\n",
           "| lr | " + " | ".join(f"{lr:g}" for lr in SWEEP) + " |", "|---|" + "---|" * len(SWEEP)]
    for label, is_random, rates in (("random init", True, SWEEP), ("default strategy", False, PROJECTED_SWEEP)):
        found = sweep(results, is_random)
        cell = lambda v: " / ".join(f"{x:.4f}" for x in v)  # noqa: E731  seed 0 / seed 1
        out.append(f"| {label} | " + " | ".join(f"**{cell(found[lr])}**" if lr == (rate if is_random else projected)
                                                else cell(found[lr]) if lr in found else "—" for lr in SWEEP) + " |")
    out.append(same_rate(results))
    shown = chosen(results)
    for objective in ("denoise", "distill"):
        for shape in SHAPES:
            mine = [as_result(d) for d in shown if d["run"]["shape"] == shape and d["run"]["objective"] == objective]
            if not mine:
                continue
            rows = cv.table(mine, baseline=random_arm(rate).name)
            total = mine[0].history["steps"][-1]
            what = "denoising objective" if objective == "denoise" else "distillation from the teacher"
            out.append(f"\n**{shape}, {what}** ({total} steps; the target is random init's final loss)\n")
            out.append("| init | lr | val loss, step 0 | error vs teacher, step 0 | final val loss | steps to random's "
                       "final loss | speedup | prompt accuracy | wall |")
            out.append("|---|---|---|---|---|---|---|---|---|")
            order = sorted(rows, key=lambda r: (not r["arm"].startswith("random"), r["final_val_loss"]["mean"]))
            for r in order:
                steps = ", ".join("not reached" if s is None else f"{s:.0f}" for s in r["steps_to_random"])
                speed = fmt(r["speedup"], 1) + "x" if r["speedup"] else "<1x (not reached)"
                if r["not_reached"] and r["speedup"]:
                    speed += f", {r['not_reached']} not reached"
                out.append(f"| {r['arm']} | {r['lr']:g} | {fmt(r['val_loss_0'])} | {fmt(r['error_0'])} | "
                           f"{fmt(r['final_val_loss'], 4)} | {steps} | {speed} | {fmt(r['prompt_accuracy'], pct=True)} "
                           f"| {r['seconds']['mean']:.0f} s |")
    if plot is not None:
        plot_curves(shown, plot)
    return "\n".join(out)


def same_rate(results: list[dict[str, Any]]) -> str:
    """The default's speedup over random init when both train at the same rate (seed 0): the comparison an
    untuned baseline gives, next to the tuned one above."""
    runs = {(d["run"]["arm"]["strategy"] is None, d["run"]["arm"]["lr"]): d for d in results
            if d["run"]["shape"] == HEADLINE and d["run"]["objective"] == "denoise" and d["run"]["seed"] == 0
            and (d["run"]["arm"]["strategy"] is None or d["run"]["arm"]["name"] == "default")}
    cells = []
    for lr in PROJECTED_SWEEP:
        if (True, lr) in runs and (False, lr) in runs:
            h = runs[(False, lr)]["history"]
            steps = cv.steps_to_reach(h["steps"], h["val_loss"], runs[(True, lr)]["final_val_loss"])
            cells.append(f"{h['steps'][-1] / steps:.1f}x" if steps else "<1x")
        else:
            cells.append("—")
    return ("| default's speedup over random init at the same rate | — | " + " | ".join(cells) + " | — |")


KEY_ARMS = ["default", "width: svd-per-matrix (the seeds' method)", "naive truncation (first everywhere)",
            "activation + influence", "activation + influence + least-squares"]


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Three panels: the headline student's validation loss (denoising; key arms, both seeds), every arm's loss
    relative to random init's at the same step (seed 0), and the distillation runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def runs(objective: str, seed: int | None = None) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = {}
        for d in results:
            r = d["run"]
            if r["shape"] == HEADLINE and r["objective"] == objective and (seed is None or r["seed"] == seed):
                groups.setdefault(r["arm"]["name"], []).append(d)
        return groups

    names = sorted({d["run"]["arm"]["name"] for d in results if d["run"]["shape"] == HEADLINE})
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=110)
    for ax, objective in ((axes[0], "denoise"), (axes[2], "distill")):
        for name, members in sorted(runs(objective).items()):
            if name not in KEY_ARMS and members[0]["run"]["arm"]["strategy"] is not None:
                continue
            for i, d in enumerate(sorted(members, key=lambda d: d["run"]["seed"])):
                h = d["history"]
                ax.plot(h["steps"], h["val_loss"], color=colors[name], alpha=1 if i == 0 else 0.45, lw=1.4,
                        label=name if i == 0 else None, ls="--" if d["run"]["arm"]["strategy"] is None else "-")
        ax.set(xlabel="training step", yscale="log", ylim=(0.28, 1.2),
               title=f"{'denoising' if objective == 'denoise' else 'distillation'}: validation loss")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation loss (denoising, fixed noise)")
    axes[0].legend(fontsize=7, title="svd-per-matrix starts at 146 (off the scale)", title_fontsize=7)
    seed0 = runs("denoise", 0)
    base = next((m[0] for n, m in seed0.items() if m[0]["run"]["arm"]["strategy"] is None), None)
    if base is not None:
        ref = dict(zip(base["history"]["steps"], base["history"]["val_loss"]))
        for name, members in sorted(seed0.items()):
            if members[0]["run"]["arm"]["strategy"] is None:
                continue
            h = members[0]["history"]
            axes[1].plot(h["steps"], [v / ref[s] for s, v in zip(h["steps"], h["val_loss"])], color=colors[name],
                         lw=1.2, label=name)
        axes[1].axhline(1, color="k", ls="--", lw=1)
        axes[1].set(xlabel="training step", ylim=(0.8, 1.3), ylabel="loss / random init's loss at the same step",
                    title="every init against random init (seed 0)")
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=6)
    fig.suptitle(f"Students ({HEADLINE}) of the trained demo teacher: the same data order, optimizer and steps for "
                 "every init; dashed: random init (its best rate); faint: seed 1", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TRAINING.steps)
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the headline rows (default 2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="print the tables and write the PNG only")
    args = parser.parse_args()
    if not args.report:
        started = time.time()
        print(f"machine: {platform.machine()} {dt._cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"load {os.getloadavg()}", flush=True)
        run_all(args.results, replace(TRAINING, steps=args.steps), args.seeds, args.workers)
        print(f"all runs in {time.time() - started:.0f} s, load {os.getloadavg()}", flush=True)
    print(report(args.results, PLOT))


if __name__ == "__main__":
    main()
