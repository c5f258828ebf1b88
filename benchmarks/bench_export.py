"""Export benchmark: a Wan2.1-1.3B-shaped teacher (fp32, 5.7 GB, random) into a 1024-wide, 16-block student.

Three ways to get the student, each in a fresh subprocess so its peak RSS is its own:

- streaming: `Projector.open` + `export_student`, with the default strategy (magnitude ranking reads every
  needed teacher tensor twice: once for statistics, once to project) and with index-only "first" ranking (once);
- naive: load the whole teacher state dict (`safetensors.torch.load_file`), then project the same way from memory;
- read: plain positioned reads of just the teacher bytes the student needs (the floor the export is held to),
  and of the whole teacher file (the floor of the naive path).

The teacher is written once, tensor by tensor (never whole in memory), and reused from --teacher-dir. Runs are
cold (the teacher file's pages evicted from the page cache before each run; the interpreter's and torch's own
files stay cached, as they are for a user) and/or warm (the teacher file read into the page cache first).

    python benchmarks/bench_export.py [--teacher-dir D] [--out D] [--small] [--cache cold|warm|both] [--repeat N]

Targets: streaming peak RSS < 1.5 GB; streaming wall time within 2x of reading the needed bytes.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file

from projection import Projector, Strategy, export_student, open_checkpoint, open_student
from projection.arch.anatomy import wan_tensors
from projection.core.models import view_checkpoint
from projection.errors import ProjectionError
from projection.io.checkpoint import Checkpoint, read_safetensors_header
from projection.runtime import setup_runtime

GB = 1e9  # decimal, as the targets and the 5.7 GB teacher size are stated
RESULT_TAG = "BENCH-RESULT "

WAN13B = {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30, "in_dim": 16, "out_dim": 16,
          "text_dim": 4096, "freq_dim": 256}
# config.json exactly as Wan2.1-T2V-1.3B ships it (text_dim is not in it: the mapper reads it from the shapes).
WAN13B_CONFIG = {"_class_name": "WanModel", "dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30,
                 "in_dim": 16, "out_dim": 16, "freq_dim": 256, "text_len": 512, "eps": 1e-06, "model_type": "t2v"}
STUDENT = {"dim": 1024, "num_layers": 16, "num_heads": 8, "ffn_dim": 4096}

# --small: a quick smoke check of the whole harness (same head dim 128, so the same mapping code paths).
SMALL = {"dim": 256, "ffn_dim": 1024, "num_heads": 2, "num_layers": 6, "in_dim": 16, "out_dim": 16,
         "text_dim": 512, "freq_dim": 256}
SMALL_CONFIG = {"_class_name": "WanModel", **SMALL, "text_len": 512, "eps": 1e-06, "model_type": "t2v"}
SMALL_STUDENT = {"dim": 128, "num_layers": 3, "num_heads": 1, "ffn_dim": 512}

STRATEGIES: dict[str, dict[str, str]] = {
    "magnitude": {},  # the default Strategy()
    "first": {"width": "first", "heads": "first", "ffn": "first", "head_dim": "first"},  # index-only, one pass
}
# (label, child kind, strategy); the read floors come first so every ratio has its denominator.
RUNS: list[tuple[str, str, str]] = [
    ("read: needed teacher bytes", "read-needed", ""),
    ("read: whole teacher file", "read-all", ""),
    ("streaming export, magnitude (default)", "stream", "magnitude"),
    ("streaming export, first (index-only)", "stream", "first"),
    ("naive: load_file + project, magnitude", "naive", "magnitude"),
    ("naive: load_file + project, first", "naive", "first"),
]
TEACHER_FILE = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------- the teacher file

def teacher_header(config: dict[str, int]) -> tuple[dict[str, Any], int]:
    """The safetensors header of a Wan teacher (825 keys for 1.3B, state-dict order) and its data size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (shape, _) in wan_tensors(config).items():  # T2V keys only: no k_img / v_img / norm_k_img
        n = math.prod(shape) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    return header, offset


