"""Runnable students in memory: a random one of a config (the baseline), an exported folder loaded back, seeded fresh
values for the keys nothing transfers to, and a Wan teacher as the WanLite of its own config."""
from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch.config import build_student
from ..arch.wan import WanLite, init_modulation_
from ..core.models import open_teacher
from ..core.strategy import Strategy
from ..errors import ProjectionError
from ..function.fit import compensate_dropped, fit_student
from ..io.checkpoint import open_checkpoint
from ..io.inputs import read_json
from .projector import Projector


def random_student(config: dict[str, Any], seed: int) -> nn.Module:
    """A freshly initialized student of a config: the baseline a projection is measured against. Every value comes
    from one generator seeded with `seed` (`init_module_`), never the global RNG."""
    return init_module_(build_student({"layout": "wanlite", **config}, "meta"), torch.Generator().manual_seed(seed))


def init_module_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every parameter of `model` (built on 'meta', or anywhere) a fresh value from torch's own initialisation
    of its module (the same distributions, `init_parameter_`), drawn from `generator` in parameter order; the
    module's parameters are replaced, on the CPU, in float32."""
    state = {k: init_parameter_(model, k, torch.empty(p.shape), generator) for k, p in model.named_parameters()}
    model.load_state_dict(state, assign=True, strict=True)
    return model


def load_student(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load an exported student folder back into its module: in the dtype it was exported in, or `dtype`."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ProjectionError(f"{folder}: no config.json: not an exported student")
    config = read_json(cfg_path, "config")
    try:
        model = build_student(config, "meta")
    except ProjectionError as exc:
        raise ProjectionError(f"{cfg_path}: {exc}") from exc
    ckpt = open_checkpoint(folder)
    state = {k: ckpt.get(k) for k in ckpt.keys()}
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ProjectionError(f"{folder}: weights lack {len(missing)} key(s), e.g. '{sorted(missing)[0]}'")
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device, dtype)


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
    teacher = open_teacher(str(source))
    config = teacher.config
    patch = teacher.shapes["patch_embedding.weight"]
    if len(patch) != 5 or patch[2] != 1:
        raise ProjectionError(f"{source}: patch_embedding.weight is {list(patch)}; a Wan teacher with a temporal "
                              "patch of 1 has [D, C, 1, 2, 2]")
    model = build_student(replace(config, layout="wanlite"), "meta")
    state = {k: teacher.read(k) for k in model.state_dict()}  # a missing key raises, naming it
    state["patch_embedding.weight"] = state["patch_embedding.weight"].squeeze(2)
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device, dtype).eval()


def initial_values(projector: Projector, keys: set[str], seed: int) -> dict[str, torch.Tensor]:
    """Starting values of the student keys nothing transfers to: its checkpoint's, or a fresh init seeded by
    `seed` (the strategy's).

    Each fresh tensor is drawn from its own generator, seeded from the strategy's seed and the key (never the
    global RNG), so the values do not depend on threads, order or anything else running in the process."""
    student = projector.student
    if student.checkpoint is not None:
        return {c: student.read(c) for c in keys}
    model = build_student(student.config, "meta") if keys else None
    return {k: fresh_value(model, k, seed) for k in keys}


def projected_student(projector: Projector, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, strategy: Strategy | None = None) -> nn.Module:
    """The student projected under `strategy` (the projector's default if None) as a runnable module in memory
    (what `export_student` writes, without the files): for running, sampling and training it. Only runnable
    layouts (wanlite, seed)."""
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
    model.load_state_dict(state, assign=True, strict=True)
    model = model.to(device, torch.float32).eval()
    if strategy.fit == "least-squares":
        if projector.calibration is None:
            raise ProjectionError("fit: least-squares refits on a calibration set: give one (CLI: --calibration "
                                  "FILE|demo|synthetic)")
        fit_student(projector.plan(strategy), model, projector.calibration, device=device)
    if strategy.compensate == "mean":  # after the fit, which solves every bias without the dropped blocks
        compensate_dropped(projector.plan(strategy), projector.activations, model)
    return model.to(device, dtype)
