"""Wan 2.1's linear latent-to-RGB preview (ComfyUI's table, from the shared Wan reference)."""
from __future__ import annotations

import pytest
import torch

from projection import ProjectionError
from projection.demo.preview import LATENTS_MEAN, LATENTS_STD, wan21_rgb_preview


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


WAN16 = dict(dim=32, num_heads=2, ffn_dim=48, num_layers=2, in_dim=16, out_dim=16, text_dim=24, freq_dim=16)


def test_preview_rows_draw_the_first_prompts_through_the_rgb_preview():
    from projection.demo.gallery import PREVIEW_COLUMNS, preview_row, strip
    from projection.demo.sampling import sample
    from projection.engine.build import random_student
    from projection.function.calibration import Calibration
    from projection.function.fidelity import teacher_reference

    g = torch.Generator().manual_seed(3)
    calibration = Calibration(torch.randn(10, 16, 4, 6, generator=g), torch.randn(10, 5, 24, generator=g), "test")
    teacher, student = random_student(WAN16, 0), random_student(WAN16, 1)
    reference = teacher_reference(teacher, calibration.latents, calibration.context)
    row = preview_row("student", student, WAN16, calibration, steps=3, reference=reference)
    expected = sample(student, calibration.context[:PREVIEW_COLUMNS], list(range(PREVIEW_COLUMNS)), (16, 4, 6), steps=3)
    assert row.images.shape == (PREVIEW_COLUMNS, 3, 4, 6)
    assert torch.allclose(row.images, ((wan21_rgb_preview(expected) + 1) / 2).clamp(0, 1))
    assert row.prompt_accuracy is None and row.scored == 0 and row.velocity_error > 0
    assert preview_row("teacher", teacher, WAN16, calibration, steps=3).velocity_error is None
    picture = strip(row.images, scale=2, gap=1)
    assert picture.shape == (8, PREVIEW_COLUMNS * 13 - 1, 3)
    assert (picture[:, 12] == 255).all()  # the gap between two previews is white
    assert torch.equal(picture[:2, :2, :].float(), (row.images[0, :, 0, 0] * 255).round().expand(2, 2, 3))


def test_previews_are_refused_where_they_would_mislead_or_cost_too_much():
    from projection.demo.gallery import preview_problem
    from projection.function.calibration import Calibration

    small = Calibration(torch.zeros(1, 16, 8, 8), torch.zeros(1, 5, 24), "test")
    assert preview_problem(WAN16, small) is None
    assert "image-to-video" in preview_problem({**WAN16, "in_dim": 36}, small)
    assert "writes 48 channels" in preview_problem({**WAN16, "in_dim": 48, "out_dim": 48}, small)
    big = Calibration(torch.zeros(1, 16, 80, 80), torch.zeros(1, 5, 24), "test")
    assert "80x80" in preview_problem(WAN16, big)
