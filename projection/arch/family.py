"""A model family as one description, and the registry of them.

A family names its tensors under the canonical (original Wan) names, each with its axes and the spaces they live
in (`anatomy.SPACES`), and says how its own files name them: a rename table onto the canonical modules, whose
native templates may put blocks under any prefix (`layers.{i}.`, `single_blocks.{i}.`, ...). It says which key
only it has (detection), where its config numbers show in its tensors, its patch size (the output width is the
output head's rows over the patch volume), its RoPE bands, the head dim a width that records no heads is split by,
and the noise levels each of its experts serves. A family whose blocks run here (a teacher: the streamed forward,
fitting, activation statistics) carries a `Runnable`: its block class and the tables that name the block's modules,
so that code reads them from the family and never from module constants.

A family may run more than one stack of blocks, one after another (as Flux runs its single-stream blocks after its
double-stream ones): each further `Stack` has its own block tensors, names and runnable block. Canonically the
stacks are one sequence, `blocks.{i}` with i counting on across them, so mapping, plans and the streamed forward walk
one block index; the config's `stack_layers` says where each stack starts, and a student block takes a teacher block
of its own stack.

Wan (original names), Wan (diffusers names) and the seeds' layout are registered by `anatomy` (their tables live
there); another family registers itself with `register`, and nothing else changes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from ..errors import ProjectionError

if TYPE_CHECKING:
    from torch import nn

    from .config import ModelConfig

AxisSpec = tuple[str, ...]
Bands = Callable[[int], list[int]]  # a head dim -> RoPE pairs per band (t, h, w, ...), summing to head_dim / 2
Experts = Callable[["ModelConfig"], Mapping[str, tuple[float, float]]]  # a config -> expert -> noise levels s it serves


def one_band(head_dim: int) -> list[int]:
    """Every pair of a head rotated as one band (a family that names no bands of its own)."""
    return [head_dim // 2]


@dataclass(frozen=True)
class Runnable:
    """A family's blocks as they run here. A block is built from a config (on torch's meta device, then given the
    teacher's tensors under their canonical names `blocks.{i}.<its parameter name>`) and called as
    block(x [B, N, D], e0 [B, chunks, D], context [B, L, D], freqs [N, head_dim / 2]) -> x [B, N, D]; the names
    below are its submodules (`get_submodule`)."""
    block: Callable[[ModelConfig], nn.Module]
    linears: tuple[str, ...]  # the linear layers `fit` refits, in order
    readers: tuple[str, ...]  # modules whose input is the normalized residual stream (its energy ranks `resid`)
    outputs: Mapping[str, str]  # attention output projection -> its spaces' prefix ('sa': sa_heads, sa_vo)
    neurons: str  # the FFN's down projection: its input is the neurons' activation (ranks `ffn`)
    ungated: str | None = None  # a linear whose output joins the residual stream ungated (`compensate: mean`)


def stack_at(block: int, stack_layers: Sequence[int]) -> tuple[int, int]:
    """(stack, the stack's first block) of a canonical block, given the blocks per stack (none given: one stack)."""
    start = 0
    for s, count in enumerate(stack_layers):
        if block < start + count:
            return s, start
        start += count
    return 0, 0


@dataclass(frozen=True)
class Stack:
    """A further stack of a family's blocks, run after the stacks before it. Its blocks are `<prefix>.{j}.` in the
    family's files (j from 0 within the stack) and canonically continue the sequence `blocks.{i}`."""
    prefix: str  # its blocks' prefix in the files ('single_blocks')
    tensors: Mapping[str, tuple[AxisSpec, ...]]  # its block's tensors, named within the block ('ffn.0.weight'): axes
    renames: Mapping[str, str] = field(default_factory=dict)  # canonical module in a block ('self_attn.q') -> its own
    runnable: Runnable | None = None  # how its blocks run here; None: they do not


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    signature: str  # a key template only this family has ({i}: a block index)
    renames: Mapping[str, str] = field(default_factory=dict)  # canonical module (or parameter) -> this family's name
    default_head_dim: int = 128
    shapes: Mapping[str, tuple[str, int]] | None = None  # config field -> (canonical key, axis) to infer it from
    tensors: Mapping[str, tuple[AxisSpec, ...]] | None = None  # canonical templates it has (None: Wan's all)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w): the output head writes one value per patch cell
    out_key: str | None = "head.head.weight"  # canonical key whose rows are patch volume x out_dim
    layout: str | None = None  # the export layout its files are (layout.LAYOUTS); None: its own (the family's name)
    rope_bands: Bands = one_band  # how a head's RoPE pairs split into bands (kept pairs stay in their band)
    runnable: Runnable | None = None  # its blocks as they run here; None: it is no teacher
    experts: Experts | None = None  # the band of noise levels each expert of a two-expert model serves
    stacks: tuple[Stack, ...] = ()  # further stacks of blocks after the first (whose blocks `renames` names)

    def stack_of(self, block: int, config: ModelConfig) -> int:
        """Which stack a canonical block is in (0: the first), by the config's blocks per stack."""
        return stack_at(block, config.stack_layers)[0]

    def runnable_at(self, block: int, config: ModelConfig) -> Runnable | None:
        """How a canonical block runs: its stack's runnable block and tables."""
        s = self.stack_of(block, config)
        return self.runnable if s == 0 else self.stacks[s - 1].runnable

    def noise_band(self, expert: str | None, config: ModelConfig) -> tuple[float, float]:
        """The noise levels s a model of this family serves: all of [0, 1] for one model, else its expert's band."""
        if expert is None:
            return (0.0, 1.0)
        bands = self.experts(config) if self.experts is not None else {}
        if expert not in bands:
            raise ProjectionError(f"expert '{expert}': the {self.name} family's experts are "
                                  f"{', '.join(bands) or 'none'}")
        return bands[expert]

    def out_dim(self, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        """The output width its tensors show: the output head's rows over the patch volume."""
        if self.out_key is None or self.out_key not in shapes:
            return None
        return shapes[self.out_key][0] // math.prod(self.patch_size)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add (or replace) a family; detection tries families in the order they were first registered."""
    FAMILIES[family.name] = family
    _CHANGED.append(family.name)
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)
    _CHANGED.append(name)


_CHANGED: list[str] = []  # names whose derived tables (anatomy's rename patterns) must be built again
