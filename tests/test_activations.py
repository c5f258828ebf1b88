"""Activation statistics from the streamed teacher forward, the strategies that rank by them, and their cache."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from projection import Projector, ProjectionError, Strategy, projected_student
from projection.core.models import open_teacher
from projection.function.activations import collect, teacher_activations
from projection.function.calibration import Calibration
from projection.function.fidelity import velocity_fidelity
from projection.function.forward import StreamedTeacher
from projection.function.noise import noised_set


def calibration_for(cfg: dict, n: int = 6, seed: int = 5) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randn(n, cfg["in_dim"], 4, 6, generator=g), torch.randn(n, 5, cfg["text_dim"], generator=g),
                       "test latents")


def test_statistics_equal_forward_hooks_on_diffusers_modules(tiny_wan):
    cfg = tiny_wan.config
    calib = calibration_for(cfg)
    found = collect(open_teacher(str(tiny_wan.diffusers_dir)), calib, draws=2)
    x, t, ctx = noised_set(calib.latents, calib.context, 2)
    energy: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for b, block in enumerate(tiny_wan.model.blocks):
        for name, module in (("q", block.attn1.to_q), ("xq", block.attn2.to_q), ("ffn_in", block.ffn.net[0].proj),
                             ("o", block.attn1.to_out[0]), ("xo", block.attn2.to_out[0]), ("gelu", block.ffn.net[2])):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, key=(b, name): energy.__setitem__(key, args[0].double().pow(2).flatten(0, -2).sum(0))))
    with torch.no_grad():
        tiny_wan.model(hidden_states=x[:, :, None], timestep=t, encoder_hidden_states=ctx, return_dict=False)
    for h in hooks:
        h.remove()
    heads, d = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    share = lambda v: v / v.sum()  # noqa: E731
    resid = sum(share(energy[(b, n)]) for b in range(cfg["num_layers"]) for n in ("q", "xq", "ffn_in"))
    assert torch.allclose(found.score("resid", None), resid, rtol=1e-4)
    for b in range(cfg["num_layers"]):
        for prefix, name in (("sa", "o"), ("ca", "xo")):
            per = energy[(b, name)].reshape(heads, d)
            assert torch.allclose(found.score(f"{prefix}_heads", b), per.sum(1), rtol=1e-4)
            assert torch.allclose(found.score(f"{prefix}_vo", b), per.sum(0), rtol=1e-4)
        assert torch.allclose(found.score("ffn", b), energy[(b, "gelu")], rtol=1e-4)
    assert len(found.influence) == 3 and all(0 < v < 2 for v in found.influence)


def dead_channel_teacher(tiny_wan, tmp_path, dead: list[int]):
    """The tiny teacher with residual channels that carry nothing (every writer's row is 0, so the stream is 0
    there) and that no block reads (their modulated, normalized inputs are 0: scale -1, shift 0, no affine weight),
    but that have the largest reader weights."""
    state = load_file(str(tiny_wan.original_dir / "diffusion_pytorch_model.safetensors"))
    dim, depth = tiny_wan.config["dim"], tiny_wan.config["num_layers"]
    writers = ["patch_embedding", "time_embedding.2"] + [f"blocks.{b}.{k}" for b in range(depth)
                                                         for k in ("self_attn.o", "cross_attn.o", "ffn.2")]
    for key in writers:
        state[f"{key}.weight"][dead] = 0
        state[f"{key}.bias"][dead] = 0
    tp_w, tp_b = state["time_projection.1.weight"].view(6, dim, -1), state["time_projection.1.bias"].view(6, dim)
    for chunk in (0, 1, 3, 4):  # shift and scale of both modulated inputs
        tp_w[chunk, dead] = 0
        tp_b[chunk, dead] = 0
    for b in range(depth):
        for chunk, value in ((0, 0.0), (1, -1.0), (3, 0.0), (4, -1.0)):
            state[f"blocks.{b}.modulation"][0, chunk, dead] = value
        state[f"blocks.{b}.norm3.weight"][dead] = 0
        state[f"blocks.{b}.norm3.bias"][dead] = 0
        for key in ("self_attn.q", "self_attn.k", "self_attn.v", "cross_attn.q", "ffn.0"):
            state[f"blocks.{b}.{key}.weight"][:, dead] *= 50
    state["head.modulation"][0, 0, dead] = 0
    state["head.modulation"][0, 1, dead] = -1
    state["head.head.weight"][:, dead] *= 50
    folder = tmp_path / "dead"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text((tiny_wan.original_dir / "config.json").read_text())
    return folder


def test_activation_drops_channels_no_input_activates_and_fidelity_shows_it(tiny_wan, tmp_path):
    dead = list(range(0, 64, 4))  # 16 of 64 residual channels
    folder = dead_channel_teacher(tiny_wan, tmp_path, dead)
    calib = calibration_for(tiny_wan.config, n=8)
    student = {"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 3}
    kept, errors = {}, {}
    teacher = StreamedTeacher(open_teacher(str(folder)))
    for width in ("magnitude", "activation"):
        p = Projector.open(str(folder), student, strategy=Strategy(width=width))
        p.calibrate(calib, cache=tmp_path / "cache")
        kept[width] = set(p.plan().indices("resid", None).tolist())
        errors[width] = velocity_fidelity(projected_student(p), teacher, calib.latents, calib.context, 2).relative_error
    assert set(dead) <= kept["magnitude"]  # the largest weights, never read
    assert not set(dead) & kept["activation"]
    assert errors["activation"] < 0.8 * errors["magnitude"], errors


def test_influence_keeps_the_most_influential_blocks_in_order(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "num_layers": 2},
                       strategy=Strategy(layers="influence"))
    with pytest.raises(ProjectionError, match="give a calibration set"):
        p.mapping()
    acts = p.calibrate(calibration_for(tiny_wan.config), cache=tmp_path)
    order = sorted(range(3), key=lambda b: -acts.influence[b])
    assert p.mapping().layers == sorted(order[:2])


def test_statistics_are_cached_by_teacher_calibration_and_request(tiny_wan, tmp_path, monkeypatch):
    import projection.function.activations as act

    teacher = open_teacher(str(tiny_wan.original_dir))
    calib = calibration_for(tiny_wan.config)
    calls = []
    real = act.collect
    monkeypatch.setattr(act, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = teacher_activations(teacher, "fp-1", calib, cache=tmp_path)
    again = teacher_activations(teacher, "fp-1", calib, cache=tmp_path)
    assert len(calls) == 1 and again.influence == first.influence
    assert torch.equal(again.score("ffn", 1), first.score("ffn", 1))
    teacher_activations(teacher, "fp-1", calib, draws=3, cache=tmp_path)  # another request
    teacher_activations(teacher, "fp-2", calib, cache=tmp_path)  # another teacher
    other = Calibration(calib.latents + 1, calib.context, "shifted")
    teacher_activations(teacher, "fp-1", other, cache=tmp_path)  # other inputs
    assert len(calls) == 4
    files = list((tmp_path / "activations").glob("*.safetensors"))
    assert len(files) == 4 and not list((tmp_path / "activations").glob("*.tmp-*"))
    (tmp_path / "activations" / f"{first.key}.safetensors").write_bytes(b"damaged")
    repaired = teacher_activations(teacher, "fp-1", calib, cache=tmp_path)  # measured again, not an error
    assert len(calls) == 5 and repaired.influence == pytest.approx(first.influence)
    assert not (tiny_wan.original_dir / "activations").exists()  # never the teacher's folder
