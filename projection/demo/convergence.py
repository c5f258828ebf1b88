"""Convergence: does a student started from the teacher train faster than a random one?

Every arm (an initialization: random, or a projection strategy) of one student shape trains with the SAME data
order, noise, optimizer, schedule and number of steps (`training.train_flow`, one seeded generator), on Wan's
denoising objective or on distillation from the teacher's velocity, and is scored the same way:

  val_loss_0        denoising validation loss before training (fixed noise)
  error_0           the student's velocity error relative to the teacher's output at step 0 (`fidelity`)
  final_val_loss    after the last step
  steps_to_random   the first step at which its validation loss reaches the random arm's final loss (linear
                    between evaluations); speedup = the random arm's steps / this
  prompt_accuracy   of its samples at the end, when a scorer is given (the demo's digit classifier)

At users' budgets (`budget_config`: each budget N its own schedule, 10% warmup, cosine to N) an arm is scored
against random init's ladder of budgets: its equivalent budget is the random budget that reaches the arm's final
validation loss (`equivalent_budget`, interpolated in log N between rungs; a bound beyond the ladder's ends), and
the speedup at N is that / N.

`benchmarks/bench_convergence.py` runs the full grid on the demo teacher; the tests run a short one.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from tempfile import TemporaryDirectory
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from ..arch.layout import wan_config
from ..arch.wan import wan_state_dict
from ..core.strategy import Strategy
from ..distill import Hints
from ..distill.schedule import warmup_steps
from ..engine.build import projected_student, random_student
from ..engine.projector import Projector
from ..function.calibration import Calibration
from ..function.fidelity import velocity_fidelity
from ..probe.choose import resolve_layers
from .training import TrainConfig, train_flow

Objective = Literal["denoise", "distill"]


@dataclass(frozen=True)
class Data:
    """Training and validation latents with their prompt states; `empty` [1, L, T] is the empty prompt's."""
    latents: torch.Tensor
    context: torch.Tensor
    val_latents: torch.Tensor
    val_context: torch.Tensor
    empty: torch.Tensor
    calibration: Calibration | None = None  # for strategies that rank by activations (not the validation set)


@dataclass(frozen=True)
class Arm:
    """An initialization: `strategy` fields of a projection, or None for a randomly initialized student."""
    name: str
    strategy: dict[str, Any] | None = None
    lr: float = 1e-3
    hint_weight: float = 0.0  # distillation's per-block hints (a projected arm only: they need its plan)
    stage: dict[str, Any] | None = None  # staged projection: an intermediate student (config fields) projected
    stage_steps: int = 0  # first and distilled this many steps of the run's budget, then projected to the student
    stage_lr: float = 1.6e-2  # the intermediate's rate

    @property
    def random(self) -> bool:
        return self.strategy is None


@dataclass(frozen=True)
class Run:
    student: dict[str, Any]  # student config fields (layout wanlite)
    arm: Arm
    seed: int = 0  # the data order and noise, and a random arm's initialization
    objective: Objective = "denoise"
    shape: str = ""  # a name for the student shape, for tables
    steps: int | None = None  # the run's budget: its own schedule (`budget_config`); None: the config's steps
    data: str = "all"  # a name for the training set it sees (the caller hands `train_run` that set)


@dataclass
class Result:
    run: Run
    val_loss_0: float
    error_0: float
    cosine_0: float
    history: dict[str, list]
    final_val_loss: float
    seconds: float
    prompt_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_projector(teacher: str, run: Run) -> Projector:
    """The run's projector (student config fields over the teacher's, layout wanlite)."""
    return Projector.open(teacher, {"layout": "wanlite", **run.student},
                          strategy=Strategy.checked(run.arm.strategy or {}, f"arm {run.arm.name}"))


def initial_student(teacher: str, run: Run, calibration: Calibration | None = None,
                    projector: Projector | None = None) -> nn.Module:
    """The run's student at step 0: projected from the teacher, or random with the same config (omitted fields
    take the teacher's, as a projection's do). Activation choices rank on `calibration`."""
    projector = projector or open_projector(teacher, run)
    if run.arm.random:
        return random_student(projector.student_config(), run.seed)
    if projector.strategy.needs_calibration and calibration is not None:
        projector.calibrate(calibration)
    strategy, _ = resolve_layers(projector, calibration)  # `layers: recoverable`: the block list its probes chose
    return projected_student(projector, strategy=strategy)


