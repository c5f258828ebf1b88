"""Student layouts: what an exported student's files say, so that the framework a user trains in loads them.

Every Wan layout runs as the same module here (`WanLite`, Wan restricted to one latent frame, where the Conv3d
patch kernel [D, C, 1, 2, 2] is exactly a Conv2d [D, C, 2, 2]); the layout decides only the tensor names, the
patch kernel's rank, the file names and config.json:
- diffusers: `WanTransformer3DModel` (diffusers, and FastVideo, finetrainers, SimpleTuner on it);
- wan: Wan's original `WanModel` (Wan's own code, DiffSynth-Studio, musubi-tuner, diffusion-pipe, ComfyUI);
- wanlite: the project's reference module as it is (Conv2d patch): `projection.load_student` loads it;
- seed: the seed documents' `SeedStudent`.
config.json holds only what the layout's loader takes: the project's own records (layout, strategy, teacher,
fidelity) go to projection_report.json, strategy.yaml and the weights' metadata.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ProjectionError
from .config import DEFAULT_LAYOUT, LAYOUT_NAMES, ModelConfig, as_config, check_layout
from .seed import SeedStudent
from .wan import WanLite

PATCH = "patch_embedding.weight"  # the one tensor whose stored rank differs between Wan layouts
DIFFUSERS_VERSION = "0.33.0"  # the first diffusers with WanTransformer3DModel (informational to from_pretrained)


def own_config(c: ModelConfig) -> dict[str, Any]:
    """The project's own layouts: the architecture numbers `projection.load_student` reads."""
    return {k: v for k, v in c.to_dict().items() if k not in ("layout", "head_dim")}


def diffusers_config(c: ModelConfig) -> dict[str, Any]:
    """`WanTransformer3DModel.__init__`'s keys, for a text-to-video model."""
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": DIFFUSERS_VERSION,
            "patch_size": list(c.patch_size), "num_attention_heads": c.num_heads, "attention_head_dim": c.head_dim,
            "in_channels": c.in_dim, "out_channels": c.out_dim, "text_dim": c.text_dim, "freq_dim": c.freq_dim,
            "ffn_dim": c.ffn_dim, "num_layers": c.num_layers, "cross_attn_norm": c.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if c.qk_norm else None, "eps": c.eps, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


def wan_config(c: ModelConfig) -> dict[str, Any]:
    """`WanModel.__init__`'s keys (Wan's own repository), for a text-to-video model."""
    return {"_class_name": "WanModel", "_diffusers_version": DIFFUSERS_VERSION, "model_type": "t2v",
            "patch_size": list(c.patch_size), "text_len": 512, "in_dim": c.in_dim, "dim": c.dim, "ffn_dim": c.ffn_dim,
            "freq_dim": c.freq_dim, "text_dim": c.text_dim, "out_dim": c.out_dim, "num_heads": c.num_heads,
            "num_layers": c.num_layers, "window_size": [-1, -1], "qk_norm": c.qk_norm,
            "cross_attn_norm": c.cross_attn_norm, "eps": c.eps}


@dataclass(frozen=True)
class Layout:
    name: str
    family: str  # the anatomy family whose tensor names its files use
    module: type[nn.Module]  # what runs it here
    patch_3d: bool  # the patch kernel is stored as Conv3d [D, C, 1, 2, 2]
    stem: str  # the weights' file name: {stem}.safetensors, or shards and {stem}.safetensors.index.json
    config: Callable[[ModelConfig], dict[str, Any]]  # config.json
    loads_in: str  # who loads it


LAYOUTS: dict[str, Layout] = {
    "diffusers": Layout("diffusers", "wan-diffusers", WanLite, True, "diffusion_pytorch_model", diffusers_config,
                        "diffusers' WanTransformer3DModel.from_pretrained (and frameworks on diffusers)"),
    "wan": Layout("wan", "wan", WanLite, True, "diffusion_pytorch_model", wan_config,
                  "Wan's own WanModel.from_pretrained and the frameworks that read original Wan checkpoints"),
    "wanlite": Layout("wanlite", "wan", WanLite, False, "model", own_config, "projection.load_student (Conv2d patch)"),
    "seed": Layout("seed", "seed", SeedStudent, False, "model", own_config, "projection.load_student (SeedStudent)"),
}
if tuple(LAYOUTS) != LAYOUT_NAMES:
    raise RuntimeError("layout.LAYOUTS and config.LAYOUT_NAMES name different layouts")


def layout_of(name: str | None) -> Layout:
    return LAYOUTS[check_layout(name)]


def build_student(config: ModelConfig | Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The runnable student module of a config (every Wan layout runs as `WanLite`); on device 'meta' it costs no
    memory (for mapping)."""
    config = as_config(config)
    if config.layout == "custom":
        raise ProjectionError("a student with its own tensor names has no runnable module here; export it and load "
                              "it with the code it came from")
    kwargs = {k: getattr(config, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers")}
    kwargs.update({k: v for k in ("in_dim", "out_dim", "text_dim", "freq_dim")
                   if (v := getattr(config, k)) is not None})
    with torch.device(device):
        return layout_of(config.layout or DEFAULT_LAYOUT).module(**kwargs)


def stored_shape(layout: Layout, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A runnable module's tensor shape as the layout stores it (the patch kernel gains its temporal axis)."""
    if layout.patch_3d and key == PATCH and len(shape) == 4:
        return (shape[0], shape[1], 1, *shape[2:])
    return tuple(shape)


def runnable_tensor(key: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A stored tensor as the runnable module holds it: a Conv3d patch kernel one frame deep becomes the Conv2d
    it equals on one frame; any other difference is refused, naming the key."""
    if tuple(t.shape) == tuple(shape):
        return t
    if key == PATCH and t.dim() == 5 and t.shape[2] == 1 and tuple(t.squeeze(2).shape) == tuple(shape):
        return t.squeeze(2)
    what = ("a temporal patch deeper than 1 frame runs only in Wan's own code" if key == PATCH and t.dim() == 5
            else f"the module expects {list(shape)}")
    raise ProjectionError(f"'{key}' is {list(t.shape)}: {what}")
