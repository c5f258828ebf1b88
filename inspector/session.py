"""One browser session's projection: a core `Projector` plus what the screen asks of it.

Every number here comes from the core (mapping, plan, projected entries, summaries, spectra); this module only
decides *when* to ask (energies automatically for teachers that fit the tensor cache, on demand otherwise)
and keeps each session's objects apart: nothing in it is global. Teacher tensors and SVD bases come from the
app's shared `Caches`; what a session keeps for itself is bounded: projected tensors (`KEPT_BYTES`), the teacher
statistics of the blocks it looked at, singular values (`SPECTRA_KEPT`) and energies (`MEASURES_KEPT`, numbers only).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from projection import ProjectionError, Projector, Strategy, export_student, parse_rules, projected_student
from projection.arch.anatomy import SPACES, template_of
from projection.cancel import CancelToken, checkpoint
from projection.core.mapping import Entry, Mapping, Rule, build_mapping, preset_rules, rules_to_yaml
from projection.core.measure import energy_by, layer_of
from projection.core.plan import needs_stats
from projection.core.project import Projected, pick_device
from projection.core.spectra import as_matrix, cumulative_energy, singular_values
from projection.core.suggest import suggest_rules, with_suggestions
from projection.demo import teacher as demo_teacher
from projection.demo.gallery import GalleryRow, demo_space, draw_row, preview_problem, preview_row
from projection.demo.teacher import demo_calibration
from projection.engine.build import random_student, wanlite_from_teacher
from projection.engine.projector import Caches, entry_rows
from projection.engine.report import function_report
from projection.function.calibration import Calibration
from projection.function.fidelity import Reference, teacher_reference
from projection.io.checkpoint import PathCheck
from projection.runtime import heavy_work

from .units import human_bytes

AUTO_ENERGY_BYTES = 1 << 30  # a teacher that fits the shared tensor cache is measured on every refresh
SMALL_WEIGHTS_BYTES = 256 << 20  # exported weights offered for download up to this size
MEASURES_KEPT = 64  # strategies whose energies a session remembers (numbers only: a few kB each)
GALLERY_KEPT = 16  # gallery rows (and step-0 errors) a session remembers (a few kB each)
MAX_FUNCTION_STUDENT_BYTES = 8 << 30  # the Function view holds three students of this size in memory
QUICK_LATENTS = 64  # held-out latents behind the summary card's step-0 velocity error (2 noise draws each)
GALLERY_SAMPLER = demo_teacher.Sampler(per_class=10)  # 100 samples per row, 20 Euler steps, no guidance
TEACHER = "teacher"
RANDOM = "random"
Progress = Callable[[int, int, str], None]


@dataclass
class Measured:
    """Retained energy of every entry under one strategy + rules (numbers only, no tensors)."""

    signature: str
    results: list[Projected]
    summary: dict[str, Any]


@dataclass
class IndexChoice:
    label: str  # e.g. "residual stream (teacher block 2)"
    kept: list[int]
    total: int


@dataclass
class Details:
    entry: Entry
    index_choices: list[IndexChoice] | None  # None: needs teacher statistics not computed yet
    teacher_values: torch.Tensor | None
    student_values: torch.Tensor | None
    energy: float | None


@dataclass
class Suggested:
    text: str  # the editor's text with the suggestions appended
    rules: dict[str, Rule]  # the suggestions alone
    covered: int  # student keys they would bring to transfer
    unmapped: int  # student keys the editor's rules leave without a source


@dataclass
class Spectrum:
    title: str  # what is compared: the teacher tensor (and its block), then the student key, one per line
    teacher: torch.Tensor  # singular values, descending
    student: torch.Tensor | None
    curve: torch.Tensor  # teacher's cumulative energy
    rank: int  # the student's kept rank (its matrix' smaller side)
    energy: float | None  # what this entry actually retains (the core's measure)
    stacked: bool  # the entry stacks several teacher tensors (its energy covers them all)


@dataclass(frozen=True)
class Step0:
    """The summary card's figures: the student's and a random student's velocity error against the teacher,
    before any training."""
    error: float
    random: float
    on: str  # what they were measured on
    synthetic: bool = False  # measured on synthetic inputs: a guess


@dataclass
class Session:
    projector: Projector
    teacher_source: str  # as resolved (absolute path or hub id)
    student_source: str | dict[str, Any]
    folder: Path  # the session's own files (downloads, saved strategies), inside the app's scratch folder
    num_heads: int | None = None  # set by the user for a student checkpoint (a state dict does not record heads)
    lock: threading.Lock = field(default_factory=threading.Lock)
    measures: OrderedDict[str, Measured] = field(default_factory=OrderedDict)  # by signature, newest last
    shown_layers: list[int] | None = None  # what the sliders show, to update them only on change
    slider_error: int | None = None  # the slider showing why its value was rejected
    out_dir: str = ""  # the Export tab's folder, for the CLI command
    last_used: float = field(default_factory=time.monotonic)
    closed: str | None = None  # why the session was closed, once it is
    _stacked_spectra: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)
    gallery: OrderedDict[str, GalleryRow] = field(default_factory=OrderedDict)  # by what drew them, newest last
    _teacher_module: torch.nn.Module | None = None
    _step0: dict[str, Step0] = field(default_factory=dict)
    _step0_reference: Reference | None = None  # the teacher's velocities on the card's set: run once per session
    _step0_random: dict[int, float] = field(default_factory=dict)  # a random student's error, by seed
    work: weakref.WeakSet[CancelToken] = field(default_factory=weakref.WeakSet)  # its requests' stop tokens
    function: dict[str, Any] | None = None  # the last function report (the Function tab's Measure)
    _function_on: str | None = None  # the activations key it was measured with
    _function_for: str | None = None  # the projection it measured (`projection_key`)

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, teacher: str, student: str | dict[str, Any], expert: str | None, strategy: Strategy,
             rules: dict[str, Any] | None = None, *, folder: Path, caches: Caches | None = None,
             num_heads: int | None = None, check: PathCheck | None = None) -> Session:
        """folder: where the session keeps its files (removed on close); caches: the app's shared caches; `check`
        sees every file the sources lead to before the core reads it (the app's --root)."""
        strategy = strategy.model_copy(update={"expert": expert})
        caches = caches or Caches()
        try:
            p = _mapped(Projector.open(teacher, student, expert=expert, strategy=strategy, rules=rules, caches=caches,
                                       num_heads=num_heads, check=check))
        except ProjectionError as exc:
            if not isinstance(strategy.layers, list) or "layers:" not in str(exc):
                raise
            # A layer list chosen for another student: fall back to the uniform stride.
            p = _mapped(Projector.open(teacher, student, expert=expert, rules=rules, caches=caches,
                                       strategy=strategy.model_copy(update={"layers": "uniform"}),
                                       num_heads=num_heads, check=check))
        return cls(p, teacher, student, folder, num_heads)

    def attach(self, token: CancelToken | None) -> None:
        """A request now working on this session answers to `token` (`stop_work` cancels it)."""
        if token is not None:
            self.work.add(token)

    def stop_work(self, why: str) -> list[CancelToken]:
        """Stop the requests working on this session (without waiting; `CancelToken.join` waits): each ends within
        one step of its loop, releasing the session's lock. Safe from any thread, with or without the lock."""
        tokens = list(self.work)
        for token in tokens:
            token.cancel(why)
        return tokens

    def close(self, why: str = "it was closed") -> None:
        """Free what the session holds (its files, projected tensors, statistics, open teacher files); the
        caches it shares stay. Call with the lock held, or when no request can use the session."""
        if self.closed:
            return
        self.closed = why
        shutil.rmtree(self.folder, ignore_errors=True)
        self.measures.clear()
        self._stacked_spectra.clear()
        self.gallery.clear()
        self._teacher_module = None
        self.projector.release()
        if self.projector.teacher.checkpoint is not None:
            self.projector.teacher.checkpoint.close()

    # ------------------------------------------------------------ properties

    @property
    def mapping(self) -> Mapping:
        return self.projector.mapping

    @property
    def strategy(self) -> Strategy:
        return self.projector.strategy

    @property
    def teacher_bytes(self) -> int:
        ckpt = self.projector.teacher.checkpoint
        return ckpt.nbytes if ckpt else 0

    @property
    def bytes_read(self) -> int:
        ckpt = self.projector.teacher.checkpoint
        return ckpt.bytes_read if ckpt else 0

    @property
    def auto_energy(self) -> bool:
        """Small teachers are measured on every refresh; large ones (e.g. 57 GB) only when asked."""
        return self.teacher_bytes <= AUTO_ENERGY_BYTES

    @property
    def teacher_blocks(self) -> int:
        return int(self.projector.teacher.config.num_layers or 0)

    def signature(self) -> str:
        return self.projector.signature()

    @property
    def measured(self) -> Measured | None:
        """The energies of the current strategy + rules, if measured."""
        return self.measures.get(self.signature())

    @property
    def energy_current(self) -> bool:
        return self.signature() in self.measures

    @property
    def plan_ready(self) -> bool:
        """Index choices without a full teacher pass: small teachers, rank-free methods, or already measured."""
        return self.auto_energy or self.energy_current or not needs_stats(self.mapping)

    # ------------------------------------------------------------ changes

    def set_strategy(self, strategy: Strategy) -> None:
        """Apply a strategy; a choice the core rejects (e.g. a layer out of range) leaves the old one in place."""
        pick_device(strategy.device)  # the core refuses cuda where there is none
        if strategy.needs_calibration and self.projector.calibration is None:
            self.calibrate()
        self._remap(strategy=strategy)

    def calibrate(self, calibration: Calibration | None = None, progress: Progress | None = None) -> None:
        """Activation choices rank on a calibration set: the one given (the Function tab's), else the demo's
        held-out digits for teachers in its latent space (measured once, then cached on disk)."""
        if calibration is None and not demo_space(self.projector.teacher.config):
            raise ProjectionError("activation, influence, wanda, compensation and least-squares choices run the "
                                  "teacher on a calibration set: choose one in the Function tab (a file under the "
                                  "app's root, or synthetic) and press Measure")
        with heavy_work():
            self.projector.calibrate(calibration or demo_calibration(), progress=progress)

    def update_strategy(self, **fields: Any) -> None:
        self.set_strategy(Strategy.checked({**self.strategy.model_dump(), **fields}))  # validated, as files are

    def rules_text(self) -> str:
        return rules_to_yaml(self.mapping.rules)

    def user_rules_text(self) -> str:
        return rules_to_yaml(self.projector.rules) if self.projector.rules else ""

    def _user_rules(self, parsed: dict[str, Rule]) -> dict[str, Rule]:
        """The editor shows preset + user rules; the user's are what differs from the preset."""
        preset = preset_rules(self.projector.student.layout)
        return {k: v for k, v in parsed.items() if preset.get(k) != v}

    def set_rules(self, text: str) -> None:
        self._remap(rules=self._user_rules(parse_rules(text, "rules")))

    def suggest_rules(self, text: str) -> Suggested:
        """Suggestions for the keys the editor's rules (applied or not) leave unmapped; nothing is applied."""
        parsed = parse_rules(text, "rules")
        p = self.projector
        mapping = build_mapping(p.teacher, p.student, p.strategy, self._user_rules(parsed))
        suggested = suggest_rules(mapping)
        before = mapping.coverage()["keys"]
        after = build_mapping(p.teacher, p.student, p.strategy, {**mapping.rules, **suggested}).coverage()["keys"]
        return Suggested(with_suggestions(text, parsed, suggested), suggested,
                         after["transferred"] - before["transferred"], before["total"] - before["transferred"])

    def _remap(self, **changes: Any) -> None:
        """Set the projector's strategy and/or rules and map at once; if the core rejects the mapping, the old
        values stay in place."""
        old = {name: getattr(self.projector, name) for name in changes}
        for name, value in changes.items():
            setattr(self.projector, name, value)
        try:
            _mapped(self.projector)
        except ProjectionError:
            for name, value in old.items():
                setattr(self.projector, name, value)
            raise

    # ------------------------------------------------------------ numbers

    def measure(self, force: bool = False, progress: Progress | None = None) -> Measured | None:
        """Retained energy of every entry, from the core.

        Runs by itself for small teachers; for large ones only when forced (the user asked). The numbers are
        kept per strategy + rules, so going back to an earlier choice (a slider moved back) costs nothing."""
        sig = self.signature()
        if sig in self.measures:
            self.measures.move_to_end(sig)
            return self.measures[sig]
        if not (force or self.auto_energy):
            return None
        with nullcontext() if self.auto_energy else heavy_work():
            results = []
            for result in self.projector.stream(progress=progress, tensors="numbers"):
                checkpoint()  # a comparison or a large teacher's energies stop when their request is cancelled
                results.append(result)
        self.measures[sig] = Measured(sig, results, self.projector.summary(results))
        while len(self.measures) > MEASURES_KEPT:
            self.measures.popitem(last=False)
        return self.measures[sig]

    def summary(self) -> dict[str, Any]:
        """The core's summary; energy fields only when they belong to the current strategy."""
        if self.energy_current:
            return self.measured.summary
        return self.projector.summary()

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

    # ------------------------------------------------------------ one entry

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
        student = self.projector.student_tensor(key)
        return Details(entry, self.index_choices(entry), teacher, student.float().flatten(), energy)

    def index_choices(self, entry: Entry) -> list[IndexChoice]:
        """The kept teacher indices of every space the entry's axes live in (from the core's plan)."""
        plan = self.projector.plan()
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
                    out.append(IndexChoice(label, idx.tolist(), self.mapping.teacher_sizes[space]))
        return out

    # ------------------------------------------------------------ spectra

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
        with heavy_work():
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
        teacher = p.spectrum(part.teacher_key, "teacher")
        if not self.plan_ready:  # the student side needs the plan, i.e. teacher statistics not computed yet
            student = None
        elif len(entry.parts) == 1:
            student = p.spectrum(key, "student")
        else:  # a stacked entry: the rows this part became
            cache_key = (self.signature(), key, int(index))
            if cache_key not in self._stacked_spectra:
                rows = part.student_shape[0]
                piece = p.student_tensor(key)[int(index) * rows:(int(index) + 1) * rows]
                self._stacked_spectra[cache_key] = singular_values(piece, p.device)
            student = self._stacked_spectra[cache_key]
        rank = min(as_matrix(torch.empty(part.student_shape, device="meta")).shape)
        if self.energy_current:
            energy = next((r.energy for r in self.measured.results if r.entry.student_key == key), None)
        else:
            energy = p.project([key])[0].energy if self.plan_ready else None
        where = f"teacher block {part.block}" if part.block is not None else "top level"
        title = f"teacher {part.teacher_key} ({where})\nstudent {key}"
        return Spectrum(title, teacher, student, cumulative_energy(teacher), rank, energy, len(entry.parts) > 1)

    # ------------------------------------------------------------ comparison and export

    def compare(self, a: Strategy, b: Strategy, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
        """Coverage and retained energy under two strategies (same sources and rules); the session's own
        strategy is restored afterwards, and the core's caches make switching back free."""
        own = self.strategy
        out = {}
        try:
            with heavy_work():
                for name, strategy in (("A", a), ("B", b)):
                    self.set_strategy(strategy)
                    out[name] = self.measure(force=True, progress=progress).summary
        finally:
            self.projector.strategy = own
        return out

    # ------------------------------------------------------------ function: what the student computes

    @property
    def previews(self) -> bool:
        """The gallery shows RGB previews on the Function tab's calibration set (teachers outside the demo's
        latent space), not scored digits."""
        return not (demo_space(self.projector.teacher.config) and demo_space(self.projector.student_config))

    def function_unavailable(self) -> str | None:
        """Why samples and velocity errors (the Gallery, the A/B comparison's first rows) cannot be measured here,
        or None when they can."""
        if self.teacher_bytes > AUTO_ENERGY_BYTES:
            return f"the teacher is {self.teacher_bytes >> 20} MiB: the gallery runs teachers up to 1 GiB in memory"
        layout = self.projector.student_config.layout
        if layout not in ("wanlite", "seed"):
            return f"the student's layout '{layout}' has no runnable module here"
        if not self.previews:
            return None
        if self.projector.calibration is None:
            return ("this teacher's samples and velocity errors are measured on a calibration set: choose one in the "
                    "Function tab and press Measure")
        return preview_problem(self.projector.teacher.config, self.projector.calibration)

    def function_problem(self) -> str | None:
        """Why the Function view cannot measure this pair, or None when it can."""
        student = self.projector.student_config
        if student.layout not in ("wanlite", "seed"):
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
        with heavy_work():
            self.function = function_report(self.projector, calibration, progress=progress)
        self._function_on, self._function_for = self.projector.activations.key, self.projection_key()
        return self.function

    def projection_key(self, strategy: Strategy | None = None) -> str:
        """What decides the student `strategy` (the session's by default) projects: the strategy less dtype and
        device, the rules, and the calibration set where the strategy ranks or fits on one."""
        strategy = strategy or self.strategy
        acts = self.projector.activations if strategy.needs_calibration else None
        return json.dumps([strategy.model_dump(exclude={"dtype", "device"}), self.projector.rules,
                           acts and acts.key], sort_keys=True)

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

    def step0_error(self) -> Step0 | None:
        """The summary card's velocity errors at step 0. On the demo's latent space: measured here, on the first
        QUICK_LATENTS held-out latents, cached per projection. Elsewhere: the Function tab's last report, while
        it is still about the projection in use. None where neither is known."""
        if self.previews:
            if self.function is None or self._function_for != self.projection_key():
                return None
            students, calibration = self.function["fidelity"]["students"], self.projector.calibration
            return Step0(students["student"]["relative_error"], students["random init"]["relative_error"],
                         f"{calibration.label}, as measured in the Function tab", calibration.synthetic)
        if self.function_unavailable():
            return None
        key = self.projection_key()
        if key not in self._step0:
            if self._step0_reference is None:
                held_out = demo_calibration().subset(QUICK_LATENTS)
                self._step0_reference = teacher_reference(self.teacher_module(), held_out.latents,
                                                          held_out.context, draws=2)
            reference, seed = self._step0_reference, self.strategy.seed
            if seed not in self._step0_random:
                random = random_student(self.projector.student_config, seed)
                self._step0_random[seed] = reference.score(random).relative_error
            self._step0[key] = Step0(reference.score(projected_student(self.projector)).relative_error,
                                     self._step0_random[seed],
                                     f"{QUICK_LATENTS} of the demo's held-out latents at fixed noise (2 draws each)")
            for kept in (self._step0, self._step0_random):
                while len(kept) > GALLERY_KEPT:
                    kept.pop(next(iter(kept)))
        return self._step0[key]

    def teacher_module(self) -> torch.nn.Module:
        if self._teacher_module is None:
            self._teacher_module = wanlite_from_teacher(self.teacher_source)
        return self._teacher_module

    def gallery_row(self, which: Strategy | str) -> GalleryRow:
        """The samples and scores of the teacher (TEACHER), a random student of this shape (RANDOM, seeded by the
        session's strategy seed), or the student projected with a strategy (same sources and rules); cached."""
        why = self.function_unavailable()
        if why:
            raise ProjectionError(why)
        drawn_on = self.projector.activations.key if self.previews else None  # previews: the Function tab's set
        key = (f"{which}:{self.strategy.seed}" if isinstance(which, str) else self.projection_key(which))
        key += f":{drawn_on}"
        if key in self.gallery:
            self.gallery.move_to_end(key)
            return self.gallery[key]
        teacher = self.teacher_module()
        if self.previews:
            config, calibration = self.projector.teacher.config, self.projector.calibration

            def draw(name: str, model: torch.nn.Module, reference: torch.nn.Module | None) -> GalleryRow:
                return preview_row(name, model, config, calibration, GALLERY_SAMPLER.steps, reference)
        else:
            classifier, calibration = demo_teacher.load_demo_classifier(), demo_calibration()

            def draw(name: str, model: torch.nn.Module, reference: torch.nn.Module | None) -> GalleryRow:
                return draw_row(name, model, classifier, GALLERY_SAMPLER, reference,
                                calibration if reference is not None else None)
        with heavy_work():
            if which == TEACHER:
                row = draw("teacher", teacher, None)
            elif which == RANDOM:
                row = draw("random init", random_student(self.projector.student_config, self.strategy.seed), teacher)
            else:
                own = self.strategy
                try:
                    self.set_strategy(which)
                    model = projected_student(self.projector)
                finally:
                    self.projector.strategy = own
                row = draw(which.width if not which.basis_consistent else "projected", model, teacher)
        self.gallery[key] = row
        while len(self.gallery) > GALLERY_KEPT:
            self.gallery.popitem(last=False)
        return row

    def export(self, out: Path, progress: Progress | None = None) -> tuple[dict[str, Any], list[Path]]:
        """The core's export (refuses existing folders); returns the report and copies to offer for download."""
        with heavy_work():
            report = export_student(self.projector, out, force=False, progress=progress)
        names = ["projection_report.json", "config.json", "strategy.yaml"]
        weights = report["provenance"]["weights"]
        if sum((out / w).stat().st_size for w in weights) <= SMALL_WEIGHTS_BYTES:
            index = report["provenance"]["weights_index"]
            names += weights + ([index] if index else [])
        copies = self.folder / out.name  # downloads come from the session's folder, not the root
        copies.mkdir(parents=True, exist_ok=True)
        return report, [Path(shutil.copy2(out / n, copies / n)) for n in names]


def _mapped(p: Projector) -> Projector:
    """Map now: the core rejects bad layer lists and head counts while mapping, and the UI should say so at once."""
    _ = p.mapping
    return p


def matrix_kind(entry: Entry) -> str:
    """A block matrix' kind in the teacher's vocabulary ('self_attn.q.weight'); stacked entries by their own name."""
    if len(entry.parts) == 1:
        return template_of(entry.parts[0].teacher_key)[0].removeprefix("blocks.{i}.")
    return re.sub(r"^[\w.]*?\.\d+\.", "", entry.student_key)


def histogram(a: torch.Tensor, b: torch.Tensor | None, bins: int = 60,
              share: float = 0.998) -> tuple[list[float], list[float], list[float] | None]:
    """Bin centres and densities of two value sets on one range: the central `share` of both (display only;
    trained-like weights have long tails that would squeeze everything else into one bin)."""
    def bounds(t: torch.Tensor) -> tuple[float, float]:
        sample = t.flatten()[::max(1, t.numel() // 1_000_000)].double()  # quantile needs a bounded input
        lo, hi = torch.quantile(sample, torch.tensor([(1 - share) / 2, (1 + share) / 2], dtype=torch.float64))
        return lo.item(), hi.item()

    lo, hi = bounds(a)
    if b is not None and b.numel():
        blo, bhi = bounds(b)
        lo, hi = min(lo, blo), max(hi, bhi)
    if hi <= lo:
        hi = lo + 1e-6
    width = (hi - lo) / bins
    centres = [lo + (i + 0.5) * width for i in range(bins)]

    def density(t: torch.Tensor) -> list[float]:
        counts = torch.histc(t.double(), bins=bins, min=lo, max=hi)
        return (counts / max(t.numel() * width, 1e-30)).tolist()

    return centres, density(a), density(b) if b is not None and b.numel() else None


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
