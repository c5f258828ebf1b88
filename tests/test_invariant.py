"""The exactness invariant, against diffusers' WanTransformer3DModel as the reference teacher."""
from __future__ import annotations

import pytest
import torch

from conftest import diffusers_kwargs
from projection import Projector, Strategy, export_student, load_student


def inputs(cfg: dict, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg["in_dim"], 1, 8, 6, generator=g)
    t = torch.tensor([37.0, 912.0])
    ctx = torch.randn(2, 7, cfg["text_dim"], generator=g)
    return x, t, ctx


def reference(model, x, t, ctx) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0][:, :, 0]


def student_out(folder, x, t, ctx) -> torch.Tensor:
    student = load_student(folder).eval()
    with torch.no_grad():
        return student(x[:, :, 0], t, ctx)


@pytest.mark.parametrize("fmt", ["diffusers_dir", "original_dir"])
def test_same_config_student_equals_teacher_on_one_frame(tiny_wan, tmp_path, fmt):
    p = Projector.open(str(getattr(tiny_wan, fmt)), {"layout": "wanlite"})
    assert p.mapping().counts()["skipped"] == 0
    export_student(p, tmp_path / "student")
    x, t, ctx = inputs(tiny_wan.config)
    ref = reference(tiny_wan.model, x, t, ctx)
    out = student_out(tmp_path / "student", x, t, ctx)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("fmt", ["diffusers_dir", "original_dir"])
@pytest.mark.parametrize("layers", [[0, 2], [1], [2, 0]])
def test_shallower_student_equals_teacher_without_unselected_blocks(tiny_wan, tmp_path, fmt, layers):
    from diffusers import WanTransformer3DModel

    p = Projector.open(str(getattr(tiny_wan, fmt)), {"layout": "wanlite", "num_layers": len(layers)},
                       strategy=Strategy(layers=layers))
    assert p.mapping().layers == layers
    export_student(p, tmp_path / "student")
    pruned = WanTransformer3DModel(**diffusers_kwargs({**tiny_wan.config, "num_layers": len(layers)})).eval()
    state = {k: v for k, v in tiny_wan.model.state_dict().items() if not k.startswith("blocks.")}
    for new, old in enumerate(layers):
        prefix = f"blocks.{old}."
        state.update({f"blocks.{new}." + k[len(prefix):]: v
                      for k, v in tiny_wan.model.state_dict().items() if k.startswith(prefix)})
    pruned.load_state_dict(state)
    x, t, ctx = inputs(tiny_wan.config, seed=2)
    ref = reference(pruned, x, t, ctx)
    out = student_out(tmp_path / "student", x, t, ctx)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


def test_invariant_fails_when_a_block_is_wrong(tiny_wan, tmp_path):
    """Guard: the comparison above would notice a wrong block (it is not vacuous)."""
    p = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite"}, strategy=Strategy(layers=[0, 0, 2]))
    export_student(p, tmp_path / "student")
    x, t, ctx = inputs(tiny_wan.config)
    ref = reference(tiny_wan.model, x, t, ctx)
    out = student_out(tmp_path / "student", x, t, ctx)
    assert (out - ref).abs().max() > 1e-3 * ref.abs().max()


def test_narrower_student_runs_and_keeps_rope_pairs(tiny_wan, tmp_path):
    """A width-, head- and FFN-reduced student is a valid module whose forward is finite."""
    cfg = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}
    p = Projector.open(str(tiny_wan.diffusers_dir), cfg)
    export_student(p, tmp_path / "student")
    x, t, ctx = inputs(tiny_wan.config)
    out = student_out(tmp_path / "student", x, t, ctx)
    assert out.shape == (2, tiny_wan.config["out_dim"], 8, 6)
    assert torch.isfinite(out).all()
