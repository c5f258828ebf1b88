"""Convergence benchmark at the budgets users have: students of the trained demo teacher, trained for N in
{50, 100, 200, 400} steps of batch 64 (1.25-10% of the samples the teacher saw), each with its own schedule
(10% warmup, cosine to N), against random init's ladder of budgets up to 1,600 steps.

    python benchmarks/bench_convergence.py --estimate   # each group's runs and time from a few timed steps
    python benchmarks/bench_convergence.py              # the core groups (2 workers of 1 thread; resumable)
    python benchmarks/bench_convergence.py --groups starts   # the starts group (after, or beside, the core)
    python benchmarks/bench_convergence.py --report     # markdown tables and assets/convergence_budgets.png

Groups (`projection/demo/convergence.py` scores them; `projection.distill` is the distillation loss):
  headline     half width, half depth (14% of the teacher's parameters), distillation from the teacher: random
               init's ladder, the default projection, default + per-block hints; 3 seeds at each chosen rate
  denoising    the same student on Wan's denoising objective: random init's ladder and the default (2 seeds)
  hint weight  {0, 0.1, 1} at N = 200 (distillation): the weight the hints arm uses
  compression  depth only and width only, distilled, the default at N = 200 against each shape's own ladder
  data-limited the student sees a fixed 20% of the training digits (the teacher saw all), N = 200
  starts       the other strategies (`STARTS`), distilled, at N = 200 and 400: what each choice is worth, and the
               ranking the probe (`benchmarks/bench_probe.py`) is checked against
Rates: a 3-point grid per arm and budget, chosen on the mean of seeds 0 and 1 (the grids moved up one step after
the first run chose their top rates; runs at the old rates stay in the results and the rate-grid table; cells
without a grid of their own use the best of the rates they ran at). Cuts that keep the grid inside 90
minutes: the 1,600-step rung (headline only; elsewhere the ladder ends at 800 and larger equivalents are lower
bounds) and the denoising ladder's 800-step rung run one seed at the distillation 800-step rung's chosen rate, the
compression and data-limited ladders one seed at the headline's chosen rates, and prompt accuracy takes 500
samples on the headline group, 200 elsewhere.

Results go to benchmarks/results/convergence_budgets.jsonl, one line per finished run; a rerun skips finished
runs. The 1,600-step full-retraining group is read from benchmarks/results/convergence.jsonl (the earlier
benchmark's runs). Each worker runs torch on one thread, so the numbers do not depend on the machine's cores.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from projection.demo import convergence as cv, digits, teacher as dt  # noqa: E402
from projection.demo.training import TrainConfig  # noqa: E402
from projection.engine.build import count_params, random_student  # noqa: E402
from projection.function.calibration import Calibration  # noqa: E402
from projection.function.noise import validation_noise  # noqa: E402
from projection.probe.ladder import equivalent_budget  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "convergence_budgets.jsonl"
FULL_RESULTS = ROOT / "benchmarks" / "results" / "convergence.jsonl"  # the earlier 1,600-step benchmark
PLOT = ROOT / "assets" / "convergence_budgets.png"
TEACHER = str(dt.ASSETS / "teacher-wan")
BASE = TrainConfig(steps=200, batch=64, lr=1e-3, val_draws=2)  # each run: `cv.budget_config(BASE, N)`
BUDGETS = (50, 100, 200, 400)
LADDER = (50, 100, 200, 400, 800, 1600)
GRIDDED = LADDER[:-1]  # rungs with a rate grid (denoising: to 400); the rest: one seed at the distillation 800 rung's
RANDOM_RATES = (8e-3, 1.6e-2, 3.2e-2)  # moved up one step once the first grids chose their top rates
PROJECTED_RATES = (4e-3, 8e-3, 1.6e-2)
EXTEND = 2  # a grid whose best rate is its top grows by doubling that rate, at most this many times
HINT_WEIGHTS = (0.1, 1.0)  # beside 0 (the default arm), at HINT_BUDGET
HINT_BUDGET = MAP_BUDGET = 200
DATA_SHARE, DATA_SEED = 0.2, 1234  # the data-limited student's fixed share of the training digits
HEADLINE = "half width, half depth (64 x 4 blocks)"
DEPTH, WIDTH = "depth only (128 x 4 blocks)", "width only (64 x 8 blocks)"
SHAPES = {HEADLINE: {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}, DEPTH: {"num_layers": 4},
          WIDTH: {"dim": 64, "num_heads": 2, "ffn_dim": 256}}
RANDOM, DEFAULT, HINTS, UNIFORM_START = "random init", "default", "default + hints", "layers: uniform"
MAP_ARMS = ((DEPTH, DEFAULT), (DEPTH, UNIFORM_START), (WIDTH, DEFAULT), (HEADLINE, DEFAULT), (HEADLINE, UNIFORM_START))
UNIFORM = {"layers": "uniform"}  # the default until these starts chose `layers: first`
STARTS = {  # the strategies `projection` offers, each one change from the default (the last: every calibrated)
    UNIFORM_START: UNIFORM, "width: activation": {"width": "activation"},
    "layers: influence": {"layers": "influence"}, "ffn: wanda": {"ffn": "wanda"},
    "compensate: mean": {"compensate": "mean"},
    "activation + influence + least-squares": {"width": "activation", "layers": "influence", "fit": "least-squares"},
    "layers: recoverable": {"layers": "recoverable"}}
STARTS_BUDGETS = (200, 400)
# staged projection (the default strategy): depth first (128 x 4, 53% of the parameters), distilled, then width (64 x 4)
STAGED = {f"staged: 128 x 4 for {k} steps, then 64 x 4": ({"num_layers": 4}, k) for k in (50, 100)}
STAGED_BUDGET = 200
# the arms the tables show (the results also hold retired ones, run when `layers: uniform` was the default: its hints
# arm, and `layers: uniform + <change>` and `staged: ... (layers: uniform)`, the starts and staged arms as they ran then)
ARMS = {RANDOM, DEFAULT, HINTS, *STARTS, *STAGED}
LIMITED = f"{DATA_SHARE:.0%} of the digits"
CALIBRATION = 256
ACCURACY = {True: dt.Sampler(per_class=50), False: dt.Sampler(per_class=20)}  # headline group: 500 samples


# ---------------------------------------------------------------- the grid

def arm(name: str, lr: float, weight: float = 0.0) -> cv.Arm:
    if name in STAGED:
        stage, steps = STAGED[name]
        return cv.Arm(name, {}, lr, weight, stage, steps)
    return cv.Arm(name, None if name == RANDOM else STARTS.get(name, {}), lr, weight)


def run(shape: str, name: str, lr: float, steps: int, seed: int, objective: str = "distill", data: str = "all",
        weight: float = 0.0) -> cv.Run:
    return cv.Run(SHAPES[shape], arm(name, lr, weight), seed, objective, shape, steps, data)


def run_key(r: cv.Run) -> str:
    return json.dumps([r.shape, r.objective, r.data, r.arm.name, r.arm.hint_weight, r.arm.lr, r.steps, r.seed])


def headline_group(r: cv.Run) -> bool:
    return r.shape == HEADLINE and r.objective == "distill" and r.data == "all"


Cell = tuple[str, str, str, str, float, int]  # shape, objective, data, arm, hint weight, steps


def cell_of(d: dict[str, Any]) -> Cell:
    r = d["run"]
    return (r["shape"], r["objective"], r.get("data", "all"), r["arm"]["name"], r["arm"].get("hint_weight", 0.0),
            r.get("steps") or d["history"]["steps"][-1])


class Choices:
    """Finished runs' final losses by cell, rate and seed, and the rates and hint weight they choose."""

    def __init__(self, results: list[dict[str, Any]]):
        self.found: dict[Cell, dict[float, dict[int, float]]] = {}
        for d in results:
            self.found.setdefault(cell_of(d), {}).setdefault(d["run"]["arm"]["lr"], {})[d["run"]["seed"]] = \
                d["final_val_loss"]

    def losses(self, cell: Cell, rates: tuple[float, ...]) -> dict[float, list[float]]:
        by_rate = self.found.get(cell, {})
        return {lr: [by_rate.get(lr, {})[s] for s in (0, 1) if s in by_rate.get(lr, {})] for lr in rates}

    def rates(self, cell: Cell, base: tuple[float, ...]) -> tuple[float, ...]:
        """The cell's grid: `base`, doubled at the top while the best rate is the top one (a best rate at the
        grid's edge says a higher one might be better), at most EXTEND times."""
        rates = base
        for _ in range(EXTEND):
            if cv.choose_rate(self.losses(cell, rates)) != rates[-1]:
                break
            rates = (*rates, 2 * rates[-1])
        return rates

    def rate(self, cell: Cell, base: tuple[float, ...]) -> float | None:
        """The cell's chosen rate; None until every rate of its grid has run on seeds 0 and 1."""
        return cv.choose_rate(self.losses(cell, self.rates(cell, base)))

    def best_loss(self, cell: Cell, base: tuple[float, ...]) -> float | None:
        """The mean loss of seeds 0 and 1 at the cell's chosen rate; None before it is chosen."""
        lr = self.rate(cell, base)
        return None if lr is None else mean(self.losses(cell, (lr,))[lr])

    def weight(self) -> float | None:
        """The hint weight whose best rate gives the lowest mean loss at HINT_BUDGET (0: the default arm)."""
        best: dict[float, float] = {}
        for w in (0.0, *HINT_WEIGHTS):
            cell = (HEADLINE, "distill", "all", DEFAULT if w == 0 else HINTS, w, HINT_BUDGET)
            loss = self.best_loss(cell, PROJECTED_RATES)
            if loss is None:
                return None
            best[w] = loss
        return min(best, key=best.get)

    def hinted(self) -> float | None:
        """The weight the hints arm runs at: the best positive one (the report says when 0 beat it)."""
        if self.weight() is None:
            return None
        return min(HINT_WEIGHTS, key=lambda w: self.best_loss((HEADLINE, "distill", "all", HINTS, w, HINT_BUDGET),
                                                               PROJECTED_RATES))


