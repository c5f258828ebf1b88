"""Plan: which teacher indices each shrinking space keeps.

One index set per space (per teacher block for block-internal spaces), shared by every tensor with an axis in
that space: this is what keeps the residual stream, heads, RoPE pairs and FFN neurons consistent across all the
layers that read and write them. Magnitude ranking needs per-axis norms of the teacher tensors; `TeacherStats`
streams them one tensor at a time and caches them, so a new plan after a slider move reads only new blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from ..arch.anatomy import SPACES, family_of
from ..arch.family import Bands
from ..arch.wan import rope_frequencies
from ..cache import TEACHER_STATS, Lru
from ..io.streaming import read_ahead
from .mapping import Entry, Mapping, Part
from .spectra import slice_energy

SpaceKey = tuple[str, "int | None"]  # (space, teacher block or None for global spaces)


# ---------------------------------------------------------------- pure selections

def keep_first(n: int, k: int) -> torch.Tensor:
    return torch.arange(k)


def keep_uniform(n: int, k: int) -> torch.Tensor:
    return torch.tensor([i * n // k for i in range(k)])


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest scores, returned in ascending index order (order preserved, identity when k == n)."""
    return torch.topk(scores.double(), k, sorted=False).indices.sort().values


def keep_rope_pairs(teacher_dim: int, student_dim: int, method: str, bands: Bands) -> torch.Tensor:
    """Channels of one head to keep: whole (2i, 2i+1) pairs, each student band filled from the same teacher band
    (`bands`: the teacher family's split, which the student keeps).

    'frequency' picks, for each student pair, the unused teacher pair in its band whose rotation frequency is
    nearest (in log space), so the student's own RoPE rotates each kept pair at almost the teacher's speed."""
    pairs, offset = [], 0
    for t_freqs, s_freqs in zip(rope_frequencies(teacher_dim, bands=bands), rope_frequencies(student_dim, bands=bands)):
        n, k = len(t_freqs), len(s_freqs)
        if method == "frequency":
            free = list(range(n))
            chosen = []
            for f in s_freqs.log():  # student frequencies descend; greedy nearest keeps the order monotone
                best = min(free, key=lambda j: abs(t_freqs[j].log() - f))
                free.remove(best)
                chosen.append(best)
            chosen.sort()
        else:
            chosen = (keep_first if method == "first" else keep_uniform)(n, k).tolist()
        pairs += [offset + j for j in chosen]
        offset += n
    return torch.tensor([c for p in pairs for c in (2 * p, 2 * p + 1)])


# ---------------------------------------------------------------- teacher statistics

@dataclass
class TeacherStats:
    """Per teacher key and axis: the squared norm of each slice along that axis. Cached (within `TEACHER_STATS`),
    so a new plan after a slider move reads only the blocks that became relevant."""

    read: Callable[[str], torch.Tensor]
    device: torch.device = torch.device("cpu")
    prefetch: Callable[[Sequence[str]], None] | None = None
    cache: Lru[str, dict[int, torch.Tensor]] = field(default_factory=lambda: Lru(TEACHER_STATS))

    def prepare(self, wanted: dict[str, set[int]]) -> dict[str, dict[int, torch.Tensor]]:
        """Compute every wanted axis, reading each tensor once, in the order given (file order streams best);
        returns the statistics of the tensors read."""
        # Axis 0 always: its sum is the tensor's squared norm, so projection need not take it again.
        todo = [(key, sorted((axes | {0}) - self.cache.peek(key, {}).keys())) for key, axes in wanted.items()]
        todo = [(key, axes) for key, axes in todo if axes]
        out = {}
        for i in read_ahead([[key] for key, _ in todo], self.prefetch):
            key, axes = todo[i]
            t = self.read(key).to(self.device)
            found = {**self.cache.peek(key, {}), **{a: slice_energy(t, a).cpu() for a in axes}}
            out[key] = self.cache.put(key, found)
            del t
        return out

    def axis_energy(self, key: str, axis: int) -> torch.Tensor:
        read = self.prepare({key: {axis}})
        return (read.get(key) or self.cache.get(key))[axis]

    def squared_norm(self, key: str) -> float | None:
        """The tensor's squared norm (exactly `spectra.squared_norm`) if its statistics are known, else None."""
        known = self.cache.peek(key, {}).get(0)
        return known.sum().item() if known is not None else None


