"""The probe: candidate starts distilled a few steps on one stream, teacher targets computed once and cached, ranked
by the held-out error they reach (`projection probe`)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from projection.cli import main
from projection.core.strategy import Strategy
from projection.demo.teacher import demo_calibration
from projection.engine.build import projected_student
from projection.engine.projector import Projector
from projection.errors import ProjectionError
from projection.function import forward as fw
from projection.function.fidelity import teacher_reference
from projection.function.forward import StreamedTeacher, predict
from projection.probe import ProbeConfig, candidates, probe, recovery
from projection.probe import targets as tg
from projection.probe.ladder import Equivalent

STUDENT = {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}
SMALL = ProbeConfig(steps=6, batch=4, rates=(8e-3,), holdout=0.2, draws=1, evals=2)


@pytest.fixture(scope="module")
def calibration():
    return demo_calibration().subset(40)


def projector(demo_dir) -> Projector:
    return Projector.open(str(demo_dir / "teacher-wan"), STUDENT)


def request(steps: int = 6, batch: int = 4) -> tg.Request:
    return tg.Request(steps, batch, 0.2, 1, 0, (0.0, 1.0))


def test_every_budget_sees_the_first_steps_of_a_longer_one(calibration):
    """The same data order, noise and levels for every candidate and rate, and a budget of N steps is the first N
    steps of a longer budget's stream: runs differ only in their start and schedule."""
    train, _ = tg.split(calibration, 0.2)
    short, long = tg.Stream.of(train, request(6)), tg.Stream.of(train, request(50))
    for a, b in zip(short.inputs(range(0, 6)), long.inputs(range(0, 6))):
        assert torch.equal(a, b)
    one = tg.Stream.of(train, request(6)).inputs(range(3, 4))
    assert all(torch.equal(a, b[12:16]) for a, b in zip(one, short.inputs(range(0, 6))))
    other = tg.Stream.of(train, tg.Request(6, 4, 0.2, 1, 1, (0.0, 1.0))).inputs(range(0, 1))[0]
    assert not torch.equal(other, short.inputs(range(0, 1))[0])


def test_the_split_holds_out_the_last_latents_and_refuses_sets_too_small(calibration):
    train, held = tg.split(calibration, 0.2)
    assert (len(train), len(held)) == (32, 8)
    assert torch.equal(held.latents, calibration.latents[32:])
    with pytest.raises(ProjectionError, match="at least 2 latents"):
        tg.split(calibration.subset(1), 0.2)


def test_the_targets_are_the_teachers_velocity_and_a_second_probe_reads_no_teacher_weights(demo_dir, calibration,
                                                                                          tmp_path, monkeypatch):
    p = projector(demo_dir)
    blocks: list[int] = []
    build = fw.build_block
    monkeypatch.setattr(fw, "build_block", lambda view, index, *a: blocks.append(index) or build(view, index, *a))
    found = tg.teacher_targets(p.teacher, p.fingerprint, calibration, request(), torch.device("cpu"), tmp_path)
    depth = p.teacher.config.num_layers
    assert found.passes == 2 and blocks == list(range(depth)) * 2  # training batches, held-out part: one pass each
    teacher = StreamedTeacher(p.teacher)
    x, t, ctx, v = found.batch(4, torch.device("cpu"))
    assert torch.allclose(v, predict(teacher, x, t, ctx), atol=1e-5)
    _, held = tg.split(calibration, 0.2)
    assert torch.allclose(found.reference.velocity, teacher_reference(teacher, held.latents, held.context, 1).velocity,
                          atol=1e-5)
    blocks.clear()
    again = tg.teacher_targets(p.teacher, p.fingerprint, calibration, request(), torch.device("cpu"), tmp_path)
    assert again.passes == 0 and blocks == []
    assert torch.equal(again.velocity, found.velocity) and torch.equal(again.reference.x, found.reference.x)
    other = tg.teacher_targets(p.teacher, p.fingerprint, calibration, request(steps=7), torch.device("cpu"), tmp_path)
    assert other.passes == 2  # another request: its own entry


def test_a_damaged_cache_entry_is_measured_again(demo_dir, calibration, tmp_path):
    p = projector(demo_dir)
    tg.teacher_targets(p.teacher, p.fingerprint, calibration, request(), torch.device("cpu"), tmp_path)
    entry = next((tmp_path / "probe").glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:-64])
    assert tg.teacher_targets(p.teacher, p.fingerprint, calibration, request(), torch.device("cpu"),
                              tmp_path).passes == 2


