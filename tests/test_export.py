"""Export: weights, config, strategy and report written atomically; reload is bit-identical."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from projection import ProjectionError, Projector, Strategy, export_student, load_student, open_checkpoint
from projection.arch.layout import build_student
from projection.engine.build import fresh_value
from projection.io.writer import WeightsWriter

STUDENT = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}


def test_round_trip_is_bit_identical_and_report_is_complete(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.diffusers_dir), STUDENT, strategy=Strategy(width="uniform"))
    out = tmp_path / "student"
    report = export_student(p, out)
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "projection_report.json", "strategy.yaml"]
    expected = {r.entry.student_key: r.tensor for r in p.project()}
    saved = open_checkpoint(out)
    from safetensors.torch import load_file

    reference = load_file(str(out / "model.safetensors"))  # the safetensors library reads it too
    for key, t in expected.items():
        assert torch.equal(saved.get(key), t) and torch.equal(reference[key], t), key
    model = load_student(out)
    for key, t in model.state_dict().items():
        assert torch.equal(t, expected[key]), key
    assert Strategy.from_yaml((out / "strategy.yaml").read_text()) == p.strategy
    on_disk = json.loads((out / "projection_report.json").read_text())
    assert on_disk["coverage"] == report["coverage"]
    assert len(on_disk["entries"]) == len(p.mapping().entries)
    assert {"student_key", "status", "teacher_keys", "retained_weight_energy", "reason"} <= set(on_disk["entries"][0])
    prov = on_disk["provenance"]
    assert prov["teacher"] == str(tiny_wan.diffusers_dir) and prov["teacher_files"][0]["bytes"] > 0
    assert prov["teacher_bytes_read"] > 0 and "created" in prov and "projection_inspector" in prov
    energy = on_disk["retained_weight_energy"]
    assert set(energy["by_layer"]) == {"top", "block 0", "block 1"}
    assert 0 < energy["mean"] < 1 and "weight statistic" in energy["meaning"]
    config = json.loads((out / "config.json").read_text())
    assert config["dim"] == 32 and "layout" not in config and prov["layout"] == "wanlite"  # tensors tell the layout


def test_existing_folder_is_refused_unless_forced(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT)
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ProjectionError, match="already exists.*--force"):
        export_student(p, out)
    with pytest.raises(ProjectionError, match="not a previous export"):  # forcing replaces exports only
        export_student(p, out, force=True)
    assert [f.name for f in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [f.name for f in tmp_path.iterdir()] == ["student"]  # no temporary folders left behind


def test_never_writes_into_the_teacher_folder(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT)
    before = sorted(f.name for f in tiny_wan.original_dir.iterdir())
    for target in (tiny_wan.original_dir / "student", tiny_wan.original_dir, tiny_wan.original_dir.parent):
        with pytest.raises(ProjectionError, match="teacher's folder"):
            export_student(p, target, force=True)
    assert sorted(f.name for f in tiny_wan.original_dir.iterdir()) == before


def test_failed_export_leaves_nothing(tiny_wan, tmp_path, monkeypatch):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("projection.engine.export.WeightsWriter.write", broken)
    with pytest.raises(OSError, match="disk full"):
        export_student(p, tmp_path / "student")
    assert list(tmp_path.iterdir()) == []


def test_sharded_weights_with_index(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT)
    out = tmp_path / "student"
    export_student(p, out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = load_student(out)
    for r in p.project():
        assert torch.equal(model.state_dict()[r.entry.student_key], r.tensor)


def test_weights_writer_never_splits_a_tensor_and_accepts_any_order(tmp_path):
    from safetensors.torch import load_file

    state = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}
    writer = WeightsWriter(tmp_path, {k: tuple(t.shape) for k, t in state.items()}, torch.float32, 450)
    assert len(writer.names) == 5
    for k in reversed(list(state)):
        writer.write(k, state[k])
    loaded = {}
    for name in writer.names:
        loaded.update(load_file(str(tmp_path / name)))  # the reference reader agrees
    assert all(torch.equal(loaded[k], t) for k, t in state.items())


def test_skipped_entries_keep_the_students_own_values(tiny_wan, tmp_path):
    """The seeds' layout: skipped tensors come from the seeded init (or the student checkpoint given)."""
    seed = {"layout": "seed", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}
    p = Projector.open(str(tiny_wan.original_dir), seed, strategy=Strategy(seed=3))
    export_student(p, tmp_path / "a")
    model = load_student(tmp_path / "a")
    meta = build_student(p.student.config, "meta")
    assert torch.equal(model.state_dict()["conv_in.weight"], fresh_value(meta, "conv_in.weight", 3))
    assert torch.equal(model.state_dict()["blocks.0.norm1.weight"], torch.ones(32))
    # a student checkpoint to fill: its own values stay where nothing transfers
    export_student(p, tmp_path / "b")
    filled = Projector.open(str(tiny_wan.original_dir), str(tmp_path / "a" / "model.safetensors"))
    assert filled.student.layout == "seed"
    export_student(filled, tmp_path / "c")
    again = load_student(tmp_path / "c")
    assert torch.equal(again.state_dict()["time_embed.2.weight"], model.state_dict()["time_embed.2.weight"])
    x = torch.randn(1, 4, 8, 8)
    assert again(x, torch.tensor([10.0]), torch.randn(1, 3, tiny_wan.config["text_dim"])).shape == (1, 4, 8, 8)