def _space_profile(norms: torch.Tensor, axis: tuple[str, ...], space: str, sizes: dict[str, int]) -> torch.Tensor:
    """Fold an axis' squared norms [prod(sizes)] down to one space's entries."""
    shape = [sizes[s] for s in axis]
    dims = [i for i, s in enumerate(axis) if s != space]
    folded = norms.reshape(shape)
    return folded.sum(dim=dims) if dims else folded


def ranked_axes(space: str, parts: list[Part]) -> list[tuple[Part, int, tuple[str, ...]]]:
    """The (part, axis index, axis) pairs whose norms rank a space. Block-internal spaces use matrices only
    (a bias alone says little about a neuron)."""
    free = SPACES[space].kind == "free"
    return [(part, a, axis) for part in parts if free or len(part.teacher_shape) >= 2
            for a, axis in enumerate(part.axes or ()) if space in axis]


def space_scores(space: str, parts: list[Part], stats: TeacherStats, sizes: dict[str, int]) -> torch.Tensor:
    """Importance of each teacher index of a space.

    Free (global) spaces: the sum over every tensor that reads or writes the space of its share of squared
    norm per index, so each tensor counts equally. Block-internal spaces: the product over the block's
    matrices of per-index norms (a neuron matters when both its ffn.0 row and ffn.2 column are strong)."""
    free = SPACES[space].kind == "free"
    score = torch.zeros(sizes[space], dtype=torch.float64) if free else torch.ones(sizes[space], dtype=torch.float64)
    for part, a, axis in ranked_axes(space, parts):
        profile = _space_profile(stats.axis_energy(part.teacher_key, a), axis, space, sizes)
        if free:
            score += profile / max(profile.sum().item(), 1e-30)
        else:
            score *= profile.sqrt() + 1e-12
    return score


# ---------------------------------------------------------------- plan

@dataclass
class Plan:
    mapping: Mapping
    index: dict[SpaceKey, torch.Tensor]  # kept teacher indices, ascending

    def indices(self, space: str, block: int | None) -> torch.Tensor | None:
        return self.index.get((space, block if SPACES[space].per_block else None))


def _method(kind: str, mapping: Mapping) -> str:
    s = mapping.strategy
    if kind == "free":
        return "first" if s.width == "svd-per-matrix" else s.width  # svd mode: vectors keep their first entries
    if kind == "neurons":
        return s.ffn
    if kind == "heads":
        return s.heads
    return "magnitude" if s.head_dim == "frequency" else s.head_dim  # dims (rope has its own rule)


ACTIVATION_METHODS = ("activation", "wanda")  # rank by the teacher's activations (wanda: times weight norms)


class ActivationScores(Protocol):
    def score(self, space: str, block: int | None) -> torch.Tensor | None: ...


def make_plan(mapping: Mapping, stats: TeacherStats | None = None,
              activations: ActivationScores | None = None) -> Plan:
    """Choose every index set. Reads teacher tensors only for magnitude ranking (through `stats`, one read
    per tensor whatever the number of spaces it ranks). `activation` ranks by `activations` (the teacher's, on a
    calibration set) where they score the space (residual, heads, v/o dims, FFN neurons), else by magnitude
    (text and time hiddens, the context, cross-attention q/k dims)."""
    t_sizes, s_sizes = mapping.teacher_sizes, mapping.student_sizes
    users: dict[SpaceKey, list[Part]] = {}
    for entry in mapping.entries:
        if entry.status == "skipped":
            continue
        for part in entry.parts:
            for axis in part.axes or ():
                for s in axis:
                    if SPACES[s].kind not in ("fixed", "temporal"):
                        users.setdefault((s, part.block if SPACES[s].per_block else None), []).append(part)
    index: dict[SpaceKey, torch.Tensor] = {}
    ranked: dict[SpaceKey, list[Part]] = {}
    for (space, block), parts in users.items():
        n, k = t_sizes[space], s_sizes.get(space, t_sizes[space])
        kind = SPACES[space].kind
        if k == n:
            index[(space, block)] = torch.arange(n)
        elif kind == "rope":
            rope = mapping.strategy.head_dim
            index[(space, block)] = keep_rope_pairs(n, k, "frequency" if rope == "activation" else rope,
                                                    family_of(mapping.teacher.family).rope_bands)
        elif (method := _method(kind, mapping)) in ACTIVATION_METHODS and activations is None:
            raise ValueError(f"{method} ranking needs the teacher's activations (pass activations)")
        elif method in ACTIVATION_METHODS and (score := activations.score(
                space if method == "activation" else f"{space}_{method}", block)) is not None:
            index[(space, block)] = keep_top(score, k)
        elif method in ("magnitude", *ACTIVATION_METHODS):
            ranked[(space, block)] = _ranking_parts(space, block, parts, users)
        else:
            index[(space, block)] = (keep_first if method == "first" else keep_uniform)(n, k)
    if ranked:
        if stats is None:
            raise ValueError("magnitude ranking needs teacher statistics (pass stats)")
        wanted: dict[str, set[int]] = {}
        for (space, _), parts in ranked.items():
            for part, a, _ in ranked_axes(space, parts):
                wanted.setdefault(part.teacher_key, set()).add(a)
        stats.prepare(wanted)
        for (space, block), parts in ranked.items():
            k = s_sizes.get(space, t_sizes[space])
            index[(space, block)] = keep_top(space_scores(space, parts, stats, t_sizes), k)
    return Plan(mapping, index)


