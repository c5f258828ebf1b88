"""Key mapping: statuses, presets, rules, coverage, and the mistakes the report must make impossible to miss."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from projection import ProjectionError, Projector, Strategy, open_teacher
from projection.demo import WAN14B
from projection.mapping import find_rule, parse_rules, select_layers


def test_wan14b_maps_from_headers_alone_into_the_seeds_layout(wan14b_headers):
    p = Projector.open(str(wan14b_headers), {"layout": "seed", "dim": 1024, "num_layers": 16, "num_heads": 16,
                                             "ffn_dim": 4096})
    assert len(p.teacher.shapes) == 1095
    m = p.mapping
    assert len(m.entries) == 202
    assert p.teacher.checkpoint.bytes_read == 0  # metadata only
    assert m.layers == [0, 3, 5, 8, 10, 13, 16, 18, 21, 23, 26, 29, 31, 34, 36, 39]  # evenly spaced, both ends
    in_proj = m.entry("blocks.5.attn.in_proj_weight")
    assert in_proj.status == "concatenated"
    assert in_proj.teacher_keys == [f"blocks.13.self_attn.{x}.weight" for x in "qkv"]
    assert [p.student_shape for p in in_proj.parts] == [(1024, 1024)] * 3
    assert m.entry("blocks.5.attn.out_proj.weight").teacher_keys == ["blocks.13.self_attn.o.weight"]
    assert m.entry("blocks.5.mlp.2.bias").teacher_keys == ["blocks.13.ffn.2.bias"]
    norm = m.entry("blocks.0.norm1.weight")
    assert norm.status == "skipped" and "no affine" in norm.reason
    conv = m.entry("conv_in.weight")
    assert conv.status == "skipped" and "latent channels in 16 vs 4" in conv.reason and "kernel" in conv.reason
    time0 = m.entry("time_embed.0.weight")
    assert time0.status == "skipped" and "timestep sinusoid width 256 vs 1024" in time0.reason
    counts = m.counts()
    assert counts == {"exact": 0, "mapped": 2 + 16 * 6, "concatenated": 32, "skipped": 8 + 16 * 4}
    cov = m.coverage()
    assert cov["keys"] == {"transferred": 130, "total": 202, "rate": 130 / 202}
    assert 0.9 < cov["params"]["rate"] < 1.0
    assert "blocks.0.cross_attn.q.weight" in m.unused_teacher_keys()
    assert "blocks.1.self_attn.q.weight" in m.unused_teacher_keys()  # teacher block 1 feeds no student block
    assert "blocks.3.self_attn.q.weight" not in m.unused_teacher_keys()


def test_wan14b_to_reference_student_covers_everything(wan14b_headers):
    p = Projector.open(str(wan14b_headers), {"layout": "wanlite", "dim": 1024, "num_layers": 16, "num_heads": 8,
                                             "ffn_dim": 4096})
    m = p.mapping
    assert m.counts()["skipped"] == 0
    q = m.entry("blocks.1.self_attn.q.weight")
    assert q.status == "mapped" and q.teacher_keys == ["blocks.3.self_attn.q.weight"]
    assert any("sa_heads 40->8" in t for t in q.transforms) and any("resid 5120->1024" in t for t in q.transforms)
    assert m.entry("patch_embedding.weight").transforms[0].startswith("Conv3d->Conv2d")


def test_more_student_heads_than_teacher_is_a_clear_error(tiny_wan):
    with pytest.raises(ProjectionError, match=r"4 heads of 16 but the teacher has 2 heads of 32.*at most 2 heads"):
        Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 64, "num_heads": 4}).mapping


def test_same_config_statuses_by_format(tiny_wan):
    orig = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite"}).mapping
    assert orig.counts() == {"exact": len(orig.entries) - 1, "mapped": 1, "concatenated": 0, "skipped": 0}
    assert orig.entry("patch_embedding.weight").status == "mapped"  # Conv3d -> Conv2d
    diff = Projector.open(str(tiny_wan.diffusers_dir), {"layout": "wanlite"}).mapping
    assert diff.counts()["mapped"] == len(diff.entries) - 1
    assert diff.entry("patch_embedding.bias").status == "exact"  # same name, shape and values
    assert diff.entry("head.modulation").teacher_keys == ["scale_shift_table"]
    assert diff.entry("blocks.1.modulation").teacher_keys == ["blocks.1.scale_shift_table"]
    assert diff.entry("blocks.1.norm3.weight").teacher_keys == ["blocks.1.norm2.weight"]  # the norm2/norm3 swap
    assert diff.entry("blocks.1.self_attn.o.weight").teacher_keys == ["blocks.1.attn1.to_out.0.weight"]
    assert diff.unused_teacher_keys() == []


def test_seed_in_proj_carries_teacher_q_k_v_in_their_own_rows(tiny_wan):
    """The seeds' original bug built k and v from q; here each third must come from its own teacher tensor."""
    p = Projector.open(str(tiny_wan.original_dir), {"layout": "seed", "dim": 64, "num_heads": 2, "ffn_dim": 48,
                                                     "num_layers": 3})
    teacher = p.teacher
    for block in range(3):
        w = p.student_tensor(f"blocks.{block}.attn.in_proj_weight")
        b = p.student_tensor(f"blocks.{block}.attn.in_proj_bias")
        for i, name in enumerate("qkv"):
            assert torch.equal(w[64 * i: 64 * (i + 1)], teacher.read(f"blocks.{block}.self_attn.{name}.weight"))
            assert torch.equal(b[64 * i: 64 * (i + 1)], teacher.read(f"blocks.{block}.self_attn.{name}.bias"))


