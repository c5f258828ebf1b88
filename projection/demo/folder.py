"""The built-in demo: a small Wan teacher trained on real data (the default), or a synthetic one, plus two
student configs.

The trained teacher is a Wan (`WanModel` layout: patch (1, 2, 2), RoPE, qk-norm, cross-attention, modulation) of
width 128, 8 blocks, 4 heads, trained with Wan's rectified-flow objective on scikit-learn's handwritten digits
(`digits.py`: the data, its latent transform and prompts). Its weights ship in `demo_assets/` in the original and
the sharded diffusers formats, with the digit classifier that scores samples and a calibration set of held-out
latents; `python -m projection.demo train` reproduces them.

The synthetic teacher (`write_demo(..., synthetic=True)`, `projection demo --synthetic`) is random weights shaped
like trained ones, at a larger size: each matrix has decaying, heavy-tailed singular values (a power law with a
few strong directions), and every space has per-index gains shared by all tensors that use it, so charts and
magnitude ranking behave as on real checkpoints. It computes nothing meaningful.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
import yaml

from ..arch.anatomy import space_sizes, template_of, wan_tensors
from ..arch.config import as_config
from ..errors import ProjectionError
from . import teacher as dt
from .teacher import copy_demo_teacher, save_teacher

# The trained teacher (teacher.CONFIG: width 128, 8 blocks, 4 heads of 32, FFN 512) at half width and depth.
STUDENTS = {
    "student-diffusers.yaml": {"layout": "diffusers", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4},
    "student-wanlite.yaml": {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4},
    "student-seed.yaml": {"layout": "seed", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4},
}
SYNTHETIC = {"dim": 256, "ffn_dim": 768, "num_heads": 4, "num_layers": 8, "in_dim": 16, "out_dim": 16,
             "text_dim": 512, "freq_dim": 256}
SYNTHETIC_STUDENTS = {
    "student-diffusers.yaml": {"layout": "diffusers", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4},
    "student-wanlite.yaml": {"layout": "wanlite", "dim": 128, "num_heads": 2, "ffn_dim": 384, "num_layers": 4},
    "student-seed.yaml": {"layout": "seed", "dim": 128, "num_heads": 4, "ffn_dim": 512, "num_layers": 4},
}


def _orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    return q


def trained_like(rows: int, cols: int, g: torch.Generator, scale: float) -> torch.Tensor:
    """A matrix with a power-law spectrum plus a few outlying directions."""
    r = min(rows, cols)
    alpha = 0.5 + torch.rand(1, generator=g).item() * 0.6
    s = (torch.arange(1, r + 1, dtype=torch.float32) ** -alpha)
    s[: max(1, r // 64)] *= 3.0
    w = (_orthonormal(rows, r, g) * s) @ _orthonormal(cols, r, g).T
    return w * (scale / w.std())


def _gains(size: int, g: torch.Generator, spread: float) -> torch.Tensor:
    return torch.exp(torch.randn(size, generator=g) * spread)


def demo_state_dict(config: dict[str, Any] = SYNTHETIC, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical (original Wan) names -> tensors."""
    g = torch.Generator().manual_seed(seed)
    sizes = space_sizes(config)
    global_gains = {s: _gains(sizes[s], g, 0.6) for s in ("resid", "context", "text_hidden", "time_hidden")}
    block_gains = [{s: _gains(sizes[s], g, 0.5) for s in ("ffn", "sa_heads", "ca_heads")}
                   for _ in range(as_config(config).num_layers or 0)]
    state: dict[str, torch.Tensor] = {}
    for key, (shape, axes) in wan_tensors(config).items():
        block = template_of(key)[1]
        if key.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
            continue
        if "modulation" in key:
            t = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = trained_like(shape[0], math.prod(shape[1:]), g, 1 / math.sqrt(math.prod(shape[1:]))).reshape(shape)
        gains = {**global_gains, **(block_gains[block] if block is not None else {})}
        for a, axis in enumerate(axes):  # shared per-index gains make importance consistent across tensors
            gain = torch.ones(1)
            for s in axis:
                gain = (gain[:, None] * gains.get(s, torch.ones(sizes[s]))[None, :]).reshape(-1)
            t = t * gain.reshape([-1 if d == a else 1 for d in range(t.ndim)])
        state[key] = t.contiguous()
    return state


DEMO_KINDS = ("trained", "synthetic")
MARKER = "demo.json"  # records which demo a folder holds


