"""Fidelity: how close a student's function is to the teacher's, on the same inputs.

On calibration latents x0 with fixed noise (`noise.validation_noise`: the same eps and levels for every model),
both models predict the velocity at x_s; the student's error is measured against the teacher's prediction:

    relative error = sum ||v_student - v_teacher||^2 / sum ||v_teacher||^2     (0: the teacher's function;
                                                                             about 1 for an unrelated model)
    cosine         = <v_student, v_teacher> / (||v_student|| ||v_teacher||)   (1: the teacher's direction)

summed over samples and noise draws, overall and per noise-level band (draw k covers s in [k/draws, (k+1)/draws)
of the levels requested: all of [0, 1], or the band one Wan 2.2 expert serves).

Per block (`block_fidelity`): student block i's output against the output of the teacher block it came from, on
the residual channels the student keeps, each model on its own stream (so earlier blocks' errors carry over, as
they do when the student runs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..arch.config import ModelConfig
from ..arch.wan import WanLite
from ..cancel import checkpoint
from ..errors import ProjectionError
from . import budget
from .forward import StreamedTeacher, TeacherCursor, predict, step
from .noise import noised_set

if TYPE_CHECKING:
    from ..core.plan import Plan


@dataclass(frozen=True)
class Fidelity:
    relative_error: float
    cosine: float
    by_level: list[dict[str, float]]  # per band of noise levels: s_low, s_high, relative_error, cosine

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(num: torch.Tensor | float, den: torch.Tensor | float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def compare(v_student: torch.Tensor, v_teacher: torch.Tensor, draws: int,
            band: tuple[float, float] = (0.0, 1.0)) -> Fidelity:
    """Fidelity of draw-major velocities [draws * N, ...] (float64 sums; level band k = draw k's noise levels)."""
    vs, vt = (v.double().reshape(draws, -1) for v in (v_student, v_teacher))
    sums = torch.stack([(vs - vt).pow(2).sum(1), vt.pow(2).sum(1), (vs * vt).sum(1), vs.pow(2).sum(1)], 1)
    lo, width = band[0], (band[1] - band[0]) / draws
    bands = [{"s_low": lo + k * width, "s_high": lo + (k + 1) * width, "relative_error": _ratio(d, t),
              "cosine": _ratio(st, (t * ss).sqrt())} for k, (d, t, st, ss) in enumerate(sums)]
    d, t, st, ss = sums.sum(0)
    return Fidelity(_ratio(d, t), _ratio(st, (t * ss).sqrt()), bands)


@dataclass(frozen=True)
class Reference:
    """A noised set and the teacher's outputs on it: run the teacher once, score any number of students. `blocks`:
    each teacher block's output stream [samples, tokens, dim] (float32), kept where it fits REFERENCE_BLOCK_BYTES,
    so per-block errors need no second teacher pass."""
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    velocity: torch.Tensor
    draws: int
    band: tuple[float, float]
    blocks: tuple[torch.Tensor, ...] | None = None

    def score(self, student: nn.Module) -> Fidelity:
        return self.measure(student)[0]

    @torch.no_grad()
    def measure(self, student: nn.Module, layers: list[int] | None = None,
                kept: torch.Tensor | None = None) -> tuple[Fidelity, list[dict[str, float]] | None]:
        """The student's fidelity and, where the teacher's block outputs are kept and `layers` (the teacher block
        each student block came from) is given, its per-block rows as `block_fidelity` computes them (on the
        residual channels `kept`): both from one forward of the student."""
        if layers is None or self.blocks is None or not isinstance(student, WanLite):
            return compare(predict(student, self.x, self.t, self.context), self.velocity, self.draws, self.band), None
        device = next(student.parameters()).device
        sizes = budget.module_config(student)
        step = budget.micro_batch(sizes, budget.tokens_per_latent(*self.x.shape[-2:]), self.context.shape[1], 256)
        errors, totals = [0.0] * len(layers), [0.0] * len(layers)
        out = []
        for i in range(0, len(self.x), step):
            checkpoint()
            part = slice(i, i + step)
            e = student.embed(self.x[part].to(device), self.t[part].to(device), self.context[part].to(device))
            h = e.tokens
            for j, b in enumerate(layers):
                h = student.blocks[j](h, e.e0, e.ctx, e.freqs)
                target = self.blocks[b][part].to(device)
                target = (target if kept is None else target[..., kept.to(device)]).double()
                errors[j] += (h.double() - target).pow(2).sum().item()
                totals[j] += target.pow(2).sum().item()
            out.append(student.unpatchify(h, e.e, e.grid).float().cpu())
        rows = [{"block": j, "teacher_block": b, "relative_error": _ratio(errors[j], totals[j])}
                for j, b in enumerate(layers)]
        return compare(torch.cat(out), self.velocity, self.draws, self.band), rows


REFERENCE_BLOCK_BYTES = 256 << 20  # the teacher's block outputs a reference keeps, at most (else blocks stream)


def keeps_blocks(config: ModelConfig, noised: tuple[int, ...] | torch.Size, blocks: int | None = None) -> bool:
    """Whether a reference on a noised set of this shape [samples, C, H, W] keeps the teacher's block outputs
    (`blocks` of them; default all) within REFERENCE_BLOCK_BYTES."""
    depth = int(config.num_layers) if blocks is None else blocks
    size = noised[0] * budget.tokens_per_latent(*noised[-2:]) * int(config.dim) * depth * budget.F32
    return size <= REFERENCE_BLOCK_BYTES


def teacher_sizes(teacher: nn.Module | StreamedTeacher) -> ModelConfig | None:
    """The teacher's config as `budget.check_work` reads it: a streamed teacher's, or an in-memory WanLite's."""
    if isinstance(teacher, StreamedTeacher):
        return teacher.teacher.config
    return budget.module_config(teacher)


def check_request(where: str, sizes: ModelConfig | None, latents: torch.Tensor, context: torch.Tensor,
                  draws: int, **kwargs: Any) -> None:
    """`budget.check_work` on a set's tensors for a teacher of these sizes (its config), before any compute;
    sizes unknown (a module other than WanLite): the per-latent bounds only."""
    if latents.dim() != 4 or context.dim() != 3:
        raise ProjectionError(f"{where}: latents {list(latents.shape)} and context {list(context.shape)}; expected "
                              "[N, Cin, H, W] and [N, L, text_dim]")
    if sizes is None:
        budget.check_set(where, tuple(latents.shape), tuple(context.shape))
    else:
        budget.check_work(where, tuple(latents.shape), tuple(context.shape), sizes, draws, **kwargs)


def teacher_reference(teacher: nn.Module | StreamedTeacher, latents: torch.Tensor, context: torch.Tensor,
                      draws: int = 4, seed: int = 0, band: tuple[float, float] = (0.0, 1.0),
                      where: str = "calibration set", keep_blocks: bool = False) -> Reference:
    """The teacher's velocities on the noised set, and with `keep_blocks` (a streamed teacher) its block outputs
    too where they fit REFERENCE_BLOCK_BYTES: one pass over the teacher's weights either way."""
    check_request(where, teacher_sizes(teacher), latents, context, draws, models=2)
    x, t, ctx = noised_set(latents, context, draws, seed, band)
    if not (keep_blocks and isinstance(teacher, StreamedTeacher)):
        return Reference(x, t, ctx, predict(teacher, x, t, ctx), draws, band)
    config = teacher.teacher.config
    if not keeps_blocks(config, x.shape, len(teacher.blocks)):
        return Reference(x, t, ctx, predict(teacher, x, t, ctx), draws, band)
    kept = BlockOutputs()
    velocity = teacher(x, t, ctx, on_block=kept.on_block)
    return Reference(x, t, ctx, velocity, draws, band, kept.blocks(int(config.num_layers)))


class BlockOutputs:
    """The output stream of each teacher block of a streamed forward, kept for a `Reference` (`on_block`)."""

    def __init__(self) -> None:
        self.kept: dict[int, list[torch.Tensor]] = {}

    def on_block(self, index: int, _: torch.Tensor, out: torch.Tensor) -> None:
        self.kept.setdefault(index, []).append(out.cpu())

    def blocks(self, depth: int) -> tuple[torch.Tensor, ...] | None:
        """Every block's outputs over the set, or None unless all `depth` blocks ran."""
        found = tuple(torch.cat(self.kept[b]) if b in self.kept else None for b in range(depth))
        return found if None not in found else None


def fidelity_table(students: dict[str, nn.Module], teacher: nn.Module | StreamedTeacher, latents: torch.Tensor,
                   context: torch.Tensor, draws: int = 4, seed: int = 0,
                   band: tuple[float, float] = (0.0, 1.0)) -> dict[str, Fidelity]:
    """Several students against one teacher on the same noised set; a streamed teacher runs once."""
    reference = teacher_reference(teacher, latents, context, draws, seed, band)
    return {name: reference.score(model) for name, model in students.items()}


def velocity_fidelity(student: nn.Module, teacher: nn.Module | StreamedTeacher, latents: torch.Tensor,
                      context: torch.Tensor, draws: int = 4, seed: int = 0) -> Fidelity:
    """One student's fidelity on (latents [N, C, H, W], context [N, L, T]), `draws` fixed noise draws per latent."""
    return fidelity_table({"student": student}, teacher, latents, context, draws, seed)["student"]


@torch.no_grad()
def block_fidelity(plan: Plan, students: dict[str, nn.Module], latents: torch.Tensor,
                   context: torch.Tensor, draws: int = 2, seed: int = 0, band: tuple[float, float] = (0.0, 1.0),
                   device: str | torch.device = "cpu", velocities: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, list[dict[str, float]]]:
    """Per student block, for WanLite students projected under `plan` (or of its shape): relative error of the
    block's output against teacher block `mapping.layers[i]`'s on the kept residual channels (0: the teacher's
    residual stream). The plan's teacher streams once (again from the start only where the layer list goes
    back). `velocities`, if given, receives the velocities of the same pass: the teacher's (under "teacher", its
    remaining blocks run) and each student's, so a teacher too large to keep its block outputs (`keeps_blocks`)
    is still read once for velocity and per-block errors."""
    teacher = plan.mapping.teacher
    student = budget.module_config(next(iter(students.values()))) if students else None
    check_request("calibration set", teacher.config, latents, context, draws, models=1 + len(students),
                  streams=block_streams(teacher.config, student, len(students)))
    x, t, ctx = noised_set(latents, context, draws, seed, band)
    cursor = TeacherCursor(StreamedTeacher(teacher, device), x, t, ctx)
    walk = StudentWalk(students, plan.mapping.layers, plan.indices("resid", None), x, t, ctx, cursor.chunks,
                       cursor.teacher.device)
    for i, b in enumerate(plan.mapping.layers):
        block = cursor.block(b)
        cursor.hidden = [step(block, h, p) for h, p in zip(cursor.hidden, cursor.parts)]
        cursor.done(b)
        del block
        for j, out in enumerate(cursor.hidden):
            walk.compare(i, j, out)
    if velocities is not None:
        for b in range(cursor.at, int(teacher.config.num_layers)):
            block = cursor.block(b)
            cursor.hidden = [step(block, h, p) for h, p in zip(cursor.hidden, cursor.parts)]
            cursor.done(b)
            del block
        shell = cursor.teacher.shell
        velocities["teacher"] = torch.cat([shell.unpatchify(h, p.e, p.grid).float().cpu()
                                           for h, p in zip(cursor.hidden, cursor.parts)])
        velocities.update(walk.velocities())
    return walk.rows()


class StudentWalk:
    """Students walking beside the teacher, each on its own residual stream over the teacher's micro-batches
    (`chunks`): `compare(i, j, out)` runs student block i on micro-batch j and adds its error against `out`, the
    output of teacher block layers[i] there, on the kept residual channels (`block_fidelity` drives it block by
    block). As an `on_block` watcher of a streamed forward it does the same in that pass, where `layers` is strictly
    increasing (each teacher block feeds one student block at most, in order)."""

    @torch.no_grad()
    def __init__(self, students: dict[str, nn.Module], layers: list[int], kept: torch.Tensor | None,
                 x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, chunks: list[slice],
                 device: str | torch.device = "cpu"):
        self.students, self.layers, self.kept = students, layers, kept
        increasing = all(a < b for a, b in zip(layers, layers[1:]))
        self.feeds = {b: i for i, b in enumerate(layers)} if increasing else None
        self.embedded = {name: [m.embed(x[c].to(device), t[c].to(device), ctx[c].to(device)) for c in chunks]
                         for name, m in students.items()}
        self.streams = {name: [e.tokens for e in parts] for name, parts in self.embedded.items()}
        self.errors = {name: [0.0] * len(layers) for name in students}
        self.totals = [0.0] * len(layers)
        self.seen: dict[int, int] = {}  # micro-batches of each teacher block seen so far (as a watcher)

    def on_block(self, index: int, _: torch.Tensor, out: torch.Tensor) -> None:
        if self.feeds is None:
            raise ProjectionError(f"layers {self.layers}: students walk beside one pass on increasing blocks only")
        i = self.feeds.get(index)
        if i is not None:
            j = self.seen[index] = self.seen.get(index, -1) + 1
            self.compare(i, j, out)

    @torch.no_grad()
    def compare(self, i: int, j: int, out: torch.Tensor) -> None:
        target = (out if self.kept is None else out[..., self.kept.to(out.device)]).double()
        self.totals[i] += target.pow(2).sum().item()
        for name, model in self.students.items():
            checkpoint()
            e = self.embedded[name][j]
            h = self.streams[name][j] = model.blocks[i](self.streams[name][j], e.e0, e.ctx, e.freqs)
            self.errors[name][i] += (h.double() - target).pow(2).sum().item()

    def rows(self) -> dict[str, list[dict[str, float]]]:
        return {name: [{"block": i, "teacher_block": b, "relative_error": _ratio(errors[i], self.totals[i])}
                       for i, b in enumerate(self.layers)] for name, errors in self.errors.items()}

    @torch.no_grad()
    def velocities(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat([self.students[name].unpatchify(h, e.e, e.grid).float().cpu()
                                 for h, e in zip(self.streams[name], self.embedded[name])]) for name in self.students}


def block_streams(teacher: ModelConfig, student: ModelConfig | None, students: int) -> float:
    """Residual streams (of the teacher's width) `block_fidelity` holds: the teacher's embedded tokens and running
    stream, its float64 target on the kept channels, and each student's embedded tokens and stream (teacher,
    student: their configs)."""
    width = teacher.dim
    ratio = ((student.dim if student else None) or width) / width
    return 2 + 2 * ratio * (1 + students)