def _ranking_parts(space: str, block: int | None, parts: list[Part], users: dict[SpaceKey, list[Part]]) -> list[Part]:
    if SPACES[space].kind == "heads":
        # A head is ranked by the block's q/k and v/o matrices together: fold each head's dims away.
        prefix = space.removesuffix("_heads")
        parts = [p for s in (f"{prefix}_qk", f"{prefix}_vo") for p in users.get((s, block), [])]
    return list({id(p): p for p in parts}.values())


def needs_stats(mapping: Mapping) -> bool:
    s = mapping.strategy
    methods = {s.width, s.heads, s.ffn} | ({"magnitude"} if s.head_dim in ("frequency", "activation") else set())
    return bool(methods & {"magnitude", *ACTIVATION_METHODS})  # these fall back to magnitude where they have no score


def overlap(a: Plan, b: Plan) -> dict[str, tuple[float, float]]:
    """Per space both plans shrink: (the share of kept indices they agree on, |A & B| / k, averaged over blocks;
    what two random choices of k of n would share, k / n)."""
    found: dict[str, list[tuple[float, float]]] = {}
    for (space, block), x in a.index.items():
        y = b.index.get((space, block))
        if y is not None and len(x) == len(y) < (n := a.mapping.teacher_sizes[space]):
            shared = len(set(x.tolist()) & set(y.tolist()))
            found.setdefault(space, []).append((shared / len(x), len(x) / n))
    return {space: (sum(o for o, _ in v) / len(v), sum(c for _, c in v) / len(v)) for space, v in found.items()}


def flat_index(axis: tuple[str, ...], block: int | None, plan: Plan, sizes: dict[str, int]) -> torch.Tensor | None:
    """Kept positions along one (possibly factored) axis, row-major; None when nothing shrinks."""
    picks = []
    for s in axis:
        idx = plan.indices(s, block)
        picks.append(idx if idx is not None else torch.arange(sizes[s]))
    if all(len(p) == sizes[s] for p, s in zip(picks, axis)):
        return None
    flat = torch.zeros(1, dtype=torch.long)
    for p, s in zip(picks, axis):
        flat = (flat[:, None] * sizes[s] + p[None, :]).reshape(-1)
    return flat


def rescale_factor(part: Part, mapping: Mapping) -> float:
    """Variance-preserving rule: a matrix whose input axis shrinks from n to n' is scaled by sqrt(n / n')."""
    if mapping.strategy.rescale != "variance" or part.axes is None or len(part.teacher_shape) != 2:
        return 1.0
    n = math.prod(mapping.teacher_sizes.get(s, 1) for s in part.axes[1])
    k = math.prod(mapping.student_sizes.get(s, 1) for s in part.axes[1])
    return math.sqrt(n / k) if k < n else 1.0


@dataclass
class IndexChoice:
    label: str  # e.g. "residual stream (teacher block 2)"
    kept: list[int]
    total: int


def index_choices(plan: Plan, entry: Entry) -> list[IndexChoice]:
    """The kept teacher indices of every space the entry's axes live in, under `plan` (one per space and, for
    per-block spaces, teacher block)."""
    out, seen = [], set()
    for part in entry.parts:
        for axis in part.axes or ():
            for space in axis:
                per_block = SPACES[space].per_block
                key = (space, part.block if per_block else None)
                idx = plan.indices(space, part.block)
                if key in seen or idx is None:
                    continue
                seen.add(key)
                label = SPACES[space].label or space
                label += f" (teacher block {part.block})" if per_block else ""
                out.append(IndexChoice(label, idx.tolist(), plan.mapping.teacher_sizes[space]))
    return out
