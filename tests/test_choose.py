"""`layers: recoverable`: the student's blocks chosen by short distillation probes of a few candidate subsets."""
from __future__ import annotations

import json

import pytest
import torch

from projection.cli import main
from projection.core.mapping import select_layers
from projection.core.strategy import Strategy
from projection.demo import convergence as cv
from projection.demo.teacher import demo_calibration
from projection.engine.build import projected_student
from projection.engine.projector import Projector
from projection.errors import ProjectionError
from projection.probe import ProbeConfig, choose, resolve_layers

STUDENT = {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}
QUICK = ProbeConfig(steps=4, batch=4, rates=(8e-3,), draws=1, evals=1)


@pytest.fixture(scope="module")
def calibration():
    return demo_calibration().subset(40)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))


def test_neighbours_move_one_block_and_keep_the_list_increasing():
    assert choose.neighbours([0, 2, 5], 6) == [[1, 2, 5], [0, 1, 5], [0, 3, 5], [0, 2, 4]]
    assert choose.neighbours([0, 1], 2) == []  # every move collides or leaves the teacher


def test_the_candidates_are_the_rules_subsets_without_repeats(demo_dir, calibration):
    p = Projector.open(str(demo_dir / "teacher-wan"), STUDENT)
    p.calibrate(calibration)
    found = choose.candidate_layers(p, calibration, torch.device("cpu"))
    assert found["uniform"] == select_layers("uniform", 8, 4) and found["first"] == [0, 1, 2, 3]
    assert found["last"] == [4, 5, 6, 7] and found["influence"] == p.mapping(Strategy(layers="influence")).layers
    assert "removal effect" in found or found["influence"] in found.values()
    assert all(len(v) == 4 and v == sorted(set(v)) for v in found.values())
    assert len({tuple(v) for v in found.values()}) == len(found)  # a subset two rules agree on is probed once


def test_the_chosen_blocks_are_the_candidate_that_recovers_best(demo_dir, calibration):
    p = Projector.open(str(demo_dir / "teacher-wan"), STUDENT)
    p.calibrate(calibration)
    before = p.activations
    strategy, outcomes = resolve_layers(p, calibration, Strategy(layers="recoverable", width="activation"),
                                        config=QUICK)
    assert isinstance(strategy.layers, list) and strategy.width == "activation"
    best = min(outcomes, key=lambda o: o.error)
    assert best.origin == str(strategy.layers)  # each outcome names the block list it probed
    assert any(o.name.startswith("near ") for o in outcomes)  # the local search ran around the best rule
    assert len({o.origin for o in outcomes}) == len(outcomes)
    assert p.activations is before  # the caller's calibration is put back
    again, _ = resolve_layers(p, calibration, Strategy(layers="recoverable", width="activation"), config=QUICK)
    assert again == strategy  # deterministic: the same stream, starts and targets
    assert resolve_layers(p, calibration, Strategy(layers="first")) == (Strategy(layers="first"), [])


def test_recoverable_needs_a_calibration_set_and_is_never_projected_unresolved(demo_dir):
    p = Projector.open(str(demo_dir / "teacher-wan"), STUDENT, strategy=Strategy(layers="recoverable"))
    with pytest.raises(ProjectionError, match="probes candidate block subsets on a calibration set"):
        resolve_layers(p, None)
    with pytest.raises(ProjectionError, match="layers: recoverable is chosen by short distillation probes"):
        p.plan()
    assert Strategy(layers="recoverable").needs_activations


def test_export_with_recoverable_layers_writes_the_chosen_list(demo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(choose, "CHOOSE", QUICK)
    spec = tmp_path / "recoverable.yaml"
    spec.write_text("layers: recoverable\n")
    out = tmp_path / "student"
    code = main([str(a) for a in ("export", "--teacher", demo_dir / "teacher-wan", "--student",
                                  demo_dir / "student-wanlite.yaml", "--strategy", spec, "--calibration", "demo",
                                  "--samples", "40", "--draws", "1", "--out", out)])
    _, err = capsys.readouterr()
    assert code == 0
    chosen = json.loads((out / "projection_report.json").read_text())["layers"]
    assert Strategy.load(out / "strategy.yaml").layers == chosen  # the export names the blocks it kept
    assert f"layers: recoverable chose blocks {chosen}" in err
    assert "uniform" in err and "near " in err  # every candidate's error is shown


def test_export_with_recoverable_layers_and_no_set_is_one_line(demo_dir, tmp_path, capsys):
    spec = tmp_path / "recoverable.yaml"
    spec.write_text("layers: recoverable\n")
    code = main([str(a) for a in ("export", "--teacher", demo_dir / "teacher-wan", "--student",
                                  demo_dir / "student-wanlite.yaml", "--strategy", spec, "--out", tmp_path / "s")])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "recoverable" in err
    assert not (tmp_path / "s").exists()


def test_probe_command_resolves_a_recoverable_candidate(demo_dir, tmp_path, capsys, monkeypatch):
    spec = tmp_path / "recoverable.yaml"
    spec.write_text("layers: recoverable\n")
    code = main([str(a) for a in ("probe", "--teacher", demo_dir / "teacher-wan", "--student",
                                  demo_dir / "student-wanlite.yaml", "--strategies", spec, "--steps", "4",
                                  "--batch", "4", "--lr", "0.008", "--samples", "30", "--draws", "1", "--json")])
    out, err = capsys.readouterr()
    assert code == 0
    found = {o["name"]: o for o in json.loads(out)["outcomes"]}
    assert set(found) == {"random init", "default", "recoverable"}
    assert "layers: recoverable chose blocks" in err


def test_the_benchmarks_initial_student_resolves_recoverable_layers(demo_dir, calibration, monkeypatch):
    monkeypatch.setattr(choose, "CHOOSE", QUICK)
    run = cv.Run(STUDENT, cv.Arm("layers: recoverable", {"layers": "recoverable"}, 8e-3), 0)
    projector = cv.open_projector(str(demo_dir / "teacher-wan"), run)
    chosen, _ = resolve_layers(projector, calibration, config=QUICK)
    model = cv.initial_student(str(demo_dir / "teacher-wan"), run, calibration, projector)
    expected = Projector.open(str(demo_dir / "teacher-wan"), STUDENT, strategy=chosen)
    reference = projected_student(expected).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    with pytest.raises(ProjectionError, match="calibration set"):
        cv.initial_student(str(demo_dir / "teacher-wan"), run, None, cv.open_projector(str(demo_dir / "teacher-wan"),
                                                                                       run))
