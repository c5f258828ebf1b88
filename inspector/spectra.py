"""The Spectra view: the singular values of a teacher matrix beside the student's, the cumulative energy curve
with the student's rank, and the retained-weight-energy heatmap (a weight statistic, redrawn with the view)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from projection import ProjectionError

from . import charts
from .bridge import plot, user_error
from .session import Session


class SpectraView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error)."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session]):
        self.state, self.session = state, session
        with gr.Row(elem_id="spec-row"):
            self.layer = gr.Dropdown([], label="Layer", scale=1, elem_id="spec-layer")
            self.matrix = gr.Dropdown([], label="Matrix", scale=2, elem_id="spec-matrix",
                                      allow_custom_value=True)  # API clients may name any 'student key#part'
            self.button = gr.Button("Compute spectrum", variant="primary", scale=0, min_width=240,
                                    elem_id="spec-button")
        with gr.Row():
            self.sv_plot = gr.Plot(show_label=False, elem_id="sv-plot")
            self.cum_plot = gr.Plot(show_label=False, elem_id="cum-plot")
        self.heatmap = gr.Plot(show_label=False, elem_id="heatmap")

    def wire(self, tab: gr.Tab) -> None:
        charts_out = [self.sv_plot, self.cum_plot]
        self.layer.input(self.choose_layer, [self.state, self.layer], [self.matrix, *charts_out],
                         api_visibility="private")
        self.button.click(self.spectrum, [self.state, self.matrix], charts_out, api_name="spectrum")
        self.matrix.input(self.spectrum, [self.state, self.matrix], charts_out, api_visibility="private")
        tab.select(self.spectrum, [self.state, self.matrix], charts_out, api_visibility="private")

    @property
    def components(self) -> list[gr.components.Component]:
        """What `redraw` updates."""
        return [self.heatmap]

    def redraw(self, s: Session) -> dict:
        return {self.heatmap: plot(charts.energy_heatmap(s.energy_grid(), s.mapping.layers))}

    def pickers(self, s: Session) -> dict:
        """Layer and matrix choices for a new mapping (block 0's first matrix to start with)."""
        layer = "0" if s.mapping.layers else "top"
        layers = [("embeddings & head", "top")] + [(f"student block {i}", str(i)) for i in range(len(s.mapping.layers))]
        return {self.layer: gr.update(choices=layers, value=layer), self.matrix: matrices(s, layer, None)}

    def choose_layer(self, state: Session | None, layer: str, progress: gr.Progress = gr.Progress()) -> tuple:
        """A new layer: its matrices, and the first one's charts (never the previous layer's)."""
        s = self.session(state)
        with s.lock:
            update = matrices(s, layer, None)
        return (update, *self.spectrum(state, update.get("value"), progress))

    def spectrum(self, state: Session | None, choice: str | None, progress: gr.Progress = gr.Progress()) -> tuple:
        s = self.session(state)
        if not choice:
            note = plot(charts.message("Singular values", "Pick a layer and a matrix."))
            return note, note
        progress(0.2, desc="singular values (cached after the first time)")
        with s.lock:
            try:
                sp = s.spectrum(choice)
            except ProjectionError as exc:
                raise user_error(exc) from exc
        student = None if sp.student is None else sp.student.tolist()
        return (plot(charts.spectrum(sp.teacher.tolist(), student, sp.title)),
                plot(charts.cumulative(sp.curve.tolist(), sp.rank, sp.energy, sp.stacked)))


def matrices(s: Session, layer: str, value: str | None) -> Any:
    """The layer's matrices as dropdown choices, keeping `value` where the layer has it."""
    found = s.matrices(layer)
    values = [v for _, v in found]
    return gr.update(choices=found, value=value if value in values else (values[0] if values else None))
