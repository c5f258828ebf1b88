"""Function measurements: fidelity against the teacher, the in-memory projected student, distillation, the
gallery's rows, and a short convergence run (the benchmark's code path on the demo teacher, tens of steps)."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from projection import Projector, export_student, load_student, projected_student
from projection.demo import convergence as cv, digits, teacher as dt
from projection.demo.gallery import draw_row, strip
from projection.function.fidelity import teacher_reference
from projection.demo.training import TrainConfig, learning_rate, train_flow
from projection.engine.build import random_student
from projection.function.fidelity import velocity_fidelity
from projection.probe.ladder import Equivalent, equivalent_budget

TEACHER = str(dt.ASSETS / "teacher-wan")
HALF = {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}


@pytest.fixture(scope="module")
def teacher():
    return dt.load_teacher()


@pytest.fixture(scope="module")
def data():
    train, val = digits.load_digits("train"), digits.load_digits("val")
    # a small validation subset keeps the short runs short; the data order is the trainer's
    return cv.Data(digits.encode(train.images), digits.label_states(train.labels), digits.encode(val.images[:64]),
                   digits.label_states(val.labels[:64]), digits.empty_states())


def test_the_in_memory_student_is_the_exported_one(tmp_path):
    p = Projector.open(TEACHER, {"layout": "wanlite", **HALF})
    export_student(p, tmp_path / "student")
    exported = load_student(tmp_path / "student").state_dict()
    memory = projected_student(p).state_dict()
    assert memory.keys() == exported.keys()
    assert all(torch.equal(memory[k], exported[k]) for k in memory)


def test_fidelity_is_zero_for_the_teachers_own_config_and_near_one_for_random(teacher, data):
    same = projected_student(Projector.open(TEACHER, {"layout": "wanlite"}))
    exact = velocity_fidelity(same, teacher, data.val_latents, data.val_context, draws=2)
    assert exact.relative_error < 1e-6 and exact.cosine > 1 - 1e-6
    assert [b["s_low"] for b in exact.by_level] == [0.0, 0.5]
    rand = random_student(Projector.open(TEACHER, {"layout": "wanlite", **HALF}).student_config(), seed=0)
    far = velocity_fidelity(rand, teacher, data.val_latents, data.val_context, draws=2)
    assert 0.5 < far.relative_error < 2 and abs(far.cosine) < 0.5


def test_a_deeper_cut_is_further_from_the_teacher(teacher, data):
    """Fidelity orders students as their function does: dropping half the blocks costs more than none."""
    errors = [velocity_fidelity(projected_student(Projector.open(TEACHER, {"layout": "wanlite", "num_layers": n})),
                                teacher, data.val_latents, data.val_context, draws=1).relative_error for n in (8, 6, 4)]
    assert errors[0] < 1e-6 < errors[1] < errors[2]


def test_random_students_are_seeded_without_touching_the_global_rng():
    cfg = Projector.open(TEACHER, {"layout": "wanlite", **HALF}).student_config()
    state = torch.random.get_rng_state()
    a, b, c = (random_student(cfg, s).state_dict() for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["head.head.weight"], c["head.head.weight"])


def test_distillation_targets_the_teachers_velocity(teacher, data):
    """A student that is the teacher has zero distillation loss; on the denoising objective the same student has
    the teacher's own (non-zero) loss."""
    config = TrainConfig(steps=1, batch=32, lr=1e-3, warmup=1, eval_every=1, val_draws=1)
    losses = {}
    for objective, target in (("distill", teacher), ("denoise", None)):
        copy = projected_student(Projector.open(TEACHER, {"layout": "wanlite"}))
        history = train_flow(copy, data.latents, data.context, data.empty, data.val_latents, data.val_context,
                             config, teacher=target)
        losses[objective] = history.train_loss[1]  # the first step's training loss
    assert losses["distill"] < 1e-10 and losses["denoise"] > 0.05


def test_steps_to_reach_interpolates_between_evaluations():
    assert cv.steps_to_reach([0, 10, 20], [2.0, 1.0, 0.5], 0.75) == 15
    assert cv.steps_to_reach([0, 10, 20], [0.5, 0.4, 0.3], 1.0) == 0
    assert cv.steps_to_reach([0, 10, 20], [2.0, 1.0, 0.9], 0.5) is None


