"""One browser session's projection: a core `Projector` plus what the screen asks of it.

Every number here comes from the core (mapping, plan, projected entries, summaries, spectra); this module only
decides *when* to ask (energies automatically for teachers that fit the tensor cache, on demand otherwise)
and keeps each session's objects apart: nothing in it is global. Teacher tensors and SVD bases come from the
app's shared `Caches`; what a session keeps for itself is bounded (`projection.cache` names every bound): projected
tensors, the teacher statistics of the blocks it looked at, singular values, energies (numbers only) and gallery rows.
"""
from __future__ import annotations

import math
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from projection import ProjectionError, Projector, Strategy, export_student, parse_rules, projected_student
from projection.cache import GALLERY, MEASURES, STACKED_SPECTRA, Lru
from projection.arch.anatomy import template_of
from projection.arch.config import ModelConfig
from projection.arch.layout import LAYOUTS, build_student
from projection.cancel import CancelToken, checkpoint
from projection.core.mapping import Entry, Mapping, Rule, build_mapping, preset_rules, rules_to_yaml
from projection.core.measure import MATRIX_LABELS, energy_by, layer_of, matrix_kind
from projection.core.plan import IndexChoice, index_choices, needs_stats
from projection.core.project import Projected, pick_device
from projection.core.spectra import as_matrix, cumulative_energy, singular_values
from projection.core.suggest import suggest_rules, with_suggestions
from projection.demo import teacher as demo_teacher
from projection.demo.gallery import GalleryRow, demo_space, draw_row, preview_problem, preview_row
from projection.demo.teacher import demo_calibration
from projection.engine.build import random_student, wanlite_from_teacher
from projection.engine.keys import ProjectionKey
from projection.engine.projector import Caches, entry_rows
from projection.engine.report import function_report, reference_key, shared_reference
from projection.function.calibration import Calibration
from projection.function.fidelity import Fidelity, Reference
from projection.io.checkpoint import PathCheck
from projection.probe import ProbeConfig, ProbeResult, candidates, probe
from projection.runtime import heavy_work

from .units import human_bytes

AUTO_ENERGY_BYTES = 1 << 30  # a teacher that fits the shared tensor cache is measured on every refresh
SMALL_WEIGHTS_BYTES = 256 << 20  # exported weights offered for download up to this size
MAX_FUNCTION_STUDENT_BYTES = 8 << 30  # the Function view holds three students of this size in memory
QUICK_LATENTS = 64  # held-out latents behind the card's, the A/B's and the Gallery's velocity errors on the demo
REFERENCE_DRAWS = 2  # noise draws per latent there: the Function view's, so its default set gives the same numbers
GALLERY_SAMPLER = demo_teacher.Sampler(per_class=10)  # 100 samples per row, 20 Euler steps, no guidance
PROBE_WEIGHTS_BYTES = 512 << 20  # a probe's starts and trained students kept for the Gallery (float32), at most
TEACHER = "teacher"
RANDOM = "random"
Progress = Callable[[int, int, str], None]


@dataclass
class Measured:
    """Retained energy of every entry under one strategy + rules (numbers only, no tensors)."""

    signature: ProjectionKey
    results: list[Projected]
    summary: dict[str, Any]


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
class Probed:
    """The last probe recoverability run (Function tab): its result, and each candidate's start and trained
    weights (float32, on the CPU) for the Gallery while they fit PROBE_WEIGHTS_BYTES."""
    result: ProbeResult
    student: ModelConfig  # the config every candidate was built with
    weights: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]  # name: (start, after the probe)
    not_kept: str | None  # why the weights were not kept (too large), else None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # its gallery rows' key: this run's, no other's


