"""Every CUDA path against the CPU, and what a Wan 14B teacher costs per block on the GPU: one short run.

    python benchmarks/gpu_check.py [--out DIR]            # the full check: under 8 minutes on one GPU
    python benchmarks/gpu_check.py --quick [--out DIR]    # fewer and smaller scale measurements: under 3 minutes
    python benchmarks/gpu_check.py --device cpu --tiny    # every path on the CPU at tiny shapes (the test suite)

Needs the repository checkout and a Python with torch (CUDA build), safetensors, pydantic and pyyaml; no network
and no hub (diffusers is optional: without it the small diffusers-format teacher is written by this project's
own writer, and the `projection calibrate` check, which needs diffusers, transformers, tokenizers and Pillow, is
recorded as skipped with the reason: ok null and a "skipped" field, not a failure). It writes
`DIR/gpu_check.json`, one JSON object per line, flushed as each check ends (a run killed by a timeout keeps what it
measured), prints a summary table, and exits 1 if any check failed. Every check is independent: one that raises
records its error and the run goes on.

Each line: {"check", "device", "metric", "value", "tolerance", "ok", ...details}.

**Exactness** (on the demo teacher, in both formats, and on a small random diffusers-format teacher): each CUDA
path against the same path on the CPU, float32. `relsq` is sum |a - b|^2 / sum |b|^2 (b: the CPU's).

| check | compares | tolerance |
|---|---|---|
| forward/T | `StreamedTeacher(device=)`: every block's output (`on_block`) and the velocity; max relsq | 1e-8 |
| forward-tf32/T | the same with cuDNN's default TF32 convolutions (the library's own setting) | 1e-4 |
| activations/T | `activations.collect(device=)`: every score tensor and the influence; max relsq | 1e-8 |
| removal/T | `activations.removal_effects(device=)`: each block's removal effect on the output; relsq | 1e-8 |
| spectra/T | `spectra.batched_singular_values(device=)` of every teacher matrix (float32 on a GPU, as the | 1e-8 |
|  | app computes them) against the CPU's float64; max relsq |  |
| fit/T | `fit: least-squares` (`export.projected_student(device=)`: the fit in float64 on the device); | 1e-8 |
|  | max relsq of every fitted student tensor |  |
| fidelity/T | `fidelity.student_fidelity(device=)`: every reported error and cosine (overall, per noise band, | 1e-5 |
|  | per block); max abs(a - b) / max(abs(b), 1e-3) |  |
| export/T/DTYPE | `projection export --device cuda --dtype DTYPE` (the CLI, in process) against `--device cpu`: | 0 |
|  | same keys and dtypes; max abs difference of every tensor (selection only: bit-identical) |  |
| load_student/T/DTYPE | `student.load_student(device="cuda")` of the CPU export against loading it on the CPU: | 0 |
|  | max abs weight difference |  |
| student_forward/T/DTYPE | that student's velocity on the device against the CPU's; relsq | 1e-8; bf16 3e-3 |
| calibrate/tiny-pipeline | `projection calibrate --device cuda --dtype float32` (the CLI, in process) against | 1e-8; |
|  | `--device cpu`, on a tiny random diffusers Wan pipeline (AutoencoderKLWan z_dim 4, 8x; a one-layer | lengths |
|  | UMT5 of width 24; a word-level tokenizer) and 4 captioned images of 32x48 (one a larger jpg, resized | equal |
|  | and cropped): max relsq of latents and context; context_lengths equal |  |

How the tolerances were chosen (CPU, this script's sets): float32 against float64 (`StreamedTeacher(dtype=
torch.float64)`) differs by relsq 1e-13 on the demo teacher (every line records its own `cpu_float32_vs_float64`),
so 1e-8 leaves five orders of magnitude for another float32 implementation while an indexing or placement bug gives
1e-3..1; float32 singular values (a GPU's spectra) against float64 differ by relsq 1e-13 too. The fitted weights
move by relsq 4e-11 and the fidelity numbers by 3e-7 (relative) when the calibration inputs are perturbed by half a
float32 ulp. The patch embedding is a Conv2d: cuDNN runs float32 convolutions in TF32 by default on Ampere and
later (10-bit mantissa); emulated on the CPU (its inputs and weights rounded to TF32) that moves the demo teacher's
velocity by relsq 1.8e-6 (blocks: 3e-8..8e-8), hence 1e-4 for forward-tf32, and every other exactness check runs
with TF32 off (`torch.backends.cudnn.allow_tf32 = False`; matmuls: off, torch's default) so that it compares
float32 with float32. bfloat16 students: the CPU's own bfloat16 forward differs from its float32 one by relsq
2e-5..3e-5 (each line records its `cpu_bf16_vs_float32`); two bfloat16 implementations (the GPU's flash attention
rounds its probabilities to bfloat16) may differ by several times that, an indexing bug by ~1.
`projection calibrate` on the tiny pipeline: its CPU float32 set against the same pipeline math with the VAE and
the text encoder in float64 differs by relsq 1.9e-14 (latents) and 2.3e-14 (context), so 1e-8 as for the other
float32 paths; it runs with TF32 off like them, and on CUDA the line also records, for information only, the
relsq with cuDNN's default TF32 convolutions (the VAE is all convolutions; `tf32_convolutions_relsq`). The probe
step that the issue also names does not exist yet (issue 24): it has no check here.

On `--device cpu` the exactness checks compare the CPU with itself: they cannot fail on numbers there, but every
code path runs, so the script cannot rot.

**Scale**: a Wan 14B-shaped teacher (dim 5120, 40 heads of 128, FFN 13824, text 4096, freq 256, in/out 16, patch
[5120, 16, 1, 2, 2]) with random bfloat16 weights, written by this script in Wan's original format, sharded like
Wan's release (one safetensors shard per block and one for the embeddings and head, plus the index), generated
on the device one shard at a time. Only `--blocks` blocks are written (config num_layers = that number): the
embeddings and head are 0.47 GB and each block 0.70 GB, so 3 blocks (the default) are 2.57 GB on disk, 1 block
(--quick) 1.17 GB; all 40 would be 28.6 GB, the size of one Wan 2.2 A14B expert in bfloat16. Its
pages are evicted from the page cache before each measurement (cold reads, as a 28.6 GB expert meets the tool).
Per block: the time (read + compute) and peak GPU memory (`torch.cuda.max_memory_allocated`, reset per block) of
the streamed forward on 8 latents of 60x104 (a 480x832 frame) and of 30x52, with a 512-token UMT5-width context;
the activation statistics pass; the least-squares fit of one block into a 1.3B-shaped student; the export of a
1.3B-shaped student (dim 1536, 12 heads, FFN 8960, num_layers = blocks written). Each is extrapolated to 40
blocks and 512 latents; the formula is printed with its numbers. A "latent" there is one sample the forward runs:
a calibration set of N latents with D noise draws is N * D of them. The streamed forward keeps every sample's
embedded tokens, residual stream and embedded context on the device between blocks, so its device memory grows
with the samples (measured per sample as `held_bytes_per_latent`), while the weights are one block at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from projection.runtime import setup_runtime  # noqa: E402

setup_runtime()  # as the `projection` CLI does, before torch's first allocation

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from projection import Projector, Strategy  # noqa: E402
from projection.arch.anatomy import template_of, wan_tensors  # noqa: E402
from projection.cli import main as cli_main  # noqa: E402
from projection.core.models import open_teacher  # noqa: E402
from projection.core.spectra import batched_singular_values  # noqa: E402
from projection.demo.folder import STUDENTS  # noqa: E402
from projection.demo.teacher import ASSETS, demo_calibration, save_teacher  # noqa: E402
from projection.engine.build import load_student, projected_student  # noqa: E402
from projection.engine.export import export_student  # noqa: E402
from projection.engine.report import student_fidelity  # noqa: E402
from projection.function.activations import collect, removal_effects  # noqa: E402
from projection.function.calibration import Calibration, load_calibration, synthetic_calibration  # noqa: E402
from projection.function.fit import fit_student  # noqa: E402
from projection.function.forward import StreamedTeacher, predict  # noqa: E402
from projection.function.noise import noised_set  # noqa: E402

GB = 1e9
TOL_FLOAT32 = 1e-8
TOL_TF32 = 1e-4
TOL_FIDELITY = 1e-5
TOL_BF16 = 3e-3
FULL_BUDGET_S, QUICK_BUDGET_S, TINY_BUDGET_S = 480, 180, 240  # the whole run, on one GPU (tiny: on the CPU)
LAST_WORDS = 4000  # characters of a failed check's traceback kept in its line

WAN14B = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "in_dim": 16, "out_dim": 16, "text_dim": 4096,
          "freq_dim": 256}
STUDENT13B = {"layout": "wanlite", "dim": 1536, "num_heads": 12, "ffn_dim": 8960}
TINY_SCALE = {"dim": 256, "ffn_dim": 512, "num_heads": 4, "in_dim": 16, "out_dim": 16, "text_dim": 64,
              "freq_dim": 256}
TINY_STUDENT = {"layout": "wanlite", "dim": 128, "num_heads": 2, "ffn_dim": 256}
TARGET_BLOCKS, TARGET_LATENTS, STUDENT_BLOCKS = 40, 512, 30  # extrapolated to: Wan 14B, a calibration set, 1.3B
# The small random diffusers-format teacher (tests/conftest.py's TINY, written with diffusers when it is there).
RANDOM_TEACHER = {"dim": 64, "num_heads": 2, "ffn_dim": 48, "num_layers": 3, "in_dim": 4, "out_dim": 4,
                  "text_dim": 24, "freq_dim": 16}
RANDOM_STUDENT = {"layout": "wanlite", "dim": 32, "num_heads": 1, "ffn_dim": 24, "num_layers": 2}


# ---------------------------------------------------------------- recording

class Recorder:
    """One JSON line per check, flushed at once; a summary table at the end."""

    def __init__(self, path: Path, device: str):
        self.path, self.device, self.rows = path, device, []
        self.file = open(path, "w", encoding="utf-8")

    def record(self, check: str, metric: str, value: Any, tolerance: Any, ok: bool | None, **details: Any) -> dict:
        row = {"check": check, "device": self.device, "metric": metric, "value": value, "tolerance": tolerance,
               "ok": ok, **details}
        self.rows.append(row)
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        mark = {True: "ok", False: "FAIL", None: "skip"}[ok]
        print(f"[{mark:>4}] {check}: {metric} = {_short(value)} (tolerance {_short(tolerance)})"
              + (f"  {details['error']}" if "error" in details else "")
              + (f"  skipped: {details['skipped']}" if "skipped" in details else ""), flush=True)
        return row

    def run(self, check: str, metric: str, fn: Callable[[], dict]) -> dict:
        """`fn()` returns {"value", "tolerance", "ok", ...details}; an exception is recorded as a failure."""
        started = time.perf_counter()
        try:
            found = fn()
        except Exception as exc:  # noqa: BLE001 - every check is independent: record and go on
            empty_cache()
            return self.record(check, metric, None, None, False, seconds=round(time.perf_counter() - started, 3),
                               error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                               traceback=traceback.format_exc()[-LAST_WORDS:])
        found.setdefault("seconds", round(time.perf_counter() - started, 3))
        return self.record(check, metric, found.pop("value"), found.pop("tolerance"), found.pop("ok"), **found)

    def summary(self) -> str:
        rows = [(r["check"], r["metric"], _short(r["value"]), _short(r["tolerance"]),
                 {True: "ok", False: "FAIL", None: "skip"}[r["ok"]]) for r in self.rows]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("check", "metric", "value",
                                                                                  "tolerance", "ok"))]
        widths[1] = min(widths[1], 60)
        line = "  ".join("{:<%d}" % w for w in widths)
        out = [line.format("check", "metric", "value", "tolerance", "ok"), line.format(*("-" * w for w in widths))]
        out += [line.format(c, m[:60], v, t, ok) for c, m, v, t, ok in rows]
        return "\n".join(out)

    def close(self) -> None:
        self.file.close()


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (dict, list)):
        return "(see json)"
    return str(v)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def relsq(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a - b|^2 / sum |b|^2 in float64 (b: the reference); 0 for two zero tensors."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.pow(2).sum().item()
    num = (a - b).pow(2).sum().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


@contextlib.contextmanager
def tf32_convolutions(on: bool):
    """cuDNN's TF32 for float32 convolutions (torch's default: on) for the duration; matmuls stay as they are."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tf32_default": {"cudnn_conv": torch.backends.cudnn.allow_tf32,
                             "matmul": torch.backends.cuda.matmul.allow_tf32}}
    for package in ("diffusers", "safetensors"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        try:
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
        except Exception as exc:  # noqa: BLE001 - the checks will say what works
            info["gpu_error"] = f"{type(exc).__name__}: {exc}"
    return info


# ---------------------------------------------------------------- exactness: teachers and their sets

@dataclass
class Subject:
    """A teacher to check, the student projected from it, and the calibration set the checks run on."""
    name: str
    path: Path
    student: dict
    student_file: Path
    calibration: Calibration
    draws: int


def random_diffusers_teacher(folder: Path) -> tuple[Path, str]:
    """A small random Wan in the diffusers format: diffusers' WanTransformer3DModel and save_pretrained when
    diffusers is installed (as tests/conftest.py builds it), else the same layout by this project's writer."""
    cfg = RANDOM_TEACHER
    try:
        from diffusers import WanTransformer3DModel
    except Exception:  # noqa: BLE001 - not installed, or not importable with this torch: our own writer
        WanTransformer3DModel = None
    if WanTransformer3DModel is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=cfg["num_heads"],
                attention_head_dim=cfg["dim"] // cfg["num_heads"], in_channels=cfg["in_dim"],
                out_channels=cfg["out_dim"], text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
                ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64).eval()
            with torch.no_grad():  # diffusers zero-inits some tensors; give every weight a distinct value
                for p in model.parameters():
                    p.normal_(0, 0.2)
        model.save_pretrained(folder, max_shard_size="60KB")
        return folder, "diffusers WanTransformer3DModel.save_pretrained"
    g = torch.Generator().manual_seed(0)
    state = {k: (0.2 * torch.randn(shape, generator=g)).contiguous()
             for k, (shape, _) in wan_tensors(cfg).items()}
    save_teacher(state, cfg, folder / "original", folder)
    shutil.rmtree(folder / "original")
    return folder, "projection.demo.teacher.save_teacher (diffusers not installed)"


