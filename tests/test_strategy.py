"""Every strategy option changes the projection the way it says, and the strategy round-trips through YAML."""
from __future__ import annotations

import math
import re

import pytest
import torch

from projection import ProjectionError, Projector, Strategy
from projection.arch.wan import rope_bands, rope_frequencies
from projection.core.plan import keep_rope_pairs, keep_top, keep_uniform
from projection.core.project import collapse_time, svd_project

SMALL = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}


def projector(tiny_wan, **fields) -> Projector:
    return Projector.open(str(tiny_wan.original_dir), SMALL, strategy=Strategy(**fields))


def test_yaml_round_trip_and_defaults(tmp_path):
    s = Strategy(layers=[3, 1], width="uniform", heads="first", head_dim="first", ffn="uniform", conv="center",
                 rescale="variance", expert="low", dtype="bfloat16", device="cpu", seed=7)
    assert Strategy.from_yaml(s.to_yaml()) == s
    path = tmp_path / "s.yaml"
    path.write_text(s.to_yaml())
    assert Strategy.load(path) == s
    assert Strategy.from_yaml("") == Strategy()
    assert Strategy().basis_consistent and not Strategy(width="svd-per-matrix").basis_consistent


def test_bad_strategy_yaml_names_field_and_file():
    with pytest.raises(ProjectionError, match=r"s.yaml: width: Input should be"):
        Strategy.from_yaml("width: widest", "s.yaml")
    with pytest.raises(ProjectionError, match="colour: Extra inputs"):
        Strategy.from_yaml("colour: red")
    with pytest.raises(ProjectionError, match="invalid YAML"):
        Strategy.from_yaml("width: [")


