"""The built-in demo: a small, synthetic Wan-shaped teacher and two student configs.

The weights are random but shaped like trained ones: each matrix has decaying, heavy-tailed singular values
(a power law with a few strong directions), and every space has per-index gains shared by all tensors that use
it (some residual channels, heads and FFN neurons matter more than others), so charts and magnitude ranking
behave as they do on real checkpoints. It is not a trained model.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .anatomy import native_name, space_sizes, template_of, wan_tensors
from .errors import ProjectionError

TEACHER = {"dim": 256, "ffn_dim": 768, "num_heads": 4, "num_layers": 8, "in_dim": 16, "out_dim": 16,
           "text_dim": 512, "freq_dim": 256}
STUDENTS = {
    "student-wanlite.yaml": {"layout": "wanlite", "dim": 128, "num_heads": 2, "ffn_dim": 384, "num_layers": 4},
    "student-seed.yaml": {"layout": "seed", "dim": 128, "num_heads": 4, "ffn_dim": 512, "num_layers": 4},
}


def _orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    return q


def trained_like(rows: int, cols: int, g: torch.Generator, scale: float) -> torch.Tensor:
    """A matrix with a power-law spectrum plus a few outlying directions."""
    r = min(rows, cols)
    alpha = 0.5 + torch.rand(1, generator=g).item() * 0.6
    s = (torch.arange(1, r + 1, dtype=torch.float32) ** -alpha)
    s[: max(1, r // 64)] *= 3.0
    w = (_orthonormal(rows, r, g) * s) @ _orthonormal(cols, r, g).T
    return w * (scale / w.std())


def _gains(size: int, g: torch.Generator, spread: float) -> torch.Tensor:
    return torch.exp(torch.randn(size, generator=g) * spread)


def demo_state_dict(config: dict[str, Any] = TEACHER, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical (original Wan) names -> tensors."""
    g = torch.Generator().manual_seed(seed)
    sizes = space_sizes(config)
    global_gains = {s: _gains(sizes[s], g, 0.6) for s in ("resid", "context", "text_hidden", "time_hidden")}
    block_gains = [{s: _gains(sizes[s], g, 0.5) for s in ("ffn", "sa_heads", "ca_heads")}
                   for _ in range(config["num_layers"])]
    state: dict[str, torch.Tensor] = {}
    for key, (shape, axes) in wan_tensors(config).items():
        block = template_of(key)[1]
        if key.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
            continue
        if "modulation" in key:
            t = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = trained_like(shape[0], math.prod(shape[1:]), g, 1 / math.sqrt(math.prod(shape[1:]))).reshape(shape)
        gains = {**global_gains, **(block_gains[block] if block is not None else {})}
        for a, axis in enumerate(axes):  # shared per-index gains make importance consistent across tensors
            gain = torch.ones(1)
            for s in axis:
                gain = (gain[:, None] * gains.get(s, torch.ones(sizes[s]))[None, :]).reshape(-1)
            t = t * gain.reshape([-1 if d == a else 1 for d in range(t.ndim)])
        state[key] = t.contiguous()
    return state


def write_demo(out: str | Path, force: bool = False) -> Path:
    """Write the demo teacher (original and sharded diffusers formats) and student configs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProjectionError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        if (out / "teacher-wan" / "config.json").is_file():
            return out  # already there
        raise ProjectionError(f"{out}: exists and is not a demo folder; choose another or pass --force")
    state = demo_state_dict()
    wan = out / "teacher-wan"
    wan.mkdir(parents=True, exist_ok=True)
    save_file(state, str(wan / "diffusion_pytorch_model.safetensors"))
    (wan / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "eps": 1e-6,
                                                  "text_len": 512, "patch_size": [1, 2, 2], **TEACHER}, indent=1))
    diff = out / "teacher-diffusers"
    diff.mkdir(parents=True, exist_ok=True)
    native = {native_name(k, "wan-diffusers"): v for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for i, (k, v) in enumerate(native.items()):
        shards[min(2, i * 3 // len(native))][k] = v
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        save_file(shard, str(diff / name))
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (diff / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (diff / "config.json").write_text(json.dumps(diffusers_config(TEACHER), indent=1))
    for name, fields in STUDENTS.items():
        (out / name).write_text(yaml.safe_dump(fields, sort_keys=False))
    (out / "README.txt").write_text(
        "Projection Inspector demo: SYNTHETIC weights (random, with trained-like spectra), not a trained model.\n"
        "teacher-wan/: original Wan names, one safetensors file. teacher-diffusers/: the same weights under\n"
        "diffusers names, in 3 shards. student-*.yaml: student configs (reference 2D Wan, and the seeds' layout).\n")
    return out


def diffusers_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2],
            "num_attention_heads": cfg["num_heads"], "attention_head_dim": cfg["dim"] // cfg["num_heads"],
            "in_channels": cfg["in_dim"], "out_channels": cfg["out_dim"], "text_dim": cfg["text_dim"],
            "freq_dim": cfg["freq_dim"], "ffn_dim": cfg["ffn_dim"], "num_layers": cfg["num_layers"],
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024}


WAN14B = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16,
          "text_dim": 4096, "freq_dim": 256}


def write_shape_only_teacher(folder: str | Path, config: dict[str, Any] = WAN14B) -> Path:
    """A Wan teacher of any size whose data section is a sparse hole: real headers, no disk, zeros if read.

    For trying mapping and the inspector at full scale (e.g. Wan 14B: 1095 keys, 57 GB) on any machine."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for key, (shape, _) in wan_tensors(config).items():
        n = math.prod(shape) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config}))
    return folder
