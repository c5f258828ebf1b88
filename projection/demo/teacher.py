"""The demo teacher: a small Wan trained on the digits (`digits.py`), its shipped files, and how they are made.

`demo_assets/` (package data) holds what `train_teacher` writes:
  teacher-wan/            original Wan format: config.json + one float16 safetensors (patch conv as Conv3d)
  teacher-diffusers/      the same weights under diffusers' names, in 3 shards + index (WanTransformer3DModel)
  classifier.safetensors  the digit classifier's coefficients (`classifier.py`)
  calibration.safetensors held-out latents + prompt states (`latents`, `context`, `context_lengths`, `labels`)
  training.json           settings, the validation-loss curve, wall time, load average, the shipped teacher's scores
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from . import digits
from ..arch.anatomy import native_name
from ..arch.config import ModelConfig, as_config
from ..arch.layout import build_student
from ..arch.wan import WanLite, wan_state_dict
from ..engine.build import init_module_, wanlite_from_teacher
from ..errors import ProjectionError
from ..function import calibration as sets
from ..io.checkpoint import PathCheck
from .classifier import DigitClassifier, fit_classifier, load_classifier
from .sampling import sample, validation_loss
from .training import History, TrainConfig, train_flow

ASSETS = Path(__file__).with_name("demo_assets")
DEMO = "demo"  # the calibration source naming the held-out digits (`open_calibration`, CLI --calibration demo)
CONFIG = {"dim": 128, "ffn_dim": 512, "num_heads": 4, "num_layers": 8, "in_dim": digits.CHANNELS,
          "out_dim": digits.CHANNELS, "text_dim": digits.TEXT_DIM, "freq_dim": 64}
TRAINING = TrainConfig(steps=2000, batch=128, lr=1e-3, warmup=200, eval_every=100, seed=0)
INIT_SEED = 0
DTYPE = torch.float16  # shipped weights (16 MB budget for both formats); the teacher runs in float32
SHARDS = 3


@dataclass(frozen=True)
class Sampler:
    """How the teacher's samples are drawn and scored (prompt accuracy)."""
    steps: int = 20
    guidance: float = 1.0  # 1: no classifier-free guidance
    shift: float = 1.0
    per_class: int = 50  # samples per digit; seeds 0 .. 10 * per_class - 1, digit = seed % 10

    def labels(self) -> torch.Tensor:
        return torch.arange(digits.NUM_CLASSES * self.per_class) % digits.NUM_CLASSES


def generate(model: torch.nn.Module, labels: torch.Tensor, seeds: list[int], sampler: Sampler = Sampler()) -> torch.Tensor:
    """Images [N, 8, 8] of the prompted digits, drawn by any velocity model (teacher or student) from seeded noise."""
    latents = sample(model, digits.label_states(labels), seeds, (digits.CHANNELS, digits.SIZE, digits.SIZE),
                     steps=sampler.steps, guidance=sampler.guidance, negative=digits.empty_states(),
                     shift=sampler.shift)
    return digits.decode(latents)


def prompt_accuracy_of(model: torch.nn.Module, classifier: DigitClassifier, sampler: Sampler = Sampler()) -> float:
    """Share of the model's samples that the classifier reads as the prompted digit."""
    labels = sampler.labels()
    return classifier.prompt_accuracy(generate(model, labels, list(range(len(labels))), sampler), labels)


def load_teacher(assets: Path = ASSETS, device: str | torch.device = "cpu") -> WanLite:
    """The shipped teacher as a float32 WanLite (it computes the Wan teacher's function on one frame)."""
    return wanlite_from_teacher(assets / "teacher-wan", device)


def load_demo_classifier(assets: Path = ASSETS) -> DigitClassifier:
    return load_classifier(assets / "classifier.safetensors")


def calibration_set(split: Literal["train", "val", "all"] = "val") -> dict[str, torch.Tensor]:
    """Latents, prompt states, their lengths and labels of one split of the digits."""
    data = digits.load_digits(split)
    context, lengths = digits.prompt_states([digits.prompt(int(c)) for c in data.labels])
    return {"latents": digits.encode(data.images), "context": context, "context_lengths": lengths,
            "labels": data.labels}