def test_rope_pairs_stay_whole_inside_their_bands():
    for t_dim, s_dim in ((128, 64), (128, 128), (64, 32), (128, 96)):
        idx = keep_rope_pairs(t_dim, s_dim, "frequency", rope_bands)
        assert len(idx) == s_dim
        assert torch.equal(idx[0::2] + 1, idx[1::2])  # (2i, 2i+1) together
        assert (idx[0::2] % 2 == 0).all()
        t_bands, s_bands = rope_bands(t_dim), rope_bands(s_dim)
        pairs = (idx[0::2] // 2).tolist()
        edges = [0] + list(torch.tensor(t_bands).cumsum(0).tolist())
        start = 0
        for b, n in enumerate(s_bands):  # student band b is filled from teacher band b only
            assert all(edges[b] <= p < edges[b + 1] for p in pairs[start:start + n])
            start += n
    assert torch.equal(keep_rope_pairs(128, 128, "frequency", rope_bands), torch.arange(128))


def test_rope_frequency_match_is_nearest():
    idx = keep_rope_pairs(128, 64, "frequency", rope_bands)
    t = torch.cat(rope_frequencies(128))
    s = torch.cat(rope_frequencies(64))
    chosen = t[idx[0::2] // 2]
    # every chosen teacher frequency is within a factor 1.25 of the student's own (bands of 21-22 vs 10-12 pairs)
    assert ((chosen / s).log().abs() < math.log(1.25)).all()
    first = keep_rope_pairs(128, 64, "first", rope_bands)
    assert (t[first[0::2] // 2] / s).log().abs().max() > math.log(1.25)  # "first" does not match frequencies
    # at a 2:1 ratio nearest-frequency equals every other pair; at 4:3 it differs from a uniform stride
    assert not torch.equal(keep_rope_pairs(128, 96, "frequency", rope_bands),
                           keep_rope_pairs(128, 96, "uniform", rope_bands))


def test_selection_helpers():
    assert keep_uniform(10, 4).tolist() == [0, 2, 5, 7]
    assert keep_top(torch.tensor([1.0, 9.0, 3.0, 7.0]), 2).tolist() == [1, 3]  # ascending order kept


@pytest.mark.parametrize("field,values", [
    ("width", ["magnitude", "uniform", "first", "svd-per-matrix"]),
    ("heads", ["magnitude", "uniform", "first"]),
    ("head_dim", ["frequency", "first", "uniform"]),
    ("ffn", ["magnitude", "uniform", "first"]),
])
def test_each_option_changes_the_projection(demo_dir, field, values):
    key = {"width": "blocks.0.ffn.0.weight", "heads": "blocks.0.self_attn.v.weight",
           "head_dim": "blocks.0.self_attn.v.weight", "ffn": "blocks.0.ffn.2.weight"}[field]
    student = {"layout": "wanlite", "dim": 32, "num_heads": 2, "ffn_dim": 384, "num_layers": 2}  # 4x32 -> 2x16
    tensors = [Projector.open(str(demo_dir / "teacher-wan"), student, strategy=Strategy(**{field: v}))
               .student_tensor(key) for v in values]
    for i in range(len(tensors)):
        for j in range(i + 1, len(tensors)):
            assert not torch.equal(tensors[i], tensors[j]), (values[i], values[j])


def test_width_first_keeps_the_first_channels(tiny_wan):
    p = projector(tiny_wan, width="first", heads="first", head_dim="first", ffn="first")
    assert p.mapping().layers == [0, 1]  # the default layers: first
    t = p.teacher.read("blocks.1.ffn.0.weight")
    assert torch.equal(p.student_tensor("blocks.1.ffn.0.weight"), t[:24, :32])


@pytest.mark.parametrize("demo, margin", [
    ("synthetic_demo_dir", 0.1),  # built with strong and weak channels, heads and neurons
    ("demo_dir", 0.01),  # trained: its channels matter more evenly (measured: 28.4% vs 26.6%)
])
def test_magnitude_keeps_more_energy_than_first(request, demo, margin):
    demo_dir = request.getfixturevalue(demo)
    energy = {}
    for width in ("magnitude", "first"):
        p = Projector.open(str(demo_dir / "teacher-wan"), str(demo_dir / "student-wanlite.yaml"),
                           strategy=Strategy(width=width, heads=width, ffn=width))
        energy[width] = p.summary(p.project())["retained_weight_energy"]["mean"]
    assert energy["magnitude"] > energy["first"] + margin


def test_retained_energy_counts_what_does_not_transfer_as_zero(demo_dir):
    """Breaking every ffn.0.weight (a fifth of the parameters) must cost that much energy, not move the mean by
    a tenth of a point: skipped parameters count as kept nothing, in the mean and per layer."""
    teacher, student = str(demo_dir / "teacher-wan"), str(demo_dir / "student-wanlite.yaml")
    whole = Projector.open(teacher, student)
    broken = Projector.open(teacher, student, rules={"blocks.{i}.ffn.0.weight": "blocks.{i}.ffn.9.weight"})
    results = broken.project()
    lost = [r for r in results if r.entry.student_key.endswith("ffn.0.weight")]
    assert len(lost) == 4 and all(r.entry.status == "skipped" for r in lost)
    total = sum(r.entry.params for r in results)
    share = sum(r.entry.params for r in lost) / total
    assert 0.18 < share < 0.23
    expected = sum(r.energy * r.entry.params for r in results if r.energy is not None) / total
    intact = {r.entry.student_key: r for r in whole.project()}
    before = whole.summary(list(intact.values()))["retained_weight_energy"]
    after = broken.summary(results)["retained_weight_energy"]
    assert after["mean"] == pytest.approx(expected, rel=1e-12)
    # The mean drops by what ffn.0 kept, weighted by its fifth of the parameters (within 5%: without ffn.0 the
    # residual and FFN rankings change a little, and so does what the other tensors keep)
    drop = sum(intact[r.entry.student_key].energy * r.entry.params for r in lost) / total
    assert drop > 0.04 and before["mean"] - after["mean"] == pytest.approx(drop, rel=0.05)
    block = [r for r in results if r.entry.student_block == 0]
    block_params = sum(r.entry.params for r in block)
    assert after["by_layer"]["block 0"] == pytest.approx(
        sum((r.energy or 0.0) * r.entry.params for r in block) / block_params, rel=1e-12)
    lost0 = next(r for r in lost if r.entry.student_block == 0)
    assert before["by_layer"]["block 0"] - after["by_layer"]["block 0"] == pytest.approx(
        intact[lost0.entry.student_key].energy * lost0.entry.params / block_params, rel=0.05)
    assert after["by_kind"]["ffn.0.weight"] == 0.0
    assert "weight statistic" in after["meaning"] and "count as 0" in after["meaning"]


def test_residual_index_set_is_shared_by_every_reader_and_writer(tiny_wan):
    p = projector(tiny_wan)
    resid = p.plan().indices("resid", None)
    t = p.teacher
    block = p.mapping().layers[1]
    assert torch.equal(p.student_tensor("patch_embedding.bias"), t.read("patch_embedding.bias")[resid])
    assert torch.equal(p.student_tensor("blocks.1.norm3.weight"), t.read(f"blocks.{block}.norm3.weight")[resid])
    assert torch.equal(p.student_tensor("blocks.1.modulation"), t.read(f"blocks.{block}.modulation")[:, :, resid])
    tp = t.read("time_projection.1.weight").reshape(6, 64, 64)[:, resid][:, :, resid].reshape(6 * 32, 32)
    assert torch.equal(p.student_tensor("time_projection.1.weight"), tp)  # every chunk of [6D, D]
    hm = t.read("head.modulation")[:, :, resid]
    assert torch.equal(p.student_tensor("head.modulation"), hm)
    assert torch.equal(p.student_tensor("head.head.weight"), t.read("head.head.weight")[:, resid])


def test_conv_collapse_modes():
    w = torch.randn(4, 3, 3, 2, 2)
    assert torch.equal(collapse_time(w, 2, "center"), w[:, :, 1])
    assert torch.allclose(collapse_time(w, 2, "sum"), w.sum(2))
    assert torch.allclose(collapse_time(w, 2, "mean"), w.mean(2))
    # 'sum' is exact for a static clip: a Conv3d over identical frames equals the Conv2d with the summed kernel
    x = torch.randn(1, 3, 1, 6, 6).expand(1, 3, 3, 6, 6)
    y3 = torch.nn.functional.conv3d(x, w, stride=(1, 2, 2))[:, :, 0]
    y2 = torch.nn.functional.conv2d(x[:, :, 0], collapse_time(w, 2, "sum"), stride=2)
    assert torch.allclose(y3, y2, atol=1e-5)


@pytest.mark.parametrize("conv", ["center", "mean", "sum"])
def test_conv_option_reaches_the_patch_embedding(tiny_wan, conv):
    p = projector(tiny_wan, conv=conv)
    resid = p.plan().indices("resid", None)
    w = p.teacher.read("patch_embedding.weight")[resid]  # kt = 1: all three agree with the single slice
    assert torch.allclose(p.student_tensor("patch_embedding.weight"), w[:, :, 0])
    assert any(conv in t for t in p.mapping().entry("patch_embedding.weight").transforms)


def test_variance_rescale_rule(tiny_wan):
    plain = projector(tiny_wan)
    scaled = projector(tiny_wan, rescale="variance")
    ratio = scaled.student_tensor("blocks.0.ffn.2.weight") / plain.student_tensor("blocks.0.ffn.2.weight")
    assert torch.allclose(ratio, torch.full_like(ratio, math.sqrt(48 / 24)))  # input axis: FFN 48 -> 24
    assert torch.equal(scaled.student_tensor("blocks.0.ffn.2.bias"), plain.student_tensor("blocks.0.ffn.2.bias"))
    r_in = scaled.student_tensor("blocks.0.self_attn.q.weight") / plain.student_tensor("blocks.0.self_attn.q.weight")
    assert torch.allclose(r_in, torch.full_like(r_in, math.sqrt(64 / 32)))


def test_svd_per_matrix_is_the_per_matrix_optimum_and_flagged(tiny_wan):
    w = torch.randn(12, 10, dtype=torch.float64)
    p = svd_project(w, 4, 3)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(torch.linalg.svdvals(p), s[:3])  # each side onto its own top singular vectors
    proj = projector(tiny_wan, width="svd-per-matrix")
    assert not proj.summary()["basis_consistent"]
    assert any("basis-inconsistent" in w for w in proj.summary()["warnings"])
    energies = {r.entry.student_key: r.energy for r in proj.project()}
    baseline = {r.entry.student_key: r.energy for r in projector(tiny_wan).project()}
    key = "blocks.0.ffn.0.weight"
    assert energies[key] >= baseline[key]  # max energy per matrix, yet inconsistent bases


def test_dtype_and_device_options(tiny_wan, tmp_path):
    from projection import export_student, load_student

    p = projector(tiny_wan, dtype="bfloat16", device="cpu")
    export_student(p, tmp_path / "bf16")
    model = load_student(tmp_path / "bf16")
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert p.device.type == "cpu"


def test_expert_option_picks_the_expert(tiny_wan, tmp_path):
    import shutil

    root = tmp_path / "wan22"
    shutil.copytree(tiny_wan.original_dir, root / "high_noise_model")
    shutil.copytree(tiny_wan.original_dir, root / "low_noise_model")
    p = Projector.open(str(root), SMALL, strategy=Strategy(expert="low"))
    assert p.teacher.checkpoint.expert == "low"
    with pytest.raises(ProjectionError, match="choose an expert"):
        Projector.open(str(root), SMALL)


# ---------------------------------------------------------------- untrusted YAML and student configs: bounded


def alias_bomb(levels: int = 9) -> str:
    """The classic: each level lists the one before it nine times; refs share memory until anything copies or
    serialises them (9^levels strings)."""
    lines = ['l0: &l0 "blocks.{i}.self_attn.q.weight"']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_yaml_anchors_and_aliases_are_refused_everywhere(tiny_wan, tmp_path):
    from projection.core.mapping import parse_rules

    refused = "YAML anchors and aliases are not accepted"
    with pytest.raises(ProjectionError, match=rf"^rules.yaml: {refused} \(&l0 on line 1\)"):
        parse_rules(alias_bomb(), "rules.yaml")
    with pytest.raises(ProjectionError, match=rf"^rules: {refused} \(\*q on line 1\)"):
        parse_rules("blocks.{i}.a: *q\n", "rules")  # an alias without its anchor
    with pytest.raises(ProjectionError, match=rf"^s.yaml: {refused} \(&w on line 1\)"):
        Strategy.from_yaml("width: &w first\nheads: *w\n", "s.yaml")
    student = tmp_path / "student.yaml"
    student.write_text("layout: wanlite\nnum_layers: &n 2\nnum_heads: *n\ndim: 32\n")
    with pytest.raises(ProjectionError, match=rf"^{student}: YAML anchors and aliases are not accepted"):
        Projector.open(str(tiny_wan.original_dir), str(student))
    merge = "base: &b {width: first}\n<<: *b\n"  # a merge key is an alias too
    with pytest.raises(ProjectionError, match="anchors and aliases are not accepted"):
        Strategy.from_yaml(merge)


@pytest.mark.parametrize("text,problem", [
    ("#" * (1 << 20) + "\n", "1,048,577 bytes of text; at most 1,048,576 are accepted"),
    ("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 40)), "YAML nested more than 32 levels deep (line 33)"),
    ("[" * 100_000 + "]" * 100_000, "invalid YAML"),  # libyaml's own flow limit, or ours
    ("a: [" + ", ".join(["x"] * 60_000) + "]", "more than 50,000 YAML values"),
    ("seed: " + "9" * 5000, "an integer of 5,000 digits on line 1 (at most 20)"),
    ("seed: 0x" + "f" * 100, "an integer of 102 digits"),
], ids=["1-MiB", "deep-block", "deep-flow", "many-values", "5000-digits", "long-hex"])
def test_yaml_text_is_bounded_before_it_is_built(text, problem):
    from projection.core.mapping import parse_rules

    for parse in (lambda t: Strategy.from_yaml(t, "pasted"), lambda t: parse_rules(t, "pasted")):
        with pytest.raises(ProjectionError) as info:
            parse(text)
        assert str(info.value).startswith("pasted: ") and problem in str(info.value)


def test_strategy_and_rules_files_are_read_safely(tmp_path, fifo):
    from projection.io.inputs import read_text

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1\n# réglage\n".encode("latin-1"))
    with pytest.raises(ProjectionError, match=rf"^{latin1}: not UTF-8 text \(invalid byte at offset 11, line 2\)$"):
        Strategy.load(latin1)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"seed: 1\n" + b"#" * (1 << 20))
    with pytest.raises(ProjectionError, match=rf"^{big}: strategy of 1,048,584 bytes; at most 1,048,576"):
        Strategy.load(big)
    pipe = fifo(tmp_path / "pipe.yaml")
    with pytest.raises(ProjectionError, match=rf"^{pipe}: not a regular file \(a FIFO\)"):
        Strategy.load(pipe)
    with pytest.raises(ProjectionError, match=rf"^{tmp_path}: not a regular file \(a folder\)"):
        read_text(tmp_path, "rules")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffseed: 3\n".encode())
    assert Strategy.load(bom).seed == 3


@pytest.mark.parametrize("text,problem", [
    ("seed: 9223372036854775808", "seed: Input should be less than 9223372036854775808"),
    ("seed: -1", "seed: Input should be greater than or equal to 0"),
    ("seed: true", "seed: Input should be a valid integer"),
    ("seed: '7'", "seed: Input should be a valid integer"),
    ("layers: [true, false]", "layers: entry 0 is a boolean: a teacher block is a whole number from 0"),
    ("layers: [0, 1.0]", "layers: entry 1 is 1.0"),
    ("layers: [0, -2]", "layers: entry 1 is -2"),
    ("layers: [0, 99999999999]", "layers: entry 1 is too large"),
    ("layers: widest", "layers: expected one of uniform, first, last, influence, recoverable or a list of teacher block indices, got 'widest'"),
    ("layers: [" + ", ".join(["0"] * 1025) + "]", "layers: 1025 entries; a layer list has at most 1024"),
], ids=["seed-2^63", "seed-negative", "seed-bool", "seed-string", "layers-bools", "layers-float", "layers-negative",
        "layers-huge", "layers-word", "layers-too-long"])
def test_strategy_numbers_are_strict(text, problem):
    with pytest.raises(ProjectionError) as info:
        Strategy.from_yaml(text, "s.yaml")
    assert str(info.value) == f"s.yaml: {problem}" or str(info.value).startswith(f"s.yaml: {problem}")
    assert Strategy(seed=2**63 - 1).seed == 2**63 - 1 and Strategy(layers=(2, 0)).layers == [2, 0]


@pytest.mark.parametrize("fields,problem", [
    ({"num_layers": 50_000}, "num_layers 50000 is more than the teacher's 3 blocks; a deeper student needs a "
                             "strategy 'layers' list that repeats blocks"),
    ({"dim": 65}, "dim 65 is more than the teacher's 64"),
    ({"ffn_dim": 10**9}, "ffn_dim 1000000000 is more than the teacher's 48"),
    ({"text_dim": 100_000}, "text_dim 100000 is more than 16384"),
    ({"dim": True}, "'dim' must be a positive integer, got True"),
    ({"dim": 32.0}, "'dim' must be a positive integer, got 32.0"),
    ({"num_layers": "2"}, "'num_layers' must be a positive integer, got '2'"),
    ({"num_layers": 0}, "'num_layers' must be a positive integer, got 0"),
    ({"num_layer": 2}, "unknown field 'num_layer' (did you mean 'num_layers'?); the fields are layout, dim,"),
    ({"colour": "red"}, "unknown field 'colour'; the fields are layout, dim, ffn_dim"),
], ids=["50000-layers", "wider", "ffn-10^9", "text-dim", "bool", "float", "string", "zero", "typo", "unknown"])
def test_student_config_is_checked_against_the_teacher_before_anything_is_built(tiny_wan, tmp_path, monkeypatch,
                                                                                fields, problem):
    import yaml

    import projection.core.models

    def never(*args, **kwargs):
        raise AssertionError("the student was built before its config was checked")

    monkeypatch.setattr(projection.core.models, "build_student", never)
    student = {"layout": "wanlite", "dim": 32, "num_heads": 1, **fields}
    with pytest.raises(ProjectionError, match="^student config: " + re.escape(problem)):
        Projector.open(str(tiny_wan.original_dir), student)
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(student))
    with pytest.raises(ProjectionError, match=f"^{path}: student config: " + re.escape(problem)):
        Projector.open(str(tiny_wan.original_dir), str(path))


def test_a_deeper_student_needs_a_layer_list_as_long(tiny_wan):
    five = {"layout": "wanlite", "dim": 32, "num_heads": 1, "num_layers": 5}
    p = Projector.open(str(tiny_wan.original_dir), five, strategy=Strategy(layers=[0, 0, 1, 2, 2]))
    assert p.mapping().layers == [0, 0, 1, 2, 2]
    with pytest.raises(ProjectionError, match="num_layers 6 is more than the teacher's 3 blocks; the strategy's "
                                              "layer list has 5 entries"):
        Projector.open(str(tiny_wan.original_dir), {**five, "num_layers": 6}, strategy=Strategy(layers=[0] * 5))
