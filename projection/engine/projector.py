"""The one object the CLI and the inspector drive: load -> map -> plan -> project -> measure.

It caches what does not change between refreshes (teacher statistics, recently read teacher tensors, projected
entries per plan), so moving a slider re-reads only the teacher blocks that became relevant.
"""
from __future__ import annotations

import hashlib
import json
import math
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator, Literal

import torch

from ..arch.anatomy import SPACES
from ..arch.config import ModelConfig
from ..cache import PROJECTED_TENSORS, PROJECTIONS, SPECTRA, TEACHER_TENSORS, Bound, Lru
from ..core.mapping import Entry, Mapping, Rule, blocks_per_stack, build_mapping, top_blocks
from ..core.measure import retained_weight_energy
from ..core.models import ModelView, open_student, open_teacher
from ..core.plan import Plan, TeacherStats, make_plan, needs_stats
from ..core.project import Projected, SvdCache, pick_device, project_entry
from ..core.spectra import singular_values
from ..core.strategy import RECOVERABLE, Strategy
from ..errors import ProjectionError
from ..function.activations import Activations, require, teacher_activations
from ..io.checkpoint import PathCheck
from ..io.digest import file_digest
from ..io.streaming import WORKERS, in_order, read_ahead
from .keys import ProjectionKey, Scope

Progress = Callable[[int, int, str], None]
Tensors = Literal["keep", "yield", "numbers"]
PLANS_KEPT = PROJECTIONS.items  # projected entries are cached for this many recent strategies + rules


