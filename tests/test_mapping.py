"""Key mapping: statuses, presets, rules, coverage, and the mistakes the report must make impossible to miss."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from projection import ProjectionError, Projector, Strategy, open_teacher
from projection.core.mapping import find_rule, parse_rules, select_layers
from projection.demo.folder import WAN14B

UNIFORM = Strategy(layers="uniform")  # student blocks from teacher blocks of other indices: mapping across them


def test_wan14b_maps_from_headers_alone_into_the_seeds_layout(wan14b_headers):
    p = Projector.open(str(wan14b_headers), {"layout": "seed", "dim": 1024, "num_layers": 16, "num_heads": 16,
                                             "ffn_dim": 4096}, strategy=UNIFORM)
    assert len(p.teacher.shapes) == 1095
    m = p.mapping()
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
                                             "ffn_dim": 4096}, strategy=UNIFORM)
    m = p.mapping()
    assert m.counts()["skipped"] == 0
    q = m.entry("blocks.1.self_attn.q.weight")
    assert q.status == "mapped" and q.teacher_keys == ["blocks.3.self_attn.q.weight"]
    assert any("sa_heads 40->8" in t for t in q.transforms) and any("resid 5120->1024" in t for t in q.transforms)
    assert m.entry("patch_embedding.weight").transforms[0].startswith("Conv3d->Conv2d")


def test_other_latent_channels_skip_the_patch_embedding_and_the_head(demo_dir):
    """The head's rows are patch x output channels, one flattened axis: other channels (a preset's 16 on the demo's
    4) have no faithful source there either, and the projection writes the rest."""
    p = Projector.open(str(demo_dir / "teacher-wan"), {"preset": "wan2.1-1.3b", "dim": 64, "num_layers": 4,
                                                       "num_heads": 2, "ffn_dim": 256})
    m = p.mapping()
    reason = "latent channels out 4 vs 16: no faithful source"
    assert [(m.entry(k).status, m.entry(k).reason) for k in ("head.head.weight", "head.head.bias")] == [
        ("skipped", reason)] * 2
    assert m.entry("patch_embedding.weight").status == "skipped" and m.entry("head.modulation").status == "mapped"
    projected = {r.entry.student_key: r.tensor for r in p.project()}  # it used to stop at the head's shape
    assert projected["head.head.weight"] is None and projected["head.modulation"].shape == (1, 2, 64)


def test_more_student_heads_than_teacher_is_a_clear_error(tiny_wan):
    with pytest.raises(ProjectionError, match=r"4 heads of 16 but the teacher has 2 heads of 32.*at most 2 heads"):
        Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite", "dim": 64, "num_heads": 4}).mapping()


def test_same_config_statuses_by_format(tiny_wan):
    orig = Projector.open(str(tiny_wan.original_dir), {"layout": "wanlite"}).mapping()
    assert orig.counts() == {"exact": len(orig.entries) - 1, "mapped": 1, "concatenated": 0, "skipped": 0}
    assert orig.entry("patch_embedding.weight").status == "mapped"  # Conv3d -> Conv2d
    diff = Projector.open(str(tiny_wan.diffusers_dir), {"layout": "wanlite"}).mapping()
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
    block = p.mapping().layers[1]
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
    p = Projector.open(str(tiny_wan.original_dir), str(folder), strategy=UNIFORM)
    assert p.student.layout == "custom"
    assert p.mapping().coverage()["keys"]["transferred"] == 0
    assert any("Nothing transfers" in w for w in p.summary()["warnings"])
    assert "no rule maps it" in p.mapping().entry("stem.weight").reason
    p.rules = parse_rules("stem: patch_embedding\nlayers.{i}.wq: blocks.{i}.self_attn.q\n"
                          "layers.{i}.fc1: blocks.{i}.ffn.0\n")
    m = p.mapping()
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
    assert p.student.config.ffn_dim == tiny_wan.config["ffn_dim"]  # omitted fields take the teacher's
    d = p.mapping().to_dict()
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
    from projection.demo.folder import write_shape_only_teacher

    cfg = {**WAN14B, "dim": 1536, "num_heads": 12, "ffn_dim": 8960, "num_layers": 2}
    folder = write_shape_only_teacher(wan14b_headers.parent / "wan13b", cfg)
    with pytest.raises(ProjectionError, match="16 heads of 64 but the teacher has 12 heads of 128"):
        Projector.open(str(folder), {"layout": "seed", "dim": 1024, "num_heads": 16, "num_layers": 2}).mapping()
    ok = Projector.open(str(folder), {"layout": "seed", "dim": 1024, "num_heads": 8, "num_layers": 2})
    assert ok.mapping().counts()["concatenated"] == 4


def test_wan21_i2v_image_keys_normalize_from_diffusers_names():
    from projection.arch.anatomy import native_name, to_canonical, wan_tensors

    cfg = {**WAN14B, "num_layers": 2}
    canonical = list(wan_tensors(cfg, image=True))
    assert "img_emb.emb_pos" in canonical and "blocks.1.cross_attn.k_img.weight" in canonical
    native = [native_name(k, "wan-diffusers") for k in canonical]
    assert "condition_embedder.image_embedder.ff.net.2.weight" in native
    assert "blocks.1.attn2.add_k_proj.weight" in native
    assert sorted(to_canonical(native, "wan-diffusers")) == sorted(canonical)


SMALL_TEACHER = {"dim": 48, "ffn_dim": 64, "num_heads": 4, "num_layers": 2, "in_dim": 16, "out_dim": 16,
                 "text_dim": 32, "freq_dim": 32}  # 4 heads of 12


def bare_seed_student(folder, dim: int = 24) -> str:
    """A seeds'-layout student saved as a bare state dict: nothing records its heads."""
    from projection.arch.layout import build_student

    folder.mkdir(parents=True, exist_ok=True)
    fields = {"layout": "seed", "dim": dim, "num_heads": 1, "ffn_dim": 32, "num_layers": 2, "in_dim": 4, "out_dim": 4,
              "text_dim": 32, "freq_dim": 32}
    state = {k: v.contiguous() for k, v in build_student(fields).state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return str(folder / "model.safetensors")


def test_a_checkpoint_students_heads_keep_the_teachers_head_dim_and_say_so(tmp_path):
    from projection.demo.folder import write_shape_only_teacher

    teacher = str(write_shape_only_teacher(tmp_path / "teacher", SMALL_TEACHER))
    student = bare_seed_student(tmp_path / "student")
    p = Projector.open(teacher, student)
    assert p.student.layout == "seed" and p.mapping().counts()["concatenated"] == 4  # maps, as 2 heads of 12
    config = p.student_config()
    assert (config.num_heads, config.head_dim, config.dim) == (2, 12, 24)
    assert config.freq_dim is None and "freq_dim" not in config.to_dict()  # nothing filled in from the teacher's
    summary = p.summary()
    assert summary["student"]["heads_inferred"] is True and summary["student"]["config"] == config.to_dict()
    assert "heads inferred: 2 x 12; the checkpoint does not record heads" in summary["warnings"][0]
    with pytest.raises(ProjectionError, match=r"1 heads of 24 but the teacher has 4 heads of 12.*e\.g\. num_heads 2 "
                                              r"\(head dim 12\)"):
        Projector.open(teacher, student, num_heads=1).mapping()
    given = Projector.open(teacher, student, num_heads=4)
    assert (given.student_config().num_heads, given.student_config().head_dim) == (4, 6)
    assert not given.heads_inferred() and not given.summary()["warnings"]
    (tmp_path / "student" / "config.json").write_text(json.dumps({"num_heads": 4}))  # recorded beside it
    recorded = Projector.open(teacher, student)
    assert recorded.student_config().num_heads == 4 and not recorded.heads_inferred()
    assert Projector.open(teacher, student, num_heads=2).student_config().num_heads == 2  # the option wins
    with pytest.raises(ProjectionError, match=r"model\.safetensors: width 24 is not divisible by num_heads 5"):
        Projector.open(teacher, student, num_heads=5)


def test_inferred_heads_keep_the_teachers_head_dim_else_the_layouts_default():
    from projection.arch.anatomy import infer_heads

    assert infer_heads(24, 12, 64) == 2
    assert infer_heads(128, 64, 128) == 2
    assert infer_heads(96, 64, 128) == 1  # 64 does not divide 96: the even divisor nearest 128 (96)
    assert infer_heads(192, 80, 64) == 3  # head dim 64
    assert infer_heads(1024, None, 128) == 8


def test_a_rule_that_matches_no_student_key_is_an_error_naming_it(tiny_wan):
    seed = {"layout": "seed", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}
    typo = {"blocks.{i}.mlpp.0": "blocks.{i}.ffn.0"}
    with pytest.raises(ProjectionError, match=r"^rule 'blocks\.\{i\}\.mlpp\.0' matches no student key \(the student "
                                              r"has \d+ keys\); did you mean 'blocks\.\{i\}\.mlp\.0'\?$"):
        Projector.open(str(tiny_wan.original_dir), seed, rules=typo).mapping()
    ok = Projector.open(str(tiny_wan.original_dir), seed, rules={"blocks.{i}.mlp.0": "blocks.{i}.ffn.0"})
    assert ok.mapping().entry("blocks.1.mlp.0.weight").status == "mapped"

# ---------------------------------------------------------------- suggested rules

# A custom student: the reference student under names a user might choose (wq, fc1, adaln, ...).
CUSTOM_NAMES = [(r"^blocks\.", "layers."), (r"\.self_attn\.(q|k|v|o)\.", r".w\1."),
                (r"\.self_attn\.norm_(q|k)\.", r".\1_norm."), (r"\.cross_attn\.(q|k|v|o)\.", r".cross.w\1."),
                (r"\.cross_attn\.norm_(q|k)\.", r".cross.\1_norm."), (r"\.ffn\.0\.", ".fc1."), (r"\.ffn\.2\.", ".fc2."),
                (r"\.norm3\.", ".norm."), (r"\.modulation$", ".adaln"), (r"^patch_embedding", "patchify"),
                (r"^text_embedding\.", "text_proj."), (r"^time_embedding\.", "t_embed."),
                (r"^time_projection\.1", "t_mod"), (r"^head\.head", "final.linear"), (r"^head\.adaln", "final.adaln")]
# ...and one that renames whole modules only, so short module rules say it all.
MODULE_NAMES = [(r"^blocks\.", "layers."), (r"\.self_attn\.", ".attn."), (r"\.cross_attn\.", ".xattn."),
                (r"\.ffn\.", ".mlp."), (r"^patch_embedding", "stem"), (r"^head\.head", "out.proj")]


def custom_student(demo_dir, folder, names) -> str:
    from projection.arch.config import student_config
    from projection.arch.layout import build_student

    teacher = open_teacher(str(demo_dir / "teacher-wan"))
    fields = {"dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}
    state = build_student(student_config("wanlite", fields, teacher.config)).state_dict()
    renamed = {}
    for key, value in state.items():
        for pattern, repl in names:
            key = re.sub(pattern, repl, key)
        renamed[key] = value.contiguous()
    folder.mkdir()
    save_file(renamed, str(folder / "model.safetensors"))
    return str(folder)


def test_suggested_rules_bring_a_custom_student_to_full_coverage(demo_dir, tmp_path):
    from projection.core.suggest import suggest_rules

    student = custom_student(demo_dir, tmp_path / "custom", CUSTOM_NAMES)
    p = Projector.open(str(demo_dir / "teacher-wan"), student, strategy=UNIFORM)
    assert p.mapping().coverage()["keys"]["transferred"] == 0
    suggested = suggest_rules(p.mapping())
    assert p.teacher.checkpoint.bytes_read == 0  # from names and shapes alone
    # one rule per module, written for every block at once: 16 block modules + 6 top-level ones, not 123 keys
    assert len(suggested) == 22
    assert all("{i}" in k and "{i}" in v for k, v in suggested.items() if k.startswith("layers."))
    assert not any(re.match(r"layers\.\d", k) for k in suggested)  # block indices are generalized
    assert suggested["layers.{i}.wq"] == "blocks.{i}.self_attn.q"
    assert suggested["layers.{i}.cross.wk"] == "blocks.{i}.cross_attn.k"
    assert suggested["layers.{i}.q_norm"] == "blocks.{i}.self_attn.norm_q"
    assert suggested["layers.{i}.fc2"] == "blocks.{i}.ffn.2"
    assert suggested["patchify"] == "patch_embedding"  # a Conv2d from the teacher's Conv3d
    p.rules = suggested
    m = p.mapping()
    assert m.coverage()["keys"]["rate"] == 1.0, [e.reason for e in m.entries if e.status == "skipped"]
    assert m.entry("layers.3.wv.bias").teacher_keys == ["blocks.7.self_attn.v.bias"]  # {i}: the chosen block (uniform: 0, 2, 5, 7)
    assert m.entry("t_embed.2.weight").teacher_keys == ["time_embedding.2.weight"]
    assert m.entry("text_proj.2.weight").teacher_keys == ["text_embedding.2.weight"]
    assert suggest_rules(m) == {}  # nothing left to suggest


def test_suggested_rules_are_module_prefixes_where_whole_modules_agree(demo_dir, tmp_path):
    from projection.core.suggest import suggest_rules

    student = custom_student(demo_dir, tmp_path / "custom", MODULE_NAMES)
    p = Projector.open(str(demo_dir / "teacher-wan"), student)
    suggested = suggest_rules(p.mapping())
    assert suggested == {  # 7 rules for 123 keys
        "layers.{i}.attn": "blocks.{i}.self_attn", "layers.{i}.mlp": "blocks.{i}.ffn",
        "layers.{i}.modulation": "blocks.{i}.modulation", "layers.{i}.norm3": "blocks.{i}.norm3",
        "layers.{i}.xattn": "blocks.{i}.cross_attn", "out.proj": "head.head", "stem": "patch_embedding"}
    p.rules = suggested
    assert p.mapping().coverage()["keys"]["rate"] == 1.0


def test_suggestions_leave_rules_and_deliberate_skips_alone(demo_dir, tmp_path):
    from projection.core.suggest import suggest_rules, with_suggestions

    student = custom_student(demo_dir, tmp_path / "custom", CUSTOM_NAMES)
    text = ("# my rules\nlayers.{i}.wq: blocks.{i}.self_attn.k  # deliberately odd, but it transfers\n"
            "final.linear: {skip: \"trained from scratch\"}\n")
    rules = parse_rules(text)
    p = Projector.open(str(demo_dir / "teacher-wan"), student, rules=rules, strategy=UNIFORM)
    suggested = suggest_rules(p.mapping())
    assert "layers.{i}.wq" not in suggested and "final.linear" not in suggested
    assert suggested["layers.{i}.wk"] == "blocks.{i}.self_attn.q"  # one student module per teacher module
    assert "blocks.{i}.self_attn.k" not in suggested.values()
    p.rules = {**rules, **suggested}
    m = p.mapping()
    assert m.entry("layers.2.wq.weight").teacher_keys == ["blocks.5.self_attn.k.weight"]  # uniform: 0, 2, 5, 7
    assert [e.student_key for e in m.entries if e.status == "skipped"] == ["final.linear.bias", "final.linear.weight"]
    assert m.entry("final.linear.weight").reason == "trained from scratch"
    out = with_suggestions(text, rules, suggested)
    assert out.startswith(text)  # the user's text, comments included, comes first and unchanged
    assert "# Suggested rules (20), to review before applying" in out
    assert parse_rules(out) == {**rules, **suggested}
    # a suggestion that replaces a rule of the text (one naming a missing teacher key) rewrites the text once
    typo = "layers.{i}.fc1: blocks.{i}.fnn.0\n"
    p.rules = parse_rules(typo)
    fixed = suggest_rules(p.mapping())
    assert fixed["layers.{i}.fc1"] == "blocks.{i}.ffn.0"
    out = with_suggestions(typo, parse_rules(typo), fixed)
    assert "fnn" not in out.split("# Suggested")[0] and "replace your rule(s) for layers.{i}.fc1" in out
    assert parse_rules(out) == fixed