def set_size(tiny: bool, quick: bool) -> tuple[int, int]:
    """(latents, noise draws per latent) of the exactness sets."""
    return (8, 1) if tiny else (16, 2) if quick else (32, 2)


def demo_subjects(work: Path, tiny: bool, quick: bool) -> list[Subject]:
    n, draws = set_size(tiny, quick)
    cal = demo_calibration().subset(n)
    student = work / "student-demo.json"
    student.write_text(json.dumps(STUDENTS["student-wanlite.yaml"]))
    folders = {"demo-wan": ASSETS / "teacher-wan", "demo-diffusers": ASSETS / "teacher-diffusers"}
    return [Subject(name, folder, STUDENTS["student-wanlite.yaml"], student, cal, draws)
            for name, folder in folders.items()]


def random_subject(work: Path, tiny: bool, quick: bool) -> tuple[Subject, str]:
    n, draws = set_size(tiny, quick)
    folder, how = random_diffusers_teacher(work / "random-diffusers")
    student = work / "student-random.json"
    student.write_text(json.dumps(RANDOM_STUDENT))
    cal = synthetic_calibration(RANDOM_TEACHER, n=n, size=(8, 8), tokens=8)
    return Subject("random-diffusers", folder, RANDOM_STUDENT, student, cal, draws), how