def test_seed_layout_has_the_seeds_202_keys():
    model = build_student({"layout": "seed", "dim": 1024, "num_heads": 16, "ffn_dim": 4096, "num_layers": 16,
                           "in_dim": 4, "out_dim": 4, "text_dim": 4096, "freq_dim": 256}, "meta")
    state = model.state_dict()
    assert len(state) == 202
    assert state["blocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert state["time_embed.0.weight"].shape == (4096, 1024) and state["conv_in.weight"].shape == (1024, 4, 3, 3)


def test_load_student_errors(tmp_path):
    with pytest.raises(ProjectionError, match=r"no \*\.safetensors"):
        load_student(tmp_path)
    save_file({"layers.0.w": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ProjectionError, match="no layout this tool runs"):
        load_student(tmp_path)


def test_strategy_yaml_is_written(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT, strategy=Strategy(layers="last", rescale="variance"))
    export_student(p, tmp_path / "s")
    assert yaml.safe_load((tmp_path / "s" / "strategy.yaml").read_text())["layers"] == "last"


def test_never_writes_into_a_two_expert_root(tiny_wan, tmp_path):
    import shutil

    root = tmp_path / "wan22"
    for expert in ("high_noise_model", "low_noise_model"):
        shutil.copytree(tiny_wan.original_dir, root / expert)
    p = Projector.open(str(root), STUDENT, expert="high")
    with pytest.raises(ProjectionError, match="teacher's folder"):
        export_student(p, root / "student")
    assert sorted(f.name for f in root.iterdir()) == ["high_noise_model", "low_noise_model"]


def test_unwritable_destination_fails_before_projecting(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProjectionError, match="cannot create the output folder"):
        export_student(p, tmp_path / "file" / "student")
    assert p.teacher.checkpoint.bytes_read == 0


def test_a_custom_named_student_has_one_config_its_own_heads_and_projects_as_its_config_twin(demo_dir, tmp_path):
    """The demo's reference student (2 heads of 32) under other names, as a bare state dict: its config is worked
    out from what the rules map (never the teacher's), its heads keep the teacher's head dim (not the teacher's 4
    heads, of 16), and the same config everywhere: summary, report, config.json."""
    from conftest import CUSTOM_RULES, custom_names
    from safetensors.torch import save_file

    from projection import parse_rules

    teacher = str(demo_dir / "teacher-wan")
    twin = Projector.open(teacher, {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4})
    save_file(custom_names(build_student(twin.student.config).state_dict()), str(tmp_path / "custom.safetensors"))
    p = Projector.open(teacher, str(tmp_path / "custom.safetensors"), rules=parse_rules(CUSTOM_RULES))
    config = p.student_config()
    assert config.updated(layout="wanlite") == twin.student.config
    assert p.heads_inferred()
    for r in twin.project():  # the same tensors: RoPE pairs chosen for heads of 32
        renamed = next(iter(custom_names({r.entry.student_key: r.tensor})))
        assert torch.equal(p.student_tensor(renamed), r.tensor), renamed
    report = export_student(p, tmp_path / "out")
    # the project's records (layout, head dim) are elsewhere
    own = {k: v for k, v in config.to_dict().items() if k not in ("layout", "head_dim")}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == own
    assert report["student"]["config"] == config.to_dict() and report["student"]["heads_inferred"] is True
    assert any("heads inferred: 2 x 32" in w for w in report["warnings"])


def test_a_diffusers_named_student_is_filled_and_stays_loadable_by_diffusers(tiny_wan, tmp_path):
    from conftest import diffusers_kwargs
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    WanTransformer3DModel(**diffusers_kwargs(tiny_wan.config)).save_pretrained(tmp_path / "same")
    p = Projector.open(str(tiny_wan.original_dir), str(tmp_path / "same"))
    assert (p.student.family, p.heads_inferred(), p.mapping().coverage()["keys"]["rate"]) == ("wan-diffusers", False, 1.0)
    export_student(p, tmp_path / "same-out")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "same-out").eval()
    teacher = tiny_wan.model.state_dict()
    assert loaded.state_dict().keys() == teacher.keys()
    assert all(torch.equal(v, teacher[k]) for k, v in loaded.state_dict().items())
    x, t, ctx = torch.randn(1, 4, 1, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, tiny_wan.config["text_dim"])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, ctx).sample, tiny_wan.model(x, t, ctx).sample, atol=1e-5)

    small = {**tiny_wan.config, "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}
    WanTransformer3DModel(**diffusers_kwargs(small)).save_pretrained(tmp_path / "small")
    p = Projector.open(str(tiny_wan.diffusers_dir), str(tmp_path / "small"))
    assert p.mapping().counts()["skipped"] == 0
    export_student(p, tmp_path / "small-out")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "small-out")
    assert loaded.config.num_attention_heads == 1 and loaded.config.attention_head_dim == 32
    q = loaded.state_dict()["blocks.1.attn1.to_q.weight"]
    assert torch.equal(q, p.student_tensor("blocks.1.self_attn.q.weight"))
    assert torch.equal(loaded.state_dict()["scale_shift_table"], p.student_tensor("head.modulation"))


