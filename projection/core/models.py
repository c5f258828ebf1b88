"""Teacher and student as the mapper sees them: family, config, and canonical key -> shape."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..arch.anatomy import (FAMILIES, canonical_names, detect_family, family_of, infer_config, infer_heads,
                             native_name, with_heads)
from ..arch.config import DEFAULT_LAYOUT, ModelConfig, student_config
from ..arch.layout import PATCH, build_student, layout_of, stored_shape
from ..errors import ProjectionError
from ..io.checkpoint import PICKLE_SUFFIXES, Checkpoint, PathCheck, open_checkpoint, resolve_checked
from ..io.inputs import load_json, load_yaml, read_text

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class ModelView:
    source: str
    family: str | None  # wan | wan-diffusers | seed | None (unknown names)
    layout: str  # the layout its files are (layout.LAYOUTS: diffusers | wan | wanlite | seed) or custom
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]  # canonical key -> shape
    native: dict[str, str]  # canonical key -> key in the files
    checkpoint: Checkpoint | None = None  # None for a student built from a config
    heads_recorded: bool = True  # False: a state dict without heads in its config; num_heads is a guess

    @property
    def heads_inferred(self) -> bool:
        return not self.heads_recorded and self.config.num_heads is not None

    @property
    def band(self) -> tuple[float, float]:
        """The noise levels s it serves: its expert's band as its family says, else (one model) all of [0, 1]."""
        expert = self.checkpoint.expert if self.checkpoint is not None else None
        if expert is None:
            return (0.0, 1.0)
        if self.family not in FAMILIES:
            raise ProjectionError(f"{self.source}: expert '{expert}' of a model whose family is unknown: the noise "
                                  "levels it serves are not known")
        return FAMILIES[self.family].noise_band(expert, self.config)

    @property
    def num_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes.values())

    def read(self, key: str) -> torch.Tensor:
        """One tensor by canonical name."""
        if self.checkpoint is None:
            raise ProjectionError(f"{self.source}: a student built from a config has no stored tensors")
        return self.checkpoint.get(self.native.get(key, key))

    def prefetch(self, keys: Sequence[str]) -> None:
        """Start reading these tensors (canonical names) in the background."""
        if self.checkpoint is not None:
            self.checkpoint.prefetch(self.native.get(k, k) for k in keys)

    def summary(self) -> dict[str, Any]:
        ckpt = self.checkpoint
        return {
            "source": self.source, "family": self.family, "layout": self.layout,
            "description": FAMILIES[self.family].description if self.family in FAMILIES else "unknown names",
            "config": self.config.to_dict(), "heads_inferred": self.heads_inferred,
            "keys": len(self.shapes), "params": self.num_params,
            "format": ckpt.format if ckpt else "config", "expert": ckpt.expert if ckpt else None,
            "dtypes": ckpt.dtypes() if ckpt else {"float32": len(self.shapes)},
            "bytes": ckpt.nbytes if ckpt else self.num_params * 4,
            "files": [str(f) for f in ckpt.files] if ckpt else [],
        }


def default_head_dim(family: str | None) -> int:
    return family_of(family).default_head_dim


def view_checkpoint(ckpt: Checkpoint) -> ModelView:
    family = detect_family(ckpt.keys())
    native, stacks = canonical_names(ckpt.keys(), family or "")
    shapes = {c: ckpt.tensors[n].shape for c, n in native.items()}
    config = infer_config(family, shapes, ckpt.config, stacks)
    recorded = config.num_heads is not None
    if not recorded and config.dim:  # a guess, flagged as one (heads_inferred)
        config = with_heads(config, infer_heads(config.dim, None, default_head_dim(family)))
    layout = (FAMILIES[family].layout or family) if family in FAMILIES else "custom"  # unregistered names: custom
    if layout == "wan" and len(shapes.get(PATCH, ())) == 4:  # the reference module's Conv2d patch
        layout = "wanlite"
    return ModelView(ckpt.source, family, layout, config, shapes, native, ckpt, recorded)