class TensorCache:
    """Least-recently-used teacher tensors, bounded in bytes (a 14B teacher streams, a demo stays in memory).

    One cache may serve many projectors at once (the app shares one among all its sessions): entries are keyed by
    the teacher's fingerprint and the tensor's name, so projectors on one teacher share them and the budget bounds
    them all together."""

    def __init__(self, budget: int = TEACHER_TENSORS.bytes):
        self.items: Lru[tuple[str, str], torch.Tensor] = Lru(Bound(budget))  # thread-safe: projections run in threads

    @property
    def budget(self) -> int:
        return self.items.budget

    @property
    def used(self) -> int:
        return self.items.used

    def get(self, teacher: str, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        found = self.items.get((teacher, key))
        if found is not None:
            return found
        t = read(key)
        if t.nbytes <= self.budget:
            t = t.clone()  # own the memory: a memory-mapped view would keep the file pages pinned
            with self.items.lock:
                if (teacher, key) not in self.items:  # another thread may have read it meanwhile
                    self.items.put((teacher, key), t)
        return t

    def drop(self, teacher: str) -> None:
        """Forget one teacher's tensors (its last user has gone)."""
        self.items.drop(lambda k: k[0] == teacher)


@dataclass
class Caches:
    """What projectors keep between refreshes and may share: teacher tensors and SVD bases, each within its byte
    budget whatever the number of projectors using them."""

    tensors: TensorCache = field(default_factory=TensorCache)
    svd: SvdCache = field(default_factory=SvdCache)

    @property
    def budget(self) -> int:
        return self.tensors.budget + self.svd.budget

    @property
    def used(self) -> int:
        return self.tensors.used + self.svd.used

    def drop(self, teacher: str) -> None:
        self.tensors.drop(teacher)
        self.svd.drop(teacher)


def teacher_fingerprint(teacher: ModelView) -> str:
    """Names a teacher's contents for shared caches: its format, expert and config, and each file's content
    digest (`file_digest`: every byte of files up to 64 MiB, the header and sampled blocks of larger ones); copies
    of one teacher share it, a file rewritten with other bytes gets a new one."""
    ckpt = teacher.checkpoint
    if ckpt is None or not ckpt.files:
        return f"unnamed-{uuid.uuid4().hex}"  # shares nothing
    parts = [ckpt.format, str(ckpt.expert), json.dumps(teacher.config.to_dict(), sort_keys=True, default=str)]
    parts += [file_digest(f, ckpt.format != "torch-pickle") for f in ckpt.files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class Projector:
    def __init__(self, teacher: ModelView, student: ModelView, strategy: Strategy | None = None,
                 rules: dict[str, Rule] | None = None, caches: Caches | None = None):
        """caches: keep teacher tensors and SVD bases between refreshes (interactive use; may be shared with other
        projectors); None streams the teacher (export) and keeps SVD bases for this projector only."""
        self.teacher, self.student = teacher, student
        self._strategy = strategy or Strategy()  # the default of every method taking a strategy; never swapped
        self.rules: dict[str, Rule] = dict(rules or {})
        self.fingerprint = teacher_fingerprint(teacher)
        self.caches = caches  # projectors made for this one's work share them (no second read of the teacher)
        self.read = partial(caches.tensors.get, self.fingerprint, read=teacher.read) if caches else teacher.read
        self.svd = (caches.svd if caches else SvdCache()).scoped(self.fingerprint)
        self.stats = TeacherStats(self.read, pick_device(self.strategy.device), teacher.prefetch)
        self._mapping: tuple[ProjectionKey, Mapping] | None = None
        self._plan: tuple[ProjectionKey, Plan] | None = None
        # plan -> projected entries; their tensors are counted in `_kept` (plan, key) -> bytes: past its bound the
        # oldest kept tensors go, their entries keep only their numbers
        self._results: Lru[ProjectionKey, dict[str, Projected]] = Lru(PROJECTIONS, _numbers_size)
        self._kept: Lru[tuple[ProjectionKey, str], int] = Lru(PROJECTED_TENSORS, int, keep_oversize=True,
                                                              evicted=self._demote)
        self._spectra: Lru[tuple[str, Any], torch.Tensor] = Lru(SPECTRA)
        self.activations: Any = None  # activations.Activations on a calibration set (see `calibrate`)
        self.calibration: Any = None  # calibration.Calibration given to `calibrate` (fitting runs on it)

    @classmethod
    def open(cls, teacher: str, student: str | dict[str, Any], expert: str | None = None,
             strategy: Strategy | None = None, rules: dict[str, Rule] | None = None,
             caches: Caches | None = None, num_heads: int | None = None,
             check: PathCheck | None = None, layout: str | None = None) -> "Projector":
        """num_heads: the student's heads, for a checkpoint that does not record them (see `open_student`); `check`
        sees every file the sources lead to before it is read (see open_checkpoint); layout: overrides a student
        config's."""
        strategy = strategy or Strategy()
        t = open_teacher(teacher, expert or strategy.expert, check)
        listed = len(strategy.layers) if isinstance(strategy.layers, list) else None  # may repeat blocks
        return cls(t, open_student(student, t, num_heads, check, listed, layout), strategy, rules, caches)

    def using(self, strategy: Strategy) -> "Projector":
        """A projector whose default is `strategy`, on the same views, rules, caches and calibration (a choice made
        above this layer, such as `layers: recoverable`, becomes the strategy it chose)."""
        found = Projector(self.teacher, self.student, strategy, self.rules, self.caches)
        found.activations, found.calibration = self.activations, self.calibration
        return found

    def release(self) -> None:
        """Drop everything this projector keeps for itself (projected entries, spectra, statistics, plan); what
        it shares through `Caches` stays for the others."""
        self._plan = None
        self._results.clear()
        self._kept.clear()
        self._spectra.clear()
        self.stats.cache.clear()

    @property
    def band(self) -> tuple[float, float]:
        """The noise levels the teacher serves: its expert's band, else all of [0, 1]."""
        return self.teacher.band

    def calibrate(self, calibration: Any, draws: int = 2, seed: int = 0, progress: Progress | None = None,
                  cache: Any = None, device: torch.device | None = None, measured: Activations | None = None
                  ) -> Activations:
        """Run the teacher (streamed, on `device`: the default strategy's if None) on a calibration set and keep its
        activation statistics (cached on disk), so that `activation` and `influence` choices can rank by them. The
        noise levels are those of the expert. `measured`: statistics already measured on this set and request
        (`function.survey`), kept without running the teacher."""
        found = measured or teacher_activations(self.teacher, self.fingerprint, calibration, draws, seed, self.band,
                                                device or self.device, cache, progress)
        bad = next((k for k, v in found.scores.items() if not torch.isfinite(v).all()), None)
        if bad is not None or not all(math.isfinite(v) for v in found.influence):
            where = f"'{bad[0]}' of block {bad[1]}" if bad else "block influence"
            raise ProjectionError(f"{calibration.label}: the teacher's activations are not finite ({where}): inputs "
                                  "this large overflow the teacher's float32 forward; nothing ranks on them")
        self.calibration, self.activations = calibration, found
        return found

    @contextmanager
    def calibration_kept(self) -> Iterator[None]:
        """Whatever the block calibrates on (a probe ranks on a set's training part), the calibration the projector
        had before (set and statistics, or none) is its calibration again after."""
        before = self.calibration, self.activations
        try:
            yield
        finally:
            self.calibration, self.activations = before

    @property
    def strategy(self) -> Strategy:
        """The strategy the projector was opened with: what its methods use when they are given none."""
        return self._strategy

    def _resolved(self, strategy: Strategy) -> Strategy:
        """`layers: influence` as the block list it stands for (the most influential blocks, in order)."""
        if strategy.layers == RECOVERABLE:  # the probe's choice, made above this layer
            raise ProjectionError("layers: recoverable is chosen by short distillation probes on a calibration set: "
                                  "the CLI's --calibration resolves it (Python: projection.probe.resolve_layers)")
        if strategy.layers != "influence":
            return strategy
        depth = self.student.config.num_layers if self.student.layout != "custom" else None
        if depth is None:
            raise ProjectionError(f"{self.student.source}: layers: influence needs the student's block count")
        influence = require(self.activations, "layers: influence").influence  # the most influential in each stack
        layers = top_blocks(influence, blocks_per_stack(self.teacher.config), blocks_per_stack(self.student.config))
        return strategy.model_copy(update={"layers": layers})

    @property
    def device(self) -> torch.device:
        """The device of the default strategy (`device_of` for another)."""
        return pick_device(self.strategy.device)

    def key(self, strategy: Strategy | None = None, scope: Scope = "numbers",
            rules: dict[str, Rule] | None = None) -> ProjectionKey:
        """What decides a projection under `strategy` (the default one if None) and `rules` (the projector's if
        None), for what `scope` caches (`keys.SCOPES`)."""
        return ProjectionKey.of(scope, strategy or self.strategy, self.rules if rules is None else rules,
                                self.activations, self.fingerprint)

    def signature(self, strategy: Strategy | None = None) -> ProjectionKey:
        """What projected numbers depend on: the strategy (less export dtype, device, seed, expert), the rules and
        the calibration set where the strategy ranks on activations."""
        return self.key(strategy, "numbers")

    def mapping(self, strategy: Strategy | None = None, rules: dict[str, Rule] | None = None) -> Mapping:
        """The mapping under `strategy` (the default one if None) and `rules` (the projector's if None)."""
        strategy = strategy or self.strategy
        rules = self.rules if rules is None else rules
        sig = self.key(strategy, "mapping", rules)
        found = self._mapping
        if found is None or found[0] != sig:
            found = (sig, build_mapping(self.teacher, self.student, self._resolved(strategy), rules))
            self._mapping = found
        return found[1]

    def plan(self, strategy: Strategy | None = None) -> Plan:
        strategy = strategy or self.strategy
        sig = self.signature(strategy)
        found = self._plan
        if found is None or found[0] != sig:
            mapping = self.mapping(strategy)
            if strategy.needs_activations:
                require(self.activations, "this strategy")
            found = (sig, make_plan(mapping, self.stats if needs_stats(mapping) else None, self.activations))
            self._plan = found
        return found[1]

    def stream(self, strategy: Strategy | None = None, keys: list[str] | None = None,
               progress: Progress | None = None, tensors: Tensors = "keep") -> Iterator[Projected]:
        """Projected entries (all, or the named student keys) under `strategy` (the default one if None), one at a
        time, cached per plan.

        tensors: "keep" yields them and caches them (interactive use); "yield" yields them but caches only the
        numbers, so an export holds each projected tensor once, in the caller's hands; "numbers" needs no
        tensors at all (yielded tensors are empty), so any cached entry serves."""
        strategy = strategy or self.strategy
        plan = self.plan(strategy)
        sig = self.signature(strategy)
        device = pick_device(strategy.device)
        cache = self._results.get(sig)
        if cache is None:
            cache = self._results.put(sig, {})
        entries = plan.mapping.entries if keys is None else [plan.mapping.entry(k) for k in keys]
        usable = [self._usable(cache.get(e.student_key), tensors) for e in entries]

        def work(entry: Entry) -> Projected:  # runs in worker threads: touches only thread-safe caches
            return project_entry(entry, plan, self.read, device, self.svd, self.stats.squared_norm)

        computed = in_order(work, [e for e, ok in zip(entries, usable) if not ok], WORKERS)
        for i in read_ahead([[] if ok else [p.teacher_key for p in e.parts] for e, ok in zip(entries, usable)],
                            self.teacher.prefetch):
            entry = entries[i]
            if progress:
                progress(i, len(entries), entry.student_key)
            found = cache.get(entry.student_key)
            if not usable[i]:
                found = next(computed)
                cache[entry.student_key] = found if tensors == "keep" else numbers_only(found)
                if tensors == "keep":
                    self._keep(sig, found)
            yield numbers_only(found) if tensors == "numbers" else found
        self._results.put(sig, cache)  # counted again, with its new entries
        if progress:
            progress(len(entries), len(entries), "done")

    def _keep(self, sig: ProjectionKey, found: Projected) -> None:
        """Count a projected tensor kept for reuse; past its bound the oldest kept ones keep only their numbers."""
        key = (sig, found.entry.student_key)
        self._kept.pop(key)
        if found.tensor is not None:
            self._kept.put(key, found.tensor.nbytes)

    def _demote(self, kept: tuple[ProjectionKey, str], _: int) -> None:
        old_sig, old_key = kept
        entries = self._results.peek(old_sig, {})
        if old_key in entries:
            entries[old_key] = numbers_only(entries[old_key])

    @staticmethod
    def _usable(found: Projected | None, tensors: Tensors) -> bool:
        if found is None:
            return False
        whole = found.tensor is None or found.tensor.numel() == math.prod(found.entry.student_shape)
        return whole or tensors == "numbers"

    def project(self, strategy: Strategy | None = None, keys: list[str] | None = None,
                progress: Progress | None = None) -> list[Projected]:
        return list(self.stream(strategy, keys, progress))

    def student_tensor(self, key: str, strategy: Strategy | None = None) -> torch.Tensor | None:
        return self.project(strategy, [key])[0].tensor

    def spectrum(self, key: str, side: str = "teacher", strategy: Strategy | None = None) -> torch.Tensor | None:
        """Singular values of a teacher tensor (canonical key) or a student tensor (student key) projected under
        `strategy` (the default one if None), computed on the strategy's device."""
        strategy = strategy or self.strategy
        sig = key if side == "teacher" else (self.signature(strategy), key)
        found = self._spectra.get((side, sig))
        if found is None:
            t = self.read(key) if side == "teacher" else self.student_tensor(key, strategy)
            if t is None:
                return None
            found = self._spectra.put((side, sig), singular_values(t, pick_device(strategy.device)))
        return found

    def student_config(self, strategy: Strategy | None = None) -> ModelConfig:
        """THE student config: the summary, the report, the exported config.json and the app show this one.

        A student with unknown names knows none of its own: its sizes are what the mapper inferred from the
        tensors its rules map (and its heads, unless given), under `strategy` (the default one if None)."""
        if self.student.layout != "custom":
            return ModelConfig.from_dict({"layout": self.student.layout, **self.student.config.to_dict()})
        mapping = self.mapping(strategy)
        out: dict[str, Any] = {"layout": "custom", "num_layers": len(mapping.layers)}
        for name, space in SPACES.items():  # the first space of each config field names it (resid: dim)
            if isinstance(space.size, str) and name in mapping.student_sizes:
                out.setdefault(space.size, mapping.student_sizes[name])
        return ModelConfig.from_dict(out)

    def heads_inferred(self, strategy: Strategy | None = None) -> bool:
        """The student's heads are a guess: its checkpoint does not record them and nobody set them."""
        return not self.student.heads_recorded and self.student_config(strategy).num_heads is not None

    def heads_note(self, strategy: Strategy | None = None) -> str | None:
        if not self.heads_inferred(strategy):
            return None
        cfg = self.student_config(strategy)
        shape = f"{cfg.num_heads} x {cfg.head_dim}" if "head_dim" in cfg.keys_ else str(cfg.num_heads)
        return (f"heads inferred: {shape}; the checkpoint does not record heads. Set them if they differ "
                "(CLI --num-heads, the Sources tab's Heads field, or num_heads in a config.json beside the "
                "checkpoint).")

    def summary(self, results: list[Projected] | None = None, strategy: Strategy | None = None) -> dict[str, Any]:
        strategy = strategy or self.strategy
        mapping = self.mapping(strategy)
        note = self.heads_note(strategy)
        out: dict[str, Any] = {
            "teacher": self.teacher.summary(),
            "student": {**self.student.summary(), "config": self.student_config(strategy).to_dict(),
                        "heads_inferred": self.heads_inferred(strategy)},
            "coverage": mapping.coverage(), "counts": mapping.counts(), "layers": mapping.layers,
            "basis_consistent": strategy.basis_consistent,
            "activations_from": (self.activations.about if self.activations is not None
                                 and strategy.needs_activations else None),
            "warnings": ([f"Student {note}"] if note else []) + warnings(mapping, strategy),
        }
        if results is not None:
            out["retained_weight_energy"] = retained_weight_energy(results)
        return out


def _numbers_size(entries: dict[str, Projected]) -> int:
    """A plan's cached entries, less their tensors (`PROJECTED_TENSORS` bounds those)."""
    return 512 * (1 + len(entries))


def numbers_only(r: Projected) -> Projected:
    """The entry's numbers without its tensor (an empty one stands in)."""
    return replace(r, tensor=r.tensor.new_empty(0)) if r.tensor is not None and r.tensor.numel() else r


def warnings(mapping: Mapping, strategy: Strategy) -> list[str]:
    out = []
    if mapping.coverage()["keys"]["transferred"] == 0:
        out.append("Nothing transfers: no student key maps to a teacher key. Add rules (student key: teacher key).")
    if not strategy.basis_consistent:
        out.append("svd-per-matrix gives every matrix its own basis: composed layers no longer line up "
                   "(basis-inconsistent; kept as a comparator only). Measured on the trained demo teacher, its "
                   "student starts with a velocity error about 86x the teacher's output and trains worse than "
                   "random init (README: Convergence).")
    return out


def entry_rows(mapping: Mapping, results: list[Projected] | None = None) -> list[dict[str, Any]]:
    """The mapping's rows with each entry's retained weight energy (None until measured; 0 for skipped entries
    once measured, as the means count them)."""
    energy = {r.entry.student_key: r.energy or 0.0 for r in results or []}
    return [{**e.row(), "retained_weight_energy": energy.get(e.student_key)} for e in mapping.entries]

