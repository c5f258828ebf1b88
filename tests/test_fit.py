"""Least-squares fitting of the student's block matrices on a calibration set."""
from __future__ import annotations

import json

import pytest
import torch

from projection import Projector, ProjectionError, Strategy, projected_student
from projection.cli import main
from projection.demo import digits, teacher as dt
from projection.demo.teacher import demo_calibration
from projection.function.calibration import Calibration
from projection.function.fidelity import velocity_fidelity
from projection.function.fit import Moments, ridge

TEACHER = str(dt.ASSETS / "teacher-wan")
HALF = {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}


def test_ridge_solves_least_squares_with_a_relative_unregularized_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 2, 3, 4, 5, 6])
    w_true, b_true = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    m = Moments()
    for part in x.split(128):  # accumulated in pieces, as the fit does over micro-batches
        m.add(part, part @ w_true.T + b_true)
    w, b = ridge(m, lam=1e-12)
    assert torch.allclose(w, w_true.double(), atol=1e-8) and torch.allclose(b, b_true.double(), atol=1e-8)
    w_big, b_big = ridge(m, lam=1e6)  # heavy ridge: weights shrink to 0, the bias becomes the mean target
    assert w_big.abs().max() < 1e-3
    assert torch.allclose(b_big, (x @ w_true.T + b_true).mean(0).double(), atol=1e-2)
    # lambda is relative to the inputs' scale: scaling x scales nothing else
    m10 = Moments()
    m10.add(10 * x, x @ w_true.T + b_true)
    assert torch.allclose(ridge(m10, 0.1)[0] * 10, ridge(m, 0.1)[0], atol=1e-8)


@pytest.fixture(scope="module")
def calibration():
    train = digits.load_digits("train")
    return Calibration(digits.encode(train.images[:96]), digits.label_states(train.labels[:96]), "train subset")


def test_least_squares_brings_the_student_closer_to_the_teacher(calibration):
    teacher, held_out = dt.load_teacher(), demo_calibration().subset(96)
    errors = {}
    for fit in ("none", "least-squares"):
        p = Projector.open(TEACHER, HALF, strategy=Strategy(fit=fit))
        p.calibrate(calibration)
        errors[fit] = velocity_fidelity(projected_student(p), teacher, held_out.latents, held_out.context).relative_error
    assert errors["least-squares"] < errors["none"] - 0.03, errors  # measured on held-out latents, not the fit's


def test_fit_needs_a_calibration_set_and_export_writes_the_fitted_weights(calibration, tmp_path, capsys,
                                                                          monkeypatch):
    with pytest.raises(ProjectionError, match="refits on a calibration set"):
        projected_student(Projector.open(TEACHER, HALF, strategy=Strategy(fit="least-squares")))
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fit.yaml").write_text("fit: least-squares\n")
    (tmp_path / "half.yaml").write_text(json.dumps(HALF))
    code = main(["export", "--teacher", TEACHER, "--student", str(tmp_path / "half.yaml"), "--strategy",
                 str(tmp_path / "fit.yaml"), "--calibration", "demo", "--samples", "48", "--draws", "1",
                 "--out", str(tmp_path / "s")])
    assert code == 0
    from projection import load_student

    exported = load_student(tmp_path / "s").state_dict()
    p = Projector.open(TEACHER, HALF, strategy=Strategy(fit="least-squares"))
    p.calibrate(demo_calibration().subset(48))
    fitted = projected_student(p).state_dict()
    plain = projected_student(Projector.open(TEACHER, HALF)).state_dict()
    key = "blocks.1.ffn.2.weight"
    assert torch.equal(exported[key], fitted[key]) and not torch.equal(exported[key], plain[key])
    assert torch.equal(exported["patch_embedding.weight"], plain["patch_embedding.weight"])  # not a block matrix
