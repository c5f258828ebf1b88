"""Exports pinned byte for byte (issue 19: the redesign moves code, never what it writes). The weights, config.json
and strategy.yaml of five demo exports are hashed: the default strategy, `layers: uniform`, activation width with
influence layers and the least-squares fit (on the demo's held-out set), the seeds' layout, and the diffusers layout.
projection_report.json and README.md hold times and paths, so they are not pinned. A change that should alter these
bytes must say why in its commit (issue 20: config.json lost the project's records, the weights' headers gained the
layout and the teacher's fingerprint; every tensor's bytes stayed; issue 23: the default layers became `first`, and
`layers: uniform` writes the earlier default's bytes exactly)."""
from __future__ import annotations

import hashlib

import pytest

from projection import Projector, Strategy
from projection.demo.teacher import demo_calibration
from projection.engine.export import export_student

PINNED = {
    "default": {"config.json": "500d23132b57d29c", "model.safetensors": "975e0bf0edb9150f",
                "strategy.yaml": "3185542c3fcd8cd6"},
    "uniform-layers": {"config.json": "500d23132b57d29c", "model.safetensors": "7f48a9957dcfd333",
                       "strategy.yaml": "6caa4ac16a486d9d"},
    "activation-influence-fit": {"config.json": "500d23132b57d29c", "model.safetensors": "94746a81c57a8338",
                                 "strategy.yaml": "0403c0a62842f3b8"},
    "seed-layout": {"config.json": "500d23132b57d29c", "model.safetensors": "baa065dcd7df1959",
                    "strategy.yaml": "3185542c3fcd8cd6"},
    "diffusers-layout": {"config.json": "ce6637c5a4185664", "diffusion_pytorch_model.safetensors": "b627db5cf9fe7fa5",
                         "strategy.yaml": "3185542c3fcd8cd6"},
}
STRATEGIES = {
    "default": ("student-wanlite.yaml", Strategy()),
    "uniform-layers": ("student-wanlite.yaml", Strategy(layers="uniform")),  # the default before issue 23 chose
    "activation-influence-fit": ("student-wanlite.yaml", Strategy(width="activation", layers="influence",
                                                                  fit="least-squares")),
    "seed-layout": ("student-seed.yaml", Strategy()),
    "diffusers-layout": ("student-diffusers.yaml", Strategy()),
}


def digests(folder) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.iterdir())
            if f.name not in ("projection_report.json", "README.md")}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_demo_exports_are_byte_identical(name, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    student, strategy = STRATEGIES[name]
    p = Projector.open(str(demo_dir / "teacher-wan"), str(demo_dir / student), strategy=strategy)
    if strategy.needs_calibration:
        p.calibrate(demo_calibration())
    export_student(p, tmp_path / "out")
    assert digests(tmp_path / "out") == PINNED[name]
