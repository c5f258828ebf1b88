"""The Layers view: which teacher block each student block copies (a method or a slider per block), the block
map with each teacher block's influence where the Function tab measured it, and retained weight energy per
layer (a weight statistic)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gradio as gr

from projection.core.strategy import DEFAULT_LAYERS, LAYER_METHODS

from . import charts
from .bridge import Components, Refresh, plot, toast
from .session import Session

MAX_BLOCKS = 48  # Gradio needs a fixed number of sliders: this many are created and shown as needed
SLIDER_CLASSES = ["block-slider"]

# Run on page load. Leaving an emptied number box makes Gradio clamp it to the slider's minimum (block 0), and an
# input event Gradio deferred while a refresh was in flight then sends that 0 as if typed. So the value a box holds
# before each edit is kept, and an emptied box gets it back before Gradio's own blur handler runs.
SLIDER_JS = """() => {
  const boxOf = (event) => event.target.closest?.(".block-slider") && event.target.type === "number" && event.target;
  document.addEventListener("beforeinput", (event) => {
    const box = boxOf(event);
    if (box && box.value !== "") box.dataset.before = box.value;
  }, true);
  document.addEventListener("blur", (event) => {
    const box = boxOf(event);
    if (!box || box.value !== "" || box.dataset.before === undefined) return;
    box.value = box.dataset.before;
    box.dispatchEvent(new Event("input", {bubbles: true}));
  }, true);
}"""


def block_problem(value: Any, top: int) -> str | None:
    """Why a slider value is not a teacher block 0..top (None when it is one)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{value!r} is not a block number"
    if not math.isfinite(number) or number != int(number):
        return f"{number:g} is not a whole block number"
    if not 0 <= number <= top:
        return f"no teacher block {number:g} (0–{top})"
    return None


class LayersView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error), and
    `refresh` is the app's: it applies a change and redraws every view."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session], refresh: Refresh):
        self.state, self.session, self.refresh = state, session, refresh
        with gr.Row(elem_id="sliders"):  # the method, then a slider per student block: drag, arrow keys or type
            self.method = gr.Radio([*LAYER_METHODS, "custom"], value=DEFAULT_LAYERS, elem_id="layer-method",
                                   label="Teacher block per student block", scale=0, min_width=560,
                                   info="first: the first S (the default); uniform: round(i·(T−1)/(S−1)), first "
                                        "and last kept; influence: the most influential")
            self.sliders = [gr.Slider(0, 1, value=0, step=1, label=f"S{i} ← T", visible=False,
                                      min_width=120, buttons=[], elem_classes=SLIDER_CLASSES)
                            for i in range(MAX_BLOCKS)]
        with gr.Row(elem_id="layer-charts"):
            self.layer_map = gr.Plot(show_label=False, elem_id="layer-map", scale=1)
            self.layer_energy = gr.Plot(show_label=False, elem_id="layer-energy", scale=1)

    @property
    def components(self) -> list[gr.components.Component]:
        """What `redraw` updates."""
        return [self.layer_map, self.layer_energy, self.method, *self.sliders]

    def wire(self, table_view: Components, outputs: list[gr.components.Component]) -> None:
        """The method is wired with the strategy (StrategyView); the sliders here. `table_view` is the Mapping
        tab's filters a redraw keeps, `outputs` everything a refresh redraws.

        A slider's `input` fires on drag, arrow keys and typing; `release` on pointer-up and when its number box
        loses focus (where Gradio then clamps the box silently: settle_layers puts back what is in use). The
        sliders' values are checked here, not by Gradio, so a bad one is answered beside its slider."""
        inputs = [self.state, *table_view.values(), *self.sliders]  # sliders: a list by nature, one per block
        for i, slider in enumerate(self.sliders):
            for event, handler in ((slider.input, self.set_layers), (slider.release, self.settle_layers)):
                first = i == 0 and handler == self.set_layers
                event(handler, inputs, outputs, preprocess=False, trigger_mode="always_last",
                      show_progress="minimal", show_progress_on=[self.layer_map, self.layer_energy],
                      api_name="set_layers" if first else None, api_visibility="public" if first else "private")

    def redraw(self, s: Session, summary: dict[str, Any]) -> dict:
        layers = s.mapping.layers
        energy = summary.get("retained_weight_energy")
        out: dict = {
            self.layer_map: plot(charts.layer_map(layers, s.teacher_blocks, s.block_influence())),
            self.layer_energy: plot(charts.layer_energy(energy and energy["by_layer"], layers,
                                                        energy and energy["mean"])),
            self.method: s.strategy.layers if isinstance(s.strategy.layers, str) else "custom",
        }
        if s.shown_layers != layers:
            s.shown_layers = list(layers)
            top = max(s.teacher_blocks - 1, 1)
            for i, slider in enumerate(self.sliders):
                out[slider] = (gr.update(visible=True, value=layers[i], maximum=top)
                               if i < len(layers) else gr.update(visible=False))
        for slider, note in self.clear_error(s).items():  # a rejected value's note goes on any refresh
            out[slider] = {**out.get(slider, gr.update()), **note}
        return out

    def clear_error(self, s: Session) -> dict:
        if s.slider_error is None:
            return {}
        slider, s.slider_error = self.sliders[s.slider_error], None
        return {slider: gr.update(info="", elem_classes=SLIDER_CLASSES)}

    def set_layers(self, state: Session | None, statuses: list[str], search: str, sort: str, key: str | None,
                   *sliders: Any) -> dict:
        """The sliders' values (raw: Gradio does not check them) become the layers. A value outside the teacher's
        blocks is answered beside its slider, which goes back to the block in use; an empty box is mid-edit."""
        s = self.session(state)
        with s.lock:
            current, top = list(s.mapping.layers), s.teacher_blocks - 1
            chosen = list(sliders[:len(current)])
            for i, value in enumerate(chosen):
                if value is None or value == "":
                    chosen[i] = current[i]  # the box is being retyped: wait for a number
                    continue
                problem = block_problem(value, top)
                if problem:
                    out = self.clear_error(s)
                    s.slider_error = i
                    out[self.sliders[i]] = gr.update(value=current[i], info=f"⚠ {problem}: still T{current[i]}",
                                                     elem_classes=[*SLIDER_CLASSES, "invalid"])
                    return out
            layers = [int(v) for v in chosen]
            if layers == current and s.slider_error is None:
                return {self.method: gr.skip()}  # nothing changed (e.g. the release after a drag)

        def change(s: Session) -> None:
            if layers != s.mapping.layers:
                s.update_strategy(layers=layers)
            s.shown_layers = layers  # the sliders already show them

        table_view = {"statuses": statuses, "search": search, "sort": sort, "key": key}
        return self.refresh(state, table_view, change, toast("Layers rejected"))

    def settle_layers(self, state: Session | None, statuses: list[str], search: str, sort: str, key: str | None,
                      *sliders: Any) -> dict:
        """A released slider or a number box left: as set_layers, and an emptied box shows the block in use again
        (Gradio would show the minimum)."""
        out = self.set_layers(state, statuses, search, sort, key, *sliders)
        s = self.session(state)
        for i, value in enumerate(sliders[:len(s.mapping.layers)]):
            if (value is None or value == "") and self.sliders[i] not in out:
                out[self.sliders[i]] = gr.update(value=s.mapping.layers[i])
        return out
