"""The streamed teacher forward against diffusers' WanTransformer3DModel (the third-party reference), and the
calibration sets it runs on."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file

from conftest import diffusers_kwargs
from projection import Projector, ProjectionError, Strategy, projected_student
from projection.core.models import open_teacher
from projection.demo.teacher import demo_calibration, open_calibration
from projection.function import forward as fw
from projection.function.calibration import load_calibration, synthetic_calibration
from projection.function.fidelity import velocity_fidelity


def batch(cfg: dict, n: int = 5, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, cfg["in_dim"], 6, 8, generator=g), torch.tensor([0.0, 137.0, 500.0, 875.0, 999.0])[:n],
            torch.randn(n, 7, cfg["text_dim"], generator=g))


def reference_blocks(model, x, t, ctx) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """diffusers' output on one frame and every block's output, taken with forward hooks."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in model.blocks]
    try:
        with torch.no_grad():
            out = model(hidden_states=x[:, :, None], timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    return out[:, :, 0], outs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).sum() / b.pow(2).sum()).item()


@pytest.mark.parametrize("fmt", ["diffusers_dir", "original_dir"])
def test_streamed_forward_equals_diffusers_block_by_block(tiny_wan, fmt):
    teacher = open_teacher(str(getattr(tiny_wan, fmt)))
    x, t, ctx = batch(tiny_wan.config)
    ref, ref_blocks = reference_blocks(tiny_wan.model, x, t, ctx)
    seen = {}
    out = fw.StreamedTeacher(teacher, micro_batch=2)(x, t, ctx, lambda i, a, b: seen.setdefault(i, []).append(b))
    assert rel(out, ref) < 1e-10  # relative squared error: a relative error under 1e-5
    assert sorted(seen) == [0, 1, 2]
    for i, expected in enumerate(ref_blocks):
        assert rel(torch.cat(seen[i]), expected) < 1e-10


def test_one_block_of_weights_at_a_time(tiny_wan, monkeypatch):
    teacher = open_teacher(str(tiny_wan.original_dir))
    alive: list[weakref.ref] = []
    read_blocks: list[int] = []
    build = fw.build_block

    def tracked(view, index, device, dtype):
        gc.collect()
        assert all(r() is None for r in alive), "a previous block's weights are still held"
        read_blocks.append(index)
        block = build(view, index, device, dtype)
        alive.append(weakref.ref(block))
        return block

    monkeypatch.setattr(fw, "build_block", tracked)
    keys_read = []
    monkeypatch.setattr(teacher, "read", lambda k, read=teacher.read: keys_read.append(k) or read(k))
    streamed = fw.StreamedTeacher(teacher, micro_batch=2)
    assert not any(k.startswith("blocks.") for k in keys_read)  # the shell holds the embeddings and head only
    streamed(*batch(tiny_wan.config))
    assert read_blocks == [0, 1, 2]
    assert len([k for k in keys_read if k.startswith("blocks.")]) == 3 * len([k for k in keys_read
                                                                                if k.startswith("blocks.0.")])


