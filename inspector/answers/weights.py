"""The weights' side of a session: retained energy per entry (measured automatically for teachers that fit the
tensor cache, on demand otherwise), one entry's details, spectra, and two strategies' energies side by side."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from projection import ProjectionError, Strategy
from projection.arch.anatomy import template_of
from projection.cancel import checkpoint
from projection.core.mapping import Entry
from projection.core.measure import MATRIX_LABELS, energy_by, layer_of, matrix_kind
from projection.core.plan import IndexChoice, index_choices
from projection.core.spectra import as_matrix, cumulative_energy, singular_values
from projection.engine.projector import entry_rows

from ..state import Measured, Progress, SessionState


@dataclass
class Details:
    entry: Entry
    index_choices: list[IndexChoice] | None  # None: needs teacher statistics not computed yet
    teacher_values: torch.Tensor | None
    student_values: torch.Tensor | None
    energy: float | None


@dataclass
class Spectrum:
    title: str  # what is compared: the teacher tensor (and its block), then the student key, one per line
    teacher: torch.Tensor  # singular values, descending
    student: torch.Tensor | None
    curve: torch.Tensor  # teacher's cumulative energy
    rank: int  # the student's kept rank (its matrix' smaller side)
    energy: float | None  # what this entry actually retains (the core's measure)
    stacked: bool  # the entry stacks several teacher tensors (its energy covers them all)


class WeightAnswers(SessionState):
    """Retained energy, one entry's details, spectra and two strategies' energies, from the core."""

    def measure(self, force: bool = False, progress: Progress | None = None,
                strategy: Strategy | None = None) -> Measured | None:
        """Retained energy of every entry under `strategy` (the session's if None), from the core.

        Runs by itself for small teachers; for large ones only when forced (the user asked). The numbers are
        kept per strategy + rules, so going back to an earlier choice (a slider moved back) costs nothing."""
        strategy = strategy or self.strategy
        sig = self.signature(strategy)
        found = self.measures.get(sig)
        if found is not None:
            return found
        if not (force or self.auto_energy):
            return None
        with nullcontext() if self.auto_energy else self._heavy():
            results = []
            for result in self.projector.stream(strategy, progress=progress, tensors="numbers"):
                checkpoint()  # a comparison or a large teacher's energies stop when their request is cancelled
                results.append(result)
        return self.measures.put(sig, Measured(sig, results, self.projector.summary(results, strategy)))

    def summary(self) -> dict[str, Any]:
        """The core's summary; energy fields only when they belong to the current strategy."""
        if self.energy_current:
            return self.measured.summary
        return self.projector.summary(strategy=self.strategy)

    def rows(self) -> list[dict[str, Any]]:
        return entry_rows(self.mapping, self.measured.results if self.energy_current else None)

    def energy_grid(self) -> tuple[list[str], list[str], dict[tuple[str, str], float]] | None:
        """Retained energy per (student block, matrix kind), block matrices only; None until measured."""
        if not self.energy_current:
            return None
        results = [r for r in self.measured.results  # transferred block matrices: a blank cell is a skipped one
                   if r.entry.student_block is not None and len(r.entry.student_shape) >= 2 and r.tensor is not None]
        grid = energy_by(results, lambda e: (layer_of(e), matrix_kind(e)))
        rows = [f"block {i}" for i in range(len(self.mapping.layers))]
        kinds = list(dict.fromkeys(matrix_kind(r.entry) for r in results))
        return rows, kinds, grid

    def unused_teacher_keys(self) -> list[tuple[str, tuple[int, ...]]]:
        teacher = self.projector.teacher
        shapes = teacher.checkpoint.tensors if teacher.checkpoint else {}
        return [(k, tuple(shapes[k].shape) if k in shapes else ()) for k in self.mapping.unused_teacher_keys()]

    def details(self, key: str) -> Details:
        entry = self.mapping.entry(key)
        energy = None
        if self.energy_current:
            energy = next((r.energy for r in self.measured.results if r.entry.student_key == key), None)
        if entry.status == "skipped":
            return Details(entry, [], None, None, None)
        teacher = torch.cat([self.projector.read(p.teacher_key).float().flatten() for p in entry.parts])
        if not self.plan_ready:
            return Details(entry, None, teacher, None, energy)
        student = self.projector.student_tensor(key, self.strategy)
        return Details(entry, self.index_choices(entry), teacher, student.float().flatten(), energy)

    def index_choices(self, entry: Entry) -> list[IndexChoice]:
        """The kept teacher indices of every space the entry's axes live in (from the core's plan)."""
        return index_choices(self.projector.plan(self.strategy), entry)

    def matrices(self, layer: str) -> list[tuple[str, str]]:
        """(label, value) for the spectra picker: each 2D+ teacher tensor feeding the layer's entries."""
        block = None if layer == "top" else int(layer)
        out = []
        for entry in self.mapping.entries:
            if entry.status == "skipped" or entry.student_block != block:
                continue
            for i, part in enumerate(entry.parts):
                if len(part.teacher_shape) >= 2:
                    name = template_of(part.teacher_key)[0].removeprefix("blocks.{i}.")
                    label = MATRIX_LABELS.get(name, name)
                    if template_of(entry.student_key)[0].removeprefix("blocks.{i}.") != name:
                        label += f"  ->  {entry.student_key}"
                    out.append((label, f"{entry.student_key}#{i}", name))
        order = list(MATRIX_LABELS)
        out.sort(key=lambda c: order.index(c[2]) if c[2] in order else len(order))
        return [(label, value) for label, value, _ in out]

    def spectrum(self, choice: str) -> Spectrum:
        with self._heavy():
            return self._spectrum(choice)

    def _spectrum(self, choice: str) -> Spectrum:
        key, _, index = choice.rpartition("#")
        entry = self.mapping.entry(key)
        if entry.status == "skipped":
            raise ProjectionError(f"{key} is skipped: it has no teacher source")
        if not index.isdigit() or int(index) >= len(entry.parts):
            raise ProjectionError(f"'{choice}': expected 'student key#part' with part 0..{len(entry.parts) - 1}")
        part = entry.parts[int(index)]
        p = self.projector
        teacher = p.spectrum(part.teacher_key, "teacher", self.strategy)
        if not self.plan_ready:  # the student side needs the plan, i.e. teacher statistics not computed yet
            student = None
        elif len(entry.parts) == 1:
            student = p.spectrum(key, "student", self.strategy)
        else:  # a stacked entry: the rows this part became
            cache_key = (self.signature(), key, int(index))
            student = self._stacked_spectra.get(cache_key)
            if student is None:
                rows = part.student_shape[0]
                piece = p.student_tensor(key, self.strategy)[int(index) * rows:(int(index) + 1) * rows]
                student = self._stacked_spectra.put(cache_key, singular_values(piece, self.device))
        rank = min(as_matrix(torch.empty(part.student_shape, device="meta")).shape)
        if self.energy_current:
            energy = next((r.energy for r in self.measured.results if r.entry.student_key == key), None)
        else:
            energy = p.project(self.strategy, [key])[0].energy if self.plan_ready else None
        where = f"teacher block {part.block}" if part.block is not None else "top level"
        title = f"teacher {part.teacher_key} ({where})\nstudent {key}"
        return Spectrum(title, teacher, student, cumulative_energy(teacher), rank, energy, len(entry.parts) > 1)

    def compare(self, a: Strategy, b: Strategy, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
        """Coverage and retained energy under two strategies (same sources and rules); the session's own
        strategy stays, and the core's caches make coming back to it free."""
        out = {}
        with self._heavy():
            for name, strategy in (("A", a), ("B", b)):
                out[name] = self.measure(force=True, progress=progress, strategy=self._usable(strategy)).summary
        return out
