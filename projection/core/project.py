"""Execute a plan: stream teacher tensors one student entry at a time, project on the device, release.

Peak memory is the teacher tensors and results of the few entries in flight (see `streaming.WORKERS`); an export
writes each result as it comes, so the student is never whole in memory either.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..cache import SVD_BASES, Bound, Lru
from ..errors import ProjectionError
from .mapping import Entry, Part
from .plan import Plan, flat_index, rescale_factor
from .spectra import squared_norm


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ProjectionError("device 'cuda' chosen but CUDA is not available on this machine; use cpu or auto")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def collapse_time(t: torch.Tensor, axis: int, how: str) -> torch.Tensor:
    """Conv3d kernel -> Conv2d kernel. 'sum' is exact for a static clip (every frame the same image)."""
    if how == "center":
        return t.select(axis, t.shape[axis] // 2)
    return t.sum(dim=axis) if how == "sum" else t.mean(dim=axis)


def svd_bases(w: torch.Tensor, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right singular vectors of a matrix, in float64; `complete` adds the null-space vectors a side
    needs when it keeps more than the rank."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=complete)
    return u, vh


def svd_project(w: torch.Tensor, rows: int, cols: int,
                bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The seeds' per-matrix SVD: each side shrinks onto its own top singular vectors (basis-inconsistent)."""
    u, vh = bases if bases is not None else svd_bases(w, max(rows, cols) > min(w.shape))
    out = w.double()
    if rows < w.shape[0]:
        out = u[:, :rows].T @ out
    if cols < w.shape[1]:
        out = out @ vh[:cols].T
    return out.to(w.dtype)


@dataclass
class SvdCache:
    """Singular vectors per teacher key, least recently used first out past `budget` bytes: the svd-per-matrix
    comparator then costs one SVD per teacher matrix, not one per refresh. `scoped(teacher)` gives a view for one
    teacher that shares the entries, lock and budget, so many projectors can share one cache."""

    budget: int = SVD_BASES.bytes
    items: Lru[tuple[str, str, bool, int], tuple[torch.Tensor, torch.Tensor]] | None = None  # thread-safe
    scope: str = ""  # the teacher's fingerprint

    def __post_init__(self) -> None:
        if self.items is None:
            self.items = Lru(Bound(self.budget), lambda bases: bases[0].nbytes + bases[1].nbytes)

    def scoped(self, scope: str) -> SvdCache:
        return replace(self, scope=scope)

    @property
    def used(self) -> int:
        return self.items.used

    def bases(self, key: str, w: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The thread count stays in the key: MKL's float64 SVD repeats bit for bit at one thread count but not
        # across counts (measured, torch 2.13: 1, 2 and 4 threads give three different results for every matrix
        # from 64 x 64 to 1024 x 1024, by up to 6e-13). Bases made at another count (the app's single-threaded
        # refresh, then an export under `runtime.heavy_work`) are kept apart, not reused, so an export matches the
        # same export from the CLI bit for bit; each count's entries are correct and share one byte bound.
        wanted = (self.scope, key, max(rows, cols) > min(w.shape), torch.get_num_threads())
        found = self.items.get(wanted)
        if found is not None:
            return found
        found = svd_bases(w, wanted[2])  # outside the lock: other matrices' SVDs run meanwhile
        return self.items.put(wanted, found)  # larger than the whole cache: used once, not kept

    def drop(self, scope: str) -> None:
        self.items.drop(lambda k: k[0] == scope)


def is_run(idx: torch.Tensor) -> bool:
    """Ascending consecutive indices: a slice, taken as a view instead of a copy."""
    return len(idx) > 0 and int(idx[-1]) - int(idx[0]) + 1 == len(idx)


def gather_rows_and_columns(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                            block_bytes: int = 1 << 19) -> torch.Tensor:
    """t[rows][:, cols] without a full-size intermediate: rows are gathered a cache-sized block at a time
    (the result is the only large allocation, which matters where fresh pages are expensive)."""
    out = torch.empty(len(rows), len(cols), dtype=t.dtype, device=t.device)
    step = max(1, block_bytes // (t.shape[1] * t.element_size())) if t.device.type == "cpu" else len(rows)
    for r, o in zip(rows.split(step), out.split(step)):
        torch.index_select(t.index_select(0, r), 1, cols, out=o)
    return out


def select(t: torch.Tensor, picks: list[torch.Tensor | None]) -> torch.Tensor:
    """t restricted to the kept indices along each axis (None keeps an axis whole). Slices become views."""
    picks = list(picks)
    for dim, idx in enumerate(picks):
        if idx is not None and is_run(idx):
            t, picks[dim] = t.narrow(dim, int(idx[0]), len(idx)), None
    gathers = [(dim, idx.to(t.device)) for dim, idx in enumerate(picks) if idx is not None]
    if t.ndim == 2 and len(gathers) == 2:
        return gather_rows_and_columns(t, gathers[0][1], gathers[1][1])
    for dim, idx in gathers:
        t = t.index_select(dim, idx)
    return t


def project_part(t: torch.Tensor, part: Part, plan: Plan, svd: SvdCache | None = None) -> torch.Tensor:
    """One teacher tensor -> its student tensor (before rescaling). May be a view of `t`."""
    mapping = plan.mapping
    if part.axes is None:
        return t
    axes = list(part.axes)
    if part.collapses_time:
        kt = axes.index(("kt",))
        t = collapse_time(t, kt, mapping.strategy.conv)
        del axes[kt]
    if mapping.strategy.width == "svd-per-matrix" and t.ndim == 2:
        rows, cols = part.student_shape
        bases = svd.bases(part.teacher_key, t, rows, cols) if svd is not None else None
        return svd_project(t, rows, cols, bases)
    return select(t, [flat_index(axis, part.block, plan, mapping.teacher_sizes) for axis in axes])


@dataclass
class Projected:
    entry: Entry
    tensor: torch.Tensor | None  # None for skipped entries
    kept: float = 0.0  # squared Frobenius norm the student keeps (before rescaling)
    total: float = 0.0  # squared Frobenius norm of the teacher tensors

    @property
    def energy(self) -> float | None:
        """Share of the teacher tensors' squared norm that the student keeps."""
        if self.tensor is None:
            return None
        return self.kept / self.total if self.total > 0 else 1.0


def project_entry(entry: Entry, plan: Plan, read: Callable[[str], torch.Tensor], device: torch.device,
                  svd: SvdCache | None = None, known_norm: Callable[[str], float | None] | None = None) -> Projected:
    """One student entry from its teacher tensors. `known_norm` gives a teacher tensor's squared norm when
    it is already known (magnitude statistics), saving a pass over it."""
    if entry.status == "skipped":
        return Projected(entry, None)
    pieces, kept, total = [], 0.0, 0.0
    for part in entry.parts:
        t = read(part.teacher_key).to(device)
        p = project_part(t, part, plan, svd)
        if p.dtype != t.dtype:
            p = p.to(t.dtype)
        known = known_norm(part.teacher_key) if known_norm is not None else None
        total += known if known is not None else squared_norm(t)
        kept += squared_norm(p)
        scale = rescale_factor(part, plan.mapping)
        pieces.append(p * scale if scale != 1.0 else p)
        del t
    out = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
    if tuple(out.shape) != entry.student_shape:
        raise RuntimeError(f"{entry.student_key}: projected {list(out.shape)} but the student needs "
                           f"{list(entry.student_shape)}")
    if out._base is not None:  # a view of a teacher tensor (a mapped file): own compact memory instead
        out = out.clone(memory_format=torch.contiguous_format)
    return Projected(entry, out.cpu(), kept, total)
