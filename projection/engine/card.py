"""The model card (README.md) every export writes: what the student is, where it came from, what it computes, and
how to load and train it. Built from the export's report and config.json, so it says nothing they do not."""
from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

from ..arch.config import as_config
from ..arch.layout import LAYOUTS
from ..arch.sizing import frameworks


def _shape_row(name: str, cfg: dict[str, Any], params: int) -> str:
    return (f"| {name} | {cfg.get('dim')} | {cfg.get('ffn_dim')} | {cfg.get('num_heads')} x {cfg.get('head_dim')} | "
            f"{cfg.get('num_layers')} | {cfg.get('in_dim')} / {cfg.get('out_dim')} | {params:,} |")


def _function(function: dict[str, Any] | None, out: str, teacher: str) -> list[str]:
    if function is None:
        return ["Not measured. This measures it (the teacher streams; `demo` fits only the demo teacher, "
                "`synthetic` is Gaussian inputs and says little):", "",
                f"    projection fidelity --teacher {teacher} --student {out} --calibration CALIBRATION.safetensors"]
    levels = function["noise_levels"]
    lines = [f"Velocity error against the teacher on {function['calibration']}, {function['noise_draws']} noise "
             f"draws per latent, noise levels s in [{levels[0]:g}, {levels[1]:g}] (0: the teacher's function; random "
             "init and per-matrix SVD for scale).", "", "| start | velocity error | cosine |", "|---|---|---|"]
    lines += [f"| {name} | {f['relative_error']:.4f} | {f['cosine']:.3f} |" for name, f in function["students"].items()]
    if function.get("measured_on"):
        lines += ["", f"Measured in {function['measured_on']}."]
    if function.get("calibration_synthetic"):
        lines += ["", "**Synthetic calibration (Gaussian inputs): these numbers say little about real inputs.**"]
    return lines


def _load(layout: str, out: str) -> list[str]:
    code = {
        "diffusers": ["from diffusers import WanTransformer3DModel",
                      f"transformer = WanTransformer3DModel.from_pretrained({out!r})  # torch_dtype=torch.bfloat16",
                      "# a WanPipeline takes it as its transformer"],
        "wan": ["from wan.modules.model import WanModel  # Wan's own repository",
                f"model = WanModel.from_pretrained({out!r})"],
    }.get(layout, [])
    code += ["import projection", f"student = projection.load_student({out!r})  # runs one latent frame, as here"]
    return ["```python", *code, "```"]


def model_card(report: dict[str, Any], config: dict[str, Any], strategy_yaml: str, out: str) -> str:
    """README.md for an export folder named `out`."""
    teacher, student, prov = report["teacher"], report["student"], report["provenance"]
    layout = prov["layout"]
    s_cfg = student["config"]
    name = PurePath(str(prov["teacher"])).name or prov["teacher"]
    share = student["params"] / teacher["params"] if teacher["params"] else 0.0
    energy = report["retained_weight_energy"].get("mean")
    where = LAYOUTS[layout].loads_in if layout in LAYOUTS else "the code its tensor names come from"
    lines = [
        f"# A student of {name}: {student['params']:,} parameters ({share:.1%} of the teacher's), {layout} layout",
        "",
        f"Projected by Projection Inspector {prov['projection_inspector']} on {prov['created'][:10]} from the teacher "
        f"`{prov['teacher']}` (content fingerprint `{prov['teacher_fingerprint']}`). Its weights are derived from "
        "the teacher's: the teacher's license applies to them.",
        "", "## Shape", "",
        "| | dim | FFN | heads x head dim | blocks | channels in / out | parameters |", "|---|---|---|---|---|---|---|",
        _shape_row("teacher", teacher["config"], teacher["params"]), _shape_row("student", s_cfg, student["params"]),
        "", f"Teacher blocks kept, in order: {report['layers']}.",
        "", "## What it computes", "", *_function(report.get("function"), out, str(prov["teacher"])),
        "", f"Retained weight energy (a weight statistic, not its function): {energy:.1%}." if energy is not None else
        "",
        "", "## Files and loading", "",
        f"Layout `{layout}`: loads in {where}. Weights: {', '.join(prov['weights'])} ({prov['dtype']}); "
        "config.json holds only what that loader takes; projection_report.json and strategy.yaml hold the "
        "projection's record.", "", *_load(layout, out), "",
        f"Frameworks that load a Wan model of this shape as it is: {', '.join(frameworks(as_config(s_cfg)))} "
        "(diffusers and the frameworks on it read the `diffusers` layout; Wan's code, ComfyUI, DiffSynth-Studio, "
        "musubi-tuner and diffusion-pipe read the `wan` layout: `projection export --layout wan`).",
        "", "## Strategy", "", "```yaml", strategy_yaml.rstrip(), "```",
        "", "## config.json", "", "```json", json.dumps(config, indent=1), "```", "",
    ]
    return "\n".join(lines)
