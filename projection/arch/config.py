"""Model configs: the frozen, typed `ModelConfig` every module reads (validated in one place, (de)serialized by
`from_dict` / `to_dict`); student configs, checked against the teacher before anything is built and completed from
the teacher's, in one of the student layouts (`layout.py` says what each writes and runs)."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProjectionError
from .presets import expand_preset

LAYOUT_NAMES = ("diffusers", "wan", "wanlite", "seed")  # layout.LAYOUTS describes each
DEFAULT_LAYOUT = "diffusers"  # what the training frameworks load (diffusers and those built on it)
DEFAULTS = {"in_dim": 16, "out_dim": 16, "text_dim": 4096, "freq_dim": 256}
SIZES = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")
FIELDS = ("layout", *SIZES)
PROJECTED = ("dim", "ffn_dim")  # selected from the teacher's: at most the teacher's
MAX_IO_DIM = 1 << 14  # in/out/text/freq widths may differ from the teacher's (those tensors start fresh)
SERIALIZED = (*FIELDS, "head_dim", "stack_layers")  # the fields a config dict (config.json, reports, the app) may hold
STUDENT_FIELDS = (*FIELDS, "preset")  # a student config's: `preset` names a stock shape (presets.py)


def heads_error(dim: int, heads: int, what: str = "width") -> ProjectionError:
    return ProjectionError(f"{what} {dim} is not divisible by num_heads {heads}")


@dataclass(frozen=True)
class ModelConfig:
    """A model's architecture numbers. A field is None where the model does not tell it (a state dict records
    no heads; a student with unknown names knows only what its rules map). `head_dim` is derived from `dim` and
    `num_heads` here, once, where both are known and no head dim is given (a student with unknown names has the
    head dim its tensors show, which its attention width need not share with its residual width).

    Wan's own numbers are fields too (patch size, eps, q/k norm, cross-attention norm), at Wan's values; like
    `head_dim`, they are written out only where the dict the config came from held them: `to_dict` gives back
    exactly the keys, in the order, of `from_dict`'s input, so config.json, the report and the app's cards keep
    their bytes. Two configs are equal when their fields are, whichever keys they were written with."""
    layout: str | None = None  # a student's layout (layout.LAYOUTS) or custom; None for a teacher
    dim: int | None = None
    ffn_dim: int | None = None
    num_heads: int | None = None
    num_layers: int | None = None
    in_dim: int | None = None
    out_dim: int | None = None
    text_dim: int | None = None
    freq_dim: int | None = None
    head_dim: int | None = None  # derived: dim // num_heads
    stack_layers: tuple[int, ...] = ()  # blocks per stack, in the order they run, for a family of several stacks
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    keys_: tuple[str, ...] = field(default=(), repr=False, compare=False)  # the serialized keys, in order

    def __post_init__(self) -> None:
        for name in SIZES:  # a model without blocks (a shell around the teacher's streamed ones) has 0 layers
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < (0 if name == "num_layers" else 1)):
                raise ProjectionError(f"config: '{name}' must be a positive integer, got {value!r:.60}")
        if self.head_dim is None and self.dim is not None and self.num_heads is not None:
            if self.dim % self.num_heads:
                raise heads_error(self.dim, self.num_heads)
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)  # derived, here only
        stacks = self.stack_layers
        if not isinstance(stacks, (list, tuple)) or any(type(n) is not int or n < 0 for n in stacks):
            raise ProjectionError(f"config: 'stack_layers' must be a list of block counts, got {stacks!r:.60}")
        object.__setattr__(self, "stack_layers", tuple(stacks))  # a JSON list, kept hashable
        if stacks and self.num_layers is not None and sum(stacks) != self.num_layers:
            raise ProjectionError(f"config: 'stack_layers' {list(stacks)} adds up to {sum(stacks)} blocks, not "
                                  f"num_layers {self.num_layers}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """A config from its dict (the keys of SERIALIZED; other keys are refused)."""
        if isinstance(data, ModelConfig):
            return data
        unknown = [k for k in data if k not in SERIALIZED]
        if unknown:
            raise ProjectionError(f"config: unknown field {unknown[0]!r:.60}; the fields are {', '.join(SERIALIZED)}")
        return cls(**dict(data), keys_=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in self.keys_}

    def updated(self, **changes: Any) -> ModelConfig:
        """The config with these fields set, as a dict update would (new keys last); a changed width or head
        count derives its head dim again."""
        data = self.to_dict()
        data.update(changes)
        if {"dim", "num_heads"} & set(changes) and "head_dim" not in changes and "head_dim" in data:
            data["head_dim"] = None  # derived again
        return ModelConfig.from_dict(data)


def check_layout(name: Any) -> str:
    if name not in LAYOUT_NAMES:
        raise ProjectionError(f"student layout {name!r:.60} is unknown; choose one of {', '.join(LAYOUT_NAMES)}")
    return name


def as_config(config: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from a config or a dict that holds one among other keys (an export's config.json and its
    dtype): the boundary where callers hand dicts in."""
    if isinstance(config, ModelConfig):
        return config
    return ModelConfig.from_dict({k: v for k, v in config.items() if k in SERIALIZED})


