"""Rectified flow: noising, the objective, and the Euler sampler against velocities whose answer is known."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from projection.arch.wan import WanLite
from projection.demo.sampling import flow_loss, sample, schedule, seeded_noise, validation_loss, velocity_target
from projection.function.noise import add_noise

SHAPE = (4, 8, 8)


class Oracle(nn.Module):
    """A velocity model given as a function of (x, s): the exact field of a known data distribution."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler finds the device through a parameter
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, context):
        self.calls.append(t.clone())
        return self.field(x, (t / 1000).reshape(-1, 1, 1, 1), context)


def test_noising_and_target_follow_wan():
    x0, eps = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    s = torch.tensor([0.0, 1.0])
    noisy = add_noise(x0, eps, s)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], eps[1])
    assert torch.allclose(add_noise(x0, eps, torch.tensor([0.25, 0.25])), 0.75 * x0 + 0.25 * eps)
    assert torch.equal(velocity_target(x0, eps), eps - x0)


def test_flow_loss_is_zero_for_the_true_velocity_and_gets_timestep_1000s():
    x0, eps, s = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE), torch.tensor([0.1, 0.5, 0.9])
    oracle = Oracle(lambda x, s_, c: eps - x0)
    assert flow_loss(oracle, x0, torch.zeros(3, 1, 1), eps, s).item() == 0
    assert torch.allclose(oracle.calls[0], 1000 * s)
    wrong = Oracle(lambda x, s_, c: eps - x0 + 1)
    assert abs(flow_loss(wrong, x0, torch.zeros(3, 1, 1), eps, s).item() - 1) < 1e-6


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_euler_brings_noise_exactly_onto_a_point_mass(steps):
    """Data = one point mu: the field (x - mu) / s has straight paths, which Euler follows exactly."""
    mu = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(5))
    oracle = Oracle(lambda x, s, c: (x - mu) / s)
    out = sample(oracle, torch.zeros(4, 1, 1), [0, 1, 2, 3], SHAPE, steps=steps)
    assert (out - mu).abs().max() < 1e-5
    assert len(oracle.calls) == steps and oracle.calls[0][0] == 1000  # starts from pure noise at t = 1000


def test_euler_carries_each_seed_to_its_gaussian_image():
    """Data = N(mu, sigma^2): the exact field sends noise eps to mu + sigma eps; Euler converges to it."""
    mu, sigma = 0.7, 0.3

    def field(x, s, c):  # E[eps - x0 | x_s]
        a, b = (1 - s) * sigma, s
        r = x - (1 - s) * mu
        return (b - sigma * a) / (a * a + b * b) * r - mu

    out = sample(Oracle(field), torch.zeros(3, 1, 1), [10, 11, 12], SHAPE, steps=400)
    assert (out - (mu + sigma * seeded_noise([10, 11, 12], SHAPE))).abs().max() < 5e-3


def test_guidance_mixes_the_prompt_and_the_empty_prompt():
    """Constant velocities integrate exactly: x_0 = eps - v, with v = v_empty + g (v_prompt - v_empty)."""
    oracle = Oracle(lambda x, s, c: torch.where(c.abs().sum(dim=(1, 2)).reshape(-1, 1, 1, 1) > 0, 2.0, -1.0)
                    .expand_as(x))
    prompts, empty = torch.ones(2, 3, 5), torch.zeros(1, 3, 5)
    eps = seeded_noise([7, 8], SHAPE)
    plain = sample(oracle, prompts, [7, 8], SHAPE, steps=4)
    assert torch.allclose(plain, eps - 2.0, atol=1e-6)
    guided = sample(oracle, prompts, [7, 8], SHAPE, steps=4, guidance=3.0, negative=empty)
    assert torch.allclose(guided, eps - (-1.0 + 3.0 * (2.0 + 1.0)), atol=1e-5)
    with pytest.raises(ValueError, match="empty prompt"):
        sample(oracle, prompts, [7, 8], SHAPE, guidance=3.0)
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        sample(oracle, prompts, [1, 2, 3], SHAPE)


def test_samples_are_deterministic_per_seed_whatever_the_batch():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanLite(dim=32, ffn_dim=32, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=8,
                        freq_dim=16).eval()
    context = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    both = sample(model, context, [3, 5, 9], SHAPE, steps=5)
    assert torch.equal(both, sample(model, context, [3, 5, 9], SHAPE, steps=5))
    alone = sample(model, context[1:2], [5], SHAPE, steps=5)
    assert torch.allclose(alone[0], both[1], atol=1e-5)
    assert not torch.allclose(both[0], both[2])


def test_schedule_runs_from_noise_to_data_and_shifts_like_wan():
    s = schedule(4)
    assert s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = schedule(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and abs(shifted[2].item() - 0.75) < 1e-12  # 3 * .5 / (1 + 2 * .5)
    assert (shifted.diff() < 0).all()


def test_validation_loss_is_the_same_number_every_time():
    oracle = Oracle(lambda x, s, c: x)
    x0 = torch.randn(10, *SHAPE)
    first = validation_loss(oracle, x0, torch.zeros(10, 1, 1), draws=3)
    assert first == validation_loss(oracle, x0, torch.zeros(10, 1, 1), draws=3)
    assert first == pytest.approx(validation_loss(oracle, x0, torch.zeros(10, 1, 1), draws=3, batch=4), rel=1e-6)
    assert first != validation_loss(oracle, x0, torch.zeros(10, 1, 1), draws=3, seed=1)


def test_many_small_samples_run_in_model_calls_of_about_512_tokens():
    """100 digits of 16 tokens: one call of 1,600 tokens per step faulted fresh pages for every intermediate; the
    sampler calls the model on MICRO_BATCH_TOKENS tokens at most, with the same results (guided halves too)."""
    from projection.function.budget import MICRO_BATCH_TOKENS

    oracle = Oracle(lambda x, s, c: x * c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1))
    sizes = []
    oracle.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    context = torch.randn(100, 3, 5, generator=torch.Generator().manual_seed(2))
    out = sample(oracle, context, list(range(100)), SHAPE, steps=3, guidance=2.0, negative=torch.zeros(1, 3, 5))
    assert max(sizes) == MICRO_BATCH_TOKENS // 16 and sum(sizes) == 3 * 200
    eps = seeded_noise(list(range(100)), SHAPE)
    each = torch.cat([sample(oracle, context[i:i + 1], [i], SHAPE, steps=3, guidance=2.0,
                             negative=torch.zeros(1, 3, 5)) for i in (0, 57, 99)])
    assert torch.allclose(out[[0, 57, 99]], each, atol=1e-6) and not torch.allclose(out, eps)
