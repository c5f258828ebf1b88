"""Fitting, not only selecting: refit every student matrix in the blocks by least squares.

Selection throws away what the dropped channels carried. For each student block, in order, the teacher block it
came from runs on the teacher's own residual stream and the student block on the student's (so the errors of
earlier student blocks are seen, as sequential layer-wise reconstruction does); for every linear layer of the
block (q, k, v, o of both attentions, ffn.0, ffn.2) the weights and bias are solved in float64:

    W', b' = argmin_W,b  sum ||W x_s + b - y_t[kept]||^2 + lambda * mean(diag(C)) * ||W||^2

x_s: the student layer's own input; y_t[kept]: the teacher layer's output on the indices the student keeps; C: the
covariance of the centered inputs (so lambda is relative to the inputs' scale; the bias is not regularized). The
sums are accumulated over micro-batches (never all activations at once). The block is then run again with the
fitted weights to give the next block its input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import Calibration
from .fidelity import noised_set
from .forward import StreamedTeacher, build_block
from .plan import flat_index

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
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


def _kept_rows(projector, student_key: str) -> torch.Tensor | None:
    entry = projector.mapping.entry(student_key)
    if entry.status == "skipped" or not entry.parts:
        return None
    part = entry.parts[0]
    plan = projector.plan()
    return flat_index(part.axes[0], part.block, plan, projector.mapping.teacher_sizes) if part.axes else None


@torch.no_grad()
def fit_student(projector, student: nn.Module, calibration: Calibration, draws: int = 2, seed: int = 0,
                lam: float = RIDGE, device: str | torch.device = "cpu", micro_batch: int = 32) -> FitReport:
    """Refit `student` (a WanLite projected by `projector`) in place; see the module's docstring."""
    device = torch.device(device)
    teacher = StreamedTeacher(projector.teacher, device, micro_batch=micro_batch)
    x, t, ctx = noised_set(calibration.latents, calibration.context, draws, seed)
    chunks = [slice(i, i + micro_batch) for i in range(0, len(x), micro_batch)]
    t_in = [teacher.shell.embed(x[c].to(device), t[c].to(device), ctx[c].to(device)) for c in chunks]
    s_in = [student.embed(x[c].to(device), t[c].to(device), ctx[c].to(device)) for c in chunks]
    t_hidden, s_hidden = [p.tokens for p in t_in], [p.tokens.float() for p in s_in]
    report = FitReport()
    at = 0  # the teacher block the teacher stream has reached
    for i, b in enumerate(projector.mapping.layers):
        if b < at:  # a repeated or reordered block: restart the teacher stream from the embeddings
            t_hidden, at = [p.tokens for p in t_in], 0
        for skipped in range(at, b):
            block = build_block(projector.teacher, skipped, device, teacher.dtype)
            t_hidden = [block(h, p.e0, p.ctx, p.freqs) for h, p in zip(t_hidden, t_in)]
        t_block = build_block(projector.teacher, b, device, teacher.dtype)
        s_block = student.blocks[i]
        kept = {name: _kept_rows(projector, f"blocks.{i}.{name}.weight") for name in LINEARS}
        moments = {name: Moments() for name in LINEARS}
        before = {name: [0.0, 0.0] for name in LINEARS}
        for j in range(len(chunks)):
            targets, inputs = {}, {}
            hooks = [t_block.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: targets.__setitem__(n, out if kept[n] is None else out[..., kept[n]]))
                for n in LINEARS]
            hooks += [s_block.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: inputs.__setitem__(n, (a[0], out))) for n in LINEARS]
            t_out = t_block(t_hidden[j], t_in[j].e0, t_in[j].ctx, t_in[j].freqs)
            s_block(s_hidden[j], s_in[j].e0, s_in[j].ctx, s_in[j].freqs)
            for h in hooks:
                h.remove()
            for n in LINEARS:
                xs, ys = inputs[n]
                moments[n].add(xs, targets[n])
                before[n][0] += (ys.double() - targets[n].double()).pow(2).sum().item()
                before[n][1] += targets[n].double().pow(2).sum().item()
            t_hidden[j] = t_out
        for n in LINEARS:
            layer = s_block.get_submodule(n)
            w, bias = ridge(moments[n], lam)
            layer.weight.copy_(w.to(layer.weight.dtype))
            layer.bias.copy_(bias.to(layer.bias.dtype))
            report.layers[f"blocks.{i}.{n}"] = {"before": before[n][0] / max(before[n][1], 1e-30)}
        s_hidden = [s_block(h, p.e0, p.ctx, p.freqs).float() for h, p in zip(s_hidden, s_in)]
        at = b + 1
        del t_block
    return report