class Assumed(Choices):
    """Every choice made (the grid's first rate, the first hint weight): the whole grid, for the estimate."""

    def __init__(self) -> None:
        super().__init__([])

    def rate(self, cell: Cell, base: tuple[float, ...]) -> float | None:
        return base[0]

    def weight(self) -> float | None:
        return HINT_WEIGHTS[0]

    def hinted(self) -> float | None:
        return HINT_WEIGHTS[0]


def grid(choices: Choices, shape: str, objective: str, name: str, budgets: tuple[int, ...],
         base: tuple[float, ...], weight: float = 0.0) -> list[cv.Run]:
    """Seeds 0 and 1 at each rate of each budget's grid (extended where its best rate is at the top)."""
    return [run(shape, name, lr, n, seed, objective, weight=weight) for n in budgets
            for lr in choices.rates((shape, objective, "all", name, weight, n), base) for seed in (0, 1)]


GROUPS = {"core": "the headline, denoising, hint weight, compression and data-limited groups (issue 23's part 1)",
          "starts": "the other strategies and staged projection (part 3)"}


def headline_rate(choices: Choices, name: str, n: int, w: float = 0.0,
                  rates: tuple[float, ...] = PROJECTED_RATES) -> float | None:
    """The chosen rate of an arm of the headline student, distilled on all the digits, at budget n."""
    return choices.rate((HEADLINE, "distill", "all", name, w, n), rates)


