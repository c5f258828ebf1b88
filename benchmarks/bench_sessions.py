"""Concurrent sessions: N gradio_client sessions against the real app, each with its own strategy and folder.

Launches `app.py` in its own process, then N clients at once: each loads the teacher and its student, applies its
own strategy and exports to its own folder. Then the same N exports by `projection export`, each with the strategy
file its session ended with, compared byte for byte (weights, config, strategy). The clients then disconnect (the
app frees their sessions), and the app is stopped with SIGTERM, as a service manager would.

Reported: server RSS (peak; with the N sessions open after the run; after they were freed), split into anonymous
memory (what the app holds) and file-backed pages (the teacher's mapped page cache, which the OS reclaims), wall
time, exports bit-identical to the CLI's, and temporary folders left after shutdown.

    python benchmarks/bench_sessions.py [--sessions 8] [--small] [--teacher-dir D] [--work D]

Default: the Wan2.1-1.3B-shaped teacher of bench_export.py (fp32, 5.7 GB, written once and reused); --small: the
built-in demo teacher (the test suite runs this way with 4 sessions).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import STUDENT, WAN13B, WAN13B_CONFIG, ensure_teacher, loadavg, machine  # noqa: E402
from bench_refresh import free_port  # noqa: E402

from projection import Strategy  # noqa: E402

GB = 1e9
TABLE = [["exact", "mapped", "concatenated", "skipped"], "", "student order"]
SCRATCH_PREFIX = "inspector-"

# Sessions take these in turn: (student file name, strategy fields, export dtype).
FULL_STUDENTS = {"wanlite-1024.yaml": STUDENT,
                 "wanlite-768.yaml": {"layout": "wanlite", "dim": 768, "num_layers": 12, "num_heads": 6,
                                      "ffn_dim": 3072},
                 "seed-1024.yaml": {"layout": "seed", "dim": 1024, "num_layers": 16, "num_heads": 8,
                                    "ffn_dim": 4096}}
FULL_JOBS: list[tuple[str, dict[str, Any], str]] = [
    ("wanlite-1024.yaml", {}, "float32"),
    ("wanlite-1024.yaml", {"width": "first", "heads": "first", "head_dim": "first", "ffn": "first"}, "bfloat16"),
    ("wanlite-1024.yaml", {"layers": "last", "width": "uniform", "heads": "uniform", "ffn": "uniform"}, "float32"),
    ("wanlite-768.yaml", {"layers": list(range(0, 24, 2)), "rescale": "variance"}, "float32"),
    ("seed-1024.yaml", {"seed": 1}, "float32"),
    ("seed-1024.yaml", {"width": "first", "seed": 2}, "float16"),
    ("wanlite-768.yaml", {"conv": "center", "head_dim": "first", "seed": 3}, "bfloat16"),
    ("seed-1024.yaml", {"layers": "first", "ffn": "first", "seed": 4}, "float32"),
]
SMALL_STUDENTS = {"wanlite.yaml": {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4},
                  "seed.yaml": {"layout": "seed", "dim": 128, "num_heads": 4, "ffn_dim": 512, "num_layers": 4}}
SMALL_JOBS: list[tuple[str, dict[str, Any], str]] = [
    ("wanlite.yaml", {}, "float32"),
    ("seed.yaml", {"width": "first", "seed": 7}, "float32"),
    ("wanlite.yaml", {"layers": "last", "rescale": "variance"}, "bfloat16"),
    ("seed.yaml", {"width": "svd-per-matrix", "seed": 3}, "float16"),
]


@dataclass
class Memory:
    """The server's memory, sampled from /proc while the benchmark runs."""

    pid: int
    peak_anon: int = 0
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def now(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0]) * 1024
        return out

    def watch(self, every: float = 0.1) -> None:
        def run() -> None:
            while not self.stop.is_set():
                try:
                    self.peak_anon = max(self.peak_anon, self.now()["RssAnon"])
                    self.samples += 1
                except OSError:
                    return
                self.stop.wait(every)
        threading.Thread(target=run, daemon=True).start()


