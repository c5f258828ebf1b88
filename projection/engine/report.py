"""The function report: what the student computes next to the teacher, on one calibration set, in one place
(the app's Function view and `projection fidelity` show it).

  fidelity      the velocity error and cosine per noise band and overall, per student block, for the student and
                two references of its shape (random init, svd-per-matrix)   (`student_fidelity`)
  teacher       per teacher block: influence 1 - cos(h_in, h_out) and the exact effect of removing it alone
                (`activations`), and which student blocks it feeds
  agreement     per space, how far weight-ranked and activation-ranked index sets agree (`plan.overlap`)
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors, save as save_safetensors
from torch import nn

from ..arch.anatomy import SPACES
from ..arch.config import ModelConfig
from ..arch.wan import WanLite
from ..cache import SHARED_GALLERY, Lru
from ..core.project import pick_device
from ..core.strategy import Strategy
from ..function.activations import (cache_key, ranking_agreement, removal_entry, statistics_entry)
from ..function import budget
from ..function.calibration import Calibration
from ..function.fidelity import (Reference, StudentWalk, block_fidelity, block_streams, check_request, compare,
                                keeps_blocks, teacher_reference)
from ..function.forward import StreamedTeacher
from ..function.noise import noised_set
from ..function.survey import survey
from .build import projected_student, random_student
from .keys import ReferenceKey
from ..io.diskcache import cached, checked_tensors
from .projector import Projector

Progress = Callable[[int, int, str], None]
REMOVAL_DRAWS = 1  # noise draws per latent behind the removal effects (L(L+1)/2 block evaluations)
REFERENCE_VERSION = 1  # of the on-disk teacher outputs (`stored_reference`): a new one ignores older entries


def reference_key(projector: Projector, calibration: Calibration, draws: int = 2, seed: int = 0) -> ReferenceKey:
    """What decides the teacher's outputs on `calibration`: the teacher, the set's digest, the noise draws and seed,
    and the band of levels its expert serves."""
    return ReferenceKey(projector.fingerprint, calibration.digest, draws, seed, projector.band)


def shared_reference(projector: Projector, calibration: Calibration, draws: int = 2, seed: int = 0,
                     device: str | torch.device = "cpu", references: Lru | None = None,
                     cache: Path | None = None) -> Reference:
    """The teacher's outputs on `calibration` (velocities, and block outputs where they fit): from `references`
    (keyed by `reference_key`) when some view computed them already, else from the entry under the `cache` folder
    when an earlier run wrote one (None: none is read or written), else one streamed pass over the teacher's
    weights, kept in both for every other view and run."""
    key = reference_key(projector, calibration, draws, seed)
    found = references.get(key) if references is not None else None
    if found is not None:
        return found

    def run() -> Reference:
        return teacher_reference(StreamedTeacher(projector.teacher, device), calibration.latents,
                                 calibration.context, draws, seed, key.band, calibration.source, keep_blocks=True)

    reference = run() if cache is None else stored_reference(key, calibration, projector.teacher.config, cache, run)
    return references.put(key, reference) if references is not None else reference


def stored_reference(key: ReferenceKey, calibration: Calibration, config: ModelConfig, cache: Path,
                     run: Callable[[], Reference]) -> Reference:
    """`run()` through the entry `reference/<key>.safetensors` under `cache`: the teacher's velocities (and block
    outputs where the reference keeps them), checked against the shapes this key gives before use."""
    x, t, ctx = noised_set(calibration.latents, calibration.context, key.draws, key.seed, key.band)
    out_dim = int(config.out_dim or x.shape[1])
    shapes = {"velocity": (len(x), out_dim, *x.shape[2:])}
    if keeps_blocks(config, x.shape):
        tokens = budget.tokens_per_latent(*x.shape[-2:])
        shapes |= {f"block.{b}": (len(x), tokens, int(config.dim)) for b in range(int(config.num_layers))}

    def load(data: bytes) -> Reference:
        found = load_safetensors(data)
        checked_tensors(found, shapes if len(found) > 1 else {"velocity": shapes["velocity"]}, torch.float32)
        blocks = tuple(found[f"block.{b}"] for b in range(int(config.num_layers))) if len(found) > 1 else None
        return Reference(x, t, ctx, found["velocity"], key.draws, key.band, blocks)

    def save(reference: Reference) -> bytes:
        blocks = {f"block.{b}": v.contiguous() for b, v in enumerate(reference.blocks or ())}
        return save_safetensors({"velocity": reference.velocity.contiguous(), **blocks})

    name = hashlib.sha256(json.dumps([REFERENCE_VERSION, *astuple(key)]).encode()).hexdigest()[:32]
    limit = 4 * sum(math.prod(s) for s in shapes.values()) + (1 << 16)
    return cached(key.teacher, cache / "reference" / f"{name}.safetensors", limit, load, run, save)


def fidelity_students(projector: Projector, strategy: Strategy, student: nn.Module | None = None,
                      device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """The student (`student`, else the projection under `strategy`) and two references of its shape: randomly
    initialized and projected with `width: svd-per-matrix` on the same blocks."""
    config = projector.student_config(strategy)
    reference_strategy = Strategy(width="svd-per-matrix", layers=projector.mapping(strategy).layers,
                                  seed=strategy.seed)
    svd = Projector(projector.teacher, projector.student, reference_strategy, projector.rules, projector.caches)
    return {"student": (student or projected_student(projector, strategy=strategy)).to(device).float(),
            "random init": random_student(config, strategy.seed).to(device),
            "svd-per-matrix": projected_student(svd, device)}


def student_fidelity(projector: Projector, calibration: Calibration, student: nn.Module | None = None,
                     draws: int = 4, seed: int = 0, device: str | torch.device = "cpu",
                     blocks: bool = True, strategy: Strategy | None = None,
                     references: Lru | None = None, cache: Path | None = None,
                     walked: tuple[Reference, StudentWalk] | None = None) -> dict[str, Any]:
    """The fidelity of a student (`student`, else the projector's projection under `strategy`, its default if
    None) and, for scale, of two reference students of the same shape (`fidelity_students`). The teacher streams
    once (one block in memory; its block outputs kept where they fit, else the students' blocks walk beside it in
    that pass), or not at all where `references` holds its outputs on this set, or the `cache` folder does from an
    earlier run (`shared_reference`), or `walked` gives a pass that did both (the teacher's outputs, and the
    students that walked beside it: `function.survey`); each student runs once for its velocity and per-block
    errors. The noise levels are those its expert serves. The request is checked against the work bounds
    (`budget`) before anything runs."""
    strategy = strategy or projector.strategy
    config = projector.student_config(strategy)
    check_request(calibration.source, projector.teacher.config, calibration.latents, calibration.context, draws,
                  models=4, streams=block_streams(projector.teacher.config, config, 3) if blocks else 1)
    students = walked[1].students if walked else fidelity_students(projector, strategy, student, device)
    plan = projector.plan(strategy) if blocks and isinstance(students["student"], WanLite) else None
    key = reference_key(projector, calibration, draws, seed)
    band = key.band
    shape = (len(calibration) * draws, *calibration.latents.shape[1:])
    if walked is not None:
        reference, walk = walked
        velocities = walk.velocities()
        table = {name: compare(velocities[name], reference.velocity, draws, band) for name in students}
        per_block = walk.rows() if plan is not None else None
    elif (plan is not None and (references is None or key not in references)
            and not keeps_blocks(projector.teacher.config, shape)):
        # block outputs too large to keep (a real teacher): one streamed pass gives velocities and block errors
        velocities: dict[str, torch.Tensor] = {}
        per_block = block_fidelity(plan, students, calibration.latents, calibration.context, draws, seed, band,
                                   device, velocities)
        x, t, ctx = noised_set(calibration.latents, calibration.context, draws, seed, band)
        reference = Reference(x, t, ctx, velocities.pop("teacher"), draws, band)
        if references is not None:
            references.put(key, reference)
        table = {name: compare(velocities[name], reference.velocity, draws, band) for name in students}
    else:
        reference = shared_reference(projector, calibration, draws, seed, device, references, cache)
        layers = plan.mapping.layers if plan is not None else None
        kept = plan.indices("resid", None) if plan is not None else None
        measured = {name: reference.measure(model, layers, kept) for name, model in students.items()}
        table = {name: f for name, (f, _) in measured.items()}
        per_block = None
        if plan is not None:
            per_block = {name: rows for name, (_, rows) in measured.items()}
            if any(rows is None for rows in per_block.values()):  # a kept reference without block outputs
                per_block = block_fidelity(plan, students, calibration.latents, calibration.context, draws, seed,
                                           band, device)
    return {"calibration": calibration.label, "calibration_synthetic": calibration.synthetic,
            "latents": len(calibration), "noise_draws": draws, "noise_seed": seed, "noise_levels": list(band),
            "meaning": "relative_error = sum |v_student - v_teacher|^2 / sum |v_teacher|^2 of the velocity on the "
                       "calibration latents at fixed noise (0: the teacher's function)",
            "students": {name: f.to_dict() for name, f in table.items()},
            "blocks_meaning": "per student block: |h_student - h_teacher[kept]|^2 / |h_teacher[kept]|^2 of its output "
                              "against the teacher block it came from, on the kept residual channels",
            "blocks": per_block}


def function_report(projector: Projector, calibration: Calibration, draws: int = 2, seed: int = 0,
                    progress: Progress | None = None, strategy: Strategy | None = None,
                    references: Lru | None = None) -> dict[str, Any]:
    """Calibrate the projector on `calibration` (activation statistics, cached) and measure everything above, for
    the student projected under `strategy` (the projector's default if None). On a set not measured before, the
    statistics, the removal effects and the teacher's outputs come from one pass over its weights (`survey`). The
    students need no other where the teacher's block outputs are kept; where they are not (a real teacher), students
    projected from the weights alone walk beside that pass, and students ranked or fitted on the set (projected
    from the statistics it measures) walk beside the teacher in a second. `references`: the teacher's outputs other
    views share (None: this report's own)."""
    strategy = strategy or projector.strategy
    device = pick_device(strategy.device)

    def stage(name: str) -> Progress | None:
        return (lambda i, n, what: progress(i, n, f"{name}: {what}")) if progress else None

    teacher, band = projector.teacher, projector.band
    statistics = statistics_entry(teacher, projector.fingerprint, calibration, draws, seed, band)
    removed = removal_entry(teacher, projector.fingerprint, calibration, REMOVAL_DRAWS, seed, band)
    acts, removal = statistics.get(), removed.get()
    key = reference_key(projector, calibration, draws, seed)
    references = references if references is not None else Lru(SHARED_GALLERY, keep_oversize=True)  # its own
    walked = None
    if acts is None or removal is None:  # a set not measured before: one pass over the teacher's weights for all
        # Students projected from the weights alone walk beside that pass where the teacher's block outputs are
        # too large to keep (else they are scored on the kept outputs, reading nothing).
        shape = (len(calibration) * draws, *calibration.latents.shape[1:])
        layers = projector.mapping(strategy).layers if not strategy.needs_calibration else []
        students = None
        if layers and not keeps_blocks(teacher.config, shape) and all(a < b for a, b in zip(layers, layers[1:])):
            students = fidelity_students(projector, strategy, device=device)
            students = students if isinstance(students["student"], WanLite) else None
        found = survey(teacher, calibration, draws, seed, band, device, statistics=acts is None,
                       removal_draws=REMOVAL_DRAWS if removal is None else None, reference=key not in references,
                       key=cache_key(projector.fingerprint, calibration, draws, seed, band), students=students,
                       layers=layers, kept=projector.plan(strategy).indices("resid", None) if students else None,
                       progress=stage("the teacher on the set"))
        acts = acts if acts is not None else statistics.put(found.activations)
        removal = removal if removal is not None else removed.put(found.removal)
        if found.reference is not None:
            references.put(key, found.reference)
        if found.students is not None:
            walked = (found.reference, found.students)
    acts = projector.calibrate(calibration, draws, seed, device=device, measured=acts)
    if progress:
        progress(0, 1, "fidelity: the student, random init and svd-per-matrix against the teacher")
    fidelity = student_fidelity(projector, calibration, draws=draws, seed=seed, device=device, strategy=strategy,
                                references=references, walked=walked)
    layers = projector.mapping(strategy).layers
    blocks = [{"block": b, "influence": acts.influence[b], "removal_error": removal[b],
               "feeds": [i for i, t in enumerate(layers) if t == b]} for b in range(len(acts.influence))]
    agreement = [{"space": space, "label": SPACES[space].label, "overlap": shared, "chance": chance}
                 for space, (shared, chance) in ranking_agreement(projector, strategy).items()]
    return {"fidelity": fidelity, "teacher_blocks": blocks, "removal_draws": REMOVAL_DRAWS,
            "agreement": agreement, "activations_from": acts.about}
