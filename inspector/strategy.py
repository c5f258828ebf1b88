"""The Strategy view: every option of the projection strategy (controls and the YAML of every field, saved and
loaded as a file), and the A/B comparison of two strategies on the same teacher, student and rules, which leads
with what each student computes and puts retained weight energy after it, labelled a weight statistic."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from projection import ProjectionError, Strategy
from projection.demo.gallery import GalleryRow
from projection.function.fidelity import Fidelity
from projection.io.inputs import read_text

from . import cards, charts
from .bridge import Components, Refresh, choices, info, plot, progress_to, stoppable, toast
from .session import Session
from .units import percent

Compared = dict[str, tuple[Fidelity, list[dict[str, float]] | None]]  # Session.compare_function: A, B, random init
FIELDS = ("width", "heads", "head_dim", "ffn", "conv", "rescale")  # one control each; layers: the Layers tab
COMPARE_INTRO = ("### A/B comparison\nTwo strategies on the same teacher, student and rules. First what each "
                 "student computes: its velocity error relative to the teacher at step 0, per noise level and per "
                 "student block, beside a random student of the same shape (on the first 64 of the demo's held-out "
                 "digits or, for other teachers, the Function tab's calibration set: the set the card, the Function "
                 "view and the Gallery measure on). The prompt accuracy of the samples shows once the Gallery tab "
                 "has drawn them. Then coverage, then retained weight energy per layer: a weight statistic, not "
                 "output quality (a basis-inconsistent strategy's energy is not comparable).")


def measured_on(s: Session) -> str:
    """The set the Gallery's and the comparison's velocity errors are measured on, with its number of latents and
    noise draws (the card's and the Function view's default set)."""
    return s.reference_set()[1]


def comparison_frame(ra: dict[str, Any], rb: dict[str, Any], function: Compared | None, on: str,
                     drawn: tuple[GalleryRow | None, GalleryRow | None] = (None, None)) -> pd.DataFrame:
    """Rows of the A/B table: the students' velocity errors where measured (`on` names the set) and the prompt
    accuracy of their samples where the Gallery drew them, then coverage, then retained weight energy, marked not
    comparable across bases."""
    ea, eb = ra["retained_weight_energy"], rb["retained_weight_energy"]
    comparable = ra["basis_consistent"] and rb["basis_consistent"]

    def row(measure: str, x: float | None, y: float | None, same_basis: bool = True) -> dict[str, str]:
        diff = ("—" if x is None or y is None else f"{100 * (y - x):+.1f} pt" if same_basis
                else "not comparable")  # energies in different bases are no contest (the chart says why)
        return {"measure": measure, "A": percent(x), "B": percent(y), "B − A": diff}

    rows = []
    if function is not None:  # what the student computes leads; weight statistics follow
        va, vb = function["A"][0].relative_error, function["B"][0].relative_error
        rows.append({"measure": f"velocity error vs teacher, step 0 (lower is better){on}",
                     "A": f"{va:.3f}", "B": f"{vb:.3f}", "B − A": f"{vb - va:+.3f}"})
        da, db = drawn
        if da is not None and db is not None and da.prompt_accuracy is not None:
            rows.append(row(f"prompt accuracy of {da.scored} samples", da.prompt_accuracy, db.prompt_accuracy))
    for name in ("keys", "params"):
        rows.append(row(f"{name} transferred", ra["coverage"][name]["rate"], rb["coverage"][name]["rate"]))
    rows.append(row("retained weight energy (weight statistic)", ea["mean"], eb["mean"], comparable))
    for layer in dict.fromkeys([*ea["by_layer"], *eb["by_layer"]]):
        rows.append(row(f"weight energy {layer} (weight statistic)", ea["by_layer"].get(layer),
                        eb["by_layer"].get(layer), comparable))
    return pd.DataFrame(rows)


class StrategyView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error), and
    `refresh` is the app's: it applies a change and redraws every view."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session], refresh: Refresh,
                 strategy: Strategy):
        self.state, self.session, self.refresh = state, session, refresh
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.controls = {f: gr.Radio(choices(f), value=getattr(strategy, f), label=f, info=info(f))
                                 for f in FIELDS}
                self.seed = gr.Number(strategy.seed, label="seed", info=info("seed"), precision=0)
                gr.Markdown("Layers: **Layers** tab · expert: **Sources** tab · dtype and device: **Export** tab.",
                            elem_classes="note")
            with gr.Column(scale=2):
                self.yaml = gr.Code(language="yaml", lines=14, label="Strategy (every field)", interactive=True,
                                    elem_id="strategy-yaml")
                with gr.Row():
                    self.apply_btn = gr.Button("Apply YAML", variant="primary", size="md")
                    self.save_btn = gr.Button("Save", size="md")
                    self.upload_btn = gr.UploadButton("Load…", file_types=[".yaml", ".yml"], size="md")
                self.msg = gr.HTML(elem_id="strategy-msg")
                self.file = gr.File(label="strategy.yaml", visible=False)
        gr.Markdown(COMPARE_INTRO)
        with gr.Row():
            with gr.Column():
                self.a_yaml = gr.Code(language="yaml", lines=12, label="Strategy A", interactive=True,
                                      show_line_numbers=False)
                self.a_btn = gr.Button("A ← current strategy", size="sm")
            with gr.Column():
                self.b_yaml = gr.Code(language="yaml", lines=12, label="Strategy B", interactive=True,
                                      show_line_numbers=False)
                self.b_btn = gr.Button("B ← current strategy", size="sm")
        self.compare_btn = gr.Button("Compare A and B", variant="primary")
        self.compare_msg = gr.HTML(elem_id="compare-msg")
        with gr.Column(visible=False) as self.compare_row:  # the table the page's width, A, B and B − A in view
            self.compare_table = gr.Dataframe(interactive=False, show_label=False, wrap=True, elem_id="compare-table",
                                              column_widths=["58%", "14%", "14%", "14%"], max_height=600)
            self.compare_plot = gr.Plot(show_label=False, elem_id="compare-plot")  # what they compute
            self.compare_energy = gr.Plot(show_label=False, elem_id="compare-energy-plot")  # a weight statistic

    def wire(self, method: gr.Radio, table_view: Components, outputs: list[gr.components.Component]) -> None:
        """`method` is the Layers tab's choice of blocks (part of the strategy); `table_view` the Mapping tab's
        filters a redraw keeps; `outputs` everything a refresh redraws."""
        controls = list(self.controls.values())
        named = {"method": method, **self.controls, "seed": self.seed, **table_view}
        for i, component in enumerate([method, *controls]):
            component.input(self.set_strategy, self.state, outputs, inputs_kwargs=named, show_progress="minimal",
                            trigger_mode="always_last",  # the last choice wins, none is dropped
                            api_name="set_strategy" if i == 0 else None, api_visibility="public" if i == 0 else "private")
        self.seed.blur(self.set_strategy, self.state, outputs, inputs_kwargs=named, show_progress="hidden",
                       api_visibility="private")
        applied = outputs + [*controls, self.seed, self.msg]
        self.apply_btn.click(self.apply_yaml, [self.state, self.yaml], applied, inputs_kwargs=table_view,
                             api_name="apply_strategy_yaml")
        self.upload_btn.upload(self.load_file, [self.state, self.upload_btn], applied, inputs_kwargs=table_view,
                               api_visibility="private")
        self.save_btn.click(self.save, self.state, self.file, api_name="save_strategy")
        self.a_btn.click(self.current, self.state, self.a_yaml, api_visibility="private")
        self.b_btn.click(self.current, self.state, self.b_yaml, api_visibility="private")
        self.compare_btn.click(stoppable(self.compare), [self.state, self.a_yaml, self.b_yaml],
                               [self.compare_table, self.compare_plot, self.compare_energy, self.compare_msg,
                                self.compare_row],
                               api_name="compare", show_progress_on=[self.compare_msg])

    @property
    def components(self) -> list[gr.components.Component]:
        """What `redraw` updates."""
        return [self.yaml]

    def redraw(self, s: Session) -> dict:
        return {self.yaml: s.strategy.to_yaml()}

    def loaded(self, s: Session) -> dict:
        """A newly loaded session's strategy in the controls; A is it, B its per-matrix-SVD variant."""
        strategy = s.strategy
        return {**{self.controls[f]: getattr(strategy, f) for f in FIELDS}, self.seed: strategy.seed,
                self.a_yaml: strategy.to_yaml(),
                self.b_yaml: strategy.model_copy(update={"width": "svd-per-matrix"}).to_yaml()}

    def set_strategy(self, state: Session | None, *, method: str, width: str, heads: str, head_dim: str, ffn: str,
                     conv: str, rescale: str, seed: float | None, **table_view: Any) -> dict:
        def change(s: Session) -> None:
            fields: dict[str, Any] = {"width": width, "heads": heads, "head_dim": head_dim, "ffn": ffn,
                                      "conv": conv, "rescale": rescale,
                                      "seed": int(seed) if seed is not None else s.strategy.seed}
            if method != "custom":
                fields["layers"] = method
            s.update_strategy(**fields)

        return self.refresh(state, table_view, change, toast("Strategy rejected"))

    def apply_yaml(self, state: Session | None, text: str, **table_view: Any) -> dict:
        def change(s: Session) -> None:
            strategy = Strategy.from_yaml(text, "strategy")
            if strategy.expert != s.strategy.expert:
                raise ProjectionError("strategy: the expert is chosen with the teacher (Sources tab); "
                                      f"this session uses expert {s.strategy.expert}")
            s.set_strategy(strategy)

        def applied(s: Session) -> dict:
            return {**{self.controls[f]: getattr(s.strategy, f) for f in FIELDS},
                    self.seed: s.strategy.seed, self.msg: cards.inline_ok("Strategy applied.")}

        return self.refresh(state, table_view, change, lambda exc: {self.msg: cards.inline_error(str(exc))}, applied)

    def load_file(self, state: Session | None, file: Any, **table_view: Any) -> dict:
        path = file if isinstance(file, str) else getattr(file, "name", None)
        try:
            text = read_text(path, "strategy") if path else ""
        except ProjectionError as exc:  # too large, not UTF-8: named by the uploaded name, not the server's copy
            return {self.msg: cards.inline_error(str(exc).replace(str(path), Path(path).name))}
        out = self.apply_yaml(state, text, **table_view)
        out.setdefault(self.yaml, text)
        return out

    def save(self, state: Session | None) -> Any:
        s = self.session(state)
        path = s.folder / "strategy.yaml"
        path.write_text(s.strategy.to_yaml())
        return gr.update(value=str(path), visible=True)

    def current(self, state: Session | None) -> str:
        return self.session(state).strategy.to_yaml()

    def compare(self, state: Session | None, a_text: str, b_text: str,
                progress: gr.Progress = gr.Progress()) -> tuple:
        s = self.session(state)
        try:
            a, b = Strategy.from_yaml(a_text, "strategy A"), Strategy.from_yaml(b_text, "strategy B")
        except ProjectionError as exc:
            return gr.skip(), gr.skip(), gr.skip(), cards.inline_error(str(exc)), gr.skip()
        with s.lock:
            try:
                result = s.compare(a, b, progress_to(progress, "projecting"))
                unavailable = s.function_unavailable()
                if unavailable is None:
                    progress((1, 2), desc="velocity errors: A, B and random init against the teacher")
                function = None if unavailable else s.compare_function(a, b)
            except ProjectionError as exc:
                return gr.skip(), gr.skip(), gr.skip(), cards.inline_error(str(exc)), gr.skip()
            drawn = (s.drawn_row(a), s.drawn_row(b)) if function is not None else (None, None)
            on = "" if function is None else measured_on(s)
        ra, rb = result["A"], result["B"]
        notes = [f"{side}: {w}" for side, r in (("A", ra), ("B", rb)) for w in r["warnings"]]
        if function is None:
            notes.append(f"Function not measured: {unavailable}")
        consistent = (ra["basis_consistent"], rb["basis_consistent"])
        energy = charts.compare(ra["retained_weight_energy"]["by_layer"], rb["retained_weight_energy"]["by_layer"],
                                consistent)
        lead = (charts.message("What the students compute", f"Not measured: {unavailable}") if function is None
                else function_chart(function, on))
        return (comparison_frame(ra, rb, function, f", on {on}" if on else "", drawn), plot(lead), plot(energy),
                cards.inline_error("\n".join(notes)) if notes else "", gr.update(visible=True))


def function_chart(function: Compared, on: str) -> charts.Figure:
    """The lead A/B chart: velocity error per noise band and per student block, A, B and random init."""
    bands = function["A"][0].by_level
    levels = [f"{b['s_low']:.2f}–{b['s_high']:.2f}" for b in bands]
    by_level = {side: [b["relative_error"] for b in f.by_level] for side, (f, _) in function.items()}
    by_block = {side: None if rows is None else [(r["teacher_block"], r["relative_error"]) for r in rows]
                for side, (_, rows) in function.items()}
    return charts.compare_function(levels, by_level, by_block, on)
