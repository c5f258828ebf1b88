"""What was kept: retained weight energy per entry, per student layer and per kind of matrix.

An entry's retained energy is the share of its teacher tensors' squared Frobenius norm that the student tensor
keeps. Groups and the overall mean weight entries by their student parameters, and an entry nothing transfers to
counts as 0: a broken mapping shows as lost energy, not as a smaller sample. It is a statistic of the weights,
not a measure of how well the student computes the teacher's function.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from ..arch.anatomy import template_of
from .mapping import Entry
from .project import Projected

MEANING = ("parameter-weighted share of the teacher's squared weight norm that the student's tensors keep; tensors "
           "nothing transfers to count as 0; a weight statistic, not a measure of output quality")


def layer_of(entry: Entry) -> str:
    return f"block {entry.student_block}" if entry.student_block is not None else "top"


def kind_of(entry: Entry) -> str:
    """'blocks.3.self_attn.q.weight' -> 'self_attn.q.weight'."""
    template, block = template_of(entry.student_key)
    return template.removeprefix("blocks.{i}.") if block is not None else template


def energy_by(results: Iterable[Projected], group=layer_of) -> dict[Any, float]:
    """Retained energy per group: the parameter-weighted mean of its entries' energies, skipped entries as 0."""
    kept: dict[Any, float] = {}
    params: dict[Any, int] = {}
    for r in results:
        g = group(r.entry)
        kept[g] = kept.get(g, 0.0) + (r.energy or 0.0) * r.entry.params
        params[g] = params.get(g, 0) + r.entry.params
    return {g: kept[g] / params[g] if params[g] else 0.0 for g in kept}


def mean_energy(results: Iterable[Projected]) -> float | None:
    """Retained energy of the whole student (None when it has no entries)."""
    return energy_by(results, lambda _: "all").get("all")


def retained_weight_energy(results: list[Projected]) -> dict[str, Any]:
    """The summary's energy section: the mean, per layer and per kind, and what the numbers mean."""
    return {"mean": mean_energy(results), "by_layer": energy_by(results), "by_kind": energy_by(results, kind_of),
            "meaning": MEANING}


def matrix_kind(entry: Entry) -> str:
    """A block matrix' kind in the teacher's vocabulary ('self_attn.q.weight'); stacked entries by their own name."""
    if len(entry.parts) == 1:
        return template_of(entry.parts[0].teacher_key)[0].removeprefix("blocks.{i}.")
    return re.sub(r"^[\w.]*?\.\d+\.", "", entry.student_key)


# the teacher's block and top-level matrices by kind (`matrix_kind`), as the app labels them, in its order
MATRIX_LABELS = {
    "self_attn.q.weight": "self-attention q", "self_attn.k.weight": "self-attention k",
    "self_attn.v.weight": "self-attention v", "self_attn.o.weight": "self-attention o",
    "cross_attn.q.weight": "cross-attention q", "cross_attn.k.weight": "cross-attention k",
    "cross_attn.v.weight": "cross-attention v", "cross_attn.o.weight": "cross-attention o",
    "ffn.0.weight": "FFN in", "ffn.2.weight": "FFN out", "modulation": "modulation",
    "patch_embedding.weight": "patch embedding", "text_embedding.0.weight": "text embedding in",
    "text_embedding.2.weight": "text embedding out", "time_embedding.0.weight": "time embedding in",
    "time_embedding.2.weight": "time embedding out", "time_projection.1.weight": "time projection",
    "head.head.weight": "head", "head.modulation": "head modulation",
}
