"""Atomic export folders, whatever is written into them.

An export is written into a hidden sibling folder (`.OUT.partial-XXXXXXXX`) marked as this tool's and its
process', and swapped into place only when complete (`exchange`: in one step where the system can). Partial
folders whose process is gone are removed (`remove_stale_partials`); `--force` replaces only a previous export
that holds nothing else and no input of the run (`check_replaceable`); names with control characters are refused.
Weights are written tensor by tensor at their offsets (`WeightsWriter`, sharded), never held whole in memory.
"""
from __future__ import annotations

import ctypes
import datetime as dt
import errno
import json
import math
import os
import re
import shutil
import socket
import struct
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from ..errors import ProjectionError

MAX_SHARD_BYTES = 5 * 1024**3
TOOL = "projection-inspector"
MARKER = ".projection-partial.json"  # inside every partial folder: this tool made it, and which process owns it
PARTIAL_NAME = re.compile(r"\..+\.partial-[0-9a-f]{8}")
REPORT_MAX_BYTES = 64 << 20  # a previous export's report is read to recognise it; real ones are a few MB at most
BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_folder_name(out: Path) -> None:
    """Refuse control characters (a newline, escape codes, bidi overrides) in the folders an export creates:
    they hide in listings, break scripts that read one path per line, and can make a terminal show another name."""
    for part in (out, *out.parents):
        if part.exists():
            break
        bad = [c for c in part.name if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS]
        if bad:
            raise ProjectionError(f"export folder {str(out)!r}: control character U+{ord(bad[0]):04X} in the "
                                  f"name {part.name!r}; choose a name without control characters")


def previous_export_files(folder: Path) -> set[str] | None:
    """The names of the files a previous export wrote in `folder`, from its projection_report.json; None when no
    report this tool wrote is there."""
    report = folder / "projection_report.json"
    try:
        if report.is_symlink() or not report.is_file() or report.stat().st_size > REPORT_MAX_BYTES:
            return None
        data = json.loads(report.read_bytes())
    except (OSError, ValueError):
        return None
    provenance = data.get("provenance") if isinstance(data, dict) else None
    ours = isinstance(provenance, dict) and "projection_inspector" in provenance
    weights = provenance.get("weights") if ours else None
    if not isinstance(weights, list) or not all(isinstance(w, str) and w == Path(w).name for w in weights):
        return None
    index = provenance.get("weights_index")
    index = [index] if isinstance(index, str) and index == Path(index).name else []
    return {"config.json", "strategy.yaml", "README.md", report.name, *weights, *index}


def check_replaceable(out: Path, inputs: set[Path]) -> None:
    """--force replaces a previous export only: never a folder that is, holds or lies inside an input of this run,
    one this tool did not write, or one holding files besides the export's."""
    if out.is_symlink():
        raise ProjectionError(f"{out}: is a symbolic link; --force replaces only a previous export's folder")
    real = out.resolve()
    for p in sorted(inputs):
        relation = "is" if p == real else "holds" if real in p.parents else "is inside" if p in real.parents else ""
        if relation:
            raise ProjectionError(f"{out}: {relation} {p}, an input of this export; refusing to replace it")
    files = previous_export_files(real)
    if files is None:
        raise ProjectionError(f"{out}: not a previous export (no projection_report.json written by {TOOL}); "
                              f"--force replaces only a previous export: choose another folder")
    extra = sorted(p.name for p in real.iterdir() if p.name not in files or p.is_symlink() or not p.is_file())
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise ProjectionError(f"{out}: holds {', '.join(extra[:3])}{more} besides a previous export; --force "
                              f"would delete them: move them or choose another folder")


def check_destination(out: Path, protected: set[Path], force: bool) -> None:
    out = out.resolve()
    for folder in protected:
        if out == folder or folder in out.parents or out in folder.parents:
            raise ProjectionError(f"{out}: refusing to write into or over the teacher's folder {folder}")
    if out.exists() and not out.is_dir():
        raise ProjectionError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        raise ProjectionError(f"{out}: already exists; choose another folder or pass --force to replace it")


SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """OSErrors raised inside name `path` (os.pwrite's and a buffered write's leave it out), so that a full disk
    can be reported as the file it stopped."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def write_file(path: Path, data: str | bytes) -> None:
    with naming(path), open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_failure(exc: OSError, staged: Path, out: Path, need: int) -> ProjectionError | None:
    """A failed write inside the staged export as one line naming the file in the destination (the staged copy is
    gone by then); None for any other error (e.g. reading the teacher)."""
    written = Path(exc.filename) if exc.filename else None
    if written is None or not (written == staged or staged in written.parents):
        return None
    shown = out / written.relative_to(staged)
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(next(p for p in out.parents if p.exists())).free
            reason += f": the weights need {_size(need)}, {_size(free)} is free there"
        except OSError:
            pass
    elif exc.errno == errno.EFBIG:
        reason += " for that file system (FAT32, for one, stops at 4 GiB per file)"
    return ProjectionError(f"{shown}: cannot write the export: {reason}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------ partial folders


def _process_identity(pid: int) -> str | None:
    """This boot's id and the process' start time: one process on this machine, unlike a pid, which is reused."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}/{stat.rpartition(')')[2].split()[19]}"  # field 22, starttime


