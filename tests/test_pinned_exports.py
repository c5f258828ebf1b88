"""Exports pinned byte for byte (issue 19: the redesign moves code, never what it writes). The weights, config.json
and strategy.yaml of three demo exports are hashed: the default strategy, activation width with influence layers
and the least-squares fit (on the demo's held-out set), and the seeds' layout. projection_report.json holds times
and paths, so it is not pinned. A change that should alter these bytes must say why in its commit."""
from __future__ import annotations

import hashlib

import pytest

from projection import Projector, Strategy
from projection.demo.teacher import demo_calibration
from projection.engine.export import export_student

PINNED = {
    "default": {"config.json": "48f6e66d5b08246a", "model.safetensors": "3f02ae2152e9e7e3",
                "strategy.yaml": "6caa4ac16a486d9d"},
    "activation-influence-fit": {"config.json": "48f6e66d5b08246a", "model.safetensors": "550f99cad9d17279",
                                 "strategy.yaml": "0403c0a62842f3b8"},
    "seed-layout": {"config.json": "101bd20c9a7080ac", "model.safetensors": "37ba7dd1a71ef8e2",
                    "strategy.yaml": "6caa4ac16a486d9d"},
}
STRATEGIES = {
    "default": ("student-wanlite.yaml", Strategy()),
    "activation-influence-fit": ("student-wanlite.yaml", Strategy(width="activation", layers="influence",
                                                                  fit="least-squares")),
    "seed-layout": ("student-seed.yaml", Strategy()),
}


def digests(folder) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.iterdir())
            if f.name != "projection_report.json"}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_demo_exports_are_byte_identical(name, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    student, strategy = STRATEGIES[name]
    p = Projector.open(str(demo_dir / "teacher-wan"), str(demo_dir / student), strategy=strategy)
    if strategy.needs_calibration:
        p.calibrate(demo_calibration())
    export_student(p, tmp_path / "out")
    assert digests(tmp_path / "out") == PINNED[name]