def test_targets_past_their_bound_are_refused_before_the_teacher_runs(demo_dir, calibration, tmp_path, monkeypatch):
    p = projector(demo_dir)
    monkeypatch.setattr(tg, "MAX_TARGET_BYTES", 1000)
    monkeypatch.setattr(tg, "compute", lambda *a, **k: pytest.fail("the teacher ran"))
    with pytest.raises(ProjectionError, match="6 steps x batch 4 .* use fewer --steps or a smaller --batch"):
        tg.teacher_targets(p.teacher, p.fingerprint, calibration, request(), torch.device("cpu"), tmp_path)


def test_a_probe_trains_every_start_on_the_same_stream_and_ranks_by_the_error_reached(demo_dir, calibration,
                                                                                      tmp_path):
    found = candidates({"activation": Strategy(width="activation")})
    config = ProbeConfig(steps=6, batch=4, rates=(2e-3, 8e-3), holdout=0.2, draws=1, evals=2)
    result = probe(projector(demo_dir), calibration, found, config, "cpu", cache=tmp_path)
    names = [o.name for o in result.outcomes]
    assert names == [recovery.RANDOM, recovery.DEFAULT, "activation"]
    assert (result.train_latents, result.heldout_latents, result.teacher_passes) == (32, 8, 2)
    for o in result.outcomes:
        assert o.curve.steps == [0, 3, 6] and o.error_0 == o.curve.error[0] and o.error == o.curve.error[-1]
        assert set(o.by_rate) == {2e-3, 8e-3} and o.error == min(o.by_rate.values()) and o.by_rate[o.rate] == o.error
        assert o.edge  # a two-point grid: the best is always at an edge
    assert sorted(o.rank for o in result.outcomes) == [1, 2, 3]
    by_rank = sorted(result.outcomes, key=lambda o: o.rank)
    assert [o.error for o in by_rank] == sorted(o.error for o in result.outcomes)
    assert [o.rank_0 for o in sorted(result.outcomes, key=lambda o: o.error_0)] == [1, 2, 3]
    # the default start's step-0 error is its own projection's, measured on the held-out part
    p = projector(demo_dir)
    _, held = tg.split(calibration, 0.2)
    reference = teacher_reference(StreamedTeacher(p.teacher), held.latents, held.context, 1)
    assert result.outcomes[1].error_0 == pytest.approx(reference.score(projected_student(p)).relative_error, rel=1e-6)
    calibrated = projector(demo_dir)
    calibrated.calibrate(calibration.subset(8))
    before = calibrated.calibration, calibrated.activations
    again = probe(calibrated, calibration, found, config, "cpu", cache=tmp_path)
    assert again.teacher_passes == 0  # the targets came from the cache
    assert calibrated.calibration is before[0] and calibrated.activations is before[1]  # ranked on the training part
    assert [o.curve.error for o in again.outcomes] == [o.curve.error for o in result.outcomes]  # deterministic


def test_each_rate_starts_from_the_same_weights_and_trains_on_its_own_schedule(demo_dir, calibration, tmp_path):
    """A probe's run at one rate equals the run of that rate alone: no state leaks between the grid's runs."""
    p = projector(demo_dir)
    both = probe(p, calibration, candidates(), ProbeConfig(steps=6, batch=4, rates=(2e-3, 8e-3), draws=1, evals=2),
                 "cpu", cache=tmp_path)
    alone = probe(p, calibration, candidates(), ProbeConfig(steps=6, batch=4, rates=(8e-3,), draws=1, evals=2),
                  "cpu", cache=tmp_path)
    for a, b in zip(both.outcomes, alone.outcomes):
        assert a.by_rate[8e-3] == b.by_rate[8e-3]


def test_the_random_ladder_says_what_each_start_is_worth_in_random_steps(demo_dir, calibration, tmp_path):
    config = ProbeConfig(steps=4, batch=4, rates=(8e-3,), draws=1, evals=1, ladder=(8, 16))
    result = probe(projector(demo_dir), calibration, candidates(), config, "cpu", cache=tmp_path)
    assert [r["steps"] for r in result.ladder] == [4, 8, 16]
    errors = [r["error"] for r in result.ladder]
    random, default = result.outcomes
    assert errors[0] == random.error and random.random_budget == Equivalent(4.0)
    assert isinstance(default.random_budget, Equivalent)
    if default.error < errors[-1]:
        assert default.random_budget.bound == ">"
    assert json.loads(json.dumps(result.to_dict()))["outcomes"][1]["random_budget"] == format(default.random_budget,
                                                                                              ".0f")