def jobs(choices: Choices, groups: tuple[str, ...] = tuple(GROUPS)) -> list[cv.Run]:
    """Every run of `groups` whose rate is known now: the grids, then what their choices decide."""
    return (core_jobs(choices) if "core" in groups else []) + (start_jobs(choices) if "starts" in groups else [])


def start_jobs(choices: Choices) -> list[cv.Run]:
    out = []
    for name in STARTS:
        out += grid(choices, HEADLINE, "distill", name, STARTS_BUDGETS, PROJECTED_RATES)
        out += [run(HEADLINE, name, lr, n, 2) for n in STARTS_BUDGETS
                if (lr := headline_rate(choices, name, n)) is not None]
    for name in STAGED:
        out += grid(choices, HEADLINE, "distill", name, (STAGED_BUDGET,), PROJECTED_RATES)
        lr = headline_rate(choices, name, STAGED_BUDGET)
        out += [run(HEADLINE, name, lr, STAGED_BUDGET, 2)] if lr is not None else []
    return out


def core_jobs(choices: Choices) -> list[cv.Run]:
    out = []
    for objective in ("distill", "denoise"):
        out += grid(choices, HEADLINE, objective, RANDOM, GRIDDED if objective == "distill" else GRIDDED[:-1],
                    RANDOM_RATES)
        out += grid(choices, HEADLINE, objective, DEFAULT, BUDGETS, PROJECTED_RATES)
    for w in HINT_WEIGHTS:
        out += grid(choices, HEADLINE, "distill", HINTS, (HINT_BUDGET,), PROJECTED_RATES, w)
    for n in GRIDDED:
        lr = headline_rate(choices, RANDOM, n, rates=RANDOM_RATES)
        if lr is not None:
            out.append(run(HEADLINE, RANDOM, lr, n, 2))
            out += [run(s, RANDOM, lr, n, 0) for s in (DEPTH, WIDTH)]
            out.append(run(HEADLINE, RANDOM, lr, n, 0, data=LIMITED))
            if n == GRIDDED[-1]:  # the rungs without a grid of their own
                out += [run(HEADLINE, RANDOM, lr, LADDER[-1], 0), run(HEADLINE, RANDOM, lr, n, 0, "denoise")]
    for n in BUDGETS:
        lr = headline_rate(choices, DEFAULT, n)
        if lr is not None:
            out.append(run(HEADLINE, DEFAULT, lr, n, 2))
            if n == MAP_BUDGET:
                out += [run(s, DEFAULT, lr, n, seed, data=d) for s, d in ((WIDTH, "all"), (HEADLINE, LIMITED))
                        for seed in (0, 1)]
    for name in (DEFAULT, UNIFORM_START):  # depth only: the layer choice matters, so both get a grid
        out += grid(choices, DEPTH, "distill", name, (MAP_BUDGET,), PROJECTED_RATES)
        lr = choices.rate((DEPTH, "distill", "all", name, 0.0, MAP_BUDGET), PROJECTED_RATES)
        out += [run(DEPTH, name, lr, MAP_BUDGET, 2)] if lr is not None else []
    w = choices.hinted()
    if w is not None:
        out += grid(choices, HEADLINE, "distill", HINTS, tuple(n for n in BUDGETS if n != HINT_BUDGET),
                    PROJECTED_RATES, w)
        for n in BUDGETS:
            lr = headline_rate(choices, HINTS, n, w)
            if lr is not None:
                out.append(run(HEADLINE, HINTS, lr, n, 2, weight=w))
                if n == HINT_BUDGET:
                    out += [run(HEADLINE, HINTS, lr, n, seed, data=LIMITED, weight=w) for seed in (0, 1)]
    return out


