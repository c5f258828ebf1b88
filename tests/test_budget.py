"""Bounded work (issue 18): the work a calibration set asks of the teacher is checked against the teacher before any
compute, and refused in one line naming the numbers, through the real CLI in a process with a memory limit; the
memory estimate holds against a measured peak; long work stops on SIGTERM (CLI) and on a cancelled token (core)."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from projection import ProjectionError
from projection.function import budget
from projection.cancel import CancelToken, Cancelled, cancellable, checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO = {"dim": 128, "ffn_dim": 512, "num_heads": 4, "num_layers": 8, "in_dim": 4, "out_dim": 4, "text_dim": 64}
WAN_1_3B = {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30, "in_dim": 16, "out_dim": 16,
            "text_dim": 4096}
WAN_14B = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16,
           "text_dim": 4096}
MEMORY_LIMIT = 3 << 30  # address space of the CLI processes below (RLIMIT_AS)


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    out.pop("THP_MEM_ALLOC_ENABLE", None)
    return out


def sparse_set(path: Path, latents: tuple[int, ...], context: tuple[int, ...]) -> Path:
    """A float16 calibration file of these shapes whose data is a hole (zeros, no disk): the header by hand."""
    sizes = [2 * torch.Size(latents).numel(), 2 * torch.Size(context).numel()]
    header = {"latents": {"dtype": "F16", "shape": list(latents), "data_offsets": [0, sizes[0]]},
              "context": {"dtype": "F16", "shape": list(context), "data_offsets": [sizes[0], sum(sizes)]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + sum(sizes))
    return path


# ------------------------------------------------------------------ the bounds, pure


def test_real_wan_requests_pass_and_each_bound_names_its_numbers():
    # what a Wan user asks: 480p and 720p frames, UMT5 context of 512 x 4096, the app's and the CLI's defaults
    for config, n, (h, w), draws in ((WAN_1_3B, 64, (60, 104), 4), (WAN_1_3B, 16, (90, 160), 4),
                                     (WAN_14B, 16, (60, 104), 2), (WAN_14B, 8, (90, 160), 2), (DEMO, 269, (8, 8), 4)):
        work = budget.check_work("set", (n, config["in_dim"], h, w), (n, 512, config["text_dim"]), config, draws)
        assert work.tokens == (h // 2) * (w // 2) and work.bytes < budget.MAX_WORK_BYTES
    assert budget.micro_batch(WAN_14B, 3600, 512) == 1  # one 720p latent per step on a 14B teacher
    assert budget.micro_batch(DEMO, 16, 16) == budget.MICRO_BATCH

    def refused(*shapes, config=DEMO, draws=4, **kw) -> str:
        with pytest.raises(ProjectionError) as e:
            budget.check_work("set.safetensors", *shapes, config, draws, **kw)
        assert "\n" not in str(e.value) and str(e.value).startswith("set.safetensors: ")
        return str(e.value)

    assert "latents of 2048x2048 are 1,048,576 tokens each" in refused((1, 4, 2048, 2048), (1, 16, 64))
    assert "at most 4,096 tokens per latent" in refused((1, 4, 130, 128), (1, 16, 64))
    assert "context of 4,194,304 x 64 is 268,435,456 values per latent; at most 4,194,304" in refused(
        (1, 4, 8, 8), (1, 1 << 22, 64))
    assert ("80 latents x 8 noise draws x 4,096 tokens is 2,621,440 tokens per teacher block; at most 2,097,152"
            in refused((80, 4, 128, 128), (80, 16, 64), draws=8))
    assert ("512 latents x 64 noise draws x context 2,048 x 64 is 4,294,967,296 context values; at most 2,147,483,648"
            in refused((512, 4, 8, 8), (512, 2048, 64), draws=64))
    message = refused((64, 4, 128, 128), (64, 2048, 64), draws=8, streams=6, models=4)  # as `fidelity` asks
    assert "64 latents of 128x128 x 8 noise draws (4,096 tokens each, context 2,048 x 64) on a teacher of width " \
           "128 would hold about 10.5 GiB" in message and "at most 8.0 GiB" in message
    for draws in (0, -2, 1.5):
        with pytest.raises(ProjectionError, match=f"^noise draws: {draws}; expected a whole number of at least 1$"):
            budget.check_work("set", (1, 4, 8, 8), (1, 16, 64), DEMO, draws)


def test_the_memory_estimate_bounds_a_measured_peak(tmp_path):
    """The teacher's function on 4 latents of 64x64 (1,024 tokens each), 2 draws, in a fresh process: its peak
    resident memory grows by less than the estimate, and the estimate is not wildly loose."""
    script = """