def write_demo(out: str | Path, force: bool = False, synthetic: bool = False) -> Path:
    """Write the demo into `out`: the trained teacher (original and sharded diffusers formats) and its calibration
    set, or the synthetic teacher, plus student configs. A folder that already holds this demo is left as it is, but
    for the student configs it lacks."""
    out = Path(out)
    kind = "synthetic" if synthetic else "trained"
    if out.exists() and not out.is_dir():
        raise ProjectionError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        held = demo_kind(out)
        if held == kind:  # already there; a student config a newer version added is written, none replaced
            for name, fields in (SYNTHETIC_STUDENTS if synthetic else STUDENTS).items():
                if not (out / name).exists():
                    (out / name).write_text(yaml.safe_dump(fields, sort_keys=False))
            return out
        if held is not None:
            raise ProjectionError(f"{out}: holds the {held} demo; pass --force to write the {kind} one over it")
        raise ProjectionError(f"{out}: exists and is not a demo folder; choose another or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    if synthetic:
        save_teacher(demo_state_dict(), SYNTHETIC, out / "teacher-wan", out / "teacher-diffusers")
        (out / "calibration.safetensors").unlink(missing_ok=True)  # the trained teacher's, if forced over it
        students, about = SYNTHETIC_STUDENTS, (
            "SYNTHETIC weights (random, with trained-like spectra), not a trained model.")
    else:
        copy_demo_teacher(out)
        students, about = STUDENTS, (
            "a small Wan teacher TRAINED on scikit-learn's handwritten digits (see the README's 'Demo teacher').\n"
            "calibration.safetensors: held-out latents and prompt states (latents, context, context_lengths, labels).")
    for name, fields in students.items():
        (out / name).write_text(yaml.safe_dump(fields, sort_keys=False))
    (out / "README.txt").write_text(
        f"Projection Inspector demo: {about}\n"
        "teacher-wan/: original Wan names, one safetensors file. teacher-diffusers/: the same weights under\n"
        "diffusers names, in 3 shards. student-*.yaml: student configs, one per layout (diffusers'\n"
        "WanTransformer3DModel, the reference 2D Wan, the seeds' layout).\n")
    (out / MARKER).write_text(json.dumps({"demo": kind}))
    return out


def demo_kind(folder: Path) -> str | None:
    """Which demo a folder holds ('trained', 'synthetic'), or None. Demos written before the marker existed
    were synthetic."""
    try:
        kind = json.loads((folder / MARKER).read_text()).get("demo")
        return kind if kind in DEMO_KINDS else None
    except (OSError, ValueError, AttributeError):
        readme = folder / "README.txt"
        if (folder / "teacher-wan" / "config.json").is_file() and readme.is_file() and "SYNTHETIC" in readme.read_text():
            return "synthetic"
        return None


WAN14B = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16,
          "text_dim": 4096, "freq_dim": 256}


def write_shape_only_teacher(folder: str | Path, config: dict[str, Any] = WAN14B) -> Path:
    """A Wan teacher of any size whose data section is a sparse hole: real headers, no disk, zeros if read.

    For trying mapping and the inspector at full scale (e.g. Wan 14B: 1095 keys, 57 GB) on any machine."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for key, (shape, _) in wan_tensors(config).items():
        n = math.prod(shape) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config}))
    return folder


def main(argv: list[str] | None = None) -> None:
    """`python -m projection.demo train`: retrain the demo teacher and rewrite its shipped files."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m projection.demo", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the demo teacher (seeded; about 25 minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=dt.ASSETS, help=f"folder for the teacher, classifier, calibration "
                   f"set and training.json (default: the package's {dt.ASSETS.name}/)")
    p.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[2] / "assets",
                   help="folder for the PNGs (training curve, samples; default: the repository's assets/)")
    p.add_argument("--steps", type=int, default=dt.TRAINING.steps, help="training steps (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the numbers depend on it; "
                   "one thread is also the fastest on a shared machine)")
    p.add_argument("--device", default="cpu", help="cpu (default, reproducible) or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    training = dt.TrainConfig(**{**dt.TRAINING.to_dict(), "steps": args.steps})
    record = dt.train_teacher(args.out, training=training, device=args.device, log=lambda line: print(line, flush=True))
    dt.plot_training(record, args.assets / "demo-teacher-training.png")
    dt.plot_samples(dt.load_teacher(args.out), args.assets / "demo-teacher-samples.png")
    print(f"wrote {args.out} and {args.assets}/demo-teacher-*.png in {record['wall_time_s']:.0f} s of training "
          f"(load average {record['load_average_before'][0]:.2f} -> {record['load_average_after'][0]:.2f})")


if __name__ == "__main__":
    main()
