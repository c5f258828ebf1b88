"""Student shapes near a parameter target, for a given teacher: the widths, depths and FFN widths a projection
can fill (the teacher's head dim kept, blocks chosen evenly), counted exactly from Wan's tensor shapes, the presets
that fit, and the frameworks that load each shape as it is. Pure arithmetic on configs: nothing is built or read."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ProjectionError
from .anatomy import wan_tensors
from .config import DEFAULT_LAYOUT, SIZES, ModelConfig, as_config, student_config
from .presets import FRAMEWORKS, PRESETS, STOCK, Framework

FFN_MULTIPLE = 128  # a planned FFN width is rounded to this (tensor-core friendly), or to the teacher's if smaller
FLOPS_MEANING = ("FLOPs per latent token: 2 x the multiply-adds of every linear one latent token (one 1x2x2 patch) "
                 "passes through: patch embedding, per block self-attention q/k/v/o, cross-attention q/o and the FFN, "
                 "and the head; not the attention products (they grow with the sequence), nor the cross-attention "
                 "k/v and the text and time embeddings (computed once per text token or step)")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)


def _split(config: ModelConfig) -> tuple[int, int]:
    """(parameters outside the blocks, parameters of one block): every block has the same shapes."""
    def total(layers: int) -> int:
        return sum(math.prod(shape) for shape, _ in wan_tensors(config.updated(num_layers=layers)).values())

    outside = total(0)
    return outside, total(1) - outside


def count_params(config: ModelConfig | dict[str, Any]) -> int:
    """Parameters of a Wan T2V model of this config: every tensor of `wan_tensors` (no image tensors)."""
    config = as_config(config)
    outside, block = _split(config)
    return outside + (config.num_layers or 0) * block


def flops_per_token(config: ModelConfig | dict[str, Any]) -> int:
    """FLOPs per latent token, as FLOPS_MEANING defines them (2 per multiply-add; biases and norms not counted)."""
    c = as_config(config)
    patch = math.prod(c.patch_size)
    block = 4 * c.dim * c.dim + 2 * c.dim * c.dim + 2 * c.dim * c.ffn_dim  # self q,k,v,o; cross q,o; FFN in, out
    return 2 * (c.in_dim * patch * c.dim + c.num_layers * block + c.dim * patch * c.out_dim)


def parse_params(text: str, most: int | None = None) -> int:
    """A parameter count from '1.3B', '300M', '5e8' or '1300000000' (k, M, B or G, T; any case); positive, and
    less than `most` where given."""
    found = _NUMBER.match(str(text).replace(",", "").replace("_", ""))
    number = float(found[1]) * _SUFFIX[found[2].lower()] if found else 0.0
    if not math.isfinite(number) or number < 1:  # 1e999 overflows to inf
        raise ProjectionError(f"params: {str(text)[:40]!r} is not a parameter count (e.g. 1.3B, 300M or 5e8)")
    if most is not None and number >= most:
        raise ProjectionError(f"params: {str(text)[:40]} is not less than the teacher's {most:,} parameters")
    return round(number)


def stock_name(config: ModelConfig) -> str | None:
    """The released Wan shape this config has exactly, if any."""
    return next((name for name, shape in STOCK.items() if all(getattr(config, k) == v for k, v in shape.items())),
                None)


def loads(framework: Framework, config: ModelConfig) -> bool:
    head_dim = config.head_dim or (config.dim // config.num_heads if config.dim and config.num_heads else None)
    return ((framework.dims is None or config.dim in framework.dims)
            and (framework.head_dim is None or head_dim == framework.head_dim)
            and (framework.freq_dim is None or config.freq_dim == framework.freq_dim)
            and (not framework.stock or stock_name(config) is not None))


def frameworks(config: ModelConfig) -> list[str]:
    """The frameworks that load a Wan model of this shape as it is, in FRAMEWORKS' order."""
    return [f.name for f in FRAMEWORKS if loads(f, config)]


