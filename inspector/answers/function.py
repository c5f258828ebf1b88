"""What the student computes, as a session answers it: the Function view's report and probe, and the velocity
errors the summary card, the A/B comparison and the Gallery show, all on one shared set per teacher."""
from __future__ import annotations

import math
from typing import Any

import torch

from projection import ProjectionError, Strategy, projected_student
from projection.arch.layout import LAYOUTS
from projection.demo.gallery import demo_space, preview_problem
from projection.demo.teacher import demo_calibration
from projection.engine.build import random_student
from projection.engine.report import function_report, reference_key, shared_reference
from projection.function.calibration import Calibration
from projection.function.fidelity import Fidelity, Reference
from projection.probe import ProbeConfig, ProbeResult, candidates, probe

from ..state import AUTO_ENERGY_BYTES, Probed, Progress, SessionState, Step0
from ..units import human_bytes

MAX_FUNCTION_STUDENT_BYTES = 8 << 30  # the Function view holds three students of this size in memory
QUICK_LATENTS = 64  # held-out latents behind the card's, the A/B's and the Gallery's velocity errors on the demo
REFERENCE_DRAWS = 2  # noise draws per latent there: the Function view's, so its default set gives the same numbers
PROBE_WEIGHTS_BYTES = 512 << 20  # a probe's starts and trained students kept for the Gallery (float32), at most
RANDOM = "random"


