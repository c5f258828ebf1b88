"""Write a projected student: weights, config.json, strategy.yaml and projection_report.json.

Everything goes to a temporary sibling folder that is renamed into place only when complete; an existing
folder is refused unless forced, and nothing is ever written inside the teacher's folders.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import struct
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .errors import ProjectionError
from .pipeline import Progress, Projector, entry_rows, numbers_only
from .student import build_student, fresh_value

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 5 * 1024**3


def protected_folders(projector: Projector) -> set[Path]:
    """The teacher's folders: the one the user named (a two-expert or pipeline root too) and those holding
    its files, both as given (a hub snapshot) and with links resolved (the hub's blob store)."""
    teacher = projector.teacher
    folders = set()
    given = Path(teacher.source).expanduser()
    if given.exists():
        folders.add((given if given.is_dir() else given.parent).resolve())
    for f in teacher.checkpoint.files if teacher.checkpoint else []:
        folders |= {f.absolute().parent, f.resolve().parent}
    return folders


def check_destination(out: Path, protected: set[Path], force: bool) -> None:
    out = out.resolve()
    for folder in protected:
        if out == folder or folder in out.parents or out in folder.parents:
            raise ProjectionError(f"{out}: refusing to write into or over the teacher's folder {folder}")
    if out.exists() and not out.is_dir():
        raise ProjectionError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        raise ProjectionError(f"{out}: already exists; choose another folder or pass --force to replace it")


def initial_values(projector: Projector, keys: set[str]) -> dict[str, torch.Tensor]:
    """Starting values of the student keys nothing transfers to: its checkpoint's, or a seeded fresh init.

    Each fresh tensor is drawn from its own generator, seeded from the strategy's seed and the key (never the
    global RNG), so the values do not depend on threads, order or anything else running in the process."""
    student = projector.student
    if student.checkpoint is not None:
        return {c: student.read(c) for c in keys}
    model = build_student(student.config, "meta") if keys else None
    return {k: fresh_value(model, k, projector.strategy.seed) for k in keys}


SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class WeightsWriter:
    """Writes safetensors files tensor by tensor, in any order: headers first (shapes are known up front),
    each tensor at its offset as it arrives, so the student is never held whole in memory."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        size = {k: math.prod(shape) * dtype.itemsize for k, shape in shapes.items()}
        shards: list[list[str]] = [[]]
        used = 0
        for key in shapes:  # never split a tensor; start a new shard past the limit
            if shards[-1] and used + size[key] > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(key)
            used += size[key]
        self.names = (["model.safetensors"] if len(shards) == 1 else
                      [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        self.dtype, self.total = dtype, sum(size.values())
        self.where: dict[str, tuple[Path, int]] = {}
        self.fds: dict[Path, int] = {}
        for name, keys in zip(self.names, shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for k in keys:
                header[k] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shapes[k]),
                             "data_offsets": [offset, offset + size[k]]}
                offset += size[k]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = folder / name
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
            self.where.update({k: (path, 8 + len(raw) + header[k]["data_offsets"][0]) for k in keys})
            self.fds[path] = os.open(path, os.O_WRONLY)
            try:  # reserve the blocks up front: writing into them later is 2-3x cheaper than growing the file
                os.posix_fallocate(self.fds[path], 0, 8 + len(raw) + offset)
            except OSError:  # a file system without fallocate: grow the file instead
                os.ftruncate(self.fds[path], 8 + len(raw) + offset)
        if len(self.names) > 1:
            weight_map = {k: path.name for k, (path, _) in self.where.items()}
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=1))
        self.missing = set(shapes)

    def write(self, key: str, t: torch.Tensor) -> None:
        path, offset = self.where[key]
        data = memoryview(t.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy())
        done = 0
        while done < len(data):  # pwrite may write less than asked
            done += os.pwrite(self.fds[path], data[done:], offset + done)
        self.missing.discard(key)

    def __enter__(self) -> WeightsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _version() -> str:
    try:
        return metadata.version("projection-inspector")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_student(projector: Projector, out: str | Path, force: bool = False, progress: Progress | None = None,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """Project every entry by streaming and write the student folder. Returns the report."""
    out = Path(out).expanduser()
    teacher = projector.teacher
    check_destination(out, protected_folders(projector), force)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:  # fail before the long part if the destination cannot be written
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise ProjectionError(f"{out}: cannot create the output folder: {exc}") from exc
    started = time.time()
    strategy = projector.strategy
    dtype = DTYPES[strategy.dtype]
    try:
        student = projector.student
        skipped = {student.native.get(e.student_key, e.student_key)
                   for e in projector.mapping.entries if e.status == "skipped"}
        bytes_before = teacher.checkpoint.bytes_read if teacher.checkpoint else 0
        results = []
        with WeightsWriter(tmp, {student.native.get(k, k): shape for k, shape in student.shapes.items()},
                           dtype, max_shard_bytes) as writer:
            for key, t in initial_values(projector, skipped).items():
                writer.write(key, t)
            for r in projector.stream(progress=progress, tensors="yield"):
                if r.tensor is not None:
                    writer.write(student.native.get(r.entry.student_key, r.entry.student_key), r.tensor)
                results.append(numbers_only(r))
        if writer.missing:
            raise RuntimeError(f"export wrote no value for {sorted(writer.missing)[:3]}")
        files = writer.names
        config = {**projector.student.config, "layout": projector.student.layout, "dtype": strategy.dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "strategy.yaml").write_text(strategy.to_yaml())
        report = {
            **projector.summary(results),
            "entries": entry_rows(projector.mapping, results),
            "unused_teacher_keys": projector.mapping.unused_teacher_keys(),
            "provenance": {
                "teacher": teacher.source,
                "teacher_files": [{"path": str(f), "bytes": f.stat().st_size}
                                  for f in (teacher.checkpoint.files if teacher.checkpoint else [])],
                "student": projector.student.source, "rules": projector.rules,
                "projection_inspector": _version(), "torch": torch.__version__,
                "device": str(projector.device), "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                "seconds": round(time.time() - started, 3),
                "teacher_bytes_read": (teacher.checkpoint.bytes_read - bytes_before) if teacher.checkpoint else 0,
                "weights": files,
            },
        }
        (tmp / "projection_report.json").write_text(json.dumps(report, indent=1, default=str))
        if out.exists():  # forced: swap, then delete the old folder only once the new one is in place
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
