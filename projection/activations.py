"""What the teacher's activations say: importance per channel, head, head dim and neuron, and influence per block,
from one streamed teacher forward on a calibration set (Minitron's and Wanda's signals).

Per teacher block b, over every calibration latent, noise draw and token (float64 sums of squares):
  resid          energy of each residual channel in the normalized, modulated inputs every block reads (the
                 self-attention q/k/v input, the cross-attention q input, the FFN input); each reader's profile
                 is normalized to sum 1 and the readers are summed, as magnitude ranking sums its tensors
  sa_heads, ca_heads   energy of each head's attention output (the input of `o`), per block
  sa_vo, ca_vo   energy of each head dim of that output, summed over heads, per block
  ffn            energy of each FFN neuron's GELU output (the input of `ffn.2`), per block
  influence      1 - cos(h_in, h_out) of the block's residual stream, averaged over tokens

Statistics are cached on disk (a user cache folder, never the teacher's), keyed by the teacher's content
fingerprint, the calibration set's contents and the noise request, so the app and the CLI reuse them.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .calibration import Calibration
from .errors import ProjectionError
from .fidelity import noised_set
from .forward import StreamedTeacher
from .models import ModelView

READERS = {"self_attn.q": "resid", "cross_attn.q": "resid", "ffn.0": "resid"}  # inputs: normalized residual
OUTPUTS = {"self_attn.o": "sa", "cross_attn.o": "ca"}  # inputs: attention outputs [.., heads x head dim]
NEURONS = "ffn.2"  # input: the GELU output
CACHE_VERSION = "1"


@dataclass
class Activations:
    """Scores per (space, teacher block or None) and influence per teacher block; `about` says on what."""
    scores: dict[tuple[str, int | None], torch.Tensor]
    influence: list[float]
    about: str
    key: str  # the cache key: teacher, calibration and request

    def score(self, space: str, block: int | None) -> torch.Tensor | None:
        return self.scores.get((space, block))

    def influential(self, k: int) -> list[int]:
        """The k most influential blocks, in teacher order (ties: the earlier block)."""
        order = sorted(range(len(self.influence)), key=lambda b: (-self.influence[b], b))
        return sorted(order[:k])

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{space}/{'global' if b is None else b}": v.contiguous() for (space, b), v in self.scores.items()}
        out["influence"] = torch.tensor(self.influence, dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], about: str, key: str) -> Activations:
        scores = {}
        for name, v in tensors.items():
            if name != "influence":
                space, block = name.split("/")
                scores[(space, None if block == "global" else int(block))] = v
        return cls(scores, tensors["influence"].tolist(), about, key)


def cache_dir() -> Path:
    """$PROJECTION_CACHE, else $XDG_CACHE_HOME/projection-inspector, else ~/.cache/projection-inspector."""
    if os.environ.get("PROJECTION_CACHE"):
        return Path(os.environ["PROJECTION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "projection-inspector"


def calibration_digest(calibration: Calibration) -> str:
    h = hashlib.sha256()
    for t in (calibration.latents, calibration.context):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def cache_key(fingerprint: str, calibration: Calibration, draws: int, seed: int, band: tuple[float, float]) -> str:
    request = json.dumps([CACHE_VERSION, fingerprint, calibration_digest(calibration), draws, seed, list(band)])
    return hashlib.sha256(request.encode()).hexdigest()[:32]


def describe(calibration: Calibration, draws: int, band: tuple[float, float]) -> str:
    """What the statistics were measured on, as reports show it."""
    return f"{calibration.label}; {draws} noise draws per latent, s in [{band[0]:g}, {band[1]:g}]"


def _share(profile: torch.Tensor) -> torch.Tensor:
    return profile / max(profile.sum().item(), 1e-300)


def collect(teacher: ModelView, calibration: Calibration, draws: int = 2, seed: int = 0,
            band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu", key: str = "",
            progress: Callable[[int, int, str], None] | None = None) -> Activations:
    """One streamed forward of the teacher over the noised calibration set, recording the statistics above."""
    cfg = teacher.config
    heads, dim = int(cfg["num_heads"]), int(cfg["dim"])
    sums: dict[tuple[str, int | None], torch.Tensor] = {}
    cos_sum: dict[int, float] = {}
    count: dict[int, int] = {}
    readers: dict[tuple[int, str], torch.Tensor] = {}

    def add(k: tuple[str, int | None], v: torch.Tensor) -> None:
        sums[k] = sums[k] + v if k in sums else v

    def on_input(block: int, name: str, x: torch.Tensor) -> None:
        energy = x.double().pow(2).flatten(0, -2).sum(0).cpu()  # per input feature
        if name in READERS:
            readers[(block, name)] = readers.get((block, name), 0) + energy
        elif name in OUTPUTS:
            per = energy.reshape(heads, dim // heads)
            add((f"{OUTPUTS[name]}_heads", block), per.sum(1))
            add((f"{OUTPUTS[name]}_vo", block), per.sum(0))
        elif name == NEURONS:
            add(("ffn", block), energy)

    def on_block(block: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
        cos_sum[block] = cos_sum.get(block, 0.0) + (1 - cos).sum().item()
        count[block] = count.get(block, 0) + cos.numel()
        if progress:
            progress(block, int(cfg["num_layers"]), f"teacher block {block}")

    x, t, ctx = noised_set(calibration.latents, calibration.context, draws, seed, band)
    StreamedTeacher(teacher, device)(x, t, ctx, on_block, on_input, tuple([*READERS, *OUTPUTS, NEURONS]))
    resid = torch.zeros(dim, dtype=torch.float64)
    for energy in readers.values():
        resid += _share(energy)
    sums[("resid", None)] = resid
    influence = [cos_sum[b] / count[b] for b in range(int(cfg["num_layers"]))]
    return Activations(sums, influence, describe(calibration, draws, band), key)


def teacher_activations(teacher: ModelView, fingerprint: str, calibration: Calibration, draws: int = 2,
                        seed: int = 0, band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                        cache: Path | None = None, progress: Callable[[int, int, str], None] | None = None
                        ) -> Activations:
    """`collect`, through the on-disk cache (written atomically; an unreadable entry is recomputed)."""
    key = cache_key(fingerprint, calibration, draws, seed, band)
    about = describe(calibration, draws, band)
    folder = cache_dir() if cache is None else cache
    path = folder / "activations" / f"{key}.safetensors"
    if not fingerprint.startswith("unnamed-") and path.is_file():
        try:
            return Activations.from_tensors(load_file(str(path)), about, key)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
            pass  # a damaged cache entry: measure again
    found = collect(teacher, calibration, draws, seed, band, device, key, progress)
    if not fingerprint.startswith("unnamed-"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            save_file(found.to_tensors(), str(tmp), {"about": about})
            os.replace(tmp, path)
        except OSError:
            pass  # no cache folder: the statistics are still returned
    return found


def require(activations: Activations | None, what: str) -> Activations:
    if activations is None:
        raise ProjectionError(f"{what} ranks by the teacher's activations: give a calibration set (CLI: --calibration "
                              "FILE|demo|synthetic; the app: teachers in the demo's latent space)")
    return activations