class FunctionAnswers(SessionState):
    """What the student computes: the Function view's report and probe, and the shared velocity errors."""

    @property
    def previews(self) -> bool:
        """The gallery shows RGB previews on the Function tab's calibration set (teachers outside the demo's
        latent space), not scored digits."""
        return not (demo_space(self.projector.teacher.config) and demo_space(self.student_config))

    def function_unavailable(self) -> str | None:
        """Why samples and velocity errors (the Gallery, the A/B comparison's first rows) cannot be measured here,
        or None when they can."""
        if self.teacher_bytes > AUTO_ENERGY_BYTES:
            return f"the teacher is {self.teacher_bytes >> 20} MiB: the gallery runs teachers up to 1 GiB in memory"
        layout = self.student_config.layout
        if layout not in LAYOUTS:
            return f"the student's layout '{layout}' has no runnable module here"
        if not self.previews:
            return None
        if self.projector.calibration is None:
            return ("this teacher's samples and velocity errors are measured on a calibration set: choose one in the "
                    "Function tab and press Measure")
        return preview_problem(self.projector.teacher.config, self.projector.calibration)

    def function_problem(self) -> str | None:
        """Why the Function view cannot measure this pair, or None when it can."""
        student = self.student_config
        if student.layout not in LAYOUTS:
            return (f"the student's layout '{student.layout}' has no runnable module here: measure an exported "
                    "student with the CLI (projection fidelity --student FOLDER)")
        size = 4 * sum(math.prod(shape) for shape in self.projector.student.shapes.values())
        if size > MAX_FUNCTION_STUDENT_BYTES:
            return (f"the student is {human_bytes(size)} in float32; the app runs students up to "
                    f"{human_bytes(MAX_FUNCTION_STUDENT_BYTES)} (three of them: the student and two references)")
        return None

    def measure_function(self, calibration: Calibration, progress: Progress | None = None) -> dict[str, Any]:
        """The core's function report on `calibration`, which also becomes the set activation choices rank on.
        The last report is kept (numbers only) for the Layers tab's influence bars."""
        why = self.function_problem()
        if why:
            raise ProjectionError(why)
        with self._heavy():
            self.function = function_report(self.projector, calibration, progress=progress, strategy=self.strategy,
                                            draws=REFERENCE_DRAWS, references=self.gallery)
        self._function_on, self._function_for = self.projector.activations.key, self.projection_key()
        return self.function

    def probe(self, calibration: Calibration, strategies: dict[str, Strategy], origins: dict[str, str],
              config: ProbeConfig, progress: Progress | None = None) -> ProbeResult:
        """The core's probe (`projection.probe.probe`) on `calibration`: random init, the default and each named
        strategy distilled `config.steps` steps with this session's projector, the teacher's targets through the
        user's cache. Kept (`probed`, the last run only) with every candidate's start and trained weights while
        they fit PROBE_WEIGHTS_BYTES, for the Gallery. The set activation choices rank on stays the session's:
        the probe ranks its candidates on the set's training part, and that is undone after it."""
        why = self.function_problem()
        if why:
            raise ProjectionError(why)
        found = candidates(strategies, origins)  # refuses a bad list before the teacher runs
        p = self.projector
        student = p.student_config()  # what `probe` builds every candidate with
        size = 4 * sum(math.prod(shape) for shape in p.student.shapes.values())
        need = 2 * size * len(found)
        not_kept = None if need <= PROBE_WEIGHTS_BYTES else (
            f"the probe's {len(found)} starts and trained students are {human_bytes(need)} in float32; the app keeps "
            f"up to {human_bytes(PROBE_WEIGHTS_BYTES)} of them for the Gallery")
        weights: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.probed = None  # the last run's weights go before this run's are kept: one probe's in memory at most

        def keep(name: str, start: dict[str, torch.Tensor], trained: torch.nn.Module) -> None:
            weights[name] = (start, {k: v.detach().to("cpu", copy=True) for k, v in trained.state_dict().items()})

        with self._heavy():  # the probe puts the session's calibration back after ranking on the set's training part
            result = probe(p, calibration, found, config, device=self.device, progress=progress,
                           keep=None if not_kept else keep)
        self.probed = Probed(result, student, weights, not_kept)
        return result

    def block_influence(self) -> tuple[list[float], list[float] | None, str] | None:
        """(influence per teacher block, removal effect per block or None, what they were measured on) once the
        teacher has been run on a calibration set."""
        acts = self.projector.activations
        if acts is None:
            return None
        removal = None
        if self.function is not None and self._function_on == acts.key:
            removal = [b["removal_error"] for b in self.function["teacher_blocks"]]
        return acts.influence, removal, acts.about

    def reference_set(self) -> tuple[Calibration, str]:
        """The set the card's, the A/B's and the Gallery's velocity errors are measured on, and its name: the
        Function tab's set for previews, else the first QUICK_LATENTS of the demo's held-out digits (the Function
        view's default, so every screen gives the same numbers)."""
        if self.previews:
            calibration = self.projector.calibration
            return calibration, f"{calibration.label} × {REFERENCE_DRAWS} noise draws"
        held_out = demo_calibration()
        calibration = held_out.subset(QUICK_LATENTS)
        return calibration, (f"demo held-out digits: {len(calibration)} of {len(held_out)} latents × "
                             f"{REFERENCE_DRAWS} noise draws")

    def reference(self) -> Reference:
        """The teacher's outputs on `reference_set`, shared by every view and session that measures on it (one
        streamed pass over the teacher's weights, the first time)."""
        with self._heavy():
            return shared_reference(self.projector, self.reference_set()[0], REFERENCE_DRAWS, 0, self.device,
                                    self.gallery)

    def student_function(self, which: Strategy | str) -> tuple[Fidelity, list[dict[str, float]] | None]:
        """What the student of `which` (a strategy, or RANDOM: a random student of this shape seeded by the
        session's seed) computes on `reference_set`: its fidelity and its per-block rows (None: not a WanLite, or
        the teacher's block outputs too large to keep); cached."""
        calibration, _ = self.reference_set()
        student = (str(self.student_source), self.student_config)
        what = (RANDOM, self.strategy.seed, student) if which == RANDOM else (self.projection_key(which), student)
        key = (reference_key(self.projector, calibration, REFERENCE_DRAWS), what)
        found = self._fidelity.get(key)
        if found is not None:
            return found
        reference = self.reference()
        with self._heavy():
            if which == RANDOM:
                model, plan = random_student(self.student_config, self.strategy.seed), self.projector.plan(
                    self.strategy)
            else:
                strategy = self._usable(which)
                model, plan = projected_student(self.projector, strategy=strategy), self.projector.plan(strategy)
            measured = reference.measure(model, plan.mapping.layers, plan.indices("resid", None))
        return self._fidelity.put(key, measured)

    def step0_error(self) -> Step0 | None:
        """The summary card's velocity errors at step 0. On the demo's latent space: on `reference_set` (the
        teacher's outputs there shared with the Function view, the A/B comparison and the Gallery), cached per
        projection. Elsewhere: the Function tab's last report, while it is still about the projection in use. None
        where neither is known."""
        if self.previews:
            if self.function is None or self._function_for != self.projection_key():
                return None
            students, calibration = self.function["fidelity"]["students"], self.projector.calibration
            return Step0(students["student"]["relative_error"], students["random init"]["relative_error"],
                         f"{calibration.label}, as measured in the Function tab", calibration.synthetic)
        if self.function_unavailable():
            return None
        calibration, on = self.reference_set()
        key = (reference_key(self.projector, calibration, REFERENCE_DRAWS), self.projection_key())
        found = self._step0.get(key)
        if found is None:
            error = self.student_function(self.strategy)[0].relative_error
            random = self.student_function(RANDOM)[0].relative_error
            found = self._step0.put(key, Step0(error, random, on, calibration.synthetic))
        return found

    def compare_function(self, a: Strategy, b: Strategy) -> dict[str, tuple[Fidelity, list[dict[str, float]] | None]]:
        """What the students of A and B compute on `reference_set` next to a random student of this shape (the
        reference): velocity error per noise band and per student block, from one teacher pass shared with every
        other view on that set (none if one ran already)."""
        return {"A": self.student_function(a), "B": self.student_function(b),
                "random init": self.student_function(RANDOM)}
