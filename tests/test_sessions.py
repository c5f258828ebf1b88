"""Concurrent sessions are isolated and bounded: one shared byte-bounded cache, sessions freed when their client
leaves or idles, temporary folders marked and removed, and N concurrent app sessions exporting exactly what the CLI
exports with the same strategy."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from projection import ProjectionError, Projector, Strategy, projected_student
from projection.cache import Bound
from projection.engine.projector import Caches, TensorCache

from inspector.scratch import MARKER, Scratch, remove_stale
from inspector.sessions import Sessions

ROOT = Path(__file__).resolve().parents[1]
TABLE = [["exact", "mapped", "concatenated", "skipped"], "", "student order"]  # status filter, search, sort
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),  # inside gradio
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


def open_session(pool: Sessions, owner: str, demo_dir: Path, student: str = "student-wanlite.yaml"):
    return pool.open(owner, str(demo_dir / "teacher-wan"), str(demo_dir / student), None, Strategy())


def test_the_gallery_runs_the_teacher_on_its_set_once_for_every_row(demo_dir, tmp_path, monkeypatch):
    """The teacher's velocities on the gallery's set are computed once and score every student row (A, B, random
    init), with the numbers each row had when it ran the teacher itself; a second session drawing the same rows
    reuses them, a session with another student draws its own."""
    import inspector.answers.function as function_answers
    from projection.demo.teacher import demo_calibration
    from projection.function.fidelity import velocity_fidelity

    runs = []
    import projection.engine.report as report_module

    counted = report_module.teacher_reference
    monkeypatch.setattr(report_module, "teacher_reference", lambda *a, **k: runs.append(1) or counted(*a, **k))
    pool = Sessions(Scratch(tmp_path), Caches())
    try:
        s = open_session(pool, "owner", demo_dir)
        a, b = Strategy(), Strategy(width="first")
        rows = [s.gallery_row(a), s.gallery_row(b), s.gallery_row(function_answers.RANDOM)]
        assert len(runs) == 1
        held_out = demo_calibration().subset(function_answers.QUICK_LATENTS)
        alone = velocity_fidelity(projected_student(s.projector, strategy=b), s.teacher_module(), held_out.latents,
                                  held_out.context, draws=function_answers.REFERENCE_DRAWS)
        assert rows[1].velocity_error == pytest.approx(alone.relative_error, rel=1e-6)
        again = open_session(pool, "another owner", demo_dir)
        assert again.gallery_row(Strategy(width="first")) is rows[1] and len(runs) == 1
        other = open_session(pool, "a third owner", demo_dir, "student-seed.yaml")
        assert other.gallery_row(function_answers.RANDOM) is not rows[2] and len(runs) == 1
    finally:
        pool.close_all()


def test_one_teacher_pass_per_set_for_the_function_view_ab_card_and_gallery(demo_dir, tmp_path, monkeypatch):
    """Counting reads of the teacher's tensors (every Checkpoint) and streamed passes over its weights: measuring
    the Function view on the demo's default set (statistics, block removal effects and the teacher's outputs
    together), then A/B, then the card, then the Gallery, passes over the teacher once, and each block tensor is read
    once; the Gallery loads the teacher once to draw its own samples. They all give the same numbers and name the
    same set."""
    import inspector.answers.function as function_answers
    import inspector.answers.gallery as gallery_module
    from projection.demo.teacher import DEMO, open_calibration
    from projection.function.forward import StreamedTeacher
    from projection.io.checkpoint import Checkpoint

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    reads: dict[str, int] = {}
    real_get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: reads.update({key: reads.get(key, 0) + 1}) or
                        real_get(self, key))
    passes = []
    real_walk = StreamedTeacher.walk
    monkeypatch.setattr(StreamedTeacher, "walk", lambda self, riders: passes.append(1) or real_walk(self, riders))

    def most() -> int:  # the most reads of one teacher block tensor since the last call
        found = max((n for k, n in reads.items() if k.startswith("blocks.")), default=0)
        reads.clear()
        return found

    pool = Sessions(Scratch(tmp_path), Caches())
    try:
        s = open_session(pool, "owner", demo_dir)
        s.measure()
        assert most() == 1  # the energies: one statistics pass over the weights (no forward)
        report = s.measure_function(open_calibration(DEMO, s.projector.teacher.config).subset(64))
        assert most() == 1 and len(passes) == 1  # statistics, removal effects, the reference: one pass
        a, b = Strategy(), Strategy(width="first")
        s.compare(a, b)
        compared = s.compare_function(a, b)
        assert most() == 0 and len(passes) == 1  # the Function view's reference, nothing read
        card = s.step0_error()
        assert most() == 0 and len(passes) == 1
        rows = [s.gallery_row(w) for w in (gallery_module.TEACHER, a, function_answers.RANDOM)]
        assert most() <= 1 and len(passes) == 1  # the teacher loaded once to draw its own samples
        s.measure_function(open_calibration(DEMO, s.projector.teacher.config).subset(64))
        assert most() == 0 and len(passes) == 1  # measured again: from the caches
        students = report["fidelity"]["students"]
        assert compared["A"][0].relative_error == card.error == rows[1].velocity_error == \
            students["student"]["relative_error"]
        assert compared["random init"][0].relative_error == card.random == rows[2].velocity_error == \
            students["random init"]["relative_error"]
        assert card.on == "demo held-out digits: 64 of 269 latents × 2 noise draws" == s.reference_set()[1]
        assert report["fidelity"]["latents"] == 64 and report["fidelity"]["noise_draws"] == 2
        per_block = [r["relative_error"] for r in report["fidelity"]["blocks"]["student"]]
        assert [r["relative_error"] for r in compared["A"][1]] == per_block
    finally:
        pool.close_all()


def test_a_teacher_whose_block_outputs_do_not_fit_is_read_once_or_twice_by_the_function_view(demo_dir, tmp_path,
                                                                                              monkeypatch):
    """Where the teacher's block outputs on the set pass what a reference keeps (a real teacher), the Function
    view's Measure on a new set reads each block tensor once for a student projected from the weights alone (it
    walks beside the pass that measures the statistics, removal effects and velocities), twice for one ranked on
    activations (projected from that pass's statistics, it walks beside the teacher in a second pass). The numbers
    are those of the pass that keeps the block outputs."""
    import projection.function.fidelity as fidelity_module
    from projection.demo.teacher import DEMO, open_calibration
    from projection.io.checkpoint import Checkpoint

    def measured(strategy: Strategy, cache: str) -> tuple[dict, int]:
        monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / cache))
        reads: dict[str, int] = {}
        pool = Sessions(Scratch(tmp_path), Caches())
        try:
            s = open_session(pool, "owner", demo_dir)
            s.set_strategy(strategy)
            s.measure()  # the weights' energies: projections then read the teacher from the shared tensor cache
            with monkeypatch.context() as m:
                real_get = Checkpoint.get
                m.setattr(Checkpoint, "get", lambda self, key: reads.update({key: reads.get(key, 0) + 1}) or
                          real_get(self, key))
                report = s.measure_function(open_calibration(DEMO, s.projector.teacher.config).subset(16))
        finally:
            pool.close_all()
        return report, max(n for k, n in reads.items() if k.startswith("blocks."))

    cases = ((Strategy(), 1), (Strategy(width="activation", layers=[0, 3, 5, 7]), 2),
             (Strategy(width="activation", layers="first"), 2))  # the last: the teacher's last blocks feed none
    for case, (strategy, passes) in enumerate(cases):
        kept, _ = measured(strategy, f"kept-{case}")
        with monkeypatch.context() as m:
            m.setattr(fidelity_module, "REFERENCE_BLOCK_BYTES", 0)
            streamed, reads = measured(strategy, f"streamed-{case}")
        assert reads == passes, strategy
        for name, row in kept["fidelity"]["students"].items():
            assert streamed["fidelity"]["students"][name]["relative_error"] == \
                pytest.approx(row["relative_error"], rel=1e-6)
        for name, rows in kept["fidelity"]["blocks"].items():
            assert [r["relative_error"] for r in streamed["fidelity"]["blocks"][name]] == \
                pytest.approx([r["relative_error"] for r in rows], rel=1e-6)
        assert streamed["teacher_blocks"] == kept["teacher_blocks"]


def test_sessions_share_one_bounded_teacher_cache(demo_dir, tmp_path):
    """Three sessions on one teacher read it once between them, and the cache stays within its budget; closing the
    last session of a teacher frees its entries, its files and what it kept."""
    pool = Sessions(Scratch(tmp_path), Caches())
    try:
        sessions = [open_session(pool, f"owner-{i}", demo_dir) for i in range(3)]
        read = []
        for s in sessions:
            s.measure(force=True)
            read.append(s.bytes_read)
        assert read[0] > 0 and read[1:] == [0, 0]
        assert 0 < pool.caches.tensors.used <= pool.caches.tensors.budget
        folders = [s.folder for s in sessions]
        assert all(f.is_dir() and f.parent == pool.scratch.path for f in folders)
        for i, s in enumerate(sessions):
            pool.close(f"owner-{i}")
            assert s.closed and not s.folder.exists() and not s.projector._results and not s.measures
            assert (pool.caches.tensors.used > 0) == (i < 2)  # dropped with the teacher's last session
        assert pool.count == 0
    finally:
        pool.scratch.close()


def test_the_shared_cache_bounds_all_sessions_together(demo_dir, tmp_path):
    budget = 2 << 20
    pool = Sessions(Scratch(tmp_path), Caches(tensors=TensorCache(budget=budget)))
    try:
        for i, student in enumerate(["student-wanlite.yaml", "student-seed.yaml"] * 2):
            open_session(pool, f"owner-{i}", demo_dir, student).measure(force=True)
            assert pool.caches.tensors.used <= budget
        assert pool.caches.tensors.used > budget // 2
    finally:
        pool.close_all()
        pool.scratch.close()


def test_idle_sessions_are_swept_but_busy_ones_wait(demo_dir, tmp_path):
    pool = Sessions(Scratch(tmp_path), idle_seconds=60)
    try:
        idle, busy, fresh = (open_session(pool, name, demo_dir) for name in ("idle", "busy", "fresh"))
        later = time.monotonic() + 61
        fresh.last_used = later
        with busy.lock:  # a request is running
            assert pool.sweep(later) == [idle]
        assert idle.closed and "idle for more than 1 minutes" in idle.closed and not idle.folder.exists()
        assert not busy.closed and pool.sweep(later) == [busy] and not fresh.closed
    finally:
        pool.close_all()
        pool.scratch.close()


def test_max_sessions_closes_the_least_recently_used(demo_dir, tmp_path):
    pool = Sessions(Scratch(tmp_path), max_sessions=2)
    try:
        a, b = open_session(pool, "a", demo_dir), open_session(pool, "b", demo_dir)
        a.last_used = time.monotonic()
        c = open_session(pool, "c", demo_dir)
        assert b.closed and not a.closed and set(pool.live) == {"a", "c"}
        again = open_session(pool, "c", demo_dir)  # the same owner reloads: its old session goes, no one else's
        assert c.closed and not a.closed and pool.live["c"] is again
        with a.lock, again.lock:
            with pytest.raises(ProjectionError, match="holds 2 sessions, all busy"):
                open_session(pool, "d", demo_dir)
        assert len(list(pool.scratch.path.glob("session-*"))) == 2  # the refused one left no folder
    finally:
        pool.close_all()
        pool.scratch.close()


def test_projected_tensors_kept_by_a_projector_are_bounded(demo_dir):
    p = Projector.open(str(demo_dir / "teacher-wan"), str(demo_dir / "student-wanlite.yaml"))
    expected = {r.entry.student_key: r.tensor for r in p.project()}
    assert p._kept.used > 256 << 10
    p.release()
    p._kept.bound = Bound(256 << 10)
    got = {r.entry.student_key: r.tensor for r in p.project()}
    assert all(torch.equal(got[k], t) for k, t in expected.items() if t is not None)
    kept = [r for r in p._results[p.signature()].values() if r.tensor is not None and r.tensor.numel()]
    assert p._kept.used <= 256 << 10 and sum(r.tensor.nbytes for r in kept) == p._kept.used
    assert p.student_tensor("blocks.0.ffn.0.weight") is not None  # an evicted entry is projected again


def test_scratch_folders_are_marked_and_only_stale_marked_ones_removed(tmp_path):
    unmarked = tmp_path / "inspector-someone-elses"
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("x")
    live = Scratch(tmp_path)
    assert (live.path / MARKER).is_file() and live.path.name.startswith("inspector-")
    # an app killed with -9: its folder is marked but nobody holds the lock
    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys; from inspector.scratch import Scratch; "
                             "s = Scratch(sys.argv[1]); (s.folder('session-') / 'w.safetensors').write_bytes(b'x'); "
                             "print(s.path, flush=True); os.kill(os.getpid(), signal.SIGKILL)", str(tmp_path)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    dead = Path(killed.stdout.strip())
    assert (dead / MARKER).is_file() and list(dead.glob("session-*/w.safetensors"))
    assert remove_stale(tmp_path) == [dead]  # the running app's folder and the unmarked one stay
    assert live.path.is_dir() and (unmarked / "keep.txt").is_file() and not dead.exists()
    before = os.environ.get("GRADIO_TEMP_DIR")
    live.hold_gradio_cache()
    assert os.environ["GRADIO_TEMP_DIR"] == str(live.path)
    live.close()
    assert not live.path.exists() and os.environ.get("GRADIO_TEMP_DIR") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspector-someone-elses"]


@pytest.fixture
def idle_app(demo_dir, tmp_path, monkeypatch):
    """The real app, in this process, closing sessions idle for 3 s."""
    from inspector.cli import start

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "tmp"))
    threads = torch.get_num_threads()
    (tmp_path / "root").mkdir()
    blocks = start(["--root", str(tmp_path / "root"), "--port", str(port), "--idle-minutes", "0.05",
                    "--teacher", str(demo_dir / "teacher-wan"), "--student", str(demo_dir / "student-wanlite.yaml")],
                   prevent_thread_lock=True, quiet=True)
    yield blocks, tmp_path / "tmp"
    blocks.close()
    torch.set_num_threads(threads)


def _wait(condition, seconds: float = 60) -> bool:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_the_app_closes_idle_sessions_and_says_so(idle_app, demo_dir):
    from gradio_client import Client

    blocks, temp = idle_app
    (scratch,) = list(temp.glob("inspector-*"))

    def sessions() -> int:
        return len(list(scratch.glob("session-*")))

    client = Client(blocks.local_url, verbose=False, download_files=False)
    load = (str(demo_dir / "teacher-wan"), "single model", "file", str(demo_dir / "student-wanlite.yaml"), None,
            "wanlite", 128, 4, 2, 384, *TABLE, None)
    client.predict(*load, api_name="/load")
    assert sessions() == 1
    assert _wait(lambda: sessions() == 0, 30)  # 3 s without a request
    with pytest.raises(Exception, match="closed to free memory: it was idle for more than 0.05 minutes"):
        client.predict(*TABLE, None, api_name="/measure")
    client.predict(*load, api_name="/load")  # Load starts again
    assert sessions() == 1
    client.close()
    blocks.close()
    assert _wait(lambda: not scratch.exists(), 30)  # stopped: sessions closed, scratch folder gone


def test_concurrent_app_sessions_export_what_the_cli_exports(demo_dir, tmp_path):
    """The load test, small: 4 gradio_client sessions at once against app.py (its own process), each with its own
    student, strategy and folder. Every export is complete and bit-identical to `projection export` with the
    strategy its session ended with; the clients' sessions are freed when they disconnect; the server's memory
    after the run is within the documented bound; SIGTERM stops the app and leaves no temporary folder."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_sessions
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    figures = bench_sessions.run(demo_dir / "teacher-wan", bench_sessions.SMALL_STUDENTS, bench_sessions.SMALL_JOBS, 4,
                                 tmp_path / "work")
    assert figures["errors"] == []
    assert figures["complete_exports"] == 4 and figures["bit_identical"] == 4
    assert figures["live_session_folders"] == 4 and figures["session_folders_after_close"] == 0
    grown = figures["rss_sessions_freed"]["RssAnon"] - figures["rss_idle"]["RssAnon"]
    assert grown <= Caches().budget  # all sessions freed: at most the shared caches' budget remains (README)
    assert figures["exit_code"] == 0 and figures["temp_folders_left"] == []