CALIBRATION_METADATA = {
    "format": "projection-calibration/1",
    "source": "scikit-learn load_digits (UCI optical recognition of handwritten digits, 8x8), held-out validation "
              f"split: {digits.VAL_FRACTION:.0%} of each class, seed {digits.SPLIT_SEED}",
    "latents": "[N, 4, 8, 8] projection.demo.digits.encode(images): planes (image, horizontal and vertical differences, "
               "3x3 box mean) mixed by a 4x4 Hadamard/2 and normalized per channel, as the demo teacher expects",
    "context": f"[N, {digits.CONTEXT_LEN}, {digits.TEXT_DIM}] stand-in text encoder states of 'a handwritten digit "
               "<label>' (seeded word + position vectors, zero-padded; they stand in for UMT5's)",
    "context_lengths": "[N] tokens before the zero padding",
    "labels": "[N] the digit each latent shows and its prompt names",
}


def save_teacher(state: dict[str, torch.Tensor], config: dict[str, Any], wan: Path, diffusers: Path,
                 shards: int = SHARDS) -> None:
    """Write canonical (original Wan) weights as an original Wan folder (one file) and a sharded diffusers folder."""
    wan.mkdir(parents=True, exist_ok=True)
    save_file(state, str(wan / "diffusion_pytorch_model.safetensors"))
    (wan / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "eps": 1e-6,
                                                  "text_len": 512, "patch_size": [1, 2, 2], **config}, indent=1))
    diffusers.mkdir(parents=True, exist_ok=True)
    native = {native_name(k, "wan-diffusers"): v for k, v in state.items()}
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for i, (k, v) in enumerate(native.items()):
        parts[min(shards - 1, i * shards // len(native))][k] = v
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(diffusers / name))
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (diffusers / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (diffusers / "config.json").write_text(json.dumps(diffusers_config(config), indent=1))


def diffusers_config(config: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    """A Wan config as diffusers' WanTransformer3DModel's config.json (serialization)."""
    cfg = as_config(config)
    return {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2],
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim,
            "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024}


def init_teacher(config: dict[str, Any] = CONFIG, seed: int = INIT_SEED) -> WanLite:
    """A freshly initialized WanLite, every value from one generator seeded with `seed` (never the global RNG)."""
    model = build_student({"layout": "wanlite", **config}, "meta")
    return init_module_(model, torch.Generator().manual_seed(seed))  # type: ignore[return-value]


def train_teacher(out: Path = ASSETS, config: dict[str, Any] = CONFIG, training: TrainConfig = TRAINING,
                  samplers: tuple[Sampler, ...] = (Sampler(), Sampler(guidance=2.0), Sampler(guidance=3.0)),
                  device: str | torch.device = "cpu", log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Train the demo teacher and write everything `demo_assets/` holds into `out`; returns training.json's data.

    Deterministic for a given torch build and thread count: one seeded generator draws the data order and noise,
    and the initialization is seeded."""
    started, load_before = time.perf_counter(), os.getloadavg()
    train, val = digits.load_digits("train"), digits.load_digits("val")
    model = init_teacher(config).to(device)

    def report(step: int, history: History) -> None:
        log(f"step {step:5d}  val loss {history.val_loss[-1]:.4f}  "
            + (f"train loss {history.train_loss[-1]:.4f}  " if history.train_loss[-1] is not None else "")
            + f"{history.seconds[-1]:7.0f} s")

    history = train_flow(model, digits.encode(train.images), digits.label_states(train.labels), digits.empty_states(),
                         digits.encode(val.images), digits.label_states(val.labels), training, report)
    train_seconds = time.perf_counter() - started
    load_after = os.getloadavg()

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPE) for k, v in wan_state_dict(model).items()}
    save_teacher(state, config, out / "teacher-wan", out / "teacher-diffusers")
    classifier = fit_classifier(train)
    classifier.save(out / "classifier.safetensors", {
        "model": "multinomial logistic regression (scikit-learn, lbfgs, C=1) on the 64 pixels in [0, 1]",
        "trained_on": "the demo's training split of load_digits"})
    save_file(calibration_set("val"), str(out / "calibration.safetensors"), CALIBRATION_METADATA)

    shipped = load_teacher(out, device)  # score what ships (float16 weights, run in float32)
    val_latents, val_context = digits.encode(val.images), digits.label_states(val.labels)
    scores = {"val_loss_float32": history.val_loss[-1],
              "val_loss_shipped": validation_loss(shipped, val_latents, val_context, training.val_draws),
              "classifier_accuracy_on_real_val_images": classifier.prompt_accuracy(val.images, val.labels),
              "prompt_accuracy": [{**asdict(s), "accuracy": prompt_accuracy_of(shipped, classifier, s)} for s in samplers]}
    log(f"shipped teacher: {json.dumps(scores)}")
    record = {
        "config": config, "training": training.to_dict(), "init_seed": INIT_SEED, "shipped_dtype": str(DTYPE),
        "data": {"train": len(train.labels), "val": len(val.labels)},
        "history": history.to_dict(), "scores": scores,
        "wall_time_s": round(train_seconds, 1), "load_average_before": load_before, "load_average_after": load_after,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "processor": _cpu_name(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot_training(record: dict[str, Any], path: Path) -> None:
    """The validation (and training) loss curve as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = record["history"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(h["steps"], h["val_loss"], marker=".", label="validation (fixed noise)")
    train = [(s, v) for s, v in zip(h["steps"], h["train_loss"]) if v is not None]
    ax.plot([s for s, _ in train], [v for _, v in train], alpha=0.6, label="training (mean since last point)")
    ax.set(xlabel="step", ylabel="flow-matching loss (MSE of v = eps - x0)", yscale="log",
           title=f"Demo teacher: Wan {record['config']['dim']} x {record['config']['num_layers']} blocks on digits")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_samples(model: torch.nn.Module, path: Path, sampler: Sampler = Sampler(), per_class: int = 8) -> None:
    """A grid of the model's samples: one row per digit, seeds 0 .. per_class - 1 (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = torch.arange(digits.NUM_CLASSES).repeat_interleave(per_class)
    images = generate(model, labels, [i % per_class for i in range(len(labels))], sampler).clamp(0, 1)
    fig, axes = plt.subplots(digits.NUM_CLASSES, per_class, figsize=(per_class * 0.6, 6.4), dpi=100)
    for ax, image in zip(axes.flat, images):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=1)
        ax.set_axis_off()
    fig.suptitle(f"Demo teacher samples: rows 'a handwritten digit 0..9', {sampler.steps} Euler steps, "
                 f"guidance {sampler.guidance:g}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def copy_demo_teacher(out: Path, assets: Path = ASSETS) -> None:
    """Copy the shipped teacher (both formats) and calibration set into a demo folder."""
    for name in ("teacher-wan", "teacher-diffusers"):
        if not (assets / name / "config.json").is_file():
            raise ProjectionError(f"{assets / name}: the trained demo teacher is missing; reinstall, or run "
                                  "'python -m projection.demo train'")
        shutil.copytree(assets / name, out / name, dirs_exist_ok=True)
    shutil.copy2(assets / "calibration.safetensors", out / "calibration.safetensors")


def load_calibration(path: Path = ASSETS / "calibration.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(path))


def demo_calibration() -> sets.Calibration:
    """The demo teacher's held-out digits (269 latents [4, 8, 8] and their prompt states)."""
    found = sets.load_calibration(ASSETS / "calibration.safetensors")
    return sets.Calibration(found.latents, found.context, DEMO, False, found.context_lengths, found.metadata,
                            found.extra)


def open_calibration(spec: str | Path, config: dict[str, Any], check: PathCheck | None = None) -> sets.Calibration:
    """`demo` (the held-out digits, refused for a teacher outside the demo's space), or what the core's
    `calibration.open_calibration` opens: `synthetic` or a file path (seen by `check`)."""
    if str(spec) == DEMO:
        found = demo_calibration()
        sets.check_shapes(DEMO, {"latents": tuple(found.latents.shape), "context": tuple(found.context.shape)},
                          {"latents": torch.float32, "context": torch.float32}, config)
        return found
    return sets.open_calibration(spec, config, check)
