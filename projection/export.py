"""Write a projected student: weights, config.json, strategy.yaml and projection_report.json.

Everything goes to a temporary sibling folder that is renamed into place only when complete; an existing
folder is refused unless forced, and nothing is ever written inside the teacher's folders.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import time
import uuid
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import ProjectionError
from .pipeline import Progress, Projector, entry_rows
from .student import build_student

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


def initial_state(projector: Projector) -> dict[str, torch.Tensor]:
    """The student's starting values (kept for skipped entries): its checkpoint, or a seeded fresh init."""
    student = projector.student
    if student.checkpoint is not None:
        return {c: student.read(c).clone() for c in student.shapes}
    torch.manual_seed(projector.strategy.seed)
    return dict(build_student(student.config).state_dict())


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or shards with model.safetensors.index.json past the size limit."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


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
        state = {k: v.to(dtype) for k, v in initial_state(projector).items()}
        bytes_before = teacher.checkpoint.bytes_read if teacher.checkpoint else 0
        results = []
        for r in projector.stream(progress=progress, keep_tensors=False):
            if r.tensor is not None:
                state[projector.student.native.get(r.entry.student_key, r.entry.student_key)] = r.tensor.to(dtype)
            results.append(replace(r, tensor=r.tensor.new_empty(0)) if r.tensor is not None else r)  # numbers only
        files = save_weights(state, tmp, max_shard_bytes)
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