def test_each_budget_has_its_own_schedule():
    """10% warmup to the rate, then a cosine that reaches its floor exactly at the budget's last step."""
    for n in (50, 100, 200, 400):
        cfg = cv.budget_config(TrainConfig(lr=8e-3, min_lr_ratio=0.05, seed=3), n)
        assert (cfg.steps, cfg.warmup, cfg.eval_every, cfg.seed) == (n, n // 10, n // 4, 3)
        assert learning_rate(cfg.warmup - 1, cfg) == 8e-3 > learning_rate(cfg.warmup - 2, cfg)
        lrs = [learning_rate(s, cfg) for s in range(cfg.warmup, n + 1)]
        assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(8e-3 * 0.05, rel=1e-12)
    assert cv.budget_config(TrainConfig(), 2).warmup == 1
    with pytest.raises(ValueError, match="budget 0"):
        cv.budget_config(TrainConfig(), 0)


def test_the_equivalent_budget_interpolates_in_log_steps_and_bounds_beyond_the_ladder():
    budgets, losses = [50, 100, 200, 400], [1.0, 0.8, 0.6, 0.65]
    mid = equivalent_budget(budgets, losses, 0.7)
    assert mid.bound == "=" and mid.budget == pytest.approx(math.sqrt(100 * 200))  # half way in log N
    assert equivalent_budget(budgets, losses, 0.8) == Equivalent(100.0)
    assert equivalent_budget(budgets, losses, 0.62).budget == pytest.approx(100 * 2 ** 0.9)  # first crossing
    past, below = equivalent_budget(budgets, losses, 0.5), equivalent_budget(budgets, losses, 1.2)
    assert (past, below) == (Equivalent(400.0, ">"), Equivalent(50.0, "<"))
    assert f"{past.speedup(200):.1f}x" == "> 2.0x" and f"{mid.speedup(100):.2f}" == "1.41" and str(mid) == "141"
    with pytest.raises(ValueError, match="ascending"):
        equivalent_budget([100, 50], [1.0, 0.9], 0.95)


def test_a_rate_is_chosen_on_the_mean_of_two_seeds():
    assert cv.choose_rate({1e-3: [0.5, 0.7], 2e-3: [0.55, 0.6], 4e-3: [0.4, 0.9]}) == 2e-3
    assert cv.choose_rate({1e-3: [0.5, 0.7], 2e-3: [0.55]}) is None  # a seed missing: not yet
    assert cv.choose_rate({}) is None


def load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_convergence.py"
    spec = importlib.util.spec_from_file_location("bench_convergence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_benchmark_cell_runs_through_the_benchmarks_code_path():
    """One headline cell (default + hints, distilled, nominal N = 200) at 1/100 of its steps, as a worker runs
    it; then the grid's choices: seed 2 and the dependent groups appear only once both seeds of every rate are in."""
    bench = load_bench()
    cell = bench.run(bench.HEADLINE, bench.HINTS, 4e-3, 200, 0, weight=1.0)
    d = bench.work(cell, scale=100)
    assert d["key"] == bench.run_key(cell) and d["run"]["steps"] == 200 and d["run"]["arm"]["hint_weight"] == 1.0
    assert d["history"]["steps"] == [0, 1, 2] and 0 <= d["prompt_accuracy"] <= 1
    assert d["final_val_loss"] < d["val_loss_0"] and d["error_0"] < 1.1  # the projected start, trained 2 steps
    grids = bench.jobs(bench.Choices([]))
    starts = 2 * len(bench.STARTS_BUDGETS) * len(bench.PROJECTED_RATES) * len(bench.STARTS)
    staged = 2 * len(bench.PROJECTED_RATES) * len(bench.STAGED)
    depth = 2 * len(bench.PROJECTED_RATES) * 2  # depth only: the default and layers: uniform
    assert len(grids) == len({bench.run_key(r) for r in grids}) == 114 + starts + staged + depth
    core = bench.jobs(bench.Choices([]), ("core",))  # the default command: the starts group apart
    assert len(core) == 114 + depth and not {r.arm.name for r in core} & {*bench.STAGED, *bench.STARTS} - {
        bench.UNIFORM_START}  # layers: uniform's depth-only grid is the compression map's
    assert {r.seed for r in grids} == {0, 1}
    best = {bench.RANDOM: 1.6e-2, bench.DEFAULT: 4e-3, bench.HINTS: 8e-3}
    fake = [{"run": asdict(r), "history": {"steps": [0, r.steps]}, "final_val_loss": 1 + abs(r.arm.lr - best.get(
        r.arm.name, 8e-3)) + r.arm.hint_weight / 10 + r.seed / 100} for r in grids]
    choices = bench.Choices(fake)
    assert choices.weight() == 0.0 and choices.hinted() == 0.1  # no hints won; the hints arm runs the best positive
    later = {bench.run_key(r) for r in bench.jobs(choices)} - {bench.run_key(r) for r in grids}
    assert bench.run_key(bench.run(bench.HEADLINE, bench.RANDOM, 1.6e-2, 1600, 0)) in later
    assert bench.run_key(bench.run(bench.DEPTH, bench.DEFAULT, 4e-3, 200, 2)) in later  # depth only: seed 2
    assert bench.run_key(bench.run(bench.HEADLINE, bench.HINTS, 8e-3, 50, 1, weight=0.1)) in later
    assert bench.run_key(bench.run(bench.HEADLINE, bench.DEFAULT, 4e-3, 200, 0, data=bench.LIMITED)) in later
    start = next(iter(bench.STARTS))
    assert bench.run_key(bench.run(bench.HEADLINE, start, 8e-3, 400, 2)) in later  # each start's third seed
    assert len(bench.jobs(bench.Assumed())) > len(grids) + len(later)  # the hints' grids unlock one more phase


def test_a_short_convergence_run_scores_every_arm_on_the_same_data(teacher, data):
    training = TrainConfig(steps=12, batch=16, lr=1e-3, warmup=2, eval_every=4, val_draws=1)
    arms = [cv.Arm("random", None, 2e-3), cv.Arm("default", {}), cv.Arm("svd", {"width": "svd-per-matrix"})]
    results = [cv.train_run(TEACHER, teacher, data, cv.Run(HALF, a, seed, "denoise", "half"), training)
               for a in arms for seed in (0, 1)]
    again = cv.train_run(TEACHER, teacher, data, cv.Run(HALF, arms[1], 0, "denoise", "half"), training)
    assert again.history["val_loss"] == results[2].history["val_loss"]  # seeded: the same run twice
    by = {(r.run.arm.name, r.run.seed): r for r in results}
    assert by[("default", 0)].val_loss_0 == by[("default", 1)].val_loss_0  # projection: no seed in the init
    assert by[("random", 0)].val_loss_0 != by[("random", 1)].val_loss_0
    assert by[("svd", 0)].error_0 > 10 > 1.5 > by[("default", 0)].error_0  # the seeds' method breaks function
    assert all(r.history["steps"] == [0, 4, 8, 12] for r in results)
    rows = {r["arm"]: r for r in cv.table(results, baseline="random")}
    assert rows["random"]["speedup"]["mean"] == pytest.approx(1.0, abs=0.35)
    assert rows["random"]["seeds"] == [0, 1] and rows["random"]["final_val_loss"]["n"] == 2
    svd = rows["svd"]
    assert svd["not_reached"] == 2 and svd["speedup"] is None
    for r in rows.values():
        assert r["final_val_loss"]["min"] <= r["final_val_loss"]["mean"] <= r["final_val_loss"]["max"]
        steps = [s for s in r["steps_to_random"] if s is not None]
        assert all(0 <= s <= 12 for s in steps)


def test_gallery_rows_score_the_teacher_high_and_show_one_digit_per_column(teacher, data):
    classifier = dt.load_demo_classifier()
    sampler = dt.Sampler(per_class=2)
    row = draw_row("teacher", teacher, classifier, sampler)
    assert row.images.shape == (10, 8, 8) and row.scored == 20 and row.velocity_error is None
    assert row.prompt_accuracy >= 0.8
    rand = random_student(Projector.open(TEACHER, {"layout": "wanlite", **HALF}).student_config(), 0)
    reference = teacher_reference(teacher, data.val_latents, data.val_context)
    other = draw_row("random", rand, classifier, sampler, reference)
    assert other.prompt_accuracy <= 0.4 and 0.5 < other.velocity_error < 2
    picture = strip(row.images, scale=3, gap=1)
    assert picture.dtype == torch.uint8 and tuple(picture.shape) == (24, 10 * 25 - 1)
    assert picture[:, 24].eq(255).all()  # the gap between two digits is white
    assert math.isclose(picture[:, :24].float().mean().item() / 255, 1 - row.images[0].mean().item(), abs_tol=1e-2)


def test_a_staged_run_projects_the_distilled_intermediate_and_spends_the_rest_of_its_budget(teacher, data,
                                                                                          monkeypatch):
    """Staged projection: the intermediate (depth only) is projected from the teacher and distilled for the first
    stage's steps, written as a Wan checkpoint that opens as a teacher, and the student is projected from it and
    trained for the budget's remaining steps."""
    training = TrainConfig(steps=12, batch=16, lr=1e-3, warmup=2, eval_every=4, val_draws=1)
    arm = cv.Arm("staged", {"layers": "last"}, 2e-3, stage={"num_layers": 4}, stage_steps=4)
    opened: list[tuple[str, object]] = []
    real_open = cv.open_projector

    def spy(path, run):
        projector = real_open(path, run)
        opened.append((path, projector.mapping(projector.strategy).layers))
        return projector
    monkeypatch.setattr(cv, "open_projector", spy)
    result = cv.train_run(TEACHER, teacher, data, cv.Run(HALF, arm, 0, "distill", "half", steps=12), training)
    assert result.history["steps"][-1] == 8  # 4 of the 12 steps went to the intermediate
    assert opened[0][0] == TEACHER and opened[-1][0] != TEACHER  # the student came from the intermediate checkpoint
    assert opened[0][1] == [4, 5, 6, 7]  # the intermediate's blocks by the arm's own strategy
    direct = cv.train_run(TEACHER, teacher, data, cv.Run(HALF, cv.Arm("default", {}, 2e-3), 0, "distill", "half",
                                                          steps=12), training)
    assert result.val_loss_0 != direct.val_loss_0  # a different start: the trained intermediate's projection
    with pytest.raises(ValueError, match="12 first-stage steps"):
        cv.train_run(TEACHER, teacher, data, cv.Run(HALF, cv.Arm("staged", {}, stage={"num_layers": 4},
                                                                 stage_steps=12), 0, steps=12), training)


def test_the_rotation_benchmark_checks_its_own_code_and_finds_rotation_behind_the_default():
    """benchmarks/bench_rotation.py runs (seconds): the default plan's channels through its rotation code give the
    default's step-0 error (the script exits with an error otherwise), and the rotated starts are the README's
    finding: behind the default at step 0 for both shapes."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rotation.py"
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tables = done.stdout.split("**")[2::2]
    assert len(tables) == 2
    for table in tables:
        rows = {line.split(" | ")[0].strip("| "): float(line.split(" | ")[-1].strip(" |"))
                for line in table.strip().splitlines()[2:]}
        default = next(v for k, v in rows.items() if k.startswith("default projection"))
        rotated = next(v for k, v in rows.items() if k.startswith("rotation, top"))
        assert rows["check: the default's channels through this code (no refit)"] == default
        assert rotated > default


def test_cells_without_a_grid_of_their_own_are_scored_at_the_best_rate_they_ran_at():
    """The compression and data-limited cells ran one seed (their projected arms two) at the headline's chosen rates,
    which moved with its grids: the report scores each at the best of the rates it holds, not at none (a shape's
    ladder then lost every rung run at two rates and printed '> 100', and the headline ladder its 1,600-step rung),
    while the headline's gridded rungs wait for their grids."""
    bench = load_bench()

    def result(shape: str, name: str, lr: float, steps: int, seed: int, loss: float) -> dict:
        return {"run": {"shape": shape, "objective": "distill", "data": "all", "steps": steps, "seed": seed,
                        "arm": {"name": name, "hint_weight": 0.0, "lr": lr}}, "final_val_loss": loss}

    rungs = {50: (0.9, 0.95), 100: (0.6, 0.7), 200: (0.4, 0.68), 400: (0.33, 0.36), 800: (0.30, 0.40)}
    results = [result(bench.DEPTH, bench.RANDOM, lr, n, 0, loss) for n, pair in rungs.items()
               for lr, loss in zip((1.6e-2, 3.2e-2), pair)]
    results += [result(bench.DEPTH, bench.DEFAULT, lr, 200, seed, loss)
                for lr, losses in ((8e-3, (0.336, 0.337)), (1.6e-2, (0.340, 0.342))) for seed, loss in enumerate(losses)]
    results += [result(bench.HEADLINE, bench.RANDOM, lr, 200, 0, 0.5) for lr in (1.6e-2, 3.2e-2)]  # a grid not done
    # the headline's 1,600-step rung has no grid: one seed at each rate the 800-step rung chose as its grids moved
    results += [result(bench.HEADLINE, bench.RANDOM, lr, 1600, 0, loss) for lr, loss in ((1.6e-2, 0.31), (3.2e-2, 0.3))]
    report = bench.Report(results)
    assert report.best((bench.DEPTH, "distill", "all", bench.RANDOM, 0.0, 200))[0] == 1.6e-2
    budgets, means, _ = report.ladder(bench.DEPTH, "distill")
    assert budgets == [50, 100, 200, 400, 800] and means == [0.9, 0.6, 0.4, 0.33, 0.30]
    lr, runs = report.best((bench.DEPTH, "distill", "all", bench.DEFAULT, 0.0, 200))
    assert lr == 8e-3 and [d["final_val_loss"] for d in runs] == [0.336, 0.337]
    assert report.ladder(bench.HEADLINE, "distill")[:2] == ([1600], [0.3])  # not the unfinished 200-step grid
    row = next(line for line in report.compression((0.28, 1.99)) if line.startswith(f"| {bench.DEPTH}"))
    assert "0.3365 (0.3360–0.3370)" in row and "> " not in row


def test_a_grid_whose_best_rate_is_its_top_grows_by_doubling_it():
    """A best rate at the grid's edge says a higher one might be better: the cell's grid gains the doubled rate
    (seeds 0 and 1) before it chooses, again while the new top wins, at most EXTEND times."""
    bench = load_bench()
    cell = (bench.HEADLINE, "distill", "all", bench.DEFAULT, 0.0, 200)

    def results(losses: dict[float, float]) -> list[dict]:
        return [{"run": asdict(bench.run(bench.HEADLINE, bench.DEFAULT, lr, 200, seed)),
                 "history": {"steps": [0, 200]}, "final_val_loss": loss + seed / 100}
                for lr, loss in losses.items() for seed in (0, 1)]

    def unlocked(losses: dict[float, float]) -> set[tuple[float, int]]:
        return {(r.arm.lr, r.seed) for r in bench.jobs(bench.Choices(results(losses)))
                if (r.shape, r.objective, r.data, r.arm.name, r.arm.hint_weight, r.steps) == cell}

    base = dict(zip(bench.PROJECTED_RATES, (0.5, 0.45, 0.42)))  # best at the top, 1.6e-2
    choices = bench.Choices(results(base))
    assert choices.rates(cell, bench.PROJECTED_RATES) == (*bench.PROJECTED_RATES, 3.2e-2)
    assert choices.rate(cell, bench.PROJECTED_RATES) is None  # not chosen before the doubled rate ran
    assert {(3.2e-2, 0), (3.2e-2, 1)} <= unlocked(base) and not {s for _, s in unlocked(base)} - {0, 1}
    worse = {**base, 3.2e-2: 0.43}
    assert bench.Choices(results(worse)).rate(cell, bench.PROJECTED_RATES) == 1.6e-2
    assert (1.6e-2, 2) in unlocked(worse) and 6.4e-2 not in {lr for lr, _ in unlocked(worse)}
    better = {**base, 3.2e-2: 0.41, 6.4e-2: 0.40}  # the top wins twice: the grid stops at EXTEND doublings
    assert bench.EXTEND == 2 and bench.Choices(results(better)).rate(cell, bench.PROJECTED_RATES) == 6.4e-2
    assert 1.28e-1 not in {lr for lr, _ in unlocked(better)} and (6.4e-2, 2) in unlocked(better)
    report = bench.Report(results(worse))
    assert report.chosen(cell, bench.PROJECTED_RATES)[0] == 1.6e-2
    assert any("**0.4250**" in line and "0.4350" in line for line in report.rate_grid())  # the grown column shown
