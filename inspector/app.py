"""The Gradio app: the tabs, each a view of its own module (one tab, one file), and the two actions that fill
every view: loading a teacher and a student (a new session), and the refresh every change of the projection
goes through.

Handlers are thin: each takes the session (one per browser tab, in gr.State), asks it (and so the core) for
numbers, and draws them. Every handler a client may call has an `api_name`. A refresh redraws the summary and
each view's share (cheap: the core caches tensors and plans), and touches the 48 sliders only when layers changed.
"""
from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from projection import ProjectionError, Strategy
from projection.cancel import current as current_token
from projection.runtime import setup_runtime

from . import cards
from .bridge import progress_to, stoppable, user_error
from .export import ExportView
from .function import MAX_CALIBRATION_UPLOAD_BYTES, FunctionView
from .gallery import GalleryView
from .layers import SLIDER_JS, LayersView
from .mapping import MappingView, default_key, keys_mapped
from .paths import Roots, unique_export_name
from .rules import RulesView
from .session import Session
from .sessions import Sessions
from .sources import NO_PRESET, SourcesView, expert_of, missing_downloads
from .spectra import SpectraView
from .strategy import StrategyView
from .units import human_bytes

STYLE = Path(__file__).with_name("style.css")
INTERACTIVE_THREADS = 1  # see projection.runtime.setup_runtime


@dataclass(frozen=True)
class AppConfig:
    roots: Roots
    teacher: str  # as shown in the Sources tab
    student: str
    expert: str | None = None
    strategy: Strategy = field(default_factory=Strategy)
    demo_dir: Path | None = None


