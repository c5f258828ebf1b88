"""A family is one description: a made-up family, registered here only, is detected, read, mapped, exported and
run (the streamed forward, activation statistics, an activation-ranked export, a fit) without editing any other
module (issue 19). Wan blocks without cross-attention, under names of its own: its tensor list, its block class, and the
modules its fit and activation statistics read."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from projection import ProjectionError, Projector
from projection.arch.anatomy import WAN_SHAPES, WAN_TENSORS, template_of, wan_tensors
from projection.arch.config import ModelConfig
from projection.arch.family import FAMILIES, Family, Runnable, register, unregister
from projection.arch.wan import Block, WanLite, rope_bands
from projection.core.models import open_teacher, view_checkpoint
from projection.core.plan import keep_top
from projection.core.strategy import Strategy
from projection.engine.export import export_student
from projection.function import activations as act
from projection.function.calibration import synthetic_calibration
from projection.function.fit import fit_student, linear_sizes
from projection.function.forward import StreamedTeacher
from projection.io.checkpoint import open_checkpoint

RENAMES = {"patch_embedding": "stem", "text_embedding.0": "text_in.0", "text_embedding.2": "text_in.2",
           "time_embedding.0": "time_in.0", "time_embedding.2": "time_in.2", "time_projection.1": "time_out",
           "head.head": "out.proj", "head.modulation": "out.modulation",
           "blocks.{i}.modulation": "layers.{i}.modulation",
           "blocks.{i}.ffn.0": "layers.{i}.mlp.up", "blocks.{i}.ffn.2": "layers.{i}.mlp.down",
           **{f"blocks.{{i}}.self_attn.{p}": f"layers.{{i}}.attn.{p}"
              for p in ("q", "k", "v", "o", "norm_q", "norm_k")}}
NO_CROSS = {t: axes for t, axes in WAN_TENSORS.items()
            if "cross_attn" not in t and "img" not in t and ".norm3." not in t}  # norm3: the cross-attention's norm


class NoCrossBlock(Block):
    """Wan's block without its cross-attention (nor the norm before it): it never reads the text context."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int):
        super().__init__(dim, ffn_dim, num_heads)
        del self.norm3, self.cross_attn

    def read_context(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x


RUNNABLE = Runnable(NoCrossBlock.of, linears=("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.0",
                                              "ffn.2"),
                    readers=("self_attn.q", "ffn.0"), outputs={"self_attn.o": "sa"}, neurons="ffn.2")
FAMILY = Family("test-no-cross", "Wan blocks without cross-attention (a test's family)", "layers.{i}.attn.q.weight",
                RENAMES, tensors=NO_CROSS, shapes=WAN_SHAPES, rope_bands=rope_bands, runnable=RUNNABLE)
SMALL = dict(dim=32, num_heads=1, ffn_dim=24, num_layers=2, in_dim=4, out_dim=4, text_dim=24, freq_dim=16)


@pytest.fixture
def family():
    register(FAMILY)
    yield FAMILY
    unregister(FAMILY.name)


def write_student(folder, config: dict, seed: int = 0) -> dict[str, str]:
    """A checkpoint of the made-up family; returns canonical -> its names."""
    g = torch.Generator().manual_seed(seed)
    names, state = {}, {}
    for key, (shape, _) in wan_tensors(config).items():
        if template_of(key)[0] not in NO_CROSS:
            continue
        module, _, param = key.rpartition(".")
        block = key.split(".")[1] if key.startswith("blocks.") else "{i}"
        generic, bare = (name.replace(f"blocks.{block}.", "blocks.{i}.") for name in (module, key))
        native = f"{RENAMES[generic]}.{param}" if generic in RENAMES else RENAMES.get(bare, bare)  # whole modules
        names[key] = native.replace("{i}", block)
        state[names[key]] = 0.2 * torch.randn(shape, generator=g)
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_heads": config["num_heads"]}))
    return names


def test_a_family_registered_by_a_test_is_read_mapped_and_exported(family, tiny_wan, tmp_path):
    names = write_student(tmp_path / "student", tiny_wan.config)
    view = view_checkpoint(open_checkpoint(str(tmp_path / "student")))
    assert (view.family, view.layout) == ("test-no-cross", "test-no-cross")  # its own names: no export layout
    assert view.native == names  # every name read back to Wan's
    assert (view.config.dim, view.config.ffn_dim, view.config.num_heads, view.config.head_dim) == (64, 48, 2, 32)
    assert view.config.out_dim == 4  # the output head's rows over the family's 1 x 2 x 2 patch
    assert view.config.num_layers == tiny_wan.config["num_layers"]

    p = Projector.open(str(tiny_wan.original_dir), str(tmp_path / "student"))
    keys = p.mapping().coverage()["keys"]
    assert keys["transferred"] == keys["total"] == len(names)  # no cross-attention to fill, nothing else missing
    export_student(p, tmp_path / "out")
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(exported) == set(names.values())  # written under the family's own names
    teacher = load_file(str(tiny_wan.original_dir / "diffusion_pytorch_model.safetensors"))
    for canonical, native in names.items():  # same sizes as the teacher: the projection keeps every channel
        assert torch.equal(exported[native], teacher[canonical]), native


def canonical_state(folder, names: dict[str, str]) -> dict[str, torch.Tensor]:
    stored = load_file(str(folder / "model.safetensors"))
    return {canonical: stored[native] for canonical, native in names.items()}


def in_memory(state: dict[str, torch.Tensor], config: dict) -> nn.Module:
    """The made-up family's model, whole in memory: WanLite's embeddings and head around the family's own blocks."""
    model = WanLite(**config)
    model.blocks = nn.ModuleList(NoCrossBlock(config["dim"], config["ffn_dim"], config["num_heads"])
                                 for _ in range(config["num_layers"]))
    model.load_state_dict({**state, "patch_embedding.weight": state["patch_embedding.weight"].squeeze(2)})
    return model.eval()


def test_a_family_registered_by_a_test_runs_its_own_blocks_streamed(family, tiny_wan, tmp_path):
    names = write_student(tmp_path / "teacher", tiny_wan.config)
    teacher = open_teacher(str(tmp_path / "teacher"))  # a teacher: its family carries a runnable block
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([100.0, 500.0, 900.0]), torch.randn(3, 5, 24)
    streamed = StreamedTeacher(teacher)
    out = streamed(x, t, ctx)
    with torch.no_grad():
        torch.testing.assert_close(out, in_memory(canonical_state(tmp_path / "teacher", names), tiny_wan.config)(
            x, t, ctx))
    assert torch.equal(streamed(x, t, torch.zeros_like(ctx)), out)  # its blocks never read the text context
    assert linear_sizes(RUNNABLE, ModelConfig.from_dict(SMALL)) == [(32, 32)] * 4 + [(32, 24), (24, 32)]  # fit's


def test_a_family_registered_by_a_test_is_ranked_exported_and_fitted_by_its_tables(family, tiny_wan, tmp_path,
                                                                                     monkeypatch):
    write_student(tmp_path / "teacher", tiny_wan.config)
    names = write_student(tmp_path / "student", SMALL, seed=1)
    strategy = Strategy(width="activation", heads="activation", ffn="activation")
    p = Projector.open(str(tmp_path / "teacher"), str(tmp_path / "student"), strategy=strategy)
    calibration = synthetic_calibration(p.teacher.config, n=4, size=(8, 8), tokens=5)
    found = p.calibrate(calibration, cache=tmp_path / "cache")
    assert {space for space, _ in found.scores} == {"resid", "sa_heads", "sa_vo", "ffn", "ffn_wanda", "update"}
    monkeypatch.setattr(act, "collect", lambda *a, **k: pytest.fail("the cached entry was measured again"))
    again = p.calibrate(calibration, cache=tmp_path / "cache")  # its entry is valid for its family: read back
    assert all(torch.equal(again.scores[k], v) for k, v in found.scores.items())

    plan = p.plan()
    assert torch.equal(plan.indices("resid", None), keep_top(found.score("resid", None), SMALL["dim"]))
    for b in p.mapping().layers:  # the statistics the family's readers, outputs and neurons recorded rank the plan
        assert torch.equal(plan.indices("ffn", b), keep_top(found.score("ffn", b), SMALL["ffn_dim"]))
        assert torch.equal(plan.indices("sa_heads", b), keep_top(found.score("sa_heads", b), SMALL["num_heads"]))
    keys = p.mapping().coverage()["keys"]
    assert keys["transferred"] == keys["total"] == len(names)
    export_student(p, tmp_path / "out")
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    student = canonical_state(tmp_path / "student", names)
    assert {k: v.shape for k, v in exported.items()} == {n: student[c].shape for c, n in names.items()}

    module = in_memory({c: exported[n] for c, n in names.items()}, SMALL)  # the export, run as the family's blocks
    before = {n: module.get_parameter(n).clone() for n in ("blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight")}
    report = fit_student(p.plan(), module, calibration, draws=1)  # refits the linears its family names, no others
    assert list(report.layers) == [f"blocks.{i}.{n}" for i in range(SMALL["num_layers"]) for n in RUNNABLE.linears]
    assert all(not torch.equal(module.get_parameter(n), v) for n, v in before.items())


def test_a_familys_experts_say_which_noise_levels_each_serves(tiny_wan, tmp_path):
    """The band of noise levels a two-expert model's expert serves is its family's to say: a made-up family with a
    boundary at 0.5 gets it (the projector's band and the distillation's), Wan keeps Wan 2.2's, and a family that
    names no experts refuses a two-expert root in one line rather than guessing Wan's."""
    from dataclasses import replace

    from projection.distill import noise_band

    root = tmp_path / "two-experts"
    root.mkdir()
    for folder in ("high_noise_model", "low_noise_model"):
        write_student(root / folder, tiny_wan.config)
    halves = replace(FAMILY, experts=lambda config: {"high": (0.5, 1.0), "low": (0.0, 0.5)})
    register(halves)
    try:
        high, low = (open_teacher(str(root), expert) for expert in ("high", "low"))
        assert (high.band, low.band, noise_band(StreamedTeacher(high))) == ((0.5, 1.0), (0.0, 0.5), (0.5, 1.0))
        assert open_teacher(str(root / "high_noise_model")).band == (0.0, 1.0)  # one model: every level
        register(FAMILY)  # the family as first written: no experts
        with pytest.raises(ProjectionError, match=r"^expert 'high': the test-no-cross family's experts are none$"):
            open_teacher(str(root), "high").band
    finally:
        unregister(FAMILY.name)
    wan = tmp_path / "wan22"
    for folder in ("high_noise_model", "low_noise_model"):
        (wan / folder).mkdir(parents=True)
        for f in tiny_wan.original_dir.iterdir():
            (wan / folder / f.name).write_bytes(f.read_bytes())
    assert open_teacher(str(wan), "high").band == (0.875, 1.0)
    i2v = ModelConfig(**{**SMALL, "in_dim": 36})
    assert FAMILIES["wan"].noise_band("low", i2v) == (0.0, 0.9)  # I2V-A14B: 36 input channels, boundary 0.9
