"""Step-0 velocity error of the demo's half-width, half-depth student under each choice and ridge strength.

    python benchmarks/bench_fit.py [--lambdas 1e-3 1e-2 0.1 0.3 1 3]

Activation choices and the fit run on the first 256 latents of the demo's training split; the error is measured
on the 269 held-out latents (4 fixed noise draws each), against the teacher.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from projection import Projector, Strategy, projected_student  # noqa: E402
from projection.demo import digits, teacher as dt  # noqa: E402
from projection.demo.teacher import demo_calibration  # noqa: E402
from projection.function.calibration import Calibration  # noqa: E402
from projection.function.fidelity import velocity_fidelity  # noqa: E402
from projection.function.fit import fit_student  # noqa: E402

HALF = {"layout": "wanlite", "dim": 64, "num_heads": 2, "ffn_dim": 256, "num_layers": 4}
CHOICES = {"magnitude (default)": {},
           "activation + influence": {"width": "activation", "heads": "activation", "ffn": "activation",
                                      "head_dim": "activation", "layers": "influence"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, held_out = dt.load_teacher(), demo_calibration()
    train = digits.load_digits("train")
    calibration = Calibration(digits.encode(train.images[:256]), digits.label_states(train.labels[:256]),
                              "the first 256 latents of the demo's training split")
    cache = Path(tempfile.mkdtemp())
    print("| choices | lambda | velocity error, selected | after the fit | fit time |\n|---|---|---|---|---|")
    for name, fields in CHOICES.items():
        for lam in args.lambdas:
            p = Projector.open(str(dt.ASSETS / "teacher-wan"), HALF, strategy=Strategy(**fields))
            p.calibrate(calibration, cache=cache)
            model = projected_student(p)
            before = velocity_fidelity(model, teacher, held_out.latents, held_out.context).relative_error
            started = time.perf_counter()
            fit_student(p.plan(), model, calibration, lam=lam)
            seconds = time.perf_counter() - started
            after = velocity_fidelity(model, teacher, held_out.latents, held_out.context).relative_error
            print(f"| {name} | {lam:g} | {before:.4f} | {after:.4f} | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
