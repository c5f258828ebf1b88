"""The one object the CLI and the inspector drive: load -> map -> plan -> project -> measure.

It caches what does not change between refreshes (teacher statistics, recently read teacher tensors, projected
entries per plan), so moving a slider re-reads only the teacher blocks that became relevant.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator, Literal

import torch

from ..arch.anatomy import SPACES
from ..arch.config import ModelConfig
from ..core.mapping import Entry, Mapping, Rule, build_mapping
from ..core.measure import retained_weight_energy
from ..core.models import ModelView, open_student, open_teacher
from ..core.plan import Plan, TeacherStats, make_plan, needs_stats
from ..core.project import Projected, SvdCache, pick_device, project_entry
from ..core.spectra import singular_values
from ..core.strategy import Strategy
from ..errors import ProjectionError
from ..function.activations import require, teacher_activations
from ..function.noise import expert_band
from ..io.checkpoint import MAX_HEADER_BYTES, PathCheck
from ..io.inputs import regular_fd
from ..io.streaming import WORKERS, in_order, read_ahead

Progress = Callable[[int, int, str], None]
Tensors = Literal["keep", "yield", "numbers"]
PLANS_KEPT = 8  # projected entries are cached for this many recent strategies + rules (sliders moved back)
SPECTRA_KEPT = 256
KEPT_BYTES = 64 << 20  # projected tensors kept for reuse (details, spectra); older ones keep only their numbers


@dataclass
class TensorCache:
    """Least-recently-used teacher tensors, bounded in bytes (a 14B teacher streams, a demo stays in memory).

    One cache may serve many projectors at once (the app shares one among all its sessions): entries are keyed by
    the teacher's fingerprint and the tensor's name, so projectors on one teacher share them and the budget bounds
    them all together."""

    budget: int = 1 << 30
    items: OrderedDict[tuple[str, str], torch.Tensor] = field(default_factory=OrderedDict)
    used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # projections run in threads

    def get(self, teacher: str, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        with self.lock:
            if (teacher, key) in self.items:
                self.items.move_to_end((teacher, key))
                return self.items[(teacher, key)]
        t = read(key)
        size = t.numel() * t.element_size()
        if size <= self.budget:
            t = t.clone()  # own the memory: a memory-mapped view would keep the file pages pinned
            with self.lock:
                if (teacher, key) not in self.items:
                    self.items[(teacher, key)] = t
                    self.used += size
                while self.used > self.budget:
                    _, old = self.items.popitem(last=False)
                    self.used -= old.numel() * old.element_size()
        return t

    def drop(self, teacher: str) -> None:
        """Forget one teacher's tensors (its last user has gone)."""
        with self.lock:
            for k in [k for k in self.items if k[0] == teacher]:
                old = self.items.pop(k)
                self.used -= old.numel() * old.element_size()


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


WHOLE_FILE_BYTES = 64 << 20  # teacher files up to this size are hashed whole
SAMPLES, SAMPLE_BYTES = 16, 64 << 10  # larger ones: their safetensors header and these blocks, evenly spaced
SETTLED_NS = 2_000_000_000  # a file changed this recently may change again within its ctime's granularity
DIGESTS_KEPT = 1024
_digests: OrderedDict[tuple, str] = OrderedDict()  # (path, dev, inode, size, mtime, ctime) -> digest
_digests_lock = threading.Lock()


