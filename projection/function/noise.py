"""Noise at Wan's levels, as every measure of a model's function draws it (rectified flow, as Wan trains it):

    x_s = (1 - s) x0 + s eps,   s in [0, 1],   the model gets timestep 1000 s and predicts v = eps - x0.

Fixed noise (`validation_noise`: the same eps and levels for every model and run), noised sets over a band of
levels (`noised_set`; the band an expert serves is its family's: `ModelView.band`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

TIMESTEPS = 1000  # Wan's timestep scale: t = 1000 s


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps, with s [N] broadcast over each sample."""
    s = s.reshape(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def validation_noise(n: int, draws: int, shape: Sequence[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (eps [draws, n, *shape], s [draws, n]) for a deterministic validation loss; noise levels are
    stratified: draw k of every sample has s in [k / draws, (k + 1) / draws)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(draws, n, *shape, generator=g)
    s = (torch.arange(draws)[:, None] + torch.rand(draws, n, generator=g)) / draws
    return eps, s


def noised_set(latents: torch.Tensor, context: torch.Tensor, draws: int, seed: int = 0,
               band: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_s, t, context) for every latent and noise draw, draw-major: [draws * N, ...] (`validation_noise`, its
    levels mapped into `band`, e.g. the levels one expert serves)."""
    eps, s = validation_noise(len(latents), draws, latents.shape[1:], seed)
    s = band[0] + (band[1] - band[0]) * s
    x = torch.cat([add_noise(latents, eps[k], s[k]) for k in range(draws)])
    return x, TIMESTEPS * s.reshape(-1), context.repeat(draws, *[1] * (context.dim() - 1))

