"""The Function view: run the teacher on a calibration set and show what the student computes next to it (the
core's `projection.engine.report.function_report`): the velocity error per noise level for the student and two
references of its shape, per student block, each teacher block's influence and removal effect, and how far
weight-ranked and activation-ranked index sets agree. The set measured on is also the one activation choices
and the least-squares fit use from then on."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from projection import ProjectionError
from projection.demo import teacher as demo_teacher
from projection.function import calibration as sets
from projection.function.calibration import Calibration

from . import cards
from .bridge import stoppable
from .paths import Roots
from .session import Session
from .units import human_bytes

DEMO, FILE, SYNTHETIC = "demo held-out digits", "file", "synthetic (a guess)"  # the choices, as shown
MAX_LATENTS = 512  # latents measured at most (each is run through the teacher once per noise draw)
DEFAULT_LATENTS = 64
MAX_CALIBRATION_BYTES = 2 << 30  # a calibration file is read whole
REFERENCES = ("student", "random init", "svd-per-matrix")
INTRO = ("### What the student computes\nThe teacher runs on a calibration set block by block (one block of its "
         "weights in memory); the student and two references of its shape (random init, and the seeds' per-matrix "
         "SVD) run on the same inputs at fixed noise. **Velocity error**: ‖v_student − v_teacher‖² / ‖v_teacher‖² "
         "(0 is the teacher's function; an unrelated model is near 1). **Per block**: each student block's output "
         "against the teacher block it came from, on the kept residual channels. The set measured on also becomes "
         "the one activation choices and the least-squares fit use.")


def open_source(source: str, path_text: str, count: float | None, roots: Roots, config: dict[str, Any]) -> Calibration:
    """The calibration set the view's controls name, at most `count` latents; a file must lie under the roots."""
    n = int(count) if count is not None else DEFAULT_LATENTS
    if not 1 <= n <= MAX_LATENTS:
        raise ProjectionError(f"latents: {n} is outside 1..{MAX_LATENTS}")
    if source == DEMO:
        calibration = demo_teacher.open_calibration(demo_teacher.DEMO, config)  # refused outside the demo's space
    elif source == SYNTHETIC:
        calibration = sets.synthetic_calibration(config, n=n)
    elif source == FILE:
        path = Path(roots.source(path_text, "calibration file", hub_ids=False))  # resolved, under a root
        if not path.is_file():
            raise ProjectionError(f"calibration file '{path_text}': not a file (a .safetensors with latents, context)")
        size = path.stat().st_size
        if size > MAX_CALIBRATION_BYTES:
            raise ProjectionError(f"calibration file '{path_text}' is {human_bytes(size)}; the app reads sets up to "
                                  f"{human_bytes(MAX_CALIBRATION_BYTES)} (use the CLI for larger ones)")
        calibration = sets.load_calibration(path, config, check=roots.check)  # checked again as it is opened
    else:
        raise ProjectionError(f"calibration source '{source}': choose one of {DEMO}, {FILE}, {SYNTHETIC}")
    return calibration.subset(n) if len(calibration) > n else calibration


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def levels_frame(fidelity: dict[str, Any]) -> pd.DataFrame:
    """Velocity error (and the student's cosine) per band of noise levels, then over all of them."""
    students = fidelity["students"]
    bands = [(f"s {b['s_low']:.2f}–{b['s_high']:.2f}", k) for k, b in enumerate(students["student"]["by_level"])]
    rows = []
    for label, k in [*bands, ("all levels", None)]:
        pick = (lambda f: f) if k is None else (lambda f, k=k: f["by_level"][k])
        row = {"noise levels": label}
        for name in REFERENCES:
            row[f"{name}: error"] = _num(pick(students[name])["relative_error"])
        row["student: cosine"] = _num(pick(students["student"])["cosine"])
        rows.append(row)
    return pd.DataFrame(rows)


def blocks_frame(fidelity: dict[str, Any]) -> pd.DataFrame:
    per_block = fidelity.get("blocks")
    if not per_block:
        return pd.DataFrame([{"per student block": "not measured for this student layout"}])
    return pd.DataFrame([{"student block": row["block"], "from teacher block": row["teacher_block"],
                          **{f"{name}: error": _num(per_block[name][i]["relative_error"]) for name in REFERENCES}}
                         for i, row in enumerate(per_block["student"])])


