"""The Gallery view: the same prompts and noise seeds drawn by the teacher, the students of strategies A and B
(the Strategy tab's A/B editors) and a random student of the same shape, each row with its prompt accuracy and
its velocity error relative to the teacher. Teachers outside the demo's latent space draw for the first prompts of
the Function tab's calibration set, shown as Wan's RGB preview (nothing scores them). Rows are cached per strategy
in the session. After a probe (the Function tab's Probe recoverability), each probed start is drawn as the probe
began it and as its short distillation left it, scored like every other row."""
from __future__ import annotations

from collections.abc import Callable

import gradio as gr
import numpy as np
import pandas as pd

from projection import ProjectionError, Strategy
from projection.demo.gallery import PREVIEW_COLUMNS, GalleryRow, strip

from . import cards
from .bridge import stoppable
from .function import MAX_PROBE_FILES, PROBE_PICKS, placeholder
from .answers.function import RANDOM
from .answers.gallery import GALLERY_SAMPLER, TEACHER
from .session import Session
from .strategy import measured_on
from .units import percent

SAMPLE_PX = 104  # a sample's height on the page: 96 px or more reads from the back of a room (1280x720 projector)
ROWS = (("teacher", "Teacher"), ("a", "Student, strategy A"), ("b", "Student, strategy B"),
        ("random", "Random init, same shape"))
INTRO = (f"### What each choice draws\nPrompts 'a handwritten digit 0' … '9', one noise seed per column, "
         f"{GALLERY_SAMPLER.steps} Euler steps, no guidance: the same for every row. **Prompt accuracy**: the share "
         f"of {10 * GALLERY_SAMPLER.per_class} samples per row (seeds 0–{10 * GALLERY_SAMPLER.per_class - 1}) that "
         "the demo's digit classifier reads as the prompted digit. **Velocity error**: ‖v_student − v_teacher‖² / "
         "‖v_teacher‖² on the demo's held-out latents at step 0 (0 is the teacher's function; a random student "
         "is near 1). Students are projected, not trained. Strategies A and B are edited in the Strategy tab. Other "
         "Wan teachers (16-channel text-to-video) draw for the first prompts of the Function tab's calibration set, "
         "shown as RGB previews that nothing scores; their velocity error is measured on that set.")


def strategy_label(strategy: Strategy) -> str:
    """What sets a strategy apart from the default (projection fields only), e.g. 'width svd-per-matrix'."""
    default, fields = Strategy().model_dump(), strategy.model_dump(exclude={"dtype", "device", "expert", "seed"})
    changed = [f"{k} {v}" for k, v in fields.items() if v != default[k]]
    return ", ".join(changed) or "default strategy"


def caption(title: str, row: GalleryRow) -> str:
    error = "" if row.velocity_error is None else f" · velocity error {row.velocity_error:.2f}"
    scored = "RGB preview" if row.prompt_accuracy is None else (
        f"prompt accuracy {percent(row.prompt_accuracy)} of {row.scored}")
    return f"{title}: {scored}{error}"


def preview_note(label: str, synthetic: bool) -> str:
    """What a preview gallery shows, said before the pictures are read as more."""
    text = (f"RGB previews (Wan 2.1's linear latent-to-RGB: colours and coarse layout, not a VAE decode) of samples "
            f"for the first {PREVIEW_COLUMNS} prompts of {label}, seed i for prompt i, {GALLERY_SAMPLER.steps} Euler "
            "steps, no guidance. No classifier scores them; the velocity error is measured on the whole set.")
    return cards.warnings_banner([text]) if synthetic else cards.inline_ok(text)


