"""Runnable students in memory: a random one of a config (the baseline), a student folder of any layout loaded back,
seeded fresh values for the keys nothing transfers to, and a Wan teacher as the WanLite of its own config."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch.config import ModelConfig
from ..arch.layout import LAYOUTS, build_student, runnable_tensor
from ..arch.wan import WanLite, init_modulation_
from ..core.models import ModelView, open_teacher, view_checkpoint
from ..core.strategy import Strategy
from ..errors import ProjectionError
from ..function.fit import compensate_dropped, fit_student
from ..io.checkpoint import open_checkpoint
from .projector import Projector


def random_student(config: ModelConfig | Mapping[str, Any], seed: int) -> nn.Module:
    """A freshly initialized student of a config: the baseline a projection is measured against. Every value comes
    from one generator seeded with `seed` (`init_module_`), never the global RNG."""
    return init_module_(build_student(config, "meta"), torch.Generator().manual_seed(seed))


def init_module_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every parameter of `model` (built on 'meta', or anywhere) a fresh value from torch's own initialisation
    of its module (the same distributions, `init_parameter_`), drawn from `generator` in parameter order; the
    module's parameters are replaced, on the CPU, in float32."""
    state = {k: init_parameter_(model, k, torch.empty(p.shape), generator) for k, p in model.named_parameters()}
    model.load_state_dict(state, assign=True, strict=True)
    return model


def load_student(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A student folder of any layout (diffusers, wan, wanlite, seed: this tool's exports, or a diffusers or Wan
    checkpoint folder of the user's) as its runnable module, in the dtype it was stored in, or `dtype`."""
    view = view_checkpoint(open_checkpoint(str(folder)))
    if view.layout not in LAYOUTS:
        raise ProjectionError(f"{folder}: its tensor names are no layout this tool runs ({', '.join(LAYOUTS)})")
    if not view.heads_recorded:
        raise ProjectionError(f"{folder}: config.json records no heads (num_heads or num_attention_heads); the "
                              "student's function depends on them")
    return runnable(view).to(device, dtype)


def runnable(view: ModelView, layout: str | None = None) -> nn.Module:
    """A checkpoint's runnable module (`layout`: the one to build, its own by default), its tensors read whole."""
    model = build_student(replace(view.config, layout=layout or view.layout), "meta")
    try:
        state = {k: runnable_tensor(k, view.read(k), tuple(p.shape)) for k, p in model.state_dict().items()}
    except ProjectionError as exc:
        raise ProjectionError(f"{view.source}: {exc}") from exc
    model.load_state_dict(state, assign=True, strict=True)
    return model


def count_params(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.state_dict().values())


# ---------------------------------------------------------------- fresh values for keys nothing transfers to

def key_seed(seed: int, key: str) -> int:
    """A student key's own seed: the first 63 bits of sha256("{seed}/{key}") (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1


def fresh_value(model: nn.Module, key: str, seed: int) -> torch.Tensor:
    """A freshly initialised value of one student parameter (the model may live on 'meta'), drawn from its own
    generator seeded with `key_seed(seed, key)`: the same on every run, in any thread, whatever else runs."""
    generator = torch.Generator().manual_seed(key_seed(seed, key))
    return init_parameter_(model, key, torch.empty(model.get_parameter(key).shape), generator)


def init_parameter_(model: nn.Module, key: str, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill `t` as torch's own initialisation of the parameter's module fills it, drawing from `generator` (not
    the global RNG)."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    parent = model.get_submodule(owner_name.rpartition(".")[0]) if "." in owner_name else model
    if isinstance(owner, nn.MultiheadAttention) and name == "in_proj_weight":
        return nn.init.xavier_uniform_(t, generator=generator)
    if isinstance(owner, nn.MultiheadAttention) and name == "in_proj_bias":
        return nn.init.zeros_(t)
    if isinstance(owner, (nn.Linear, nn.Conv2d)) and name == "weight":
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    if isinstance(owner, (nn.Linear, nn.Conv2d)) and name == "bias":
        if isinstance(parent, nn.MultiheadAttention):  # its out_proj bias starts at zero
            return nn.init.zeros_(t)
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(owner.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        return nn.init.uniform_(t, -bound, bound, generator=generator)
    if isinstance(owner, (nn.LayerNorm, nn.RMSNorm)):
        return nn.init.ones_(t) if name == "weight" else nn.init.zeros_(t)
    if name == "modulation":
        return init_modulation_(t, generator)
    raise ProjectionError(f"student key '{key}': no initialisation rule for {type(owner).__name__}.{name}")


def wanlite_from_teacher(source: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> WanLite:
    """A Wan teacher (either format) as the WanLite of its own config: on one latent frame it computes the
    teacher's function exactly. For teachers whose Conv3d patch is one frame deep (T2V); whole in memory."""
    return runnable(open_teacher(str(source)), "wanlite").to(device, dtype).eval()


def initial_values(projector: Projector, keys: set[str], seed: int) -> dict[str, torch.Tensor]:
    """Starting values of the student keys nothing transfers to: its checkpoint's, or a fresh init seeded by
    `seed` (the strategy's).

    Each fresh tensor is drawn from its own generator, seeded from the strategy's seed and the key (never the
    global RNG), so the values do not depend on threads, order or anything else running in the process."""
    student = projector.student
    if student.checkpoint is not None:
        return {c: student.read(c) for c in keys}
    model = build_student(student.config, "meta") if keys else None
    return {k: fresh_value(model, k, seed).reshape(student.shapes[k]) for k in keys}  # as its layout stores it


def projected_student(projector: Projector, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, strategy: Strategy | None = None) -> nn.Module:
    """The student projected under `strategy` (the projector's default if None) as a runnable module in memory
    (what `export_student` writes, without the files): for running, sampling and training it. Every layout but a
    student with its own names (custom)."""
    strategy = strategy or projector.strategy
    mapping = projector.mapping(strategy)
    keys = mapping.coverage()["keys"]
    if keys["transferred"] == 0:
        raise ProjectionError(f"{projector.student.source}: nothing transfers: none of the student's "
                              f"{keys['total']} keys maps to a teacher key")
    model = build_student(projector.student_config(strategy), "meta")
    skipped = {e.student_key for e in mapping.entries if e.status == "skipped"}
    state = initial_values(projector, skipped, strategy.seed)
    state.update({r.entry.student_key: r.tensor for r in projector.stream(strategy, tensors="yield")
                  if r.tensor is not None})
    shapes = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    model.load_state_dict({k: runnable_tensor(k, t, shapes[k]) for k, t in state.items()}, assign=True, strict=True)
    model = model.to(device, torch.float32).eval()
    if strategy.fit == "least-squares":
        if projector.calibration is None:
            raise ProjectionError("fit: least-squares refits on a calibration set: give one (CLI: --calibration "
                                  "FILE|demo|synthetic)")
        fit_student(projector.plan(strategy), model, projector.calibration, device=device)
    if strategy.compensate == "mean":  # after the fit, which solves every bias without the dropped blocks
        compensate_dropped(projector.plan(strategy), projector.activations, model)
    return model.to(device, dtype)
