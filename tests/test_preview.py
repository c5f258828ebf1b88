"""Wan 2.1's linear latent-to-RGB preview (ComfyUI's table, from the shared Wan reference)."""
from __future__ import annotations

import pytest
import torch

from projection import ProjectionError
from projection.preview import LATENTS_MEAN, LATENTS_STD, wan21_rgb_preview


def test_a_pixel_is_the_table_row_sum_plus_bias():
    raw = torch.zeros(1, 16, 2, 3)
    assert torch.allclose(wan21_rgb_preview(raw, normalized=False)[0, :, 1, 2], torch.tensor([-0.1835, -0.0868, -0.3360]))
    raw[0, 2, 1, 2] = 1.0  # channel 2 alone: its row (0.3568, 0.2548, 0.1747) added to the bias
    rgb = wan21_rgb_preview(raw, normalized=False)
    assert torch.allclose(rgb[0, :, 1, 2], torch.tensor([0.3568 - 0.1835, 0.2548 - 0.0868, 0.1747 - 0.3360]))
    assert torch.allclose(rgb[0, :, 0, 0], torch.tensor([-0.1835, -0.0868, -0.3360]))  # other pixels untouched


def test_normalized_latents_are_mapped_back_first():
    raw = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)) * 2
    normalized = (raw - LATENTS_MEAN[:, None, None]) / LATENTS_STD[:, None, None]
    assert torch.allclose(wan21_rgb_preview(normalized), wan21_rgb_preview(raw, normalized=False), atol=1e-5)


def test_other_channel_counts_are_refused():
    with pytest.raises(ProjectionError, match=r"\[N, 16, H, W\], got \[1, 48, 8, 8\]"):
        wan21_rgb_preview(torch.zeros(1, 48, 8, 8))
