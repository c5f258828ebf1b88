"""Presets (stock Wan shapes a student config may name), the frameworks that load a shape, and student plans near a
parameter target: through the library, the `projection plan-student` command, and the inspector's form helpers."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import diffusers_kwargs
from projection import ProjectionError
from projection.arch.config import ModelConfig, student_config
from projection.arch.sizing import (FLOPS_MEANING, count_params, ffn_for, flops_per_token, frameworks,
                                    layer_counts, parse_params, plan_students)
from projection.arch.presets import PRESETS, STOCK, expand_preset
from test_cli import TEACHER, assert_error, run

ALL = ["diffusers", "Wan", "ComfyUI", "diffusion-pipe", "DiffSynth-Studio", "musubi-tuner"]
WAN14B = ModelConfig.from_dict(STOCK["wan2.1-14b"])


def shape(**changes: int) -> ModelConfig:
    return ModelConfig.from_dict({**STOCK["wan2.1-1.3b"], **changes})


# ------------------------------------------------------------------ presets in student configs


def test_a_preset_fills_the_student_config_and_fields_beside_it_override():
    cfg = student_config("wanlite", {"preset": "wan2.1-1.3b"}, WAN14B)
    assert cfg.to_dict() == {"layout": "wanlite", **PRESETS["wan2.1-1.3b"], "head_dim": 128}
    deeper = student_config("wanlite", {"preset": "wan2.1-1.3b", "num_layers": 10, "ffn_dim": 4096}, WAN14B)
    assert (deeper.dim, deeper.num_heads, deeper.num_layers, deeper.ffn_dim) == (1536, 12, 10, 4096)
    assert expand_preset({"num_layers": 3, "preset": "wan2.1-1.3b"}) == {**PRESETS["wan2.1-1.3b"], "num_layers": 3}
    assert expand_preset({"dim": 64}) == {"dim": 64}  # no preset: the fields as given
    # the preset's widths come with it, whatever the teacher's (a 5B teacher has 48 latent channels)
    five = student_config("wanlite", {"preset": "wan2.1-1.3b"}, ModelConfig.from_dict(STOCK["wan2.2-ti2v-5b"]))
    assert (five.in_dim, five.out_dim) == (16, 16)


@pytest.mark.parametrize("name", ["wan2.1-13b", 1.3, None])
def test_an_unknown_preset_names_the_known_ones(name):
    with pytest.raises(ProjectionError, match=r"^student config: unknown preset .*; the presets are wan2\.1-1\.3b$"):
        student_config("wanlite", {"preset": name}, WAN14B)
    with pytest.raises(ProjectionError, match=r"unknown preset 'wan2.1-13b' \(did you mean 'wan2.1-1.3b'\?\)"):
        expand_preset({"preset": "wan2.1-13b"})


def test_a_preset_larger_than_the_teacher_and_a_misspelt_preset_key_are_refused():
    with pytest.raises(ProjectionError, match=r"^student config: dim 1536 is more than the teacher's 128; a "):
        student_config("wanlite", {"preset": "wan2.1-1.3b"}, TEACHER)
    with pytest.raises(ProjectionError, match=r"unknown field 'presets' \(did you mean 'preset'\?\); the fields "
                                              r"are layout, .*, preset$"):
        student_config("wanlite", {"presets": "wan2.1-1.3b"}, WAN14B)


# ------------------------------------------------------------------ frameworks


def test_frameworks_that_load_a_shape_as_it_is():
    assert frameworks(shape()) == ALL  # the 1.3B shape: every framework
    assert frameworks(WAN14B) == ALL
    assert frameworks(shape(in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)) == ALL  # I2V-A14B
    assert frameworks(shape(dim=1024, num_heads=8)) == ["diffusers", "Wan", "ComfyUI"]  # head dim 128, not stock
    assert frameworks(shape(num_heads=24)) == ["diffusers", "Wan", "diffusion-pipe"]  # head dim 64: not ComfyUI
    assert frameworks(shape(freq_dim=128)) == ["diffusers", "Wan", "diffusion-pipe"]  # ComfyUI assumes 256
    assert frameworks(shape(num_layers=20)) == ["diffusers", "Wan", "ComfyUI", "diffusion-pipe"]  # not a stock depth


# ------------------------------------------------------------------ counts


def test_parameter_counts_are_the_released_models_and_the_modules():
    assert count_params(STOCK["wan2.1-1.3b"]) == 1_418_996_800  # shared/wan-reference.md, section 3
    assert count_params(WAN14B) == 14_288_491_584
    assert count_params(STOCK["wan2.2-ti2v-5b"]) == 4_999_787_712
    from diffusers import WanTransformer3DModel

    small = {"dim": 64, "ffn_dim": 96, "num_heads": 2, "num_layers": 3, "in_dim": 4, "out_dim": 4, "text_dim": 24,
             "freq_dim": 16}
    with torch.device("meta"):  # the third-party module of the same shape
        reference = WanTransformer3DModel(**diffusers_kwargs(small))
    assert count_params(small) == sum(p.numel() for p in reference.parameters()) == 177_712


def test_flops_per_token_count_the_linears_a_latent_token_passes_through():
    d, f, layers, patch, channels = 1536, 8960, 30, 4, 16
    per_block = 4 * d * d + 2 * d * d + 2 * d * f  # self-attention q, k, v, o; cross-attention q, o; FFN
    embed_and_head = 2 * channels * patch * d  # the 1x2x2 patch in, and out through the head
    assert flops_per_token(STOCK["wan2.1-1.3b"]) == 2 * (embed_and_head + layers * per_block)
    assert "not the attention products" in FLOPS_MEANING and "cross-attention k/v" in FLOPS_MEANING


@pytest.mark.parametrize("text, value", [("1.3B", 1_300_000_000), ("300M", 300_000_000), ("5e8", 500_000_000),
                                         ("2,500k", 2_500_000), (" 1.5 g ", 1_500_000_000), ("0.2T", 2 * 10**11),
                                         ("12345", 12345)])
def test_parse_params(text, value):
    assert parse_params(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-5M", "0", "0.4", "1.3X", "nan", "inf", "1e999", "1.3BB"])
def test_parse_params_refuses_what_is_not_a_count(text):
    with pytest.raises(ProjectionError, match=r"^params: '.*' is not a parameter count \(e\.g\. 1\.3B, 300M or 5e8\)$"):
        parse_params(text)


def test_parse_params_is_bounded_by_the_teacher():
    with pytest.raises(ProjectionError, match=r"^params: 20B is not less than the teacher's 14,288,491,584 "
                                              r"parameters$"):
        parse_params("20B", count_params(WAN14B))
    assert parse_params("14B", count_params(WAN14B)) == 14 * 10**9


# ------------------------------------------------------------------ plans


def test_plan_for_a_14b_teacher_near_1_3b():
    target, total = 1.3e9, count_params(WAN14B)
    found = plan_students(WAN14B, target)
    grid = [c for c in found if c.preset is None]
    assert len(grid) == 5 and [c.preset for c in found if c.preset] == ["wan2.1-1.3b"]
    offs = [abs(math.log(c.params / target)) for c in found]
    assert offs == sorted(offs) and max(offs) < math.log(1.1)  # closest first, all within 10%
    for c in found:
        cfg = c.config
        assert cfg.head_dim == 128 and cfg.dim <= 5120 and cfg.ffn_dim <= 13824
        assert c.params == count_params(cfg) and c.share == pytest.approx(c.params / total)
        assert c.flops == flops_per_token(cfg) and list(c.frameworks) == frameworks(cfg)
    for c in grid:
        assert 40 % c.config.num_layers == 0 and c.config.ffn_dim % 128 == 0
        assert c.config.ffn_dim == ffn_for(c.config.dim, WAN14B)
        assert c.fields == {"layout": "diffusers", "dim": c.config.dim, "ffn_dim": c.config.ffn_dim,
                            "num_heads": c.config.num_heads, "num_layers": c.config.num_layers}
    assert len({c.config.num_layers for c in grid}) == 5  # one width per depth: the trade-off shows
    preset = next(c for c in found if c.preset)
    assert preset.fields == {"preset": "wan2.1-1.3b"} and list(preset.frameworks) == ALL
    assert preset.params == 1_418_996_800
    assert layer_counts(40) == [40, 20, 10, 8, 5, 4, 2, 1]
    assert [c.preset for c in plan_students(WAN14B, 1.3e9, count=1)] == [None, "wan2.1-1.3b"]


def test_plan_keeps_presets_that_do_not_fit_out_and_refuses_bad_targets():
    demo = ModelConfig.from_dict(TEACHER)  # width 128: the 1.3B preset does not fit
    found = plan_students(demo, 3e5)
    assert found and all(c.preset is None and c.config.head_dim == 32 and 8 % c.config.num_layers == 0
                         for c in found)
    five = ModelConfig.from_dict(STOCK["wan2.2-ti2v-5b"])  # wide enough, but 48 latent channels
    assert all(c.preset is None for c in plan_students(five, 1.3e9))
    for bad in (0, count_params(demo)):
        with pytest.raises(ProjectionError, match=r"^params: .* must be positive and less than the teacher's "):
            plan_students(demo, bad)
    headless = ModelConfig.from_dict({k: v for k, v in TEACHER.items() if k != "num_heads"})
    with pytest.raises(ProjectionError, match=r"^teacher: 'num_heads' is unknown; a plan needs its whole shape$"):
        plan_students(headless, 3e5)


# ------------------------------------------------------------------ the command


def test_plan_student_command_on_14b_headers(capsys, wan14b_headers, tmp_path):
    code, out, err = run(capsys, "plan-student", "--teacher", wan14b_headers, "--params", "1.3B")
    assert code == 0 and err == ""
    assert "14,288,491,584 params; dim 5120, ffn 13824, 40 heads x 128, 40 layers; target 1,300,000,000" in out
    preset_row = next(line for line in out.splitlines() if line.startswith("wan2.1-1.3b"))
    assert preset_row.split()[1:7] == ["1536", "8960", "12x128", "30", "1,418,996,800", "9.9%"]
    assert preset_row.endswith(", ".join(ALL))
    assert "not the attention products" in out and "ComfyUI: head dim 128 and freq dim 256" in out
    code, out, err = run(capsys, "plan-student", "--teacher", wan14b_headers, "--params", "1.3B", "--count", "2",
                         "--json")
    assert code == 0
    data = json.loads(out)
    assert data["teacher_params"] == 14_288_491_584 and data["target"] == 1_300_000_000
    assert len(data["candidates"]) == 3 and data["flops_per_token"] == FLOPS_MEANING
    first = data["candidates"][0]
    assert first["student_config"]["layout"] == "diffusers" and first["head_dim"] == 128
    # a row is a student config the projection takes as it is, with the parameters the plan counted
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump(first["student_config"]))
    code, out, err = run(capsys, "map", "--teacher", wan14b_headers, "--student", student, "--json", "--no-energy")
    assert code == 0
    assert json.loads(out)["coverage"]["params"]["total"] == first["params"]


def test_plan_student_command_on_the_demo_teacher_and_bad_targets(capsys, demo_dir):
    teacher = demo_dir / "teacher-wan"
    code, out, _ = run(capsys, "plan-student", "--teacher", teacher, "--params", "300k")
    assert code == 0 and "wan2.1-1.3b" not in out  # too wide for this teacher
    assert out.rstrip().endswith("  layout: diffusers\n  dim: 64\n  ffn_dim: 256\n  num_heads: 2\n  num_layers: 4")
    assert_error(*run(capsys, "plan-student", "--teacher", teacher, "--params", "lots"), "params: 'lots' is not a "
                 "parameter count")
    assert_error(*run(capsys, "plan-student", "--teacher", teacher, "--params", "1T"), "params: 1T is not less than "
                 "the teacher's")