def open_teacher(source: str, expert: str | None = None, check: PathCheck | None = None) -> ModelView:
    view = view_checkpoint(open_checkpoint(source, expert, check))
    if view.family not in FAMILIES or FAMILIES[view.family].runnable is None:  # its blocks cannot run here
        raise ProjectionError(f"{source}: not a Wan checkpoint (no 'blocks.N.self_attn.q.weight' or "
                              f"'blocks.N.attn1.to_q.weight' among its {len(view.shapes)} keys)")
    return view


def read_student_config(path: Path) -> dict[str, Any]:
    text = read_text(path, "student config")
    data = load_json(text, str(path)) if path.suffix == ".json" else load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ProjectionError(f"{path}: a student config is a mapping (layout, dim, num_layers, ...)")
    return data


def student_from_config(fields: dict[str, Any], teacher: ModelView, source: str = "config",
                        max_layers: int | None = None) -> ModelView:
    """A student of a config: its runnable module's tensors, named and shaped as its layout stores them."""
    try:
        layout = layout_of(fields.get("layout", DEFAULT_LAYOUT))
        config = student_config(layout.name, fields, teacher.config, max_layers)
    except ProjectionError as exc:
        raise ProjectionError(f"{source}: {exc}" if source != "config" else str(exc)) from exc
    state = build_student(config, "meta").state_dict()
    shapes = {k: stored_shape(layout, k, tuple(v.shape)) for k, v in state.items()}
    native = {k: native_name(k, layout.family) for k in shapes}
    return ModelView(source, layout.family, layout.name, config, shapes, native)


def open_student(source: str | dict[str, Any], teacher: ModelView, num_heads: int | None = None,
                 check: PathCheck | None = None, max_layers: int | None = None, layout: str | None = None) -> ModelView:
    """A student config (dict, .json or .yaml with a 'layout') or a checkpoint to fill (Wan's original names, the
    diffusers names, the seeds' layout, or unknown names mapped by rules); `check` as for open_checkpoint.

    The config is the student's own: given fields for a config (omitted ones documented as the teacher's), what
    a checkpoint's shapes and config.json say for a checkpoint, never the teacher's numbers. `num_heads` sets the
    heads (a state dict does not record them); without it, unrecorded heads keep the teacher's head dim when it
    divides the width, and are flagged as inferred. A config is checked against the teacher before anything is
    built; max_layers: the depth an explicit layer list allows. `layout` overrides a config's; a checkpoint's names
    decide its own."""
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise ProjectionError(f"num_heads must be a positive integer, got {num_heads!r}")
    given = {**({"num_heads": num_heads} if num_heads else {}), **({"layout": layout} if layout else {})}
    if isinstance(source, dict):
        return student_from_config({**source, **given}, teacher, max_layers=max_layers)
    path = Path(source)
    if path.is_file() and path.suffix in CONFIG_SUFFIXES and not path.name.endswith(".index.json"):
        resolve_checked(path, check)
        return student_from_config({**read_student_config(path), **given}, teacher, str(path), max_layers)
    if path.is_file() and not (path.suffix in (".safetensors", *PICKLE_SUFFIXES) or path.name.endswith(".index.json")):
        raise ProjectionError(f"{path}: unknown student file type; a student is a config ({'/'.join(CONFIG_SUFFIXES)}) "
                              f"or a checkpoint to fill (.safetensors, an index json, {'/'.join(PICKLE_SUFFIXES)})")
    view = view_checkpoint(open_checkpoint(source, check=check))
    if layout and layout != view.layout:
        raise ProjectionError(f"{source}: a checkpoint's tensor names decide its layout ({view.layout}); a layout "
                              f"({layout}) applies to a student config")
    try:
        if num_heads:
            view.config, view.heads_recorded = with_heads(view.config, num_heads), True
        elif not view.heads_recorded and view.config.dim:
            guess = infer_heads(view.config.dim, teacher.config.head_dim, default_head_dim(view.family))
            view.config = with_heads(view.config, guess)
    except ProjectionError as exc:
        raise ProjectionError(f"{source}: {exc}") from exc
    return view
