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

`removal_effects` measures the exact effect of removing each block alone on the teacher's output (`Removal`;
`survey` runs it and the statistics in one pass over the teacher's weights).

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

from ..core.models import ModelView
from ..core.plan import overlap
from ..errors import ProjectionError
from ..io.diskcache import Entry, cache_dir, checked_tensors
from ..io.inputs import load_json
from .budget import MICRO_BATCH, check_work
from .calibration import Calibration
from .forward import StreamedTeacher, runnable, step
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


def cache_key(fingerprint: str, calibration: Calibration, draws: int, seed: int, band: tuple[float, float]) -> str:
    request = json.dumps([CACHE_VERSION, fingerprint, calibration.digest, draws, seed, list(band)])
    return hashlib.sha256(request.encode()).hexdigest()[:32]


def describe(calibration: Calibration, draws: int, band: tuple[float, float]) -> str:
    """What the statistics were measured on, as reports show it."""
    return f"{calibration.label}; {draws} noise draws per latent, s in [{band[0]:g}, {band[1]:g}]"


def _share(profile: torch.Tensor) -> torch.Tensor:
    return profile / max(profile.sum().item(), 1e-300)


class Statistics:
    """The recorder behind `collect`: its hooks (`on_input`, `on_block`, `on_weights` on the modules `hooked`) see a
    streamed forward of the teacher over a noised set; `result` gives the statistics above."""

    def __init__(self, teacher: ModelView, progress: Callable[[int, int, str], None] | None = None):
        self.config, self.progress = teacher.config, progress
        self.families = [runnable(teacher, b) for b in range(int(teacher.config.num_layers))]  # each block's stack's
        self.sums: dict[tuple[str, int | None], torch.Tensor] = {}
        self.cos_sum: dict[int, float] = {}
        self.count: dict[int, int] = {}
        self.readers: dict[tuple[int, str], torch.Tensor] = {}
        self.columns: dict[int, torch.Tensor] = {}

    def _add(self, k: tuple[str, int | None], v: torch.Tensor) -> None:
        self.sums[k] = self.sums[k] + v if k in self.sums else v

    def hooked(self, block: int) -> tuple[str, ...]:
        """The modules whose inputs a block's statistics read."""
        family = self.families[block]
        return (*family.readers, *family.outputs, family.neurons)

    def on_input(self, block: int, name: str, x: torch.Tensor) -> None:
        family, heads = self.families[block], int(self.config.num_heads)
        energy = x.double().pow(2).flatten(0, -2).sum(0).cpu()  # per input feature
        if name in family.readers:
            self.readers[(block, name)] = self.readers.get((block, name), 0) + energy
        elif name in family.outputs:
            per = energy.reshape(heads, int(self.config.dim) // heads)
            self._add((f"{family.outputs[name]}_heads", block), per.sum(1))
            self._add((f"{family.outputs[name]}_vo", block), per.sum(0))
        elif name == family.neurons:
            self._add(("ffn", block), energy)

    def on_block(self, block: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
        self.cos_sum[block] = self.cos_sum.get(block, 0.0) + (1 - cos).sum().item()
        self.count[block] = self.count.get(block, 0) + cos.numel()
        self._add(("update", block), (x_out.double() - x_in.double()).flatten(0, -2).sum(0).cpu())
        if self.progress:
            self.progress(block, int(self.config.num_layers), f"teacher block {block}")

    def on_weights(self, block: int, module: torch.nn.Module) -> None:
        self.columns[block] = module.get_submodule(self.families[block].neurons).weight.double().pow(2).sum(0).cpu()

    def result(self, about: str, key: str) -> Activations:
        sums = dict(self.sums)
        resid = torch.zeros(int(self.config.dim), dtype=torch.float64)
        for energy in self.readers.values():
            resid += _share(energy)
        sums[("resid", None)] = resid
        depth = int(self.config.num_layers)
        for b in range(depth):
            sums[("ffn_wanda", b)] = sums[("ffn", b)] * self.columns[b]
            sums[("update", b)] = sums[("update", b)] / self.count[b]
        influence = [self.cos_sum[b] / self.count[b] for b in range(depth)]
        return Activations(sums, influence, about, key)


def collect(teacher: ModelView, calibration: Calibration, draws: int = 2, seed: int = 0,
            band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu", key: str = "",
            progress: Callable[[int, int, str], None] | None = None) -> Activations:
    """One streamed forward of the teacher over the noised calibration set, recording the statistics above."""
    stats = Statistics(teacher, progress)
    check_work(calibration.source, calibration.latents.shape, calibration.context.shape, teacher.config, draws)
    x, t, ctx = noised_set(calibration.latents, calibration.context, draws, seed, band)
    StreamedTeacher(teacher, device)(x, t, ctx, stats.on_block, stats.on_input, stats.hooked, stats.on_weights)
    return stats.result(describe(calibration, draws, band), key)


def expected_shapes(teacher: ModelView) -> dict[str, tuple[int, ...]]:
    """Every tensor of an activations entry (`Activations.to_tensors`) and its shape, from the teacher's config and
    its family's attention outputs (their spaces' prefixes; Wan's: sa, ca)."""
    config = teacher.config
    dim, heads, ffn, depth = (int(v) for v in (config.dim, config.num_heads, config.ffn_dim, config.num_layers))
    shapes: dict[str, tuple[int, ...]] = {"resid/global": (dim,), "influence": (depth,)}
    for b in range(depth):
        for prefix in runnable(teacher, b).outputs.values():
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


def statistics_entry(teacher: ModelView, fingerprint: str, calibration: Calibration, draws: int = 2, seed: int = 0,
                     band: tuple[float, float] = (0.0, 1.0), cache: Path | None = None) -> Entry[Activations]:
    """The on-disk entry of `collect`'s statistics for this teacher, set and noise request."""
    key = cache_key(fingerprint, calibration, draws, seed, band)
    about = describe(calibration, draws, band)
    path = (cache_dir() if cache is None else cache) / "activations" / f"{key}.safetensors"
    # The entry's groups and shapes bound the read: the data, a header line per tensor, `about`.
    shapes = expected_shapes(teacher)
    limit = 8 * sum(math.prod(s) for s in shapes.values()) + 256 * len(shapes) + 6 * len(about.encode()) + (1 << 20)
    return Entry(fingerprint, path, limit,
                 lambda data: Activations.from_tensors(checked_entry(load_safetensors(data), shapes), about, key),
                 lambda found: save_safetensors(found.to_tensors(), {"about": about}))


def teacher_activations(teacher: ModelView, fingerprint: str, calibration: Calibration, draws: int = 2,
                        seed: int = 0, band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                        cache: Path | None = None, progress: Callable[[int, int, str], None] | None = None
                        ) -> Activations:
    """`collect`, through the on-disk cache."""
    entry = statistics_entry(teacher, fingerprint, calibration, draws, seed, band, cache)
    key = cache_key(fingerprint, calibration, draws, seed, band)
    return entry.through(lambda: collect(teacher, calibration, draws, seed, band, device, key, progress))


MAX_REMOVAL_BYTES = 8 << 30  # the residual streams `removal_effects` holds at once


def removal_set(teacher: ModelView, calibration: Calibration, draws: int = 1, seed: int = 0,
                band: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The noised set removal effects are measured on, once its L+1 residual streams are known to fit
    MAX_REMOVAL_BYTES and the work bounds (`budget.check_work`)."""
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
    return x, t, ctx


class Removal:
    """A rider of a pass over the teacher's weights (`StreamedTeacher.walk`, every block in order) that measures
    the exact effect of removing each block alone on the output: the stream without block b leaves the teacher's
    at b, and every later block also runs on it (L(L+1)/2 block evaluations, L+1 residual streams held)."""

    @torch.no_grad()
    def __init__(self, streamed: StreamedTeacher, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                 progress: Callable[[int, int, str], None] | None = None):
        self.shell, self.progress, self.depth = streamed.shell, progress, int(streamed.teacher.config.num_layers)
        step, device = streamed.micro_batch, streamed.device
        self.parts = [self.shell.embed(x[i:i + step].to(device), t[i:i + step].to(device),
                                       ctx[i:i + step].to(device)) for i in range(0, len(x), step)]
        self.main = [p.tokens for p in self.parts]
        self.without: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, b: int, block: torch.nn.Module) -> None:
        for k, hidden in self.without.items():
            self.without[k] = [step(block, h, p) for h, p in zip(hidden, self.parts)]
        self.without[b] = self.main  # the teacher without block b: block b's input goes on
        self.main = [step(block, h, p) for h, p in zip(self.main, self.parts)]
        if self.progress:
            self.progress(b, self.depth, f"teacher block {b} (each block removed in turn)")

    @torch.no_grad()
    def effects(self) -> list[float]:
        """sum ||v_without_b - v||^2 / sum ||v||^2 for every block b."""
        def velocity(hidden: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([self.shell.unpatchify(h, p.e, p.grid).double().cpu() for h, p in zip(hidden, self.parts)])

        v = velocity(self.main)
        total = v.pow(2).sum().item()
        return [(velocity(self.without[b]) - v).pow(2).sum().item() / max(total, 1e-300) for b in range(self.depth)]


def removal_effects(teacher: ModelView, calibration: Calibration, draws: int = 1, seed: int = 0,
                    band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                    progress: Callable[[int, int, str], None] | None = None) -> list[float]:
    """The exact effect of removing each teacher block alone on the teacher's output: for every block b,
    sum ||v_without_b - v||^2 / sum ||v||^2 on the noised calibration set, in one pass over the blocks (`Removal`;
    its streams bounded by MAX_REMOVAL_BYTES before anything runs)."""
    x, t, ctx = removal_set(teacher, calibration, draws, seed, band)
    streamed = StreamedTeacher(teacher, device)
    removal = Removal(streamed, x, t, ctx, progress)
    streamed.walk([removal])
    return removal.effects()


def removal_entry(teacher: ModelView, fingerprint: str, calibration: Calibration, draws: int = 1, seed: int = 0,
                  band: tuple[float, float] = (0.0, 1.0), cache: Path | None = None) -> Entry[list[float]]:
    """The on-disk entry of `removal_effects` for this teacher, set and noise request."""
    key = cache_key(fingerprint, calibration, draws, seed, band)
    path = (cache_dir() if cache is None else cache) / "activations" / f"{key}-removal.json"
    depth = int(teacher.config.num_layers)
    return Entry(fingerprint, path, 64 + 32 * depth, lambda data: checked_removal(load_json(data, str(path)), depth),
                 lambda found: json.dumps({"removal": found}).encode())


def teacher_removal(teacher: ModelView, fingerprint: str, calibration: Calibration, draws: int = 1, seed: int = 0,
                    band: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu",
                    cache: Path | None = None, progress: Callable[[int, int, str], None] | None = None
                    ) -> list[float]:
    """`removal_effects`, through the on-disk cache."""
    return removal_entry(teacher, fingerprint, calibration, draws, seed, band, cache).through(
        lambda: removal_effects(teacher, calibration, draws, seed, band, device, progress))


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
