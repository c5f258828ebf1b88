"""The flow-matching trainer: its schedule, reproducibility, and the same data order for every model."""
from __future__ import annotations

import torch

from projection.arch.wan import WanLite
from projection.demo import digits
from projection.demo.training import TrainConfig, learning_rate, train_flow

TINY = dict(dim=32, ffn_dim=32, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=digits.TEXT_DIM,
            freq_dim=16)


def tiny_model(seed: int) -> WanLite:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanLite(**TINY)


def tiny_data(n: int = 40):
    data = digits.load_digits("val")
    return digits.encode(data.images[:n]), digits.label_states(data.labels[:n])


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == 1e-4 and learning_rate(9, cfg) == 1e-3
    assert abs(learning_rate(55, cfg) - 0.55e-3) < 1e-12  # half way down the cosine
    assert abs(learning_rate(100, cfg) - 1e-4) < 1e-12
    lrs = [learning_rate(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_training_is_reproducible_and_lowers_the_validation_loss():
    latents, context = tiny_data()
    cfg = TrainConfig(steps=20, batch=16, lr=3e-3, warmup=3, eval_every=10, val_draws=2, seed=3)
    runs = []
    for _ in range(2):
        model = tiny_model(0)
        history = train_flow(model, latents, context, digits.empty_states(), latents, context, cfg)
        runs.append((model.state_dict(), history))
    (first, h1), (second, h2) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert h1.val_loss == h2.val_loss and h1.steps == [0, 10, 20]
    assert h1.val_loss[-1] < 0.8 * h1.val_loss[0]
    assert h1.train_loss[0] is None and all(v is not None for v in h1.train_loss[1:])


def test_every_model_sees_the_same_data_in_the_same_order():
    """What a convergence comparison needs: the batches depend on the config's seed, not on the model."""
    latents, context = tiny_data()
    cfg = TrainConfig(steps=5, batch=8, warmup=1, eval_every=100, val_draws=1, drop_prompt=0.5)
    seen = []
    for seed in (0, 1):
        model, inputs = tiny_model(seed), []
        model.register_forward_hook(lambda m, args, out: inputs.append([a.clone() for a in args]) if m.training else None)
        train_flow(model, latents, context, digits.empty_states(), latents[:4], context[:4], cfg)
        seen.append(inputs)
    assert len(seen[0]) == 5
    for a, b in zip(*seen):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    dropped = [(ctx.abs().sum(dim=(1, 2)) == 0).sum().item() for _, _, ctx in seen[0]]
    assert 0 < sum(dropped) < 5 * 8  # some samples train on the empty prompt, not all
    other = TrainConfig(**{**cfg.to_dict(), "seed": 1})
    model, inputs = tiny_model(0), []
    model.register_forward_hook(lambda m, args, out: inputs.append(args[0].clone()) if m.training else None)
    train_flow(model, latents, context, digits.empty_states(), latents[:4], context[:4], other)
    assert not torch.equal(inputs[0], seen[0][0][0])
