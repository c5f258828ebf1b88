"""One browser session's state: a core `Projector`, the strategy and rules the user chose, and what the session
measured and drew, kept apart from every other session's (nothing here is global).

Teacher tensors and SVD bases come from the app's shared `Caches`; what a session keeps for itself is bounded
(`projection.cache` names every bound): projected tensors, the teacher statistics of the blocks it looked at,
singular values, energies (numbers only) and gallery rows. What the screen asks of a session is answered in
`answers/` (one module per concept); `session.Session` is the state with those answers.
"""
from __future__ import annotations

import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from projection import ProjectionError, Projector, Strategy, parse_rules
from projection.arch.config import ModelConfig
from projection.cache import GALLERY, MEASURES, STACKED_SPECTRA, Lru
from projection.cancel import CancelToken
from projection.core.mapping import Mapping, Rule, build_mapping, preset_rules, rules_to_yaml
from projection.core.plan import needs_stats
from projection.core.project import Projected, pick_device
from projection.core.strategy import DEFAULT_LAYERS
from projection.core.suggest import suggest_rules, with_suggestions
from projection.demo.gallery import GalleryRow, demo_space
from projection.demo.teacher import demo_calibration
from projection.engine.keys import ProjectionKey
from projection.engine.projector import Caches
from projection.function.calibration import Calibration
from projection.function.fidelity import Fidelity, Reference
from projection.io.checkpoint import PathCheck
from projection.probe import ProbeResult
from projection.runtime import heavy_work

AUTO_ENERGY_BYTES = 1 << 30  # a teacher that fits the shared tensor cache is measured on every refresh
Progress = Callable[[int, int, str], None]
S = TypeVar("S", bound="SessionState")  # `open` returns the class it is called on (the app's: `Session`)


@dataclass
class Measured:
    """Retained energy of every entry under one strategy + rules (numbers only, no tensors)."""

    signature: ProjectionKey
    results: list[Projected]
    summary: dict[str, Any]


@dataclass
class Suggested:
    text: str  # the editor's text with the suggestions appended
    rules: dict[str, Rule]  # the suggestions alone
    covered: int  # student keys they would bring to transfer
    unmapped: int  # student keys the editor's rules leave without a source


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
class SessionState:
    """What one browser session holds: its projector and strategy, what it measured and drew (bounded), its lock
    and its requests' stop tokens. The questions the screen asks of it are answered in `answers/`."""

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

    @classmethod
    def open(cls: type[S], teacher: str, student: str | dict[str, Any], expert: str | None, strategy: Strategy,
             rules: dict[str, Any] | None = None, *, folder: Path, caches: Caches | None = None,
             num_heads: int | None = None, check: PathCheck | None = None, gallery: Lru | None = None) -> S:
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
            # A layer list chosen for another student: fall back to the default rule.
            p = _mapped(Projector.open(teacher, student, expert=expert, rules=rules, caches=caches,
                                       strategy=strategy.model_copy(update={"layers": DEFAULT_LAYERS}),
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

    def projection_key(self, strategy: Strategy | None = None) -> ProjectionKey:
        """What decides the student `strategy` (the session's by default) projects: the strategy less dtype and
        device, the rules, the calibration set where the strategy ranks or fits on one, and the teacher."""
        return self.projector.key(strategy or self.strategy, "student")

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


def _mapped(p: Projector) -> Projector:
    """Map now: the core rejects bad layer lists and head counts while mapping, and the UI should say so at once."""
    p.mapping()
    return p