def check_fields(fields: Mapping[str, Any], teacher: ModelConfig | Mapping[str, Any],
                 max_layers: int | None = None) -> None:
    """Refuse, before anything is built, a student config the teacher cannot fill: unknown fields, sizes that
    are not positive integers, and sizes past the teacher's. Channels and FFN neurons are kept or dropped, never
    invented; blocks past the teacher's need an explicit layer list (`max_layers` entries); heads divide the
    width, and the mapper says how many fit the teacher's."""
    teacher = as_config(teacher)
    for name in fields:
        if name not in STUDENT_FIELDS:
            close = difflib.get_close_matches(str(name), STUDENT_FIELDS, 1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ProjectionError(f"student config: unknown field {name!r:.60}{hint}; the fields are "
                                  f"{', '.join(STUDENT_FIELDS)}")
    for name in (n for n in SIZES if n in fields):
        value = fields[name]
        if type(value) is not int or value <= 0:  # not a bool, a float or a string
            raise ProjectionError(f"student config: '{name}' must be a positive integer, got {value!r:.60}")
        if name == "num_layers":
            depth = teacher.num_layers or 0
            if value > max(depth, max_layers or 0):
                how = (f"the strategy's layer list has {max_layers} entries" if (max_layers or 0) > depth else
                       "a deeper student needs a strategy 'layers' list that repeats blocks")
                raise ProjectionError(f"student config: num_layers {value} is more than the teacher's {depth} "
                                      f"blocks; {how}")
        elif name in PROJECTED:
            bound = getattr(teacher, name) or MAX_IO_DIM
            if value > bound:
                raise ProjectionError(f"student config: {name} {value} is more than the teacher's {bound}; a "
                                      f"projection keeps or drops what the teacher has")
        elif name != "num_heads" and value > max(getattr(teacher, name) or 0, MAX_IO_DIM):
            raise ProjectionError(f"student config: {name} {value} is more than {MAX_IO_DIM}, the most allowed "
                                  f"where it differs from the teacher's ({getattr(teacher, name)})")


def student_config(layout: str, fields: Mapping[str, Any], teacher: ModelConfig | Mapping[str, Any],
                   max_layers: int | None = None) -> ModelConfig:
    """A full student config: given fields, else the preset's they name (presets.expand_preset), else the
    teacher's (the seed layout keeps its 4 latent channels)."""
    fields = expand_preset(fields)
    teacher = as_config(teacher)
    check_fields(fields, teacher, max_layers)
    check_layout(layout)
    cfg: dict[str, Any] = {"layout": layout}
    seed_defaults = {"in_dim": 4, "out_dim": 4} if layout == "seed" else {}
    for name in SIZES:
        own = getattr(teacher, name) if name in teacher.keys_ else DEFAULTS.get(name)
        value = fields.get(name, seed_defaults.get(name, own))
        if value is None:
            raise ProjectionError(f"student config: '{name}' is missing and the teacher does not define it")
        if not isinstance(value, int) or value <= 0:
            raise ProjectionError(f"student config: '{name}' must be a positive integer, got {value!r}")
        cfg[name] = value
    if "num_heads" not in fields and "dim" in fields and teacher.head_dim:
        cfg["num_heads"] = max(1, cfg["dim"] // teacher.head_dim)  # keep the teacher's head dim
    if cfg["dim"] % cfg["num_heads"]:
        raise heads_error(cfg["dim"], cfg["num_heads"], "student config: dim")
    return ModelConfig.from_dict({**cfg, "head_dim": None})  # derived
