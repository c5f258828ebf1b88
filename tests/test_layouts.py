"""Student layouts (issue 20): an export in the `diffusers` layout loads in diffusers' `WanTransformer3DModel`
(float32 and bfloat16, no missing, unexpected or mismatched key, nothing on the meta device), computes the project's
own student on one frame, runs on several and in a `WanPipeline` step; the `wan` layout writes only `WanModel`'s
config keys; every layout loads back (`load_student`), is measured (`export --calibration`, `fidelity`), and an
export is a teacher again (inspect it, project it further). diffusers is the third-party reference."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from projection import Projector, load_student, projected_student
from projection.arch.layout import LAYOUTS
from projection.engine.export import export_student
from conftest import TINY
from test_cli import assert_error, run

diffusers = pytest.importorskip("diffusers")
STUDENT = {"dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}  # no layout: the default, diffusers
# WanModel.__init__'s parameters (wan-reference section 10); diffusers' from_config passes each key to it
WAN_MODEL_KEYS = {"model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
                  "out_dim", "num_heads", "num_layers", "window_size", "qk_norm", "cross_attn_norm", "eps"}


def export(teacher: Path | str, out: Path, student: dict | str = STUDENT, **kwargs) -> dict:
    return export_student(Projector.open(str(teacher), student), out, **kwargs)


def inputs(frames: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two latents (one frame, or `frames` frames), timesteps and text context of the tiny teacher's widths."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, TINY["in_dim"], 8, 8) if frames is None else (2, TINY["in_dim"], frames, 8, 8)
    return (torch.randn(shape, generator=g), torch.tensor([250.0, 800.0]),
            torch.randn(2, 5, TINY["text_dim"], generator=g))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def exported(tiny_wan, tmp_path_factory) -> Path:
    """The default export of a student config that names no layout."""
    out = tmp_path_factory.mktemp("layouts") / "student"
    export(tiny_wan.original_dir, out)
    return out


def test_the_default_layout_is_a_diffusers_folder_that_from_pretrained_loads(exported):
    from diffusers import WanTransformer3DModel

    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json",
                                                          "diffusion_pytorch_model.safetensors",
                                                          "projection_report.json", "strategy.yaml"]
    config = json.loads((exported / "config.json").read_text())
    accepted = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    assert config["_class_name"] == "WanTransformer3DModel" and "_diffusers_version" in config
    assert {k for k in config if not k.startswith("_")} <= accepted  # nothing __init__ would refuse
    assert config["num_attention_heads"] == 1 and config["attention_head_dim"] == 32 and config["num_layers"] == 2
    with safe_open(str(exported / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("patch_embedding.weight").get_shape() == [32, TINY["in_dim"], 1, 2, 2]
        assert "blocks.0.attn1.to_q.weight" in f.keys() and "blocks.0.self_attn.q.weight" not in f.keys()
        assert f.metadata()["layout"] == "diffusers" and len(f.metadata()["teacher_fingerprint"]) == 32
    for dtype in (torch.float32, torch.bfloat16):
        model, info = WanTransformer3DModel.from_pretrained(exported, torch_dtype=dtype, output_loading_info=True)
        assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        assert not any(p.is_meta for p in model.parameters())
        assert model.blocks[0].attn1.to_q.weight.dtype == dtype


def test_diffusers_computes_the_projected_student_on_one_frame_and_runs_on_several(exported):
    from diffusers import WanTransformer3DModel

    theirs = WanTransformer3DModel.from_pretrained(exported).eval()
    ours = load_student(exported).eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        assert relative(theirs(x[:, :, None], t, ctx, return_dict=False)[0][:, :, 0], ours(x, t, ctx)) < 1e-5
        video, t, ctx = inputs(frames=3)
        out = theirs(video, t, ctx, return_dict=False)[0]
    assert out.shape == video.shape and torch.isfinite(out).all()


def test_a_wan_pipeline_runs_a_denoising_step_with_the_student(exported, tmp_path):
    pytest.importorskip("transformers")
    from diffusers import WanPipeline, WanTransformer3DModel

    from test_calibrate import build_pipeline  # a tiny random VAE (z 4) and UMT5 (width 24): the teacher's widths

    root = build_pipeline(tmp_path / "pipeline")
    student = WanTransformer3DModel.from_pretrained(exported)
    pipe = WanPipeline.from_pretrained(root, transformer=student)
    latents = pipe("a cat on the mat", height=32, width=32, num_frames=1, num_inference_steps=1, guidance_scale=1.0,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert latents.shape == (1, 4, 1, 4, 4) and torch.isfinite(latents).all()


def test_sharded_exports_are_named_as_diffusers_names_them(tiny_wan, tmp_path):
    from diffusers import WanTransformer3DModel

    out = tmp_path / "sharded"
    report = export(tiny_wan.diffusers_dir, out, max_shard_bytes=20_000)
    shards = report["provenance"]["weights"]
    assert len(shards) > 2 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and "blocks.1.ffn.net.2.weight" in index["weight_map"]
    model, info = WanTransformer3DModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and not any(p.is_meta for p in model.parameters())
    export(tiny_wan.diffusers_dir, out, max_shard_bytes=20_000, force=True)  # a sharded export is replaceable


def test_the_wan_layout_writes_wan_model_keys_and_original_names(tiny_wan, exported, tmp_path):
    out = tmp_path / "wan"
    export(tiny_wan.original_dir, out, {**STUDENT, "layout": "wan"})
    config = json.loads((out / "config.json").read_text())
    assert {k for k in config if not k.startswith("_")} == WAN_MODEL_KEYS and config["_class_name"] == "WanModel"
    assert config["num_heads"] == 1 and config["dim"] == 32 and config["patch_size"] == [1, 2, 2]
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("patch_embedding.weight").get_shape() == [32, TINY["in_dim"], 1, 2, 2]
        assert "blocks.0.self_attn.q.weight" in f.keys() and f.metadata()["layout"] == "wan"
    x, t, ctx = inputs()
    with torch.no_grad():  # the same projection as the diffusers export, under other names
        assert torch.equal(load_student(out)(x, t, ctx), load_student(exported)(x, t, ctx))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_is_measured_and_loads_back(layout, tiny_wan, tmp_path, capsys):
    out = tmp_path / layout
    code, text, err = run(capsys, "export", "--teacher", tiny_wan.diffusers_dir, "--student",
                          json_file(tmp_path, STUDENT), "--layout", layout, "--calibration", "synthetic",
                          "--samples", "8", "--draws", "1", "--out", out)
    assert code == 0, err
    assert "velocity error" in text
    report = json.loads((out / "projection_report.json").read_text())
    assert report["provenance"]["layout"] == report["student"]["config"]["layout"] == layout
    assert report["function"]["students"]["student"]["relative_error"] > 0
    config = json.loads((out / "config.json").read_text())
    assert not {"layout", "dtype", "head_dim"} & set(config)  # the project's records live elsewhere
    model = load_student(out).eval()
    projector = Projector.open(str(tiny_wan.diffusers_dir), {**STUDENT, "layout": layout})
    reference = projected_student(projector).eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), reference(x, t, ctx))
    code, text, err = run(capsys, "fidelity", "--teacher", tiny_wan.diffusers_dir, "--student", out,
                          "--calibration", "synthetic", "--samples", "8", "--draws", "1", "--json")
    assert code == 0, err
    assert json.loads(text)["students"]["student"]["relative_error"] == pytest.approx(
        report["function"]["students"]["student"]["relative_error"], rel=1e-6)


def json_file(folder: Path, data: dict) -> Path:
    path = folder / "student.json"
    path.write_text(json.dumps(data))
    return path


def test_load_student_reads_the_users_diffusers_and_wan_folders(tiny_wan):
    x, t, ctx = inputs()
    with torch.no_grad():
        expected = tiny_wan.model(x[:, :, None], t, ctx, return_dict=False)[0][:, :, 0]
        for folder in (tiny_wan.diffusers_dir, tiny_wan.original_dir):
            assert relative(load_student(folder).eval()(x, t, ctx), expected) < 1e-5


def test_an_export_is_a_teacher_again(exported, tmp_path, capsys):
    code, text, err = run(capsys, "inspect", exported, "--json")
    assert code == 0, err
    info = json.loads(text)
    assert info["family"] == "wan-diffusers" and info["layout"] == "diffusers"
    assert info["config"]["dim"] == 32 and info["config"]["num_heads"] == 1 and not info["heads_inferred"]
    smaller = {"dim": 16, "num_heads": 1, "ffn_dim": 12, "num_layers": 1}
    report = export(exported, tmp_path / "again", smaller)
    assert report["coverage"]["keys"]["transferred"] == report["coverage"]["keys"]["total"]
    assert load_student(tmp_path / "again").blocks[0].ffn[0].weight.shape == (12, 16)


def test_the_model_card_says_what_the_student_is_and_how_to_load_it(exported, tiny_wan, tmp_path, capsys):
    card = (exported / "README.md").read_text()
    report = json.loads((exported / "projection_report.json").read_text())
    assert f"{report['student']['params']:,} parameters" in card and "diffusers layout" in card
    assert report["provenance"]["teacher_fingerprint"] in card and "the teacher's license applies" in card
    assert "Not measured" in card and f"projection fidelity --teacher {tiny_wan.original_dir}" in card
    assert "WanTransformer3DModel.from_pretrained" in card and "projection.load_student" in card
    assert "Frameworks that load a Wan model of this shape as it is: diffusers, Wan " in card
    assert "ComfyUI" not in card.split("as it is:")[1].split("(")[0]  # head dim 32: ComfyUI infers 128
    out = tmp_path / "measured"
    code, _, err = run(capsys, "export", "--teacher", tiny_wan.original_dir, "--student", json_file(tmp_path, STUDENT),
                       "--calibration", "synthetic", "--samples", "8", "--draws", "1", "--out", out)
    assert code == 0, err
    card = (out / "README.md").read_text()
    measured = json.loads((out / "projection_report.json").read_text())["function"]["students"]
    assert "Not measured" not in card and "Synthetic calibration" in card
    assert f"| random init | {measured['random init']['relative_error']:.4f} |" in card


def test_the_cli_offers_every_layout():
    from projection.cli import LAYOUT_NAMES

    assert LAYOUT_NAMES == tuple(LAYOUTS)  # written out there: the CLI starts without importing torch


def test_layouts_are_asked_for_by_name(tiny_wan, exported, tmp_path, capsys):
    code, out, err = run(capsys, "export", "--teacher", tiny_wan.original_dir, "--student",
                         json_file(tmp_path, {**STUDENT, "layout": "difusers"}), "--out", tmp_path / "x")
    assert_error(code, out, err, "student.json", "'difusers'", "diffusers, wan, wanlite, seed")
    code, out, err = run(capsys, "export", "--teacher", tiny_wan.original_dir, "--student",
                         exported / "diffusion_pytorch_model.safetensors", "--layout", "wan", "--out", tmp_path / "y")
    assert_error(code, out, err, "decide its layout (diffusers)")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