import json, sys, torch
from projection.runtime import setup_runtime
setup_runtime()
torch.set_num_threads(2)
from projection import ProjectionError
from projection.function import budget
from projection.function.fidelity import teacher_reference
from projection.function.forward import StreamedTeacher
from projection.core.models import open_teacher
teacher = StreamedTeacher(open_teacher(sys.argv[1]))
g = torch.Generator().manual_seed(0)
latents, context = torch.randn(4, 4, 64, 64, generator=g), torch.randn(4, 16, 64, generator=g)
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from the current one
before = status("VmRSS")
teacher_reference(teacher, latents, context, draws=2)
grown = status("VmHWM") - before
print(json.dumps([grown, budget.estimate_bytes(latents.shape, context.shape, teacher.teacher.config, 2, models=2)]))
"""
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "projection/demo/demo_assets/teacher-wan")],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown, estimate = json.loads(done.stdout)
    assert 0 < grown <= estimate <= 5 * grown, (grown, estimate)


# ------------------------------------------------------------------ through the CLI, memory-limited

CLI = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
# the peak resident size starts again here: a forked child's ru_maxrss counts the (test) parent's size at the fork
open("/proc/self/clear_refs", "w").write("5")
import projection.function.fidelity, projection.engine.projector, projection.function.calibration  # what `fidelity` imports, before the clock
from projection.cli import main
started = time.perf_counter()
code = main(sys.argv[3:])
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
sys.stdout.write(json.dumps({"code": code, "seconds": seconds, "peak": peak}))
"""


def refused_by_cli(demo_dir: Path, calibration: Path, *extra: str) -> tuple[str, float]:
    """`projection fidelity` on `calibration` in a process limited to MEMORY_LIMIT: its one error line and the
    seconds main() took (the interpreter's start and imports excluded)."""
    argv = ["fidelity", "--teacher", str(demo_dir / "teacher-wan"), "--student", str(demo_dir / "student-wanlite.yaml"),
            "--calibration", str(calibration), *extra]
    done = subprocess.run([sys.executable, "-c", CLI, str(MEMORY_LIMIT), "--", *argv], env=env(), capture_output=True,
                          text=True, timeout=120)
    result = json.loads(done.stdout)
    lines = done.stderr.strip("\n").split("\n")
    assert result["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert result["peak"] < 1 << 30  # nothing close to the limit was ever held
    return lines[0], result["seconds"]


def test_hostile_sets_are_refused_at_once_through_the_cli(demo_dir, tmp_path):
    """The issue's two files and one per request bound, each refused before any teacher compute, with the numbers."""
    big = tmp_path / "latent-4x2048x2048.safetensors"  # 32 MB, ran 14 minutes before
    save_file({"latents": torch.zeros(1, 4, 2048, 2048, dtype=torch.float16),
               "context": torch.zeros(1, 16, 64, dtype=torch.float16)}, str(big))
    cases = [
        (big, (), "latents of 2048x2048 are 1,048,576 tokens each (2x2 patches); the teacher runs at most 4,096"),
        (sparse_set(tmp_path / "context-2^28.safetensors", (1, 4, 8, 8), (1, 1 << 22, 64)), (),  # 512 MB
         "context of 4,194,304 x 64 is 268,435,456 values per latent; at most 4,194,304"),
        (sparse_set(tmp_path / "many-tokens.safetensors", (80, 4, 128, 128), (80, 16, 64)), ("--draws", "8"),
         "80 latents x 8 noise draws x 4,096 tokens is 2,621,440 tokens per teacher block; at most 2,097,152"),
        (sparse_set(tmp_path / "much-context.safetensors", (2049, 4, 2, 2), (2049, 256, 64)), ("--draws", "64"),
         "2,049 latents x 64 noise draws x context 256 x 64 is 2,148,532,224 context values; at most 2,147,483,648"),
        (sparse_set(tmp_path / "many-bytes.safetensors", (64, 4, 128, 128), (64, 2048, 64)), ("--draws", "8"),
         "64 latents of 128x128 x 8 noise draws (4,096 tokens each, context 2,048 x 64) on a teacher of width 128 "
         "would hold about 10.5 GiB"),
    ]
    for path, extra, expected in cases:
        line, seconds = refused_by_cli(demo_dir, path, *extra)
        assert expected in line and str(path) in line, line
        assert seconds < 10, (line, seconds)  # no teacher compute (that would run for minutes)


def test_the_issue_latent_through_python_m_projection(demo_dir, tmp_path):
    """The same refusal through `python -m projection` itself, memory-limited: exit 2, one line, at once."""
    big = tmp_path / "big.safetensors"
    save_file({"latents": torch.zeros(1, 4, 2048, 2048, dtype=torch.float16),
               "context": torch.zeros(1, 16, 64, dtype=torch.float16)}, str(big))

    def limit() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "projection", "fidelity", "--teacher", str(demo_dir / "teacher-wan"),
                           "--student", str(demo_dir / "student-wanlite.yaml"), "--calibration", str(big)],
                          env=env(), capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert time.perf_counter() - started < 60  # the interpreter and torch start; the refusal itself is immediate
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "1,048,576 tokens each" in done.stderr, done.stderr


