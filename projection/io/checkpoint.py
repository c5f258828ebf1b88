"""Lazy checkpoint sources: keys, shapes and dtypes from headers, single tensors on demand.

One entry point, `open_checkpoint(source, expert=None, check=None)`, accepts a .safetensors file, a sharded set
(its index json), a torch pickle, a folder holding any of these (original Wan, diffusers, a diffusers pipeline
root, a Wan2.2 two-expert root) or a Hugging Face hub id. Nothing reads tensor data until `get(key)`.

Every file and folder a source leads to is resolved (links followed) before it is read, and handed to the
caller's `check` (the app's --root); an index's shards stay inside its folder, and a hub id's files inside its
repository's cache folder, for every caller. Error messages never quote the bytes of a file that is not a
checkpoint: they say where parsing failed, not what was there.
"""
from __future__ import annotations

import mmap
import os
import pickle
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Iterable, Iterator

import torch

from ..errors import ProjectionError
from .inputs import clip, load_json, open_regular, read_bytes, read_json, regular_fd, require_regular

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
KNOWN_PREFIXES = ("model.diffusion_model.", "module.")
WRAPPER_KEYS = ("state_dict", "model", "module")
# Two-expert layouts: expert name -> sub-folder, in order of preference.
EXPERT_FOLDERS = {
    "wan2.2": {"high": "high_noise_model", "low": "low_noise_model"},
    "diffusers-pipeline": {"high": "transformer", "low": "transformer_2"},
}
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own bound; also bounds an index json
MAX_RANK = 64  # dimensions per tensor: far past any model, and bounds the work per header entry
INT64_MAX = 2**63 - 1
# How torch.save files begin: a zip archive, or (legacy format) a pickled magic number.
TORCH_ZIP = b"PK\x03\x04"
TORCH_LEGACY = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}

PathCheck = Callable[[Path, Path], None]
"""Called with a path a source leads to (absolute, links not followed) and the same path resolved, before it
is read; raises ProjectionError to refuse it."""


def resolve_checked(path: Path, check: PathCheck | None) -> Path:
    """The resolved path of a file or folder about to be read, once `check` allows it."""
    real = path.resolve()
    if check is not None:
        check(path.absolute(), real)
    return real