def test_seed_in_proj_reduces_q_k_v_with_one_consistent_choice(tiny_wan):
    p = Projector.open(str(tiny_wan.original_dir), {"layout": "seed", "dim": 32, "num_heads": 2, "ffn_dim": 24,
                                                     "num_layers": 2}, strategy=Strategy(width="magnitude"))
    plan = p.plan()
    block = p.mapping.layers[1]
    resid = plan.indices("resid", None)
    heads, qk, vo = (plan.indices(s, block) for s in ("sa_heads", "sa_qk", "sa_vo"))
    rows_qk = (heads[:, None] * 32 + qk[None, :]).reshape(-1)
    rows_vo = (heads[:, None] * 32 + vo[None, :]).reshape(-1)
    w = p.student_tensor("blocks.1.attn.in_proj_weight")
    for i, (name, rows) in enumerate(zip("qkv", (rows_qk, rows_qk, rows_vo))):
        t = p.teacher.read(f"blocks.{block}.self_attn.{name}.weight")
        assert torch.equal(w[32 * i: 32 * (i + 1)], t[rows][:, resid])
    # and the FFN uses one neuron set for ffn.0 rows, ffn.0 bias and ffn.2 columns
    neurons = plan.indices("ffn", block)
    assert torch.equal(p.student_tensor("blocks.1.mlp.0.bias"), p.teacher.read(f"blocks.{block}.ffn.0.bias")[neurons])
    assert torch.equal(p.student_tensor("blocks.1.mlp.2.weight"),
                       p.teacher.read(f"blocks.{block}.ffn.2.weight")[resid][:, neurons])


def test_custom_student_transfers_nothing_until_rules_map_it(tiny_wan, tmp_path):
    names = {"stem.weight": "patch_embedding.weight", "layers.0.wq.weight": "blocks.0.self_attn.q.weight",
             "layers.0.wq.bias": "blocks.0.self_attn.q.bias", "layers.1.fc1.weight": "blocks.1.ffn.0.weight"}
    teacher = open_teacher(str(tiny_wan.original_dir))
    state = {}
    for student_key, teacher_key in names.items():
        shape = list(teacher.shapes[teacher_key])
        if student_key == "stem.weight":
            shape = shape[:2] + shape[3:]  # a 2D conv
        state[student_key] = torch.zeros(shape)
    folder = tmp_path / "custom"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    p = Projector.open(str(tiny_wan.original_dir), str(folder))
    assert p.student.layout == "custom"
    assert p.mapping.coverage()["keys"]["transferred"] == 0
    assert any("Nothing transfers" in w for w in p.summary()["warnings"])
    assert "no rule maps it" in p.mapping.entry("stem.weight").reason
    p.rules = parse_rules("stem: patch_embedding\nlayers.{i}.wq: blocks.{i}.self_attn.q\n"
                          "layers.{i}.fc1: blocks.{i}.ffn.0\n")
    m = p.mapping
    assert m.coverage()["keys"]["rate"] == 1.0, [e.reason for e in m.entries]
    assert m.entry("layers.1.fc1.weight").teacher_keys == ["blocks.2.ffn.0.weight"]  # uniform: blocks 0 and 2 of 3
    assert torch.equal(p.student_tensor("layers.0.wq.weight"), p.teacher.read("blocks.0.self_attn.q.weight"))


def test_rules_parse_errors_name_the_problem():
    with pytest.raises(ProjectionError, match="invalid YAML"):
        parse_rules("a: [b", "my.yaml")
    with pytest.raises(ProjectionError, match="rule 'a'"):
        parse_rules("a: {copy: b}")
    assert parse_rules("rules:\n  a.weight: b.weight\n") == {"a.weight": "b.weight"}