# ---------------------------------------------------------------- running

_CONTEXT: dict[str, Any] = {}


def limited(data: cv.Data, share: float = DATA_SHARE, seed: int = DATA_SEED) -> cv.Data:
    """The same data with a fixed share of the training latents (one seeded choice for every run)."""
    keep = torch.randperm(len(data.latents), generator=torch.Generator().manual_seed(seed))
    keep = keep[: round(share * len(data.latents))].sort().values
    return cv.Data(data.latents[keep], data.context[keep], data.val_latents, data.val_context, data.empty,
                   data.calibration)


def demo_data() -> cv.Data:
    train, val = digits.load_digits("train"), digits.load_digits("val")
    latents, context = digits.encode(train.images), digits.label_states(train.labels)
    calibration = Calibration(latents[:CALIBRATION], context[:CALIBRATION],
                              f"the first {CALIBRATION} latents of the demo's training split")
    return cv.Data(latents, context, digits.encode(val.images), digits.label_states(val.labels),
                   digits.empty_states(), calibration)


def _worker_init() -> None:
    torch.set_num_threads(1)  # a program's choice: one thread per worker, two workers on two cores
    _load_context()


def _load_context() -> None:
    data = demo_data()
    _CONTEXT["data"] = {"all": data, LIMITED: limited(data)}
    _CONTEXT["teacher"] = dt.load_teacher()
    _CONTEXT["classifier"] = dt.load_demo_classifier()