def launch(root: Path, port: int, temp: Path, teacher: Path, student: Path, extra: dict[str, str]) -> subprocess.Popen:
    """app.py on 127.0.0.1 with --root ROOT; its temporary folders go under TEMP (GRADIO_TEMP_DIR and TMPDIR)."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(temp),
           "TMPDIR": str(temp), "PYTHONPATH": str(ROOT), **extra}
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # the app's own runtime setup decides
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--root", str(root), "--port", str(port),
                             "--teacher", str(teacher), "--student", str(student)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # drain, so the app never blocks
    deadline = time.time() + 300
    import socket
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("app.py did not start within 300 s")


def session(url: str, teacher: Path, student: Path, strategy: Strategy, dtype: str, out: str,
            result: dict[str, Any]) -> None:
    """One client: load, apply its strategy, export; records the strategy the session exported with."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    result["client"] = client
    try:
        client.predict(str(teacher), "single model", "file", str(student), None, "wanlite", 128, 4, 2, 384, *TABLE, None,
                       api_name="/load")
        client.predict(strategy.to_yaml(), *TABLE, None, api_name="/apply_strategy_yaml")
        started = time.perf_counter()
        outputs = client.predict(out, dtype, "auto", api_name="/export")
        result["export_s"] = time.perf_counter() - started
        result["strategy_yaml"] = outputs[-1]
    except Exception as exc:  # reported by the caller
        result["error"] = f"{type(exc).__name__}: {exc}"


def compared_files(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.name.startswith("model") or f.name in
                  ("config.json", "strategy.yaml"))


def identical(a: Path, b: Path) -> bool:
    names = compared_files(a)
    return bool(names) and names == compared_files(b) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                             for n in names)


def complete(folder: Path) -> bool:
    names = {f.name for f in folder.iterdir()} if folder.is_dir() else set()
    return {"config.json", "strategy.yaml", "projection_report.json"} <= names and any(
        n.endswith(".safetensors") for n in names)


def scratch_folders(temp: Path) -> list[Path]:
    return sorted(temp.glob(SCRATCH_PREFIX + "*"))


def session_folders(temp: Path) -> int:
    return sum(1 for d in scratch_folders(temp) for _ in d.glob("session-*"))


