"""Probe recoverability in the app: the Function view's probe through the session (the core's `probe` with the
session's projector, the teacher's targets cached on disk), its ranking table and chart, strategy files confined to
the roots, and the Gallery's rows drawn from each start and the student its probe trained."""
from __future__ import annotations

import json

import pytest
import torch

from inspector import function as fn
from inspector.gallery import probe_titles, table
from inspector.paths import Roots
from inspector.scratch import Scratch
from inspector.sessions import Sessions
from projection import ProjectionError, Strategy
from projection.arch.layout import build_student
from projection.engine.projector import Caches
from projection.probe import ProbeConfig, candidates, probe, recovery
from projection.probe import targets as tg

pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),  # inside gradio
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
CONFIG = ProbeConfig(steps=4, batch=4, rates=(2e-3, 8e-3), draws=1, evals=2)
LATENTS = 16


@pytest.fixture(scope="module")
def probed(demo_dir, tmp_path_factory):
    """One session on the demo, probed twice with strategy A (width first), the default and random init."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROJECTION_CACHE", str(cache))
        pool = Sessions(Scratch(tmp_path_factory.mktemp("scratch")), Caches())
        s = pool.open("owner", str(demo_dir / "teacher-wan"), str(demo_dir / "student-wanlite.yaml"), None,
                      Strategy())
        roots = Roots.create(demo_dir)
        calibration = fn.open_source(fn.DEMO, "", LATENTS, roots, s.projector.teacher.config)
        named, origins = fn.probe_candidates([fn.PROBE_A], Strategy(width="first").to_yaml(), "", s.strategy, [],
                                             s.strategy.expert)
        before = s.projector.calibration, s.projector.activations
        first = s.probe(calibration, named, origins, CONFIG)
        assert (s.projector.calibration, s.projector.activations) == before  # the session's set stays its own
        second = s.probe(calibration, named, origins, CONFIG)
        plain = probe(s.projector, calibration, candidates(named, origins), CONFIG, "cpu")  # the core, keeping nothing
        assert [(o.name, o.rate, o.curve.error) for o in plain.outcomes] == [
            (o.name, o.rate, o.curve.error) for o in second.outcomes]
        yield s, calibration, first, second, cache
        pool.close_all()


def test_the_probe_runs_through_the_session_and_ranks_every_start(probed):
    s, calibration, first, second, _ = probed
    assert [o.name for o in first.outcomes] == [recovery.RANDOM, recovery.DEFAULT, fn.PROBE_A]
    assert first.teacher_passes > 0 and second.teacher_passes == 0  # the targets came from the disk cache
    assert (first.train_latents, first.heldout_latents) == (13, 3)
    assert [o.error for o in second.outcomes] == [o.error for o in first.outcomes]  # the same stream, same result
    frame = fn.probe_frame(first)
    assert list(frame.columns) == ["rank", "candidate", "error at step 0", "error after 4 steps", "best rate",
                                   "rank by step-0 error"]
    assert list(frame["rank"]) == sorted(o.rank for o in first.outcomes)
    best = min(first.outcomes, key=lambda o: o.error)
    assert frame.iloc[0]["candidate"] == best.name and frame.iloc[0]["error after 4 steps"] == f"{best.error:.4f}"
    assert set(frame["candidate"]) == {recovery.RANDOM, recovery.DEFAULT, fn.PROBE_A}
    for o in first.outcomes:
        row = frame[frame["candidate"] == o.name].iloc[0]
        assert row["error at step 0"] == f"{o.error_0:.4f}" and row["rank by step-0 error"] == o.rank_0
        assert row["best rate"].startswith(f"{o.rate:g}") and ("grid's edge" in row["best rate"]) == o.edge
    summary = fn.probe_summary(first)
    assert f"Probed on {calibration.label}: 13 latents trained on, 3 held out" in summary
    assert "4 steps" in summary and "SYNTHETIC" not in summary
    chart = fn.probe_chart(first)
    json.dumps(chart, allow_nan=False)  # what Gradio is handed
    lines = {d["name"]: d for d in chart["data"]}
    assert set(lines) == {o.name for o in first.outcomes}
    assert lines[recovery.RANDOM]["line"]["dash"] == "dash"
    for o in first.outcomes:
        assert lines[o.name]["x"] == o.curve.steps == [0, 2, 4] and lines[o.name]["y"] == o.curve.error
    assert "3 held-out latents" in chart["layout"]["title"]["text"]
    assert "press Probe" in fn.placeholder(fn.PROBE_COLUMNS, "press Probe: one row per candidate").iloc[0, 0]


def test_a_synthetic_set_is_named_as_such(demo_dir, probed):
    s, *_ = probed
    result = probed[2]
    synthetic = type(result)(**{**result.__dict__, "synthetic": True, "calibration": "SYNTHETIC set"})
    assert "SYNTHETIC calibration" in fn.probe_summary(synthetic)
    assert "SYNTHETIC" in fn.probe_chart(synthetic)["layout"]["title"]["text"]


def test_the_gallery_draws_each_start_and_the_student_its_probe_trained(probed):
    s, calibration, first, second, cache = probed
    name = recovery.DEFAULT
    start, trained = s.probe_row(name, False), s.probe_row(name, True)
    assert start.velocity_error != trained.velocity_error and start.prompt_accuracy is not None
    start_state, trained_state = s.probed.weights[name]
    assert any(not torch.equal(start_state[k], trained_state[k]) for k in start_state)

    def model(state):
        m = build_student(s.probed.student, "meta")
        m.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True, strict=True)
        return m.eval()

    # the rows score those very weights on the set every gallery row is scored on
    reference = s.reference()
    assert trained.velocity_error == pytest.approx(reference.score(model(trained_state)).relative_error, rel=1e-6)
    assert start.velocity_error == pytest.approx(s.student_function(Strategy())[0].relative_error, rel=1e-6)
    # and the trained weights are the probe's best-rate student: its held-out error is the probe's final one
    p = s.projector
    request = tg.Request(CONFIG.steps, CONFIG.batch, CONFIG.holdout, CONFIG.draws, CONFIG.seed, second.band)
    targets = tg.teacher_targets(p.teacher, p.fingerprint, calibration, request, torch.device("cpu"), cache)
    outcome = next(o for o in second.outcomes if o.name == name)
    assert targets.passes == 0
    assert targets.reference.score(model(trained_state)).relative_error == pytest.approx(outcome.error, rel=1e-5)
    assert s.probe_row(name, True) is trained  # cached
    titles = probe_titles(name, 4)
    frame = table([("Teacher", start)], [(titles[0], start, False), (titles[1], trained, True)]).set_index("model")
    after, before = frame.loc[f"{name} after 4-step probe"], frame.loc[f"{name}, untrained (the probe's start)"]
    assert after["velocity error vs teacher after the probe"] == f"{trained.velocity_error:.3f}"
    assert after["velocity error vs teacher (step 0)"] == "—" == before["velocity error vs teacher after the probe"]
    assert before["velocity error vs teacher (step 0)"] == f"{start.velocity_error:.3f}"


def test_strategy_files_outside_the_root_are_refused_in_one_line(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "s.yaml").write_text(Strategy(width="first").to_yaml())
    (root / "link.yaml").symlink_to(outside / "s.yaml")
    (root / "mine.yaml").write_text(Strategy(width="first").to_yaml())
    (root / "notes.txt").write_text("width: first\n")
    roots = Roots.create(root)
    for typed in (str(outside / "s.yaml"), "link.yaml", "../outside/s.yaml"):
        with pytest.raises(ProjectionError, match="outside the folders this app may open") as err:
            fn.strategy_files(typed, roots)
        assert "\n" not in str(err.value)
    with pytest.raises(ProjectionError, match="not a .yaml file"):
        fn.strategy_files("notes.txt", roots)
    with pytest.raises(ProjectionError, match="at most 4"):
        fn.strategy_files("\n".join(["mine.yaml"] * 5), roots)
    files = fn.strategy_files("mine.yaml", roots)
    assert files == [("mine.yaml", (root / "mine.yaml").resolve())]
    named, origins = fn.probe_candidates([fn.PROBE_CURRENT], "", "", Strategy(), files, None)
    assert named == {fn.PROBE_CURRENT: Strategy(), "mine": Strategy(width="first")}
    assert origins["mine"] == "mine.yaml"
    with pytest.raises(ProjectionError, match="probe steps: 0"):
        fn.probe_steps(0)
    assert fn.probe_steps(100) == 100


def test_weights_past_the_bound_are_not_kept_and_the_gallery_says_why(probed, monkeypatch):
    import inspector.answers.function as function_answers

    s, calibration, *_ = probed
    monkeypatch.setattr(function_answers, "PROBE_WEIGHTS_BYTES", 1000)
    result = s.probe(calibration, {}, {}, CONFIG)
    assert [o.name for o in result.outcomes] == [recovery.RANDOM, recovery.DEFAULT] and result.teacher_passes == 0
    assert s.probed.result is result and s.probed.weights == {}
    assert s.probed.not_kept.endswith("the app keeps up to 1 kB of them for the Gallery")
    with pytest.raises(ProjectionError, match="not drawn after the probe: the probe's 2 starts and trained students"):
        s.probe_row(recovery.DEFAULT, True)


def test_other_teachers_after_probe_rows_are_rgb_previews(synthetic_demo_dir, tmp_path, monkeypatch):
    """A teacher outside the demo's latent space: its probed starts are drawn as Wan's RGB preview on the Function
    tab's set (not scored), each row's error the one its weights give on the shared reference."""
    from projection.function.calibration import synthetic_calibration

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    pool = Sessions(Scratch(tmp_path / "scratch"), Caches())
    try:
        s = pool.open("owner", str(synthetic_demo_dir / "teacher-wan"),
                      str(synthetic_demo_dir / "student-wanlite.yaml"), None, Strategy())
        calibration = synthetic_calibration(s.projector.teacher.config, n=8)
        s.measure_function(calibration)
        assert s.previews
        s.probe(calibration, {}, {}, CONFIG)
        start, trained = s.probe_row(recovery.DEFAULT, False), s.probe_row(recovery.DEFAULT, True)
        for row in (start, trained):
            assert row.images.dim() == 4 and row.images.shape[1] == 3  # RGB previews, one per prompt
            assert row.prompt_accuracy is None and row.scored == 0
        assert not torch.equal(start.images, trained.images)
        model = build_student(s.probed.student, "meta")
        model.load_state_dict({k: v.clone() for k, v in s.probed.weights[recovery.DEFAULT][1].items()}, assign=True)
        assert trained.velocity_error == pytest.approx(s.reference().score(model.eval()).relative_error, rel=1e-6)
    finally:
        pool.close_all()
