"""Recoverability: which of several starts trains best, measured by training each for a few steps.

Every candidate start (random init, the default projection, and the strategies given) is distilled for K steps from
the teacher's velocity (`distill.output_loss`, AdamW, 10% warmup then cosine to K: the benchmark's recipe) on the
training part of a calibration set: the same inputs in the same order for every candidate (`targets.Stream`), the
teacher's targets computed once. Each candidate trains at every rate of a small grid from the same start and keeps
its best; its velocity error on the held-out part (`fidelity`: relative to the teacher's output, 0 is the teacher) is
taken at step 0 and along the way. Candidates rank by the error after K steps, the error a short distillation
leaves: the benchmark shows that the step-0 error does not predict training (TinyFusion found the same on DiT).

With a random-init ladder (budgets), random init also trains at each budget (its own schedule and best rate), and a
candidate's equivalent budget is the random budget that reaches its error (`ladder.equivalent_budget`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch.config import ModelConfig
from ..arch.layout import build_student
from ..cancel import checkpoint
from ..core.project import pick_device
from ..core.strategy import Strategy
from ..distill.loss import noise_band, output_loss
from ..distill.schedule import cosine_rate, warmup_steps
from ..engine.build import projected_student, random_student
from ..engine.projector import Projector
from ..errors import ProjectionError
from ..function.calibration import Calibration
from .ladder import Equivalent, equivalent_budget
from .targets import Progress, Request, Targets, split, teacher_targets

RANDOM, DEFAULT = "random init", "default"
MAX_STEPS = 10_000  # a probe is short: its budget and every ladder rung at most this
MAX_BATCH = 1024
MAX_RATES = 8
MAX_CANDIDATES = 16


def default_rates(dim: int) -> tuple[float, ...]:
    """Three AdamW rates 4x apart around 8e-3 * 64 / dim: on the demo the benchmark's best rates at 200 steps were
    8e-3 and 1.6e-2 for a width-64 student; wider students take smaller rates (about 1/width)."""
    centre = float(f"{8e-3 * 64 / max(dim, 1):.1g}")
    return (centre / 4, centre, centre * 4)


@dataclass(frozen=True)
class ProbeConfig:
    steps: int = 100  # K: each candidate's budget
    batch: int = 16
    rates: tuple[float, ...] | None = None  # None: `default_rates` of the student's width
    holdout: float = 0.2  # share of the set held out for measuring
    draws: int = 2  # noise draws per held-out latent
    seed: int = 0  # the stream (order, noise, levels) and random init's weights
    evals: int = 4  # measurements after step 0 (evenly spaced, the last at K; at most one per step)
    ladder: tuple[int, ...] = ()  # random init's budgets besides K
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    warmup_share: float = 0.1
    floor_ratio: float = 0.05

    def check(self) -> None:
        """One line naming the value at fault, before any work."""
        def bad(what: str) -> None:
            raise ProjectionError(f"probe: {what}")
        if not 1 <= self.steps <= MAX_STEPS:
            bad(f"steps {self.steps}: expected 1..{MAX_STEPS}")
        if not 1 <= self.batch <= MAX_BATCH:
            bad(f"batch {self.batch}: expected 1..{MAX_BATCH}")
        if self.rates is not None and not (1 <= len(self.rates) <= MAX_RATES
                                           and all(math.isfinite(r) and 0 < r < 1 for r in self.rates)):
            bad(f"rates {list(self.rates)}: expected 1..{MAX_RATES} rates, each in (0, 1)")
        if not 0 < self.holdout < 1:
            bad(f"holdout {self.holdout:g}: expected a share in (0, 1)")
        if not 1 <= self.draws <= 64:
            bad(f"draws {self.draws}: expected 1..64")
        if not 1 <= self.evals <= MAX_STEPS:
            bad(f"evals {self.evals}: expected 1..{MAX_STEPS}")
        if any(not 1 <= n <= MAX_STEPS for n in self.ladder) or len(set(self.ladder)) != len(self.ladder):
            bad(f"random ladder {list(self.ladder)}: expected distinct budgets of 1..{MAX_STEPS} steps")

    @property
    def budgets(self) -> tuple[int, ...]:
        """Random init's ladder, K included, ascending."""
        return tuple(sorted({self.steps, *self.ladder}))


@dataclass(frozen=True)
class Candidate:
    """A start: `strategy` projects it; None is random init (the student's config, fresh weights)."""
    name: str
    strategy: Strategy | None
    origin: str = "built in"


