"""Model anatomy as data: which tensors a family has, and which space each tensor axis lives in.

Every Wan tensor is described once, under its original (canonical) name, by its axes; an axis is a tuple of
spaces, outer to inner (q's output axis is heads x head-dim). Two tensors that share a space must be reduced
with the same index set: that one fact drives basis-consistent projection. Other formats are a rename table
onto these canonical names, matched key by key as whole templates (never by chained string replaces).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from .config import SIZES, ModelConfig, as_config
from .family import _CHANGED, FAMILIES, Family, Stack, register, stack_at
from .wan import RUNNABLE, expert_bands, rope_bands

Axis = tuple[str, ...]
SpaceKind = Literal["free", "neurons", "heads", "rope", "dims", "fixed", "temporal"]


@dataclass(frozen=True)
class Space:
    kind: SpaceKind  # free: global widths ranked by all readers/writers; fixed: must match exactly
    size: str | int  # config field, or a constant
    per_block: bool = False
    label: str = ""


SPACES: dict[str, Space] = {
    "resid": Space("free", "dim", label="residual stream"),
    "context": Space("free", "dim", label="text context (cross-attention k/v input)"),
    "text_hidden": Space("free", "dim", label="text-embedding hidden"),
    "time_hidden": Space("free", "dim", label="time-embedding hidden"),
    "img_context": Space("free", "dim", label="image context"),
    "clip": Space("fixed", 1280, label="CLIP image-token width"),
    "img_tokens": Space("fixed", 514, label="image tokens (flf2v)"),
    "ffn": Space("neurons", "ffn_dim", per_block=True, label="FFN hidden"),
    "sa_heads": Space("heads", "num_heads", per_block=True, label="self-attention heads"),
    "sa_qk": Space("rope", "head_dim", per_block=True, label="self-attention q/k head dim (RoPE pairs)"),
    "sa_vo": Space("dims", "head_dim", per_block=True, label="self-attention v/o head dim"),
    "ca_heads": Space("heads", "num_heads", per_block=True, label="cross-attention heads"),
    "ca_qk": Space("dims", "head_dim", per_block=True, label="cross-attention q/k head dim"),
    "ca_vo": Space("dims", "head_dim", per_block=True, label="cross-attention v/o head dim"),
    "cin": Space("fixed", "in_dim", label="latent channels in"),
    "cout": Space("fixed", "out_dim", label="latent channels out"),
    "text_in": Space("fixed", "text_dim", label="text encoder width"),
    "freq": Space("fixed", "freq_dim", label="timestep sinusoid width"),
    "mod6": Space("fixed", 6, label="modulation chunks"),
    "mod2": Space("fixed", 2, label="head modulation chunks"),
    "one": Space("fixed", 1),
    "kt": Space("temporal", 1, label="temporal kernel"),
    "kh": Space("fixed", 2, label="kernel height"),
    "kw": Space("fixed", 2, label="kernel width"),
    "pt": Space("fixed", 1, label="temporal patch"),
    "ph": Space("fixed", 2, label="patch height"),
    "pw": Space("fixed", 2, label="patch width"),
}

R: Axis = ("resid",)


def _linear(module: str, out: Axis, inp: Axis) -> dict[str, tuple[Axis, ...]]:
    return {f"{module}.weight": (out, inp), f"{module}.bias": (out,)}


def _attention(module: str, s: str, kv_in: Axis) -> dict[str, tuple[Axis, ...]]:
    qk, vo = (f"{s}_heads", f"{s}_qk"), (f"{s}_heads", f"{s}_vo")
    return {
        **_linear(f"{module}.q", qk, R), **_linear(f"{module}.k", qk, kv_in),
        **_linear(f"{module}.v", vo, kv_in), **_linear(f"{module}.o", R, vo),
        f"{module}.norm_q.weight": (qk,), f"{module}.norm_k.weight": (qk,),
    }


# Wan (original `WanModel` names); `{i}` is the block index.
WAN_TENSORS: dict[str, tuple[Axis, ...]] = {
    "patch_embedding.weight": (R, ("cin",), ("kt",), ("kh",), ("kw",)),
    "patch_embedding.bias": (R,),
    **_linear("text_embedding.0", ("text_hidden",), ("text_in",)),
    **_linear("text_embedding.2", ("context",), ("text_hidden",)),
    **_linear("time_embedding.0", ("time_hidden",), ("freq",)),
    **_linear("time_embedding.2", R, ("time_hidden",)),
    **_linear("time_projection.1", ("mod6", "resid"), R),
    "blocks.{i}.modulation": (("one",), ("mod6",), R),
    **_attention("blocks.{i}.self_attn", "sa", R),
    "blocks.{i}.norm3.weight": (R,),
    "blocks.{i}.norm3.bias": (R,),
    **_attention("blocks.{i}.cross_attn", "ca", ("context",)),
    # Wan2.1 i2v/flf2v only: image tokens through their own k/v.
    **_linear("blocks.{i}.cross_attn.k_img", ("ca_heads", "ca_qk"), ("img_context",)),
    **_linear("blocks.{i}.cross_attn.v_img", ("ca_heads", "ca_vo"), ("img_context",)),
    "blocks.{i}.cross_attn.norm_k_img.weight": (("ca_heads", "ca_qk"),),
    "img_emb.proj.0.weight": (("clip",),), "img_emb.proj.0.bias": (("clip",),),
    **_linear("img_emb.proj.1", ("clip",), ("clip",)),
    **_linear("img_emb.proj.3", ("img_context",), ("clip",)),
    "img_emb.proj.4.weight": (("img_context",),), "img_emb.proj.4.bias": (("img_context",),),
    "img_emb.emb_pos": (("one",), ("img_tokens",), ("clip",)),
    **_linear("blocks.{i}.ffn.0", ("ffn",), R),
    **_linear("blocks.{i}.ffn.2", R, ("ffn",)),
    "head.modulation": (("one",), ("mod2",), R),
    **_linear("head.head", ("pt", "ph", "pw", "cout"), R),
}

# Diffusers `WanTransformer3DModel`: canonical module -> diffusers module.
DIFFUSERS_MODULES: dict[str, str] = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "blocks.{i}.modulation": "blocks.{i}.scale_shift_table",
    "blocks.{i}.norm3": "blocks.{i}.norm2",
    "blocks.{i}.ffn.0": "blocks.{i}.ffn.net.0.proj",
    "blocks.{i}.ffn.2": "blocks.{i}.ffn.net.2",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    **{f"blocks.{{i}}.{a}.{p}": f"blocks.{{i}}.{b}.{q}"
       for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for p, q in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                    ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    "blocks.{i}.cross_attn.k_img": "blocks.{i}.attn2.add_k_proj",
    "blocks.{i}.cross_attn.v_img": "blocks.{i}.attn2.add_v_proj",
    "blocks.{i}.cross_attn.norm_k_img": "blocks.{i}.attn2.norm_added_k",
    **{f"img_emb.proj.{a}": f"condition_embedder.image_embedder.{b}"
       for a, b in (("0", "norm1"), ("1", "ff.net.0.proj"), ("3", "ff.net.2"), ("4", "norm2"))},
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}


WAN_SHAPES = {
    "dim": ("patch_embedding.weight", 0), "in_dim": ("patch_embedding.weight", 1),
    "ffn_dim": ("blocks.0.ffn.0.weight", 0), "text_dim": ("text_embedding.0.weight", 1),
    "freq_dim": ("time_embedding.0.weight", 1),
}
SEED_SHAPES = {
    "dim": ("text_proj.weight", 0), "text_dim": ("text_proj.weight", 1), "in_dim": ("conv_in.weight", 1),
    "out_dim": ("conv_out.weight", 0), "ffn_dim": ("blocks.0.mlp.0.weight", 0),
}

register(Family("wan", "Wan (original WanModel names)", "blocks.{i}.self_attn.q.weight", {}, shapes=WAN_SHAPES,
                layout="wan", rope_bands=rope_bands, runnable=RUNNABLE, experts=expert_bands))
register(Family("wan-diffusers", "Wan (diffusers WanTransformer3DModel names)", "blocks.{i}.attn1.to_q.weight",
                DIFFUSERS_MODULES, shapes=WAN_SHAPES, layout="diffusers", rope_bands=rope_bands, runnable=RUNNABLE,
                experts=expert_bands))
register(Family("seed", "the seeds' WanLiteStudent (fused nn.MultiheadAttention in_proj)",
                "blocks.{i}.attn.in_proj_weight", {}, default_head_dim=64, shapes=SEED_SHAPES, layout="seed",
                rope_bands=rope_bands))  # its students are planned as Wan's (a Wan teacher's bands)


def family_of(name: str | None) -> Family:
    """A registered family, Wan's for unknown names (as `tensors_of`)."""
    return FAMILIES.get(name or "") or FAMILIES["wan"]


BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def num_blocks(keys: list[str]) -> int:
    idx = [int(m[1]) for k in keys if (m := BLOCK_KEY.match(k))]
    return max(idx) + 1 if idx else 0


def template_of(key: str) -> tuple[str, int | None]:
    """'blocks.7.ffn.0.weight' -> ('blocks.{i}.ffn.0.weight', 7)."""
    m = BLOCK_KEY.match(key)
    if not m:
        return key, None
    return "blocks.{i}." + key[m.end():], int(m[1])


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _own_tensors(family: Family) -> dict[str, tuple[Axis, ...]]:
    """The canonical templates of a family's first stack of blocks and of what is outside its blocks."""
    return WAN_TENSORS if family.tensors is None else {t: WAN_TENSORS.get(t, a) for t, a in family.tensors.items()}


def _stack_tensors(stack: Stack) -> dict[str, tuple[Axis, ...]]:
    """A further stack's canonical block templates ('blocks.{i}.<name in the block>')."""
    return {f"blocks.{{i}}.{name}": WAN_TENSORS.get(f"blocks.{{i}}.{name}", axes)
            for name, axes in stack.tensors.items()}


def tensors_of(family: str | None) -> dict[str, tuple[Axis, ...]]:
    """The canonical templates a family has, with their axes (Wan's all for Wan and for unknown names); a block
    template two stacks share keeps the first stack's axes."""
    fam = family_of(family)
    if not fam.stacks:
        return _own_tensors(fam)
    out = dict(_own_tensors(fam))
    for stack in fam.stacks:
        for template, axes in _stack_tensors(stack).items():
            out.setdefault(template, axes)
    return out


