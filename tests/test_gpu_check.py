"""benchmarks/gpu_check.py cannot rot: its CPU run at tiny shapes goes through every check the GPU run makes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("demo-wan", "demo-diffusers", "random-diffusers")
EXPECTED = [
    "environment", "setup/random-diffusers", "forward-tf32/demo-wan",
    *(f"{check}/{s}" for s in SUBJECTS for check in ("forward", "activations", "removal", "spectra", "fit", "fidelity")),
    *(f"{check}/{s}/{dtype}" for s in SUBJECTS for dtype in ("float32", "bfloat16")
      for check in ("export", "load_student", "student_forward")),
    "calibrate/tiny-pipeline",
    "scale/write teacher", "scale/forward 12x20", "scale/forward 6x10", "scale/activations 12x20",
    "scale/fit 12x20", "scale/export 1 block student", "scale/export 2 block student", "scale/extrapolation",
    "wall time",
]
FIELDS = {"check", "device", "metric", "value", "tolerance", "ok"}
# projection calibrate's check needs its extra; without it the line is a skip (ok null), not a failure
CALIBRATE_EXTRA = all(importlib.util.find_spec(m) for m in ("diffusers", "transformers", "tokenizers", "PIL"))


def test_gpu_check_tiny_cpu_run_passes_every_check(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "TMPDIR": str(tmp_path)}  # its scratch folder too, so nothing is left elsewhere
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "gpu_check.json").read_text().splitlines()]
    for row in rows:
        assert FIELDS <= set(row), row
        assert row["device"] == "cpu"
    by_name = {row["check"]: row for row in rows}
    assert len(by_name) == len(rows), "a check name is recorded twice"
    missing = [name for name in EXPECTED if name not in by_name]
    assert not missing, f"checks missing from gpu_check.json: {missing}"
    unexpected = [name for name in by_name if name not in EXPECTED]
    assert not unexpected, f"checks this test does not know (add them to EXPECTED): {unexpected}"
    calibrate = by_name["calibrate/tiny-pipeline"]
    if CALIBRATE_EXTRA:  # it ran, through the CLI, on 4 captioned images: same set on both sides
        assert calibrate["ok"] is True and calibrate["context_lengths_equal"], calibrate
        assert calibrate["latents_shape"] == [4, 4, 4, 6] and calibrate["context_shape"] == [4, 512, 24]
    else:
        assert calibrate["ok"] is None and "cannot import" in calibrate["skipped"], calibrate
        del by_name["calibrate/tiny-pipeline"]
    failed = {name: (row["value"], row["tolerance"], row.get("error")) for name, row in by_name.items()
              if row["ok"] is not True}
    assert not failed, failed
    # the scale part measured something and wrote its formulas; the summary table was printed
    assert by_name["scale/extrapolation"]["formulas"]
    assert by_name["scale/write teacher"]["tensor_bytes"] == by_name["scale/write teacher"]["predicted_tensor_bytes"]
    assert "49 checks, 0 failed" in run.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gpu_check_work-")], "scratch folder left behind"
