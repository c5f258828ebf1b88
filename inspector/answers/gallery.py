"""The Gallery's rows, as a session answers them: samples of the teacher, random init and projected students
(digits scored on the demo, RGB previews elsewhere) and of the last probe's starts, each with its velocity error on
the set every view shares; shared between sessions drawing the same rows."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from projection import ProjectionError, Strategy, projected_student
from projection.arch.layout import build_student
from projection.demo import teacher as demo_teacher
from projection.demo.gallery import GalleryRow, draw_row, preview_row
from projection.engine.build import random_student, wanlite_from_teacher

from .function import RANDOM, FunctionAnswers

GALLERY_SAMPLER = demo_teacher.Sampler(per_class=10)  # 100 samples per row, 20 Euler steps, no guidance
TEACHER = "teacher"


class GalleryAnswers(FunctionAnswers):
    """The Gallery's rows, drawn once per teacher, student and what drew them (shared between sessions)."""

    def teacher_module(self) -> torch.nn.Module:
        if self._teacher_module is None:
            self._teacher_module = wanlite_from_teacher(self.teacher_source)
        return self._teacher_module

    def _row_key(self, which: Strategy | str) -> tuple[Any, ...]:
        """A gallery row's key: the teacher, the student and what drew it, and the set for previews."""
        drawn_on = self.projector.activations.key if self.previews else None  # previews: the Function tab's set
        student = (str(self.student_source), self.student_config)
        what = ((TEACHER,) if which == TEACHER else (RANDOM, self.strategy.seed, student) if which == RANDOM else
                (self.projection_key(which), student))
        return self.projector.fingerprint, what, drawn_on

    def drawn_row(self, which: Strategy | str) -> GalleryRow | None:
        """The gallery row of `which` if some session drew it already (nothing is drawn here)."""
        if self.function_unavailable() or (self.previews and self.projector.activations is None):
            return None
        return self.gallery.peek(self._row_key(which))

    def gallery_row(self, which: Strategy | str) -> GalleryRow:
        """The samples and scores of the teacher (TEACHER), a random student of this shape (RANDOM, seeded by the
        session's strategy seed), or the student projected with a strategy (same sources and rules); cached."""
        why = self.function_unavailable()
        if why:
            raise ProjectionError(why)
        key = self._row_key(which)
        found = self.gallery.get(key)
        if found is not None:
            return found
        teacher = self.teacher_module()
        draw = self._drawer()
        with self._heavy():
            if which == TEACHER:
                row = draw("teacher", teacher, None)
            else:  # the velocity error: the A/B's and the card's, on the set every view shares
                error = self.student_function(which)[0].relative_error
                if which == RANDOM:
                    row = draw("random init", random_student(self.student_config, self.strategy.seed), error)
                else:
                    model = projected_student(self.projector, strategy=self._usable(which))
                    row = draw(which.width if not which.basis_consistent else "projected", model, error)
        return self.gallery.put(key, row)

    def _drawer(self) -> Callable[[str, torch.nn.Module, float | None], GalleryRow]:
        """How this pair's gallery rows are drawn: the demo's digits, scored by its classifier; other teachers' RGB
        previews on the Function tab's set."""
        if self.previews:
            config, calibration = self.projector.teacher.config, self.projector.calibration

            def preview(name: str, model: torch.nn.Module, error: float | None) -> GalleryRow:
                row = preview_row(name, model, config, calibration, GALLERY_SAMPLER.steps)
                return replace(row, velocity_error=error)
            return preview
        classifier = demo_teacher.load_demo_classifier()

        def digits(name: str, model: torch.nn.Module, error: float | None) -> GalleryRow:
            return replace(draw_row(name, model, classifier, GALLERY_SAMPLER), velocity_error=error)
        return digits

    def probe_row(self, name: str, trained: bool) -> GalleryRow:
        """The gallery row of the last probe's candidate `name`: its start (`trained` False: the very weights the
        probe started from) or the student the probe trained from it at its best rate; its velocity error on
        `reference_set`, as every other row's; cached."""
        probed = self.probed
        if probed is None:
            raise ProjectionError("no probe has run in this session: run Probe recoverability in the Function tab")
        if probed.not_kept:
            raise ProjectionError(f"not drawn after the probe: {probed.not_kept}")
        if name not in probed.weights:
            raise ProjectionError(f"the last probe has no candidate '{name}'")
        why = self.function_unavailable()
        if why:
            raise ProjectionError(why)
        drawn_on = self.projector.activations.key if self.previews else None
        key = self.projector.fingerprint, ("probe", probed.token, name, trained), drawn_on
        found = self.gallery.get(key)
        if found is not None:
            return found
        model = build_student(probed.student, "meta")
        model.load_state_dict({k: v.clone() for k, v in probed.weights[name][1 if trained else 0].items()}, assign=True,
                              strict=True)
        model.eval()
        draw = self._drawer()
        reference = self.reference()
        with self._heavy():
            row = draw(name, model, reference.score(model).relative_error)
        return self.gallery.put(key, row)
