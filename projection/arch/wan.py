"""Runnable student modules.

`WanLite` is the 2D restriction of Wan: on a single latent frame, Wan is exactly a 2D model with a 2x2 patch
conv, t-band RoPE at angle 0, and everything else unchanged. Its parameter names are Wan's original names, so
a same-config projection is a copy and the exported student reproduces the teacher's forward.
`SeedStudent` is the seeds' layout (fused nn.MultiheadAttention), kept so its projections can be run too.
"""
from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ProjectionError
from ..io.inputs import read_json

LAYOUTS = ("wanlite", "seed")
DEFAULTS = {"in_dim": 16, "out_dim": 16, "text_dim": 4096, "freq_dim": 256}
SIZES = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")
FIELDS = ("layout", *SIZES)
PROJECTED = ("dim", "ffn_dim")  # selected from the teacher's: at most the teacher's
MAX_IO_DIM = 1 << 14  # in/out/text/freq widths may differ from the teacher's (those tensors start fresh)
EPS = 1e-6


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: float64, 10000^(-i/half), laid out [cos | sin]."""
    half = dim // 2
    angles = torch.outer(t.double(), torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half))
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def rope_bands(head_dim: int) -> list[int]:
    """Pairs per t/h/w band of one head: [c - 2(c//3), c//3, c//3] with c = head_dim / 2."""
    c = head_dim // 2
    return [c - 2 * (c // 3), c // 3, c // 3]


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> list[torch.Tensor]:
    """Per band, the angular frequency of each pair: theta^(-2j / band_dim)."""
    return [1.0 / theta ** (torch.arange(n, dtype=torch.float64) * 2 / (2 * n)) for n in rope_bands(head_dim)]


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

    def forward(self, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Modulation and the residual stream in float32, as in Wan; each layer's input in its weights' dtype."""
        dtype = ctx.dtype
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation + e0).float().chunk(6, dim=1)
        h = (self.norm1(x).float() * (1 + scale_msa) + shift_msa).to(dtype)
        y = self.self_attn(h, h, freqs)
        x = x + y * gate_msa
        x = x + self.cross_attn(self.norm3(x.to(dtype)), ctx)
        y = self.ffn((self.norm2(x).float() * (1 + scale_ffn) + shift_ffn).to(dtype))
        return x + y * gate_ffn


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


def check_fields(fields: dict[str, Any], teacher: dict[str, Any], max_layers: int | None = None) -> None:
    """Refuse, before anything is built, a student config the teacher cannot fill: unknown fields, sizes that
    are not positive integers, and sizes past the teacher's. Channels and FFN neurons are kept or dropped, never
    invented; blocks past the teacher's need an explicit layer list (`max_layers` entries); heads divide the
    width, and the mapper says how many fit the teacher's."""
    for name in fields:
        if name not in FIELDS:
            close = difflib.get_close_matches(str(name), FIELDS, 1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ProjectionError(f"student config: unknown field {name!r:.60}{hint}; the fields are "
                                  f"{', '.join(FIELDS)}")
    for name in (n for n in SIZES if n in fields):
        value = fields[name]
        if type(value) is not int or value <= 0:  # not a bool, a float or a string
            raise ProjectionError(f"student config: '{name}' must be a positive integer, got {value!r:.60}")
        if name == "num_layers":
            depth = teacher.get("num_layers") or 0
            if value > max(depth, max_layers or 0):
                how = (f"the strategy's layer list has {max_layers} entries" if (max_layers or 0) > depth else
                       "a deeper student needs a strategy 'layers' list that repeats blocks")
                raise ProjectionError(f"student config: num_layers {value} is more than the teacher's {depth} "
                                      f"blocks; {how}")
        elif name in PROJECTED:
            bound = teacher.get(name) or MAX_IO_DIM
            if value > bound:
                raise ProjectionError(f"student config: {name} {value} is more than the teacher's {bound}; a "
                                      f"projection keeps or drops what the teacher has")
        elif name != "num_heads" and value > max(teacher.get(name) or 0, MAX_IO_DIM):
            raise ProjectionError(f"student config: {name} {value} is more than {MAX_IO_DIM}, the most allowed "
                                  f"where it differs from the teacher's ({teacher.get(name)})")


def student_config(layout: str, fields: dict[str, Any], teacher: dict[str, Any],
                   max_layers: int | None = None) -> dict[str, Any]:
    """A full student config: given fields, else the teacher's (the seed layout keeps its 4 latent channels)."""
    check_fields(fields, teacher, max_layers)
    if layout not in LAYOUTS:
        raise ProjectionError(f"student layout '{layout}' is unknown; choose one of {', '.join(LAYOUTS)}")
    cfg: dict[str, Any] = {"layout": layout}
    seed_defaults = {"in_dim": 4, "out_dim": 4} if layout == "seed" else {}
    for field in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim"):
        value = fields.get(field, seed_defaults.get(field, teacher.get(field, DEFAULTS.get(field))))
        if value is None:
            raise ProjectionError(f"student config: '{field}' is missing and the teacher does not define it")
        if not isinstance(value, int) or value <= 0:
            raise ProjectionError(f"student config: '{field}' must be a positive integer, got {value!r}")
        cfg[field] = value
    if "num_heads" not in fields and "dim" in fields and teacher.get("head_dim"):
        cfg["num_heads"] = max(1, cfg["dim"] // teacher["head_dim"])  # keep the teacher's head dim
    if cfg["dim"] % cfg["num_heads"]:
        raise ProjectionError(f"student config: dim {cfg['dim']} is not divisible by num_heads {cfg['num_heads']}")
    cfg["head_dim"] = cfg["dim"] // cfg["num_heads"]
    return cfg


def build_student(config: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The student module for a config; on device 'meta' it costs no memory (for mapping)."""
    layout = config.get("layout", "wanlite")
    if layout not in LAYOUTS:
        raise ProjectionError(f"layout '{layout}' has no runnable module here (only {', '.join(LAYOUTS)}); load it "
                              "with the code it came from (e.g. diffusers' WanTransformer3DModel)")
    kwargs = {k: config[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers")}
    kwargs.update({k: config[k] for k in ("in_dim", "out_dim", "text_dim", "freq_dim") if k in config})
    cls = {"wanlite": WanLite, "seed": SeedStudent}[layout]
    with torch.device(device):
        return cls(**kwargs)


def random_student(config: dict[str, Any], seed: int) -> nn.Module:
    """A freshly initialized student of a config (torch's default init), seeded without touching the global RNG:
    the baseline a projection is measured against."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_student({"layout": "wanlite", **config})


def load_student(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load an exported student folder back into its module: in the dtype it was exported in, or `dtype`."""
    from ..io.checkpoint import open_checkpoint

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ProjectionError(f"{folder}: no config.json: not an exported student")
    config = read_json(cfg_path, "config")
    try:
        model = build_student(config, "meta")
    except ProjectionError as exc:
        raise ProjectionError(f"{cfg_path}: {exc}") from exc
    ckpt = open_checkpoint(folder)
    state = {k: ckpt.get(k) for k in ckpt.keys()}
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ProjectionError(f"{folder}: weights lack {len(missing)} key(s), e.g. '{sorted(missing)[0]}'")
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device, dtype)


def count_params(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.state_dict().values())


# ---------------------------------------------------------------- fresh values for keys nothing transfers to

def key_seed(seed: int, key: str) -> int:
    """A student key's own seed: the first 63 bits of sha256("{seed}/{key}") (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1


def fresh_value(model: nn.Module, key: str, seed: int) -> torch.Tensor:
    """A freshly initialised value of one student parameter (the model may live on 'meta'), drawn from its own
    generator seeded with `key_seed(seed, key)`: the same on every run, in any thread, whatever else runs."""
    generator = torch.Generator().manual_seed(key_seed(seed, key))
    return init_parameter_(model, key, torch.empty(model.get_parameter(key).shape), generator)


def init_parameter_(model: nn.Module, key: str, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill `t` as torch's own initialisation of the parameter's module fills it, drawing from `generator` (not
    the global RNG)."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    parent = model.get_submodule(owner_name.rpartition(".")[0]) if "." in owner_name else model
    if isinstance(owner, nn.MultiheadAttention) and name == "in_proj_weight":
        return nn.init.xavier_uniform_(t, generator=generator)
    if isinstance(owner, nn.MultiheadAttention) and name == "in_proj_bias":
        return nn.init.zeros_(t)
    if isinstance(owner, (nn.Linear, nn.Conv2d)) and name == "weight":
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    if isinstance(owner, (nn.Linear, nn.Conv2d)) and name == "bias":
        if isinstance(parent, nn.MultiheadAttention):  # its out_proj bias starts at zero
            return nn.init.zeros_(t)
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(owner.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        return nn.init.uniform_(t, -bound, bound, generator=generator)
    if isinstance(owner, (nn.LayerNorm, nn.RMSNorm)):
        return nn.init.ones_(t) if name == "weight" else nn.init.zeros_(t)
    if name == "modulation":
        return init_modulation_(t, generator)
    raise ProjectionError(f"student key '{key}': no initialisation rule for {type(owner).__name__}.{name}")


def wan_state_dict(model: WanLite) -> dict[str, torch.Tensor]:
    """A WanLite's weights as an original Wan checkpoint (canonical names; the patch conv as Conv3d [D, C, 1, 2, 2])."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state["patch_embedding.weight"] = state["patch_embedding.weight"].unsqueeze(2).contiguous()
    return state


def wanlite_from_teacher(source: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> WanLite:
    """A Wan teacher (either format) as the WanLite of its own config: on one latent frame it computes the
    teacher's function exactly. For teachers whose Conv3d patch is one frame deep (T2V); whole in memory."""
    from ..core.models import open_teacher

    teacher = open_teacher(str(source))
    config = teacher.config
    patch = teacher.shapes["patch_embedding.weight"]
    if len(patch) != 5 or patch[2] != 1:
        raise ProjectionError(f"{source}: patch_embedding.weight is {list(patch)}; a Wan teacher with a temporal "
                              "patch of 1 has [D, C, 1, 2, 2]")
    model = build_student({"layout": "wanlite", **{k: config[k] for k in SIZES}}, "meta")
    state = {k: teacher.read(k) for k in model.state_dict()}  # a missing key raises, naming it
    state["patch_embedding.weight"] = state["patch_embedding.weight"].squeeze(2)
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device, dtype).eval()