def budget_config(base: TrainConfig, steps: int, warmup_share: float = 0.1, evals: int = 4) -> TrainConfig:
    """A budget's own schedule: `steps` steps, warmup `warmup_share` of them, the cosine ending at `steps`, and
    `evals` evaluations after step 0."""
    if steps < 1:
        raise ValueError(f"budget {steps}: expected at least 1 step")
    return TrainConfig(**{**base.to_dict(), "steps": steps, "warmup": warmup_steps(steps, warmup_share),
                          "eval_every": max(1, steps // evals)})


def train_run(teacher_path: str, teacher: nn.Module, data: Data, run: Run, training: TrainConfig,
              score: Callable[[nn.Module], float] | None = None) -> Result:
    """Initialize, measure at step 0, train, measure again. `teacher` is the teacher as a module (for the step-0
    error and distillation targets); a run with a budget trains on `budget_config(training, run.steps)`."""
    started = time.perf_counter()
    with TemporaryDirectory(prefix="stage-") as folder:
        source = teacher_path if run.arm.stage is None else stage(teacher_path, teacher, data, run, training,
                                                                  Path(folder))
        projector = open_projector(source, run)
        model = initial_student(source, run, data.calibration, projector).float()
    config = TrainConfig(**{**training.to_dict(), "lr": run.arm.lr, "seed": run.seed})
    if run.steps is not None:
        config = budget_config(config, run.steps - (run.arm.stage_steps if run.arm.stage else 0))
    hints = Hints.from_projector(projector) if run.arm.hint_weight > 0 and not run.arm.random else None
    fid = velocity_fidelity(model, teacher, data.val_latents, data.val_context, config.val_draws)
    history = train_flow(model, data.latents, data.context, data.empty, data.val_latents, data.val_context, config,
                         teacher=teacher if run.objective == "distill" else None, hints=hints,
                         hint_weight=run.arm.hint_weight)
    return Result(run, history.val_loss[0], fid.relative_error, fid.cosine, history.to_dict(), history.val_loss[-1],
                  time.perf_counter() - started, score(model) if score else None)


def stage(teacher_path: str, teacher: nn.Module, data: Data, run: Run, training: TrainConfig, folder: Path) -> str:
    """A staged projection's first stage (Minitron prunes past ~50% in stages): the intermediate student projected
    from the teacher with the arm's strategy, distilled `stage_steps` steps (its own schedule), written to
    `folder` as a Wan checkpoint for the second projection. Returns that checkpoint's path."""
    if not 0 < run.arm.stage_steps < (run.steps or training.steps):
        raise ValueError(f"arm {run.arm.name}: {run.arm.stage_steps} first-stage steps; expected fewer than the "
                         f"run's {run.steps or training.steps} and at least 1")
    first = Run(run.arm.stage, Arm("stage", run.arm.strategy or {}), run.seed)
    projector = open_projector(teacher_path, first)
    model = initial_student(teacher_path, first, projector=projector).float()
    config = budget_config(TrainConfig(**{**training.to_dict(), "lr": run.arm.stage_lr, "seed": run.seed}),
                           run.arm.stage_steps)
    train_flow(model, data.latents, data.context, data.empty, data.val_latents, data.val_context, config,
               teacher=teacher)
    save_file({k: v.contiguous() for k, v in wan_state_dict(model).items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(wan_config(projector.student_config())))
    return str(folder)


def choose_rate(losses: dict[float, Sequence[float]], seeds: int = 2) -> float | None:
    """The rate with the lowest mean final loss, once every rate has `seeds` runs; None before."""
    if not losses or any(len(v) < seeds for v in losses.values()):
        return None
    return min(losses, key=lambda lr: mean(losses[lr][:seeds]))


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float) -> float | None:
    """The first step at which the loss reaches `target`, linear between evaluations; None if it never does."""
    for i, (s, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(s)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (s - s0) * (l0 - target) / (l0 - loss)
    return None


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": mean(values), "min": min(values), "max": max(values), "n": len(values)}


def table(results: Sequence[Result], baseline: str = "random") -> list[dict[str, Any]]:
    """One row per (shape, objective, arm): every column's mean, min and max over seeds. The baseline is the arm
    named `baseline` with the same shape, objective and seed (its best learning rate: the caller names it so)."""
    random_final = {(r.run.shape, r.run.objective, r.run.seed): r for r in results if r.run.arm.name == baseline}
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.run.shape, r.run.objective, r.run.arm.name), []).append(r)
    rows = []
    for (shape, objective, name), members in groups.items():
        reached, speedups = [], []
        for r in members:
            ref = random_final.get((shape, objective, r.run.seed))
            if ref is None:
                continue
            h = r.history
            steps = steps_to_reach(h["steps"], h["val_loss"], ref.final_val_loss)
            total = ref.history["steps"][-1]
            reached.append(steps)
            if steps is not None:  # reached at step 0: counted as reached at step 1
                speedups.append(total / max(steps, 1.0))
        row = {"shape": shape, "objective": objective, "arm": name, "lr": members[0].run.arm.lr,
               "seeds": [r.run.seed for r in members],
               "val_loss_0": spread([r.val_loss_0 for r in members]),
               "error_0": spread([r.error_0 for r in members]),
               "final_val_loss": spread([r.final_val_loss for r in members]),
               "steps_to_random": reached, "not_reached": sum(x is None for x in reached),
               "speedup": spread(speedups) if speedups else None,
               "seconds": spread([r.seconds for r in members])}
        accuracies = [r.prompt_accuracy for r in members if r.prompt_accuracy is not None]
        row["prompt_accuracy"] = spread(accuracies) if accuracies else None
        rows.append(row)
    return rows
