"""The function report: what the student computes next to the teacher, on one calibration set, in one place
(the app's Function view and `projection fidelity` show it).

  fidelity      the velocity error and cosine per noise band and overall, per student block, for the student and
                two references of its shape (random init, svd-per-matrix)   (`student_fidelity`)
  teacher       per teacher block: influence 1 - cos(h_in, h_out) and the exact effect of removing it alone
                (`activations`), and which student blocks it feeds
  agreement     per space, how far weight-ranked and activation-ranked index sets agree (`plan.overlap`)
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..arch.anatomy import SPACES
from ..arch.wan import WanLite
from ..core.project import pick_device
from ..core.strategy import Strategy
from ..function.activations import ranking_agreement, teacher_removal
from ..function.calibration import Calibration
from ..function.fidelity import block_fidelity, block_streams, check_request, fidelity_table
from ..function.forward import StreamedTeacher
from ..function.noise import expert_band
from .build import projected_student, random_student
from .projector import Projector

Progress = Callable[[int, int, str], None]
REMOVAL_DRAWS = 1  # noise draws per latent behind the removal effects (L(L+1)/2 block evaluations)


def student_fidelity(projector: Projector, calibration: Calibration, student: nn.Module | None = None,
                     draws: int = 4, seed: int = 0, device: str | torch.device = "cpu",
                     blocks: bool = True, strategy: Strategy | None = None) -> dict[str, Any]:
    """The fidelity of a student (`student`, else the projector's projection under `strategy`, its default if
    None) and, for scale, of two reference
    students of the same shape: randomly initialized and projected with `width: svd-per-matrix`. The teacher
    streams (one block in memory); the noise levels are those its expert serves. The request is checked against
    the work bounds (`budget`) before anything runs."""
    strategy = strategy or projector.strategy
    config = projector.student_config(strategy)
    check_request(calibration.source, projector.teacher.config, calibration.latents, calibration.context, draws,
                  models=4, streams=block_streams(projector.teacher.config, config, 3) if blocks else 1)
    teacher = StreamedTeacher(projector.teacher, device)
    reference = Strategy(width="svd-per-matrix", layers=projector.mapping(strategy).layers, seed=strategy.seed)
    svd = Projector(projector.teacher, projector.student, reference, projector.rules)
    students = {"student": (student or projected_student(projector, strategy=strategy)).to(device).float(),
                "random init": random_student(config, strategy.seed).to(device),
                "svd-per-matrix": projected_student(svd, device)}
    expert = projector.teacher.checkpoint.expert if projector.teacher.checkpoint else None
    band = expert_band(expert, projector.teacher.config.in_dim)
    table = fidelity_table(students, teacher, calibration.latents, calibration.context, draws, seed, band)
    per_block = (block_fidelity(projector.plan(strategy), students, calibration.latents, calibration.context, draws, seed, band,
                                device) if blocks and isinstance(students["student"], WanLite) else None)
    return {"calibration": calibration.label, "calibration_synthetic": calibration.synthetic,
            "noise_draws": draws, "noise_seed": seed, "noise_levels": list(band),
            "meaning": "relative_error = sum |v_student - v_teacher|^2 / sum |v_teacher|^2 of the velocity on the "
                       "calibration latents at fixed noise (0: the teacher's function)",
            "students": {name: f.to_dict() for name, f in table.items()},
            "blocks_meaning": "per student block: |h_student - h_teacher[kept]|^2 / |h_teacher[kept]|^2 of its output "
                              "against the teacher block it came from, on the kept residual channels",
            "blocks": per_block}


def function_report(projector: Projector, calibration: Calibration, draws: int = 2, seed: int = 0,
                    progress: Progress | None = None, strategy: Strategy | None = None) -> dict[str, Any]:
    """Calibrate the projector on `calibration` (activation statistics, cached) and measure everything above, for
    the student projected under `strategy` (the projector's default if None)."""
    strategy = strategy or projector.strategy
    device = pick_device(strategy.device)

    def stage(name: str) -> Progress | None:
        return (lambda i, n, what: progress(i, n, f"{name}: {what}")) if progress else None

    acts = projector.calibrate(calibration, draws, seed, progress=stage("teacher activations"), device=device)
    expert = projector.teacher.checkpoint.expert if projector.teacher.checkpoint else None
    band = expert_band(expert, projector.teacher.config.in_dim)
    removal = teacher_removal(projector.teacher, projector.fingerprint, calibration, REMOVAL_DRAWS, seed, band,
                              device, progress=stage("each teacher block removed"))
    if progress:
        progress(0, 1, "fidelity: the student, random init and svd-per-matrix against the teacher")
    fidelity = student_fidelity(projector, calibration, draws=draws, seed=seed, device=device, strategy=strategy)
    layers = projector.mapping(strategy).layers
    teacher = [{"block": b, "influence": acts.influence[b], "removal_error": removal[b],
                "feeds": [i for i, t in enumerate(layers) if t == b]} for b in range(len(acts.influence))]
    agreement = [{"space": space, "label": SPACES[space].label, "overlap": shared, "chance": chance}
                 for space, (shared, chance) in ranking_agreement(projector, strategy).items()]
    return {"fidelity": fidelity, "teacher_blocks": teacher, "removal_draws": REMOVAL_DRAWS,
            "agreement": agreement, "activations_from": acts.about}
