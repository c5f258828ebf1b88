"""Distillation loss for a projected student: the teacher's velocity as the target, plus per-block hints.

At the same noised input x_s = (1 - s) x0 + s eps (timestep 1000 s), with the teacher under no_grad:

    output  = mean |v_student - v_teacher|^2                              (the velocity, every element)
    hint_i  = |h_i - g_b(i)[kept]|^2 / |g_b(i)[kept]|^2                    (student block i's output h_i against
                                                                          its teacher block b(i)'s output g,
                                                                          on the residual channels it keeps)
    loss    = output + hint_weight * mean_i hint_i

The hints need what the projection decided (`Hints`: each student block's teacher block and the kept residual
channels, from a projector's plan); the normalization makes each block count alike whatever its stream's scale.
The teacher is a WanLite in memory or a `StreamedTeacher` (one block of weights at a time: for teachers that do
not fit); both give the same loss. Noise levels: uniform in the band a Wan 2.2 expert serves (`noise_band`),
drawn from the caller's generator (`sample_levels`), never the global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..arch.wan import WanLite
from ..core.models import ModelView
from ..errors import ProjectionError
from ..function.forward import StreamedTeacher
from ..function.noise import TIMESTEPS, add_noise

if TYPE_CHECKING:
    from ..core.plan import Plan
    from ..core.strategy import Strategy
    from ..engine.projector import Projector

Teacher = WanLite | StreamedTeacher


@dataclass(frozen=True)
class Hints:
    """What the hints compare: student block i against teacher block `teacher_blocks[i]`'s output, on the teacher's
    residual channels `kept` (ascending; None: all of them, a student as wide as its teacher)."""
    teacher_blocks: tuple[int, ...]
    kept: torch.Tensor | None = None

    @classmethod
    def from_plan(cls, plan: Plan) -> Hints:
        return cls(tuple(int(b) for b in plan.mapping.layers), plan.indices("resid", None))

    @classmethod
    def from_projector(cls, projector: Projector, strategy: Strategy | None = None) -> Hints:
        """The hints of the student `projector` projects under `strategy` (its own if None)."""
        return cls.from_plan(projector.plan(strategy))


def noise_band(teacher: Teacher | ModelView | nn.Module) -> tuple[float, float]:
    """The noise levels s the teacher serves: its expert's band (a streamed teacher or a checkpoint's view knows its
    expert; its family the band), else all of [0, 1]."""
    view = teacher.teacher if isinstance(teacher, StreamedTeacher) else teacher
    return view.band if isinstance(view, ModelView) else (0.0, 1.0)


def sample_levels(n: int, generator: torch.Generator, band: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """n noise levels uniform in `band`, from `generator` (with (0, 1): exactly torch.rand(n, generator))."""
    lo, hi = band
    if not 0.0 <= lo < hi <= 1.0:
        raise ProjectionError(f"noise band {band}: expected 0 <= low < high <= 1")
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _blocks_out(model: WanLite, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                keep: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The velocity and the output of every block in `keep` (a module in memory, run block by block)."""
    inp = model.embed(x, t, context)
    h, outputs = inp.tokens, {}
    for i, block in enumerate(model.blocks):
        h = block(h, inp.e0, inp.ctx, inp.freqs)
        if i in keep:
            outputs[i] = h
    return model.unpatchify(h, inp.e, inp.grid), outputs


@torch.no_grad()
def _teacher_out(teacher: Teacher | nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 keep: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    if isinstance(teacher, StreamedTeacher):
        found: dict[int, list[torch.Tensor]] = {}
        closed: set[int] = set()  # a block the teacher runs twice (a `blocks` list): its first pass is hinted

        def opened(index: int, _: nn.Module) -> None:
            if index in found:
                closed.add(index)

        def hook(index: int, _: torch.Tensor, out: torch.Tensor) -> None:
            if index in keep and index not in closed:  # micro-batches arrive in order
                found.setdefault(index, []).append(out)

        v = teacher(x, t, context, on_block=hook, on_weights=opened)
        return v.to(x.device), {i: torch.cat(parts).to(x.device) for i, parts in found.items()}
    if not keep:
        return teacher(x, t, context), {}
    if not isinstance(teacher, WanLite):
        raise ProjectionError(f"teacher {type(teacher).__name__}: hints need a WanLite or a StreamedTeacher")
    return _blocks_out(teacher, x, t, context, keep)


def hint_loss(student_blocks: list[torch.Tensor], teacher_blocks: list[torch.Tensor],
              kept: torch.Tensor | None) -> torch.Tensor:
    """Mean over blocks of |h_s - h_t[kept]|^2 / |h_t[kept]|^2 (each sum over the whole batch)."""
    terms = []
    for hs, ht in zip(student_blocks, teacher_blocks):
        target = (ht if kept is None else ht[..., kept.to(ht.device)]).float()
        if target.shape != hs.shape:
            raise ProjectionError(f"hint target {list(target.shape)} for a student block output {list(hs.shape)}: "
                                  "the kept residual channels must be the student's width")
        terms.append((hs.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def output_loss(v_student: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
    """The output term: mean |v_student - v_teacher|^2 over every element (float32)."""
    return (v_student.float() - v_teacher.float()).pow(2).mean()


def distill_loss(student: nn.Module, teacher: Teacher | nn.Module, x0: torch.Tensor, context: torch.Tensor,
                 eps: torch.Tensor, s: torch.Tensor, hints: Hints | None = None,
                 hint_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, parts) at x_s for latents x0 [B, C, H, W], prompt states context [B, L, T], noise eps (x0's shape)
    and levels s [B]: the output term, plus hint_weight times the hint term where hints are given and the weight
    is positive (student: a WanLite then). parts: 'output', 'hint' (when computed) and 'loss', as floats."""
    if hint_weight < 0:
        raise ProjectionError(f"hint_weight {hint_weight}: expected >= 0")
    x, t = add_noise(x0, eps, s), TIMESTEPS * s
    hinted = hints is not None and hint_weight > 0
    if not hinted:
        v_teacher, _ = _teacher_out(teacher, x, t, context, set())
        output = output_loss(student(x, t, context), v_teacher)
        return output, {"output": output.item(), "loss": output.item()}
    if not isinstance(student, WanLite):
        raise ProjectionError(f"student {type(student).__name__}: hints read a WanLite's block outputs")
    if len(hints.teacher_blocks) != len(student.blocks):
        raise ProjectionError(f"hints for {len(hints.teacher_blocks)} blocks; the student has {len(student.blocks)}")
    v_teacher, targets = _teacher_out(teacher, x, t, context, set(hints.teacher_blocks))
    missing = sorted(set(hints.teacher_blocks) - targets.keys())
    if missing:
        raise ProjectionError(f"teacher blocks {missing}: hinted, but the teacher does not run them")
    v_student, outputs = _blocks_out(student, x, t, context, set(range(len(student.blocks))))
    output = output_loss(v_student, v_teacher)
    hint = hint_loss([outputs[i] for i in range(len(student.blocks))], [targets[b] for b in hints.teacher_blocks],
                     hints.kept)
    loss = output + hint_weight * hint
    return loss, {"output": output.item(), "hint": hint.item(), "loss": loss.item()}
