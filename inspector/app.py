"""The Gradio app: layout and event wiring.

Handlers are thin: each takes the session (one per browser tab, in gr.State), asks it (and so the core) for
numbers, and draws them. Every handler a client may call has an `api_name`. A refresh redraws the summary,
table and charts (cheap: the core caches tensors and plans) and touches the 48 sliders only when layers changed.
"""
from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import torch
import yaml
from gradio.components.plot import PlotData

from projection import ProjectionError, Strategy
from projection.checkpoint import HubDownload, fetch_from_hub, hub_download, hub_source
from projection.inputs import MAX_TEXT_BYTES, read_text
from projection.mapping import rules_to_yaml
from projection.runtime import setup_runtime
from projection.strategy import LAYER_METHODS

from . import cards, charts, table
from .function import FunctionView
from .gallery import GalleryView
from .paths import Roots, unique_export_name
from .session import Session, histogram
from .sessions import Sessions
from .units import human_bytes, percent

MAX_BLOCKS = 48  # Gradio needs a fixed number of sliders: this many are created and shown as needed
SLIDER_CLASSES = ["block-slider"]
STYLE = Path(__file__).with_name("style.css")
STRATEGY_FIELDS = ("width", "heads", "head_dim", "ffn", "conv", "rescale")
NO_EXPERT = "single model"
INTERACTIVE_THREADS = 1  # see projection.runtime.setup_runtime
EXPORTS_AT_ONCE = 2  # exports running at the same time (each holds a few tensor groups in flight); others queue


@dataclass(frozen=True)
class AppConfig:
    roots: Roots
    teacher: str  # as shown in the Sources tab
    student: str
    expert: str | None = None
    strategy: Strategy = field(default_factory=Strategy)
    demo_dir: Path | None = None


def _choices(field: str) -> list[str]:
    """A strategy field's allowed values, read from the core's model."""
    annotation = Strategy.model_fields[field].annotation
    return list(getattr(annotation, "__args__", ()))


def _info(field: str) -> str:
    return Strategy.model_fields[field].description or ""


