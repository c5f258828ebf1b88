"""Export: weights, config, strategy and report written atomically; reload is bit-identical."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from projection import ProjectionError, Projector, Strategy, export_student, load_student, open_checkpoint
from projection.export import WeightsWriter
from projection.student import build_student, fresh_value

STUDENT = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}


def test_round_trip_is_bit_identical_and_report_is_complete(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.diffusers_dir), STUDENT, strategy=Strategy(width="uniform"))
    out = tmp_path / "student"
    report = export_student(p, out)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "projection_report.json",
                                                     "strategy.yaml"]
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
    assert len(on_disk["entries"]) == len(p.mapping.entries)
    assert {"student_key", "status", "teacher_keys", "energy", "reason"} <= set(on_disk["entries"][0])
    prov = on_disk["provenance"]
    assert prov["teacher"] == str(tiny_wan.diffusers_dir) and prov["teacher_files"][0]["bytes"] > 0
    assert prov["teacher_bytes_read"] > 0 and "created" in prov and "projection_inspector" in prov
    assert set(on_disk["energy_by_layer"]) == {"top", "block 0", "block 1"}
    assert 0 < on_disk["mean_energy"] < 1
    config = json.loads((out / "config.json").read_text())
    assert config["layout"] == "wanlite" and config["dim"] == 32


def test_existing_folder_is_refused_unless_forced(tiny_wan, tmp_path):
    p = Projector.open(str(tiny_wan.original_dir), STUDENT)
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ProjectionError, match="already exists.*--force"):
        export_student(p, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_student(p, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
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

    monkeypatch.setattr("projection.export.WeightsWriter.write", broken)
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
    with pytest.raises(ProjectionError, match="no config.json"):
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
