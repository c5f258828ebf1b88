"""The distillation loss the product ships (`projection.distill`): the output term, the per-block hints on the kept
residual channels, the teacher in memory or streamed, and the noise levels of a Wan 2.2 expert."""
from __future__ import annotations

import shutil

import pytest
import torch

from projection import Projector, projected_student
from projection.arch.wan import WanLite
from projection.core.models import open_teacher
from projection.demo import digits, teacher as dt
from projection.demo.training import TrainConfig, train_flow
from projection.distill import Hints, distill_loss, noise_band, sample_levels
from projection.errors import ProjectionError
from projection.function.forward import StreamedTeacher

TEACHER = str(dt.ASSETS / "teacher-wan")
HALF = {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}
TINY = dict(in_dim=4, out_dim=4, text_dim=digits.TEXT_DIM, freq_dim=16)


def batch(n: int = 8, seed: int = 0):
    data = digits.load_digits("val")
    g = torch.Generator().manual_seed(seed)
    x0, ctx = digits.encode(data.images[:n]), digits.label_states(data.labels[:n])
    return x0, ctx, torch.randn(x0.shape, generator=g), torch.rand(n, generator=g)


def seeded(seed: int, **config) -> WanLite:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanLite(**config, **TINY)


@pytest.fixture(scope="module")
def teacher():
    return dt.load_teacher()


def test_a_student_that_is_the_teacher_has_zero_loss(teacher):
    projector = Projector.open(TEACHER, {"layout": "wanlite"})
    hints = Hints.from_projector(projector)
    assert hints.teacher_blocks == tuple(range(8)) and (hints.kept is None or len(hints.kept) == 128)
    loss, parts = distill_loss(projected_student(projector), teacher, *batch(), hints=hints, hint_weight=1.0)
    assert loss.item() < 1e-10 and parts["output"] < 1e-10 and parts["hint"] < 1e-10


def test_the_hint_term_is_the_normalized_error_on_the_kept_channels():
    """A 2-block teacher of width 32 and a 1-block student of width 16 hinted on teacher block 1's even channels:
    the hint equals |h_s - g_1[kept]|^2 / |g_1[kept]|^2 computed by hand, and the loss adds it times the weight."""
    big, small = seeded(0, dim=32, ffn_dim=32, num_heads=2, num_layers=2), seeded(1, dim=16, ffn_dim=16, num_heads=2,
                                                                                   num_layers=1)
    kept = torch.arange(0, 32, 2)
    x0, ctx, eps, s = batch(4)
    loss, parts = distill_loss(small, big, x0, ctx, eps, s, Hints((1,), kept), hint_weight=0.5)
    x, t = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps, 1000 * s
    with torch.no_grad():
        e = big.embed(x, t, ctx)
        g = big.blocks[1](big.blocks[0](e.tokens, e.e0, e.ctx, e.freqs), e.e0, e.ctx, e.freqs)[..., kept]
        f = small.embed(x, t, ctx)
        h = small.blocks[0](f.tokens, f.e0, f.ctx, f.freqs)
        output = (small(x, t, ctx) - big(x, t, ctx)).pow(2).mean().item()
    hint = ((h - g).pow(2).sum() / g.pow(2).sum()).item()
    assert parts["hint"] == pytest.approx(hint, rel=1e-5) and parts["output"] == pytest.approx(output, rel=1e-5)
    assert loss.item() == pytest.approx(output + 0.5 * hint, rel=1e-5)
    unhinted, plain = distill_loss(small, big, x0, ctx, eps, s, Hints((1,), kept), hint_weight=0.0)
    assert "hint" not in plain and unhinted.item() == pytest.approx(output, rel=1e-5)
    with pytest.raises(ProjectionError, match="hints for 2 blocks; the student has 1"):
        distill_loss(small, big, x0, ctx, eps, s, Hints((0, 1), kept), hint_weight=1.0)
    with pytest.raises(ProjectionError, match="must be the student's width"):
        distill_loss(small, big, x0, ctx, eps, s, Hints((1,), None), hint_weight=1.0)


def test_the_streamed_teacher_gives_the_in_memory_teachers_loss_and_gradients(teacher):
    projector = Projector.open(TEACHER, {"layout": "wanlite", **HALF})
    hints = Hints.from_projector(projector)
    assert hints.teacher_blocks == (0, 1, 2, 3) and len(hints.kept) == 64  # the default: first blocks, magnitude
    streamed = StreamedTeacher(open_teacher(TEACHER), micro_batch=3)  # several micro-batches per block
    grads = []
    for target in (teacher, streamed):
        student = projected_student(projector)
        loss, parts = distill_loss(student, target, *batch(8), hints=hints, hint_weight=1.0)
        loss.backward()
        grads.append((loss.item(), parts, student.blocks[0].ffn[0].weight.grad.clone()))
    (a, pa, ga), (b, pb, gb) = grads
    assert b == pytest.approx(a, rel=1e-5) and pb["hint"] == pytest.approx(pa["hint"], rel=1e-5) and pa["hint"] > 0.01
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)


def test_noise_levels_fall_in_the_experts_band(tmp_path):
    root = tmp_path / "wan22"
    for folder in ("high_noise_model", "low_noise_model"):
        shutil.copytree(TEACHER, root / folder)
    high, low = open_teacher(str(root), "high"), open_teacher(str(root), "low")
    assert noise_band(high) == (0.875, 1.0) and noise_band(low) == (0.0, 0.875)
    assert noise_band(StreamedTeacher(high)) == (0.875, 1.0)
    assert noise_band(open_teacher(TEACHER)) == noise_band(dt.load_teacher()) == (0.0, 1.0)
    s = sample_levels(2000, torch.Generator().manual_seed(0), noise_band(high))
    assert s.min() >= 0.875 and s.max() <= 1.0 and s.max() - s.min() > 0.12  # the whole band, nothing outside
    g, h = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_levels(5, g), torch.rand(5, generator=h))  # [0, 1]: the trainer's draws unchanged
    with pytest.raises(ProjectionError, match=r"noise band \(0.5, 0.5\)"):
        sample_levels(3, g, (0.5, 0.5))


def test_distillation_with_hints_trains_without_the_global_rng(teacher):
    """The trainer's distilled objective is `distill_loss`: hints change the trained weights, and nothing draws
    from torch's global generator."""
    projector = Projector.open(TEACHER, {"layout": "wanlite", **HALF})
    hints = Hints.from_projector(projector)
    x0, ctx, _, _ = batch(32)
    config = TrainConfig(steps=3, batch=8, lr=4e-3, warmup=1, eval_every=3, val_draws=1)
    state = torch.random.get_rng_state()
    weights = []
    for w in (0.0, 1.0):
        student = projected_student(projector)
        train_flow(student, x0, ctx, digits.empty_states(), x0[:8], ctx[:8], config, teacher=teacher, hints=hints,
                   hint_weight=w)
        weights.append(student.blocks[0].ffn[0].weight.detach().clone())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(weights[0], weights[1])
