"""Singular-value spectra and cumulative-energy curves of teacher and student matrices."""
from __future__ import annotations

import torch

EXACT_FLOAT64_MAX = 2048  # float64 SVD on the CPU up to this smaller side; float32 beyond (and on the GPU)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Matrices as they are; conv kernels as [out, in * kernel]; vectors as one row."""
    if t.ndim == 1:
        return t[None, :]
    return t.reshape(t.shape[0], -1) if t.ndim > 2 else t


def _svdvals(m: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    device = device or m.device
    exact = device.type == "cpu" and min(m.shape[-2:]) <= EXACT_FLOAT64_MAX
    return torch.linalg.svdvals(m.to(device, torch.float64 if exact else torch.float32)).double().cpu()


def singular_values(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    return _svdvals(as_matrix(t), device)


def batched_singular_values(tensors: list[torch.Tensor], device: torch.device | None = None) -> list[torch.Tensor]:
    """Spectra of many matrices; same-shape ones go through one batched call (fast on a GPU)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(as_matrix(t).shape), []).append(i)
    for shape, idx in groups.items():
        stack = torch.stack([as_matrix(tensors[i]) for i in idx])
        for i, s in zip(idx, _svdvals(stack, device)):
            out[i] = s
    return out  # type: ignore[return-value]


def cumulative_energy(s: torch.Tensor) -> torch.Tensor:
    """Share of squared Frobenius norm captured by the top-k singular values, for k = 1..n."""
    e = s.double().square().cumsum(0)
    return e / e[-1] if len(e) and e[-1] > 0 else e


def rank_for_energy(s: torch.Tensor, share: float) -> int:
    """Smallest k whose top-k singular values hold `share` of the energy."""
    curve = cumulative_energy(s)
    return int((curve < share).sum().item()) + 1 if len(curve) else 0