def within(folder: Path, what: str) -> PathCheck:
    """A check allowing only paths that resolve inside `folder` (`what` names it in the error)."""
    folder = folder.resolve()

    def check(given: Path, real: Path) -> None:
        if not real.is_relative_to(folder):
            raise ProjectionError(f"{given}: resolves to {real}, outside {what} ({folder})")
    return check


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    raw_key: str  # the key as stored in the file (before prefix stripping)
    offset: int = 0  # safetensors: absolute byte offset of the data in `file`

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    """A read-only, lazy view of one state dict."""

    source: str  # what the user gave
    format: str  # safetensors | sharded-safetensors | torch-pickle
    files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] = field(default_factory=dict)
    expert: str | None = None
    bytes_read: int = 0
    _handles: dict[Path, int] = field(default_factory=dict, repr=False)
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards the counter and handles

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            name = str(t.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + 1
        return counts

    def get(self, key: str) -> torch.Tensor:
        """One tensor. Safetensors: mapped from the file copy-on-write (the caller may modify it; the file never
        changes); torch pickles: a copy. Safe to call from several threads (the inspector's handlers)."""
        if key not in self.tensors:
            raise ProjectionError(f"{self.source}: no tensor named '{key}'")
        info = self.tensors[key]
        with self._lock:
            self.bytes_read += info.nbytes
        if self._pickled is not None:
            return self._pickled[info.raw_key].clone()
        return read_tensor(self._fd(info.file), info)

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._handles:
                try:
                    self._handles[file] = regular_fd(file)
                except OSError as exc:
                    raise ProjectionError(f"{file}: cannot open: {exc}") from exc
            return self._handles[file]

    def prefetch(self, keys: Iterable[str]) -> None:
        """Ask the OS to start reading these tensors in the background (safetensors; a no-op otherwise), so the
        disk works while the caller computes on the tensors before them."""
        if self._pickled is not None:
            return
        for key in keys:
            info = self.tensors.get(key)
            if info is not None and info.nbytes:
                os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)

    def iter_tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys if keys is not None else self.keys():
            yield key, self.get(key)

    def close(self) -> None:
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """One safetensors tensor, memory-mapped on its own.

    Each tensor gets its own private (copy-on-write) mapping, unmapped when the tensor is freed: the pages
    are the OS page cache's (no copy, no zero-fill; 8x faster than a read from a warm cache), and a
    tens-of-GB teacher is never resident beyond the tensors in use. A file truncated after opening is
    reported here rather than crashing on a fault."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    end = info.offset + info.nbytes
    if os.fstat(fd).st_size < end:
        raise ProjectionError(f"{info.file}: truncated while reading tensor '{info.raw_key}' "
                              f"(needs bytes up to {end}, the file has {os.fstat(fd).st_size})")
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    if (info.offset - start) % info.dtype.itemsize == 0:  # aligned for its dtype: map it
        try:
            mapped = mmap.mmap(fd, end - start, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=start)
            data = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.offset - start)
            return data.view(info.dtype).reshape(info.shape)
        except (OSError, ValueError):  # a file system without mmap: read instead
            pass
    out = torch.empty(info.nbytes, dtype=torch.uint8)  # no zero-fill: the read overwrites every byte
    if os.preadv(fd, [memoryview(out.numpy())], info.offset) != info.nbytes:
        raise ProjectionError(f"{info.file}: truncated while reading tensor '{info.raw_key}'")
    return out.view(info.dtype).reshape(info.shape)


# ---------------------------------------------------------------- safetensors headers

def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Parse and validate a safetensors header without touching tensor data; also where the data starts.

    As strict as safetensors' own loader, and bounded before work: a regular file only, a header of at most
    100 MB, integers of at most 20 digits, sizes torch can index (int64), a known dtype per tensor, and data
    offsets that tile the data section exactly (no overlap, no gap)."""
    with open_regular(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ProjectionError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        # The length is the file's first 8 bytes: say what is wrong with it, never its value (a file that is
        # not a checkpoint, e.g. /proc/self/environ, would show its first bytes as this number).
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            problem = ("0" if n == 0 else f"over the {MAX_HEADER_BYTES >> 20} MiB limit" if n > MAX_HEADER_BYTES
                       else "past the end of the file")
            raise ProjectionError(f"{path}: corrupt safetensors header (header length {problem}, file size {size})")
        raw = f.read(n)
    header = load_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise ProjectionError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ProjectionError(f"{path}: corrupt safetensors header: '__metadata__' must map names to strings")
    data_size = size - 8 - n
    for key, meta in header.items():
        name = clip(key)
        try:
            start, end = meta["data_offsets"]
            dtype = meta["dtype"]
            shape = meta["shape"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProjectionError(f"{path}: corrupt safetensors header entry '{name}'") from exc
        if not (isinstance(dtype, str) and isinstance(shape, list) and len(shape) <= MAX_RANK
                and all(map(_is_count, [start, end, *shape]))):
            raise ProjectionError(f"{path}: corrupt safetensors header entry '{name}': dtype {clip(repr(dtype))}, "
                                  f"shape {clip(repr(shape))}, data_offsets {clip(repr([start, end]))} (expected "
                                  f"non-negative integers below 2^63, at most {MAX_RANK} dimensions)")
        if dtype not in SAFETENSORS_DTYPES:
            raise ProjectionError(f"{path}: tensor '{name}' has unsupported dtype {clip(dtype)}")
        if end > data_size:
            raise ProjectionError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} but the data section has {data_size}")
        numel = _numel(shape)
        if numel is None:
            raise ProjectionError(f"{path}: corrupt header: tensor '{name}' has shape {clip(repr(shape))}: "
                                  f"its axes span more than 2^63 elements")
        expected = numel * SAFETENSORS_DTYPES[dtype].itemsize
        if expected > data_size:
            raise ProjectionError(f"{path}: corrupt header: tensor '{name}' of shape {clip(repr(shape))} and dtype "
                                  f"{dtype} needs {expected} bytes, more than the whole data section ({data_size})")
        if end - start != expected or start > end:
            raise ProjectionError(f"{path}: corrupt header: tensor '{name}' spans {end - start} bytes, "
                                  f"its shape {clip(repr(shape))} and dtype {dtype} need {expected}")
    _check_tiling(path, header, data_size)
    return header, 8 + n


def _is_count(x: Any) -> bool:
    return type(x) is int and 0 <= x <= INT64_MAX  # not bool, not float


def _numel(shape: list[int]) -> int | None:
    """Elements of a shape; None when torch cannot hold it (its strides would pass int64, even when empty)."""
    n = 1
    for s in shape:
        n *= max(s, 1)
        if n > INT64_MAX:
            return None
    return 0 if 0 in shape else n


def _check_tiling(path: Path, header: dict[str, dict[str, Any]], data_size: int) -> None:
    """Sorted by offset, the tensors cover the data section exactly, as safetensors requires."""
    at = 0
    for start, end, key in sorted((m["data_offsets"][0], m["data_offsets"][1], k) for k, m in header.items()):
        if start != at:
            problem = (f"overlaps the tensor before it (which ends at byte {at})" if start < at else
                       f"leaves bytes {at}..{start} unused")
            raise ProjectionError(f"{path}: corrupt header: tensor '{clip(key)}' starts at byte {start} and {problem}")
        at = end
    if at != data_size:
        raise ProjectionError(f"{path}: corrupt header: the tensors end at byte {at} but the data section has "
                              f"{data_size} bytes")


def _safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    header, start = read_safetensors_header(path)
    return {k: TensorInfo(tuple(m["shape"]), SAFETENSORS_DTYPES[m["dtype"]], path, k, start + m["data_offsets"][0])
            for k, m in header.items()}


def _shard(index: Path, name: str) -> Path:
    """A shard an index names: a relative .safetensors path inside the index's folder (the hub's loader refuses
    the same). Checked on the name, before any link is followed: a hub snapshot's shards are links to its blobs."""
    parts = PureWindowsPath(name)  # either separator: also refuses ..\x, C:x and \\server\x
    if parts.drive or parts.root or ".." in parts.parts or "\0" in name or not name.endswith(".safetensors"):
        raise ProjectionError(f"{index}: shard {clip(repr(name), 80)} is not a .safetensors file inside the index's folder "
                              f"(shards are relative paths without '..')")
    return index.parent / name


def _open_index(index: Path, check: PathCheck | None = None) -> tuple[list[Path], dict[str, TensorInfo]]:
    try:
        data = read_bytes(resolve_checked(index, check), "safetensors index", MAX_HEADER_BYTES)
        weight_map = load_json(data, f"{index}: not a valid safetensors index")["weight_map"]
    except (KeyError, TypeError) as exc:
        raise ProjectionError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from exc
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) for f in weight_map.values())):
        got = ("an empty mapping" if weight_map == {} else "a shard name that is not a string"
               if isinstance(weight_map, dict) else f"a JSON {JSON_TYPES.get(type(weight_map), 'value')}")
        raise ProjectionError(f"{index}: not a valid safetensors index: 'weight_map' must map each tensor name to "
                              f"its shard file, got {got}")
    files = sorted({_shard(index, f) for f in weight_map.values()})
    real = [resolve_checked(f, check) for f in files]
    missing = [f.relative_to(index.parent).as_posix() for f, r in zip(files, real) if not r.is_file()]
    if missing:
        raise ProjectionError(f"{index}: missing shard(s): {', '.join(missing)}")
    infos: dict[str, TensorInfo] = {}
    for f in real:
        infos.update(_safetensors_infos(f))
    absent = [k for k in weight_map if k not in infos]
    if absent:
        raise ProjectionError(f"{index}: {len(absent)} key(s) listed but not in their shard, e.g. {clip(repr(absent[0]), 80)}")
    return files, infos


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(32)
    if not (head.startswith(TORCH_ZIP) or (head[:1] == b"\x80" and TORCH_LEGACY in head)):
        # Not what torch.save writes: never unpickled, so no pickle error can quote its bytes.
        raise ProjectionError(f"{path}: cannot load torch file: not a plain torch.save of tensors (neither a torch "
                              f"zip archive nor a legacy torch file; nothing in it was executed)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met something it does not allow
        needs = re.search(r"GLOBAL (\S+)", str(exc))
        if needs is None:  # an opcode it does not support: garbage, or a plain (non-torch) pickle
            raise ProjectionError(f"{path}: cannot load torch file: not a plain torch.save of tensors (weights_only="
                                  f"True refused it; nothing in it was executed)") from exc
        raise ProjectionError(f"{path}: refused: this pickle needs code to load ({needs[1][:80]}); it was loaded with "
                              f"weights_only=True, so nothing in it was executed. Convert it to safetensors.") from exc
    except Exception as exc:  # not a torch file, truncated, corrupt
        first = (str(exc).splitlines() or [""])[0]
        raise ProjectionError(f"{path}: cannot load torch file: {type(exc).__name__}: {first}") from exc
    while isinstance(obj, dict):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ProjectionError(f"{path}: holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ProjectionError(f"{path}: holds no tensors")
    return tensors


def strip_prefix(keys: list[str]) -> str:
    """The known prefix shared by every key, or ''."""
    for prefix in KNOWN_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


# ---------------------------------------------------------------- folders and hub ids

def _read_config(folder: Path, check: PathCheck | None = None) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    config = read_json(resolve_checked(path, check), "config")
    if not isinstance(config, dict):
        raise ProjectionError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _expert_layout(is_dir: Callable[[str], bool]) -> tuple[str, dict[str, str]] | None:
    for layout, experts in EXPERT_FOLDERS.items():
        present = {e: sub for e, sub in experts.items() if is_dir(sub)}
        if present:
            return layout, present
    return None


def _choose_expert(where: str, layout: tuple[str, dict[str, str]] | None, expert: str | None,
                   has_weights: Callable[[], bool]) -> tuple[str | None, str | None]:
    """The sub-folder to descend into (None: stay) and the expert chosen, for a folder with this layout."""
    if layout is None:
        if expert is not None:
            kind = "a single-model checkpoint" if has_weights() else "no weights either"
            raise ProjectionError(f"{where}: no expert sub-folders here ({kind}), but expert '{expert}' was asked "
                                  "for; drop the expert")
        return None, None
    name, present = layout
    if expert is None:
        if len(present) == 1:
            return next(iter(present.values())), None
        raise ProjectionError(
            f"{where}: a two-expert checkpoint ({name}); choose an expert: "
            + ", ".join(f"'{e}' ({s}/)" for e, s in present.items()))
    if expert not in present:
        raise ProjectionError(
            f"{where}: no expert '{expert}'; choices: " + ", ".join(f"'{e}' ({s}/)" for e, s in present.items()))
    return present[expert], expert


def resolve_folder(folder: Path, expert: str | None) -> tuple[Path, str | None]:
    """Descend into the expert's sub-folder of a two-expert or pipeline root."""
    sub, chosen = _choose_expert(str(folder), _expert_layout(lambda s: (folder / s).is_dir()), expert,
                                 lambda: bool(list(folder.glob("*.safetensors*")) or _pickles(folder)))
    return (folder / sub if sub else folder), chosen


def _pickles(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def _format(path: Path) -> str:
    if path.name.endswith(".safetensors.index.json"):
        return "sharded-safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in PICKLE_SUFFIXES:
        return "torch-pickle"
    raise ProjectionError(f"{path}: unknown file type (expected .safetensors, an index json, "
                          f"or a torch file {'/'.join(PICKLE_SUFFIXES)})")


def _weights_file(folder: str, names: Iterable[str]) -> str:
    """Which of a folder's files (by name) holds its weights: its index, its one .safetensors or torch file."""
    names = sorted(names)
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise ProjectionError(f"{folder}: several index files ({', '.join(indexes)}); pass one")
    singles = [n for n in names if n.endswith(".safetensors")]
    if indexes or len(singles) == 1:
        return (indexes or singles)[0]
    if len(singles) > 1:
        raise ProjectionError(
            f"{folder}: {len(singles)} .safetensors files but no *.safetensors.index.json; pass one file")
    pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
    if len(pickles) == 1:
        return pickles[0]
    if len(pickles) > 1:
        raise ProjectionError(f"{folder}: {len(pickles)} torch files ({', '.join(pickles)}); pass one")
    raise ProjectionError(
        f"{folder}: unknown layout: no *.safetensors, *.safetensors.index.json, single torch file, "
        f"or expert sub-folders ({', '.join(s for e in EXPERT_FOLDERS.values() for s in e.values())})")


def _open_weights(path: Path, check: PathCheck | None) -> tuple[str, list[Path], dict[str, TensorInfo] | Path]:
    """Format, files as named, and tensors (a torch file: its resolved path, to unpickle) of one weights file."""
    fmt = _format(path)
    if fmt == "sharded-safetensors":
        return fmt, *_open_index(path, check)
    real = resolve_checked(path, check)
    return fmt, [path], _safetensors_infos(real) if fmt == "safetensors" else real


HUB_ID = re.compile(r"^(?:hf://)?(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<rev>[\w.\-]+))?(?::(?P<sub>[\w.\-/]+))?$")


def parse_hub_id(source: str) -> tuple[str, str | None, str | None] | None:
    """'org/name[@revision][:subfolder]' (optionally 'hf://'-prefixed) -> parts, or None."""
    m = HUB_ID.match(source)
    return (m["repo"], m["rev"], m["sub"]) if m else None


def hub_source(source: str | os.PathLike, base: Path | None = None) -> tuple[str, str | None, str | None] | None:
    """The parts of a hub id, for a source that reads as one and is not a local path; else None. A path is local
    when it exists, starts with '.', '/' or '~', or its first folder exists (relative to `base`, default the
    working directory): `demo/does-not-exist` is a missing file, not a hub lookup."""
    text = str(source)
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if text.startswith((".", "/", "~")) or path.exists() or (len(Path(text).parts) > 1 and
                                                              (path.parents[len(Path(text).parts) - 2]).is_dir()):
        return None
    return parse_hub_id(text)


def _hub_prefix(name: str, subfolder: str | None) -> str:
    """'sub/folder/' (or '') inside the repository; a subfolder that would leave it is refused."""
    if not subfolder:
        return ""
    if ".." in Path(subfolder).parts:
        raise ProjectionError(f"{name}: subfolder '{subfolder}' leaves the repository ('..' is not allowed)")
    return f"{subfolder.strip('/')}/"


def _hub_files(name: str, sizes: dict[str, int], subfolder: str | None, expert: str | None) -> list[str]:
    """From the repository's file list, the files opening this source reads: the JSON files of its folder (the
    expert's, in a two-expert root) and its weights (for an index, every .safetensors file beside it)."""
    def files_in(prefix: str) -> list[str]:
        return [f[len(prefix):] for f in sizes if f.startswith(prefix) and "/" not in f[len(prefix):]]

    prefix = _hub_prefix(name, subfolder)
    if prefix and not any(f.startswith(prefix) for f in sizes):
        raise ProjectionError(f"{name}: no folder '{subfolder}' in the repository")
    here = files_in(prefix)
    sub, _ = _choose_expert(name, _expert_layout(lambda s: any(f.startswith(f"{prefix}{s}/") for f in sizes)),
                            expert, lambda: any(".safetensors" in n or Path(n).suffix in PICKLE_SUFFIXES for n in here))
    if sub:
        prefix, here = f"{prefix}{sub}/", files_in(f"{prefix}{sub}/")
    weights = _weights_file(f"{name} ({prefix or 'the repository root'})", here)
    shards = [n for n in here if n.endswith(".safetensors")] if weights.endswith(".index.json") else []
    return sorted({prefix + n for n in [weights, *shards, *(n for n in here if n.endswith(".json"))]})


def _hub_listing(repo: str, revision: str | None) -> tuple[str, dict[str, int]]:
    """The commit a revision names and the size of every file in it, from the hub's metadata (nothing is
    downloaded)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    return info.sha, {s.rfilename: s.size or 0 for s in info.siblings or []}


def _hub_fetch(repo: str, revision: str | None, files: list[str]) -> Path:
    """Download exactly these repository files (cached ones are not fetched again); the snapshot folder."""
    from huggingface_hub import snapshot_download

    literal = [re.sub(r"([*?\[])", r"[\1]", f) for f in files]  # fnmatch patterns that match only these names
    return Path(snapshot_download(repo, revision=revision, allow_patterns=literal))


@dataclass(frozen=True)
class HubDownload:
    """What opening a hub id would download: the files it needs that the local cache lacks, sized by the hub."""

    source: str
    commit: str
    files: tuple[tuple[str, int], ...]  # (repository path, bytes)

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.files)


def hub_download(source: str, expert: str | None = None) -> HubDownload | None:
    """What opening `source` would download, from the hub's file list (one metadata request). None for a local
    source, and in offline mode (HF_HUB_OFFLINE=1), where nothing downloads; no files when all are cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    hub = hub_source(source)
    if hub is None or constants.is_offline_mode():
        return None
    repo, revision, subfolder = hub
    _hub_prefix(source, subfolder)
    try:
        commit, sizes = _hub_listing(repo, revision)
    except Exception as exc:
        raise ProjectionError(f"{source}: cannot list the repository on the hub: {type(exc).__name__}: {exc}") from exc
    needed = _hub_files(source, sizes, subfolder, expert)
    missing = tuple((f, sizes[f]) for f in needed
                    if not isinstance(try_to_load_from_cache(repo, f, revision=commit), str))
    return HubDownload(source, commit, missing)


def fetch_from_hub(repo: str, revision: str | None, subfolder: str | None, expert: str | None) -> tuple[Path, Path]:
    """Find in the local cache (HF_HUB_OFFLINE=1) or download only the files this source needs.

    Returns the local folder of the source (the snapshot, or its subfolder; the caller descends into the
    expert) and the repository's cache folder, inside which every file it opens must resolve."""
    from huggingface_hub import constants, snapshot_download

    name = repo + (f"@{revision}" if revision else "") + (f":{subfolder}" if subfolder else "")
    prefix = _hub_prefix(name, subfolder)
    try:
        if constants.is_offline_mode():
            root = Path(snapshot_download(repo, revision=revision))  # the cached snapshot; nothing downloads
        else:
            _, sizes = _hub_listing(repo, revision)
            root = _hub_fetch(repo, revision, _hub_files(name, sizes, subfolder, expert))
    except ProjectionError:
        raise
    except Exception as exc:
        hint = " (offline: is it in the local Hugging Face cache?)" if constants.is_offline_mode() else ""
        raise ProjectionError(f"{name}: no such local file or folder, and cannot resolve it as a hub id{hint}: "
                              f"{type(exc).__name__}: {exc}") from exc
    folder = root / prefix
    if not folder.resolve().is_relative_to(root.resolve()):
        raise ProjectionError(f"{name}: subfolder '{subfolder}' resolves outside the repository's snapshot {root}")
    if not folder.is_dir():
        raise ProjectionError(f"{name}: no folder '{subfolder}' in the repository ({root})")
    return folder, root.parent.parent


# ---------------------------------------------------------------- entry point

def open_checkpoint(source: str | os.PathLike, expert: str | None = None, check: PathCheck | None = None) -> Checkpoint:
    """Open any supported checkpoint source lazily. Raises ProjectionError naming the file at fault.

    `check` sees every folder and file a local source leads to (the source, the expert's folder, the weights,
    each shard, the index, config.json), resolved, before it is read; a hub id's files must resolve inside the
    repository's cache folder instead."""
    text = str(source)
    path = Path(text).expanduser()
    hub = hub_source(text)
    if hub is not None:
        path, cache = fetch_from_hub(*hub, expert=expert)
        check = within(cache, "the repository's Hugging Face cache folder")
    elif not path.exists():
        why = (f"{Path(text).parts[0]}/ is a local folder: not looked up on the hub" if parse_hub_id(text)
               else "and not a hub id 'org/name'")
        raise ProjectionError(f"{text}: no such file or folder ({why})")
    resolve_checked(path, check)
    chosen = None
    if path.is_dir():
        path, chosen = resolve_folder(path, expert)
        folder = resolve_checked(path, check)
        fmt, files, infos = _open_weights(path / _weights_file(str(path), (p.name for p in folder.iterdir()
                                                                             if p.is_file())), check)
    else:
        if expert is not None:
            raise ProjectionError(f"{text}: a single checkpoint file has no experts, but expert '{expert}' was asked "
                                  "for; drop the expert")
        require_regular(path, "checkpoint")  # a FIFO or a device would block or never end
        fmt, files, infos = _open_weights(path, check)
    config = _read_config(path if path.is_dir() else path.parent, check)
    pickled = None
    if isinstance(infos, Path):
        pickled = _load_pickle(infos)
        infos = {k: TensorInfo(tuple(v.shape), v.dtype, files[0], k) for k, v in pickled.items()}
    prefix = strip_prefix(list(infos))
    tensors = {k[len(prefix):]: v for k, v in infos.items()}
    return Checkpoint(text, fmt, files, tensors, config, chosen, _pickled=pickled)
