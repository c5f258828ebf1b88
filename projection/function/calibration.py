"""Calibration sets: real inputs on which the teacher and a student are run and compared.

File format (`projection-calibration/1`): one `.safetensors` file with
  latents          [N, Cin, H, W]  float: clean latents of one frame, normalized as the teacher expects
  context          [N, L, text_dim] float: text-encoder states (for Wan: UMT5 states zero-padded to 512 tokens)
  context_lengths  [N] integer, optional: tokens before the padding (0..L); the context past them is zeroed, as
                   Wan's pipelines pad UMT5 states with zeros
  __metadata__     strings describing where they came from (`source`, `format`, ...); shown with control
                   characters removed and at most MAX_SHOWN characters
Other per-sample tensors [N, ...] (e.g. the demo's `labels`) are kept but not required; any other tensor is refused.
Values are checked after the cast to float32: a float64 1e300 is infinite there, and refused. Noise levels are not part of the file: they
belong to the request (x_s = (1 - s) x0 + s eps with seeded eps, timestep 1000 s; see `noise`).

Sources: a file; `synthetic` (Gaussian latents and context, for teachers without a calibration set: every report
labels it synthetic, since it says little about real inputs); the demo teacher's held-out digits, `demo`, come
from the demo (`demo.teacher.demo_calibration`; the core knows nothing of them).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..arch.config import ModelConfig, as_config
from ..errors import ProjectionError
from ..io.checkpoint import PathCheck, _safetensors_infos, read_tensor, resolve_checked
from ..io.inputs import clip, printable, regular_fd
from .budget import check_set

FORMAT = "projection-calibration/1"
MAX_SAMPLES = 4096  # latents per set: the forward runs over all of them
MAX_TOKENS = 1 << 23  # N * H * W latent pixels (1,344 latents of 60x104, a 480x832 frame), bounded before reading
MAX_CONTEXT = 1 << 31  # N * L * text_dim values: 1,024 Wan samples of 512 x 4096 UMT5 states (2^21 each)
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
MAX_SHOWN = 200  # characters of a metadata value shown on screens and in reports
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class Calibration:
    latents: torch.Tensor  # [N, Cin, H, W] float32
    context: torch.Tensor  # [N, L, text_dim] float32
    source: str  # the file, or 'demo' / 'synthetic'
    synthetic: bool = False
    context_lengths: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.latents)

    @cached_property
    def digest(self) -> str:
        """Its contents' digest (latents and context), for cache keys: hashed once per set, not per key."""
        h = hashlib.sha256()
        for t in (self.latents, self.context):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:24]

    @property
    def label(self) -> str:
        """How screens and reports name it (a synthetic set says so)."""
        what = "SYNTHETIC calibration (Gaussian latents and context; not real inputs)" if self.synthetic else (
            self.metadata.get("source", self.source))
        return f"{what}: {len(self)} latents of {'x'.join(map(str, self.latents.shape[1:]))}"

    def subset(self, n: int) -> Calibration:
        keep = slice(0, min(n, len(self)))
        lengths = None if self.context_lengths is None else self.context_lengths[keep]
        return Calibration(self.latents[keep], self.context[keep], self.source, self.synthetic, lengths,
                           self.metadata, {k: v[keep] for k, v in self.extra.items()})


def check_shapes(where: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 config: ModelConfig | dict[str, Any] | None) -> None:
    """Refuse, before reading data, a set whose tensors the teacher cannot take (names the file and tensor)."""
    for name, rank in (("latents", 4), ("context", 3)):
        if name not in shapes:
            raise ProjectionError(f"{where}: no tensor '{name}'; a calibration set holds latents [N, Cin, H, W] and "
                                  "context [N, L, text_dim]")
        if len(shapes[name]) != rank or 0 in shapes[name]:
            raise ProjectionError(f"{where}: tensor '{name}' is {list(shapes[name])}; expected {rank} non-empty axes")
        if dtypes[name] not in FLOATS:
            raise ProjectionError(f"{where}: tensor '{name}' is {str(dtypes[name]).removeprefix('torch.')}; "
                                  "expected a floating-point dtype")
    n, cin, h, w = shapes["latents"]
    if shapes["context"][0] != n:
        raise ProjectionError(f"{where}: tensor 'context' has {shapes['context'][0]} samples, 'latents' {n}")
    if "context_lengths" in shapes:
        if tuple(shapes["context_lengths"]) != (n,):
            raise ProjectionError(f"{where}: tensor 'context_lengths' is {list(shapes['context_lengths'])}; "
                                  f"expected [{n}]")
        if dtypes["context_lengths"] not in INTEGERS:
            raise ProjectionError(f"{where}: tensor 'context_lengths' is "
                                  f"{str(dtypes['context_lengths']).removeprefix('torch.')}; expected an integer dtype")
    for name, shape in shapes.items():
        if name not in ("latents", "context", "context_lengths") and (len(shape) == 0 or shape[0] != n):
            raise ProjectionError(f"{where}: tensor '{clip(name)}' is {list(shape)}; other tensors than latents, "
                                  f"context and context_lengths must be per sample [{n}, ...]")
    if n > MAX_SAMPLES or n * h * w > MAX_TOKENS or math.prod(shapes["context"]) > MAX_CONTEXT:
        raise ProjectionError(f"{where}: {n} latents of {h}x{w} with context {list(shapes['context'][1:])} is more "
                              f"than a calibration set may hold (at most {MAX_SAMPLES} latents, {MAX_TOKENS} latent "
                              f"pixels, {MAX_CONTEXT} context values)")
    if config:
        config = as_config(config)
        if config.in_dim not in (None, cin):
            raise ProjectionError(f"{where}: tensor 'latents' has {cin} channels; the teacher reads {config.in_dim}")
        text = shapes["context"][2]
        if config.text_dim not in (None, text):
            raise ProjectionError(f"{where}: tensor 'context' has width {text}; the teacher's text_dim is "
                                  f"{config.text_dim}")
        if h % 2 or w % 2:
            raise ProjectionError(f"{where}: latents of {h}x{w}: height and width must be even (2x2 patches)")


