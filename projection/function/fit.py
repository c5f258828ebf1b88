"""Fitting, not only selecting: refit every student matrix in the blocks by least squares.

Selection throws away what the dropped channels carried. For each student block, in order, the teacher block it
came from runs on the teacher's own residual stream and the student block on the student's (so the errors of
earlier student blocks are seen, as sequential layer-wise reconstruction does); for every linear layer the teacher's
family names (`Runnable.linears`; Wan's: q, k, v, o of both attentions, ffn.0, ffn.2) the weights and bias are
solved in float64:

    W', b' = argmin_W,b  sum ||W x_s + b - y_t[kept]||^2 + lambda * mean(diag(C)) * ||W||^2

x_s: the student layer's own input; y_t[kept]: the teacher layer's output on the indices the student keeps; C: the
covariance of the centered inputs (so lambda is relative to the inputs' scale; the bias is not regularized). The
sums are accumulated over micro-batches (never all activations at once). The block is then run again with the
fitted weights to give the next block its input.

`compensate: mean` (bias compensation for dropped blocks): a dropped teacher block's mean update of the residual
stream on the calibration set, mean(h_out - h_in) on the kept residual channels, is added to the bias of the
family's ungated output (`Runnable.ungated`; Wan's: the cross-attention output) of the next kept block (the
student's last block for blocks after every kept one). That output joins the residual stream without a gate, so
the constant arrives as it is, at every timestep.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch.config import ModelConfig
from ..arch.family import Runnable
from ..cancel import checkpoint
from ..core.plan import Plan, flat_index
from ..errors import ProjectionError
from . import budget
from .activations import Activations, require
from .calibration import Calibration
from .forward import StreamedTeacher, TeacherCursor, runnable
from .noise import noised_set

RIDGE = 0.1  # lambda, relative to the mean input variance: the best of 1e-3 .. 3 on the demo (README: Fitting)


@dataclass
class Moments:
    """Running sums for a least-squares fit of y [.., d_out] on x [.., d_in] (float64)."""
    xx: torch.Tensor | None = None
    xy: torch.Tensor | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    n: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        parts = (x.T @ x, x.T @ y, x.sum(0), y.sum(0))
        if self.xx is None:
            self.xx, self.xy, self.x, self.y = parts
        else:
            self.xx += parts[0]
            self.xy += parts[1]
            self.x += parts[2]
            self.y += parts[3]
        self.n += len(x)


def ridge(m: Moments, lam: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [d_out, d_in], b [d_out]) minimizing sum ||W x + b - y||^2 + lam * mean(diag(C)) * ||W||^2 (C: the
    centered inputs' covariance sum); the bias is unregularized."""
    mx, my = m.x / m.n, m.y / m.n
    c = m.xx - m.n * torch.outer(mx, mx)
    cy = m.xy - m.n * torch.outer(mx, my)
    reg = lam * c.diagonal().mean().clamp_min(1e-30)
    w = torch.linalg.solve(c + reg * torch.eye(len(c), dtype=c.dtype, device=c.device), cy).T
    return w, my - w @ mx


@dataclass
class FitReport:
    """Per student block and layer: the relative error of the layer's output against the teacher's (on the kept
    indices) before the fit, on the fitting inputs."""
    layers: dict[str, dict[str, float]] = field(default_factory=dict)


def _kept_rows(plan: Plan, student_key: str) -> torch.Tensor | None:
    entry = plan.mapping.entry(student_key)
    if entry.status == "skipped" or not entry.parts:
        return None
    part = entry.parts[0]
    return flat_index(part.axes[0], part.block, plan, plan.mapping.teacher_sizes) if part.axes else None


