"""Refresh latency of the inspector, measured through its API on the built-in demo.

Launches `app.py` in its own process on 127.0.0.1 (a fresh folder as --root, so the demo is written there),
then drives it with gradio_client as a browser would: load once, then move layer sliders (first onto teacher
blocks never read, then around cached ones), change strategy options, switch the layer method, apply rules and
filter the table. A no-op endpoint gives the floor that gradio_client itself adds to every call. Each call is timed end to end (request,
queue, handler, response); "server" is the handler's own time as the app reports it, and "read" is what the
refresh read from the teacher's files (0 B: every tensor it needed was cached).

    python benchmarks/bench_refresh.py [--repeat 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALL = ["exact", "mapped", "concatenated", "skipped"]
TABLE = [ALL, "", "student order"]
STRATEGIES = [  # width, heads, head_dim, ffn, conv, rescale
    ("uniform", "magnitude", "frequency", "magnitude", "sum", "none"),
    ("magnitude", "first", "frequency", "magnitude", "sum", "none"),
    ("magnitude", "magnitude", "first", "uniform", "sum", "none"),
    ("magnitude", "magnitude", "frequency", "magnitude", "center", "variance"),
    ("first", "uniform", "uniform", "first", "mean", "none"),
    ("magnitude", "magnitude", "frequency", "magnitude", "sum", "none"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--root", str(root), "--port", str(port)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited:\n{proc.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("app.py did not start within 180 s")


def server_info(result: tuple) -> tuple[float | None, str]:
    """The app's own handler time and teacher bytes read, from its refresh line."""
    line = next((v for v in result if isinstance(v, str) and 'class="refresh-info"' in v), "")
    ms = re.search(r"updated in (\d+) ms", line)
    read = re.search(r"read (.+?) from the teacher", line)
    return (float(ms[1]) if ms else None), (read[1] if read else "—")


def timed(calls: list[Callable[[], Any]]) -> tuple[list[float], list[float], set[str]]:
    wall, server, reads = [], [], set()
    for call in calls:
        t0 = time.perf_counter()
        result = call()
        wall.append(1000 * (time.perf_counter() - t0))
        ms, read = server_info(result if isinstance(result, tuple) else (result,))
        if ms is not None:
            server.append(ms)
        reads.add(read)
    return wall, server, reads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20, help="refreshes per kind")
    args = parser.parse_args()
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        t0 = time.perf_counter()
        proc = launch(Path(tmp), port)
        started = time.perf_counter() - t0
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            t0 = time.perf_counter()
            client.predict("demo/teacher-wan", "single model", "file", "demo/student-wanlite.yaml", None, "wanlite",
                           128, 4, 2, 384, *TABLE, None, api_name="/load")
            loaded = time.perf_counter() - t0

            def new_block(i: int) -> Callable[[], Any]:  # teacher blocks the demo's uniform stride never read
                chosen = [0, (1, 3, 4, 6)[i % 4], 5, 7]
                return lambda: client.predict(*TABLE, None, *chosen, *[0] * 44, api_name="/set_layers")

            def layers(i: int) -> Callable[[], Any]:  # block 1 walks over teacher blocks 1..7, all cached now
                chosen = [0, 1 + i % 7, 5, 7]
                return lambda: client.predict(*TABLE, None, *chosen, *[0] * 44, api_name="/set_layers")

            def floor(i: int) -> Callable[[], Any]:  # an endpoint that does nothing: gradio_client's own cost
                return lambda: client.predict("", api_name="/details")

            def strategy(i: int) -> Callable[[], Any]:
                return lambda: client.predict("uniform", *STRATEGIES[i % len(STRATEGIES)], 0, *TABLE, None,
                                              api_name="/set_strategy")

            def method(i: int) -> Callable[[], Any]:
                m = ("first", "last", "uniform")[i % 3]
                return lambda: client.predict(m, *STRATEGIES[-1], 0, *TABLE, None, api_name="/set_strategy")

            def rules(i: int) -> Callable[[], Any]:
                text = "head.head: head.head\n" if i % 2 else "{}\n"
                return lambda: client.predict(text, *TABLE, None, api_name="/apply_rules")

            def table(i: int) -> Callable[[], Any]:
                shown = [ALL, ["mapped"], ["exact", "skipped"]][i % 3]
                return lambda: client.predict(shown, "blocks" if i % 2 else "", "params (largest first)",
                                              api_name="/filter_table")

            def svd(i: int) -> Callable[[], Any]:  # the comparator: the first call takes one SVD per matrix
                conv, rescale = ("sum", "center", "mean")[i % 3], ("none", "variance")[i % 2]
                return lambda: client.predict("uniform", "svd-per-matrix", *STRATEGIES[-1][1:4], conv, rescale, 0,
                                              *TABLE, None, api_name="/set_strategy")

            def svd_layers(i: int) -> Callable[[], Any]:  # still svd-per-matrix: new blocks need their SVDs once
                chosen = [0, 1 + i % 7, 5, 7]
                return lambda: client.predict(*TABLE, None, *chosen, *[0] * 44, api_name="/set_layers")

            kinds = {"round trip of a no-op endpoint (floor)": floor,
                     "move a slider to a never-read teacher block": new_block,
                     "move a layer slider (set_layers)": layers, "change a strategy option (set_strategy)": strategy,
                     "switch layer method (set_strategy)": method, "apply rules (apply_rules)": rules,
                     "filter + sort the table (filter_table)": table,
                     "svd-per-matrix: change an option (first call: every SVD)": svd,
                     "svd-per-matrix: move a layer slider": svd_layers}
            rows = []
            for name, make in kinds.items():
                n = 4 if make is new_block else args.repeat  # only 4 teacher blocks are new, once each
                wall, server, reads = timed([make(i) for i in range(n)])
                rows.append((name, wall, server, reads))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    import gradio
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end; "
          f"python {platform.python_version()}, torch {torch.__version__}, gradio {gradio.__version__}")
    print(f"app.py up in {started:.1f} s; first load (demo: 231 teacher tensors, 123 student keys) {loaded:.2f} s")
    print("each call timed end to end through gradio_client (ms):\n")
    print("| call | n | median | p90 | max | in the handler (median) | teacher read per call |")
    print("|---|---|---|---|---|---|---|")
    for name, wall, server, reads in rows:
        p90 = statistics.quantiles(wall, n=10, method="inclusive")[-1] if len(wall) >= 2 else wall[0]
        srv = f"{statistics.median(server):.0f}" if server else "—"
        print(f"| {name} | {len(wall)} | {statistics.median(wall):.0f} | {p90:.0f} | {max(wall):.0f} | {srv} | "
              f"{', '.join(sorted(reads))} |")


if __name__ == "__main__":
    main()