def theme() -> gr.themes.Base:
    system = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
    return gr.themes.Soft(primary_hue="blue", neutral_hue="slate", text_size="lg", radius_size="md",
                          font=system, font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


class Inspector:
    """The screen. It holds the views, the app config and the app's sessions (`Sessions`), never a session's
    data: handlers get their session from gr.State."""

    def __init__(self, config: AppConfig, sessions: Sessions):
        self.config, self.sessions = config, sessions
        with gr.Blocks(title="Projection Inspector", analytics_enabled=False) as self.blocks:
            self._layout()
            self._wire()

    def _layout(self) -> None:
        c, session, refresh = self.config, self._session, self._refresh
        self.state = gr.State(None, delete_callback=lambda s: self.sessions.discard(s) if s else None)
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
                self.sources = SourcesView(c.roots, c.teacher, c.student, c.expert, c.demo_dir)
            with gr.Tab("Mapping", id="mapping"):
                self.mapping = MappingView(self.state, session)
            with gr.Tab("Rules", id="rules"):
                self.rules = RulesView(self.state, session, refresh)
            with gr.Tab("Layers", id="layers"):
                self.layers = LayersView(self.state, session, refresh)
            with gr.Tab("Spectra", id="spectra") as self.spectra_tab:
                self.spectra = SpectraView(self.state, session)
            with gr.Tab("Strategy", id="strategy"):
                self.strategy = StrategyView(self.state, session, refresh, c.strategy)
            with gr.Tab("Gallery", id="gallery"):
                self.gallery = GalleryView(self.state, self.strategy.a_yaml, self.strategy.b_yaml, session)
            with gr.Tab("Function", id="function") as self.function_tab:
                self.function = FunctionView(self.state, session, c.roots, self.strategy.a_yaml, self.strategy.b_yaml)
            with gr.Tab("Export", id="export"):
                self.export = ExportView(self.state, session, c.roots, c.strategy)

    @property
    def _view(self) -> list[gr.components.Component]:
        """Everything a refresh may change."""
        return [self.state, self.cards, self.warning, self.energy_btn, self.refresh_info, *self.mapping.components,
                *self.rules.components, *self.layers.components, *self.spectra.components,
                *self.strategy.components, *self.export.components]

    def _wire(self) -> None:
        table_view, view = self.mapping.table_view, self._view
        st, ex = self.strategy, self.export
        loaded = [self.rules.rules, self.rules.msg, self.mapping.key, self.spectra.layer, self.spectra.matrix,
                  *st.controls.values(), st.seed, st.a_yaml, st.b_yaml, ex.dtype, ex.device, ex.out_dir]
        self.sources.wire(self.state, self.blocks, self.load, {**self.sources.inputs, **table_view}, view + loaded)
        self.mapping.wire()
        self.rules.wire(table_view, view, lambda s: {self.sources.msg: keys_mapped(s, "With the rules applied: "),
                                                     **self.spectra.pickers(s)},
                        [self.sources.msg, self.spectra.layer, self.spectra.matrix])
        self.strategy.wire(self.layers.method, table_view, view)
        self.layers.wire(table_view, view)
        self.energy_btn.click(stoppable(self.measure), self.state, view, inputs_kwargs=table_view, api_name="measure",
                              show_progress_on=[self.cards])  # under the button, over the card it fills
        self.spectra.wire(self.spectra_tab)
        self.gallery.wire()
        self.function.wire(self.function_tab).success(self.redraw, self.state, view, inputs_kwargs=table_view,
                                     api_visibility="private", show_progress="hidden")  # Measure's shows by it
        self.export.wire(self.strategy.yaml)
        self.blocks.unload(self.unload)  # the tab or API client went away: free its session now

    # ================================================================ sessions

    @staticmethod
    def _session(state: Session | None) -> Session:
        if state is None:
            raise user_error("Load a teacher and a student first (Sources tab).", "Nothing loaded")
        if state.closed:
            raise user_error(f"This session was closed to free memory: {state.closed}. Press Load (Sources tab) "
                             "to start again.", "Session closed")
        state.last_used = time.monotonic()
        state.attach(current_token())  # a long request (`stoppable`) stops when the session closes
        return state

    def unload(self, request: gr.Request) -> None:
        self.sessions.close(request.session_hash)

    def load(self, state: Session | None, request: gr.Request, progress: gr.Progress = gr.Progress(), *,
             teacher: str, expert: str, kind: str, student_path: str, student_heads: float | None, layout: str,
             dim: float, num_layers: float, num_heads: float, ffn_dim: float, preset: str = NO_PRESET,
             **table_view: Any) -> dict:
        """A new session from the Sources tab's values, drawn in every view (`table_view`: the Mapping tab's). A
        form with a preset names it beside its numbers: they override the preset's (presets.expand_preset)."""
        started = time.perf_counter()
        roots = self.config.roots
        try:
            teacher_src = roots.source(teacher, "teacher")
            if kind == "form":
                named = {"preset": preset} if preset and preset != NO_PRESET else {}
                student: str | dict[str, Any] = {**named, "layout": layout, **{
                    name: _positive(value, name) for name, value in (("dim", dim), ("num_layers", num_layers),
                                                                     ("num_heads", num_heads), ("ffn_dim", ffn_dim))}}
            else:
                student = roots.source(student_path, "student")
            # 0 or blank: the heads the student records, else inferred and flagged
            heads = _positive(student_heads, "heads") if kind != "form" and student_heads else None
            downloads = missing_downloads(teacher_src, expert_of(expert), student)
            if downloads:  # hub files not in the local cache: say how much, fetch only once the user confirms
                return self.sources.ask_download(downloads)
            progress(0.1, desc="reading headers")
            strategy = state.strategy if state is not None else self.config.strategy
            session = self.sessions.open(request.session_hash, teacher_src, student, expert_of(expert), strategy,
                                         num_heads=heads, check=roots.check,
                                         client=request.client.host if request.client else None)
        except ProjectionError as exc:
            raise user_error(exc, "Cannot load") from exc
        if session.auto_energy:
            session.measure(progress=progress_to(progress, "measuring retained energy"))
        session.out_dir = unique_export_name(session.projector.student.layout)
        # Open one entry's details at once, unless that means reading a large teacher's tensors before asked.
        key = default_key(session) if session.auto_energy else None
        out = self._render(session, {**table_view, "key": key}, started, 0)
        out.update({**self.sources.loaded(session, time.perf_counter() - started), **self.rules.loaded(session),
                    **self.mapping.loaded(session, key), **self.spectra.pickers(session),
                    **self.strategy.loaded(session), **self.export.loaded(session)})
        return out

    # ================================================================ the refresh

    def _refresh(self, state: Session | None, table_view: dict[str, Any],
                 change: Callable[[Session], None], rejected: Callable[[ProjectionError], dict] | None = None,
                 extra: Callable[[Session], dict] | None = None) -> dict:
        """What every control that changes the projection does. Apply `change` under the session's lock. If the
        core rejects it, `rejected` answers (a toast or an inline message); otherwise re-measure (small teachers),
        redraw with the Mapping tab's `table_view`, and add `extra`'s updates. The refresh line reports the time
        taken and the teacher bytes this refresh read."""
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
            out = self._render(s, table_view, started, read)
            return {**out, **extra(s)} if extra is not None else out

    def redraw(self, state: Session | None, **table_view: Any) -> dict:
        """The view again after something the session measured (the Function tab's influence, an activation
        strategy's new ranking)."""
        return self._refresh(state, table_view, lambda s: None)

    def measure(self, state: Session | None, progress: gr.Progress = gr.Progress(), **table_view: Any) -> dict:
        return self._refresh(state, table_view,
                             lambda s: s.measure(force=True, progress=progress_to(progress, "projecting")))

    def _render(self, s: Session, table_view: dict[str, Any], started: float,
                read_before: int) -> dict:
        """The refreshed view: the summary above the tabs, then each view's share."""
        summary = s.summary()
        measured = s.energy_current
        if measured:
            note = "a weight statistic, not output quality; untransferred = 0"
        else:
            note = f"not computed: the teacher is {human_bytes(s.teacher_bytes)}; press Compute"
        return {
            self.state: s,
            self.cards: cards.summary_cards(summary, note, s.step0_error() if s.plan_ready else None),
            self.warning: gr.update(value=cards.warnings_banner(summary["warnings"]), visible=bool(summary["warnings"])),
            self.energy_btn: gr.update(visible=not measured),
            **self.mapping.redraw(s, summary, **table_view), **self.rules.redraw(s), **self.layers.redraw(s, summary),
            **self.spectra.redraw(s), **self.strategy.redraw(s), **self.export.redraw(s),
            self.refresh_info: (f'<div class="refresh-info">updated in {1000 * (time.perf_counter() - started):.0f} '
                                f'ms · read {human_bytes(s.bytes_read - read_before)} from the teacher for this '
                                f'update · {human_bytes(s.bytes_read)} in total</div>'),
        }


def _positive(value: float | None, name: str) -> int:
    if value is None or not math.isfinite(value) or int(value) != value or value < 1:
        raise ProjectionError(f"student {name}: a positive whole number is needed (got {value})")
    return int(value)


def build_app(config: AppConfig, sessions: Sessions) -> gr.Blocks:
    return Inspector(config, sessions).blocks


def launch(blocks: gr.Blocks, sessions: Sessions, host: str = "127.0.0.1", port: int | None = None,
           **kwargs: Any) -> Any:
    """Launch with the app's theme and stylesheet (Gradio 6 takes them at launch). While the server runs, idle
    sessions are swept; when it stops, every session is closed and the scratch folder removed.

    Uploads: Gradio refuses any file over MAX_CALIBRATION_UPLOAD_BYTES (`max_file_size` applies to every upload,
    whatever the component); text uploads (a strategy YAML) are refused over MAX_TEXT_BYTES by their handler
    (`read_text`), and the uploads middleware bounds what each client holds (inspector/uploads.py)."""
    setup_runtime(interactive_threads=INTERACTIVE_THREADS)

    uploads = sessions.uploads

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        sessions.start_sweeper()
        if uploads is not None:
            uploads.start_sweeper()
        try:
            yield
        finally:
            sessions.close_all()
            if uploads is not None:
                uploads.stop()
            sessions.scratch.close()

    app_kwargs: dict[str, Any] = {"lifespan": lifespan}
    if uploads is not None:  # uploads bounded per client and removed (inspector/uploads.py)
        app_kwargs["middleware"] = [Middleware(uploads.middleware)]
    blocks.queue(default_concurrency_limit=4)
    return blocks.launch(server_name=host, server_port=port, theme=theme(), css_paths=[STYLE], ssr_mode=False,
                         footer_links=["api"], show_error=True, js=SLIDER_JS,
                         max_file_size=MAX_CALIBRATION_UPLOAD_BYTES, app_kwargs=app_kwargs, **kwargs)
