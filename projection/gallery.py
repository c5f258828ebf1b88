"""A gallery: the same prompts and noise seeds drawn by several models (the teacher, projected students, a random
student of the same shape), each scored, so a projection choice is judged by what the student draws.

For the demo's latent space (4 channels of 8 x 8, the digits' prompt states) samples decode exactly to pixels and
are scored by prompt accuracy (`classifier.py`); that is where the gallery runs today. A function-measurement
run on other teachers needs the streamed teacher forward (not in memory) and a calibration set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import digits
from .calibration import Calibration
from .classifier import DigitClassifier
from .demo_teacher import Sampler, generate
from .fidelity import velocity_fidelity


def demo_space(config: dict[str, Any]) -> bool:
    """Whether a model reads and writes the demo's latents and prompt states (so digits decode and score)."""
    return (config.get("in_dim"), config.get("out_dim"), config.get("text_dim")) == (
        digits.CHANNELS, digits.CHANNELS, digits.TEXT_DIM)


@dataclass(frozen=True)
class GalleryRow:
    name: str
    images: torch.Tensor  # [columns, 8, 8] in [0, 1]: one sample per shown prompt
    prompt_accuracy: float  # over every scored sample, not only the shown ones
    scored: int  # samples scored
    velocity_error: float | None  # relative to the teacher at the same inputs (None for the teacher)


def draw_row(name: str, model: nn.Module, classifier: DigitClassifier, sampler: Sampler,
             teacher: nn.Module | None = None, calibration: Calibration | None = None) -> GalleryRow:
    """One model's row: per digit, the sample of seed 0 is shown; all `sampler.per_class` seeds per digit are
    scored. The teacher's row has no velocity error; a student's is measured on `calibration` (latents, context)."""
    labels = sampler.labels()
    images = generate(model, labels, list(range(len(labels))), sampler)
    accuracy = classifier.prompt_accuracy(images, labels)
    shown = images[: digits.NUM_CLASSES].clamp(0, 1)  # seeds 0..9 are digits 0..9
    error = None
    if teacher is not None and calibration is not None:
        error = velocity_fidelity(model, teacher, calibration.latents, calibration.context).relative_error
    return GalleryRow(name, shown, accuracy, len(labels), error)


def strip(images: torch.Tensor, scale: int = 6, gap: int = 2) -> torch.Tensor:
    """[N, h, w] in [0, 1] -> one uint8 picture [scale h, N (scale w + gap) - gap] (dark ink on white), pixels
    enlarged without smoothing."""
    n, h, w = images.shape
    big = images.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    out = torch.ones(scale * h, n * (scale * w + gap) - gap)
    for i in range(n):
        x = i * (scale * w + gap)
        out[:, x: x + scale * w] = 1 - big[i]
    return (out * 255).round().to(torch.uint8)
