"""The screens users wait on, timed on the demo (issue 22): the app's Load, Function measure, A/B comparison and
Gallery draw (a warm app, through its HTTP API as a browser would call it; a second session drawing the same rows),
and `projection fidelity` as a fresh process (start-up included). Each repeat starts a fresh app: the Function
view's measure runs the teacher on its default set (64 held-out latents, 2 noise draws), the A/B comparison then
scores its students against those shared teacher outputs (it draws no samples), and the Gallery draws all four
rows (their velocity errors from the same shared outputs).

    python benchmarks/bench_screens.py [--repeat 3]

Targets (a warm app on the 2-core machine): Function measure < 3 s, A/B < 3 s, Gallery < 10 s, `projection
fidelity` < 5 s. Prints each figure's best and median, and the load average (other work on the machine slows
every figure).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"Function measure (64 held-out latents)": 3.0, "A/B comparison": 3.0, "Gallery draw": 10.0,
           "Gallery draw, a second session": 10.0, "projection fidelity (a fresh process)": 5.0,
           "projection fidelity again (the teacher's outputs on disk)": 5.0}
DEFAULT, FIRST = "layers: uniform\n", "width: first\nheads: first\nffn: first\n"
TABLE = [["exact", "mapped", "concatenated", "skipped"], "", "student order"]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from gradio_client import Client

    from inspector.cli import start
    from projection.demo.folder import write_demo

    root = Path(tempfile.mkdtemp(prefix="bench-screens-"))
    demo = write_demo(root / "demo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load = ["demo/teacher-wan", "single model", "file", "demo/student-diffusers.yaml", None, "diffusers", 64, 4, 2,
            256, *TABLE, None]
    times: dict[str, list[float]] = {name: [] for name in ["Load", *TARGETS]}
    for _ in range(args.repeat):  # a fresh app each time: nothing drawn yet (a second session then finds it)
        os.environ["PROJECTION_CACHE"] = tempfile.mkdtemp(prefix="bench-screens-cache-")  # no statistics on disk yet
        blocks = start(["--root", str(root), "--port", str(port)], prevent_thread_lock=True, quiet=True)
        try:
            client = Client(blocks.local_url, verbose=False, download_files=False)
            times["Load"].append(timed(lambda: client.predict(*load, api_name="/load")))
            times["Function measure (64 held-out latents)"].append(
                timed(lambda: client.predict("demo held-out digits", "", 64, api_name="/function")))
            times["A/B comparison"].append(timed(lambda: client.predict(DEFAULT, FIRST, api_name="/compare")))
            times["Gallery draw"].append(timed(lambda: client.predict(DEFAULT, FIRST, api_name="/gallery")))
            other = Client(blocks.local_url, verbose=False, download_files=False)
            other.predict(*load, api_name="/load")
            times["Gallery draw, a second session"].append(
                timed(lambda: other.predict(DEFAULT, FIRST, api_name="/gallery")))
        finally:
            blocks.close()
        cli = [sys.executable, "-m", "projection", "fidelity", "--teacher", str(demo / "teacher-wan"),
               "--student", str(demo / "student-diffusers.yaml")]
        times["projection fidelity (a fresh process)"].append(
            timed(lambda: subprocess.run(cli, check=True, capture_output=True, cwd=ROOT)))
        times["projection fidelity again (the teacher's outputs on disk)"].append(
            timed(lambda: subprocess.run(cli, check=True, capture_output=True, cwd=ROOT)))
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    print("| screen | best | median | target |")
    print("|---|---|---|---|")
    for name, found in times.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"< {target:g} s: {'met' if min(found) < target else 'MISSED'}"
        print(f"| {name} | {min(found):.2f} s | {statistics.median(found):.2f} s | {verdict} |")


if __name__ == "__main__":
    main()
