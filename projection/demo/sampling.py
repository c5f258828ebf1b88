"""Rectified flow as Wan trains and samples it, for any model with forward(x, t, context) -> velocity.

    x_s = (1 - s) x0 + s eps,   s in [0, 1],   the model gets timestep 1000 s and predicts v = eps - x0.

Sampling integrates dx/ds = v from s = 1 (pure noise) to s = 0 with Euler steps on a (optionally shifted)
uniform grid; classifier-free guidance mixes the prompt's velocity with the empty prompt's:
v = v_empty + guidance * (v_prompt - v_empty). Noise comes from one seeded CPU generator per sample, so the
teacher and every student see the same noise for the same seed, on any device.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..cancel import checkpoint
from ..function import budget
from ..function.noise import TIMESTEPS, add_noise, validation_noise

def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def flow_loss(model: nn.Module, x0: torch.Tensor, context: torch.Tensor, eps: torch.Tensor,
              s: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the model's velocity at x_s against Wan's target v = eps - x0, a scalar (distillation
    from a teacher: `projection.distill.distill_loss`)."""
    x, t = add_noise(x0, eps, s), TIMESTEPS * s
    return (model(x, t, context).float() - velocity_target(x0, eps).float()).pow(2).mean()


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """[len(seeds), *shape] standard normal noise, one CPU generator per seed (so a sample's noise does not
    depend on which other samples share its batch)."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def validation_loss(model: nn.Module, x0: torch.Tensor, context: torch.Tensor, draws: int = 4, seed: int = 0,
                    batch: int = 256) -> float:
    """The flow loss averaged over fixed noise (`validation_noise`): the same number every time for a model."""
    device = next(model.parameters()).device
    eps, s = validation_noise(len(x0), draws, x0.shape[1:], seed)
    total = 0.0
    for k in range(draws):
        for i in range(0, len(x0), batch):
            j = slice(i, i + batch)
            loss = flow_loss(model, x0[j].to(device), context[j].to(device), eps[k, j].to(device), s[k, j].to(device))
            total += loss.item() * len(x0[j])
    return total / (draws * len(x0))


def schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 noise levels from 1 to 0: uniform, then shifted as Wan's samplers do, s' = shift s / (1 + (shift - 1) s)."""
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def sample(model: nn.Module, context: torch.Tensor, seeds: Sequence[int], shape: Sequence[int], steps: int = 20,
           guidance: float = 1.0, negative: torch.Tensor | None = None, shift: float = 1.0) -> torch.Tensor:
    """Euler-integrate the model's velocity from seeded noise: latents [N, *shape] (float32, on the CPU).

    context [N, L, text_dim] (one prompt per sample); `negative` [N or 1, L, text_dim] is the empty prompt's
    states, needed when guidance != 1 (both halves run in one batch)."""
    if len(seeds) != len(context):
        raise ValueError(f"{len(seeds)} seeds for {len(context)} prompts: give one seed per prompt")
    if guidance != 1.0 and negative is None:
        raise ValueError("classifier-free guidance needs the empty prompt's states (negative)")
    device = next(model.parameters()).device
    x = seeded_noise(seeds, shape).to(device)
    ctx = context.to(device)
    if guidance != 1.0:
        ctx = torch.cat([ctx, negative.to(device).expand_as(ctx)])
    levels = schedule(steps, shift)
    # one model call per MICRO_BATCH_TOKENS tokens at most: larger calls' intermediates fault in fresh pages every
    # step (the demo teacher's 100 samples: 0.7 s of system time in one call, none in calls of 32)
    step = max(1, budget.MICRO_BATCH_TOKENS // max(1, budget.tokens_per_latent(*x.shape[-2:])))
    for s, s_next in zip(levels[:-1].tolist(), levels[1:].tolist()):
        checkpoint()  # a cancelled request stops between steps
        inp = x if guidance == 1.0 else torch.cat([x, x])
        t = torch.full((len(inp),), TIMESTEPS * s, device=device)
        v = torch.cat([model(inp[i:i + step], t[i:i + step], ctx[i:i + step]).float()
                       for i in range(0, len(inp), step)])
        if guidance != 1.0:
            cond, uncond = v.chunk(2)
            v = uncond + guidance * (cond - uncond)
        x = x + (s_next - s) * v
    return x.cpu()