def file_digest(path: str | os.PathLike, safetensors: bool) -> str:
    """A content digest of one teacher file: sha256 of its size and, up to WHOLE_FILE_BYTES, all its bytes; above
    that, of its safetensors header (length and JSON) and SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets
    (the first at 0, the last ending at the end). A large file changed only outside those blocks, its header
    unchanged, keeps its digest. Kept per (path, device, inode, size, mtime, ctime) within the process; ctime
    changes on every write and cannot be set back, so a file rewritten in place with its mtime restored is hashed
    again."""
    fd = regular_fd(path)
    try:
        st = os.fstat(fd)
        seen = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _digests_lock:
            if seen in _digests:
                _digests.move_to_end(seen)
                return _digests[seen]
        started, size = time.time_ns(), st.st_size
        h = hashlib.sha256(f"{size}\n".encode())
        if size <= WHOLE_FILE_BYTES:
            offset = 0
            while offset < size and (chunk := os.pread(fd, min(1 << 20, size - offset), offset)):
                h.update(chunk)
                offset += len(chunk)
        else:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if safetensors and 0 < n <= MAX_HEADER_BYTES and 8 + n <= size:
                h.update(os.pread(fd, 8 + n, 0))
            for i in range(SAMPLES):
                h.update(os.pread(fd, SAMPLE_BYTES, i * (size - SAMPLE_BYTES) // (SAMPLES - 1)))
    finally:
        os.close(fd)
    digest = h.hexdigest()
    if started - st.st_ctime_ns >= SETTLED_NS:  # changed just before: a rewrite may keep this ctime
        with _digests_lock:
            _digests[seen] = digest
            while len(_digests) > DIGESTS_KEPT:
                _digests.popitem(last=False)
    return digest


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
        self.strategy = strategy or Strategy()
        self.rules: dict[str, Rule] = dict(rules or {})
        self.fingerprint = teacher_fingerprint(teacher)
        self.read = partial(caches.tensors.get, self.fingerprint, read=teacher.read) if caches else teacher.read
        self.svd = (caches.svd if caches else SvdCache()).scoped(self.fingerprint)
        self.stats = TeacherStats(self.read, pick_device(self.strategy.device), teacher.prefetch)
        self._mapping: tuple[str, Mapping] | None = None
        self._plan: tuple[str, Plan] | None = None
        self._results: OrderedDict[str, dict[str, Projected]] = OrderedDict()  # plan signature -> entries
        self._kept: OrderedDict[tuple[str, str], int] = OrderedDict()  # (plan, key) -> bytes of a kept tensor
        self._kept_bytes = 0
        self._spectra: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.activations: Any = None  # activations.Activations on a calibration set (see `calibrate`)
        self.calibration: Any = None  # calibration.Calibration given to `calibrate` (fitting runs on it)

    @classmethod
    def open(cls, teacher: str, student: str | dict[str, Any], expert: str | None = None,
             strategy: Strategy | None = None, rules: dict[str, Rule] | None = None,
             caches: Caches | None = None, num_heads: int | None = None,
             check: PathCheck | None = None) -> "Projector":
        """num_heads: the student's heads, for a checkpoint that does not record them (see `open_student`); `check`
        sees every file the sources lead to before it is read (see open_checkpoint)."""
        strategy = strategy or Strategy()
        t = open_teacher(teacher, expert or strategy.expert, check)
        listed = len(strategy.layers) if isinstance(strategy.layers, list) else None  # may repeat blocks
        return cls(t, open_student(student, t, num_heads, check, listed), strategy, rules, caches)

    def release(self) -> None:
        """Drop everything this projector keeps for itself (projected entries, spectra, statistics, plan); what
        it shares through `Caches` stays for the others."""
        self._plan = None
        self._results.clear()
        self._kept.clear()
        self._kept_bytes = 0
        self._spectra.clear()
        self.stats.cache.clear()

    def calibrate(self, calibration: Any, draws: int = 2, seed: int = 0, progress: Progress | None = None,
                  cache: Any = None) -> Any:
        """Run the teacher (streamed) on a calibration set and keep its activation statistics (cached on disk), so
        that `activation` and `influence` choices can rank by them. The noise levels are those of the expert."""
        expert = self.teacher.checkpoint.expert if self.teacher.checkpoint else None
        band = expert_band(expert, self.teacher.config.in_dim)
        found = teacher_activations(self.teacher, self.fingerprint, calibration, draws, seed, band, self.device, cache,
                                    progress)
        bad = next((k for k, v in found.scores.items() if not torch.isfinite(v).all()), None)
        if bad is not None or not all(math.isfinite(v) for v in found.influence):
            where = f"'{bad[0]}' of block {bad[1]}" if bad else "block influence"
            raise ProjectionError(f"{calibration.label}: the teacher's activations are not finite ({where}): inputs "
                                  "this large overflow the teacher's float32 forward; nothing ranks on them")
        self.calibration, self.activations = calibration, found
        return found

    def _resolved(self, strategy: Strategy) -> Strategy:
        """`layers: influence` as the block list it stands for (the most influential blocks, in order)."""
        if strategy.layers != "influence":
            return strategy
        depth = self.student.config.num_layers if self.student.layout != "custom" else None
        if depth is None:
            raise ProjectionError(f"{self.student.source}: layers: influence needs the student's block count")
        return strategy.model_copy(update={"layers": require(self.activations, "layers: influence")
                                           .influential(int(depth))})

    @property
    def device(self) -> torch.device:
        return pick_device(self.strategy.device)

    def signature(self) -> str:
        """What projected numbers depend on: the strategy (less export dtype, device, seed, expert) and rules."""
        keep = self.strategy.model_dump(exclude={"dtype", "device", "seed", "expert"})
        calibrated = self.activations.key if self.activations is not None and self.strategy.needs_activations else None
        return json.dumps([keep, self.rules, calibrated], sort_keys=True)

    @property
    def mapping(self) -> Mapping:
        calibrated = self.activations.key if self.activations is not None else None
        sig = json.dumps([self.strategy.model_dump(), self.rules, calibrated], sort_keys=True)
        if self._mapping is None or self._mapping[0] != sig:
            strategy = self._resolved(self.strategy)
            self._mapping = (sig, build_mapping(self.teacher, self.student, strategy, self.rules))
        return self._mapping[1]

    def plan(self) -> Plan:
        sig = self.signature()
        if self._plan is None or self._plan[0] != sig:
            mapping = self.mapping
            if self.strategy.needs_activations:
                require(self.activations, "this strategy")
            self._plan = (sig, make_plan(mapping, self.stats if needs_stats(mapping) else None, self.activations))
        return self._plan[1]

    def stream(self, keys: list[str] | None = None, progress: Progress | None = None,
               tensors: Tensors = "keep") -> Iterator[Projected]:
        """Projected entries (all, or the named student keys), one at a time, cached per plan.

        tensors: "keep" yields them and caches them (interactive use); "yield" yields them but caches only the
        numbers, so an export holds each projected tensor once, in the caller's hands; "numbers" needs no
        tensors at all (yielded tensors are empty), so any cached entry serves."""
        plan = self.plan()
        sig = self.signature()
        cache = self._results.setdefault(sig, {})
        self._results.move_to_end(sig)
        while len(self._results) > PLANS_KEPT:
            self._results.popitem(last=False)
        entries = plan.mapping.entries if keys is None else [plan.mapping.entry(k) for k in keys]
        usable = [self._usable(cache.get(e.student_key), tensors) for e in entries]

        def work(entry: Entry) -> Projected:  # runs in worker threads: touches only thread-safe caches
            return project_entry(entry, plan, self.read, self.device, self.svd, self.stats.squared_norm)

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
        if progress:
            progress(len(entries), len(entries), "done")

    def _keep(self, sig: str, found: Projected) -> None:
        """Count a projected tensor kept for reuse; past KEPT_BYTES the oldest kept ones keep only their numbers."""
        key = (sig, found.entry.student_key)
        self._kept_bytes -= self._kept.pop(key, 0)
        if found.tensor is None:
            return
        self._kept[key] = found.tensor.nbytes
        self._kept_bytes += found.tensor.nbytes
        while self._kept_bytes > KEPT_BYTES and len(self._kept) > 1:
            (old_sig, old_key), size = self._kept.popitem(last=False)
            self._kept_bytes -= size
            entries = self._results.get(old_sig, {})
            if old_key in entries:
                entries[old_key] = numbers_only(entries[old_key])

    @staticmethod
    def _usable(found: Projected | None, tensors: Tensors) -> bool:
        if found is None:
            return False
        whole = found.tensor is None or found.tensor.numel() == math.prod(found.entry.student_shape)
        return whole or tensors == "numbers"

    def project(self, keys: list[str] | None = None, progress: Progress | None = None) -> list[Projected]:
        return list(self.stream(keys, progress))

    def student_tensor(self, key: str) -> torch.Tensor | None:
        return self.project([key])[0].tensor

    def spectrum(self, key: str, side: str = "teacher") -> torch.Tensor | None:
        """Singular values of a teacher tensor (canonical key) or a projected student tensor (student key)."""
        sig = key if side == "teacher" else f"{self.signature()}|{key}"
        if (side, sig) not in self._spectra:
            t = self.read(key) if side == "teacher" else self.student_tensor(key)
            if t is None:
                return None
            self._spectra[(side, sig)] = singular_values(t, self.device)
            while len(self._spectra) > SPECTRA_KEPT:
                self._spectra.popitem(last=False)
        self._spectra.move_to_end((side, sig))
        return self._spectra[(side, sig)]

    @property
    def student_config(self) -> ModelConfig:
        """THE student config: the summary, the report, the exported config.json and the app show this one.

        A student with unknown names knows none of its own: its sizes are what the mapper inferred from the
        tensors its rules map (and its heads, unless given)."""
        if self.student.layout != "custom":
            return ModelConfig.from_dict({"layout": self.student.layout, **self.student.config.to_dict()})
        mapping = self.mapping
        out: dict[str, Any] = {"layout": "custom", "num_layers": len(mapping.layers)}
        for name, space in SPACES.items():  # the first space of each config field names it (resid: dim)
            if isinstance(space.size, str) and name in mapping.student_sizes:
                out.setdefault(space.size, mapping.student_sizes[name])
        return ModelConfig.from_dict(out)

    @property
    def heads_inferred(self) -> bool:
        """The student's heads are a guess: its checkpoint does not record them and nobody set them."""
        return not self.student.heads_recorded and self.student_config.num_heads is not None

    def heads_note(self) -> str | None:
        if not self.heads_inferred:
            return None
        cfg = self.student_config
        shape = f"{cfg.num_heads} x {cfg.head_dim}" if "head_dim" in cfg.keys_ else str(cfg.num_heads)
        return (f"heads inferred: {shape}; the checkpoint does not record heads. Set them if they differ "
                "(CLI --num-heads, the Sources tab's Heads field, or num_heads in a config.json beside the "
                "checkpoint).")

    def summary(self, results: list[Projected] | None = None) -> dict[str, Any]:
        mapping = self.mapping
        note = self.heads_note()
        out: dict[str, Any] = {
            "teacher": self.teacher.summary(),
            "student": {**self.student.summary(), "config": self.student_config.to_dict(),
                        "heads_inferred": self.heads_inferred},
            "coverage": mapping.coverage(), "counts": mapping.counts(), "layers": mapping.layers,
            "basis_consistent": self.strategy.basis_consistent,
            "activations_from": (self.activations.about if self.activations is not None
                                 and self.strategy.needs_activations else None),
            "warnings": ([f"Student {note}"] if note else []) + warnings(mapping, self.strategy),
        }
        if results is not None:
            out["retained_weight_energy"] = retained_weight_energy(results)
        return out


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

