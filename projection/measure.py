"""What was kept: retained energy per entry, per student layer and per kind of matrix; coverage."""
from __future__ import annotations

from typing import Iterable

from .anatomy import template_of
from .mapping import Entry
from .project import Projected


def layer_of(entry: Entry) -> str:
    return f"block {entry.student_block}" if entry.student_block is not None else "top"


def kind_of(entry: Entry) -> str:
    """'blocks.3.self_attn.q.weight' -> 'self_attn.q.weight'."""
    template, block = template_of(entry.student_key)
    return template.removeprefix("blocks.{i}.") if block is not None else template


def energy_by(results: Iterable[Projected], group=layer_of) -> dict[str, float]:
    """Share of the teacher's squared norm kept, summed within each group (skipped entries excluded)."""
    kept: dict[str, float] = {}
    total: dict[str, float] = {}
    for r in results:
        if r.tensor is None:
            continue
        g = group(r.entry)
        kept[g] = kept.get(g, 0.0) + r.kept
        total[g] = total.get(g, 0.0) + r.total
    return {g: kept[g] / total[g] if total[g] > 0 else 1.0 for g in kept}


def mean_energy(results: Iterable[Projected]) -> float | None:
    """Parameter-weighted mean of the entries' retained energy."""
    pairs = [(r.energy, r.entry.params) for r in results if r.energy is not None]
    weight = sum(p for _, p in pairs)
    return sum(e * p for e, p in pairs) / weight if weight else None
