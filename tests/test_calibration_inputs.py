"""Calibration sets held to the rules checkpoints follow (issue 18): paths confined to the roots, values checked
after the cast, lengths validated and used, metadata made safe to show, options bounded; and the smaller cases
(duplicate YAML keys, an expert asked of a single model, NaN never written into a report)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from projection import ProjectionError, Projector, Strategy
from projection.cli import MAX_SAMPLES as CLI_MAX_SAMPLES
from projection.cli import main
from projection.engine.export import finite, report_json
from projection.function.calibration import MAX_SAMPLES, MAX_SHOWN, load_calibration, mask_padding
from projection.io.checkpoint import within
from test_cli import assert_error, run


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata)
    return path


def good_set(cfg, n=3, tokens=5):
    return {"latents": torch.randn(n, cfg["in_dim"], 4, 6), "context": torch.randn(n, tokens, cfg["text_dim"])}


def test_a_link_under_the_root_to_a_set_outside_is_refused_before_it_is_opened(tiny_wan, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    secret = write(outside / "secret.safetensors", good_set(tiny_wan.config))
    (root / "set.safetensors").symlink_to(secret)
    with pytest.raises(ProjectionError, match="outside"):
        load_calibration(root / "set.safetensors", tiny_wan.config, check=within(root, "the root"))
    assert len(load_calibration(root / "set.safetensors", tiny_wan.config)) == 3  # unchecked (the CLI): read


@pytest.mark.parametrize("name", ["latents", "context"])
def test_values_finite_in_float64_but_infinite_in_float32_are_refused(tiny_wan, tmp_path, name):
    tensors = {k: v.double() for k, v in good_set(tiny_wan.config).items()}
    tensors[name][0, 0, 0] = 1e300
    path = write(tmp_path / "huge.safetensors", tensors)
    with pytest.raises(ProjectionError, match=f"tensor '{name}' holds .* NaN or infinite value.* in float32"):
        load_calibration(path, tiny_wan.config)


@pytest.mark.parametrize("lengths,message", [
    (torch.tensor([5, -1, 3]), r"'context_lengths' holds -1 at sample 1; lengths are 0\.\.5"),
    (torch.tensor([5, 2**62, 3]), rf"'context_lengths' holds {2**62} at sample 1"),
    (torch.tensor([5.0, float("nan"), 3.0]), "'context_lengths' is float32; expected an integer dtype"),
    (torch.tensor([[5, 2, 3]]), r"'context_lengths' is \[1, 3\]; expected \[3\]"),
])
def test_context_lengths_are_validated(tiny_wan, tmp_path, lengths, message):
    path = write(tmp_path / "lengths.safetensors", {**good_set(tiny_wan.config), "context_lengths": lengths})
    with pytest.raises(ProjectionError, match=message) as info:
        load_calibration(path, tiny_wan.config)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_context_lengths_mask_the_padding_as_wan_pipelines_do(tiny_wan, tmp_path):
    tensors = {**good_set(tiny_wan.config), "context_lengths": torch.tensor([5, 2, 0], dtype=torch.int32)}
    found = load_calibration(write(tmp_path / "c.safetensors", tensors), tiny_wan.config)
    assert torch.equal(found.context[0], tensors["context"][0])
    assert torch.equal(found.context[1, :2], tensors["context"][1, :2]) and not found.context[1, 2:].any()
    assert not found.context[2].any()
    assert found.context_lengths.dtype == torch.int64
    assert torch.equal(mask_padding(tensors["context"], torch.tensor([5, 5, 5])), tensors["context"])


def test_an_extra_tensor_that_is_not_per_sample_is_refused_in_one_line(capsys, demo_dir, tmp_path):
    path = write(tmp_path / "extra.safetensors", {"latents": torch.randn(6, 4, 8, 8), "context": torch.randn(6, 3, 64),
                                                   "scale": torch.tensor(2.0)})
    code, out, err = run(capsys, "fidelity", "--teacher", demo_dir / "teacher-wan", "--student",
                         demo_dir / "student-wanlite.yaml", "--calibration", path, "--samples", 4)
    assert_error(code, out, err, str(path), "tensor 'scale' is []", "per sample [6, ...]")


@pytest.mark.parametrize("option,value", [("--samples", "-3"), ("--draws", "-2"), ("--draws", "0"),
                                          ("--draws", "65"), ("--samples", "4097"), ("--samples", "two")])
def test_counts_out_of_range_are_one_line_errors_naming_the_option(capsys, demo_dir, option, value):
    with pytest.raises(SystemExit) as info:
        main(["fidelity", "--teacher", str(demo_dir / "teacher-wan"), "--student",
              str(demo_dir / "student-wanlite.yaml"), option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}: '{value}' is not a whole number from 1 to" in err
    assert CLI_MAX_SAMPLES == MAX_SAMPLES


def test_metadata_is_shown_without_control_characters_and_capped(tiny_wan, tmp_path, capsys, demo_dir):
    hostile = "\x1b[31mred\x07 bell\r\nnext line" + "x" * (20 << 20)
    cfg = tiny_wan.config
    found = load_calibration(write(tmp_path / "m.safetensors", good_set(cfg), {"source": hostile}), cfg)
    source = found.metadata["source"]
    assert len(source) <= MAX_SHOWN + 3 and source.startswith("[31mred bell next line")
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in found.label)
    demo_set = write(tmp_path / "d.safetensors", {"latents": torch.randn(2, 4, 8, 8), "context": torch.randn(2, 3, 64)},
                     {"source": hostile})
    code, out, err = run(capsys, "fidelity", "--teacher", demo_dir / "teacher-wan", "--student",
                         demo_dir / "student-wanlite.yaml", "--calibration", demo_set, "--draws", 1)
    assert code == 0 and "\x1b" not in out + err and "\x07" not in out + err and len(out) < 5000


def test_activations_that_overflow_float32_are_refused_not_ranked_on(demo_dir, tmp_path, monkeypatch):
    from projection.function.calibration import Calibration

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    p = Projector.open(str(demo_dir / "teacher-wan"), str(demo_dir / "student-wanlite.yaml"),
                       strategy=Strategy(width="activation"))
    loud = Calibration(torch.full((2, 4, 8, 8), 3e38), torch.randn(2, 3, 64), "loud.safetensors")
    with pytest.raises(ProjectionError, match="loud.safetensors.*activations are not finite"):
        p.calibrate(loud)
    assert p.activations is None and p.calibration is None


def test_reports_never_hold_bare_nan():
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": 2.5, "e": "nan"}
    assert finite(data) == {"a": None, "b": [1.0, None, {"c": None}], "d": 2.5, "e": "nan"}
    assert json.loads(report_json(data))["b"][1] is None and "NaN" not in report_json(data)
    assert math.isnan(json.loads(json.dumps(float("nan"))))  # what the plain encoder would have written


def test_duplicate_keys_in_a_strategy_are_refused(tmp_path):
    path = tmp_path / "strategy.yaml"
    path.write_text("layers: uniform\nwidth: magnitude\nlayers: [0, 1]\n")
    with pytest.raises(ProjectionError, match=r"strategy.yaml: key 'layers' appears twice .*line 3"):
        Strategy.load(path)


def test_an_expert_asked_of_a_single_model_teacher_is_refused(capsys, demo_dir, tmp_path):
    strategy = tmp_path / "high.yaml"
    strategy.write_text("expert: high\n")
    for extra in (["--expert", "high"], ["--strategy", strategy]):
        code, out, err = run(capsys, "map", "--teacher", demo_dir / "teacher-wan", "--student",
                             demo_dir / "student-wanlite.yaml", *extra)
        assert_error(code, out, err, "no expert sub-folders here (a single-model checkpoint)", "expert 'high'")
    weights = next((demo_dir / "teacher-wan").glob("*.safetensors"))
    code, out, err = run(capsys, "inspect", weights, "--expert", "low")
    assert_error(code, out, err, "a single checkpoint file has no experts", "expert 'low'")


def test_every_subcommand_has_a_description_and_every_option_a_help_text():
    import argparse

    from projection.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.description and parser.description.endswith("."), name
        bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert bare == [], f"{name}: options without help: {bare}"


def test_a_local_looking_missing_path_is_not_looked_up_on_the_hub(capsys, tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "inspect", "demo/does-not-exist")
    assert_error(code, out, err, "demo/does-not-exist: no such file or folder", "not looked up on the hub")


def test_typos_in_strategies_and_unknown_student_files_say_what_was_meant(capsys, demo_dir, tmp_path):
    strategy = tmp_path / "typo.yaml"
    strategy.write_text("widht: magnitude\n")
    code, out, err = run(capsys, "map", "--teacher", demo_dir / "teacher-wan", "--student",
                         demo_dir / "student-wanlite.yaml", "--strategy", strategy)
    assert_error(code, out, err, "widht", "did you mean 'width'?")
    student = tmp_path / "student.txt"
    student.write_text("dim: 64\n")
    code, out, err = run(capsys, "map", "--teacher", demo_dir / "teacher-wan", "--student", student)
    assert_error(code, out, err, "unknown student file type", ".json/.yaml/.yml", ".safetensors")