def teacher_frame(report: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"teacher block": b["block"], "influence 1 − cos(h_in, h_out)": _num(b["influence"], 4),
                          "velocity error with it removed": _num(b["removal_error"], 4),
                          "feeds student blocks": ", ".join(map(str, b["feeds"])) or "none"}
                         for b in report["teacher_blocks"]])


def agreement_frame(report: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"space": a["label"], "weights and activations keep the same": f"{100 * a['overlap']:.0f}%",
                          "by chance": f"{100 * a['chance']:.0f}%"} for a in report["agreement"]])


def summary(report: dict[str, Any], calibration: Calibration) -> str:
    fidelity = report["fidelity"]
    students = fidelity["students"]
    line = (f"Measured on {calibration.label}: {len(calibration)} latents × {fidelity['noise_draws']} noise draws, "
            f"levels s in [{fidelity['noise_levels'][0]:.3f}, {fidelity['noise_levels'][1]:.3f}]. Velocity error: "
            f"student {students['student']['relative_error']:.3f}, random init "
            f"{students['random init']['relative_error']:.3f}, svd-per-matrix "
            f"{students['svd-per-matrix']['relative_error']:.3f}.")
    if calibration.synthetic:
        return cards.warnings_banner([f"SYNTHETIC calibration: Gaussian latents and context, not real inputs. These "
                                      f"numbers are a guess at what the student computes. {line}"])
    return cards.inline_ok(line)


class FunctionView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error)."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session], roots: Roots):
        self.state, self.session, self.roots = state, session, roots
        gr.Markdown(INTRO, elem_classes="note")
        with gr.Row(equal_height=True):
            self.source = gr.Radio([DEMO, FILE, SYNTHETIC], value=DEMO, label="Calibration set", scale=2,
                                   elem_id="function-source")
            self.path = gr.Textbox(label=f"Calibration file (.safetensors under {roots.base})", scale=3,
                                   elem_id="function-path")
            self.count = gr.Number(DEFAULT_LATENTS, label=f"Latents (at most {MAX_LATENTS})", precision=0,
                                   minimum=1, maximum=MAX_LATENTS, scale=1, elem_id="function-count")
        with gr.Row(equal_height=True):
            self.measure_btn = gr.Button("Measure", variant="primary", scale=0, min_width=200,
                                         elem_id="function-measure")
            self.msg = gr.HTML(elem_id="function-msg")
        gr.Markdown("#### Velocity error against the teacher, per noise level")
        self.levels = gr.Dataframe(interactive=False, show_label=False, elem_id="function-levels")
        gr.Markdown("#### Per student block: its output against the teacher block it came from (kept channels)")
        self.blocks = gr.Dataframe(interactive=False, show_label=False, elem_id="function-blocks")
        gr.Markdown("#### Teacher blocks: influence, and the teacher's velocity error with each removed alone")
        self.teacher = gr.Dataframe(interactive=False, show_label=False, elem_id="function-teacher")
        gr.Markdown("#### Do weights and activations choose the same? Share of kept indices both rankings keep")
        self.agreement = gr.Dataframe(interactive=False, show_label=False, elem_id="function-agreement")

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [self.msg, self.levels, self.blocks, self.teacher, self.agreement]

    def wire(self) -> gr.events.Dependency:
        """The Measure event; the caller chains its own redraw (the Layers tab's influence) on success."""
        return self.measure_btn.click(stoppable(self.measure), [self.state, self.source, self.path, self.count],
                                      self.outputs, api_name="function")

    def measure(self, state: Session | None, source: str, path: str, count: float | None,
                progress: gr.Progress = gr.Progress()) -> tuple:
        s = self.session(state)
        with s.lock:
            try:
                calibration = open_source(source, path, count, self.roots, s.projector.teacher.config)
                report = s.measure_function(calibration, lambda i, n, what: progress((i, max(n, 1)), desc=what))
            except ProjectionError as exc:
                raise gr.Error(str(exc), title="Function not measured") from exc
        fidelity = report["fidelity"]
        return (summary(report, calibration), levels_frame(fidelity), blocks_frame(fidelity), teacher_frame(report),
                agreement_frame(report))
