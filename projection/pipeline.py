"""The one object the CLI and the inspector drive: load -> map -> plan -> project -> measure.

It caches what does not change between refreshes (teacher statistics, recently read teacher tensors, projected
entries per plan), so moving a slider re-reads only the teacher blocks that became relevant.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

from .mapping import Mapping, Rule, build_mapping
from .measure import energy_by, kind_of, mean_energy
from .models import ModelView, open_student, open_teacher
from .plan import Plan, TeacherStats, make_plan, needs_stats
from .project import Projected, pick_device, project_entry
from .spectra import singular_values
from .strategy import Strategy

Progress = Callable[[int, int, str], None]


@dataclass
class TensorCache:
    """Least-recently-used teacher tensors, bounded in bytes (a 14B teacher streams, a demo stays in memory)."""

    read: Callable[[str], torch.Tensor]
    budget: int = 1 << 30
    items: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)
    used: int = 0

    def __call__(self, key: str) -> torch.Tensor:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        t = self.read(key)
        size = t.numel() * t.element_size()
        if size <= self.budget:
            t = t.clone()  # own the memory: a memory-mapped view would keep the file pages pinned
            self.items[key] = t
            self.used += size
            while self.used > self.budget:
                _, old = self.items.popitem(last=False)
                self.used -= old.numel() * old.element_size()
        return t


class Projector:
    def __init__(self, teacher: ModelView, student: ModelView, strategy: Strategy | None = None,
                 rules: dict[str, Rule] | None = None, cache_bytes: int = 0):
        self.teacher, self.student = teacher, student
        self.strategy = strategy or Strategy()
        self.rules: dict[str, Rule] = dict(rules or {})
        self.read = TensorCache(teacher.read, cache_bytes) if cache_bytes else teacher.read
        self.stats = TeacherStats(self.read, pick_device(self.strategy.device))
        self._mapping: tuple[str, Mapping] | None = None
        self._plan: tuple[str, Plan] | None = None
        self._results: dict[tuple[str, str], Projected] = {}
        self._spectra: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def open(cls, teacher: str, student: str | dict[str, Any], expert: str | None = None,
             strategy: Strategy | None = None, rules: dict[str, Rule] | None = None,
             cache_bytes: int = 0) -> "Projector":
        """cache_bytes > 0 keeps recently read teacher tensors (interactive use); 0 streams (export)."""
        strategy = strategy or Strategy()
        t = open_teacher(teacher, expert or strategy.expert)
        return cls(t, open_student(student, t), strategy, rules, cache_bytes)

    @property
    def device(self) -> torch.device:
        return pick_device(self.strategy.device)

    def _signature(self) -> str:
        keep = self.strategy.model_dump(exclude={"dtype", "device", "seed", "expert"})
        return json.dumps([keep, self.rules], sort_keys=True)

    @property
    def mapping(self) -> Mapping:
        sig = json.dumps([self.strategy.model_dump(), self.rules], sort_keys=True)
        if self._mapping is None or self._mapping[0] != sig:
            self._mapping = (sig, build_mapping(self.teacher, self.student, self.strategy, self.rules))
        return self._mapping[1]

    def plan(self) -> Plan:
        sig = self._signature()
        if self._plan is None or self._plan[0] != sig:
            mapping = self.mapping
            self._plan = (sig, make_plan(mapping, self.stats if needs_stats(mapping) else None))
        return self._plan[1]

    def stream(self, keys: list[str] | None = None, progress: Progress | None = None,
               keep_tensors: bool = True) -> Iterator[Projected]:
        """Projected entries (all, or the named student keys), one at a time, cached per plan.

        With keep_tensors=False the cache keeps only the numbers, so exporting a large student holds each
        projected tensor just once (in the caller's hands)."""
        plan = self.plan()
        sig = self._signature()
        entries = plan.mapping.entries if keys is None else [plan.mapping.entry(k) for k in keys]
        for i, entry in enumerate(entries):
            if progress:
                progress(i, len(entries), entry.student_key)
            cached = self._results.get((sig, entry.student_key))
            if cached is None or cached.tensor is not None and cached.tensor.numel() != math.prod(entry.student_shape):
                cached = project_entry(entry, plan, self.read, self.device)
                dropped = cached.tensor is not None and not keep_tensors
                self._results[(sig, entry.student_key)] = (
                    replace(cached, tensor=cached.tensor.new_empty(0)) if dropped else cached)
            yield cached
        if progress:
            progress(len(entries), len(entries), "done")

    def project(self, keys: list[str] | None = None, progress: Progress | None = None) -> list[Projected]:
        return list(self.stream(keys, progress))

    def student_tensor(self, key: str) -> torch.Tensor | None:
        return self.project([key])[0].tensor

    def spectrum(self, key: str, side: str = "teacher") -> torch.Tensor | None:
        """Singular values of a teacher tensor (canonical key) or a projected student tensor (student key)."""
        sig = key if side == "teacher" else f"{self._signature()}|{key}"
        if (side, sig) not in self._spectra:
            t = self.read(key) if side == "teacher" else self.student_tensor(key)
            if t is None:
                return None
            self._spectra[(side, sig)] = singular_values(t, self.device)
        return self._spectra[(side, sig)]

    def summary(self, results: list[Projected] | None = None) -> dict[str, Any]:
        mapping = self.mapping
        out: dict[str, Any] = {
            "teacher": self.teacher.summary(), "student": self.student.summary(),
            "coverage": mapping.coverage(), "counts": mapping.counts(), "layers": mapping.layers,
            "basis_consistent": self.strategy.basis_consistent,
            "warnings": warnings(mapping, self.strategy),
        }
        if results is not None:
            out["mean_energy"] = mean_energy(results)
            out["energy_by_layer"] = energy_by(results)
            out["energy_by_kind"] = energy_by(results, kind_of)
        return out


def warnings(mapping: Mapping, strategy: Strategy) -> list[str]:
    out = []
    if mapping.coverage()["keys"]["transferred"] == 0:
        out.append("Nothing transfers: no student key maps to a teacher key. Add rules (student key: teacher key).")
    if not strategy.basis_consistent:
        out.append("svd-per-matrix gives every matrix its own basis: composed layers no longer line up "
                   "(basis-inconsistent; kept as a comparator only).")
    return out


def entry_rows(mapping: Mapping, results: list[Projected] | None = None) -> list[dict[str, Any]]:
    energy = {r.entry.student_key: r.energy for r in results or []}
    return [{**e.row(), "energy": energy.get(e.student_key)} for e in mapping.entries]