@dataclass(frozen=True)
class Candidate:
    """A student shape the teacher can fill."""
    config: ModelConfig  # complete (the default layout); its other widths are the teacher's, or the preset's
    params: int
    flops: int  # per latent token (FLOPS_MEANING)
    share: float  # of the teacher's parameters
    frameworks: tuple[str, ...]  # those that load the shape as it is (presets.FRAMEWORKS)
    preset: str | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The student config to write for it."""
        if self.preset:
            return {"preset": self.preset}
        return {"layout": DEFAULT_LAYOUT, **{k: getattr(self.config, k) for k in ("dim", "ffn_dim", "num_heads",
                                                                                 "num_layers")}}

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "student_config": self.fields, "config": self.config.to_dict(),
                "head_dim": self.config.head_dim, "params": self.params, "share": self.share,
                "flops_per_token": self.flops, "frameworks": list(self.frameworks)}


def layer_counts(depth: int) -> list[int]:
    """The depths that take the teacher's blocks evenly: its divisors (40 -> 40, 20, 10, 8, 5, 4, 2, 1)."""
    return [n for n in range(depth, 0, -1) if depth % n == 0]


def ffn_for(width: int, teacher: ModelConfig) -> int:
    """The FFN width in the teacher's FFN/width ratio, rounded to FFN_MULTIPLE and at most the teacher's."""
    unit = min(FFN_MULTIPLE, teacher.ffn_dim)
    return min(teacher.ffn_dim, max(unit, round(teacher.ffn_dim * width / teacher.dim / unit) * unit))


def _teacher_shape(teacher: ModelConfig) -> ModelConfig:
    missing = [n for n in SIZES if getattr(teacher, n) is None]
    if missing or not teacher.head_dim:
        raise ProjectionError(f"teacher: '{(missing or ['num_heads'])[0]}' is unknown; a plan needs its whole shape")
    return teacher


def plan_students(teacher: ModelConfig | dict[str, Any], params: float, count: int = 5) -> list[Candidate]:
    """Student shapes near `params` parameters, closest first (by |log(params / target)|): for each depth that
    takes the teacher's blocks evenly, the width (a multiple of the teacher's head dim, at most its width, FFN in
    its ratio) whose count is closest; the `count` closest of those, and every preset that fits inside the teacher
    (widths, FFN and depth at most its own, its head dim and latent channels)."""
    teacher = _teacher_shape(as_config(teacher))
    total = count_params(teacher)
    if not 0 < params < total:
        raise ProjectionError(f"params: {params:,.0f} must be positive and less than the teacher's {total:,}")
    if count < 1:
        raise ProjectionError(f"count: {count} must be at least 1")
    head = teacher.head_dim
    widths = range(head, teacher.dim + 1, head)

    def off(n: int) -> float:
        return abs(math.log(n / params))

    sizes = {w: _split(student_config(DEFAULT_LAYOUT, {"dim": w, "ffn_dim": ffn_for(w, teacher), "num_heads": w // head,
                                                       "num_layers": 1}, teacher)) for w in widths}
    grid = []
    for depth in layer_counts(teacher.num_layers):
        w = min(widths, key=lambda w: off(sizes[w][0] + depth * sizes[w][1]))  # outside + depth x one block
        grid.append({"dim": w, "ffn_dim": ffn_for(w, teacher), "num_heads": w // head, "num_layers": depth})
    found = [_candidate(student_config(DEFAULT_LAYOUT, f, teacher), total) for f in grid]
    found = sorted(found, key=lambda c: off(c.params))[:count]
    for name, shape in PRESETS.items():
        if _fits(shape, teacher):
            found.append(_candidate(student_config(DEFAULT_LAYOUT, {"preset": name}, teacher), total, name))
    return sorted(found, key=lambda c: off(c.params))


def _fits(shape: dict[str, int], teacher: ModelConfig) -> bool:
    return (all(shape[n] <= getattr(teacher, n) for n in ("dim", "ffn_dim", "num_layers"))
            and shape["dim"] // shape["num_heads"] == teacher.head_dim
            and (shape["in_dim"], shape["out_dim"]) == (teacher.in_dim, teacher.out_dim))


def _candidate(config: ModelConfig, teacher_params: int, preset: str | None = None) -> Candidate:
    n = count_params(config)
    return Candidate(config, n, flops_per_token(config), n / teacher_params, tuple(frameworks(config)), preset)
