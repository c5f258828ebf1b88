"""One cache class for every cache in the package and the app, and every cache's bound in one table.

`Lru` keeps entries within a byte budget (each entry's size is `sizeof(value)`), least recently used out first, and
optionally within a number of entries; it is thread-safe. The bounds below are the only place a cache's size is
chosen: a module names the bound it uses.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class Bound:
    bytes: int
    items: int | None = None  # also at most this many entries (None: bytes only)


# ---------------------------------------------------------------- every cache's bound
# shared by every projector of a process (the app: all its sessions)
TEACHER_TENSORS = Bound(1 << 30)  # recently read teacher tensors (engine.projector.TensorCache)
SVD_BASES = Bound(512 << 20)  # singular vectors of teacher matrices (core.project.SvdCache)
FILE_DIGESTS = Bound(1 << 20, 1024)  # content digests of teacher and pipeline files (io.digest.file_digest)
# per projector (the app: per session)
TEACHER_STATS = Bound(256 << 20)  # squared norms per teacher tensor and axis (core.plan.TeacherStats)
PROJECTED_TENSORS = Bound(64 << 20)  # projected tensors kept for reuse; older ones keep only their numbers
PROJECTIONS = Bound(64 << 20, 8)  # projected entries (numbers) per recent strategy + rules (sliders moved back)
SPECTRA = Bound(64 << 20, 256)  # singular values of teacher and student tensors
# per app session (inspector.session)
MEASURES = Bound(16 << 20, 64)  # retained energies per strategy + rules (numbers only: a few kB each)
GALLERY = Bound(16 << 20, 16)  # gallery rows and step-0 errors (a few kB each)
# shared by the app's sessions (inspector.sessions)
SHARED_GALLERY = Bound(64 << 20, 64)  # gallery rows and the teacher's outputs on their sets (a few MB each)
STACKED_SPECTRA = Bound(16 << 20, 256)  # singular values of the parts of stacked student entries


def sizeof(value: Any) -> int:
    """Bytes a cached value holds: tensors by their storage in use, containers and dataclasses by their contents,
    anything else by `sys.getsizeof`."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return sys.getsizeof(value)
    if isinstance(value, dict):
        return 64 + sum(sizeof(k) + sizeof(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return 56 + sum(sizeof(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return 64 + sum(sizeof(getattr(value, f.name)) for f in dataclasses.fields(value))
    return sys.getsizeof(value)


class Lru(Generic[K, V]):
    """Least recently used entries within `bound` (bytes, and entries if it says so). An entry larger than the
    whole byte budget is not kept (`put` returns it all the same), unless `keep_oversize`: then it stays alone.
    `evicted(key, value)` is called for every entry that goes out to make room (not for `pop`, `drop`, `clear`)."""

    def __init__(self, bound: Bound, size: Callable[[V], int] = sizeof, keep_oversize: bool = False,
                 evicted: Callable[[K, V], None] | None = None):
        self.bound, self.size, self.keep_oversize, self.evicted = bound, size, keep_oversize, evicted
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.used = 0
        self.lock = threading.RLock()

    @property
    def budget(self) -> int:
        return self.bound.bytes

    def get(self, key: K, default: V | None = None) -> V | None:
        """The entry (now the most recently used), or `default`."""
        with self.lock:
            found = self._items.get(key)
            if found is None:
                return default
            self._items.move_to_end(key)
            return found[0]

    def peek(self, key: K, default: V | None = None) -> V | None:
        """The entry, leaving its place in the order as it is."""
        with self.lock:
            found = self._items.get(key)
            return default if found is None else found[0]

    def put(self, key: K, value: V) -> V:
        """Keep `value` as the most recently used entry, then make room; returns `value`."""
        size = self.size(value)
        out = []
        with self.lock:
            if size > self.bound.bytes and not self.keep_oversize:
                return value
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]
            self._items[key] = (value, size)
            self.used += size
            while len(self._items) > 1 and (self.used > self.bound.bytes or
                                            (self.bound.items is not None and len(self._items) > self.bound.items)):
                k, (v, s) = self._items.popitem(last=False)
                self.used -= s
                out.append((k, v))
        if self.evicted is not None:
            for k, v in out:
                self.evicted(k, v)
        return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self.lock:
            found = self._items.pop(key, None)
            if found is None:
                return default
            self.used -= found[1]
            return found[0]

    def drop(self, which: Callable[[K], bool]) -> None:
        """Forget the entries whose key `which` accepts."""
        with self.lock:
            for k in [k for k in self._items if which(k)]:
                self.used -= self._items.pop(k)[1]

    def clear(self) -> None:
        with self.lock:
            self._items.clear()
            self.used = 0

    def __contains__(self, key: object) -> bool:
        with self.lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        with self.lock:
            return iter(list(self._items))

    def keys(self) -> list[K]:
        with self.lock:
            return list(self._items)

    def values(self) -> list[V]:
        with self.lock:
            return [v for v, _ in self._items.values()]

    def __getitem__(self, key: K) -> V:
        with self.lock:
            found = self._items.get(key)
            if found is None:
                raise KeyError(key)
            self._items.move_to_end(key)
            return found[0]
