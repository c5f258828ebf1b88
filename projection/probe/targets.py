"""The teacher's side of a probe: a calibration set split into a training part and a held-out part, the training
stream every candidate sees, and the teacher's velocity on both, computed once and kept in the user's cache.

The stream is fixed by a seed: step i trains on the latents `order[i]` (fresh permutations of the training part, as
epochs), at noise levels (uniform in the teacher's band) and noise drawn from step i's own generator, so
every candidate, rate and budget sees the same inputs in the same order, and a budget of N steps is the first N
steps of a longer one. The teacher computes its velocity on every step's inputs in as few streamed passes as the work
bound allows (one block of weights in memory at a time); the held-out part is measured as every fidelity is
(`fidelity.teacher_reference`: fixed noise, stratified levels).
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
from ..errors import ProjectionError
from ..function.budget import check_work
from ..function.calibration import Calibration
from ..function.fidelity import Reference, teacher_reference
from ..function.forward import StreamedTeacher, predict
from ..function.noise import TIMESTEPS, add_noise, noised_set
from ..io.diskcache import cache_dir, cached, checked_tensors

CACHE_VERSION = "1"
MAX_TARGET_BYTES = 8 << 30  # the teacher's velocities a probe keeps (memory and the cache entry)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Request:
    """What decides the teacher's targets (with the teacher and the set): the training stream and the held-out
    measurement."""
    steps: int
    batch: int
    holdout: float
    draws: int
    seed: int
    band: tuple[float, float]


def split(calibration: Calibration, holdout: float) -> tuple[Calibration, Calibration]:
    """(training part, held-out part): the last round(holdout * N) latents are held out (at least one, and at least
    one is left to train on)."""
    n = len(calibration)
    held = min(n - 1, max(1, round(holdout * n)))
    if n < 2 or not 0 < holdout < 1:
        raise ProjectionError(f"{calibration.label}: a probe needs at least 2 latents and a held-out share in (0, 1) "
                              f"(got {n} latents, --holdout {holdout:g})")
    keep = lambda part: Calibration(calibration.latents[part], calibration.context[part],  # noqa: E731
                                    calibration.source, calibration.synthetic,
                                    None if calibration.context_lengths is None else calibration.context_lengths[part],
                                    calibration.metadata)
    return keep(slice(0, n - held)), keep(slice(n - held, n))


def step_seed(seed: int, step: int) -> int:
    """Step `step`'s noise seed: the first 63 bits of sha256("probe/{seed}/{step}"), independent of other steps."""
    return int.from_bytes(hashlib.sha256(f"probe/{seed}/{step}".encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Stream:
    """The training inputs of steps 0..steps-1: `order` [steps, batch] indexes the training part; step i draws its
    noise levels (uniform in `band`) and its noise from its own generator (`step_seed`)."""
    latents: torch.Tensor
    context: torch.Tensor
    order: torch.Tensor
    band: tuple[float, float]
    seed: int

    @classmethod
    def of(cls, train: Calibration, request: Request) -> Stream:
        g = torch.Generator().manual_seed(request.seed)
        need, n = request.steps * request.batch, len(train)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])[:need]
        return cls(train.latents, train.context, order.reshape(request.steps, request.batch), request.band,
                   request.seed)

    def inputs(self, steps: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_s, t, context) of these steps, step-major."""
        idx = self.order[steps.start:steps.stop].reshape(-1)
        x0, (lo, hi), b = self.latents[idx], self.band, self.order.shape[1]
        eps, s = [], []
        for i in steps:
            g = torch.Generator().manual_seed(step_seed(self.seed, i))
            s.append(lo + (hi - lo) * torch.rand(b, generator=g))
            eps.append(torch.randn(b, *x0.shape[1:], generator=g))
        s = torch.cat(s)
        return add_noise(x0, torch.cat(eps), s), TIMESTEPS * s, self.context[idx]


@dataclass(frozen=True)
class Targets:
    """The stream, the teacher's velocity at each of its inputs ([steps * batch, Cout, H, W], step-major) and the
    held-out reference; `passes`: the teacher's streamed passes this took (0: read from the cache)."""
    stream: Stream
    velocity: torch.Tensor
    reference: Reference
    passes: int

    @property
    def steps(self) -> int:
        return self.stream.order.shape[0]

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(x_s, t, context, teacher velocity) of one step, on `device`."""
        x, t, ctx = self.stream.inputs(range(step, step + 1))
        b = self.stream.order.shape[1]
        v = self.velocity[step * b:(step + 1) * b]
        return tuple(a.to(device) for a in (x, t, ctx, v))


def target_bytes(train: Calibration, request: Request, out_dim: int) -> int:
    return 4 * request.steps * request.batch * out_dim * math.prod(train.latents.shape[2:])


def steps_per_pass(teacher: ModelView, train: Calibration, request: Request) -> int:
    """The most steps whose inputs one streamed pass may run within the work bound (`budget.check_work`); the bound's
    own error when not even one step fits."""
    shape, ctx = tuple(train.latents.shape[1:]), tuple(train.context.shape[1:])
    n = request.steps
    while True:
        try:
            check_work("the probe's training batches", (n * request.batch, *shape), (n * request.batch, *ctx),
                       teacher.config, 1)
            return n
        except ProjectionError:
            if n == 1:
                raise
            n = (n + 1) // 2


def compute(teacher: ModelView, stream: Stream, train: Calibration, heldout: Calibration, request: Request,
            device: torch.device, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(training velocities, held-out velocities, passes): the teacher streamed, one block of weights at a time."""
    streamed = StreamedTeacher(teacher, device)
    per = steps_per_pass(teacher, train, request)
    parts, starts = [], range(0, request.steps, per)
    for k, start in enumerate(starts):
        checkpoint()
        if progress:
            progress(k, len(starts) + 1, "the teacher's velocity on the training batches")
        parts.append(predict(streamed, *stream.inputs(range(start, min(start + per, request.steps)))))
    if progress:
        progress(len(starts), len(starts) + 1, "the teacher's velocity on the held-out latents")
    reference = teacher_reference(streamed, heldout.latents, heldout.context, request.draws, request.seed,
                                  request.band, "the probe's held-out latents")
    return torch.cat(parts), reference.velocity, len(starts) + 1