def test_a_diverging_rate_is_scored_infinitely_bad_and_never_chosen(demo_dir, calibration, tmp_path):
    result = probe(projector(demo_dir), calibration, candidates(),
                   ProbeConfig(steps=6, batch=4, rates=(8e-3, 0.5), draws=1, evals=2, grad_clip=1e9),
                   "cpu", cache=tmp_path)
    for o in result.outcomes:
        assert o.rate == 8e-3 and math.isfinite(o.error)


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps 0: expected 1..10000"), ({"rates": (0.0,)}, "rates [0.0]"),
    ({"holdout": 1.0}, "holdout 1: expected a share in (0, 1)"), ({"ladder": (0,)}, "random ladder [0]"),
    ({"evals": 0}, "evals 0: expected 1..10000")])
def test_bad_probe_settings_are_refused_in_one_line(fields, message):
    with pytest.raises(ProjectionError) as found:
        ProbeConfig(**fields).check()
    assert str(found.value).startswith(f"probe: {message}")


def test_two_candidates_of_one_name_are_refused():
    with pytest.raises(ProjectionError, match="two candidates are named 'default'"):
        candidates({"default": Strategy(width="activation")})


def test_default_rates_shrink_with_the_students_width():
    assert recovery.default_rates(64) == (2e-3, 8e-3, 3.2e-2)
    assert max(recovery.default_rates(1536)) < min(recovery.default_rates(64)) * 4


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_probe_command_ranks_the_starts_and_names_the_set(demo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    strategy = tmp_path / "act.yaml"
    strategy.write_text("width: activation\n")
    args = ["probe", "--teacher", demo_dir / "teacher-wan", "--student", demo_dir / "student-wanlite.yaml",
            "--strategies", strategy, "--steps", "4", "--batch", "4", "--lr", "0.008", "--samples", "30",
            "--draws", "1"]
    code, out, _ = cli(capsys, *args)
    assert code == 0
    assert "probe on scikit-learn load_digits" in out and "24 latents to train on, 6 held out" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "start"])
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert sorted(r[0] for r in rows) == ["1", "2", "3"] and {r[1] for r in rows} >= {"act", "default", "random"}
    code, out, _ = cli(capsys, *args, "--json")
    found = json.loads(out)
    assert code == 0 and found["teacher_passes"] == 0  # the text run cached the targets
    assert [o["name"] for o in found["outcomes"]] == ["random init", "default", "act"]
    assert found["calibration"].startswith("scikit-learn load_digits") and found["synthetic"] is False


def test_probe_command_warns_of_synthetic_calibration(demo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    code, out, _ = cli(capsys, "probe", "--teacher", demo_dir / "teacher-wan", "--student",
                       demo_dir / "student-wanlite.yaml", "--calibration", "synthetic", "--samples", "10",
                       "--steps", "2", "--batch", "2", "--lr", "0.008", "--draws", "1")
    assert code == 0 and "probe on SYNTHETIC calibration" in out
    assert out.strip().splitlines()[-1].startswith("WARNING: synthetic calibration")


@pytest.mark.parametrize("extra, message", [(["--holdout", "1.5"], "holdout 1.5"),
                                            (["--strategies", "missing.yaml"], "missing.yaml")])
def test_probe_command_errors_are_one_line(demo_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "probe", "--teacher", demo_dir / "teacher-wan", "--student",
                         demo_dir / "student-wanlite.yaml", *extra)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_the_commands_step_bound_is_the_probes(demo_dir, capsys):
    """The CLI writes the probe's step bound out (it starts without torch): the two agree, and a budget past it is
    refused while the arguments are read, naming the bound."""
    from projection import cli as cli_module

    assert cli_module.PROBE_STEPS == recovery.MAX_STEPS
    for option in ("--steps", "--random-ladder"):
        with pytest.raises(SystemExit):
            main(["probe", "--teacher", str(demo_dir / "teacher-wan"), "--student",
                  str(demo_dir / "student-wanlite.yaml"), option, str(recovery.MAX_STEPS + 1)])
        err = capsys.readouterr().err.strip().splitlines()
        assert f"{recovery.MAX_STEPS + 1}' is not a whole number from 1 to {recovery.MAX_STEPS}" in err[-1]