@pytest.mark.parametrize("layout", ["wanlite", "seed"])
def test_a_bfloat16_export_runs_forward_in_bfloat16(tiny_wan, tmp_path, layout):
    p = Projector.open(str(tiny_wan.original_dir), {**STUDENT, "layout": layout})
    export_student(p, tmp_path / "f32")
    export_student(p, tmp_path / "bf16", strategy=p.strategy.model_copy(update={"dtype": "bfloat16"}))
    f32, bf16 = load_student(tmp_path / "f32"), load_student(tmp_path / "bf16")
    assert {t.dtype for t in bf16.state_dict().values()} == {torch.bfloat16}
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 5, tiny_wan.config["text_dim"])
    with torch.no_grad():
        a, b = f32(x, t, ctx), bf16(x, t, ctx)
        assert b.dtype == torch.bfloat16 and ((b.float() - a).norm() / a.norm()).item() < 0.03
        assert load_student(tmp_path / "bf16", dtype=torch.float32)(x, t, ctx).dtype == torch.float32


def test_input_sizes_that_are_not_whole_patches_are_refused():
    model = build_student({"layout": "wanlite", "dim": 16, "num_heads": 1, "ffn_dim": 8, "num_layers": 1,
                           "in_dim": 4, "out_dim": 4, "text_dim": 8, "freq_dim": 8})
    t, ctx = torch.tensor([1.0]), torch.randn(1, 3, 8)
    assert model(torch.randn(1, 4, 32, 30), t, ctx).shape == (1, 4, 32, 30)
    for h, w in ((31, 31), (32, 31)):
        with pytest.raises(ProjectionError, match=rf"input size {h}x{w}: height and width must be multiples of the "
                                                  r"2x2 patch \(pad to 32x32"):
            model(torch.randn(1, 4, h, w), t, ctx)


def test_a_student_where_nothing_maps_is_refused_before_anything_is_written(tiny_wan, tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 4)}, str(tmp_path / "unknown.safetensors"))
    p = Projector.open(str(tiny_wan.original_dir), str(tmp_path / "unknown.safetensors"))
    with pytest.raises(ProjectionError, match=r"unknown\.safetensors: nothing to export: none of the student's 1 "
                                              r"keys maps to a teacher key"):
        export_student(p, tmp_path / "out")
    assert [f.name for f in tmp_path.iterdir()] == ["unknown.safetensors"]
