"""Stock Wan shapes as data: the presets a student config may name, and what each training framework loads as it is
(`../shared/wan-reference.md` 3 and 10; `sizing.frameworks` applies these rules to a config). Data and the
preset's expansion only: `config` imports this module, so it imports nothing of the package but `errors`.

Only Wan2.1 T2V-1.3B is a preset: it is the one stock shape that fits inside a larger Wan teacher with the same
latent channels (16). The 5B shape has 48 (the Wan2.2 VAE), so from a 14B teacher its patch embedding and head
would start fresh; the 14B shape is the teacher itself."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProjectionError

_WAN = {"text_dim": 4096, "freq_dim": 256}  # every released Wan: umT5 context, 256-wide timestep sinusoid

# The released shapes (head dim 128 throughout), by name; DiffSynth-Studio and musubi-tuner know only these.
STOCK: dict[str, dict[str, int]] = {
    "wan2.1-1.3b": {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30, "in_dim": 16, "out_dim": 16,
                    **_WAN},
    "wan2.1-14b": {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16,
                   **_WAN},  # also each Wan2.2 T2V-A14B expert
    "wan2.2-i2v-a14b": {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 36,
                        "out_dim": 16, **_WAN},
    "wan2.2-ti2v-5b": {"dim": 3072, "ffn_dim": 14336, "num_heads": 24, "num_layers": 30, "in_dim": 48, "out_dim": 48,
                       **_WAN},
}
PRESETS: dict[str, dict[str, int]] = {name: STOCK[name] for name in ("wan2.1-1.3b",)}


@dataclass(frozen=True)
class Framework:
    """A framework and the shapes it loads as they are (None: any)."""
    name: str
    needs: str  # said to the user beside a shape it refuses
    dims: tuple[int, ...] | None = None
    head_dim: int | None = None
    freq_dim: int | None = None
    stock: bool = False  # only a shape of STOCK


FRAMEWORKS = (
    Framework("diffusers", "any shape"),
    Framework("Wan", "any shape (Wan's own WanModel)"),
    Framework("ComfyUI", "head dim 128 and freq dim 256 (it infers num_heads = dim // 128, freq_dim = 256)",
              head_dim=128, freq_dim=256),
    Framework("diffusion-pipe", "dim 1536 or 5120", dims=(1536, 5120)),
    Framework("DiffSynth-Studio", "a stock Wan shape (it detects the model by a hash of key names and shapes)",
              stock=True),
    Framework("musubi-tuner", "a stock Wan shape (a fixed config table per task)", stock=True),
)


def expand_preset(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A student config's fields with its `preset` (if any) expanded: the preset's fields first, then the fields
    given beside it, which override them (`preset: wan2.1-1.3b` with `num_layers: 10` is the 1.3B shape, 10 blocks
    deep). The preset's latent, text and timestep widths come with it, whatever the teacher's."""
    if "preset" not in fields:
        return dict(fields)
    name = fields["preset"]
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, 1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ProjectionError(f"student config: unknown preset {name!r:.60}{hint}; the presets are "
                              f"{', '.join(PRESETS)}")
    return {**PRESETS[name], **{k: v for k, v in fields.items() if k != "preset"}}
