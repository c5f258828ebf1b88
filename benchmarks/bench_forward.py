"""The streamed teacher forward at Wan2.1-1.3B's shape: peak memory and time against the same forward with every
weight already in memory.

    python benchmarks/bench_forward.py [--teacher-dir D] [--latents 8] [--size 32] [--tokens 512] [--threads 2]

The teacher is bench_export.py's random fp32 Wan2.1-1.3B-shaped checkpoint (5.68 GB, one file, written once and
reused). Each measurement runs in a fresh process: 'streamed' is `projection.function.forward.StreamedTeacher` (one block of
weights in memory at a time), 'in memory' loads the whole teacher as a WanLite first and times its forward alone.
Inputs: N latents [16, size, size] (size/2 squared tokens each), a context of `tokens` UMT5-width states, one noise
level per latent. Peak RSS is the process's (ru_maxrss), interpreter and torch included.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import WAN13B, WAN13B_CONFIG, ensure_teacher, loadavg, machine  # noqa: E402


def child(kind: str, teacher_dir: Path, latents: int, size: int, tokens: int, threads: int) -> dict:
    import torch

    from projection.core.models import open_teacher
    from projection.engine.build import wanlite_from_teacher
    from projection.function.forward import StreamedTeacher

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(latents, 16, size, size, generator=g)
    t = torch.linspace(50, 950, latents)
    ctx = torch.randn(latents, tokens, 4096, generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if kind == "streamed":
        model = StreamedTeacher(open_teacher(str(teacher_dir)), micro_batch=latents)
        loaded = time.perf_counter()
        out = model(x, t, ctx)
    else:
        model = wanlite_from_teacher(teacher_dir)
        loaded = time.perf_counter()
        with torch.no_grad():
            out = model(x, t, ctx)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    block_bytes = sum(4 * n for n in (8 * (1536 * 1536 + 1536), 2 * 8960 * 1536 + 8960 + 1536, 12 * 1536))
    return {"kind": kind, "forward_s": done - loaded, "setup_s": loaded - started, "peak_rss": peak,
            "rss_before": base, "one_block_bytes": block_bytes, "activations_bytes": out.numel() * 4,
            "finite": bool(torch.isfinite(out).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-dir", type=Path, default=Path("/tmp/wan13b-bench"),
                        help="where the teacher is cached (bench_export.py's default: shared with it)")
    parser.add_argument("--latents", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.teacher_dir, args.latents, args.size, args.tokens, args.threads)))
        return
    ensure_teacher(args.teacher_dir, WAN13B, WAN13B_CONFIG)
    print(f"machine: {machine()}; load {loadavg()}")
    rows = {}
    for kind in ("streamed", "in memory"):
        cmd = [sys.executable, __file__, "--child", kind, "--teacher-dir", str(args.teacher_dir), "--latents",
               str(args.latents), "--size", str(args.size), "--tokens", str(args.tokens), "--threads",
               str(args.threads)]
        rows[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    s, m = rows["streamed"], rows["in memory"]
    print(f"{args.latents} latents of {args.size}x{args.size} ({(args.size // 2) ** 2} tokens), context "
          f"{args.tokens} x 4096, fp32, {args.threads} threads, load {loadavg()}")
    print("| forward | wall (forward) | setup | peak RSS |\n|---|---|---|---|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['forward_s']:.1f} s | {r['setup_s']:.1f} s | {r['peak_rss'] / 1e9:.2f} GB |")
    print(f"streamed / in memory wall: {s['forward_s'] / m['forward_s']:.2f}x (target: at most 1.5x)")
    print(f"streamed peak RSS {s['peak_rss'] / 1e9:.2f} GB; the bound: one block ({s['one_block_bytes'] / 1e9:.3f} GB) "
          f"+ the inputs and activations + 0.5 GB, over the {s['rss_before'] / 1e9:.2f} GB the process held before "
          f"(interpreter, torch, inputs); outputs finite: {s['finite']}")


if __name__ == "__main__":
    main()
