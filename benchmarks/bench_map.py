"""Mapping reads headers only: time to open a Wan-14B-shaped teacher (1095 keys) and map it into students.

The teacher is a real safetensors file whose 57 GB data section is a sparse hole (no disk used), so this
measures exactly what the mapper touches: the header, config.json and the rules.

    python benchmarks/bench_map.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from projection import Projector
from projection.demo.folder import WAN14B, write_shape_only_teacher

STUDENTS = {
    "wanlite 1024/16/8h/4096": {"layout": "wanlite", "dim": 1024, "num_layers": 16, "num_heads": 8, "ffn_dim": 4096},
    "seed 1024/16/16h/4096": {"layout": "seed", "dim": 1024, "num_layers": 16, "num_heads": 16, "ffn_dim": 4096},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shape_only_teacher(folder, WAN14B)
        print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
        print("| student | open teacher + student (s) | map 1095 -> N keys (s) | teacher bytes read |")
        print("|---|---|---|---|")
        for name, student in STUDENTS.items():
            opens, maps = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                p = Projector.open(str(folder), student)
                t1 = time.perf_counter()
                n = len(p.mapping().entries)
                maps.append(time.perf_counter() - t1)
                opens.append(t1 - t0)
            print(f"| {name} ({n} keys) | {min(opens):.3f} | {min(maps):.3f} | "
                  f"{p.teacher.checkpoint.bytes_read} |")


if __name__ == "__main__":
    main()
