"""The runnable 2D Wan student.

`WanLite` is the 2D restriction of Wan: on a single latent frame, Wan is exactly a 2D model with a 2x2 patch
conv, t-band RoPE at angle 0, and everything else unchanged. Its parameter names are Wan's original names, so
a same-config projection is a copy and the exported student reproduces the teacher's forward.

`RUNNABLE` is how Wan's blocks run for the streamed teacher, fitting and activation statistics (the families
registered in `anatomy` carry it): the block class and the names of the modules those read.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ProjectionError
from .config import ModelConfig
from .family import Runnable

EPS = 1e-6
I2V_BOUNDARY, T2V_BOUNDARY = 0.9, 0.875  # Wan2.2 A14B: the high-noise expert serves s >= boundary


def expert_bands(config: ModelConfig) -> dict[str, tuple[float, float]]:
    """The noise levels s each Wan 2.2 A14B expert serves (`../shared/wan-reference.md` 8); I2V reads 36 channels."""
    boundary = I2V_BOUNDARY if config.in_dim == 36 else T2V_BOUNDARY
    return {"high": (boundary, 1.0), "low": (0.0, boundary)}


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: float64, 10000^(-i/half), laid out [cos | sin]."""
    half = dim // 2
    angles = torch.outer(t.double(), torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half))
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def rope_bands(head_dim: int) -> list[int]:
    """Pairs per t/h/w band of one head: [c - 2(c//3), c//3, c//3] with c = head_dim / 2."""
    c = head_dim // 2
    return [c - 2 * (c // 3), c // 3, c // 3]


def rope_frequencies(head_dim: int, theta: float = 10000.0,
                     bands: Callable[[int], list[int]] = rope_bands) -> list[torch.Tensor]:
    """Per band, the angular frequency of each pair: theta^(-2j / band_dim)."""
    return [1.0 / theta ** (torch.arange(n, dtype=torch.float64) * 2 / (2 * n)) for n in bands(head_dim)]


def rope_2d(head_dim: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Complex rotations [h*w, head_dim/2] for frame 0 of an h x w grid (t band: angle 0)."""
    ft, fh, fw = (f.to(device) for f in rope_frequencies(head_dim))
    rows = torch.arange(h, dtype=torch.float64, device=device)
    cols = torch.arange(w, dtype=torch.float64, device=device)
    angles = torch.cat([
        torch.zeros(h, w, len(ft), dtype=torch.float64, device=device),
        torch.outer(rows, fh)[:, None, :].expand(h, w, -1),
        torch.outer(cols, fw)[None, :, :].expand(h, w, -1),
    ], dim=-1)
    return torch.polar(torch.ones_like(angles), angles).reshape(h * w, -1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, d]: rotate adjacent channel pairs (2i, 2i+1)."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2).to(x.dtype)


def check_patches(h: int, w: int, patch: int) -> None:
    if h % patch or w % patch:
        raise ProjectionError(f"input size {h}x{w}: height and width must be multiples of the {patch}x{patch} patch "
                              f"(pad to {h + -h % patch}x{w + -w % patch} and crop the output back)")


def modulation(chunks: int, dim: int) -> nn.Parameter:
    """[1, chunks, dim] table; random only off the meta device (a random op on meta costs seconds of import)."""
    table = nn.Parameter(torch.empty(1, chunks, dim))
    if not table.is_meta:
        init_modulation_(table)
    return table


def init_modulation_(table: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return nn.init.normal_(table, std=table.shape[-1] ** -0.5, generator=generator)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=EPS)  # over the full width, as in Wan
        self.norm_k = nn.RMSNorm(dim, eps=EPS)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, freqs: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.unflatten(-1, (self.num_heads, -1))  # noqa: E731
        q, k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(ctx))), split(self.v(ctx))
        if freqs is not None:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS, elementwise_affine=False)
        self.self_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=EPS)
        self.cross_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=EPS, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = modulation(6, dim)

    @classmethod
    def of(cls, config: ModelConfig) -> Block:
        """The block of a config (the family's runnable block)."""
        return cls(config.dim, config.ffn_dim, config.num_heads)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Modulation and the residual stream in float32, as in Wan; each layer's input in its weights' dtype."""
        dtype = ctx.dtype
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation + e0).float().chunk(6, dim=1)
        h = (self.norm1(x).float() * (1 + scale_msa) + shift_msa).to(dtype)
        y = self.self_attn(h, h, freqs)
        x = self.read_context(x + y * gate_msa, ctx)
        y = self.ffn((self.norm2(x).float() * (1 + scale_ffn) + shift_ffn).to(dtype))
        return x + y * gate_ffn

    def read_context(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The cross-attention step, ungated (a block without text context overrides it)."""
        return x + self.cross_attn(self.norm3(x.to(ctx.dtype)), ctx)


RUNNABLE = Runnable(
    Block.of,
    linears=("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
             "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"),
    readers=("self_attn.q", "cross_attn.q", "ffn.0"),  # q/k/v's input, the cross-attention query's, the FFN's
    outputs={"self_attn.o": "sa", "cross_attn.o": "ca"},
    neurons="ffn.2",  # its input: the GELU output
    ungated="cross_attn.o",
)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=EPS, elementwise_affine=False)
        self.head = nn.Linear(dim, 4 * out_dim)
        self.modulation = modulation(2, dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + e[:, None, :]).chunk(2, dim=1)
        return self.head((self.norm(x) * (1 + scale) + shift).to(self.head.weight.dtype))


@dataclass
class Embedded:
    """A batch as Wan's blocks read it."""
    tokens: torch.Tensor  # [B, N, D] patch tokens (the residual stream before block 0)
    e: torch.Tensor  # [B, D] time embedding (the head's modulation)
    e0: torch.Tensor  # [B, 6, D] time projection (each block's modulation)
    ctx: torch.Tensor  # [B, L, D] embedded text context
    freqs: torch.Tensor  # [N, head_dim / 2] RoPE rotations
    grid: tuple[int, int]  # patch rows, columns


class WanLite(nn.Module):
    """The 2D Wan student: forward(x [B, Cin, H, W], t [B], context [B, L, text_dim]) -> [B, Cout, H, W].

    It runs in its weights' dtype (inputs are cast to it; the output is in it). H and W must be even (2x2
    patches): other sizes are refused, not cropped."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_layers: int, in_dim: int = 16,
                 out_dim: int = 16, text_dim: int = 4096, freq_dim: int = 256):
        super().__init__()
        self.dim, self.num_heads, self.out_dim, self.freq_dim = dim, num_heads, out_dim, freq_dim
        self.patch_embedding = nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(dim, ffn_dim, num_heads) for _ in range(num_layers))
        self.head = Head(dim, out_dim)

    def embed(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> Embedded:
        """What every block reads: patch tokens, time embeddings, text context and RoPE rotations."""
        _, _, h, w = x.shape
        check_patches(h, w, 2)
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dtype))
        grid = (x.shape[-2], x.shape[-1])
        e = self.time_embedding(sinusoid(t, self.freq_dim).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
        ctx = self.text_embedding(context.to(dtype))
        freqs = rope_2d(self.dim // self.num_heads, *grid, x.device)
        return Embedded(x.flatten(2).transpose(1, 2), e, e0, ctx, freqs, grid)

    def unpatchify(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The head on the last block's tokens, back to [B, Cout, H, W]."""
        gh, gw = grid
        x = self.head(x, e)  # [B, N, 4 * Cout], laid out (ph, pw, c)
        x = x.reshape(len(x), gh, gw, 2, 2, self.out_dim).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(len(x), self.out_dim, gh * 2, gw * 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        inp = self.embed(x, t, context)
        x = inp.tokens
        for block in self.blocks:
            x = block(x, inp.e0, inp.ctx, inp.freqs)
        return self.unpatchify(x, inp.e, inp.grid)


def wan_state_dict(model: WanLite) -> dict[str, torch.Tensor]:
    """A WanLite's weights as an original Wan checkpoint (canonical names; the patch conv as Conv3d [D, C, 1, 2, 2])."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state["patch_embedding.weight"] = state["patch_embedding.weight"].unsqueeze(2).contiguous()
    return state
