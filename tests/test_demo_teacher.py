"""The trained demo teacher that ships: its files, its function (against diffusers), its samples, the demo folder."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from projection import Projector, ProjectionError, open_checkpoint, open_teacher
from projection.demo import digits, teacher as dt
from projection.demo.folder import demo_kind, write_demo
from projection.demo.sampling import validation_loss
from projection.engine.build import wanlite_from_teacher
from projection.function.noise import add_noise


@pytest.fixture(scope="module")
def teacher():
    return dt.load_teacher()


@pytest.fixture(scope="module")
def record():
    return json.loads((dt.ASSETS / "training.json").read_text())


def test_the_shipped_files_fit_the_budget_and_agree():
    total = sum(f.stat().st_size for f in dt.ASSETS.rglob("*") if f.is_file())
    assert total <= 16 * 2**20
    wan, diff = open_teacher(str(dt.ASSETS / "teacher-wan")), open_teacher(str(dt.ASSETS / "teacher-diffusers"))
    assert wan.family == "wan" and diff.family == "wan-diffusers"
    assert diff.checkpoint.format == "sharded-safetensors" and len(diff.checkpoint.files) == 3
    for view in (wan, diff):
        assert {k: getattr(view.config, k) for k in dt.CONFIG} == dt.CONFIG and view.config.num_heads == 4
        assert view.checkpoint.dtypes() == {"float16": 15 + 27 * 8}
    assert wan.shapes["patch_embedding.weight"] == (128, 4, 1, 2, 2)  # Conv3d, as WanModel stores it
    assert all(torch.equal(wan.read(k), diff.read(k)) for k in wan.shapes)


def test_diffusers_computes_what_our_teacher_computes(teacher):
    """The shipped diffusers folder, loaded by diffusers' own WanTransformer3DModel, predicts the same velocity as
    the WanLite forward of the original-format folder (float32)."""
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel.from_pretrained(str(dt.ASSETS / "teacher-diffusers"),
                                                      torch_dtype=torch.float32).eval()
    calibration = dt.load_calibration()
    g = torch.Generator().manual_seed(0)
    x0, ctx = calibration["latents"][:16], calibration["context"][:16]
    s = torch.linspace(0.02, 0.98, 16)
    x = add_noise(x0, torch.randn(x0.shape, generator=g), s)
    with torch.no_grad():
        ours = teacher(x, 1000 * s, ctx)
        theirs = reference(hidden_states=x[:, :, None], timestep=1000 * s, encoder_hidden_states=ctx,
                           return_dict=False)[0][:, :, 0]
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    assert wanlite_from_teacher(dt.ASSETS / "teacher-diffusers").state_dict().keys() == teacher.state_dict().keys()


def test_the_calibration_set_is_the_held_out_split_in_the_documented_format():
    path = dt.ASSETS / "calibration.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "projection-calibration/1" and "load_digits" in metadata["source"]
    shipped, expected = dt.load_calibration(), dt.calibration_set("val")
    assert set(shipped) == {"latents", "context", "context_lengths", "labels"}
    assert shipped["latents"].shape == (269, 4, 8, 8)
    assert shipped["context"].shape == (269, digits.CONTEXT_LEN, digits.TEXT_DIM)
    for key in expected:  # pins the data transform, the split and the seeded prompt table to what shipped
        assert torch.equal(shipped[key], expected[key]), key


def test_the_shipped_teacher_has_the_recorded_validation_loss(teacher, record):
    val = digits.load_digits("val")
    loss = validation_loss(teacher, digits.encode(val.images), digits.label_states(val.labels))
    assert loss == pytest.approx(record["scores"]["val_loss_shipped"], rel=1e-4)
    assert loss < 0.5 * record["history"]["val_loss"][0]  # trained: far below its initialization's loss
    assert record["history"]["steps"][-1] == dt.TRAINING.steps == record["training"]["steps"]


def test_the_teacher_draws_the_prompted_digits(teacher):
    """A short sample run: 3 seeds per digit, 20 Euler steps, no guidance."""
    classifier = dt.load_demo_classifier()
    sampler = dt.Sampler(per_class=3)
    assert dt.prompt_accuracy_of(teacher, classifier, sampler) >= 0.85
    untrained = dt.init_teacher().eval()  # guards the metric: the same architecture, untrained, is near chance
    assert dt.prompt_accuracy_of(untrained, classifier, sampler) < 0.4


def test_write_demo_writes_the_trained_teacher_its_calibration_and_students(tmp_path):
    out = write_demo(tmp_path / "demo")
    assert demo_kind(out) == "trained" and "TRAINED" in (out / "README.txt").read_text()
    assert open_checkpoint(out / "teacher-wan").dtypes() == {"float16": 15 + 27 * 8}
    assert (out / "calibration.safetensors").read_bytes() == (dt.ASSETS / "calibration.safetensors").read_bytes()
    wanlite = Projector.open(str(out / "teacher-wan"), str(out / "student-wanlite.yaml"))
    assert wanlite.mapping().coverage()["keys"] == {"transferred": 123, "total": 123, "rate": 1.0}
    assert wanlite.student.config.dim == 64 and wanlite.student.config.num_layers == 4  # half width, depth
    seed = Projector.open(str(out / "teacher-diffusers"), str(out / "student-seed.yaml"))
    assert 0 < seed.mapping().coverage()["keys"]["transferred"] < seed.mapping().coverage()["keys"]["total"]
    assert write_demo(out) == out  # already there: left as it is


def test_the_synthetic_demo_stays_an_option_and_kinds_never_overwrite_each_other(tmp_path):
    synthetic = write_demo(tmp_path / "synthetic", synthetic=True)
    assert demo_kind(synthetic) == "synthetic" and "SYNTHETIC" in (synthetic / "README.txt").read_text()
    assert open_teacher(str(synthetic / "teacher-wan")).config.dim == 256
    before = (synthetic / "teacher-wan" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(ProjectionError, match="holds the synthetic demo; pass --force"):
        write_demo(synthetic)
    assert (synthetic / "teacher-wan" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    (synthetic / "demo.json").unlink()  # a demo written before the marker existed was the synthetic one
    assert demo_kind(synthetic) == "synthetic"
    write_demo(synthetic, force=True)
    assert demo_kind(synthetic) == "trained" and open_teacher(str(synthetic / "teacher-wan")).config.dim == 128


def test_cli_demo_writes_either_kind(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "projection", "demo", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    trained = run("--out", str(tmp_path / "t"))
    assert trained.returncode == 0 and "trained" in trained.stdout and demo_kind(tmp_path / "t") == "trained"
    synthetic = run("--out", str(tmp_path / "s"), "--synthetic")
    assert synthetic.returncode == 0 and "synthetic" in synthetic.stdout
    clash = run("--out", str(tmp_path / "s"))
    assert clash.returncode == 2 and "holds the synthetic demo" in clash.stderr