def _native_template(template: str, renames: dict[str, str] | Any) -> str:
    """A canonical template ('blocks.{i}.self_attn.q.weight') in a family's naming ('layers.{i}.attn.q.weight')."""
    module, _, param = template.rpartition(".")
    if template in renames:  # a bare parameter such as `modulation`
        return renames[template]
    if module in renames:
        return f"{renames[module]}.{param}"
    return template


def _stack_native(stack: Stack, template: str) -> str:
    """A canonical block template in a further stack's naming ('blocks.{i}.self_attn.q.weight' ->
    'single_blocks.{i}.attn.to_q.weight')."""
    return f"{stack.prefix}.{{i}}.{_native_template(template.removeprefix('blocks.{i}.'), stack.renames)}"


def native_name(canonical: str, family: str, stack_layers: tuple[int, ...] = ()) -> str:
    """A canonical key in a family's own naming ('blocks.3.self_attn.q.weight' -> 'blocks.3.attn1.to_q.weight');
    `stack_layers`: the model's blocks per stack, for a family of several."""
    fam = FAMILIES[family]
    template, block = template_of(canonical)
    if block is None:
        return _native_template(template, fam.renames)
    stack, start = stack_at(block, stack_layers)
    native = (_native_template(template, fam.renames) if stack == 0 else
              _stack_native(fam.stacks[stack - 1], template))
    return native.replace("{i}", str(block - start))


Table = list[tuple[re.Pattern[str], str, int]]  # (pattern of a family's key, canonical template, its stack)


def _rename_table(family: Family) -> Table:
    """(pattern for this family's key, canonical template, stack) for every canonical tensor."""
    table = [(_template_regex(_native_template(canonical, family.renames)), canonical, 0)
             for canonical in _own_tensors(family)]
    return table + [(_template_regex(_stack_native(stack, canonical)), canonical, s)
                    for s, stack in enumerate(family.stacks, 1) for canonical in _stack_tensors(stack)]


_RENAMES: dict[str, Table] = {}


def _renames(family: str) -> Table | None:
    while _CHANGED:  # a family (re)registered since the tables were built
        _RENAMES.pop(_CHANGED.pop(), None)
    fam = FAMILIES.get(family)
    if fam is None or not (fam.renames or fam.stacks):
        return None
    if family not in _RENAMES:
        _RENAMES[family] = _rename_table(fam)
    return _RENAMES[family]


def _matched(keys: list[str], family: str) -> list[tuple[str, str, int, str | None]]:
    """(key, canonical template or the key itself, stack, block index within its stack) for every key."""
    out = []
    for key in keys:
        found = (key, key, 0, None)
        for pattern, canonical, stack in _renames(family) or ():
            m = pattern.match(key)
            if m:
                found = (key, canonical, stack, m["i"] if "{i}" in canonical else None)
                break
        out.append(found)
    return out