def run(teacher: Path, students: dict[str, dict[str, Any]], jobs: list[tuple[str, dict[str, Any], str]],
        sessions: int, work: Path, heartbeat_s: float = 1.0) -> dict[str, Any]:
    """The whole benchmark in WORK (emptied first); returns its figures."""
    shutil.rmtree(work, ignore_errors=True)
    root, temp, cli = work / "root", work / "tmp", work / "cli"
    for d in (root / "students", temp, cli):
        d.mkdir(parents=True)
    for name, config in students.items():
        (root / "students" / name).write_text(json.dumps(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    first = root / "students" / jobs[0][0]
    t0 = time.perf_counter()
    proc = launch(root, port, temp, teacher, first, {"GRADIO_HEARTBEAT_INTERVAL": str(heartbeat_s)})
    figures: dict[str, Any] = {"sessions": sessions, "app_start_s": time.perf_counter() - t0,
                               "load_average_start": loadavg()}
    memory = Memory(proc.pid)
    try:
        figures["rss_idle"] = memory.now()
        memory.watch()
        results: list[dict[str, Any]] = [{} for _ in range(sessions)]
        threads = []
        for i in range(sessions):
            name, fields, dtype = jobs[i % len(jobs)]
            strategy = Strategy(**fields)
            threads.append(threading.Thread(target=session, args=(url, teacher, root / "students" / name, strategy,
                                                                  dtype, f"out/session-{i}", results[i])))
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        figures["wall_s"] = time.perf_counter() - t0
        figures["errors"] = [r["error"] for r in results if "error" in r]
        figures["rss_sessions_open"] = memory.now()
        figures["live_session_folders"] = session_folders(temp)
        for r in results:  # the clients go away: their heartbeats stop and the app frees their sessions
            if "client" in r:
                r.pop("client").close()
        deadline = time.time() + 120
        while session_folders(temp) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1)  # the last close drops the shared caches right after removing the folder
        figures["session_folders_after_close"] = session_folders(temp)
        figures["rss_sessions_freed"] = memory.now()
        figures["peak_rss"] = figures["rss_sessions_freed"]["VmHWM"]
        figures["peak_anon"] = memory.peak_anon
    finally:
        memory.stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            figures["exit_code"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            figures["exit_code"] = "killed after 60 s"
    figures["temp_folders_left"] = [str(p) for p in scratch_folders(temp)]

    # The same exports from the command line, one at a time, each with its session's final strategy.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    same, done = 0, 0
    for i, r in enumerate(results):
        out = root / "out" / f"session-{i}"
        done += complete(out) and not list(out.parent.glob(f".session-{i}.partial-*"))
        if "strategy_yaml" not in r:
            continue
        strategy_file = cli / f"strategy-{i}.yaml"
        strategy_file.write_text(r["strategy_yaml"])
        subprocess.run([sys.executable, "-m", "projection", "export", "--teacher", str(teacher), "--student",
                        str(root / "students" / jobs[i % len(jobs)][0]), "--strategy", str(strategy_file),
                        "--out", str(cli / f"session-{i}")], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        same += identical(out, cli / f"session-{i}")
    figures.update(complete_exports=done, bit_identical=same, load_average_end=loadavg(),
                   export_s=[round(r.get("export_s", float("nan")), 2) for r in results])
    return figures


def report(figures: dict[str, Any]) -> None:
    def gb(m: dict[str, int], name: str) -> str:
        return f"{m[name] / GB:.2f}"

    n = figures["sessions"]
    print(f"\n| {n} sessions at once | wall s | bit-identical to the CLI | complete exports | temp folders left |")
    print("|---|---|---|---|---|")
    print(f"| load, apply strategy, export | {figures['wall_s']:.1f} | {figures['bit_identical']}/{n} | "
          f"{figures['complete_exports']}/{n} | {len(figures['temp_folders_left'])} |")
    print("\n| server memory (GB) | RSS | anonymous | file-backed (teacher pages) |")
    print("|---|---|---|---|")
    for label, key in (("idle, before the sessions", "rss_idle"), ("after the run, sessions open", "rss_sessions_open"),
                       ("after the clients left (sessions freed)", "rss_sessions_freed")):
        m = figures[key]
        print(f"| {label} | {gb(m, 'VmRSS')} | {gb(m, 'RssAnon')} | {gb(m, 'RssFile')} |")
    print(f"| peak | {figures['peak_rss'] / GB:.2f} | {figures['peak_anon'] / GB:.2f} (sampled every 0.1 s) | |")
    print(f"\nper-session export time (s): {figures['export_s']}; errors: {figures['errors'] or 'none'}; "
          f"app exit code after SIGTERM: {figures['exit_code']}")
    print(f"load average (1/5/15 min): {figures['load_average_start']} at start, {figures['load_average_end']} at end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="the built-in demo teacher instead of Wan2.1-1.3B")
    parser.add_argument("--teacher-dir", type=Path, default=Path("/tmp/wan13b-bench"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-sessions"),
                        help="scratch folder (emptied first): the app's root, exports, CLI exports")
    args = parser.parse_args()
    print(f"command: {' '.join([sys.executable, *sys.argv])}\nmachine: {machine()}")
    if args.small:
        from projection.demo.folder import write_demo

        teacher = write_demo(args.work.with_name(args.work.name + "-demo")) / "teacher-wan"
        students, jobs = SMALL_STUDENTS, SMALL_JOBS
    else:
        ensure_teacher(args.teacher_dir, WAN13B, WAN13B_CONFIG)
        teacher, students, jobs = args.teacher_dir, FULL_STUDENTS, FULL_JOBS
    print(f"teacher: {teacher}; {args.sessions} sessions")
    figures = run(teacher, students, jobs, args.sessions, args.work)
    report(figures)
    print("\nBENCH-RESULT " + json.dumps(figures))


if __name__ == "__main__":
    main()