def candidates(strategies: dict[str, Strategy] | None = None, origins: dict[str, str] | None = None) -> list[Candidate]:
    """Random init and the default projection, then each named strategy (its name must be new)."""
    found = [Candidate(RANDOM, None), Candidate(DEFAULT, Strategy())]
    for name, strategy in (strategies or {}).items():
        if any(c.name == name for c in found):
            raise ProjectionError(f"probe: two candidates are named '{name}'")
        found.append(Candidate(name, strategy, (origins or {}).get(name, name)))
    if len(found) > MAX_CANDIDATES:
        raise ProjectionError(f"probe: {len(found)} candidates; at most {MAX_CANDIDATES}")
    return found


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    error: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        """The last error; a diverged run (not finite) counts as infinitely bad."""
        return self.error[-1] if math.isfinite(self.error[-1]) else math.inf


@dataclass
class Outcome:
    name: str
    origin: str
    rate: float  # the grid's best
    error_0: float  # held-out velocity error at step 0
    error: float  # after K steps at `rate`
    curve: Curve
    by_rate: dict[float, float]  # the error after K steps at each rate
    rank: int = 0  # by `error` (1: best)
    rank_0: int = 0  # by `error_0`
    random_budget: Equivalent | None = None  # the random budget reaching `error` (a ladder was probed)

    @property
    def edge(self) -> bool:
        """The best rate is the grid's smallest or largest, so a rate outside the grid may do better."""
        return len(self.by_rate) > 1 and self.rate in (min(self.by_rate), max(self.by_rate))


@dataclass
class ProbeResult:
    calibration: str
    synthetic: bool
    train_latents: int
    heldout_latents: int
    config: ProbeConfig
    band: tuple[float, float]
    teacher_passes: int  # 0: the targets came from the cache
    outcomes: list[Outcome]
    ladder: list[dict[str, float]]  # random init per budget: steps, rate, error

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        for o, d in zip(self.outcomes, found["outcomes"]):
            d["random_budget"] = None if o.random_budget is None else format(o.random_budget, ".0f")
            d["rate_at_grid_edge"] = o.edge
        found["meaning"] = ("error = sum |v_student - v_teacher|^2 / sum |v_teacher|^2 of the velocity on the held-out "
                            "latents at fixed noise (0: the teacher's function), at step 0 and after each candidate's "
                            "short distillation; rank 1 trains best")
        return found


def distill_run(model: nn.Module, targets: Targets, rate: float, steps: int, config: ProbeConfig,
                device: torch.device) -> Curve:
    """Train `model` in place for `steps` steps of the stream (its own schedule), measuring the held-out error at
    step 0 and `config.evals` evenly spaced steps. Stops early, with an infinite error, if the loss diverges."""
    opt = torch.optim.AdamW(model.parameters(), lr=rate, betas=config.betas, weight_decay=config.weight_decay,
                            foreach=True)  # one kernel per step for all tensors (CPU defaults to one per tensor)
    at = {round(steps * (k + 1) / config.evals) for k in range(config.evals)} - {0}
    warm = warmup_steps(steps, config.warmup_share)

    def measure(step: int) -> None:
        curve.steps.append(step)
        curve.error.append(targets.reference.score(model).relative_error)

    curve = Curve()
    measure(0)
    model.train()
    for step in range(steps):
        checkpoint()
        x, t, ctx, v = targets.batch(step, device)
        for group in opt.param_groups:
            group["lr"] = cosine_rate(step, steps, rate, warm, config.floor_ratio)
        loss = output_loss(model(x, t, ctx), v)
        if not torch.isfinite(loss):
            curve.steps.append(step + 1)
            curve.error.append(math.inf)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if step + 1 in at:
            model.eval()
            measure(step + 1)
            model.train()
    model.eval()
    return curve