def write_marker(folder: Path) -> None:
    """Mark `folder` as this tool's partial export, owned by this process."""
    owner = {"tool": TOOL, "host": socket.gethostname(), "pid": os.getpid(),
             "process": _process_identity(os.getpid()), "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    write_file(folder / MARKER, json.dumps(owner))


def read_marker(folder: Path) -> dict[str, Any] | None:
    marker = folder / MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
            return None
        owner = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    valid = (isinstance(owner, dict) and owner.get("tool") == TOOL and isinstance(owner.get("host"), str)
             and type(owner.get("pid")) is int and owner["pid"] > 0)
    return owner if valid else None


def owner_alive(owner: dict[str, Any]) -> bool:
    if owner["host"] != socket.gethostname():
        return True  # another machine's export (a shared disk): its processes cannot be seen from here
    if owner.get("process"):
        return _process_identity(owner["pid"]) == owner["process"]
    try:  # no /proc: the pid alone
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_partial(folder: Path) -> bool:
    """Delete a partial folder, its marker last: an interrupted deletion leaves a folder still recognised.
    Best effort (what cannot be deleted now, the next export into that folder retries); True when it is gone."""
    try:
        for child in folder.iterdir():
            if child.name != MARKER:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        shutil.rmtree(folder)
    except OSError:
        return False
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the partial folders that exports killed in `parent` left (kill -9, power loss): only folders this
    tool marked, whose process is gone. A hidden folder without the marker is not ours and is kept."""
    try:
        candidates = [p for p in parent.iterdir() if PARTIAL_NAME.fullmatch(p.name)]
    except OSError:  # no parent yet
        return []
    removed = []
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir():
            continue
        owner = read_marker(folder)
        if owner is not None and not owner_alive(owner) and remove_partial(folder):
            removed.append(folder)
    return removed


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.insert(0, folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Undo creating `folders` (outermost first), keeping any that something else has written into meanwhile."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): a reader sees the old or the new, never
    neither. False where the system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


class WeightsWriter:
    """Writes safetensors files tensor by tensor, in any order: headers first (shapes are known up front),
    each tensor at its offset as it arrives, so the student is never held whole in memory. Shards and their names
    are huggingface_hub's plan (`{stem}-00001-of-0000N.safetensors` and `{stem}.safetensors.index.json`, as
    diffusers and transformers name them); `metadata` goes into every header's `__metadata__`."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 max_shard_bytes: int = MAX_SHARD_BYTES, stem: str = "model", metadata: dict[str, str] | None = None):
        size = {k: math.prod(shape) * dtype.itemsize for k, shape in shapes.items()}
        plan = split_torch_state_dict_into_shards(  # on meta tensors: a plan, no memory
            {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in shapes.items()},
            filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_shard_bytes)
        self.names = list(plan.filename_to_tensors)
        self.index = f"{stem}.safetensors.index.json" if plan.is_sharded else None
        self.dtype, self.total, self.shapes = dtype, sum(size.values()), {k: tuple(s) for k, s in shapes.items()}
        self.where: dict[str, tuple[Path, int]] = {}
        self.fds: dict[Path, int] = {}
        for name, keys in plan.filename_to_tensors.items():
            header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for k in keys:
                header[k] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shapes[k]),
                             "data_offsets": [offset, offset + size[k]]}
                offset += size[k]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = folder / name
            write_file(path, struct.pack("<Q", len(raw)) + raw)
            self.where.update({k: (path, 8 + len(raw) + header[k]["data_offsets"][0]) for k in keys})
            self.fds[path] = os.open(path, os.O_WRONLY)
            with naming(path):
                try:  # reserve the blocks up front: writing into them later is 2-3x cheaper than growing the file;
                    # a full disk or a file size limit (FAT32's 4 GiB) fails here, before the long part
                    os.posix_fallocate(self.fds[path], 0, 8 + len(raw) + offset)
                except OSError as exc:  # a file system without fallocate: grow the file instead
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    os.ftruncate(self.fds[path], 8 + len(raw) + offset)
        if len(self.names) > 1:
            weight_map = {k: path.name for k, (path, _) in self.where.items()}
            write_file(folder / self.index,
                       json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=1))
        self.missing = set(shapes)

    def write(self, key: str, t: torch.Tensor) -> None:
        path, offset = self.where[key]
        if tuple(t.shape) != self.shapes[key]:  # the bytes would fit another shape's header and load wrong
            raise RuntimeError(f"'{key}' is {list(t.shape)}; its header says {list(self.shapes[key])}")
        data = memoryview(t.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy())
        done = 0
        with naming(path):
            while done < len(data):  # pwrite may write less than asked
                done += os.pwrite(self.fds[path], data[done:], offset + done)
        self.missing.discard(key)

    def __enter__(self) -> WeightsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
