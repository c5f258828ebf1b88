"""`SeedStudent`: the seeds' layout (fused nn.MultiheadAttention), kept so its projections can be run too."""
from __future__ import annotations

import torch
from torch import nn

from .wan import sinusoid


class SeedBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SeedStudent(nn.Module):
    """The seeds' WanLiteStudent layout (202 keys at width 1024, depth 16)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_layers: int, in_dim: int = 4,
                 out_dim: int = 4, text_dim: int = 4096, freq_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.text_proj = nn.Linear(text_dim, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.conv_in = nn.Conv2d(in_dim, dim, 3, padding=1)
        self.blocks = nn.ModuleList(SeedBlock(dim, ffn_dim, num_heads) for _ in range(num_layers))
        self.conv_out = nn.Conv2d(dim, out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dtype = self.conv_in.weight.dtype  # runs in its weights' dtype, as WanLite does
        x = self.conv_in(x.to(dtype)).flatten(2).transpose(1, 2)
        temb = self.time_embed(sinusoid(t, self.dim).to(dtype))
        x = x + temb[:, None, :] + self.text_proj(context.to(dtype)).mean(dim=1, keepdim=True)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(x.transpose(1, 2).reshape(b, self.dim, h, w))