def check_values(where: str, tensors: dict[str, torch.Tensor]) -> None:
    """Finite once cast to float32 (what the teacher runs on); lengths within the context."""
    for name in ("latents", "context"):
        bad = (~torch.isfinite(tensors[name].float())).sum().item()
        if bad:
            raise ProjectionError(f"{where}: tensor '{name}' holds {bad} NaN or infinite value(s) in float32")
    lengths = tensors.get("context_lengths")
    if lengths is not None:
        tokens = tensors["context"].shape[1]
        bad = ((lengths < 0) | (lengths > tokens)).nonzero().flatten()
        if len(bad):
            i = bad[0].item()
            raise ProjectionError(f"{where}: tensor 'context_lengths' holds {lengths[i].item()} at sample {i}; "
                                  f"lengths are 0..{tokens} (the context's tokens)")


def mask_padding(context: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero every token at or past its sample's length, as Wan's pipelines pad the text encoder's states."""
    keep = torch.arange(context.shape[1]) < lengths.to(torch.int64)[:, None]
    return context * keep[..., None]


def shown(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata as screens and reports may show it: no control characters, at most MAX_SHOWN characters."""
    return {clip(printable(k[:240]), 60): clip(printable(v[:4 * MAX_SHOWN]), MAX_SHOWN) for k, v in metadata.items()}


def load_calibration(path: str | Path, config: ModelConfig | dict[str, Any] | None = None,
                     check: PathCheck | None = None) -> Calibration:
    """A calibration file, checked against the teacher's config (channels, text width) before its data is read.
    `check` sees the path resolved before anything is opened (the app confines it to its roots)."""
    given = Path(path)
    where = str(given)
    if given.suffix != ".safetensors":
        raise ProjectionError(f"{where}: a calibration set is one .safetensors file (latents, context)")
    path = resolve_checked(given, check)
    infos = _safetensors_infos(path)
    check_shapes(where, {k: v.shape for k, v in infos.items()}, {k: v.dtype for k, v in infos.items()}, config)
    check_set(where, infos["latents"].shape, infos["context"].shape)  # the work per latent (budget), before reading
    fd = regular_fd(path)
    try:
        tensors = {k: read_tensor(fd, info).clone() for k, info in infos.items()}
    finally:
        os.close(fd)
    check_values(where, tensors)
    with safe_open(str(path), "pt") as f:
        metadata = shown(dict(f.metadata() or {}))
    lengths = tensors.pop("context_lengths", None)
    latents, context = tensors.pop("latents").float(), tensors.pop("context").float()
    if lengths is not None:
        lengths = lengths.to(torch.int64)
        context = mask_padding(context, lengths)
    return Calibration(latents, context, where, False, lengths, metadata, tensors)


def synthetic_calibration(config: ModelConfig | dict[str, Any], n: int = 16, size: tuple[int, int] = (16, 16), tokens: int = 16,
                          seed: int = 0) -> Calibration:
    """Gaussian latents [n, in_dim, *size] and context [n, tokens, text_dim] (seeded, the global RNG untouched),
    for teachers that come without a calibration set. Labelled synthetic everywhere it is shown."""
    g = torch.Generator().manual_seed(seed)
    config = as_config(config)
    latents = torch.randn(n, config.in_dim, *size, generator=g)
    context = torch.randn(n, tokens, config.text_dim, generator=g)
    return Calibration(latents, context, SYNTHETIC, True, torch.full((n,), tokens),
                       {"format": FORMAT, "source": f"synthetic: standard normal, seed {seed}"})


def open_calibration(spec: str | Path, config: ModelConfig | dict[str, Any], check: PathCheck | None = None) -> Calibration:
    """`synthetic`, or a file path (seen by `check`); checked against the teacher's config. (The demo's held-out
    digits, `demo`, are opened by `demo.teacher.open_calibration`, which passes other sources on to this.)"""
    if str(spec) == SYNTHETIC:
        return synthetic_calibration(config)
    return load_calibration(spec, config, check)
