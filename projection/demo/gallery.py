"""A gallery: the same prompts and noise seeds drawn by several models (the teacher, projected students, a random
student of the same shape), each scored, so a projection choice is judged by what the student draws.

For the demo's latent space (4 channels of 8 x 8, the digits' prompt states) samples decode exactly to pixels and
are scored by prompt accuracy (`classifier.py`). For Wan's 16-channel latents (`preview_row`), samples are drawn
for the first prompts of a calibration set and shown through Wan 2.1's linear latent-to-RGB preview (`preview.py`:
colours and coarse layout, not a VAE decode); there is no classifier to score them, so rows carry the velocity
error only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import digits
from ..arch.config import ModelConfig, as_config
from ..errors import ProjectionError
from ..function import budget
from ..function.calibration import Calibration
from ..function.fidelity import Reference
from .classifier import DigitClassifier
from .preview import RGB_FACTORS, wan21_rgb_preview
from .sampling import sample
from .teacher import Sampler, generate

PREVIEW_COLUMNS = 8  # samples per preview row: the calibration set's first prompts, seeds 0, 1, ...
MAX_PREVIEW_PIXELS = 64 * 64  # latent pixels per sample (a 512 x 512 image for Wan's VAE)


def demo_space(config: ModelConfig | dict[str, Any]) -> bool:
    """Whether a model reads and writes the demo's latents and prompt states (so digits decode and score)."""
    config = as_config(config)
    return (config.in_dim, config.out_dim, config.text_dim) == (
        digits.CHANNELS, digits.CHANNELS, digits.TEXT_DIM)


@dataclass(frozen=True)
class GalleryRow:
    name: str
    images: torch.Tensor  # in [0, 1], one sample per shown prompt: digits [columns, 8, 8]; previews [columns, 3, H, W]
    prompt_accuracy: float | None  # over every scored sample, not only the shown ones; None: nothing scores them
    scored: int  # samples scored (0 for previews)
    velocity_error: float | None  # relative to the teacher at the same inputs (None for the teacher)


def preview_problem(config: ModelConfig | dict[str, Any], calibration: Calibration) -> str | None:
    """Why `preview_row` cannot draw this teacher's samples on `calibration`, or None when it can."""
    config = as_config(config)
    channels = config.out_dim
    if config.in_dim != channels:
        return (f"this teacher reads {config.in_dim} channels and writes {channels} (image-to-video: it "
                "needs its conditioning frames); the preview samples text-to-video teachers")
    if channels != len(RGB_FACTORS):
        return (f"the RGB preview is Wan 2.1's, for 16-channel latents; this teacher writes {channels} channels "
                "(only the demo's digits and Wan's 16-channel latents are drawn)")
    h, w = calibration.latents.shape[-2:]
    if h * w > MAX_PREVIEW_PIXELS:
        return (f"the calibration set's latents are {h}x{w}; previews are drawn up to {MAX_PREVIEW_PIXELS} latent "
                "pixels per sample (e.g. 64x64)")
    return None


def preview_row(name: str, model: nn.Module, config: dict[str, Any], calibration: Calibration, steps: int = 20,
                reference: Reference | None = None) -> GalleryRow:
    """One model's samples (the teacher's `config`) for the first PREVIEW_COLUMNS prompts of `calibration` (seed i
    for prompt i), Euler steps without guidance, at the set's latent size, as RGB previews; a student's velocity
    error is scored against `reference` (the teacher's velocities on the set, computed once for every row)."""
    why = preview_problem(config, calibration)
    if why:
        raise ProjectionError(why)
    context = calibration.context[:PREVIEW_COLUMNS]
    shown = (len(context), *calibration.latents.shape[1:])  # the samples drawn, one model forward per step
    budget.check_work(calibration.source, shown, tuple(context.shape), config, 1, models=2)
    latents = sample(model, context, list(range(len(context))), calibration.latents.shape[1:], steps=steps)
    images = ((wan21_rgb_preview(latents) + 1) / 2).clamp(0, 1)
    error = reference.score(model).relative_error if reference is not None else None
    return GalleryRow(name, images, None, 0, error)


def draw_row(name: str, model: nn.Module, classifier: DigitClassifier, sampler: Sampler,
             reference: Reference | None = None) -> GalleryRow:
    """One model's row: per digit, the sample of seed 0 is shown; all `sampler.per_class` seeds per digit are
    scored. The teacher's row has no velocity error; a student's is scored against `reference` (the teacher's
    velocities on a calibration set, computed once for every row)."""
    labels = sampler.labels()
    images = generate(model, labels, list(range(len(labels))), sampler)
    accuracy = classifier.prompt_accuracy(images, labels)
    shown = images[: digits.NUM_CLASSES].clamp(0, 1)  # seeds 0..9 are digits 0..9
    error = reference.score(model).relative_error if reference is not None else None
    return GalleryRow(name, shown, accuracy, len(labels), error)


def strip(images: torch.Tensor, scale: int = 6, gap: int = 2) -> torch.Tensor:
    """Digits [N, h, w] in [0, 1] -> one uint8 picture [scale h, N (scale w + gap) - gap] (dark ink on white);
    RGB previews [N, 3, h, w] -> [scale h, ..., 3] (as they are, white gaps). Pixels enlarged without smoothing."""
    rgb = images.dim() == 4
    pictures = images.permute(0, 2, 3, 1) if rgb else 1 - images  # [N, h, w(, 3)]
    n, h, w = pictures.shape[:3]
    big = pictures.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    out = torch.ones(scale * h, n * (scale * w + gap) - gap, *pictures.shape[3:])
    for i in range(n):
        x = i * (scale * w + gap)
        out[:, x: x + scale * w] = big[i]
    return (out * 255).round().to(torch.uint8)