def picture(row: GalleryRow) -> np.ndarray:
    """A row's samples side by side, each enlarged (without smoothing) to SAMPLE_PX pixels high or more: the
    page shows them at their own size, so a digit is as tall on a projector as here."""
    scale = max(1, -(-SAMPLE_PX // row.images.shape[-2]))
    return strip(row.images, scale=scale).numpy()


TABLE_COLUMNS = ["model", "prompt accuracy", "samples", "velocity error vs teacher (step 0)"]
AFTER_COLUMN = "velocity error vs teacher after the probe"
PROBE_SLOTS = 2 + len(PROBE_PICKS) + MAX_PROBE_FILES  # random init, the default, A, B, current, files


def table(rows: list[tuple[str, GalleryRow]], probed: list[tuple[str, GalleryRow, bool]] = ()) -> pd.DataFrame:
    """The rows' scores, then a probe's rows (title, row, trained: a trained student's error in a column of its
    own); before a draw, one row that says what will appear."""
    if not rows:
        return placeholder(TABLE_COLUMNS, "press “Draw samples”: one row per model")
    columns = TABLE_COLUMNS + ([AFTER_COLUMN] if probed else [])

    def line(title: str, r: GalleryRow, trained: bool) -> dict[str, object]:
        error = "—" if r.velocity_error is None else f"{r.velocity_error:.3f}"
        found = {"model": title, "prompt accuracy": "not scored" if r.prompt_accuracy is None
                 else percent(r.prompt_accuracy), "samples": r.scored or "—", TABLE_COLUMNS[-1]: error}
        if probed:
            found[AFTER_COLUMN], found[TABLE_COLUMNS[-1]] = (error, "—") if trained else ("—", error)
        return found
    return pd.DataFrame([line(title, r, False) for title, r in rows] + [line(*p) for p in probed], columns=columns)


def probe_titles(name: str, steps: int) -> tuple[str, str]:
    """A probed start's two rows: as the probe began it, and after it."""
    return f"{name}, untrained (the probe's start)", f"{name} after {steps}-step probe"


class GalleryView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error)."""

    def __init__(self, state: gr.State, a_yaml: gr.Code, b_yaml: gr.Code, session: Callable[[Session | None], Session]):
        self.state, self.a_yaml, self.b_yaml, self.session = state, a_yaml, b_yaml, session
        gr.Markdown(INTRO, elem_classes="note")
        with gr.Row(equal_height=True):
            self.draw_btn = gr.Button("Draw samples", variant="primary", scale=0, min_width=200, elem_id="gallery-draw")
            self.msg = gr.HTML(elem_id="gallery-msg")
        self.images = {name: gr.Image(label=title, interactive=False, buttons=[], elem_id=f"gallery-{name}",
                                      elem_classes=["gallery-row"], format="png") for name, title in ROWS}
        self.table = gr.Dataframe(table([]), interactive=False, show_label=False, elem_id="gallery-table")
        self.probe_note = gr.Markdown(
            "#### After a probe\nRun **Probe recoverability** in the Function tab, then draw again: each probed "
            "start appears as the probe began it and after its short distillation (at its best rate).",
            elem_id="gallery-probe-note")
        self.probed = [gr.Image(visible=False, interactive=False, buttons=[], elem_id=f"gallery-probe-{i}-{when}",
                                elem_classes=["gallery-row"], format="png")
                       for i in range(PROBE_SLOTS) for when in ("start", "after")]

    def wire(self) -> None:
        # progress beside the button, not over every picture (style.css gives it room)
        self.draw_btn.click(stoppable(self.draw), [self.state, self.a_yaml, self.b_yaml],
                            [self.msg, *self.images.values(), self.table, *self.probed], api_name="gallery",
                            show_progress_on=[self.msg])

    def draw(self, state: Session | None, a_text: str, b_text: str, progress: gr.Progress = gr.Progress()) -> tuple:
        s = self.session(state)
        skip = (gr.skip(),) * (len(ROWS) + 1 + len(self.probed))
        try:
            which = {"teacher": TEACHER, "a": Strategy.from_yaml(a_text, "strategy A"),
                     "b": Strategy.from_yaml(b_text, "strategy B"), "random": RANDOM}
        except ProjectionError as exc:
            return (cards.inline_error(str(exc)), *skip)
        drawn, after, notes = [], [], []
        with s.lock:
            probed = s.probed
            names = [o.name for o in probed.result.outcomes] if probed is not None and not probed.not_kept else []
            total = len(ROWS) + 2 * len(names)
            try:
                for i, (name, title) in enumerate(ROWS):
                    progress((i, total), desc=f"sampling: {title}")
                    drawn.append((name, title, s.gallery_row(which[name])))
                for i, name in enumerate(names):
                    titles = probe_titles(name, probed.result.config.steps)
                    for j, (title, trained) in enumerate(zip(titles, (False, True))):
                        progress((len(ROWS) + 2 * i + j, total), desc=f"sampling: {title}")
                        after.append((title, s.probe_row(name, trained), trained))
            except ProjectionError as exc:
                return (cards.inline_error(str(exc)), *skip)
            if probed is not None and probed.not_kept:
                notes.append(f"Not drawn after the probe: {probed.not_kept}.")
        titles = [f"{title} ({strategy_label(which[name])})" if name in ("a", "b") else title
                  for name, title, _ in drawn]
        images = [gr.update(value=picture(row), label=caption(title, row))
                  for title, (_, _, row) in zip(titles, drawn)]
        probe_images = [gr.update(value=picture(row), label=caption(title, row), visible=True)
                        for title, row, _ in after]
        probe_images += [gr.update(value=None, visible=False)] * (len(self.probed) - len(after))
        calibration = s.projector.calibration
        note = preview_note(calibration.label, calibration.synthetic) if s.previews else cards.inline_ok(
            f"Velocity errors vs the teacher measured on {measured_on(s)}; prompt accuracy: samples scored by the "
            "digit classifier." + (f" Below: each start of the last probe ({probed.result.calibration}) before and "
                                   "after it." if after else ""))
        return (note + (cards.warnings_banner(notes) if notes else ""), *images,
                table([(title, row) for title, (_, _, row) in zip(titles, drawn)], after), *probe_images)