@torch.no_grad()
def fit_student(plan: Plan, student: nn.Module, calibration: Calibration, draws: int = 2, seed: int = 0,
                lam: float = RIDGE, device: str | torch.device = "cpu", micro_batch: int = 32) -> FitReport:
    """Refit `student` (a WanLite projected under `plan`, from the plan's teacher) in place; see the module's
    docstring. The request is checked against the work bounds (`budget`) before anything runs."""
    device = torch.device(device)
    teacher = plan.mapping.teacher
    families = {b: runnable(teacher, b) for b in plan.mapping.layers}  # each kept block's stack's tables
    _check(teacher.config, budget.module_config(student), calibration, draws, micro_batch, families.values())
    x, t, ctx = noised_set(calibration.latents, calibration.context, draws, seed)
    cursor = TeacherCursor(StreamedTeacher(teacher, device, micro_batch=micro_batch), x, t, ctx)
    t_in = cursor.parts
    s_in = [student.embed(x[c].to(device), t[c].to(device), ctx[c].to(device)) for c in cursor.chunks]
    s_hidden = [p.tokens.float() for p in s_in]
    report = FitReport()
    for i, b in enumerate(plan.mapping.layers):
        t_block = cursor.block(b)
        s_block, linears = student.blocks[i], families[b].linears
        kept = {name: _kept_rows(plan, f"blocks.{i}.{name}.weight") for name in linears}
        moments = {name: Moments() for name in linears}
        before = {name: [0.0, 0.0] for name in linears}
        for j in range(len(cursor.chunks)):
            checkpoint()
            targets, inputs = {}, {}
            hooks = [t_block.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: targets.__setitem__(n, out if kept[n] is None else out[..., kept[n]]))
                for n in linears]
            hooks += [s_block.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: inputs.__setitem__(n, (a[0], out))) for n in linears]
            t_out = t_block(cursor.hidden[j], t_in[j].e0, t_in[j].ctx, t_in[j].freqs)
            s_block(s_hidden[j], s_in[j].e0, s_in[j].ctx, s_in[j].freqs)
            for h in hooks:
                h.remove()
            for n in linears:
                xs, ys = inputs[n]
                moments[n].add(xs, targets[n])
                before[n][0] += (ys.double() - targets[n].double()).pow(2).sum().item()
                before[n][1] += targets[n].double().pow(2).sum().item()
            cursor.hidden[j] = t_out
        for n in linears:
            layer = s_block.get_submodule(n)
            w, bias = ridge(moments[n], lam)
            layer.weight.copy_(w.to(layer.weight.dtype))
            layer.bias.copy_(bias.to(layer.bias.dtype))
            report.layers[f"blocks.{i}.{n}"] = {"before": before[n][0] / max(before[n][1], 1e-30)}
        s_hidden = [s_block(h, p.e0, p.ctx, p.freqs).float() for h, p in zip(s_hidden, s_in)]
        cursor.done(b)
        del t_block
    return report


def linear_sizes(family: Runnable, config: ModelConfig) -> list[tuple[int, int]]:
    """(inputs, outputs) of each linear the family fits, in a block of a config (built on 'meta': no memory)."""
    with torch.device("meta"):
        block = family.block(config)
    return [(block.get_submodule(n).in_features, block.get_submodule(n).out_features) for n in family.linears]


def _check(teacher: ModelConfig, student: ModelConfig | None, calibration: Calibration, draws: int,
           micro_batch: int, families: Iterable[Runnable]) -> None:
    """`budget.check_work` for a fit: the teacher's two residual streams, the student's two (at its width), and
    the float64 moments of every layer's least-squares problem in a student block (teacher, student: their configs;
    families: the teacher's runnable blocks that are kept, whose linears are fitted; the largest counts)."""
    dim = int((student.dim if student else None) or teacher.dim)
    moments = max((8 * sum(i * (i + o + 2) + o for i, o in linear_sizes(f, student or teacher)) for f in families),
                  default=0)
    latents, context = tuple(calibration.latents.shape), tuple(calibration.context.shape)
    batch = budget.micro_batch(teacher, budget.tokens_per_latent(*latents[-2:]), context[1], micro_batch)
    budget.check_work(calibration.source, latents, context, teacher, draws, streams=2 + 2 * dim / teacher.dim,
                      models=2, batch=batch, extra=moments)


def fold_targets(layers: list[int], depth: int) -> dict[int, list[int]]:
    """Student block -> the dropped teacher blocks folded into it: each dropped block goes to the first student
    block whose teacher block is the nearest kept one after it, else to the student's last block."""
    kept = set(layers)
    out: dict[int, list[int]] = {}
    for d in (b for b in range(depth) if b not in kept):
        later = [b for b in layers if b > d]
        target = layers.index(min(later)) if later else len(layers) - 1
        out.setdefault(target, []).append(d)
    return out


@torch.no_grad()
def compensate_dropped(plan: Plan, activations: Activations | None, student: nn.Module) -> dict[int, list[int]]:
    """Fold dropped blocks' mean updates (the teacher's `activations` on a calibration set) into `student`, projected
    under `plan` (in place); returns which blocks went where."""
    layers = plan.mapping.layers
    ungated = [runnable(plan.mapping.teacher, b).ungated for b in layers]  # each student block's teacher block's
    if None in ungated:
        raise ProjectionError("compensate: mean adds a dropped block's mean update to an ungated output; the "
                              f"teacher's family ({plan.mapping.teacher.family}) names none for a kept block")
    if not plan.mapping.strategy.basis_consistent:
        raise ProjectionError("compensate: mean adds teacher residual vectors to the student's: it needs a "
                              "basis-consistent width (not svd-per-matrix)")
    updates = require(activations, "compensate: mean")
    kept = plan.indices("resid", None)
    folds = fold_targets(layers, int(plan.mapping.teacher.config.num_layers))
    for i, dropped in folds.items():
        bias = student.blocks[i].get_submodule(ungated[i]).bias
        for d in dropped:
            update = updates.score("update", d)
            bias += (update if kept is None else update[kept]).to(bias)
    return folds