def canonical_names(keys: list[str], family: str) -> tuple[dict[str, str], tuple[int, ...]]:
    """canonical name -> native key for every key (keys the family does not know keep their name), and the blocks
    per stack for a family of several stacks (empty for one), from one pass over the keys. A further stack's blocks
    continue the canonical sequence after the stacks before it."""
    found = _matched(keys, family)
    counts = [0] * (1 + (len(FAMILIES[family].stacks) if family in FAMILIES else 0))
    for _, _, stack, j in found:
        if j is not None:
            counts[stack] = max(counts[stack], int(j) + 1)
    starts = [0, *itertools.accumulate(counts)]
    out: dict[str, str] = {}
    for key, canonical, stack, j in found:
        if j is not None:  # a block: the first stack's index as written, a further stack's counted on
            canonical = canonical.replace("{i}", j if stack == 0 else str(starts[stack] + int(j)))
        out[canonical] = key
    return out, tuple(counts) if len(counts) > 1 else ()


def to_canonical(keys: list[str], family: str) -> dict[str, str]:
    """canonical name -> native key for every key (`canonical_names`' first half)."""
    return canonical_names(keys, family)[0]


def detect_family(keys: list[str]) -> str | None:
    for name, family in FAMILIES.items():
        pattern = _template_regex(family.signature)  # in registration order
        if any(pattern.match(k) for k in keys):
            return name
    return None


def axes_of(canonical_key: str, family: str | None = None) -> tuple[Axis, ...] | None:
    return tensors_of(family).get(template_of(canonical_key)[0])


def infer_config(family: str | None, shapes: dict[str, tuple[int, ...]], config: dict[str, Any],
                 stack_layers: tuple[int, ...] = ()) -> ModelConfig:
    """Architecture numbers from config.json (`config`, the checkpoint's own dict) where present, else from
    canonical shapes (and `stack_layers`, its blocks per stack: `canonical_names`). Heads only where the config records
    them: a state dict cannot tell them (see `infer_heads`)."""
    cfg: dict[str, Any] = {}
    fam = FAMILIES.get(family or "")
    for field, (key, axis) in (fam.shapes or {}).items() if fam else ():
        if key in shapes:
            cfg[field] = shapes[key][axis]
    out_dim = (fam or FAMILIES["wan"]).out_dim(shapes)  # the output head's rows over the patch volume
    if out_dim is not None:
        cfg["out_dim"] = out_dim
    cfg["num_layers"] = num_blocks(list(shapes))
    if stack_layers:
        cfg["stack_layers"] = stack_layers
    for field in (f for f in SIZES if f != "num_heads"):  # deserialization: the checkpoint's config.json
        if field in config and field not in cfg:
            cfg[field] = config[field]
    heads = config.get("num_heads") or config.get("num_attention_heads")
    if not heads and config.get("attention_head_dim") and cfg.get("dim"):
        heads = cfg["dim"] // config["attention_head_dim"]
    found = ModelConfig.from_dict(cfg)
    return with_heads(found, int(heads)) if heads else found


def with_heads(config: ModelConfig, heads: int) -> ModelConfig:
    """The config with `heads` heads (and the head dim they give its width)."""
    return config.updated(num_heads=heads, **({"head_dim": None} if config.dim else {}))


def infer_heads(dim: int, teacher_head_dim: int | None, default_head_dim: int) -> int:
    """Heads for a width whose checkpoint does not record them: keep the teacher's head dim when it divides the
    width, else the even head dim (RoPE rotates pairs) nearest the layout's default that divides it."""
    if teacher_head_dim and dim % teacher_head_dim == 0:
        return dim // teacher_head_dim
    head_dims = [d for d in range(2, dim + 1, 2) if dim % d == 0] or [dim]
    return dim // min(head_dims, key=lambda d: (abs(d - default_head_dim), -d))


def space_size(space: str, config: ModelConfig) -> int | None:
    size = SPACES[space].size
    return size if isinstance(size, int) else getattr(config, size)


def space_sizes(config: ModelConfig | dict[str, Any]) -> dict[str, int]:
    """Size of every space a config defines (head_dim derived from dim / num_heads)."""
    config = as_config(config)
    return {s: n for s in SPACES if (n := space_size(s, config)) is not None}


def wan_tensors(config: ModelConfig | dict[str, Any],
                image: bool = False) -> dict[str, tuple[tuple[int, ...], tuple[Axis, ...]]]:
    """Every canonical key of a Wan config with its shape and axes (T2V layout unless image=True)."""
    config = as_config(config)
    sizes = space_sizes(config)
    out = {}
    for template, axes in WAN_TENSORS.items():
        if "img" in template and not image:
            continue
        shape = tuple(math.prod(sizes[s] for s in axis) for axis in axes)
        for block in range(config.num_layers or 0) if "{i}" in template else [None]:
            out[template.replace("{i}", str(block))] = (shape, axes)
    return out
