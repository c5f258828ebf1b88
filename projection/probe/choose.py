"""`layers: recoverable`: of a few candidate block subsets, the one whose short distillation recovers best
(TinyFusion's idea, without its learned mask).

Candidates: uniform, first, last, the most influential blocks (1 - cos of each block's residual update), the blocks
whose removal alone changes the teacher's output most; then one round of local search around the best (each kept
block moved to a neighbour). Each is projected under the rest of the strategy and probed (`recovery.probe`: the same
stream, targets computed once, one rate) for CHOOSE's 50 steps; the lowest held-out error wins (the earlier
candidate on a tie). The result is an explicit block list, so what is exported names the blocks it kept.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..core.mapping import blocks_per_stack, stacked_layers, top_blocks
from ..core.strategy import RECOVERABLE, Strategy
from ..distill.loss import noise_band
from ..engine.projector import Projector
from ..errors import ProjectionError
from ..function.activations import teacher_removal
from ..function.calibration import Calibration
from .recovery import Candidate, Outcome, ProbeConfig, default_rates, probe
from .targets import Progress, split

CHOOSE = ProbeConfig(steps=50, evals=1)  # per candidate subset; one rate (the middle of the default grid)


def candidate_layers(projector: Projector, train: Calibration, device: torch.device,
                     cache: Any = None) -> dict[str, list[int]]:
    """The rule-made subsets, by name, without repeats (the activation statistics must be on `train`)."""
    teacher, student = blocks_per_stack(projector.teacher.config), blocks_per_stack(projector.student.config)
    found = {m: stacked_layers(m, teacher, student) for m in ("uniform", "first", "last")}
    found["influence"] = top_blocks(projector.activations.influence, teacher, student)
    removal = teacher_removal(projector.teacher, projector.fingerprint, train, band=noise_band(projector.teacher),
                              device=device, cache=cache)
    found["removal effect"] = top_blocks(removal, teacher, student)
    unique: dict[str, list[int]] = {}
    for name, layers in found.items():
        if layers not in unique.values():
            unique[name] = layers
    return unique


def neighbours(layers: list[int], teacher: int) -> list[list[int]]:
    """Each kept block moved one block up or down, where the list stays increasing within the teacher."""
    out = []
    for i, b in enumerate(layers):
        for moved in (b - 1, b + 1):
            new = [*layers[:i], moved, *layers[i + 1:]]
            if 0 <= moved < teacher and all(x < y for x, y in zip(new, new[1:])):
                out.append(new)
    return out


def choose_layers(projector: Projector, calibration: Calibration, strategy: Strategy,
                  config: ProbeConfig | None = None, device: torch.device | None = None,
                  progress: Progress | None = None, cache: Any = None) -> tuple[list[int], list[Outcome]]:
    """(the chosen block list, every candidate's outcome in the order probed) for `strategy` (its other fields kept;
    `config`: CHOOSE if None). Activation statistics rank on the training part of the set while choosing; the
    projector's own calibration is put back after."""
    if projector.student.layout == "custom" or not projector.student.config.num_layers:
        raise ProjectionError(f"{projector.student.source}: layers: recoverable needs the student's block count")
    device = device or projector.device
    rate = default_rates(int(projector.student_config(strategy.model_copy(update={"layers": "uniform"})).dim))[1]
    config = replace(config or CHOOSE, rates=(config or CHOOSE).rates or (rate,))
    train, _ = split(calibration, config.holdout)
    with projector.calibration_kept():  # the choice ranks on the training part only; the caller's set stays
        projector.calibrate(train, device=device)
        return _choose(projector, calibration, train, strategy, config, device, progress, cache)


def _choose(projector: Projector, calibration: Calibration, train: Calibration, strategy: Strategy,
            config: ProbeConfig, device: torch.device, progress: Progress | None,
            cache: Any) -> tuple[list[int], list[Outcome]]:
    teacher = int(projector.teacher.config.num_layers)

    layers_of: dict[str, list[int]] = {}

    def run(named: dict[str, list[int]]) -> list[Outcome]:
        layers_of.update(named)
        found = [Candidate(name, strategy.model_copy(update={"layers": layers}), str(layers))
                 for name, layers in named.items()]
        return probe(projector, calibration, found, config, device, progress, cache).outcomes

    outcomes = run(candidate_layers(projector, train, device, cache))
    best = min(outcomes, key=lambda o: o.error)
    around = {f"near {best.name}: {n}": n for n in neighbours(layers_of[best.name], teacher)
              if n not in layers_of.values()}
    outcomes += run(around) if around else []
    return layers_of[min(outcomes, key=lambda o: o.error).name], outcomes


def resolve_layers(projector: Projector, calibration: Calibration | None, strategy: Strategy | None = None,
                   **kwargs: Any) -> tuple[Strategy, list[Outcome]]:
    """`strategy` (the projector's if None) with `layers: recoverable` replaced by the chosen list (unchanged
    otherwise, with no outcomes)."""
    strategy = strategy or projector.strategy
    if strategy.layers != RECOVERABLE:
        return strategy, []
    if calibration is None:
        raise ProjectionError("layers: recoverable probes candidate block subsets on a calibration set: give one "
                              "(CLI: --calibration FILE|demo|synthetic)")
    layers, outcomes = choose_layers(projector, calibration, strategy, **kwargs)
    return strategy.model_copy(update={"layers": layers}), outcomes
