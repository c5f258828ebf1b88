"""A model family as one description, and the registry of them.

A family names its tensors under the canonical (original Wan) names, each with its axes and the spaces they live
in (`anatomy.SPACES`), and says how its own files name them: a rename table onto the canonical modules, whose
native templates may put blocks under any prefix (`layers.{i}.`, `single_blocks.{i}.`, ...). It says which key
only it has (detection), where its config numbers show in its tensors, its patch size (the output width is the
output head's rows over the patch volume), and the head dim a width that records no heads is split by.

Wan (original names), Wan (diffusers names) and the seeds' layout are registered by `anatomy` (their tables live
there); another family registers itself with `register`, and nothing else changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

AxisSpec = tuple[str, ...]


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
    wan_blocks: bool = False  # a teacher: its blocks run as Wan's (the streamed forward, activation statistics)

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
