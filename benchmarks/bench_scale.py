"""Peak memory at full scale: export a student from a Wan 14B-shaped teacher (1095 real headers, fp32, 57 GB).

The teacher's data section is a sparse hole (`projection.demo.write_shape_only_teacher`): no disk is used and
every byte reads as zero, so wall time here says little about a real 14B export (reads of a hole cost no
I/O), but the peak RSS is the real one: the streaming export holds the largest tensor groups in flight
(FFN [13824, 5120] fp32 = 283 MB each), never the teacher or the student.

    python benchmarks/bench_scale.py [--teacher-dir /tmp/wan14b-shape] [--out /tmp/bench-scale-out]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

from projection import Projector, export_student
from projection.demo.folder import WAN14B, write_shape_only_teacher
from projection.runtime import setup_runtime

STUDENT = {"layout": "wanlite", "dim": 1024, "num_layers": 16, "num_heads": 16, "ffn_dim": 4096}
GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-dir", type=Path, default=Path("/tmp/wan14b-shape"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-scale-out"))
    args = parser.parse_args()
    setup_runtime()  # as the `projection` CLI does
    if not (args.teacher_dir / "diffusion_pytorch_model.safetensors").is_file():
        write_shape_only_teacher(args.teacher_dir, WAN14B)
    shutil.rmtree(args.out, ignore_errors=True)
    p = Projector.open(str(args.teacher_dir), STUDENT)
    started = time.perf_counter()
    export_student(p, args.out)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    student = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    shutil.rmtree(args.out)
    print(json.dumps({"teacher_gb": round(p.teacher.checkpoint.nbytes / GB, 2), "student": STUDENT,
                      "student_weights_gb": round(student / GB, 2), "peak_rss_gb": round(peak / GB, 3),
                      "teacher_bytes_read_gb": round(p.teacher.checkpoint.bytes_read / GB, 2),
                      "wall_s": round(wall, 1), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