def test_small_latents_stream_in_micro_batches_of_about_512_tokens(tiny_wan):
    """8 latents of a few tokens each are too many tiny operations: small latents go in micro-batches of up to
    MICRO_BATCH_TOKENS tokens; large ones in MICRO_BATCH latents; a micro_batch given is kept."""
    from projection.function import budget

    teacher = open_teacher(str(tiny_wan.original_dir))
    ctx = torch.zeros(300, 7, tiny_wan.config["text_dim"])
    small = fw.StreamedTeacher(teacher).chunks(torch.zeros(300, 4, 8, 8), ctx)  # 16 tokens per latent
    assert small[0] == slice(0, budget.MICRO_BATCH_TOKENS // 16) and len(small) == -(-300 // 32)
    large = fw.StreamedTeacher(teacher).chunks(torch.zeros(20, 4, 64, 64), ctx[:20])  # 1,024 tokens per latent
    assert large[0] == slice(0, budget.MICRO_BATCH)
    assert fw.StreamedTeacher(teacher, micro_batch=2).chunks(torch.zeros(6, 4, 8, 8), ctx[:6])[0] == slice(0, 2)


def test_a_depth_only_student_has_the_error_of_the_teacher_without_those_blocks(tiny_wan):
    """Fidelity's exactness: computed independently with diffusers' model with the other blocks removed."""
    from diffusers import WanTransformer3DModel

    layers = [0, 2]
    student = projected_student(Projector.open(str(tiny_wan.diffusers_dir), {"layout": "wanlite", "num_layers": 2},
                                               strategy=Strategy(layers=layers)))
    pruned = WanTransformer3DModel(**diffusers_kwargs({**tiny_wan.config, "num_layers": 2})).eval()
    state = {k: v for k, v in tiny_wan.model.state_dict().items() if not k.startswith("blocks.")}
    for new, old in enumerate(layers):
        prefix = f"blocks.{old}."
        state.update({f"blocks.{new}." + k[len(prefix):]: v for k, v in tiny_wan.model.state_dict().items()
                      if k.startswith(prefix)})
    pruned.load_state_dict(state)
    x, t, ctx = batch(tiny_wan.config)
    teacher = fw.StreamedTeacher(open_teacher(str(tiny_wan.diffusers_dir)))
    full, _ = reference_blocks(tiny_wan.model, x, t, ctx)
    cut, _ = reference_blocks(pruned, x, t, ctx)
    expected = rel(cut, full)
    assert expected > 0.01
    from projection.function.fidelity import compare
    from projection.function.forward import predict

    measured = compare(predict(student, x, t, ctx), predict(teacher, x, t, ctx), draws=1).relative_error
    assert measured == pytest.approx(expected, rel=1e-4)
    # the same through the calibration path (noised inputs): zero for the teacher's own blocks
    same = fw.StreamedTeacher(open_teacher(str(tiny_wan.original_dir)))
    identity = velocity_fidelity(same, teacher, x, ctx, draws=2)
    assert identity.relative_error < 1e-12


def test_streamed_forward_refuses_what_it_cannot_run(tiny_wan):
    with pytest.raises(ProjectionError, match="blocks 0..2"):
        fw.StreamedTeacher(open_teacher(str(tiny_wan.original_dir)), blocks=[0, 3])


# ------------------------------------------------------------------ calibration sets


def test_calibration_files_are_read_and_checked_against_the_teacher(tiny_wan, tmp_path):
    cfg = tiny_wan.config
    good = tmp_path / "calib.safetensors"
    save_file({"latents": torch.randn(3, cfg["in_dim"], 4, 6), "context": torch.randn(3, 5, cfg["text_dim"]),
               "context_lengths": torch.tensor([5, 2, 3])}, str(good), {"source": "three test latents"})
    found = load_calibration(good, cfg)
    assert len(found) == 3 and found.latents.dtype == torch.float32 and not found.synthetic
    assert found.label.startswith("three test latents: 3 latents of 4x4x6")
    cases = {
        "channels": ({"latents": torch.randn(3, 16, 4, 6), "context": torch.randn(3, 5, cfg["text_dim"])},
                     "tensor 'latents' has 16 channels; the teacher reads 4"),
        "width": ({"latents": torch.randn(3, 4, 4, 6), "context": torch.randn(3, 5, 9)},
                  "tensor 'context' has width 9; the teacher's text_dim is 24"),
        "missing": ({"latents": torch.randn(3, 4, 4, 6)}, "no tensor 'context'"),
        "rank": ({"latents": torch.randn(3, 4, 24), "context": torch.randn(3, 5, 24)},
                 r"tensor 'latents' is \[3, 4, 24\]; expected 4 non-empty axes"),
        "count": ({"latents": torch.randn(3, 4, 4, 6), "context": torch.randn(2, 5, 24)},
                  "tensor 'context' has 2 samples, 'latents' 3"),
        "dtype": ({"latents": torch.zeros(3, 4, 4, 6, dtype=torch.int32), "context": torch.randn(3, 5, 24)},
                  "tensor 'latents' is int32; expected a floating-point dtype"),
        "nan": ({"latents": torch.full((3, 4, 4, 6), float("nan")), "context": torch.randn(3, 5, 24)},
                "tensor 'latents' holds 288 NaN"),
        "odd": ({"latents": torch.randn(3, 4, 5, 6), "context": torch.randn(3, 5, 24)}, "must be even"),
        "huge": ({"latents": torch.zeros(5000, 4, 2, 2), "context": torch.zeros(5000, 1, 24)}, "at most 4096 latents"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ProjectionError, match=message) as info:
            load_calibration(path, cfg)
        assert str(path) in str(info.value)
    with pytest.raises(ProjectionError, match="one .safetensors file"):
        load_calibration(tmp_path / "calib.pt", cfg)


def test_demo_and_synthetic_sources(tiny_wan):
    demo = open_calibration("demo", {"in_dim": 4, "text_dim": 64})
    assert tuple(demo.latents.shape) == (269, 4, 8, 8) and not demo.synthetic and "held-out" in demo.label
    with pytest.raises(ProjectionError, match="the teacher's text_dim is 24"):
        open_calibration("demo", tiny_wan.config)
    fake = open_calibration("synthetic", tiny_wan.config)
    assert fake.synthetic and fake.label.startswith("SYNTHETIC calibration")
    assert torch.equal(fake.latents, synthetic_calibration(tiny_wan.config).latents)  # seeded
    assert demo_calibration().subset(10).latents.shape[0] == 10
