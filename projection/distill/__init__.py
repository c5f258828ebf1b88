"""Distillation from the teacher a student was projected from: the loss and its noise levels (`loss.py`)."""
from .loss import Hints, distill_loss, noise_band, sample_levels

__all__ = ["Hints", "distill_loss", "noise_band", "sample_levels"]