def device_of(model: torch.nn.Module) -> str:
    return next(model.parameters()).device.type


def check_forward(s: Subject, device: str, tf32: bool) -> dict:
    teacher = open_teacher(str(s.path))
    x, t, ctx = noised_set(s.calibration.latents, s.calibration.context, s.draws)

    def run(where: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        outs: dict[int, list[torch.Tensor]] = {}
        ran_on = set()

        def on_block(i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
            ran_on.add(x_out.device.type)
            outs.setdefault(i, []).append(x_out.detach().double().cpu())

        v = StreamedTeacher(teacher, where, dtype=dtype)(x, t, ctx, on_block)
        if ran_on != {torch.device(where).type}:
            raise RuntimeError(f"blocks ran on {sorted(ran_on)}, not {where}")
        return v.double(), {i: torch.cat(o) for i, o in outs.items()}

    v_ref, b_ref = run("cpu")
    with tf32_convolutions(tf32):
        v_dev, b_dev = run(device)
    v64, b64 = run("cpu", torch.float64)
    errors = {**{f"block {i}": relsq(b_dev[i], b_ref[i]) for i in b_ref}, "velocity": relsq(v_dev, v_ref)}
    rounding = max([relsq(b_ref[i], b64[i]) for i in b64] + [relsq(v_ref, v64)])
    value = max(errors.values())
    tol = TOL_TF32 if tf32 else TOL_FLOAT32
    return {"value": value, "tolerance": tol, "ok": value <= tol and len(b_dev) == len(b_ref) > 0,
            "per_output": errors, "cpu_float32_vs_float64": rounding, "samples": len(x),
            "blocks": len(b_ref), "tf32_convolutions": tf32}


def check_activations(s: Subject, device: str) -> dict:
    teacher = open_teacher(str(s.path))
    ref = collect(teacher, s.calibration, s.draws, device="cpu")
    dev = collect(teacher, s.calibration, s.draws, device=device)
    if set(ref.scores) != set(dev.scores):
        raise RuntimeError(f"score keys differ: {sorted(set(ref.scores) ^ set(dev.scores))[:4]}")
    errors = {f"{space}/{'global' if b is None else b}": relsq(dev.scores[(space, b)], ref.scores[(space, b)])
              for space, b in ref.scores}
    errors["influence"] = relsq(torch.tensor(dev.influence), torch.tensor(ref.influence))
    worst = max(errors, key=errors.get)
    value = errors[worst]
    return {"value": value, "tolerance": TOL_FLOAT32, "ok": value <= TOL_FLOAT32, "worst": worst,
            "tensors": len(errors)}


def check_removal(s: Subject, device: str) -> dict:
    teacher = open_teacher(str(s.path))
    ref = torch.tensor(removal_effects(teacher, s.calibration, s.draws, device="cpu"))
    dev = torch.tensor(removal_effects(teacher, s.calibration, s.draws, device=device))
    value = relsq(dev, ref)
    return {"value": value, "tolerance": TOL_FLOAT32, "ok": value <= TOL_FLOAT32 and len(dev) == len(ref) > 0,
            "blocks": len(ref)}


def check_spectra(s: Subject, device: str) -> dict:
    teacher = open_teacher(str(s.path))
    keys = [k for k, shape in teacher.shapes.items() if len(shape) >= 2]
    tensors = [teacher.read(k) for k in keys]
    ref = batched_singular_values(tensors, torch.device("cpu"))  # float64 on the CPU
    dev = batched_singular_values(tensors, torch.device(device))  # float32 on a GPU, as the app computes them
    errors = {k: relsq(d, r) for k, d, r in zip(keys, dev, ref)}
    worst = max(errors, key=errors.get)
    value = errors[worst]
    return {"value": value, "tolerance": TOL_FLOAT32, "ok": value <= TOL_FLOAT32, "worst": worst,
            "matrices": len(keys)}


def check_fit(s: Subject, device: str) -> dict:
    def fitted(where: str) -> tuple[dict[str, torch.Tensor], str]:
        p = Projector.open(str(s.path), s.student, strategy=Strategy(fit="least-squares", device=where))
        p.calibration = s.calibration
        model = projected_student(p, where)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, device_of(model)

    ref, _ = fitted("cpu")
    dev, ran_on = fitted(device)
    errors = {k: relsq(dev[k], ref[k]) for k in ref}
    worst = max(errors, key=errors.get)
    value = errors[worst]
    return {"value": value, "tolerance": TOL_FLOAT32, "ok": value <= TOL_FLOAT32 and ran_on == device,
            "worst": worst, "tensors": len(errors), "student_on": ran_on}


def fidelity_numbers(result: dict) -> dict[str, float]:
    out = {}
    for name, f in result["students"].items():
        out[f"{name}/relative_error"], out[f"{name}/cosine"] = f["relative_error"], f["cosine"]
        for k, band in enumerate(f["by_level"]):
            out[f"{name}/band {k}/relative_error"], out[f"{name}/band {k}/cosine"] = (band["relative_error"],
                                                                                     band["cosine"])
    for name, rows in (result["blocks"] or {}).items():
        for row in rows:
            out[f"{name}/block {row['block']}"] = row["relative_error"]
    return out


def check_fidelity(s: Subject, device: str) -> dict:
    def measure(where: str) -> dict[str, float]:
        p = Projector.open(str(s.path), s.student, strategy=Strategy(device=where))
        return fidelity_numbers(student_fidelity(p, s.calibration, draws=s.draws, device=where))

    ref, dev = measure("cpu"), measure(device)
    if set(ref) != set(dev):
        raise RuntimeError(f"reported numbers differ: {sorted(set(ref) ^ set(dev))[:4]}")
    errors = {k: 0.0 if math.isnan(dev[k]) and math.isnan(ref[k]) else abs(dev[k] - ref[k]) / max(abs(ref[k]), 1e-3)
              for k in ref}
    worst = max(errors, key=errors.get)
    value = errors[worst]
    return {"value": value, "tolerance": TOL_FIDELITY, "ok": value <= TOL_FIDELITY, "worst": worst,
            "numbers": len(errors), "student_relative_error_cpu": ref["student/relative_error"]}


class Exports:
    """`projection export` runs (the CLI's own code, in this process), made once per subject, device and dtype."""

    def __init__(self, work: Path):
        self.work, self.done = work, {}

    def folder(self, s: Subject, device: str, dtype: str) -> Path:
        key = (s.name, device, dtype)
        if key not in self.done:
            out = self.work / "exports" / f"{s.name}-{device}-{dtype}"
            shutil.rmtree(out, ignore_errors=True)
            said = io.StringIO()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                code = cli_main(["export", "--teacher", str(s.path), "--student", str(s.student_file), "--out",
                                 str(out), "--device", device, "--dtype", dtype])
            if code:
                raise RuntimeError(f"projection export exited {code}: {' '.join(said.getvalue().split())[:400]}")
            self.done[key] = out
        return self.done[key]


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    if set(a) != set(b):
        raise RuntimeError(f"keys differ: {sorted(set(a) ^ set(b))[:4]}")
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape]
    if bad:
        raise RuntimeError(f"{bad[0]}: {a[bad[0]].dtype} {list(a[bad[0]].shape)} against "
                           f"{b[bad[0]].dtype} {list(b[bad[0]].shape)}")
    diffs = {k: (a[k].double().cpu() - b[k].double().cpu()).abs().max().item() if a[k].numel() else 0.0 for k in a}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def check_export(s: Subject, device: str, dtype: str, exports: Exports) -> dict:
    ref, dev = exports.folder(s, "cpu", dtype), exports.folder(s, device, dtype)
    value, worst = max_abs_difference(read_weights(dev), read_weights(ref))
    on = json.loads((dev / "projection_report.json").read_text())["provenance"]["device"]
    return {"value": value, "tolerance": 0.0, "ok": value == 0.0 and on == device, "worst": worst,
            "export_device": on, "tensors": len(read_weights(ref))}


def check_load_student(s: Subject, device: str, dtype: str, exports: Exports) -> dict:
    folder = exports.folder(s, "cpu", dtype)
    dev, ref = load_student(folder, device=device), load_student(folder)
    value, worst = max_abs_difference({k: v.cpu() for k, v in dev.state_dict().items()}, ref.state_dict())
    return {"value": value, "tolerance": 0.0, "ok": value == 0.0 and device_of(dev) == device, "worst": worst,
            "loaded_on": device_of(dev), "dtype": str(next(dev.parameters()).dtype).removeprefix("torch.")}


def check_student_forward(s: Subject, device: str, dtype: str, exports: Exports) -> dict:
    folder = exports.folder(s, "cpu", dtype)
    x, t, ctx = noised_set(s.calibration.latents, s.calibration.context, s.draws)
    with torch.no_grad():
        v_dev = predict(load_student(folder, device=device).eval(), x, t, ctx)
        v_ref = predict(load_student(folder).eval(), x, t, ctx)
        v32 = predict(load_student(folder, dtype=torch.float32).eval(), x, t, ctx) if dtype == "bfloat16" else None
    value = relsq(v_dev, v_ref)
    tol = TOL_BF16 if dtype == "bfloat16" else TOL_FLOAT32
    extra = {"cpu_bf16_vs_float32": relsq(v_ref, v32)} if v32 is not None else {}
    return {"value": value, "tolerance": tol, "ok": value <= tol, **extra}


# ---------------------------------------------------------------- exactness: projection calibrate

CALIBRATE_SIZE = "32x48"  # height x width: latents 4 x 6 with the tiny 8x VAE
CALIBRATE_WORDS = "a cat dog on the mat red blue green image of small big photo".split()
CALIBRATE_CAPTIONS = {"a.png": "a cat on the mat", "b.png": "big red dog", "c.jpg": "a small blue photo of a cat",
                      "d.png": "green"}  # c.jpg: another size (resized and cropped); lengths 6, 4, 8, 2 tokens


def calibrate_missing() -> str | None:
    """Why `projection calibrate` cannot run here (its extra: diffusers, transformers, tokenizers, Pillow), or None."""
    missing = []
    for name in ("diffusers", "transformers", "tokenizers", "PIL"):
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001 - not installed, or not importable with this torch
            missing.append(f"{name} ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})")
    return f"cannot import {', '.join(missing)}" if missing else None


def tiny_pipeline(root: Path) -> Path:
    """A tiny random diffusers Wan pipeline folder (no transformer; calibrate never loads it), as
    tests/test_calibrate.py builds one: AutoencoderKLWan (z_dim 4, 8x), a one-layer UMT5 (d_model 24: the random
    teacher's in_dim and text_dim) and a word-level tokenizer; nothing downloaded."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(CALIBRATE_WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    z = RANDOM_TEACHER["in_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                               latents_mean=torch.linspace(-0.5, 0.5, z).tolist(),
                               latents_std=torch.linspace(0.5, 2.0, z).tolist()).eval()
        encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=32, d_model=RANDOM_TEACHER["text_dim"], d_kv=12, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    said = io.StringIO()  # its progress bars
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                    transformer=None).save_pretrained(root)
    return root


def captioned_images(folder: Path) -> Path:
    """Four random images with captions: three at the set's size (png), one larger (jpg: resized, cropped)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in CALIBRATE_SIZE.split("x"))
    g = torch.Generator().manual_seed(0)
    for name, caption in CALIBRATE_CAPTIONS.items():
        hw = (h, w) if name.endswith(".png") else (50, 90)
        pixels = torch.randint(0, 256, (*hw, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def run_calibrate(pipeline: Path, data: Path, out: Path, device: str) -> Calibration:
    """`projection calibrate` (the CLI's own code, in this process), float32; the set it wrote, read back."""
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        code = cli_main(["calibrate", "--pipeline", str(pipeline), "--data", str(data), "--size", CALIBRATE_SIZE,
                         "--out", str(out), "--device", device, "--dtype", "float32", "--force"])
    if code:
        raise RuntimeError(f"projection calibrate exited {code}: {' '.join(said.getvalue().split())[:400]}")
    if f"on {device}" not in said.getvalue():
        raise RuntimeError(f"projection calibrate did not say it ran on {device}: {said.getvalue()[-300:]}")
    return load_calibration(out)


def check_calibrate(device: str, work: Path) -> dict:
    """`projection calibrate` on `device` against the CPU (float32 both): the same tiny pipeline and images; a
    skip, with its reason, where the calibrate extra cannot be imported."""
    why = calibrate_missing()
    if why is not None:
        return {"value": None, "tolerance": TOL_FLOAT32, "ok": None, "skipped": why}
    folder = work / "calibrate"
    shutil.rmtree(folder, ignore_errors=True)
    pipeline, data = tiny_pipeline(folder / "pipeline"), captioned_images(folder / "images")
    ref = run_calibrate(pipeline, data, folder / "cpu.safetensors", "cpu")
    dev = run_calibrate(pipeline, data, folder / f"{device}.safetensors", device)
    errors = {"latents": relsq(dev.latents, ref.latents), "context": relsq(dev.context, ref.context)}
    lengths_equal = dev.context_lengths.tolist() == ref.context_lengths.tolist()
    extra = {}
    if device == "cuda":  # informative: torch's default (cuDNN TF32 convolutions in the VAE), as the CLI runs
        with tf32_convolutions(True):
            tf32 = run_calibrate(pipeline, data, folder / "tf32.safetensors", device)
        extra["tf32_convolutions_relsq"] = {"latents": relsq(tf32.latents, ref.latents),
                                            "context": relsq(tf32.context, ref.context)}
    value = max(errors.values())
    shutil.rmtree(folder, ignore_errors=True)
    return {"value": value, "tolerance": TOL_FLOAT32,
            "ok": value <= TOL_FLOAT32 and lengths_equal and dev.latents.shape == ref.latents.shape
            and dev.context.shape == ref.context.shape,
            "relsq": errors, "context_lengths_equal": lengths_equal, "context_lengths": ref.context_lengths.tolist(),
            "latents_shape": list(ref.latents.shape), "context_shape": list(ref.context.shape), **extra}


def exactness(rec: Recorder, device: str, work: Path, tiny: bool, quick: bool) -> None:
    found = demo_subjects(work, tiny, quick)
    made: dict[str, Subject] = {}

    def random_teacher() -> dict:
        made["subject"], how = random_subject(work, tiny, quick)
        return {"value": how, "tolerance": None, "ok": True, "config": RANDOM_TEACHER}

    rec.run("setup/random-diffusers", "how the random diffusers-format teacher was written", random_teacher)
    found += [made["subject"]] if made else []
    exports = Exports(work)
    defaults = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 against float32 (forward-tf32 measures torch's default)
    torch.backends.cuda.matmul.allow_tf32 = False
    for s in found:
        rec.run(f"forward/{s.name}", "max relsq of every block output and the velocity, device vs CPU",
                lambda: check_forward(s, device, tf32=False))
        if s.name == "demo-wan":
            rec.run(f"forward-tf32/{s.name}", "max relsq, device (cuDNN TF32 convolutions, torch's default) vs CPU",
                    lambda: check_forward(s, device, tf32=True))
        rec.run(f"activations/{s.name}", "max relsq of every activation statistic and the influence",
                lambda: check_activations(s, device))
        rec.run(f"removal/{s.name}", "relsq of each block's removal effect on the output (removal_effects)",
                lambda: check_removal(s, device))
        rec.run(f"spectra/{s.name}", "max relsq of every teacher matrix's singular values, device vs CPU float64",
                lambda: check_spectra(s, device))
        rec.run(f"fit/{s.name}", "max relsq of every fitted student tensor (least squares, float64 on the device)",
                lambda: check_fit(s, device))
        rec.run(f"fidelity/{s.name}", "max |a - b| / max(|b|, 1e-3) over every reported error and cosine",
                lambda: check_fidelity(s, device))
        for dtype in ("float32", "bfloat16"):
            rec.run(f"export/{s.name}/{dtype}", "max |w_device - w_cpu| over every exported tensor (CLI export)",
                    lambda: check_export(s, device, dtype, exports))
            rec.run(f"load_student/{s.name}/{dtype}", "max |w| difference, load_student(device) vs CPU load",
                    lambda: check_load_student(s, device, dtype, exports))
            rec.run(f"student_forward/{s.name}/{dtype}", "relsq of the loaded student's velocity, device vs CPU",
                    lambda: check_student_forward(s, device, dtype, exports))
    rec.run("calibrate/tiny-pipeline", "max relsq of the latents and the context (projection calibrate), device "
            "vs CPU; context_lengths equal", lambda: check_calibrate(device, work))
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = defaults  # torch's own, for the scale part
    shutil.rmtree(work / "exports", ignore_errors=True)


# ---------------------------------------------------------------- scale

def scale_config(tiny: bool, blocks: int) -> dict:
    return {**(TINY_SCALE if tiny else WAN14B), "num_layers": blocks}


def tensor_bytes(config: dict, itemsize: int = 2) -> tuple[int, int]:
    """(bytes of the embeddings and head, bytes of one block) in a dtype of `itemsize` bytes."""
    top = block = 0
    for key, (shape, _) in wan_tensors({**config, "num_layers": 1}).items():
        n = math.prod(shape) * itemsize
        if template_of(key)[1] is None:
            top += n
        else:
            block += n
    return top, block


def random_value(key: str, shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    """Random weights that keep the forward finite: matrices ~ N(0, 1/fan_in), norms ~ 1, small biases."""
    r = torch.randn(shape, generator=g, device=device)
    if key.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
        r = 1 + 0.05 * r
    elif "modulation" in key:
        r = 0.05 * r
    elif len(shape) == 1:
        r = 0.01 * r
    else:
        r = r * math.prod(shape[1:]) ** -0.5
    return r.to(torch.bfloat16).cpu()


def evict(files: list[Path]) -> bool:
    """Drop the files' pages from the page cache (they were fsynced), so the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def write_scale_teacher(folder: Path, config: dict, device: str) -> dict:
    """Wan's original format, sharded as Wan's release is: shard 1 the embeddings and head, shard i+2 block i;
    each generated on `device` and written before the next is made (host memory: one block)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(config["num_layers"] + 1)]
    for key, (shape, _) in wan_tensors(config).items():
        block = template_of(key)[1]
        groups[0 if block is None else block + 1].append((key, shape))
    weight_map, files, total = {}, [], 0
    started = time.perf_counter()
    for i, keys in enumerate(groups):
        g = torch.Generator(device=device).manual_seed(i)
        state = {k: random_value(k, shape, g, device) for k, shape in keys}
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(state, str(folder / name), metadata={"format": "pt"})
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
        weight_map.update({k: name for k in state})
        total += sum(v.numel() * v.element_size() for v in state.values())
        files.append(folder / name)
        del state
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v",
                                                    "patch_size": [1, 2, 2], "eps": 1e-6, "text_len": 512,
                                                    **config}, indent=1))
    seconds = time.perf_counter() - started
    on_disk = sum(f.stat().st_size for f in files)
    return {"seconds": round(seconds, 2), "tensor_bytes": total, "file_bytes": on_disk, "files": files}


class Gpu:
    """Peak device memory between marks (CUDA), or nothing on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def now(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None


def scale_inputs(n: int, size: tuple[int, int], tokens: int, config: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config["in_dim"], *size, generator=g)
    t = torch.linspace(50, 950, n)
    ctx = torch.randn(n, tokens, config["text_dim"], generator=g)
    return x, t, ctx


def block_param_bytes(config: dict) -> int:
    return tensor_bytes(config, 4)[1]  # float32 on the device


def held_per_latent(config: dict, size: tuple[int, int], tokens: int) -> int:
    """Device bytes the streamed forward keeps per latent across blocks (float32): the embedded tokens and the
    residual stream (tokens x dim each), the embedded context (tokens x dim), the time embeddings (7 x dim)."""
    n_tok = (size[0] // 2) * (size[1] // 2)
    return 4 * config["dim"] * (2 * n_tok + tokens + 7)


def measure_forward(teacher, config: dict, device: str, files: list[Path], n: int, size: tuple[int, int],
                    tokens: int) -> dict:
    """One streamed forward with per-block marks: read (build) time, compute time, peak memory per block."""
    gpu = Gpu(device)
    x, t, ctx = scale_inputs(n, size, tokens, config)
    micro = 8
    chunks = math.ceil(n / micro)
    evicted = evict(files)
    # embeddings + head alone (no block): what every forward pays besides its blocks
    shell_started = time.perf_counter()
    empty = StreamedTeacher(teacher, device, blocks=[])
    sync(device)
    shell_load = time.perf_counter() - shell_started
    gpu.reset()
    started = time.perf_counter()
    empty(x, t, ctx)
    sync(device)
    embed_head = time.perf_counter() - started
    del empty
    empty_cache()

    evict(files)
    streamed = StreamedTeacher(teacher, device)
    gpu.reset()
    base = gpu.now()
    marks: dict[int, dict] = {}
    seen: dict[int, int] = {}
    clock = [time.perf_counter()]

    def on_weights(i: int, block: torch.nn.Module) -> None:
        sync(device)
        now = time.perf_counter()
        marks[i] = {"read_s": now - clock[0], "allocated_after_read": gpu.now()}
        clock[0] = now

    def on_block(i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        seen[i] = seen.get(i, 0) + 1
        if seen[i] == chunks:
            sync(device)
            now = time.perf_counter()
            marks[i].update(compute_s=now - clock[0], peak_bytes=gpu.peak())
            clock[0] = now
            gpu.reset()

    started = clock[0] = time.perf_counter()
    v = streamed(x, t, ctx, on_block, on_weights=on_weights)
    sync(device)
    total = time.perf_counter() - started
    finite = bool(torch.isfinite(v).all())
    blocks = [marks[i] for i in sorted(marks)]
    blocks[0]["read_s"] = max(0.0, blocks[0]["read_s"] - embed_head)  # block 0's mark also covers the embedding
    later = blocks[1:] or blocks
    read = statistics.median(b["read_s"] for b in later)
    compute = statistics.median(b["compute_s"] for b in blocks)
    peaks = [b["peak_bytes"] for b in blocks if b["peak_bytes"] is not None]
    held = held_per_latent(config, size, tokens)
    if gpu.cuda and len(blocks) > 1:  # measured: what stays on the device besides the shell and one block
        held = max(held, (blocks[1]["allocated_after_read"] - base - block_param_bytes(config)) // n)
    del streamed, v
    empty_cache()
    return {"latents": n, "size": list(size), "tokens": (size[0] // 2) * (size[1] // 2), "context_tokens": tokens,
            "in_dim": config["in_dim"], "text_dim": config["text_dim"], "micro_batch": micro,
            "total_s": round(total, 3), "shell_load_s": round(shell_load, 3),
            "embed_head_s": round(embed_head, 4), "read_block_s": round(read, 4),
            "compute_block_s": round(compute, 4), "per_block": blocks,
            "peak_bytes": max(peaks) if peaks else None, "held_bytes_per_latent": held,
            "block_param_bytes_float32": block_param_bytes(config), "finite": finite,
            "page_cache_eviction_requested": evicted}


def extrapolate_forward(m: dict, blocks: int = TARGET_BLOCKS, latents: int = TARGET_LATENTS) -> dict:
    n, micro = m["latents"], m["micro_batch"]
    scale = math.ceil(latents / micro) / math.ceil(n / micro)
    per_block = m["read_block_s"] + m["compute_block_s"] * scale
    time_s = m["shell_load_s"] + m["embed_head_s"] * latents / n + blocks * per_block
    formula = (f"time_{blocks}({latents}) = shell_load + embed_head({n}) * {latents}/{n} + {blocks} * (read_block "
               f"+ compute_block({n}) * ceil({latents}/{micro})/ceil({n}/{micro})) = {m['shell_load_s']:.3f} + "
               f"{m['embed_head_s']:.3f} * {latents / n:g} + {blocks} * ({m['read_block_s']:.3f} + "
               f"{m['compute_block_s']:.3f} * {scale:g}) = {time_s:.1f} s")
    out = {"time_s": round(time_s, 1), "time_formula": formula}
    if m["peak_bytes"] is not None:
        memory = m["peak_bytes"] + (latents - n) * m["held_bytes_per_latent"]
        out["peak_bytes"] = memory
        out["memory_formula"] = (
            f"peak({latents}) = peak_block({n}) + ({latents} - {n}) * held_per_latent = "
            f"{_size(m['peak_bytes'])} + {latents - n} * {_size(m['held_bytes_per_latent'])} = "
            f"{_size(memory)} (independent of the number of blocks: one block's weights at a time)")
    h, w = m["size"]
    host = latents * 4 * (2 * m["in_dim"] * h * w + m["context_tokens"] * m["text_dim"])
    out["host_bytes"] = host
    out["host_formula"] = (f"host({latents}) = {latents} * 4 B * (2 * {m['in_dim']} * {h} * {w} + "
                           f"{m['context_tokens']} * {m['text_dim']}) = {_size(host)} per noise draw (the noised "
                           "latents, their velocities and the context, float32, on the host)")
    return out


def measure_activations(teacher, config: dict, device: str, files: list[Path], n: int, size: tuple[int, int],
                        tokens: int) -> dict:
    gpu = Gpu(device)
    x, _, ctx = scale_inputs(n, size, tokens, config)
    cal = Calibration(x, ctx, "synthetic", True)
    evict(files)
    gpu.reset()
    started = time.perf_counter()
    found = collect(teacher, cal, draws=1, device=device)
    sync(device)
    total = time.perf_counter() - started
    return {"latents": n, "size": list(size), "total_s": round(total, 3), "peak_bytes": gpu.peak(),
            "per_block_s": round(total / config["num_layers"], 4),
            "finite": all(bool(torch.isfinite(v).all()) for v in found.scores.values())}


def scale_student(tiny: bool, layers: int) -> dict:
    return {**(TINY_STUDENT if tiny else STUDENT13B), "num_layers": layers}


def measure_fit(folder: Path, config: dict, device: str, files: list[Path], n: int, size: tuple[int, int],
                tokens: int, tiny: bool) -> dict:
    """The least-squares fit of one student block (teacher block 0) on n latents: projection first (not timed
    here), then `fit_student` (embedding, one teacher block, one student block, ten float64 solves)."""
    gpu = Gpu(device)
    p = Projector.open(str(folder), scale_student(tiny, 1), strategy=Strategy(layers=[0], device=device))
    model = projected_student(p, device)
    x, _, ctx = scale_inputs(n, size, tokens, config)
    cal = Calibration(x, ctx, "synthetic", True)
    evict(files)
    gpu.reset()
    started = time.perf_counter()
    report = fit_student(p.plan(), model, cal, draws=1, device=device)
    sync(device)
    total = time.perf_counter() - started
    finite = all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
    del model
    empty_cache()
    return {"latents": n, "size": list(size), "fit_s": round(total, 3), "peak_bytes": gpu.peak(),
            "layers_fitted": len(report.layers), "finite": finite, "student": scale_student(tiny, 1)}


def measure_export(folder: Path, device: str, files: list[Path], work: Path, layers: int, tiny: bool) -> dict:
    gpu = Gpu(device)
    out = work / f"scale-export-{layers}"
    shutil.rmtree(out, ignore_errors=True)
    p = Projector.open(str(folder), scale_student(tiny, layers), strategy=Strategy(device=device))
    evict(files)
    gpu.reset()
    started = time.perf_counter()
    report = export_student(p, out)
    sync(device)
    total = time.perf_counter() - started
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return {"student_layers": layers, "export_s": round(total, 3), "peak_bytes": gpu.peak(),
            "student_bytes": weights, "teacher_bytes_read": report["provenance"]["teacher_bytes_read"],
            "export_device": report["provenance"]["device"]}


@dataclass(frozen=True)
class ScalePlan:
    blocks: int
    sizes: tuple[tuple[int, int], ...]  # latent sizes of the forward
    latents: int
    tokens: int
    fit_sizes: tuple[tuple[int, int], ...]
    export_layers: tuple[int, ...]


def scale_plan(tiny: bool, quick: bool, blocks: int | None) -> ScalePlan:
    if tiny:
        return ScalePlan(blocks or 2, ((12, 20), (6, 10)), 8, 16, ((12, 20),), (1, blocks or 2))
    if quick:
        b = blocks or 1
        return ScalePlan(b, ((60, 104), (30, 52)), 8, 512, ((30, 52),), (b,))
    b = blocks or 3
    return ScalePlan(b, ((60, 104), (30, 52)), 8, 512, ((60, 104), (30, 52)), tuple(sorted({1, b})))


def scale(rec: Recorder, device: str, work: Path, tiny: bool, quick: bool, blocks: int | None) -> None:
    plan = scale_plan(tiny, quick, blocks)
    config = scale_config(tiny, plan.blocks)
    folder = work / ("wan14b-shaped" if not tiny else "wan-tiny-shaped")
    top, block = tensor_bytes(config)
    predicted = top + plan.blocks * block
    state: dict[str, Any] = {}

    def write() -> dict:
        found = write_scale_teacher(folder, config, device)
        state["files"] = found.pop("files")
        state["teacher"] = open_teacher(str(folder))
        ok = (state["teacher"].config.num_layers == plan.blocks and state["teacher"].config.dim == config["dim"]
              and found["tensor_bytes"] == predicted)
        return {"value": round(found["file_bytes"] / GB, 3), "tolerance": None, "ok": ok, **found,
                "predicted_tensor_bytes": predicted, "embeddings_head_bytes": top, "block_bytes": block,
                "config": config, "full_40_block_teacher_gb": round((top + TARGET_BLOCKS * block) / GB, 2)}

    rec.run("scale/write teacher", f"GB on disk ({plan.blocks} bf16 blocks + embeddings and head)", write)
    if "teacher" not in state:
        rec.record("scale/skipped", "no synthetic teacher", None, None, False, error="the teacher was not written")
        return
    teacher, files = state["teacher"], state["files"]
    # warm-up (CUDA context, cuBLAS, kernels) so that the first measurement is not its cost
    try:
        x, t, ctx = scale_inputs(1, plan.sizes[-1], 8, config)
        StreamedTeacher(teacher, device, blocks=[0])(x, t, ctx)
        sync(device)
    except Exception as exc:  # noqa: BLE001 - the measurements below record what fails
        print(f"warm-up failed: {type(exc).__name__}: {exc}", flush=True)
    empty_cache()
    forwards: dict[str, dict] = {}
    for size in plan.sizes:
        label = f"{size[0]}x{size[1]}"

        def forward(size: tuple[int, int] = size, label: str = label) -> dict:
            m = measure_forward(teacher, config, device, files, plan.latents, size, plan.tokens)
            forwards[label] = m
            print(f"  forward {label}, {plan.latents} latents: block, read s, compute s, peak memory")
            for i, b in enumerate(m["per_block"]):
                print(f"    {i}  {b['read_s']:.3f}  {b['compute_s']:.3f}  {_gb(b['peak_bytes'])}")
            return {"value": round(m["read_block_s"] + m["compute_block_s"], 4), "tolerance": None,
                    "ok": m["finite"], **m, "extrapolated": extrapolate_forward(m)}

        rec.run(f"scale/forward {label}", f"seconds per block ({plan.latents} latents of {label}, read + compute)",
                forward)
    size = plan.sizes[0]
    label = f"{size[0]}x{size[1]}"

    def activations() -> dict:
        m = measure_activations(teacher, config, device, files, plan.latents, size, plan.tokens)
        return {"value": m["per_block_s"], "tolerance": None, "ok": m["finite"], **m}

    rec.run(f"scale/activations {label}", f"seconds per block (statistics pass, {plan.latents} latents)", activations)
    fits: dict[str, dict] = {}
    for size in plan.fit_sizes:
        label = f"{size[0]}x{size[1]}"

        def fit(size: tuple[int, int] = size, label: str = label) -> dict:
            m = measure_fit(folder, config, device, files, plan.latents, size, plan.tokens, tiny)
            fits[label] = m
            return {"value": m["fit_s"], "tolerance": None, "ok": m["finite"] and m["layers_fitted"] == 10, **m}

        rec.run(f"scale/fit {label}", f"seconds to fit one block ({plan.latents} latents of {label})", fit)
    exports: dict[int, dict] = {}
    for layers in plan.export_layers:
        def export(layers: int = layers) -> dict:
            m = measure_export(folder, device, files, work, layers, tiny)
            exports[layers] = m
            return {"value": m["export_s"], "tolerance": None, "ok": m["export_device"] == device, **m}

        rec.run(f"scale/export {layers} block student", "seconds (1.3B-shaped student, float32, magnitude)", export)
    rec.run("scale/extrapolation", f"to {TARGET_BLOCKS} blocks and {TARGET_LATENTS} latents (formulas in the line)",
            lambda: extrapolation(forwards, fits, exports, config, plan))
    shutil.rmtree(folder, ignore_errors=True)


def extrapolation(forwards: dict, fits: dict, exports: dict, config: dict, plan: ScalePlan) -> dict:
    lines: list[str] = []
    out: dict[str, Any] = {}
    for label, m in forwards.items():
        e = extrapolate_forward(m)
        out[f"forward {label}"] = e
        lines += [f"forward {label}: {e[k]}" for k in ("time_formula", "memory_formula", "host_formula") if k in e]
    for label, f in fits.items():
        m = forwards.get(label)
        if m is None:
            continue
        n = f["latents"]
        ratio = TARGET_LATENTS / n
        forward_block = m["read_block_s"] + m["compute_block_s"] * math.ceil(TARGET_LATENTS / 8) / math.ceil(n / 8)
        extra = max(0.0, f["fit_s"] - m["shell_load_s"] - m["embed_head_s"] - m["read_block_s"]
                    - m["compute_block_s"])
        time_s = TARGET_BLOCKS * forward_block + STUDENT_BLOCKS * extra * ratio
        formula = (f"fit_{STUDENT_BLOCKS}_of_{TARGET_BLOCKS}({TARGET_LATENTS}) = {TARGET_BLOCKS} * forward_block"
                   f"({TARGET_LATENTS}) + {STUDENT_BLOCKS} * (fit_1({n}) - shell_load - embed_head - forward_block"
                   f"({n})) * {TARGET_LATENTS}/{n} = {TARGET_BLOCKS} * {forward_block:.3f} + {STUDENT_BLOCKS} * "
                   f"{extra:.3f} * {ratio:g} = {time_s:.1f} s (the ten solves per block do not grow with latents: "
                   "an upper bound)")
        entry = {"time_s": round(time_s, 1), "time_formula": formula}
        if f["peak_bytes"] is not None:
            sd, td = f["student"]["dim"], config["dim"]
            per = m["held_bytes_per_latent"] * (1 + sd / td)
            memory = f["peak_bytes"] + (TARGET_LATENTS - n) * per
            entry["peak_bytes"] = memory
            entry["memory_formula"] = (
                f"peak_fit({TARGET_LATENTS}) = peak_fit({n}) + ({TARGET_LATENTS} - {n}) * held_per_latent * "
                f"(1 + {sd}/{td}) = {_size(f['peak_bytes'])} + {TARGET_LATENTS - n} * {_size(per)} = "
                f"{_size(memory)} (teacher and student streams; the fit's micro-batch is 32 latents, so its "
                f"working set measured at {n} grows up to 32/{n}x that part)")
        out[f"fit {label}"] = entry
        lines += [f"fit {label}: {entry['time_formula']}"] + ([f"fit {label}: {entry['memory_formula']}"]
                                                              if "memory_formula" in entry else [])
    if exports:
        most = max(exports)
        if len(exports) > 1:
            least = min(exports)
            per_block = (exports[most]["export_s"] - exports[least]["export_s"]) / (most - least)
            fixed = exports[least]["export_s"] - least * per_block
            how = (f"per_block = (export_{most} - export_{least}) / {most - least} = {per_block:.3f} s, "
                   f"fixed = {fixed:.3f} s")
        else:
            per_block, fixed = exports[most]["export_s"] / most, 0.0
            how = f"per_block = export_{most} / {most} = {per_block:.3f} s (fixed cost not separated: an upper bound)"
        time_s = fixed + STUDENT_BLOCKS * per_block
        entry = {"time_s": round(time_s, 1),
                 "time_formula": f"export_{STUDENT_BLOCKS}_blocks = fixed + {STUDENT_BLOCKS} * per_block; {how}; = "
                                 f"{time_s:.1f} s (a 1.3B-shaped student of {STUDENT_BLOCKS} blocks from the 40-block "
                                 f"teacher reads {STUDENT_BLOCKS} of its blocks)",
                 "peak_bytes": exports[most]["peak_bytes"]}
        out["export"] = entry
        lines.append(f"export: {entry['time_formula']}; peak device memory {_gb(entry['peak_bytes'])} (per "
                     "entry in flight: independent of depth)")
    print("\nExtrapolation (measured per block on the synthetic teacher; cold page cache):")
    for line in lines:
        print("  " + line)
    return {"value": out.get(f"forward {plan.sizes[0][0]}x{plan.sizes[0][1]}", {}).get("time_s"),
            "tolerance": None, "ok": bool(out), "estimates": out, "formulas": lines,
            "note": f"value: the streamed forward of {TARGET_LATENTS} latents of {plan.sizes[0][0]}x"
                    f"{plan.sizes[0][1]} through {TARGET_BLOCKS} blocks, seconds"}


def _gb(n: int | None) -> str:
    return "not measured (cpu)" if n is None else _size(n)


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------- main

def stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="one full-width block, fewer measurements (< 3 min)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes everywhere (the test suite, on the CPU)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check.json (default: here)")
    parser.add_argument("--work", type=Path, help="scratch folder (the synthetic teacher: 2.6 GB for the full "
                        "run; default: a new folder in $TMPDIR or /tmp, deleted at the end, also on SIGTERM)")
    parser.add_argument("--blocks", type=int, help="full-width blocks to write (default 3; --quick 1; --tiny 2)")
    parser.add_argument("--part", choices=["all", "exact", "scale"], default="all")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --tiny: 1, since tiny "
                        "tensors gain nothing from threads and a busy machine makes them 10x slower)")
    args = parser.parse_args(argv)
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out / "gpu_check.json", args.device)
    env = environment(args.device)
    print(f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
          f"GPU {env.get('gpu', 'none')}; python {env['python']}; {env['cpus']} CPUs", flush=True)
    usable = args.device == "cpu" or torch.cuda.is_available()
    rec.record("environment", "versions", env, None, usable,
               **({} if usable else {"error": "--device cuda but torch sees no CUDA device"}))
    if not usable:
        rec.close()
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_work-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROJECTION_CACHE", str(work / "cache"))  # never the user's cache
    signal.signal(signal.SIGTERM, stop)  # `timeout` sends SIGTERM: clean the scratch folder, keep the lines
    try:
        if args.part in ("all", "exact"):
            exactness(rec, args.device, work, args.tiny, args.quick)
        if args.part in ("all", "scale"):
            scale(rec, args.device, work, args.tiny, args.quick, args.blocks)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    budget = TINY_BUDGET_S if args.tiny else QUICK_BUDGET_S if args.quick else FULL_BUDGET_S
    wall = time.perf_counter() - started
    rec.record("wall time", "seconds, the whole run", round(wall, 1), budget,
               wall <= budget if args.device == "cuda" or args.tiny else None)
    rec.close()
    print("\n" + rec.summary())
    failed = [r["check"] for r in rec.rows if r["ok"] is False]
    print(f"\n{len(rec.rows)} checks, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
          + f"; {wall:.0f} s; results in {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
