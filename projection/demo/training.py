"""Train any velocity model (teacher or student) with Wan's rectified-flow objective, reproducibly.

One seeded CPU generator draws everything random in training: the batch order (a fresh permutation per epoch),
the noise, the noise levels (s uniform in [0, 1]) and which samples get the empty prompt (so the model also
learns the unconditional velocity that classifier-free guidance needs). The same config therefore feeds every
model the same data in the same order, whatever its initialization. AdamW, linear warmup, then cosine decay.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..distill import Hints, distill_loss, sample_levels
from ..distill.schedule import cosine_rate
from .sampling import flow_loss, validation_loss


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # the cosine ends at lr * min_lr_ratio
    warmup: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    drop_prompt: float = 0.1  # share of samples trained on the empty prompt
    eval_every: int = 200
    val_draws: int = 4  # fixed noise draws per validation sample
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
    return cosine_rate(step, config.steps, config.lr, config.warmup, config.min_lr_ratio)


@dataclass
class History:
    """Validation loss at evaluation steps, training loss averaged over each interval, wall time so far."""
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        return asdict(self)


def train_flow(model: nn.Module, latents: torch.Tensor, context: torch.Tensor, empty: torch.Tensor,
               val_latents: torch.Tensor, val_context: torch.Tensor, config: TrainConfig = TrainConfig(),
               on_eval: Callable[[int, History], None] | None = None, teacher: nn.Module | None = None,
               hints: Hints | None = None, hint_weight: float = 0.0) -> History:
    """Train `model` in place on (latents [N, C, H, W], context [N, L, T]); `empty` [1, L, T] is the empty
    prompt's states. Validation loss (`sampling.validation_loss`: the denoising loss, whatever the objective) is
    taken at step 0, every `eval_every` steps and at the end; `on_eval(step, history)` is called after each.

    teacher: distillation (`projection.distill.distill_loss`, the loss the product ships): the target is the
    teacher's velocity at the same x_s (else Wan's v = eps - x0), plus hint_weight times the per-block hints."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    history, start, running, count = History(), time.perf_counter(), 0.0, 0
    order = torch.empty(0, dtype=torch.long)

    def evaluate(step: int) -> None:
        model.eval()
        history.steps.append(step)
        history.val_loss.append(validation_loss(model, val_latents, val_context, config.val_draws))
        history.train_loss.append(running / count if count else None)
        history.seconds.append(time.perf_counter() - start)
        model.train()
        if on_eval is not None:
            on_eval(step, history)

    model.train()
    evaluate(0)
    for step in range(config.steps):
        if len(order) < config.batch:
            order = torch.cat([order, torch.randperm(len(latents), generator=g)])
        idx, order = order[: config.batch], order[config.batch:]
        x0, ctx = latents[idx], context[idx].clone()
        eps = torch.randn(x0.shape, generator=g)
        s = sample_levels(len(idx), g)  # the demo teacher serves every level
        ctx[torch.rand(len(idx), generator=g) < config.drop_prompt] = empty
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, config)
        x0, ctx, eps, s = x0.to(device), ctx.to(device), eps.to(device), s.to(device)
        if teacher is None:
            loss = flow_loss(model, x0, ctx, eps, s)
        else:
            loss = distill_loss(model, teacher, x0, ctx, eps, s, hints, hint_weight)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        running, count = running + loss.item(), count + 1
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            evaluate(step + 1)
            running, count = 0.0, 0
    model.eval()
    return history
