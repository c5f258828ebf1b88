"""What the teacher's activations say: importance per channel, head, head dim and neuron, and influence per block,
from one streamed teacher forward on a calibration set (Minitron's and Wanda's signals).

Per teacher block b, over every calibration latent, noise draw and token (float64 sums of squares). The modules
read are the ones the teacher's family names (`family.Runnable`); Wan's are given in brackets:
  resid          energy of each residual channel in the normalized, modulated inputs every block reads (its
                 `readers`: the self-attention q/k/v input, the cross-attention q input, the FFN input); each
                 reader's profile is normalized to sum 1 and the readers are summed, as magnitude ranking sums its
                 tensors
  sa_heads, ca_heads   energy of each head's attention output (the input of each of its `outputs`, [`o`]), per block
  sa_vo, ca_vo   energy of each head dim of that output, summed over heads, per block
  ffn            energy of each FFN neuron's activation (the input of its `neurons` module [`ffn.2`]), per block
  ffn_wanda      that energy times the squared norm of the neuron's column there: the energy the neuron writes
                 (Wanda's |W| x ||x||, for whole neurons)
  update         the block's mean update of the residual stream, mean(h_out - h_in) per channel (for folding a
                 dropped block's mean contribution into the student: `compensate: mean`)
  influence      1 - cos(h_in, h_out) of the block's residual stream, averaged over tokens

`removal_effects` measures, separately, the exact effect of removing each block alone on the teacher's output.

Statistics are cached on disk (a user cache folder, never the teacher's), keyed by the teacher's content
fingerprint, the calibration set's contents and the noise request, so the app and the CLI reuse them. An entry is
used only if it is exactly what `collect` records for the teacher's config (every group, shape, float64, finite);
anything else is measured again and the entry rewritten.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors, save as save_safetensors

from ..cancel import checkpoint
from ..core.models import ModelView
from ..core.plan import overlap
from ..errors import ProjectionError
from ..io.diskcache import cache_dir, cached, checked_tensors
from ..io.inputs import load_json
from .budget import MICRO_BATCH, check_work
from .calibration import Calibration
from .forward import StreamedTeacher, build_block, runnable
from .noise import noised_set

SCORED = ("resid", "sa_heads", "sa_vo", "ca_heads", "ca_vo", "ffn")  # the spaces activations rank
CACHE_VERSION = "2"


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
    cfg, family = teacher.config, runnable(teacher)
    heads, dim = int(cfg.num_heads), int(cfg.dim)
    sums: dict[tuple[str, int | None], torch.Tensor] = {}
    cos_sum: dict[int, float] = {}
    count: dict[int, int] = {}
    readers: dict[tuple[int, str], torch.Tensor] = {}

    def add(k: tuple[str, int | None], v: torch.Tensor) -> None:
        sums[k] = sums[k] + v if k in sums else v

    def on_input(block: int, name: str, x: torch.Tensor) -> None:
        energy = x.double().pow(2).flatten(0, -2).sum(0).cpu()  # per input feature
        if name in family.readers:
            readers[(block, name)] = readers.get((block, name), 0) + energy
        elif name in family.outputs:
            per = energy.reshape(heads, dim // heads)
            add((f"{family.outputs[name]}_heads", block), per.sum(1))
            add((f"{family.outputs[name]}_vo", block), per.sum(0))
        elif name == family.neurons:
            add(("ffn", block), energy)

    def on_block(block: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
        cos_sum[block] = cos_sum.get(block, 0.0) + (1 - cos).sum().item()
        count[block] = count.get(block, 0) + cos.numel()
        add(("update", block), (x_out.double() - x_in.double()).flatten(0, -2).sum(0).cpu())
        if progress:
            progress(block, int(cfg.num_layers), f"teacher block {block}")

    def on_weights(block: int, module: torch.nn.Module) -> None:
        columns[block] = module.get_submodule(family.neurons).weight.double().pow(2).sum(0).cpu()

    columns: dict[int, torch.Tensor] = {}
    check_work(calibration.source, calibration.latents.shape, calibration.context.shape, cfg, draws)
    x, t, ctx = noised_set(calibration.latents, calibration.context, draws, seed, band)
    hooked = (*family.readers, *family.outputs, family.neurons)
    StreamedTeacher(teacher, device)(x, t, ctx, on_block, on_input, hooked, on_weights)
    resid = torch.zeros(dim, dtype=torch.float64)
    for energy in readers.values():
        resid += _share(energy)
    sums[("resid", None)] = resid
    depth = int(cfg.num_layers)
    for b in range(depth):
        sums[("ffn_wanda", b)] = sums[("ffn", b)] * columns[b]
        sums[("update", b)] = sums[("update", b)] / count[b]
    influence = [cos_sum[b] / count[b] for b in range(depth)]
    return Activations(sums, influence, describe(calibration, draws, band), key)


def expected_shapes(teacher: ModelView) -> dict[str, tuple[int, ...]]:
    """Every tensor of an activations entry (`Activations.to_tensors`) and its shape, from the teacher's config and
    its family's attention outputs (their spaces' prefixes; Wan's: sa, ca)."""
    config, outputs = teacher.config, runnable(teacher).outputs.values()
    dim, heads, ffn, depth = (int(v) for v in (config.dim, config.num_heads, config.ffn_dim, config.num_layers))
    shapes: dict[str, tuple[int, ...]] = {"resid/global": (dim,), "influence": (depth,)}
    for b in range(depth):
        for prefix in outputs:
            shapes.update({f"{prefix}_heads/{b}": (heads,), f"{prefix}_vo/{b}": (dim // heads,)})
        shapes.update({f"ffn/{b}": (ffn,), f"ffn_wanda/{b}": (ffn,), f"update/{b}": (dim,)})
    return shapes


def checked_entry(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of a cache entry if they are exactly what `collect` records for this teacher (`shapes`: the
    groups and their shapes; float64, all finite); else ValueError, so that the entry is measured again."""
    return checked_tensors(tensors, shapes, torch.float64)


def checked_removal(found: object, depth: int) -> list[float]:
    """A cached removal entry's effects if it is {"removal": [depth finite numbers]}; else ValueError."""
    removal = found.get("removal") if isinstance(found, dict) else None
    if not (isinstance(removal, list) and len(removal) == depth
            and all(type(e) in (int, float) and math.isfinite(e) for e in removal)):
        raise ValueError(f"not {depth} finite removal effects")
    return [float(e) for e in removal]


def teacher_activations(teacher: ModelView, fingerprint: str, calibration: Calibration, draws: int = 2,
                        seed: int = 0, band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                        cache: Path | None = None, progress: Callable[[int, int, str], None] | None = None
                        ) -> Activations:
    """`collect`, through the on-disk cache."""
    key = cache_key(fingerprint, calibration, draws, seed, band)
    about = describe(calibration, draws, band)
    path = (cache_dir() if cache is None else cache) / "activations" / f"{key}.safetensors"
    # The entry's groups and shapes bound the read: the data, a header line per tensor, `about`.
    shapes = expected_shapes(teacher)
    limit = 8 * sum(math.prod(s) for s in shapes.values()) + 256 * len(shapes) + 6 * len(about.encode()) + (1 << 20)
    return cached(fingerprint, path, limit,
                   lambda data: Activations.from_tensors(checked_entry(load_safetensors(data), shapes), about, key),
                   lambda: collect(teacher, calibration, draws, seed, band, device, key, progress),
                   lambda found: save_safetensors(found.to_tensors(), {"about": about}))


MAX_REMOVAL_BYTES = 8 << 30  # the residual streams `removal_effects` holds at once


def removal_effects(teacher: ModelView, calibration: Calibration, draws: int = 1, seed: int = 0,
                    band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                    progress: Callable[[int, int, str], None] | None = None) -> list[float]:
    """The exact effect of removing each teacher block alone on the teacher's output: for every block b,
    sum ||v_without_b - v||^2 / sum ||v||^2 on the noised calibration set.

    One pass over the blocks, each block's weights read once: the stream without block b leaves the teacher's at
    b, and every later block also runs on it (L(L+1)/2 block evaluations; L+1 residual streams held at once,
    bounded by MAX_REMOVAL_BYTES before anything runs)."""
    cfg = teacher.config
    depth, dim = int(cfg.num_layers), int(cfg.dim)
    check_work(calibration.source, calibration.latents.shape, calibration.context.shape, cfg, draws,
               streams=depth + 1, batch=MICRO_BATCH)
    x, t, ctx = noised_set(calibration.latents, calibration.context, draws, seed, band)
    need = (depth + 1) * len(x) * (x.shape[-2] // 2) * (x.shape[-1] // 2) * dim * 4
    if need > MAX_REMOVAL_BYTES:
        raise ProjectionError(f"{calibration.label}: removing each of {depth} blocks in turn holds {need:,} bytes "
                              f"of residual streams at once (at most {MAX_REMOVAL_BYTES:,}): use fewer or smaller "
                              "latents")
    streamed = StreamedTeacher(teacher, device)
    steps = range(0, len(x), streamed.micro_batch)
    with torch.no_grad():
        parts = [streamed.shell.embed(x[i:i + streamed.micro_batch].to(streamed.device),
                                      t[i:i + streamed.micro_batch].to(streamed.device),
                                      ctx[i:i + streamed.micro_batch].to(streamed.device)) for i in steps]
        main = [p.tokens for p in parts]
        without: dict[int, list[torch.Tensor]] = {}
        for b in range(depth):
            block = build_block(teacher, b, streamed.device, streamed.dtype)
            for k, hidden in without.items():
                checkpoint()
                without[k] = [block(h, p.e0, p.ctx, p.freqs) for h, p in zip(hidden, parts)]
            without[b] = main  # the teacher without block b: block b's input goes on
            checkpoint()
            main = [block(h, p.e0, p.ctx, p.freqs) for h, p in zip(main, parts)]
            del block
            if progress:
                progress(b, depth, f"teacher block {b} (each block removed in turn)")

        def velocity(hidden: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([streamed.shell.unpatchify(h, p.e, p.grid).double().cpu() for h, p in zip(hidden, parts)])

        v = velocity(main)
        total = v.pow(2).sum().item()
        return [(velocity(without[b]) - v).pow(2).sum().item() / max(total, 1e-300) for b in range(depth)]


def teacher_removal(teacher: ModelView, fingerprint: str, calibration: Calibration, draws: int = 1, seed: int = 0,
                    band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                    cache: Path | None = None, progress: Callable[[int, int, str], None] | None = None
                    ) -> list[float]:
    """`removal_effects`, through the on-disk cache."""
    key = cache_key(fingerprint, calibration, draws, seed, band)
    path = (cache_dir() if cache is None else cache) / "activations" / f"{key}-removal.json"
    depth = int(teacher.config.num_layers)
    return cached(fingerprint, path, 64 + 32 * depth,
                   lambda data: checked_removal(load_json(data, str(path)), depth),
                   lambda: removal_effects(teacher, calibration, draws, seed, band, device, progress),
                   lambda found: json.dumps({"removal": found}).encode())


def require(activations: Activations | None, what: str) -> Activations:
    if activations is None:
        raise ProjectionError(f"{what} ranks by the teacher's activations: give a calibration set (CLI: --calibration "
                              "FILE|demo|synthetic; the app: its Function tab)")
    return activations


def ranking_agreement(projector, strategy=None) -> dict[str, tuple[float, float]]:
    """How far the weights and the activations agree on what to keep: per space, the overlap of the magnitude
    plan's and the activation plan's index sets (`plan.overlap`), under `strategy`'s layers (the projector's
    default strategy if None) and the projector's rules. Needs the projector calibrated."""
    require(projector.activations, "the weight/activation agreement")
    own = strategy or projector.strategy
    layers = projector.mapping(own).layers
    plans = [projector.plan(own.model_copy(update={"width": method, "heads": method, "ffn": method,
                                                   "head_dim": rope, "layers": layers}))
             for method, rope in (("magnitude", "frequency"), ("activation", "activation"))]
    return {space: v for space, v in overlap(*plans).items() if space in SCORED}