def cache_key(fingerprint: str, calibration: Calibration, request: Request) -> str:
    about = [CACHE_VERSION, fingerprint, calibration.digest, request.steps, request.batch,
             request.holdout, request.draws, request.seed, list(request.band)]
    return hashlib.sha256(json.dumps(about).encode()).hexdigest()[:32]


def teacher_targets(teacher: ModelView, fingerprint: str, calibration: Calibration, request: Request,
                    device: torch.device, cache: Path | None = None, progress: Progress | None = None) -> Targets:
    """The probe's targets on `calibration` (split by `request.holdout`), through the on-disk cache: a second probe
    of the same teacher, set and request reads no teacher weights. Refused before any work when the velocities
    would pass MAX_TARGET_BYTES."""
    train, heldout = split(calibration, request.holdout)
    out_dim = int(teacher.config.out_dim or train.latents.shape[1])
    size = target_bytes(train, request, out_dim)
    if size > MAX_TARGET_BYTES:
        raise ProjectionError(f"{calibration.label}: {request.steps} steps x batch {request.batch} of teacher "
                              f"velocities is {size:,} bytes; at most {MAX_TARGET_BYTES:,}: use fewer --steps or a "
                              "smaller --batch")
    stream = Stream.of(train, request)
    x, t, ctx = noised_set(heldout.latents, heldout.context, request.draws, request.seed, request.band)
    shapes = {"velocity": (request.steps * request.batch, out_dim, *train.latents.shape[2:]),
              "heldout": (len(x), out_dim, *heldout.latents.shape[2:])}
    passes = 0

    def run() -> dict[str, torch.Tensor]:
        nonlocal passes
        velocity, held, passes = compute(teacher, stream, train, heldout, request, device, progress)
        return {"velocity": velocity.contiguous(), "heldout": held.contiguous()}

    def load(data: bytes) -> dict[str, torch.Tensor]:
        return checked_tensors(load_safetensors(data), shapes, torch.float32)

    key = cache_key(fingerprint, calibration, request)
    limit = 4 * sum(math.prod(s) for s in shapes.values()) + (1 << 16)
    found = cached(fingerprint, (cache_dir() if cache is None else cache) / "probe" / f"{key}.safetensors", limit,
                   load, run, save_safetensors)
    reference = Reference(x, t, ctx, found["heldout"], request.draws, request.band)
    return Targets(stream, found["velocity"], reference, passes)