def work(r: cv.Run, scale: int = 1) -> dict[str, Any]:
    """One run, as one line of the results file. scale > 1 (a smoke run, the tests): it trains N // scale steps
    (at least 2) and scores 20 samples; the line still names its nominal N."""
    if not _CONTEXT:
        _load_context()
    trained = replace(r, steps=max(2, r.steps // scale)) if scale > 1 else r
    if scale > 1 and r.arm.stage is not None:  # the same share of the (smaller) budget in the first stage
        trained = replace(trained, arm=replace(r.arm, stage_steps=max(1, r.arm.stage_steps * trained.steps // r.steps)))
    sampler = ACCURACY[headline_group(r)] if scale == 1 else dt.Sampler(per_class=2)
    classifier = _CONTEXT["classifier"]
    result = cv.train_run(TEACHER, _CONTEXT["teacher"], _CONTEXT["data"][r.data], trained, BASE,
                          lambda model: dt.prompt_accuracy_of(model, classifier, sampler))
    d = result.to_dict()
    d["run"]["steps"] = r.steps
    return {**d, "key": run_key(r), "scale": scale, "load_average": os.getloadavg()}


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


STEP_COST = {HEADLINE: 1.0, DEPTH: 1.6, WIDTH: 1.45}  # a distillation step against the headline's (timed)
DENOISE_COST = 0.83  # a denoising step against a distillation step (no teacher forward)


def cost(r: cv.Run) -> float:
    """A run's cost in headline distillation steps, for longest-first scheduling and the estimate: its steps,
    its prompt accuracy (500 samples: about 37 steps; 200: 15) and its start (projection, evaluations)."""
    step = STEP_COST[r.shape] * (DENOISE_COST if r.objective == "denoise" else 1.0)
    return step * (r.steps + 10) + (37 if headline_group(r) else 15)


def run_all(path: Path, workers: int, scale: int = 1, groups: tuple[str, ...] = tuple(GROUPS)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        for phase in range(1, 10):  # the grids, then the runs their choices unlock, until none is left
            results = load_results(path)
            done = {d["key"] for d in results}
            todo = sorted({run_key(r): r for r in jobs(Choices(results), groups) if run_key(r) not in done}.values(),
                          key=cost, reverse=True)
            if not todo:
                return
            print(f"phase {phase}: {len(todo)} runs", flush=True)
            for d in pool.imap_unordered(partial(work, scale=scale), todo):
                with path.open("a") as f:
                    f.write(json.dumps(d) + "\n")
                r = d["run"]
                print(f"{r['shape'][:20]:<20} {r['objective']:<7} {r['data']:<16} {r['arm']['name']:<15} "
                      f"w {r['arm']['hint_weight']:<4g} lr {r['arm']['lr']:<6g} N {r['steps']:<4} seed {r['seed']}  "
                      f"final {d['final_val_loss']:.4f}  acc {d['prompt_accuracy']:.2f}  {d['seconds']:.0f} s",
                      flush=True)


def estimate(workers: int, steps: int = 30) -> float:
    """Seconds the whole grid takes, and each group: the headline student's distillation step timed here (one
    thread), scaled by each run's cost, spread over `workers` (runs that grown grids add are not counted)."""
    torch.set_num_threads(1)
    _worker_init()
    probe = run(HEADLINE, DEFAULT, PROJECTED_RATES[0], steps, 0)
    started = time.perf_counter()
    work(probe)
    per_step = (time.perf_counter() - started) / cost(probe)
    print(f"{per_step * 1000:.0f} ms per headline step (with its share of scoring)", flush=True)
    total = 0.0
    for group in GROUPS:
        todo = jobs(Assumed(), (group,))
        seconds = sum(cost(r) for r in todo) * per_step / workers
        total += seconds
        print(f"--groups {group}: {len(todo)} runs, {sum(r.steps for r in todo)} steps, about {seconds / 60:.0f} min "
              f"on {workers} workers", flush=True)
    return total


# ---------------------------------------------------------------- the report

def teacher_samples() -> int:
    return dt.TRAINING.steps * dt.TRAINING.batch


def share(n: int) -> str:
    return f"{100 * n * BASE.batch / teacher_samples():.2g}%"


def floors(data: cv.Data) -> tuple[float, float]:
    """(the teacher's validation loss, predicting zero's): the gap between them is what a student can close."""
    from projection.demo.sampling import validation_loss

    teacher = validation_loss(dt.load_teacher(), data.val_latents, data.val_context, BASE.val_draws)
    eps, _ = validation_noise(len(data.val_latents), BASE.val_draws, data.val_latents.shape[1:], 0)
    zero = (eps - data.val_latents[None]).pow(2).mean().item()
    return teacher, zero


def fmt(values: list[float], f: Callable[[float], str]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f(values[0])
    return f"{f(mean(values))} ({f(min(values))}–{f(max(values))})"


def pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def loss_and_gap(losses: list[float], floor: tuple[float, float]) -> str:
    """Two cells: the final losses, and the share of the gap between predicting zero and the teacher left."""
    teacher, zero = floor
    return f"{fmt(losses, lambda v: f'{v:.4f}')} | {fmt([(v - teacher) / (zero - teacher) for v in losses], pct)}"


class Report:
    def __init__(self, results: list[dict[str, Any]]):
        self.results, self.choices = results, Choices(results)
        self.by_cell: dict[Cell, dict[float, list[dict[str, Any]]]] = {}
        for d in results:
            self.by_cell.setdefault(cell_of(d), {}).setdefault(d["run"]["arm"]["lr"], []).append(d)

    def chosen(self, cell: Cell, rates: tuple[float, ...]) -> tuple[float | None, list[dict[str, Any]]]:
        """The cell's runs at its chosen rate, by seed (none before its grid is done)."""
        lr = self.choices.rate(cell, rates)
        return lr, sorted(self.by_cell[cell][lr], key=lambda d: d["run"]["seed"]) if lr is not None else []

    def rung(self, shape: str, objective: str, data: str, n: int) -> tuple[float | None, list[dict[str, Any]]]:
        """Random init's runs at one rung of a ladder: at its chosen rate where the rung has a grid (the headline's
        rungs to 800 steps, to 400 denoising), else at the best of the rates it ran at."""
        cell = (shape, objective, data, RANDOM, 0.0, n)
        gridded = (shape, data) == (HEADLINE, "all") and n in (GRIDDED if objective == "distill" else GRIDDED[:-1])
        return self.chosen(cell, RANDOM_RATES) if gridded else self.best(cell)

    def best(self, cell: Cell) -> tuple[float | None, list[dict[str, Any]]]:
        """A cell run without a grid of its own (one seed at the headline's chosen rates, or its two seeds at the
        headline default's): its runs at the rate, of those it ran at, with the lowest mean final loss (the
        headline's chosen rates moved when its grids did, so such a cell holds runs at both)."""
        found = self.by_cell.get(cell, {})
        by_rate = {lr: kept for lr, runs in found.items() if (kept := [d for d in runs if d["run"]["seed"] in (0, 1)])}
        if not by_rate:
            return None, []
        lr = min(by_rate, key=lambda r: mean(d["final_val_loss"] for d in by_rate[r]))
        return lr, sorted(by_rate[lr], key=lambda d: d["run"]["seed"])

    def ladder(self, shape: str, objective: str, data: str = "all") -> tuple[list[int], list[float], list[list[float]]]:
        """Random init's ladder: budgets, mean final loss at each rung's chosen rate (the headline's; another
        shape's or data's ladder: the best of the rates it ran at), and the per-seed losses."""
        budgets, means, seeds = [], [], []
        for n in LADDER:
            _, runs = self.rung(shape, objective, data, n)
            if runs:
                budgets.append(n)
                seeds.append([d["final_val_loss"] for d in runs])
                means.append(mean(seeds[-1]))
        return budgets, means, seeds

    def speedup(self, losses: list[float], n: int, ladder: tuple[list[int], list[float], Any]) -> str:
        """The speedup of the mean loss, and in brackets of each seed's (min-max), against the ladder's means."""
        if not losses or not ladder[0]:
            return "—"
        at = [equivalent_budget(ladder[0], ladder[1], v).speedup(n) for v in losses]
        centre = equivalent_budget(ladder[0], ladder[1], mean(losses)).speedup(n)
        text = f"{centre:.1f}x"
        if len(losses) > 1:
            lo, hi = min(at, key=lambda e: e.budget), max(at, key=lambda e: e.budget)
            text += f" ({lo:.1f}–{hi:.1f})"
        return text

    def budget_table(self, objective: str, arms: list[tuple[str, float]], floor: tuple[float, float]) -> list[str]:
        distilled, denoised = self.ladder(HEADLINE, objective), self.ladder(HEADLINE, "denoise")
        out = ["| init | N | share of the teacher's samples | lr | final val loss | gap to the teacher left | "
               "random budget, same loss | speedup | speedup against random init denoising | prompt accuracy |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        teacher, zero = floor
        for n in LADDER:
            _, runs = self.rung(HEADLINE, objective, "all", n)
            if runs:
                out.append(self.row(RANDOM, n, runs, floor, None, None))
        for name, w in arms:
            for n in BUDGETS:
                lr, runs = self.chosen((HEADLINE, objective, "all", name, w, n), PROJECTED_RATES)
                if runs:
                    out.append(self.row(name if not w else f"{name} (weight {w:g})", n, runs, floor, distilled,
                                        denoised if objective == "distill" else None))
        out.append(f"\nThe teacher's validation loss: {teacher:.4f}; predicting zero: {zero:.4f}. Gap left = (loss - "
                   "teacher's) / (zero's - teacher's).")
        return out

    def row(self, name: str, n: int, runs: list[dict[str, Any]], floor: tuple[float, float], ladder: Any,
            other: Any) -> str:
        losses = [d["final_val_loss"] for d in runs]
        acc = [d["prompt_accuracy"] for d in runs if d["prompt_accuracy"] is not None]
        equivalent = "—"
        if ladder is not None and ladder[0]:
            equivalent = str(equivalent_budget(ladder[0], ladder[1], mean(losses)))
        return (f"| {name} | {n} | {share(n)} | {runs[0]['run']['arm']['lr']:g} | {loss_and_gap(losses, floor)} | "
                f"{equivalent} | "
                f"{self.speedup(losses, n, ladder) if ladder else '—'} | "
                f"{self.speedup(losses, n, other) if other else '—'} | {fmt(acc, pct)} |")

    def rate_grid(self) -> list[str]:
        rates = sorted({lr for (shape, _, data, *_), by_rate in self.by_cell.items()
                        if (shape, data) == (HEADLINE, "all") for lr in by_rate})
        out = ["| objective | init | N | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
               "|---|---|---|" + "---|" * len(rates)]
        for cell, by_rate in sorted(self.by_cell.items(), key=lambda c: (c[0][1], c[0][3], c[0][4], c[0][5])):
            shape, objective, data, name, w, n = cell
            base = RANDOM_RATES if name == RANDOM else PROJECTED_RATES
            if (shape != HEADLINE or data != "all" or name not in ARMS
                    or not all(lr in by_rate for lr in self.choices.rates(cell, base))):
                continue
            lr = self.choices.rate(cell, base)
            cells = []
            for r in rates:
                seeds = [d["final_val_loss"] for d in by_rate.get(r, []) if d["run"]["seed"] in (0, 1)]
                text = f"{mean(seeds):.4f}" if seeds else "—"
                cells.append(f"**{text}**" if r == lr else text)
            label = name if not w else f"{name} (weight {w:g})"
            out.append(f"| {objective} | {label} | {n} | " + " | ".join(cells) + " |")
        return out

    def compression(self, floor: tuple[float, float]) -> list[str]:
        teacher_params = count_params(dt.load_teacher())
        out = ["| student | parameters kept | start | N | final val loss | gap left | random budget, same loss | "
               "speedup |", "|---|---|---|---|---|---|---|---|"]
        for shape, name in MAP_ARMS:
            params = count_params(random_student(cv.open_projector(TEACHER, cv.Run(SHAPES[shape], cv.Arm(
                RANDOM))).student_config(), 0))
            cell = (shape, "distill", "all", name, 0.0, MAP_BUDGET)
            _, runs = self.chosen(cell, PROJECTED_RATES)
            runs = runs or self.best(cell)[1]  # the width-only cell has no grid of its own
            ladder = self.ladder(shape, "distill")
            if not runs or not ladder[0]:
                continue
            losses = [d["final_val_loss"] for d in runs]
            out.append(f"| {shape} | {params / teacher_params:.0%} | {name} | {MAP_BUDGET} | "
                       f"{loss_and_gap(losses, floor)} | {equivalent_budget(ladder[0], ladder[1], mean(losses))} | "
                       f"{self.speedup(losses, MAP_BUDGET, ladder)} |")
        return out

    def data_limited(self, floor: tuple[float, float]) -> list[str]:
        ladder = self.ladder(HEADLINE, "distill", LIMITED)
        out = ["| init | N | lr | final val loss | gap left | random budget (same 20%), same loss | speedup | "
               "prompt accuracy |", "|---|---|---|---|---|---|---|---|"]
        for n in ladder[0]:
            lr, runs = self.best((HEADLINE, "distill", LIMITED, RANDOM, 0.0, n))
            losses = [d["final_val_loss"] for d in runs]
            out.append(f"| {RANDOM} | {n} | {lr:g} | {loss_and_gap(losses, floor)} | — | — | — |")
        for cell in self.by_cell:
            if cell[2] != LIMITED or cell[3] not in (DEFAULT, HINTS, UNIFORM_START):
                continue
            lr, runs = self.best(cell)
            losses = [d["final_val_loss"] for d in runs]
            acc = [d["prompt_accuracy"] for d in runs if d["prompt_accuracy"] is not None]
            label = cell[3] if not cell[4] else f"{cell[3]} (weight {cell[4]:g})"
            out.append(f"| {label} | {cell[5]} | {lr:g} | {loss_and_gap(losses, floor)} | "
                       f"{equivalent_budget(ladder[0], ladder[1], mean(losses)) if ladder[0] else '—'} | "
                       f"{self.speedup(losses, cell[5], ladder)} | {fmt(acc, pct)} |")
        return out

    def hint_weights(self) -> list[str]:
        out = ["| hint weight | best lr | final val loss (seeds 0, 1) |", "|---|---|---|"]
        for w in (0.0, *HINT_WEIGHTS):
            cell = (HEADLINE, "distill", "all", DEFAULT if w == 0 else HINTS, w, HINT_BUDGET)
            lr = self.choices.rate(cell, PROJECTED_RATES)
            if lr is not None:
                losses = self.choices.losses(cell, (lr,))[lr]
                out.append(f"| {w:g} | {lr:g} | {fmt(losses, lambda v: f'{v:.4f}')} |")
        chosen = self.choices.weight()
        if chosen is not None:
            out.append(f"\nMeasured choice: weight {chosen:g}" + ("" if chosen else f" (no hints); the hints rows use "
                                                                  f"{self.choices.hinted():g}, the best positive one"))
        return out


def full_retraining(path: Path = FULL_RESULTS) -> list[str]:
    """The earlier benchmark's 1,600-step runs of the headline student (random init and the default at their
    best rate, 0.016): a full retraining, scored as it was (steps to random's final loss)."""
    results = [d for d in load_results(path) if d["run"]["shape"] == HEADLINE and d["run"]["arm"]["lr"] == 0.016
               and d["run"]["arm"]["name"] in ("default", "random init, lr 0.016")]
    if not results:
        return ["(no full-retraining runs in benchmarks/results/convergence.jsonl)"]
    out = ["| objective | init | N | share of the teacher's samples | final val loss | steps to random's final loss "
           "| speedup | prompt accuracy (200 samples) |", "|---|---|---|---|---|---|---|---|"]
    for objective in ("distill", "denoise"):
        mine = [as_result(d) for d in results if d["run"]["objective"] == objective]
        for r in cv.table(mine, baseline="random init, lr 0.016"):
            steps = ", ".join("not reached" if s is None else f"{s:.0f}" for s in r["steps_to_random"])
            speed = f"{r['speedup']['mean']:.1f}x" if r["speedup"] else "<1x"
            out.append(f"| {objective} | {r['arm']} | 1600 | {share(1600)} | {r['final_val_loss']['mean']:.4f} | "
                       f"{steps} | {speed} | {100 * r['prompt_accuracy']['mean']:.0f}% |")
    return out


def as_result(d: dict[str, Any]) -> cv.Result:
    r = d["run"]
    run_ = cv.Run(r["student"], cv.Arm(**r["arm"]), r["seed"], r["objective"], r["shape"], r.get("steps"),
                  r.get("data", "all"))
    return cv.Result(run_, d["val_loss_0"], d["error_0"], d["cosine_0"], d["history"], d["final_val_loss"],
                     d["seconds"], d["prompt_accuracy"])


def report(path: Path, plot: Path | None) -> str:
    rep = Report(load_results(path))
    floor = floors(demo_data())
    print(f"the demo teacher trained on {dt.TRAINING.steps} x {dt.TRAINING.batch} = {teacher_samples():,} samples; "
          + ", ".join(f"N = {n}: {share(n)}" for n in LADDER), file=sys.stderr)
    weight = rep.choices.hinted()
    arms = [(DEFAULT, 0.0)] + ([(HINTS, weight)] if weight is not None else [])
    out = ["**Headline: half width, half depth (14% of the parameters), distillation from the teacher**\n",
           *rep.budget_table("distill", arms, floor),
           "\n**The same student, denoising objective**\n", *rep.budget_table("denoise", [(DEFAULT, 0.0)], floor),
           "\n**Hint weight** (N = 200, distillation; mean of seeds 0 and 1 at each weight's best rate)\n",
           *rep.hint_weights(),
           "\n**Compression map** (N = 200, distillation; depth only and half width and depth: each start's 3 seeds "
           "at its chosen rate;\nwidth only (all 8 blocks: the layer choice does not apply): seeds 0 and 1 at the "
           "best of the headline\ndefault's chosen rates; each shape's own random ladder: seed 0, each rung at the "
           "best of the rates it ran at)\n",
           *rep.compression(floor),
           f"\n**Data-limited** (the student sees a fixed {LIMITED}; N = 200, distillation; every row at the best of "
           "the rates\nit ran at: the headline's chosen rates as its grids moved; seeds 0 and 1, random init seed 0)\n",
           *rep.data_limited(floor),
           "\n**Full retraining** (the earlier benchmark: 1,600 steps, warmup 50)\n", *full_retraining(),
           "\n**Rate grids** (final validation loss, mean of seeds 0 and 1; bold: chosen)\n", *rep.rate_grid()]
    if plot is not None:
        plot_budgets(rep, floor, plot)
    return "\n".join(out)


LOSS_TICKS = (0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0)


def plot_budgets(rep: Report, floor: tuple[float, float], path: Path) -> None:
    """Final validation loss against the budget: random init's ladders as lines with their seed spread, each
    arm's budgets as points with theirs; the teacher's loss as the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110, sharey=True)
    for ax, objective in zip(axes, ("distill", "denoise")):
        ladder = rep.ladder(HEADLINE, objective)
        if ladder[0]:
            ax.plot(ladder[0], ladder[1], "k-", marker="o", ms=3, label=f"{RANDOM} (ladder)")
            ax.fill_between(ladder[0], [min(s) for s in ladder[2]], [max(s) for s in ladder[2]], color="k", alpha=0.15)
        arms = [(DEFAULT, 0.0)] + ([(HINTS, rep.choices.hinted())] if objective == "distill" and rep.choices.hinted()
                                   else [])
        for (name, w), color in zip(arms, ("tab:blue", "tab:orange")):
            points = [(n, [d["final_val_loss"] for d in rep.chosen((HEADLINE, objective, "all", name, w, n),
                                                                   PROJECTED_RATES)[1]]) for n in BUDGETS]
            points = [(n, v) for n, v in points if v]
            if points:
                ys = [mean(v) for _, v in points]
                err = [[y - min(v) for y, (_, v) in zip(ys, points)], [max(v) - y for y, (_, v) in zip(ys, points)]]
                ax.errorbar([n for n, _ in points], ys, yerr=err, fmt="o", color=color, capsize=3, label=name)
        ax.axhline(floor[0], color="tab:green", ls="--", lw=1, label="the teacher")
        ax.set(xscale="log", yscale="log", xlabel="training steps N (batch 64; each its own schedule)",
               ylabel="final validation loss (denoising, fixed noise)",
               title=f"{HEADLINE}: {'distillation' if objective == 'distill' else 'denoising'}")
        ax.set_xticks(LADDER, [str(n) for n in LADDER])
        ax.set_yticks(LOSS_TICKS, [f"{v:g}" for v in LOSS_TICKS])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="print the tables and write the PNG only")
    parser.add_argument("--estimate", action="store_true", help="time a few steps and print each group's time")
    parser.add_argument("--scale", type=int, default=1, help="a smoke run: every budget N trains N // scale steps")
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=["core"],
                        help="; ".join(f"{k}: {v}" for k, v in GROUPS.items()) + " (default: core)")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"the plot's path (default {PLOT.relative_to(ROOT)})")
    args = parser.parse_args()
    if args.estimate:
        estimate(args.workers)
        return
    if not args.report:
        started = time.time()
        print(f"machine: {platform.machine()} {dt._cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"load {os.getloadavg()}; the teacher saw {teacher_samples():,} samples", flush=True)
        run_all(args.results, args.workers, args.scale, tuple(args.groups))
        print(f"all runs in {time.time() - started:.0f} s, load {os.getloadavg()}", flush=True)
    print(report(args.results, args.plot))


if __name__ == "__main__":
    main()