# ------------------------------------------------------------------ stopping


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sigterm_stops_a_long_fidelity_at_once(demo_dir, tmp_path):
    """A measurement within every bound that runs for minutes on the demo teacher (4 latents of 128x128, 4,096
    tokens each): SIGTERM once it computes ends it within seconds, with one line and exit 143."""
    slow = tmp_path / "slow.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(4, 4, 128, 128, generator=g).half(),
               "context": torch.randn(4, 16, 64, generator=g).half()}, str(slow))
    proc = subprocess.Popen([sys.executable, "-m", "projection", "fidelity", "--teacher", str(demo_dir / "teacher-wan"),
                             "--student", str(demo_dir / "student-wanlite.yaml"), "--calibration", str(slow)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while cpu_seconds(proc.pid) < 8 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # started, imported, and computing for a few seconds
        assert proc.poll() is None, proc.communicate()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - started
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and out == ""
    assert err == "stopped: SIGTERM (exit 143); the command did not finish\n", err
    assert stopped < 5, stopped


def test_a_cancelled_token_stops_the_teacher_between_blocks(demo_dir):
    """The core's loops check the token of the work they run for: cancelled after the first teacher block, a
    collection of activation statistics stops before the next block, with `Cancelled` naming why; work without a
    token, or under another token, is untouched."""
    from projection.function.activations import collect
    from projection.demo.teacher import demo_calibration
    from projection.core.models import open_teacher

    teacher, calibration = open_teacher(str(demo_dir / "teacher-wan")), demo_calibration().subset(32)
    token, seen = CancelToken(), []

    def progress(block: int, n: int, what: str) -> None:
        seen.append(block)
        token.cancel("its client went away")

    with cancellable(token), pytest.raises(Cancelled, match="^stopped: its client went away$"):
        collect(teacher, calibration, progress=progress)
    assert seen == [0] and token.join(0)  # one block ran; the token's work has ended
    checkpoint()  # outside the token: nothing to stop
    other = CancelToken()
    results = []
    thread = threading.Thread(target=lambda: results.append(collect(teacher, calibration).influence))
    with cancellable(other):
        other.cancel("another request")
        thread.start()  # a thread started here does not inherit this context's token
        thread.join()
    assert len(results) == 1 and len(results[0]) == 8