def encoded_header(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned


def teacher_is_valid(folder: Path, config: dict[str, int], config_json: dict[str, Any]) -> bool:
    path = folder / TEACHER_FILE
    if not path.is_file() or not (folder / "config.json").is_file():
        return False
    expected, data_bytes = teacher_header(config)
    expected.pop("__metadata__")
    try:
        found, start = read_safetensors_header(path)
        saved = json.loads((folder / "config.json").read_text())
    except (ProjectionError, ValueError, OSError):
        return False
    return found == expected and path.stat().st_size == start + data_bytes and saved == config_json


def ensure_teacher(folder: Path, config: dict[str, int], config_json: dict[str, Any]) -> None:
    """Write the random fp32 teacher once, one tensor at a time (at most one tensor, ~56 MB, in memory)."""
    if teacher_is_valid(folder, config, config_json):
        print(f"teacher: reusing {folder / TEACHER_FILE}")
        return
    folder.mkdir(parents=True, exist_ok=True)
    header, data_bytes = teacher_header(config)
    raw = encoded_header(header)
    tmp = folder / f".{TEACHER_FILE}.partial"
    print(f"teacher: writing {data_bytes / GB:.2f} GB to {folder / TEACHER_FILE} ...", flush=True)
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            t = torch.randn(meta["shape"], generator=gen, dtype=torch.float32)
            f.write(t.numpy().data)  # a view of the tensor's memory: no extra copy
        f.flush()
        os.fsync(f.fileno())  # clean pages, so dropping the page cache really evicts them
    tmp.replace(folder / TEACHER_FILE)
    (folder / "config.json").write_text(json.dumps(config_json, indent=1))
    print(f"teacher: written in {time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------- measurements (run in the child)

@dataclass
class Result:
    kind: str
    strategy: str
    wall_s: float
    peak_rss: int  # bytes, VmHWM
    start_rss: int  # bytes, VmRSS after imports, before the measured work
    teacher_bytes: int  # Checkpoint.bytes_read (bytes returned by get()), or bytes read by the plain reader
    os_read_bytes: int  # /proc/self/io read_bytes: what this process made the block layer read
    os_rchar: int  # /proc/self/io rchar: bytes through read() syscalls (page-cache hits included, mmap excluded)
    extra: dict[str, Any] = field(default_factory=dict)


def proc_status_bytes(field_name: str) -> int:
    """VmHWM / VmRSS of this process, in bytes (per address space, so unaffected by the parent before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def proc_io() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_heap() -> dict[str, int]:
    """glibc main-arena counters: heap size, bytes in use, and bytes freed but still held (they count in RSS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return {}
    return {"heap": info.arena, "in_use": info.uordblks, "free_held": info.fordblks, "mmapped": info.hblkhd}


def needed_ranges(teacher_dir: Path, student: dict[str, Any]) -> list[tuple[int, int]]:
    """(offset, nbytes) of every teacher tensor some student entry reads, in file order (headers only)."""
    p = Projector.open(str(teacher_dir), student)
    keys = {part.native_key for e in p.mapping().entries if e.status != "skipped" for part in e.parts}
    infos = [p.teacher.checkpoint.tensors[k] for k in keys]
    return sorted((i.offset, i.nbytes) for i in infos)


def read_ranges(path: Path, ranges: list[tuple[int, int]]) -> int:
    """Positioned reads into one reused buffer: the cost of getting these bytes off the file, nothing else."""
    buf = memoryview(bytearray(max(n for _, n in ranges)))
    total = 0
    with open(path, "rb", buffering=0) as f:
        for offset, n in ranges:
            got = os.preadv(f.fileno(), [buf[:n]], offset)
            if got != n:
                raise RuntimeError(f"{path}: short read at {offset} ({got} of {n} bytes)")
            total += got
    return total


@dataclass
class InMemoryCheckpoint(Checkpoint):
    """The lazy checkpoint's metadata over a fully loaded state dict: get() is a dict lookup, still counted."""

    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def get(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        self.bytes_read += info.nbytes
        return self.state[info.raw_key]


def run_child(kind: str, strategy_name: str, teacher_dir: Path, out: Path, student: dict[str, Any]) -> Result:
    setup_runtime()  # as the `projection` CLI does: huge pages, large buffers returned to the OS
    path = teacher_dir / TEACHER_FILE
    strategy = Strategy(**STRATEGIES[strategy_name]) if strategy_name else Strategy()
    extra: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    ranges: list[tuple[int, int]] = []
    if kind == "read-needed":
        ranges = needed_ranges(teacher_dir, student)
        extra["tensors"] = len(ranges)
    elif kind == "read-all":  # the whole file in 64 MiB pieces
        size = path.stat().st_size
        ranges = [(o, min(64 << 20, size - o)) for o in range(0, size, 64 << 20)]
    start_rss, io0 = proc_status_bytes("VmRSS"), proc_io()
    t0 = time.perf_counter()
    if kind.startswith("read-"):
        teacher_bytes = read_ranges(path, ranges)
    elif kind == "stream":
        p = Projector.open(str(teacher_dir), student, strategy=strategy)
        report = export_student(p, out)
        teacher_bytes = p.teacher.checkpoint.bytes_read
        extra["report_seconds"] = report["provenance"]["seconds"]
    elif kind == "naive":
        lazy = open_checkpoint(teacher_dir)
        # The whole teacher state dict. safetensors >= 0.4 backs it with a private mmap of the file: pages
        # fault in (and count as RssFile) as tensors are touched, so only the needed tensors become resident.
        state = load_file(str(path))
        extra["load_file_s"] = time.perf_counter() - t0
        ckpt = InMemoryCheckpoint(lazy.source, lazy.format, lazy.files, lazy.tensors, lazy.config, state=state)
        teacher = view_checkpoint(ckpt)
        p = Projector(teacher, open_student(student, teacher), strategy)
        export_student(p, out)
        teacher_bytes = sum(t.numel() * t.element_size() for t in state.values())
        extra["projector_bytes_read"] = ckpt.bytes_read  # bytes handed to the projector (from memory)
    else:
        raise ValueError(kind)
    wall = time.perf_counter() - t0
    io1 = proc_io()
    extra["glibc_heap_at_end"] = glibc_heap()
    if out.exists():
        extra["student_file_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    return Result(kind, strategy_name, wall, proc_status_bytes("VmHWM"), start_rss, teacher_bytes,
                  io1["read_bytes"] - io0["read_bytes"], io1["rchar"] - io0["rchar"], extra)


# ---------------------------------------------------------------- the parent: orchestration and report

def evict_from_page_cache(path: Path) -> None:
    """Drop one file's pages from the OS page cache (clean pages: the teacher was fsync'ed when written)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: Path) -> None:
    buf = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return (f"{model}, {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM; Linux {platform.release()}; "
            f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"safetensors {safetensors.__version__}")


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def measure(kind: str, strategy: str, teacher_dir: Path, out: Path, student: dict[str, Any]) -> Result:
    cmd = [sys.executable, __file__, "--child", kind, "--strategy", strategy, "--teacher-dir", str(teacher_dir),
           "--out", str(out), "--student", json.dumps(student)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)  # the exported student: measured, not kept
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child '{kind} {strategy}' failed with exit code {proc.returncode}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_TAG))
    return Result(**json.loads(line[len(RESULT_TAG):]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-dir", type=Path, default=None,
                        help="where the teacher is cached (default /tmp/wan13b-bench, --small: /tmp/wan-bench-small)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-export-out"),
                        help="scratch folder for the exported students (removed after each run)")
    parser.add_argument("--small", action="store_true", help="a tiny teacher and student: a quick smoke check")
    parser.add_argument("--cache", choices=("cold", "warm", "both"), default="both",
                        help="cold: the teacher file evicted from the page cache before each run; warm: read first")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the table shows the fastest")
    parser.add_argument("--layout", default="diffusers", choices=("diffusers", "wan", "wanlite", "seed"),
                        help="the student's layout (what the export writes; default: the default layout)")
    parser.add_argument("--only", default="", help="comma-separated child kinds to run (read-needed is always run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="", help=argparse.SUPPRESS)
    parser.add_argument("--student", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    teacher_dir = args.teacher_dir or Path("/tmp/wan-bench-small" if args.small else "/tmp/wan13b-bench")

    if args.child:  # measured in a fresh process: print one result line for the parent
        result = run_child(args.child, args.strategy, teacher_dir, args.out, json.loads(args.student))
        print(RESULT_TAG + json.dumps(asdict(result)), flush=True)
        return

    config, config_json, student = (SMALL, SMALL_CONFIG, SMALL_STUDENT) if args.small else \
        (WAN13B, WAN13B_CONFIG, STUDENT)
    student = {"layout": args.layout, **student}
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine()}")
    print(f"load average at start (1/5/15 min): {loadavg()}")
    ensure_teacher(teacher_dir, config, config_json)
    teacher_bytes = (teacher_dir / TEACHER_FILE).stat().st_size
    print(f"teacher: {teacher_dir / TEACHER_FILE} ({teacher_bytes / GB:.3f} GB); student: {json.dumps(student)}")
    if args.out.resolve() == teacher_dir.resolve() or teacher_dir.resolve() in args.out.resolve().parents:
        raise SystemExit("--out must not be inside the teacher folder")

    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    only = set(filter(None, args.only.split(","))) | {"read-needed"} if args.only else None
    rows: list[tuple[str, str, Result, str]] = []
    for cache in caches:
        for label, kind, strategy in RUNS:
            if only is not None and kind not in only:
                continue
            best: Result | None = None
            peak, walls = 0, []
            for _ in range(args.repeat):
                if cache == "cold":
                    evict_from_page_cache(teacher_dir / TEACHER_FILE)
                else:
                    warm_page_cache(teacher_dir / TEACHER_FILE)
                load = loadavg()
                r = measure(kind, strategy, teacher_dir, args.out / f"student-{kind}-{strategy or 'none'}", student)
                peak = max(peak, r.peak_rss)
                walls.append(r.wall_s)
                heap = r.extra.get("glibc_heap_at_end") or {}
                held = f", glibc heap free-but-held at end {heap['free_held'] / GB:.3f} GB" if heap else ""
                print(f"  [{cache}] {label}: {r.wall_s:.2f} s, peak RSS {r.peak_rss / GB:.3f} GB{held}, load {load}",
                      flush=True)
                if best is None or r.wall_s < best.wall_s:
                    best, best_load = r, load
            assert best is not None
            best.peak_rss = peak
            best.extra["median_wall_s"] = statistics.median(walls)
            rows.append((label, cache, best, best_load))
    try:
        args.out.rmdir()
    except OSError:
        pass
    report(rows)
    print(f"load average at end (1/5/15 min): {loadavg()}")


def report(rows: list[tuple[str, str, Result, str]]) -> None:
    floor = {cache: r for _, cache, r, _ in rows if r.kind == "read-needed"}
    print()
    print("| path | cache | wall s (best) | wall s (median) | peak RSS GB | teacher bytes read GB | OS read_bytes GB "
          "| rchar GB | vs needed-bytes read time (best / median) | load avg 1/5/15 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, cache, r, load in rows:
        median, base = r.extra["median_wall_s"], floor[cache]
        print(f"| {label} | {cache} | {r.wall_s:.2f} | {median:.2f} | {r.peak_rss / GB:.3f} "
              f"| {r.teacher_bytes / GB:.3f} "
              f"| {r.os_read_bytes / GB:.3f} | {r.os_rchar / GB:.3f} | {r.wall_s / base.wall_s:.2f}x / "
              f"{median / base.extra['median_wall_s']:.2f}x | {load} |")
    print()
    print("GB = 1e9 bytes. peak RSS: VmHWM of the run's own process (includes ~"
          f"{min(r.start_rss for _, _, r, _ in rows) / GB:.2f} GB of interpreter + torch after imports). "
          "teacher bytes read: Checkpoint.bytes_read for streaming (bytes returned by get()), the state dict's "
          "size for naive, bytes read for the read floors. The naive state dict is mmap-backed "
          "(safetensors.torch.load_file): its RSS counts the touched file pages, not a private copy.")
    for label, cache, r, _ in rows:
        if r.kind != "stream":
            continue
        rss_ok = r.peak_rss < 1.5 * GB
        time_ok = r.wall_s <= 2 * floor[cache].wall_s
        print(f"target [{cache}] {label}: peak RSS {r.peak_rss / GB:.3f} GB < 1.5 GB: {'MET' if rss_ok else 'MISSED'}; "
              f"best wall {r.wall_s:.2f} s <= 2 x {floor[cache].wall_s:.2f} s: {'MET' if time_ok else 'MISSED'}")


if __name__ == "__main__":
    main()