def theme() -> gr.themes.Base:
    system = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
    return gr.themes.Soft(primary_hue="blue", neutral_hue="slate", text_size="lg", radius_size="md",
                          font=system, font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def _toast(title: str) -> Callable[[ProjectionError], dict]:
    """A rejection shown as an error toast with this title."""
    def fail(exc: ProjectionError) -> dict:
        raise gr.Error(str(exc), title=title) from exc
    return fail


def _progress(progress: gr.Progress, label: str) -> Callable[[int, int, str], None]:
    def report(i: int, n: int, what: str) -> None:
        progress((i, n), desc=f"{label}: {what}")
    return report


class Inspector:
    """The screen. It holds component definitions, the app config and the app's sessions (`Sessions`), never a
    session's data: handlers get their session from gr.State."""

    def __init__(self, config: AppConfig, sessions: Sessions):
        self.config, self.sessions = config, sessions
        with gr.Blocks(title="Projection Inspector", analytics_enabled=False) as self.blocks:
            self._layout()
            self._wire()

    # ================================================================ layout

    def _layout(self) -> None:
        c = self.config
        self.state = gr.State(None, delete_callback=lambda s: self.sessions.discard(s) if s else None)
        self.pending = gr.State(None)  # hub downloads Load found and the user has not confirmed yet
        with gr.Row(elem_id="top-bar"):  # one line: the title, then what the last update did
            gr.HTML('<div class="app-header"><h1>Projection Inspector</h1><p>Initialise a small student from a '
                    'large Wan teacher, and see exactly what each tensor takes from it.</p></div>',
                    elem_id="app-header")
            self.refresh_info = gr.HTML(elem_id="refresh-info")
            self.energy_btn = gr.Button("Compute retained weight energy", visible=False, size="sm", scale=0,
                                        elem_id="energy-button")
        self.cards = gr.HTML(elem_id="cards")
        self.warning = gr.HTML(elem_id="warnings", visible=False)
        with gr.Tabs(selected="mapping", elem_id="tabs"):
            with gr.Tab("Sources", id="sources"):
                self._sources_tab(c)
            with gr.Tab("Mapping", id="mapping"):
                self._mapping_tab()
            with gr.Tab("Rules", id="rules"):
                self._rules_tab()
            with gr.Tab("Layers", id="layers"):
                self._layers_tab()
            with gr.Tab("Spectra", id="spectra") as self.spectra_tab:
                self._spectra_tab()
            with gr.Tab("Strategy", id="strategy"):
                self._strategy_tab(c.strategy)
            with gr.Tab("Gallery", id="gallery"):
                self.gallery = GalleryView(self.state, self.a_yaml, self.b_yaml, self._session)
            with gr.Tab("Function", id="function"):
                self.function = FunctionView(self.state, self._session, c.roots)
            with gr.Tab("Export", id="export"):
                self._export_tab(c.strategy)

    def _sources_tab(self, c: AppConfig) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown("### Teacher")
                self.teacher = gr.Textbox(c.teacher, label="Checkpoint file, folder or hub id (org/name[:sub])",
                                          elem_id="teacher-path")
                self.expert = gr.Dropdown([NO_EXPERT, "high", "low"], value=c.expert or NO_EXPERT,
                                          label="Expert (two-expert checkpoints such as Wan 2.2 A14B)")
            with gr.Column(scale=1):
                gr.Markdown("### Student")
                self.student_kind = gr.Radio([("Config or checkpoint file", "file"), ("Form", "form")],
                                             value="file", label="Student from")
                with gr.Row() as self.student_file:
                    self.student_path = gr.Textbox(c.student, elem_id="student-path", scale=3,
                                                   label="Student config (.yaml/.json) or checkpoint to fill")
                    self.student_heads = gr.Number(0, label="Heads", precision=0, elem_id="student-heads", scale=1,
                                                   min_width=160, info="0: as recorded, else inferred")
                with gr.Row(visible=False) as self.form:
                    self.layout = gr.Dropdown([("reference 2D Wan (wanlite)", "wanlite"), ("seeds' layout", "seed")],
                                              value="wanlite", label="Layout", min_width=200)
                    self.dim = gr.Number(128, label="Width", precision=0, minimum=2, min_width=90)
                    self.num_layers = gr.Number(4, label="Blocks", precision=0, minimum=1, min_width=90)
                    self.num_heads = gr.Number(2, label="Heads", precision=0, minimum=1, min_width=90)
                    self.ffn_dim = gr.Number(384, label="FFN", precision=0, minimum=1, min_width=90)
        with gr.Row():
            self.load_btn = gr.Button("Load", variant="primary", scale=0, min_width=160, elem_id="load-button")
            self.download_btn = gr.Button("Download and load", variant="primary", visible=False, scale=0,
                                          min_width=260, elem_id="download-button")
            if c.demo_dir is not None:
                self.demo_ref = gr.Button("Demo: Wan → reference student", scale=0, min_width=320)
                self.demo_seed = gr.Button("Demo: Wan (diffusers, 3 shards) → seeds' layout", scale=0, min_width=460)
        self.source_msg = gr.HTML(elem_id="source-msg")
        hub = ("hub ids through the Hugging Face cache; a download shows its size and waits for your confirmation"
               if c.roots.hub else "hub ids are off: start the app with --allow-hub to allow them")
        gr.Markdown(f"Opens sources only under `{c.roots.describe()}`, links and shards included ({hub}), and "
                    f"writes exports only under `{c.roots.base}`. Mapping reads headers only; tensor data is read "
                    "when numbers need it.", elem_classes="note")

    def _mapping_tab(self) -> None:
        self.legend = gr.HTML(elem_id="legend")
        with gr.Row(equal_height=True, elem_id="table-filters"):  # one line, right above the table
            self.statuses = gr.CheckboxGroup(list(table.STATUSES), value=list(table.STATUSES), label="Show",
                                             show_label=False, container=False, scale=3, min_width=470,
                                             elem_id="status-filter")
            self.search = gr.Textbox(label="Search keys", placeholder="Search keys, e.g. ffn, blocks.3, in_proj",
                                     show_label=False, container=False, scale=2, elem_id="search")
            self.sort = gr.Dropdown(list(table.SORTS), value="student order", label="Sort", show_label=False,
                                    container=False, scale=1, min_width=230, elem_id="sort")
        self.table = gr.Dataframe(interactive=False, wrap=True, max_height=540, column_widths=table.WIDTHS,
                                  datatype=table.DATATYPES, elem_id="mapping-table", show_label=False,
                                  buttons=["fullscreen", "copy"])
        gr.Markdown("Click a row (or pick a key) for its sources, index choices and value histograms.",
                    elem_classes="note")
        self.key = gr.Dropdown([], value=None, label="Entry details", filterable=True, elem_id="entry-key",
                               allow_custom_value=True)  # API clients may name any student key
        self.details = gr.Markdown(elem_id="details")
        with gr.Row():
            self.index_plot = gr.Plot(show_label=False, elem_id="index-plot")
            self.hist_plot = gr.Plot(show_label=False, elem_id="hist-plot")
        with gr.Accordion("Unused teacher keys", open=False, elem_id="unused") as self.unused_box:
            self.unused = gr.Dataframe(interactive=False, max_height=360, show_label=False)

    def _rules_tab(self) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.rules = gr.Code(language="yaml", lines=22, max_lines=40, label="Active mapping rules (YAML)",
                                     interactive=True, elem_id="rules-editor")
                with gr.Row():
                    self.apply_rules_btn = gr.Button("Apply rules", variant="primary", scale=0, min_width=180,
                                                     elem_id="apply-rules")
                    self.suggest_btn = gr.Button("Suggest rules", scale=0, min_width=180, elem_id="suggest-rules")
                self.rules_msg = gr.HTML(elem_id="rules-msg")
            with gr.Column(scale=2):
                gr.Markdown(
                    "**Rule syntax**: `student key: teacher key`, a list of teacher keys (stacked on axis 0), or "
                    "`{skip: reason}`. A key naming a module applies to each of its parameters; `{i}` is the "
                    "student block (the teacher block comes from the Layers tab). Teacher keys use Wan's original "
                    "names in any format. The layout's preset rules always apply; give a key a new value to "
                    "override one.\n\n```yaml\nlayers.{i}.attn: blocks.{i}.self_attn\nstem: patch_embedding\n"
                    "blocks.{i}.norm1: {skip: \"no affine in the teacher\"}\n```", elem_classes="note")
                self.unmapped = gr.Markdown(elem_id="unmapped", max_height=560)

    def _layers_tab(self) -> None:
        with gr.Row(elem_id="sliders"):  # the method, then a slider per student block: drag, arrow keys or type
            self.method = gr.Radio([*LAYER_METHODS, "custom"], value="uniform", elem_id="layer-method",
                                   label="Teacher block per student block", scale=0, min_width=560,
                                   info="uniform: round(i·(T−1)/(S−1)), first and last kept; influence: the "
                                        "most influential")
            self.sliders = [gr.Slider(0, 1, value=0, step=1, label=f"S{i} ← T", visible=False,
                                      min_width=120, buttons=[], elem_classes=SLIDER_CLASSES)
                            for i in range(MAX_BLOCKS)]
        with gr.Row(elem_id="layer-charts"):
            self.layer_map = gr.Plot(show_label=False, elem_id="layer-map", scale=1)
            self.layer_energy = gr.Plot(show_label=False, elem_id="layer-energy", scale=1)

    def _spectra_tab(self) -> None:
        with gr.Row(elem_id="spec-row"):
            self.spec_layer = gr.Dropdown([], label="Layer", scale=1, elem_id="spec-layer")
            self.spec_matrix = gr.Dropdown([], label="Matrix", scale=2, elem_id="spec-matrix",
                                           allow_custom_value=True)  # API clients may name any 'student key#part'
            self.spec_btn = gr.Button("Compute spectrum", variant="primary", scale=0, min_width=240,
                                      elem_id="spec-button")
        with gr.Row():
            self.sv_plot = gr.Plot(show_label=False, elem_id="sv-plot")
            self.cum_plot = gr.Plot(show_label=False, elem_id="cum-plot")
        self.heatmap = gr.Plot(show_label=False, elem_id="heatmap")

    def _strategy_tab(self, s: Strategy) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.controls = {f: gr.Radio(_choices(f), value=getattr(s, f), label=f, info=_info(f))
                                 for f in STRATEGY_FIELDS}
                self.seed = gr.Number(s.seed, label="seed", info=_info("seed"), precision=0)
                gr.Markdown("Layers: **Layers** tab · expert: **Sources** tab · dtype and device: **Export** tab.",
                            elem_classes="note")
            with gr.Column(scale=2):
                self.strategy_yaml = gr.Code(language="yaml", lines=14, label="Strategy (every field)", interactive=True,
                                             elem_id="strategy-yaml")
                with gr.Row():
                    self.apply_yaml_btn = gr.Button("Apply YAML", variant="primary", size="md")
                    self.save_btn = gr.Button("Save", size="md")
                    self.upload_btn = gr.UploadButton("Load…", file_types=[".yaml", ".yml"], size="md")
                self.strategy_msg = gr.HTML(elem_id="strategy-msg")
                self.strategy_file = gr.File(label="strategy.yaml", visible=False)
        gr.Markdown("### A/B comparison\nTwo strategies on the same teacher, student and rules. First what each "
                    "student computes (its velocity error relative to the teacher at step 0, on the demo's held-out "
                    "digits or, for other teachers, the Function tab's calibration set; on the demo also the "
                    "prompt accuracy of its samples; the Gallery tab draws them), then coverage, then retained "
                    "weight energy per layer: a weight statistic, not output quality (a basis-inconsistent "
                    "strategy's energy is not comparable).")
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
        with gr.Row(visible=False) as self.compare_row:
            self.compare_table = gr.Dataframe(interactive=False, show_label=False, scale=2, elem_id="compare-table")
            self.compare_plot = gr.Plot(show_label=False, scale=3, elem_id="compare-plot")

    def _export_tab(self, s: Strategy) -> None:
        with gr.Row(equal_height=True):
            self.out_dir = gr.Textbox(unique_export_name("student"), scale=3, elem_id="out-dir",
                                      label=f"Output folder (new, under {self.config.roots.base})")
            self.dtype = gr.Radio(_choices("dtype"), value=s.dtype, label="dtype", scale=2)
            devices = [d for d in _choices("device") if d != "cuda" or torch.cuda.is_available()]
            self.device = gr.Radio(devices, value=s.device, label="device", scale=1)
        with gr.Row(equal_height=True):
            self.export_btn = gr.Button("Export student", variant="primary", elem_id="export-button", scale=0,
                                        min_width=220)
            self.export_msg = gr.HTML(elem_id="export-msg")
        self.cli = gr.Code(language="shell", label="The same export from the command line", interactive=False,
                           elem_id="cli")
        self.export_files = gr.File(label="Downloads", file_count="multiple", interactive=False,
                                    elem_id="export-files")

    # ================================================================ wiring

    @property
    def _view(self) -> list[gr.components.Component]:
        """Everything a refresh may change."""
        return [self.state, self.cards, self.warning, self.energy_btn, self.refresh_info, self.legend, self.table,
                self.unused_box, self.unused, self.unmapped, self.layer_map, self.layer_energy, self.heatmap,
                self.method, *self.sliders, self.strategy_yaml, self.cli, self.details, self.index_plot,
                self.hist_plot]

    def _wire(self) -> None:
        t = [self.statuses, self.search, self.sort, self.key]
        sources = [self.teacher, self.expert, self.student_kind, self.student_path, self.student_heads, self.layout,
                   self.dim, self.num_layers, self.num_heads, self.ffn_dim]
        controls = list(self.controls.values())
        loaded = [self.source_msg, self.rules, self.rules_msg, self.key, self.spec_layer, self.spec_matrix, *controls,
                  self.seed, self.dtype, self.device, self.out_dir, self.a_yaml, self.b_yaml, self.pending,
                  self.download_btn]

        self.student_kind.change(lambda k: (gr.update(visible=k == "file"), gr.update(visible=k == "form")),
                                 self.student_kind, [self.student_file, self.form], api_visibility="private")
        self.load_btn.click(self.load, [self.state, *sources, *t], self._view + loaded, api_name="load")
        self.download_btn.click(self.download, [self.pending, *sources[:4]],
                                [self.pending, self.download_btn, self.source_msg], api_name="download").success(
            self.load, [self.state, *sources, *t], self._view + loaded, api_visibility="private")
        self.blocks.load(self.load, [self.state, *sources, *t], self._view + loaded, api_visibility="private")
        if self.config.demo_dir is not None:
            demo = self.config.roots.display(self.config.demo_dir)
            for button, student, teacher in ((self.demo_ref, "student-wanlite.yaml", "teacher-wan"),
                                             (self.demo_seed, "student-seed.yaml", "teacher-diffusers")):
                button.click(lambda a=f"{demo}/{teacher}", b=f"{demo}/{student}": (a, NO_EXPERT, "file", b),
                             None, [self.teacher, self.expert, self.student_kind, self.student_path],
                             api_visibility="private").then(
                    self.load, [self.state, *sources, *t], self._view + loaded, api_visibility="private")

        strategy_inputs = [self.state, self.method, *controls, self.seed, *t]
        for i, component in enumerate([self.method, *controls]):
            component.input(self.set_strategy, strategy_inputs, self._view, show_progress="minimal",
                            trigger_mode="always_last",  # the last choice wins, none is dropped
                            api_name="set_strategy" if i == 0 else None, api_visibility="public" if i == 0 else "private")
        self.seed.blur(self.set_strategy, strategy_inputs, self._view, show_progress="hidden",
                       api_visibility="private")
        # A slider's `input` fires on drag, arrow keys and typing; `release` on pointer-up and when its number box
        # loses focus (where Gradio then clamps the box silently: settle_layers puts back what is in use). The
        # sliders' values are checked here, not by Gradio, so a bad one is answered beside its slider.
        layer_inputs = [self.state, *t, *self.sliders]
        for i, slider in enumerate(self.sliders):
            for event, handler in ((slider.input, self.set_layers), (slider.release, self.settle_layers)):
                first = i == 0 and handler == self.set_layers
                event(handler, layer_inputs, self._view, preprocess=False, trigger_mode="always_last",
                      show_progress="minimal", show_progress_on=[self.layer_map, self.layer_energy],
                      api_name="set_layers" if first else None, api_visibility="public" if first else "private")
        self.energy_btn.click(self.measure, [self.state, *t], self._view, api_name="measure")
        self.apply_rules_btn.click(self.apply_rules, [self.state, self.rules, *t],
                                   self._view + [self.rules, self.rules_msg, self.source_msg, self.spec_layer,
                                                 self.spec_matrix], api_name="apply_rules")
        self.suggest_btn.click(self.suggest_rules, [self.state, self.rules], [self.rules, self.rules_msg],
                               api_name="suggest_rules")

        for i, event in enumerate((self.statuses.input, self.search.input, self.search.submit, self.sort.input)):
            event(self.filter_table, [self.state, self.statuses, self.search, self.sort], self.table,
                  show_progress="hidden", trigger_mode="always_last", api_name="filter_table" if i == 0 else None,
                  api_visibility="public" if i == 0 else "private")
        self.table.select(self.pick_row, None, self.key, api_visibility="private")
        self.key.change(self.show_details, [self.state, self.key], [self.details, self.index_plot, self.hist_plot],
                        api_name="details")

        self.spec_layer.input(self.spectra_choices, [self.state, self.spec_layer],
                              [self.spec_matrix, self.sv_plot, self.cum_plot], api_visibility="private")
        self.spec_btn.click(self.spectrum, [self.state, self.spec_matrix], [self.sv_plot, self.cum_plot],
                            api_name="spectrum")
        self.spec_matrix.input(self.spectrum, [self.state, self.spec_matrix], [self.sv_plot, self.cum_plot],
                               api_visibility="private")
        self.spectra_tab.select(self.spectrum, [self.state, self.spec_matrix], [self.sv_plot, self.cum_plot],
                                api_visibility="private")

        yaml_out = self._view + [*controls, self.seed, self.strategy_msg]
        self.apply_yaml_btn.click(self.apply_strategy_yaml, [self.state, self.strategy_yaml, *t], yaml_out,
                                  api_name="apply_strategy_yaml")
        self.upload_btn.upload(self.load_strategy_file, [self.state, self.upload_btn, *t], yaml_out,
                               api_visibility="private")
        self.save_btn.click(self.save_strategy, self.state, self.strategy_file, api_name="save_strategy")
        self.a_btn.click(self.current_strategy, self.state, self.a_yaml, api_visibility="private")
        self.b_btn.click(self.current_strategy, self.state, self.b_yaml, api_visibility="private")
        self.gallery.wire()
        self.function.wire().success(self.redraw, [self.state, *t], self._view, api_visibility="private")
        self.compare_btn.click(self.compare, [self.state, self.a_yaml, self.b_yaml],
                               [self.compare_table, self.compare_plot, self.compare_msg, self.compare_row],
                               api_name="compare")

        options = [self.state, self.out_dir, self.dtype, self.device]
        for i, event in enumerate((self.dtype.input, self.device.input, self.out_dir.blur)):
            event(self.set_export_options, options, [self.cli, self.strategy_yaml], show_progress="hidden",
                  api_name="set_export_options" if i == 0 else None, api_visibility="public" if i == 0 else "private")
        self.export_btn.click(self.export, options, [self.export_msg, self.export_files, self.out_dir, self.cli,
                                                     self.strategy_yaml], api_name="export",
                              concurrency_limit=EXPORTS_AT_ONCE, concurrency_id="export")
        self.blocks.unload(self.unload)  # the tab or API client went away: free its session now

    # ================================================================ handlers

    @staticmethod
    def _session(state: Session | None) -> Session:
        if state is None:
            raise gr.Error("Load a teacher and a student first (Sources tab).", title="Nothing loaded")
        if state.closed:
            raise gr.Error(f"This session was closed to free memory: {state.closed}. Press Load (Sources tab) "
                           "to start again.", title="Session closed")
        state.last_used = time.monotonic()
        return state

    def unload(self, request: gr.Request) -> None:
        self.sessions.close(request.session_hash)

    def load(self, state: Session | None, teacher: str, expert: str, kind: str, student_path: str,
             student_heads: float | None, layout: str, dim: float, num_layers: float, num_heads: float, ffn_dim: float,
             statuses: list[str], search: str, sort: str, key: str | None, request: gr.Request,
             progress: gr.Progress = gr.Progress()) -> dict:
        started = time.perf_counter()
        roots = self.config.roots
        chosen_expert = None if expert in (None, "", NO_EXPERT) else expert
        try:
            teacher_src = roots.source(teacher, "teacher")
            if kind == "form":
                student: str | dict[str, Any] = {"layout": layout, **{
                    name: _positive(value, name) for name, value in (("dim", dim), ("num_layers", num_layers),
                                                                     ("num_heads", num_heads), ("ffn_dim", ffn_dim))}}
            else:
                student = roots.source(student_path, "student")
            # 0 or blank: the heads the student records, else inferred and flagged
            heads = _positive(student_heads, "heads") if kind != "form" and student_heads else None
            downloads = _downloads(teacher_src, chosen_expert, student)
            if downloads:  # hub files not in the local cache: say how much, fetch only once the user confirms
                return self._ask_download(downloads)
            progress(0.1, desc="reading headers")
            strategy = state.strategy if state is not None else self.config.strategy
            session = self.sessions.open(request.session_hash, teacher_src, student, chosen_expert, strategy,
                                         num_heads=heads, check=roots.check)
        except ProjectionError as exc:
            raise gr.Error(str(exc), title="Cannot load", duration=None) from exc
        if session.auto_energy:
            session.measure(progress=_progress(progress, "measuring retained energy"))
        session.out_dir = unique_export_name(session.projector.student.layout)
        # Open one entry's details at once, unless that means reading a large teacher's tensors before asked.
        s, key = session.strategy, _default_key(session) if session.auto_energy else None
        out = self._render(session, statuses, search, sort, key, started, 0)
        out.update({
            self.source_msg: _keys_mapped(session, f"Loaded in {time.perf_counter() - started:.1f} s (headers only): "),
            self.rules: _rules_text(session), self.rules_msg: "",
            self.key: gr.update(choices=[e.student_key for e in session.mapping.entries], value=key),
            **self._spectra_pickers(session),
            **{self.controls[f]: getattr(s, f) for f in STRATEGY_FIELDS},
            self.seed: s.seed, self.dtype: s.dtype, self.device: s.device, self.out_dir: session.out_dir,
            self.a_yaml: s.to_yaml(), self.b_yaml: s.model_copy(update={"width": "svd-per-matrix"}).to_yaml(),
            self.pending: None, self.download_btn: gr.update(visible=False),
        })
        return out

    def _ask_download(self, downloads: list[HubDownload]) -> dict:
        total = human_bytes(sum(d.nbytes for d in downloads))
        what = "; ".join(f"{d.source} at {d.commit[:12]}: {len(d.files)} file{'s' if len(d.files) != 1 else ''}, "
                         f"{human_bytes(d.nbytes)}" for d in downloads)
        return {self.pending: downloads,
                self.download_btn: gr.update(visible=True, value=f"Download {total} and load"),
                self.source_msg: cards.inline_ask(f"Not in the local Hugging Face cache: {what} (sizes from the hub). "
                                                  f"Nothing has been downloaded yet: “Download {total} and load” "
                                                  f"fetches them.")}

    def download(self, pending: list[HubDownload] | None, teacher: str, expert: str, kind: str, student_path: str,
                 progress: gr.Progress = gr.Progress(track_tqdm=True)) -> dict:
        """Fetch what Load showed, if the sources and the hub's files are still those the user saw (if not, the
        Load that follows asks again)."""
        if not pending:
            raise gr.Error("Press Load first: it shows what would be downloaded.", title="Nothing to download")
        roots = self.config.roots
        chosen_expert = None if expert in (None, "", NO_EXPERT) else expert
        done = {self.pending: None, self.download_btn: gr.update(visible=False)}
        try:
            teacher_src = roots.source(teacher, "teacher")
            student = roots.source(student_path, "student") if kind != "form" else {}
            if _downloads(teacher_src, chosen_expert, student) != pending:
                return {**done, self.source_msg: cards.inline_ask("The sources or the hub's files changed since "
                                                                  "Load showed the size: nothing was downloaded.")}
            progress(0, desc=f"downloading {human_bytes(sum(d.nbytes for d in pending))}")
            for source, source_expert in ((teacher_src, chosen_expert), (student, None)):
                if isinstance(source, str) and (hub := hub_source(source)):
                    fetch_from_hub(*hub, source_expert)
        except ProjectionError as exc:
            raise gr.Error(str(exc), title="Download failed", duration=None) from exc
        return {**done, self.source_msg: cards.inline_ok("Downloaded; loading.")}

    def _refresh(self, state: Session | None, view: tuple[list[str], str, str, str | None],
                 change: Callable[[Session], None], rejected: Callable[[ProjectionError], dict] | None = None,
                 extra: Callable[[Session], dict] | None = None) -> dict:
        """What every control that changes the projection does. Apply `change` under the session's lock. If the
        core rejects it, `rejected` answers (a toast or an inline message); otherwise re-measure (small teachers),
        redraw with the table `view`, and add `extra`'s updates. The refresh line reports the time taken and the
        teacher bytes this refresh read."""
        started = time.perf_counter()
        s = self._session(state)
        with s.lock:
            read = s.bytes_read
            try:
                change(s)
            except ProjectionError as exc:
                if rejected is None:
                    raise
                return rejected(exc)
            s.measure()
            out = self._render(s, *view, started, read)
            return {**out, **extra(s)} if extra is not None else out

    def set_strategy(self, state: Session | None, method: str, width: str, heads: str, head_dim: str, ffn: str,
                     conv: str, rescale: str, seed: float | None, statuses: list[str], search: str, sort: str,
                     key: str | None) -> dict:
        def change(s: Session) -> None:
            fields: dict[str, Any] = {"width": width, "heads": heads, "head_dim": head_dim, "ffn": ffn,
                                      "conv": conv, "rescale": rescale,
                                      "seed": int(seed) if seed is not None else s.strategy.seed}
            if method != "custom":
                fields["layers"] = method
            s.update_strategy(**fields)

        return self._refresh(state, (statuses, search, sort, key), change, _toast("Strategy rejected"))

    def set_layers(self, state: Session | None, statuses: list[str], search: str, sort: str, key: str | None,
                   *sliders: float | None) -> dict:
        """The sliders' values (raw: Gradio does not check them) become the layers. A value outside the teacher's
        blocks is answered beside its slider, which goes back to the block in use; an empty box is mid-edit."""
        s = self._session(state)
        with s.lock:
            current, top = list(s.mapping.layers), s.teacher_blocks - 1
            values = list(sliders[:len(current)])
            for i, value in enumerate(values):
                if value is None or value == "":
                    values[i] = current[i]  # the box is being retyped: wait for a number
                    continue
                problem = _block_problem(value, top)
                if problem:
                    out = self._clear_slider_error(s)
                    s.slider_error = i
                    out[self.sliders[i]] = gr.update(value=current[i], info=f"⚠ {problem}: still T{current[i]}",
                                                     elem_classes=[*SLIDER_CLASSES, "invalid"])
                    return out
            layers = [int(v) for v in values]
            if layers == current and s.slider_error is None:
                return {self.refresh_info: gr.skip()}  # nothing changed (e.g. the release after a drag)

        def change(s: Session) -> None:
            if layers != s.mapping.layers:
                s.update_strategy(layers=layers)
            s.shown_layers = layers  # the sliders already show them

        return self._refresh(state, (statuses, search, sort, key), change, _toast("Layers rejected"))

    def settle_layers(self, state: Session | None, statuses: list[str], search: str, sort: str, key: str | None,
                      *sliders: float | None) -> dict:
        """A released slider or a number box left: as set_layers, and an emptied box shows the block in use again
        (Gradio would show the minimum)."""
        out = self.set_layers(state, statuses, search, sort, key, *sliders)
        s = self._session(state)
        for i, value in enumerate(sliders[:len(s.mapping.layers)]):
            if (value is None or value == "") and self.sliders[i] not in out:
                out[self.sliders[i]] = gr.update(value=s.mapping.layers[i])
        return out

    def redraw(self, state: Session | None, statuses: list[str], search: str, sort: str, key: str | None) -> dict:
        """The view again after something the session measured (the Function tab's influence, an activation
        strategy's new ranking)."""
        return self._refresh(state, (statuses, search, sort, key), lambda s: None)

    def measure(self, state: Session | None, statuses: list[str], search: str, sort: str, key: str | None,
                progress: gr.Progress = gr.Progress()) -> dict:
        return self._refresh(state, (statuses, search, sort, key),
                             lambda s: s.measure(force=True, progress=_progress(progress, "projecting")))

    def apply_rules(self, state: Session | None, text: str, statuses: list[str], search: str, sort: str,
                    key: str | None) -> dict:
        def applied(s: Session) -> dict:
            return {self.rules: _rules_text(s), self.rules_msg: _keys_mapped(s, "Applied: "),
                    self.source_msg: _keys_mapped(s, "With the rules applied: "), **self._spectra_pickers(s)}

        return self._refresh(state, (statuses, search, sort, key), lambda s: s.set_rules(text),
                             lambda exc: {self.rules_msg: cards.inline_error(str(exc))}, applied)

    def suggest_rules(self, state: Session | None, text: str) -> tuple:
        """The editor's rules plus suggestions for the keys they leave unmapped, in the editor: not applied."""
        s = self._session(state)
        with s.lock:
            try:
                suggested = s.suggest_rules(text)
            except ProjectionError as exc:
                return gr.skip(), cards.inline_error(str(exc))
        if not suggested.rules:
            why = ("every student key transfers" if not suggested.unmapped else
                   f"the {suggested.unmapped} student keys that transfer nothing are skipped on purpose or fit no "
                   "unused teacher tensor")
            return gr.skip(), cards.inline_ok(f"No rules to suggest: {why}.")
        return suggested.text, cards.inline_ok(
            f"{len(suggested.rules)} suggested rules (marked with a comment) would map {suggested.covered} of the "
            f"{suggested.unmapped} student keys that transfer nothing. Review them, then press Apply rules.")

    def filter_table(self, state: Session | None, statuses: list[str], search: str, sort: str) -> Any:
        s = self._session(state)
        with s.lock:
            return table.styled(table.select(table.frame(s.rows()), statuses, search, sort))

    @staticmethod
    def pick_row(evt: gr.SelectData) -> Any:
        row = evt.row_value or []
        return row[0] if row else gr.skip()

    def show_details(self, state: Session | None, key: str | None) -> tuple:
        if state is None or not key:
            return "", None, None
        s = self._session(state)
        with s.lock:
            return self._details(s, key)

    def spectra_choices(self, state: Session | None, layer: str, progress: gr.Progress = gr.Progress()) -> tuple:
        """A new layer: its matrices, and the first one's charts (never the previous layer's)."""
        s = self._session(state)
        with s.lock:
            matrices = self._matrix_update(s, layer, None)
        return (matrices, *self.spectrum(state, matrices.get("value"), progress))

    def spectrum(self, state: Session | None, choice: str | None, progress: gr.Progress = gr.Progress()) -> tuple:
        s = self._session(state)
        if not choice:
            note = plot(charts.message("Singular values", "Pick a layer and a matrix."))
            return note, note
        progress(0.2, desc="singular values (cached after the first time)")
        with s.lock:
            try:
                sp = s.spectrum(choice)
            except ProjectionError as exc:
                raise gr.Error(str(exc)) from exc
        student = None if sp.student is None else sp.student.tolist()
        return (plot(charts.spectrum(sp.teacher.tolist(), student, sp.title)),
                plot(charts.cumulative(sp.curve.tolist(), sp.rank, sp.energy, sp.stacked)))

    def apply_strategy_yaml(self, state: Session | None, text: str, statuses: list[str], search: str, sort: str,
                            key: str | None) -> dict:
        def change(s: Session) -> None:
            strategy = Strategy.from_yaml(text, "strategy")
            if strategy.expert != s.strategy.expert:
                raise ProjectionError("strategy: the expert is chosen with the teacher (Sources tab); "
                                      f"this session uses expert {s.strategy.expert}")
            s.set_strategy(strategy)

        def applied(s: Session) -> dict:
            return {**{self.controls[f]: getattr(s.strategy, f) for f in STRATEGY_FIELDS},
                    self.seed: s.strategy.seed, self.strategy_msg: cards.inline_ok("Strategy applied.")}

        return self._refresh(state, (statuses, search, sort, key), change,
                             lambda exc: {self.strategy_msg: cards.inline_error(str(exc))}, applied)

    def load_strategy_file(self, state: Session | None, file: Any, *rest: Any) -> dict:
        path = file if isinstance(file, str) else getattr(file, "name", None)
        try:
            text = read_text(path, "strategy") if path else ""
        except ProjectionError as exc:  # too large, not UTF-8: named by the uploaded name, not the server's copy
            return {self.strategy_msg: cards.inline_error(str(exc).replace(str(path), Path(path).name))}
        out = self.apply_strategy_yaml(state, text, *rest)
        out.setdefault(self.strategy_yaml, text)
        return out

    def save_strategy(self, state: Session | None) -> Any:
        s = self._session(state)
        path = s.folder / "strategy.yaml"
        path.write_text(s.strategy.to_yaml())
        return gr.update(value=str(path), visible=True)

    def current_strategy(self, state: Session | None) -> str:
        return self._session(state).strategy.to_yaml()

    def compare(self, state: Session | None, a_text: str, b_text: str,
                progress: gr.Progress = gr.Progress()) -> tuple:
        s = self._session(state)
        try:
            a, b = Strategy.from_yaml(a_text, "strategy A"), Strategy.from_yaml(b_text, "strategy B")
        except ProjectionError as exc:
            return gr.skip(), gr.skip(), cards.inline_error(str(exc)), gr.skip()
        with s.lock:
            try:
                result = s.compare(a, b, _progress(progress, "projecting"))
            except ProjectionError as exc:
                return gr.skip(), gr.skip(), cards.inline_error(str(exc)), gr.skip()
            function = None if s.function_unavailable() else [s.gallery_row(x) for x in (a, b)]
        ra, rb = result["A"], result["B"]
        ea, eb = ra["retained_weight_energy"], rb["retained_weight_energy"]
        consistent = (ra["basis_consistent"], rb["basis_consistent"])
        coverage = [("keys transferred", ra["coverage"]["keys"]["rate"], rb["coverage"]["keys"]["rate"]),
                    ("params transferred", ra["coverage"]["params"]["rate"], rb["coverage"]["params"]["rate"])]
        layers = list(dict.fromkeys([*ea["by_layer"], *eb["by_layer"]]))
        energy = [("retained weight energy", ea["mean"], eb["mean"])]
        energy += [(f"weight energy {name}", ea["by_layer"].get(name), eb["by_layer"].get(name)) for name in layers]

        def row(measure: str, x: float | None, y: float | None, comparable: bool = True) -> dict[str, str]:
            diff = ("—" if x is None or y is None else f"{100 * (y - x):+.1f} pt" if comparable
                    else "not comparable")  # energies in different bases are no contest (the chart says why)
            return {"measure": measure, "A": percent(x), "B": percent(y), "B − A": diff}

        energy = [(f"{name} (weight statistic)", x, y) for name, x, y in energy]
        measured = []
        if function is not None:  # what the student computes leads; weight statistics follow
            fa, fb = function
            on = f", on {s.projector.calibration.label}" if s.previews else ""
            measured = [{"measure": f"velocity error vs teacher, step 0 (lower is better){on}",
                         "A": f"{fa.velocity_error:.3f}", "B": f"{fb.velocity_error:.3f}",
                         "B − A": f"{fb.velocity_error - fa.velocity_error:+.3f}"}]
            if fa.prompt_accuracy is not None:
                measured.append(row(f"prompt accuracy of {fa.scored} samples", fa.prompt_accuracy, fb.prompt_accuracy))
        frame = pd.DataFrame(measured + [row(*r) for r in coverage] + [row(*r, all(consistent)) for r in energy])
        notes = [f"{side}: {w}" for side, r in (("A", ra), ("B", rb)) for w in r["warnings"]]
        if function is None:
            notes.append(f"Function not measured: {s.function_unavailable()}")
        return (frame, plot(charts.compare(ea["by_layer"], eb["by_layer"], consistent)),
                cards.inline_error("\n".join(notes)) if notes else "", gr.update(visible=True))

    def set_export_options(self, state: Session | None, out_dir: str, dtype: str, device: str) -> tuple:
        s = self._session(state)
        with s.lock:
            s.out_dir = out_dir
            try:
                s.update_strategy(dtype=dtype, device=device)
            except ProjectionError as exc:
                raise gr.Error(str(exc), title="Export option rejected") from exc
            return self._cli(s), s.strategy.to_yaml()

    def export(self, state: Session | None, out_dir: str, dtype: str, device: str,
               progress: gr.Progress = gr.Progress()) -> tuple:
        s = self._session(state)
        with s.lock:
            try:
                out = self.config.roots.output(out_dir)
                s.out_dir = out_dir
                s.update_strategy(dtype=dtype, device=device)
                started = time.perf_counter()
                report, files = s.export(out, _progress(progress, "exporting"))
            except (ProjectionError, OSError) as exc:
                raise gr.Error(str(exc), title="Export refused", duration=None) from exc
            cov = report["coverage"]
            msg = cards.inline_ok(
                f"Wrote {self.config.roots.display(out)} in {time.perf_counter() - started:.1f} s: "
                f"{cov['keys']['transferred']}/{cov['keys']['total']} keys, {percent(cov['params']['rate'])} of "
                f"parameters from the teacher, retained weight energy "
                f"{percent(report['retained_weight_energy']['mean'])}, "
                f"{s.strategy.dtype}.")
            command = self._cli(s)  # the command for the export just written
            s.out_dir = unique_export_name(s.projector.student.layout)  # the next export gets a new folder
            return msg, [str(f) for f in files], s.out_dir, command, s.strategy.to_yaml()

    # ================================================================ drawing

    def _render(self, s: Session, statuses: list[str], search: str, sort: str, key: str | None, started: float,
                read_before: int) -> dict:
        """The refreshed view: summary, table, layers, energy charts and (if an entry is open) its details."""
        mapping, summary = s.mapping, s.summary()
        layers = mapping.layers
        energy = summary.get("retained_weight_energy")
        measured = s.energy_current
        if measured:
            note = "a weight statistic, not output quality; untransferred = 0"
        else:
            note = f"not computed: the teacher is {human_bytes(s.teacher_bytes)}; press Compute"
        unused = s.unused_teacher_keys()
        out: dict = {
            self.state: s,
            self.cards: cards.summary_cards(summary, note, s.step0_error() if s.plan_ready else None),
            self.warning: gr.update(value=cards.warnings_banner(summary["warnings"]), visible=bool(summary["warnings"])),
            self.energy_btn: gr.update(visible=not measured),
            self.legend: table.legend(summary["counts"]),
            self.table: table.styled(table.select(table.frame(s.rows()), statuses, search, sort)),
            self.unused_box: gr.update(label=f"Unused teacher keys ({len(unused)})"),
            self.unused: table.unused_frame(unused),
            self.unmapped: _unmapped(s),
            self.layer_map: plot(charts.layer_map(layers, s.teacher_blocks, s.block_influence())),
            self.layer_energy: plot(charts.layer_energy(energy and energy["by_layer"], layers,
                                                        energy and energy["mean"])),
            self.heatmap: plot(charts.energy_heatmap(s.energy_grid(), layers)),
            self.method: s.strategy.layers if isinstance(s.strategy.layers, str) else "custom",
            self.strategy_yaml: s.strategy.to_yaml(),
            self.cli: self._cli(s),
        }
        if s.shown_layers != layers:
            s.shown_layers = list(layers)
            top = max(s.teacher_blocks - 1, 1)
            for i, slider in enumerate(self.sliders):
                out[slider] = (gr.update(visible=True, value=layers[i], maximum=top)
                               if i < len(layers) else gr.update(visible=False))
        for slider, note in self._clear_slider_error(s).items():  # a rejected value's note goes on any refresh
            out[slider] = {**out.get(slider, gr.update()), **note}
        if key:
            out[self.details], out[self.index_plot], out[self.hist_plot] = self._details(s, key)
        read = s.bytes_read - read_before
        out[self.refresh_info] = (f'<div class="refresh-info">updated in {1000 * (time.perf_counter() - started):.0f} ms'
                                  f' · read {human_bytes(read)} from the teacher for this update'
                                  f' · {human_bytes(s.bytes_read)} in total</div>')
        return out

    def _clear_slider_error(self, s: Session) -> dict:
        if s.slider_error is None:
            return {}
        slider, s.slider_error = self.sliders[s.slider_error], None
        return {slider: gr.update(info="", elem_classes=SLIDER_CLASSES)}

    def _details(self, s: Session, key: str) -> tuple:
        try:
            d = s.details(key)
        except ProjectionError as exc:
            return cards.inline_error(str(exc)), None, None
        e = d.entry
        lines = [f"### `{e.student_key}`  ·  {e.status}  ·  {'×'.join(map(str, e.student_shape)) or 'scalar'}"]
        if e.reason:
            lines.append(f"**Reason:** {e.reason}")
        for p in e.parts:
            block = f" (teacher block {p.block})" if p.block is not None else ""
            native = f" (stored as `{p.native_key}`)" if p.native_key != p.teacher_key else ""
            lines.append(f"- from `{p.teacher_key}`{native}{block}: {'×'.join(map(str, p.teacher_shape))} → "
                         f"{'×'.join(map(str, p.student_shape))}")
        if e.transforms:
            lines.append("**Transform:** " + "; ".join(e.transforms))
        if d.energy is not None:
            lines.append(f"**Retained weight energy:** {percent(d.energy)} of the teacher tensors' squared norm "
                         "(a weight statistic)")
        if d.index_choices is None:
            lines.append("_Index choices and the student tensor need teacher statistics: press “Compute retained "
                         "weight energy”._")
        index_fig = None
        if d.index_choices is not None and e.status != "skipped":
            index_fig = plot(charts.index_choices([(c.label, c.kept, c.total) for c in d.index_choices]))
        hist_fig = None
        if d.teacher_values is not None:
            centres, t, st = histogram(d.teacher_values, d.student_values)
            hist_fig = plot(charts.histograms(centres, t, st, f"{e.student_key} (central 99.8%)"))
        return "\n\n".join(lines), index_fig, hist_fig

    def _spectra_pickers(self, s: Session) -> dict:
        """Layer and matrix choices for the Spectra tab (block 0's first matrix to start with)."""
        layer = "0" if s.mapping.layers else "top"
        choices = [("embeddings & head", "top")] + [(f"student block {i}", str(i)) for i in range(len(s.mapping.layers))]
        return {self.spec_layer: gr.update(choices=choices, value=layer),
                self.spec_matrix: self._matrix_update(s, layer, None)}

    def _matrix_update(self, s: Session, layer: str, value: str | None) -> Any:
        choices = s.matrices(layer)
        values = [v for _, v in choices]
        return gr.update(choices=choices, value=value if value in values else (values[0] if values else None))

    def _cli(self, s: Session) -> str:
        """The `projection export` command that reproduces this session's export. Its input files go to a new
        temporary folder, so pasting it never overwrites a file of the user's."""
        roots = self.config.roots
        lines = [f"cd {shlex.quote(str(roots.base))}",
                 "inputs=$(mktemp -d)  # a new folder for the input files below"]

        def write(name: str, text: str) -> str:
            lines.extend([f"cat > \"$inputs/{name}\" <<'EOF'", text.rstrip(), "EOF"])
            return f'"$inputs/{name}"'

        if isinstance(s.student_source, dict):
            student = write("student.yaml", yaml.safe_dump(s.student_source, sort_keys=False))
        else:
            student = shlex.quote(roots.display(s.student_source))
        command = (f"projection export --teacher {shlex.quote(roots.display(s.teacher_source))} "
                   f"--student {student} --strategy {write('strategy.yaml', s.strategy.to_yaml())}")
        if s.num_heads:
            command += f" --num-heads {s.num_heads}"
        if s.projector.rules:
            command += f" --rules {write('rules.yaml', rules_to_yaml(s.projector.rules))}"
        out = s.out_dir or unique_export_name(s.projector.student.layout)
        return "\n".join([*lines, f"{command} --out {shlex.quote(out)}"])


def _downloads(teacher: str, expert: str | None, student: str | dict[str, Any]) -> list[HubDownload]:
    """The hub files these sources need that the local cache lacks (none offline, or for local paths)."""
    found = [hub_download(teacher, expert), hub_download(student) if isinstance(student, str) else None]
    return [d for d in found if d is not None and d.files]


def plot(fig: charts.Figure) -> PlotData:
    """A plotly.js spec as Gradio's plot payload (no plotly object model on the way)."""
    return PlotData(type="plotly", plot=json.dumps(fig, allow_nan=False))


def _block_problem(value: Any, top: int) -> str | None:
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


def _positive(value: float | None, name: str) -> int:
    if value is None or not math.isfinite(value) or int(value) != value or value < 1:
        raise ProjectionError(f"student {name}: a positive whole number is needed (got {value})")
    return int(value)


def _default_key(s: Session) -> str | None:
    """The entry whose details open first: the first transferred matrix of block 0 (a good demo)."""
    entries = s.mapping.entries
    for wanted in (lambda e: e.student_block == 0 and e.status != "skipped" and len(e.student_shape) == 2,
                   lambda e: e.status != "skipped", lambda e: True):
        found = next((e.student_key for e in entries if wanted(e)), None)
        if found:
            return found
    return None


def _keys_mapped(s: Session, prefix: str) -> str:
    """How many student keys map to a teacher key, flagged when none do."""
    keys = s.mapping.coverage()["keys"]
    text = f"{prefix}{keys['transferred']} of {keys['total']} student keys map to a teacher key"
    if keys["transferred"] == 0:
        return cards.inline_error(f"{text}: nothing transfers until rules map them (Rules tab).")
    return cards.inline_ok(f"{text}.")


def _rules_text(s: Session) -> str:
    if s.mapping.rules:
        return s.rules_text()
    return ("# No rules yet: every student key is looked up under its own name.\n"
            "# Map a student key or module to a teacher key ({i} = block), e.g.\n"
            "#   layers.{i}.attn: blocks.{i}.self_attn\n{}\n")


def _unmapped(s: Session, limit: int = 40) -> str:
    """For rule writing: student keys without a source, teacher keys nobody reads."""
    skipped = [e for e in s.mapping.entries if e.status == "skipped"]
    unused = s.mapping.unused_teacher_keys()
    if not skipped:
        return f"**Every student key transfers.** {len(unused)} teacher keys are unused (mostly dropped blocks)."
    lines = [f"**{len(skipped)} student keys transfer nothing**" + (f" (first {limit})" if len(skipped) > limit else "")]
    lines += [f"- `{e.student_key}` {list(e.student_shape)}: {e.reason}" for e in skipped[:limit]]
    lines.append(f"\n**{len(unused)} teacher keys unused**" + (f" (first {limit})" if len(unused) > limit else ""))
    lines += [f"- `{k}`" for k in unused[:limit]]
    return "\n".join(lines)


def build_app(config: AppConfig, sessions: Sessions) -> gr.Blocks:
    return Inspector(config, sessions).blocks


def launch(blocks: gr.Blocks, sessions: Sessions, host: str = "127.0.0.1", port: int | None = None,
           **kwargs: Any) -> Any:
    """Launch with the app's theme and stylesheet (Gradio 6 takes them at launch). While the server runs, idle
    sessions are swept; when it stops, every session is closed and the scratch folder removed."""
    setup_runtime(interactive_threads=INTERACTIVE_THREADS)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        sessions.start_sweeper()
        try:
            yield
        finally:
            sessions.close_all()
            sessions.scratch.close()

    blocks.queue(default_concurrency_limit=4)
    return blocks.launch(server_name=host, server_port=port, theme=theme(), css_paths=[STYLE], ssr_mode=False,
                         footer_links=["api"], show_error=True, max_file_size=MAX_TEXT_BYTES,
                         app_kwargs={"lifespan": lifespan}, **kwargs)