def test_rule_lookup_prefers_whole_keys_then_longest_module():
    rules = {"blocks.{i}.mlp": "x", "blocks.{i}.mlp.0": "y", "blocks.{i}.mlp.0.bias": {"skip": "z"}}
    assert find_rule(rules, "blocks.3.mlp.0.bias") == ({"skip": "z"}, "", 3)
    assert find_rule(rules, "blocks.3.mlp.0.weight") == ("y", ".weight", 3)
    assert find_rule(rules, "blocks.12.mlp.2.weight") == ("x", ".2.weight", 12)
    assert find_rule(rules, "blocks.3.mlpx.weight") is None
    assert find_rule({"layers.{i}.fc": "f", "stem": "s"}, "stem.weight") == ("s", ".weight", None)


def test_layer_selection():
    assert select_layers("uniform", 40, 16) == [0, 3, 5, 8, 10, 13, 16, 18, 21, 23, 26, 29, 31, 34, 36, 39]
    assert select_layers("uniform", 8, 4) == [0, 2, 5, 7]  # evenly spaced: the last block is never left out
    assert select_layers("uniform", 8, 2) == [0, 7] and select_layers("uniform", 8, 1) == [0]
    assert select_layers("uniform", 8, 8) == list(range(8))
    for teacher in range(1, 41):
        for student in range(2, teacher + 1):
            chosen = select_layers("uniform", teacher, student)
            assert chosen[0] == 0 and chosen[-1] == teacher - 1 and chosen == sorted(set(chosen))
            # each is the nearest block to i * (T - 1) / (S - 1), in whole numbers: |t - i*(T-1)/(S-1)| <= 1/2
            assert all(abs(2 * t * (student - 1) - 2 * i * (teacher - 1)) <= student - 1 for i, t in enumerate(chosen))
    assert select_layers("first", 40, 3) == [0, 1, 2]
    assert select_layers("last", 40, 3) == [37, 38, 39]
    assert select_layers([5, 5, 1], 40, 3) == [5, 5, 1]
    with pytest.raises(ProjectionError, match="teacher block 40 out of range"):
        select_layers([0, 40, 1], 40, 3)
    with pytest.raises(ProjectionError, match="2 indices given for 3"):
        select_layers([0, 1], 40, 3)
    with pytest.raises(ProjectionError, match="only 2"):
        select_layers("uniform", 2, 3)


def test_student_config_file_and_mapping_json_shape(tiny_wan, tmp_path):
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 2}))
    p = Projector.open(str(tiny_wan.diffusers_dir), str(cfg))
    assert p.student.config["ffn_dim"] == tiny_wan.config["ffn_dim"]  # omitted fields take the teacher's
    d = p.mapping.to_dict()
    assert set(d["entries"][0]) >= {"student_key", "status", "teacher_keys", "student_shape", "teacher_shapes",
                                    "params", "reason"}
    assert set(d["coverage"]) == {"keys", "params"}


def test_bad_student_config_values(tiny_wan, tmp_path):
    with pytest.raises(ProjectionError, match="layout 'unet' is unknown"):
        Projector.open(str(tiny_wan.original_dir), {"layout": "unet"})
    with pytest.raises(ProjectionError, match="'dim' must be a positive integer"):
        Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": -4})
    with pytest.raises(ProjectionError, match="not divisible"):
        Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 60, "num_heads": 8})


def test_wan14b_student_at_teacher_heads_limit(wan14b_headers):
    """Wan2.1-1.3B-like limit case: the seeds' 16 heads of 64 cannot come from 12 heads of 128."""
    from projection.demo import write_shape_only_teacher

    cfg = {**WAN14B, "dim": 1536, "num_heads": 12, "ffn_dim": 8960, "num_layers": 2}
    folder = write_shape_only_teacher(wan14b_headers.parent / "wan13b", cfg)
    with pytest.raises(ProjectionError, match="16 heads of 64 but the teacher has 12 heads of 128"):
        Projector.open(str(folder), {"layout": "seed", "dim": 1024, "num_heads": 16, "num_layers": 2}).mapping
    ok = Projector.open(str(folder), {"layout": "seed", "dim": 1024, "num_heads": 8, "num_layers": 2})
    assert ok.mapping.counts()["concatenated"] == 4


def test_wan21_i2v_image_keys_normalize_from_diffusers_names():
    from projection.anatomy import native_name, to_canonical, wan_tensors

    cfg = {**WAN14B, "num_layers": 2}
    canonical = list(wan_tensors(cfg, image=True))
    assert "img_emb.emb_pos" in canonical and "blocks.1.cross_attn.k_img.weight" in canonical
    native = [native_name(k, "wan-diffusers") for k in canonical]
    assert "condition_embedder.image_embedder.ff.net.2.weight" in native
    assert "blocks.1.attn2.add_k_proj.weight" in native
    assert sorted(to_canonical(native, "wan-diffusers")) == sorted(canonical)
