"""Write a projected student: weights and config.json in its layout (`arch.layout`: what diffusers, Wan's code or
this tool loads), strategy.yaml, projection_report.json and a model card (README.md).

Everything goes to a hidden sibling folder (`.OUT.partial-XXXXXXXX`, marked as this tool's and its process')
and is swapped into place only when complete. An existing folder is refused unless forced, and forcing replaces
only a previous export that holds nothing else and no input of the run; nothing is ever written inside the
teacher's folders. A failed or terminated export leaves nothing behind (the CLI turns SIGTERM into an exception),
and the partial folders of killed processes are removed by the next export into the same parent folder.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..arch.layout import LAYOUTS, own_config
from ..core.project import pick_device
from ..core.strategy import Strategy
from ..errors import ProjectionError
from ..io.writer import (MAX_SHARD_BYTES, WeightsWriter, check_destination, check_folder_name, check_replaceable,
                         exchange, missing_folders, remove_empty, remove_partial, remove_stale_partials, write_failure,
                         write_file, write_marker)
from .build import initial_values, projected_student
from .card import model_card
from .projector import Progress, Projector, entry_rows, numbers_only

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def run_inputs(projector: Projector, extra: Iterable[str | Path] = ()) -> set[Path]:
    """Every file or folder this run reads, resolved: teacher and student (as named and their files) and `extra`
    (strategy, rules)."""
    named = [projector.teacher.source, projector.student.source, *extra]
    files = [f for view in (projector.teacher, projector.student) if view.checkpoint for f in view.checkpoint.files]
    return {Path(p).expanduser().resolve() for p in [*named, *files] if Path(p).expanduser().exists()}


RECORDS = ("layout", "head_dim", "dtype")  # the project's records: its report and the weights' metadata hold them


def config_json(projector: Projector, strategy: Strategy | None = None) -> dict[str, Any]:
    """The export's config.json: only the keys its layout's loader takes (an unknown key is an argument diffusers
    and Wan's code refuse). A student checkpoint's own config.json keeps its other fields."""
    strategy = strategy or projector.strategy
    student, config = projector.student, projector.student_config(strategy)
    own = dict(student.checkpoint.config) if student.checkpoint is not None else {}
    written = LAYOUTS[config.layout].config(config) if config.layout in LAYOUTS else own_config(config)
    return {**{k: v for k, v in own.items() if k not in RECORDS}, **written}


def _version() -> str:
    try:
        return metadata.version("projection-inspector")
    except metadata.PackageNotFoundError:
        return "unknown"


def finite(data: Any) -> Any:
    """JSON data with every NaN or infinity as null: a report never holds bare NaN (invalid JSON)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def report_json(data: Any) -> str:
    return json.dumps(finite(data), indent=1, default=str, allow_nan=False)


def export_student(projector: Projector, out: str | Path, force: bool = False, progress: Progress | None = None,
                   max_shard_bytes: int = MAX_SHARD_BYTES, inputs: Iterable[str | Path] = (),
                   measure: Callable[[Path], dict[str, Any]] | None = None,
                   strategy: Strategy | None = None) -> dict[str, Any]:
    """Project every entry under `strategy` (the projector's default if None) by streaming and write the student
    folder. Returns the report.

    inputs: files this run read besides the teacher and student (strategy, rules), which --force never replaces.
    measure: called with the written (not yet published) student folder; what it returns is the report's
    `function` (e.g. `report.student_fidelity` on a calibration set)."""
    out = Path(out).expanduser()
    teacher = projector.teacher
    strategy = strategy or projector.strategy
    mapping = projector.mapping(strategy)
    check_folder_name(out)
    keys = mapping.coverage()["keys"]
    if keys["transferred"] == 0:  # before anything is written
        raise ProjectionError(f"{projector.student.source}: nothing to export: none of the student's "
                              f"{keys['total']} keys maps to a teacher key (add rules; `projection map` shows why)")
    check_destination(out, protected_folders(projector), force)
    if force and (out.exists() or out.is_symlink()):
        check_replaceable(out, run_inputs(projector, inputs))
    remove_stale_partials(out.parent)
    created = missing_folders(out.parent)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staged = tmp / out.name  # the export; tmp also holds the marker, then the replaced export until deleted
    try:  # fail before the long part if the destination cannot be written
        tmp.mkdir(parents=True)
        write_marker(tmp)
        staged.mkdir()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise ProjectionError(f"{out}: cannot create the output folder: {exc}") from exc
    started = time.time()
    dtype = DTYPES[strategy.dtype]
    student = projector.student
    shapes = {student.native.get(k, k): shape for k, shape in student.shapes.items()}
    need = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
    try:
        skipped = {student.native.get(e.student_key, e.student_key)
                   for e in mapping.entries if e.status == "skipped"}
        bytes_before = teacher.checkpoint.bytes_read if teacher.checkpoint else 0
        results = []
        layout = projector.student_config(strategy).layout
        stem = LAYOUTS[layout].stem if layout in LAYOUTS else "model"
        metadata = {"layout": str(layout), "teacher_fingerprint": projector.fingerprint}  # no paths: stable bytes
        # fitted on the strategy's device (float64 least squares there), in memory
        fitted = (projected_student(projector, pick_device(strategy.device), strategy=strategy).state_dict()
                  if strategy.refits else {})
        with WeightsWriter(staged, shapes, dtype, max_shard_bytes, stem, metadata) as writer:
            for key, t in initial_values(projector, skipped, strategy.seed).items():
                writer.write(key, t)
            # fitted: the projection already ran (its numbers are cached), so only the numbers are asked for
            for r in projector.stream(strategy, progress=progress, tensors="numbers" if fitted else "yield"):
                if r.tensor is not None:
                    key = r.entry.student_key  # a fitted Conv2d patch is stored as its layout's Conv3d
                    t = fitted[key].reshape(student.shapes[key]) if fitted else r.tensor
                    writer.write(student.native.get(key, key), t)
                results.append(numbers_only(r))
        if writer.missing:
            raise RuntimeError(f"export wrote no value for {sorted(writer.missing)[:3]}")
        files = writer.names
        config = config_json(projector, strategy)
        write_file(staged / "config.json", json.dumps(config, indent=1))
        write_file(staged / "strategy.yaml", strategy.to_yaml())
        report = {
            **projector.summary(results, strategy),
            "entries": entry_rows(mapping, results),
            "unused_teacher_keys": mapping.unused_teacher_keys(),
            "provenance": {
                "teacher": teacher.source, "teacher_fingerprint": projector.fingerprint,
                "teacher_files": [{"path": str(f), "bytes": f.stat().st_size}
                                  for f in (teacher.checkpoint.files if teacher.checkpoint else [])],
                "student": projector.student.source, "rules": projector.rules,
                "projection_inspector": _version(), "torch": torch.__version__,
                "device": str(pick_device(strategy.device)), "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                "seconds": round(time.time() - started, 3),
                "teacher_bytes_read": (teacher.checkpoint.bytes_read - bytes_before) if teacher.checkpoint else 0,
                "layout": layout, "dtype": strategy.dtype, "weights": files, "weights_index": writer.index,
            },
        }
        if measure is not None:
            report = {"function": measure(staged), **report}  # what the student computes leads the report
        write_file(staged / "projection_report.json", report_json(report))
        write_file(staged / "README.md", model_card(report, config, strategy.to_yaml(), str(out)))
        # forced: swap in one step where the system can (the replaced export lands in tmp); otherwise move the old
        # one into tmp first. Either way it is deleted only once the new one is in place.
        if not (out.exists() and exchange(staged, out)):
            replaced = tmp / ".replaced"
            if out.exists():
                out.rename(replaced)
            try:
                staged.rename(out)
            except OSError:
                if replaced.exists():
                    replaced.rename(out)
                raise
    except BaseException as exc:
        remove_partial(tmp)
        remove_empty(created)
        failure = write_failure(exc, staged, out, need) if isinstance(exc, OSError) else None
        if failure is not None:
            raise failure from exc
        raise
    remove_partial(tmp)
    return report
