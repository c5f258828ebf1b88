"""A calibration set's first measurement in one pass over the teacher's weights.

The Function view needs three things of the teacher on a new set: its activation statistics (`activations.collect`),
each block's removal effect (`activations.removal_effects`) and its outputs (`fidelity.teacher_reference`, block
outputs kept where they fit). Run apart, each reads every block of a real teacher once; here each block is read once
and handed to all three: the statistics' hooks and the kept outputs watch the main stream, the removal streams ride
the same block after it (`StreamedTeacher.walk`). Every stream, noise draw and micro-batch is the one its own
function uses, so each result equals that function's. Students that need nothing this pass measures (projected
from the weights alone) can walk beside it too (`fidelity.StudentWalk`), so that a teacher whose block outputs
are too large to keep is still read once for their velocity and per-block errors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.models import ModelView
from .activations import Activations, Removal, Statistics, describe, removal_set
from . import budget
from .calibration import Calibration
from .fidelity import BlockOutputs, Reference, StudentWalk, block_streams, check_request, keeps_blocks
from .forward import Rider, StreamedTeacher
from .noise import noised_set

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Survey:
    activations: Activations | None  # None where not asked for
    removal: list[float] | None
    reference: Reference | None
    students: StudentWalk | None  # the students that walked beside the teacher: their rows and velocities


def survey(teacher: ModelView, calibration: Calibration, draws: int = 2, seed: int = 0,
           band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu", *, statistics: bool = True,
           removal_draws: int | None = 1, reference: bool = True, key: str = "",
           students: dict[str, nn.Module] | None = None, layers: list[int] | None = None,
           kept: torch.Tensor | None = None, progress: Progress | None = None) -> Survey:
    """The statistics (`key`: their cache key) and the reference on `draws` noise draws per latent, the removal
    effects on `removal_draws` (None: not measured), and `students` beside the teacher (their block i against
    teacher block layers[i] on the residual channels `kept`), from one pass over the teacher's weights. Every request
    is checked against the work bounds before the teacher is read."""
    config, source = teacher.config, calibration.source
    latents, context = calibration.latents, calibration.context
    if statistics:
        budget.check_work(source, latents.shape, context.shape, config, draws)
    reference = reference or bool(students)  # the students' errors are against the teacher's velocities
    if reference:
        sizes = budget.module_config(next(iter(students.values()))) if students else None
        check_request(source, config, latents, context, draws, models=2 + len(students or {}),
                      streams=block_streams(config, sizes, len(students)) if students else 1)
    removal_inputs = removal_set(teacher, calibration, removal_draws, seed, band) if removal_draws else None
    streamed = StreamedTeacher(teacher, device)
    riders: list[Rider] = []
    removal = Removal(streamed, *removal_inputs) if removal_inputs else None
    if removal is not None:
        riders.append(removal)
    if progress is not None:
        depth = int(config.num_layers)
        riders.append(lambda b, _: progress(b, depth, f"teacher block {b} (statistics, each block removed in turn, "
                                                      "outputs)"))
    stats = Statistics(teacher) if statistics else None
    found: Reference | None = None
    walk: StudentWalk | None = None
    if stats is None and not reference:
        streamed.walk(riders)
    else:
        x, t, ctx = noised_set(latents, context, draws, seed, band)
        outputs = BlockOutputs() if reference and keeps_blocks(config, x.shape) else None
        if students:
            walk = StudentWalk(students, layers or [], kept, x, t, ctx, streamed.chunks(x, ctx), streamed.device)
        watchers = [w.on_block for w in (stats, outputs, walk) if w is not None]

        def on_block(index: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
            for watch in watchers:
                watch(index, x_in, x_out)

        velocity = streamed(x, t, ctx, on_block, stats.on_input if stats else None,
                            stats.hooked if stats else lambda block: (),
                            stats.on_weights if stats else None, riders)
        if reference:
            blocks = outputs.blocks(int(config.num_layers)) if outputs is not None else None
            found = Reference(x, t, ctx, velocity, draws, band, blocks)
    return Survey(stats.result(describe(calibration, draws, band), key) if stats else None,
                  removal.effects() if removal is not None else None, found, walk)
