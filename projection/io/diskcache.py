"""Entries of the user's cache folder (never the teacher's): what the teacher computed on a calibration set, kept
between runs and shared by the app and the CLI (activation statistics, a probe's teacher targets).

An entry is read only as a regular file at its own name, up to a bound the caller computes from what the entry must
hold; it is written atomically; a missing, damaged or rejected entry is computed again and rewritten.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors import SafetensorError

T = TypeVar("T")


def cache_dir() -> Path:
    """$PROJECTION_CACHE, else $XDG_CACHE_HOME/projection-inspector, else ~/.cache/projection-inspector."""
    if os.environ.get("PROJECTION_CACHE"):
        return Path(os.environ["PROJECTION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "projection-inspector"


def read_entry(path: Path, limit: int) -> bytes:
    """A cache entry's bytes: a regular file at that very name (a link planted there is not followed; a FIFO
    cannot block the open), at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ValueError(f"{path}: not a regular file of at most {limit:,} bytes")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: more than {limit:,} bytes")
    return data


def write_entry(path: Path, data: bytes) -> None:
    """`data` at `path`, atomically: through a temporary file created exclusively in the same folder (mkstemp:
    O_CREAT | O_EXCL | O_NOFOLLOW, so no file or link planted at any name is opened), removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def checked_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of an entry if they are exactly the ones expected (`shapes`: names and shapes; `dtype`, all
    finite); else ValueError, so that the entry is computed again."""
    if set(tensors) != set(shapes):
        raise ValueError(f"names differ: {len(set(shapes) - set(tensors))} missing, "
                         f"{len(set(tensors) - set(shapes))} unexpected")
    for name, v in tensors.items():
        if v.dtype != dtype or tuple(v.shape) != shapes[name] or not torch.isfinite(v).all():
            raise ValueError(f"{name}: {v.dtype} {tuple(v.shape)}, expected finite {dtype} {shapes[name]}")
    return tensors


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One entry: its file, the most bytes it may hold, and how its value is read from and written to bytes. An
    unnamed teacher's (one without files) is never read or written: its fingerprint names nothing."""
    fingerprint: str
    path: Path
    limit: int
    load: Callable[[bytes], T]
    save: Callable[[T], bytes]

    def get(self) -> T | None:
        """The value, or None where there is no entry or a damaged one (then it is measured again)."""
        if self.fingerprint.startswith("unnamed-"):
            return None
        try:
            return self.load(read_entry(self.path, self.limit))
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError):
            return None

    def put(self, value: T) -> T:
        """`value`, written as the entry (without a cache folder it is still returned)."""
        if not self.fingerprint.startswith("unnamed-"):
            with contextlib.suppress(OSError):
                write_entry(self.path, self.save(value))
        return value

    def through(self, compute: Callable[[], T]) -> T:
        """The entry's value, else `compute()` written as the entry."""
        found = self.get()
        return found if found is not None else self.put(compute())


def cached(fingerprint: str, path: Path, limit: int, load: Callable[[bytes], T], compute: Callable[[], T],
           save: Callable[[T], bytes]) -> T:
    """`compute()` through the entry at `path` of at most `limit` bytes."""
    return Entry(fingerprint, path, limit, load, save).through(compute)
