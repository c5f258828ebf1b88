"""The work bound follows the device a program runs on (the CLI's GPU may hold a real Wan calibration set; the
app keeps the default), and an export that refits does so on the strategy's device."""
from __future__ import annotations

import pytest
import torch

from projection import ProjectionError, Projector, Strategy
from projection.engine import export as export_module
from projection.function import budget
from projection.function.calibration import check_shapes

WAN14B = {"dim": 5120, "num_heads": 40, "ffn_dim": 13824, "text_dim": 4096, "in_dim": 16, "out_dim": 16}


def test_a_wan_calibration_set_of_1024_samples_is_a_valid_file():
    shapes = {"latents": (1024, 16, 60, 104), "context": (1024, 512, 4096)}
    check_shapes("wan.safetensors", shapes, {k: torch.bfloat16 for k in shapes}, WAN14B)  # no error
    with pytest.raises(ProjectionError, match="more than a calibration set may hold"):
        check_shapes("wan.safetensors", {"latents": (1025, 16, 60, 104), "context": (1025, 512, 4096)},
                     {k: torch.bfloat16 for k in shapes}, WAN14B)


def test_the_work_bound_is_the_callers_and_follows_the_device():
    shapes = ((512, 16, 60, 104), (512, 512, 4096))  # 512 real Wan latents at 480x832, one noise draw
    with pytest.raises(ProjectionError, match=r"would hold about .* GiB .* at most 8\.0 GiB"):
        budget.check_work("wan.safetensors", *shapes, WAN14B, 1)
    with budget.work_limit(80 << 30):
        work = budget.check_work("wan.safetensors", *shapes, WAN14B, 1)
    assert 8 << 30 < work.bytes < 80 << 30
    with pytest.raises(ProjectionError, match="at most 8.0 GiB"):  # the context is left as it was
        budget.check_work("wan.safetensors", *shapes, WAN14B, 1)
    assert budget.device_limit("cpu") == budget.MAX_WORK_BYTES


def test_an_export_that_refits_fits_on_the_strategys_device(demo_dir, tmp_path, monkeypatch):
    from projection.demo.teacher import demo_calibration

    monkeypatch.setenv("PROJECTION_CACHE", str(tmp_path / "cache"))
    seen = []
    build = export_module.projected_student

    def spy(projector, device="cpu", *args, **kwargs):
        seen.append(device)
        return build(projector, device, *args, **kwargs)

    monkeypatch.setattr(export_module, "projected_student", spy)
    p = Projector.open(str(demo_dir / "teacher-wan"), str(demo_dir / "student-wanlite.yaml"),
                       strategy=Strategy(fit="least-squares", device="cpu"))
    p.calibrate(demo_calibration().subset(16))
    export_module.export_student(p, tmp_path / "out")
    assert seen == [p.device] and isinstance(seen[0], torch.device)