def best_of(start: dict[str, torch.Tensor], student: ModelConfig, targets: Targets, rates: Sequence[float],
            steps: int, config: ProbeConfig, device: torch.device, done: Callable[[str], None],
            keep: bool = False) -> tuple[float, Curve, dict[float, float], nn.Module | None]:
    """Train a copy of `start` (a state of a `student`-config model) at each rate; (best rate, its curve, the final
    error at each rate, and with `keep` the model trained at the best rate: two models in memory at most)."""
    curves: dict[float, Curve] = {}
    kept: nn.Module | None = None
    for rate in rates:
        model = build_student(student, "meta")
        model.load_state_dict({k: v.clone() for k, v in start.items()}, assign=True, strict=True)
        curves[rate] = distill_run(model.to(device), targets, rate, steps, config, device)
        if keep and all(curves[rate].final < c.final for r, c in curves.items() if r != rate):
            kept = model  # the first of equals, as `min` below picks
        done(f"{rate:g}")
    best = min(rates, key=lambda r: curves[r].final)
    return best, curves[best], {r: c.final for r, c in curves.items()}, kept


def ranks(values: Sequence[float]) -> list[int]:
    """1 for the smallest; ties share the better rank."""
    return [1 + sum(w < v for w in values) for v in values]


Kept = Callable[[str, dict[str, torch.Tensor], nn.Module], None]  # (candidate, its start, trained at its best rate)


def _outcome(projector: Projector, c: Candidate, student: ModelConfig, targets: Targets, rates: Sequence[float],
             config: ProbeConfig, device: torch.device, done: Callable[[str], None], keep: Kept | None) -> Outcome:
    """One candidate's start distilled at each rate: its outcome at the best rate (handed to `keep`, if given)."""
    model = random_student(student, config.seed) if c.strategy is None else \
        projected_student(projector, strategy=c.strategy)
    start = model.float().state_dict()
    rate, curve, by_rate, trained = best_of(start, student, targets, rates, config.steps, config, device,
                                            lambda r: done(f"{c.name} at rate {r}"), keep is not None)
    if keep is not None and trained is not None:
        keep(c.name, start, trained)
    return Outcome(c.name, c.origin, rate, curve.error[0], curve.final, curve, by_rate)


def probe(projector: Projector, calibration: Calibration, found: Sequence[Candidate],
          config: ProbeConfig = ProbeConfig(), device: str | torch.device | None = None,
          progress: Progress | None = None, cache: Any = None, keep: Kept | None = None) -> ProbeResult:
    """Distill each candidate start for `config.steps` steps and rank them by the held-out error they reach.
    Activation choices rank on the training part of the set only (the held-out part only measures). `keep`, if
    given, is handed each candidate's name, its start (float32 state) and its model trained at its best rate, as
    each candidate finishes (to draw it; nothing else changes). The projector's calibration is its own again
    after."""
    config.check()
    device = torch.device(device) if device is not None else pick_device(projector.strategy.device)
    student = projector.student_config()
    rates = config.rates or default_rates(int(student.dim))
    band = noise_band(projector.teacher)
    request = Request(max(config.budgets), config.batch, config.holdout, config.draws, config.seed, band)
    train, heldout = split(calibration, config.holdout)
    runs = len(found) * len(rates) + (len(config.budgets) - 1) * len(rates)
    count = 0

    def done(what: str) -> None:
        nonlocal count
        count += 1
        if progress:
            progress(count, runs, what)

    targets = teacher_targets(projector.teacher, projector.fingerprint, calibration, request, device, cache,
                              None if progress is None else lambda i, n, what: progress(0, runs, what))
    with projector.calibration_kept():
        if any(c.strategy is not None and c.strategy.needs_calibration for c in found):
            projector.calibrate(train, device=device)
        outcomes = [_outcome(projector, c, student, targets, rates, config, device, done, keep) for c in found]
    for o, r, r0 in zip(outcomes, ranks([o.error for o in outcomes]), ranks([o.error_0 for o in outcomes])):
        o.rank, o.rank_0 = r, r0
    ladder = []
    if config.ladder:
        fresh = random_student(student, config.seed).state_dict()
        random_at_k = next((o for o in outcomes if o.name == RANDOM), None)
        for n in config.budgets:
            if n == config.steps and random_at_k is not None:
                ladder.append({"steps": n, "rate": random_at_k.rate, "error": random_at_k.error})
                continue
            rate, curve, _, _ = best_of(fresh, student, targets, rates, n, config, device,
                                        lambda r, n=n: done(f"random init, {n} steps, rate {r}"))
            ladder.append({"steps": n, "rate": rate, "error": curve.final})
        errors = [rung["error"] for rung in ladder]
        for o in outcomes:
            o.random_budget = equivalent_budget(list(config.budgets), errors, o.error)
    return ProbeResult(calibration.label, calibration.synthetic, len(train), len(heldout), config, band,
                       targets.passes, outcomes, ladder)