@dataclass
class Session:
    projector: Projector
    teacher_source: str  # as resolved (absolute path or hub id)
    student_source: str | dict[str, Any]
    folder: Path  # the session's own files (downloads, saved strategies), inside the app's scratch folder
    num_heads: int | None = None  # set by the user for a student checkpoint (a state dict does not record heads)
    strategy: Strategy | None = None  # the session's strategy, passed to the projector (None: the one it opened with)
    lock: threading.Lock = field(default_factory=threading.Lock)
    measures: Lru[ProjectionKey, Measured] = field(default_factory=lambda: Lru(MEASURES))  # by signature
    shown_layers: list[int] | None = None  # what the sliders show, to update them only on change
    slider_error: int | None = None  # the slider showing why its value was rejected
    out_dir: str = ""  # the Export tab's folder, for the CLI command
    last_used: float = field(default_factory=time.monotonic)
    closed: str | None = None  # why the session was closed, once it is
    _stacked_spectra: Lru[tuple[ProjectionKey, str, int], torch.Tensor] = field(
        default_factory=lambda: Lru(STACKED_SPECTRA))
    # rows by teacher, student and what drew them, and the teacher's outputs on a set by `ReferenceKey` (maybe
    # shared with other sessions): every view measuring on a set reads the teacher for it once
    gallery: Lru[Any, GalleryRow | Reference] = field(default_factory=lambda: Lru(GALLERY))
    _teacher_module: torch.nn.Module | None = None
    _step0: Lru[tuple[Any, ...], Step0] = field(default_factory=lambda: Lru(GALLERY))
    # what a student computes on the reference set, by (set key, projection key or random seed, student)
    _fidelity: Lru[tuple[Any, ...], tuple[Fidelity, list[dict[str, float]] | None]] = field(
        default_factory=lambda: Lru(GALLERY))
    work: weakref.WeakSet[CancelToken] = field(default_factory=weakref.WeakSet)  # its requests' stop tokens
    function: dict[str, Any] | None = None  # the last function report (the Function tab's Measure)
    _function_on: str | None = None  # the activations key it was measured with
    _function_for: ProjectionKey | None = None  # the projection it measured (`projection_key`)
    probed: Probed | None = None  # the last probe recoverability run (one, its weights bounded)

    def __post_init__(self) -> None:
        if self.strategy is None:
            self.strategy = self.projector.strategy

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, teacher: str, student: str | dict[str, Any], expert: str | None, strategy: Strategy,
             rules: dict[str, Any] | None = None, *, folder: Path, caches: Caches | None = None,
             num_heads: int | None = None, check: PathCheck | None = None, gallery: Lru | None = None) -> Session:
        """folder: where the session keeps its files (removed on close); caches: the app's shared caches; `check`
        sees every file the sources lead to before the core reads it (the app's --root); gallery: rows shared with
        other sessions (keyed by teacher, student and what drew them), else the session's own."""
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
        shared = {"gallery": gallery} if gallery is not None else {}
        return cls(p, teacher, student, folder, num_heads, p.strategy, **shared)

    def _heavy(self) -> AbstractContextManager[None]:
        """`runtime.heavy_work` for this teacher: every core only where its width makes threads pay."""
        return heavy_work(self.projector.teacher.config.dim)

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
        self._stacked_spectra.clear()  # (the gallery may be shared with other sessions: it stays, bounded)
        self._teacher_module = None
        self.probed = None
        self.projector.release()
        if self.projector.teacher.checkpoint is not None:
            self.projector.teacher.checkpoint.close()

    # ------------------------------------------------------------ properties

    @property
    def mapping(self) -> Mapping:
        return self.projector.mapping(self.strategy)

    @property
    def device(self) -> torch.device:
        return pick_device(self.strategy.device)

    @property
    def student_config(self) -> ModelConfig:
        return self.projector.student_config(self.strategy)

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

    def signature(self, strategy: Strategy | None = None) -> ProjectionKey:
        return self.projector.signature(strategy or self.strategy)

    @property
    def measured(self) -> Measured | None:
        """The energies of the current strategy + rules, if measured."""
        return self.measures.peek(self.signature())

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
        self._remap(strategy=self._usable(strategy))

    def _usable(self, strategy: Strategy) -> Strategy:
        """`strategy`, checked for use here: its device exists, its calibration is there (the demo's, measured if
        need be) and the core maps under it. Changes nothing but the calibration."""
        pick_device(strategy.device)  # the core refuses cuda where there is none
        if strategy.needs_calibration and self.projector.calibration is None:
            self.calibrate()
        self.projector.mapping(strategy)  # the core rejects bad layer lists and head counts while mapping
        return strategy

    def calibrate(self, calibration: Calibration | None = None, progress: Progress | None = None) -> None:
        """Activation choices rank on a calibration set: the one given (the Function tab's), else the demo's
        held-out digits for teachers in its latent space (measured once, then cached on disk)."""
        if calibration is None and not demo_space(self.projector.teacher.config):
            raise ProjectionError("activation, influence, wanda, compensation and least-squares choices run the "
                                  "teacher on a calibration set: choose one in the Function tab (a file under the "
                                  "app's root, or synthetic) and press Measure")
        with self._heavy():
            self.projector.calibrate(calibration or demo_calibration(), progress=progress, device=self.device)

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
        mapping = build_mapping(p.teacher, p.student, self.strategy, self._user_rules(parsed))
        suggested = suggest_rules(mapping)
        before = mapping.coverage()["keys"]
        after = build_mapping(p.teacher, p.student, self.strategy, {**mapping.rules, **suggested}).coverage()["keys"]
        return Suggested(with_suggestions(text, parsed, suggested), suggested,
                         after["transferred"] - before["transferred"], before["total"] - before["transferred"])

    def _remap(self, strategy: Strategy | None = None, rules: dict[str, Rule] | None = None) -> None:
        """Map under a new strategy and/or rules, then take them; if the core rejects the mapping, nothing
        changes."""
        strategy = self.strategy if strategy is None else strategy
        rules = self.projector.rules if rules is None else rules
        self.projector.mapping(strategy, rules)
        self.strategy, self.projector.rules = strategy, rules

    # ------------------------------------------------------------ numbers

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
        student = self.projector.student_tensor(key, self.strategy)
        return Details(entry, self.index_choices(entry), teacher, student.float().flatten(), energy)

    def index_choices(self, entry: Entry) -> list[IndexChoice]:
        """The kept teacher indices of every space the entry's axes live in (from the core's plan)."""
        return index_choices(self.projector.plan(self.strategy), entry)

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

    # ------------------------------------------------------------ comparison and export

    def compare(self, a: Strategy, b: Strategy, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
        """Coverage and retained energy under two strategies (same sources and rules); the session's own
        strategy stays, and the core's caches make coming back to it free."""
        out = {}
        with self._heavy():
            for name, strategy in (("A", a), ("B", b)):
                out[name] = self.measure(force=True, progress=progress, strategy=self._usable(strategy)).summary
        return out

    def compare_function(self, a: Strategy, b: Strategy) -> dict[str, tuple[Fidelity, list[dict[str, float]] | None]]:
        """What the students of A and B compute on `reference_set` next to a random student of this shape (the
        reference): velocity error per noise band and per student block, from one teacher pass shared with every
        other view on that set (none if one ran already)."""
        return {"A": self.student_function(a), "B": self.student_function(b),
                "random init": self.student_function(RANDOM)}

    # ------------------------------------------------------------ function: what the student computes

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

    def projection_key(self, strategy: Strategy | None = None) -> ProjectionKey:
        """What decides the student `strategy` (the session's by default) projects: the strategy less dtype and
        device, the rules, the calibration set where the strategy ranks or fits on one, and the teacher."""
        return self.projector.key(strategy or self.strategy, "student")

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

    def export(self, out: Path, progress: Progress | None = None) -> tuple[dict[str, Any], list[Path]]:
        """The core's export (refuses existing folders); returns the report and copies to offer for download."""
        measured = self.function if self.function is not None and self._function_for == self.projection_key() else None
        # the Function view measured this very projection: the report records it, as the CLI's --calibration does
        measure = (lambda _: {**measured["fidelity"], "measured_on": MEASURED_ON}) if measured else None
        with self._heavy():
            report = export_student(self.projector, out, force=False, progress=progress, strategy=self.strategy,
                                    measure=measure)
        names = ["projection_report.json", "config.json", "strategy.yaml", "README.md"]
        weights = report["provenance"]["weights"]
        if sum((out / w).stat().st_size for w in weights) <= SMALL_WEIGHTS_BYTES:
            index = report["provenance"]["weights_index"]
            names += weights + ([index] if index else [])
        copies = self.folder / out.name  # downloads come from the session's folder, not the root
        copies.mkdir(parents=True, exist_ok=True)
        return report, [Path(shutil.copy2(out / n, copies / n)) for n in names]


MEASURED_ON = "the app's Function view: this projection in memory, in float32, before export"


def _mapped(p: Projector) -> Projector:
    """Map now: the core rejects bad layer lists and head counts while mapping, and the UI should say so at once."""
    p.mapping()
    return p


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
