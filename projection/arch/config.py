"""Student configs: a layout and its sizes, checked against the teacher before anything is built, completed from
the teacher's; and the runnable module of each layout (`wanlite`: `wan.WanLite`, `seed`: `seed.SeedStudent`)."""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from ..errors import ProjectionError
from .seed import SeedStudent
from .wan import WanLite

LAYOUTS = ("wanlite", "seed")
DEFAULTS = {"in_dim": 16, "out_dim": 16, "text_dim": 4096, "freq_dim": 256}
SIZES = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")
FIELDS = ("layout", *SIZES)
PROJECTED = ("dim", "ffn_dim")  # selected from the teacher's: at most the teacher's
MAX_IO_DIM = 1 << 14  # in/out/text/freq widths may differ from the teacher's (those tensors start fresh)


def check_fields(fields: dict[str, Any], teacher: dict[str, Any], max_layers: int | None = None) -> None:
    """Refuse, before anything is built, a student config the teacher cannot fill: unknown fields, sizes that
    are not positive integers, and sizes past the teacher's. Channels and FFN neurons are kept or dropped, never
    invented; blocks past the teacher's need an explicit layer list (`max_layers` entries); heads divide the
    width, and the mapper says how many fit the teacher's."""
    for name in fields:
        if name not in FIELDS:
            close = difflib.get_close_matches(str(name), FIELDS, 1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ProjectionError(f"student config: unknown field {name!r:.60}{hint}; the fields are "
                                  f"{', '.join(FIELDS)}")
    for name in (n for n in SIZES if n in fields):
        value = fields[name]
        if type(value) is not int or value <= 0:  # not a bool, a float or a string
            raise ProjectionError(f"student config: '{name}' must be a positive integer, got {value!r:.60}")
        if name == "num_layers":
            depth = teacher.get("num_layers") or 0
            if value > max(depth, max_layers or 0):
                how = (f"the strategy's layer list has {max_layers} entries" if (max_layers or 0) > depth else
                       "a deeper student needs a strategy 'layers' list that repeats blocks")
                raise ProjectionError(f"student config: num_layers {value} is more than the teacher's {depth} "
                                      f"blocks; {how}")
        elif name in PROJECTED:
            bound = teacher.get(name) or MAX_IO_DIM
            if value > bound:
                raise ProjectionError(f"student config: {name} {value} is more than the teacher's {bound}; a "
                                      f"projection keeps or drops what the teacher has")
        elif name != "num_heads" and value > max(teacher.get(name) or 0, MAX_IO_DIM):
            raise ProjectionError(f"student config: {name} {value} is more than {MAX_IO_DIM}, the most allowed "
                                  f"where it differs from the teacher's ({teacher.get(name)})")


def student_config(layout: str, fields: dict[str, Any], teacher: dict[str, Any],
                   max_layers: int | None = None) -> dict[str, Any]:
    """A full student config: given fields, else the teacher's (the seed layout keeps its 4 latent channels)."""
    check_fields(fields, teacher, max_layers)
    if layout not in LAYOUTS:
        raise ProjectionError(f"student layout '{layout}' is unknown; choose one of {', '.join(LAYOUTS)}")
    cfg: dict[str, Any] = {"layout": layout}
    seed_defaults = {"in_dim": 4, "out_dim": 4} if layout == "seed" else {}
    for field in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim"):
        value = fields.get(field, seed_defaults.get(field, teacher.get(field, DEFAULTS.get(field))))
        if value is None:
            raise ProjectionError(f"student config: '{field}' is missing and the teacher does not define it")
        if not isinstance(value, int) or value <= 0:
            raise ProjectionError(f"student config: '{field}' must be a positive integer, got {value!r}")
        cfg[field] = value
    if "num_heads" not in fields and "dim" in fields and teacher.get("head_dim"):
        cfg["num_heads"] = max(1, cfg["dim"] // teacher["head_dim"])  # keep the teacher's head dim
    if cfg["dim"] % cfg["num_heads"]:
        raise ProjectionError(f"student config: dim {cfg['dim']} is not divisible by num_heads {cfg['num_heads']}")
    cfg["head_dim"] = cfg["dim"] // cfg["num_heads"]
    return cfg


def build_student(config: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The student module for a config; on device 'meta' it costs no memory (for mapping)."""
    layout = config.get("layout", "wanlite")
    if layout not in LAYOUTS:
        raise ProjectionError(f"layout '{layout}' has no runnable module here (only {', '.join(LAYOUTS)}); load it "
                              "with the code it came from (e.g. diffusers' WanTransformer3DModel)")
    kwargs = {k: config[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers")}
    kwargs.update({k: config[k] for k in ("in_dim", "out_dim", "text_dim", "freq_dim") if k in config})
    cls = {"wanlite": WanLite, "seed": SeedStudent}[layout]
    with torch.device(device):
        return cls(**kwargs)
