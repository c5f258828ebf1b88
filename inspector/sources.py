"""The Sources view: the teacher (path or hub id, and the expert of a two-expert checkpoint) and the student
(a config or checkpoint file and its heads, or a form, which a preset or a planned shape fills). Loading is the
app's (it fills every view); hub files missing from the local cache are downloaded here, only after the user saw
their size and confirmed."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from projection import ProjectionError
from projection.arch.config import DEFAULT_LAYOUT
from projection.arch.presets import PRESETS
from projection.arch.sizing import FLOPS_MEANING, count_params, parse_params, plan_students
from projection.io.checkpoint import HubDownload, fetch_from_hub, hub_download, hub_source

from . import cards
from .bridge import Components, user_error
from .mapping import keys_mapped
from .paths import Roots
from .session import Session
from .units import human_bytes

NO_EXPERT = "single model"
LAYOUT_CHOICES = [("diffusers (WanTransformer3DModel)", "diffusers"), ("Wan's original (WanModel)", "wan"),
                  ("reference 2D Wan (wanlite)", "wanlite"), ("seeds' layout", "seed")]
NO_PRESET = "none"
FORM = ("layout", "dim", "num_layers", "num_heads", "ffn_dim")  # the form's fields, in its order


def expert_of(choice: str | None) -> str | None:
    return None if choice in (None, "", NO_EXPERT) else choice


def missing_downloads(teacher: str, expert: str | None, student: str | dict[str, Any]) -> list[HubDownload]:
    """The hub files these sources need that the local cache lacks (none offline, or for local paths)."""
    found = [hub_download(teacher, expert), hub_download(student) if isinstance(student, str) else None]
    return [d for d in found if d is not None and d.files]


def form_values(fields: dict[str, Any]) -> tuple:
    """The form's values (FORM) for a student config's fields; a preset's numbers for a preset."""
    shape = {"layout": DEFAULT_LAYOUT, **PRESETS.get(fields.get("preset", ""), {}), **fields}
    return tuple(shape[f] for f in FORM)


def plan_table(s: Session, target: str) -> tuple[str, list[dict[str, Any]]]:
    """The candidates for the session's teacher near `target` parameters: a markdown table, and each one's
    student config fields (to fill the form)."""
    teacher = s.projector.teacher.config
    found = plan_students(teacher, parse_params(target, count_params(teacher)))
    rows = [f"| {i} | {c.preset or ''} | {c.config.dim} | {c.config.ffn_dim} | {c.config.num_heads}×"
            f"{c.config.head_dim} | {c.config.num_layers} | {c.params:,} | {c.share:.1%} | {c.flops:,} | "
            f"{', '.join(c.frameworks)} |" for i, c in enumerate(found, 1)]
    table = "\n".join(["| # | preset | width | FFN | heads | blocks | params | of the teacher | FLOPs/token | "
                       "loads as is in |", "|---|---|--:|--:|--:|--:|--:|--:|--:|---|", *rows])
    note = (f"\n\n{FLOPS_MEANING}. ComfyUI needs head dim 128 and freq dim 256; diffusion-pipe, width 1536 or "
            "5120; DiffSynth-Studio and musubi-tuner, a stock Wan shape.")
    return table + note, [c.fields for c in found]


class SourcesView:
    """Built inside a gr.Tab. `load` (wired here, written by the app) opens a session from `inputs`."""

    def __init__(self, roots: Roots, teacher: str, student: str, expert: str | None, demo_dir: Path | None):
        self.roots, self.demo_dir = roots, demo_dir
        self.pending = gr.State(None)  # hub downloads Load found and the user has not confirmed yet
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown("### Teacher")
                self.teacher = gr.Textbox(teacher, label="Checkpoint file, folder or hub id (org/name[:sub])",
                                          elem_id="teacher-path")
                self.expert = gr.Dropdown([NO_EXPERT, "high", "low"], value=expert or NO_EXPERT,
                                          label="Expert (two-expert checkpoints such as Wan 2.2 A14B)")
            with gr.Column(scale=1):
                gr.Markdown("### Student")
                self.student_kind = gr.Radio([("Config or checkpoint file", "file"), ("Form", "form")],
                                             value="file", label="Student from")
                with gr.Row() as self.student_file:
                    self.student_path = gr.Textbox(student, elem_id="student-path", scale=3,
                                                   label="Student config (.yaml/.json) or checkpoint to fill")
                    self.student_heads = gr.Number(0, label="Heads", precision=0, elem_id="student-heads", scale=1,
                                                   min_width=160, info="0: as recorded, else inferred")
                with gr.Row(visible=False) as self.form:
                    self.preset = gr.Dropdown([NO_PRESET, *PRESETS], value=NO_PRESET, label="Preset", min_width=160,
                                              info="its in/out widths come with it")
                    self.layout = gr.Dropdown(LAYOUT_CHOICES, value="diffusers", label="Layout", min_width=200)
                    self.dim = gr.Number(128, label="Width", precision=0, minimum=2, min_width=90)
                    self.num_layers = gr.Number(4, label="Blocks", precision=0, minimum=1, min_width=90)
                    self.num_heads = gr.Number(2, label="Heads", precision=0, minimum=1, min_width=90)
                    self.ffn_dim = gr.Number(384, label="FFN", precision=0, minimum=1, min_width=90)
        with gr.Row():
            self.load_btn = gr.Button("Load", variant="primary", scale=0, min_width=160, elem_id="load-button")
            self.download_btn = gr.Button("Download and load", variant="primary", visible=False, scale=0,
                                          min_width=260, elem_id="download-button")
            if demo_dir is not None:
                self.demo_ref = gr.Button("Demo: Wan → diffusers student", scale=0, min_width=320)
                self.demo_seed = gr.Button("Demo: Wan (diffusers, 3 shards) → seeds' layout", scale=0, min_width=460)
        self.msg = gr.HTML(elem_id="source-msg")
        with gr.Accordion("Plan a student: shapes near a parameter target for the loaded teacher", open=False):
            with gr.Row():
                self.target = gr.Textbox("", label="Parameter target", placeholder="e.g. 1.3B, 300M, 5e8", scale=2)
                self.plan_btn = gr.Button("Plan", scale=0, min_width=160)
                self.plan_pick = gr.Dropdown([], label="Fill the form with row", scale=1)
            self.plan = gr.Markdown(elem_id="student-plan")
            self.planned = gr.State([])  # the rows' student config fields
        hub = ("hub ids through the Hugging Face cache; a download shows its size and waits for your confirmation"
               if roots.hub else "hub ids are off: start the app with --allow-hub to allow them")
        gr.Markdown(f"Opens sources only under `{roots.describe()}`, links and shards included ({hub}), and "
                    f"writes exports only under `{roots.base}`. Mapping reads headers only; tensor data is read "
                    "when numbers need it.", elem_classes="note")

    @property
    def inputs(self) -> Components:
        """What `load` reads, by name: the teacher, its expert, the student's kind, path and heads, the form."""
        return {"teacher": self.teacher, "expert": self.expert, "kind": self.student_kind,
                "student_path": self.student_path, "student_heads": self.student_heads, "layout": self.layout,
                "dim": self.dim, "num_layers": self.num_layers, "num_heads": self.num_heads, "ffn_dim": self.ffn_dim}

    def wire(self, state: gr.State, blocks: gr.Blocks, load: Callable[..., dict], inputs: Components,
             outputs: list[gr.components.Component]) -> None:
        """`load` runs on `state` and the named `inputs` (these sources, the table view) into `outputs`: when the
        page opens, on Load, after a confirmed download, and from the demo buttons. The form's preset comes last,
        so API clients that call `load` with positional values still can (it defaults to none)."""
        outputs = outputs + [self.msg, self.pending, self.download_btn]
        inputs = {**inputs, "preset": self.preset}
        form = [getattr(self, f) for f in FORM]
        self.preset.change(lambda p: form_values({"preset": p}) if p in PRESETS else tuple(gr.update() for _ in FORM),
                           self.preset, form, api_visibility="private")
        self.plan_btn.click(self.plan_student, [state, self.target], [self.plan, self.planned, self.plan_pick],
                            api_name="plan_student")
        self.plan_pick.input(self.fill_form, [self.planned, self.plan_pick],
                             [self.student_kind, self.student_file, self.form, self.preset, *form],
                             api_visibility="private")
        self.student_kind.change(lambda k: (gr.update(visible=k == "file"), gr.update(visible=k == "form")),
                                 self.student_kind, [self.student_file, self.form], api_visibility="private")
        # the previous load's message goes first: a load that fails leaves no stale "Loaded" beside its error
        # A load's progress (and its failure) shows in the message under the buttons, not over every view.
        shown = {"show_progress_on": [self.msg]}
        self.load_btn.click(lambda: "", None, self.msg, api_visibility="private", queue=False).then(
            load, state, outputs, inputs_kwargs=inputs, api_name="load", **shown)
        fetched = {k: v for k, v in self.inputs.items() if k in ("teacher", "expert", "kind", "student_path")}
        self.download_btn.click(self.download, self.pending, [self.pending, self.download_btn, self.msg],
                                inputs_kwargs=fetched, api_name="download").success(
            load, state, outputs, inputs_kwargs=inputs, api_visibility="private", **shown)
        blocks.load(load, state, outputs, inputs_kwargs=inputs, api_visibility="private")
        if self.demo_dir is not None:
            demo = self.roots.display(self.demo_dir)
            for button, student, teacher in ((self.demo_ref, "student-diffusers.yaml", "teacher-wan"),
                                             (self.demo_seed, "student-seed.yaml", "teacher-diffusers")):
                button.click(lambda a=f"{demo}/{teacher}", b=f"{demo}/{student}": (a, NO_EXPERT, "file", b),
                             None, [self.teacher, self.expert, self.student_kind, self.student_path],
                             api_visibility="private").then(load, state, outputs, inputs_kwargs=inputs,
                                                            api_visibility="private", **shown)

    @staticmethod
    def plan_student(state: Session | None, target: str) -> tuple[str, list[dict[str, Any]], dict]:
        """Candidate shapes near `target` parameters for the loaded teacher, and the rows to fill the form from."""
        if state is None or state.closed:
            raise user_error("Load a teacher first: the plan is for the loaded teacher.", "Nothing loaded")
        try:
            table, planned = plan_table(state, target)
        except ProjectionError as exc:
            raise user_error(exc, "Cannot plan") from exc
        return table, planned, gr.update(choices=[str(i) for i in range(1, len(planned) + 1)], value=None)

    @staticmethod
    def fill_form(planned: list[dict[str, Any]], row: str | None) -> tuple:
        """The form, shown and filled with a planned row (its preset, if it is one)."""
        if not row:
            return tuple(gr.update() for _ in range(4 + len(FORM)))
        fields = planned[int(row) - 1]
        return ("form", gr.update(visible=False), gr.update(visible=True), fields.get("preset", NO_PRESET),
                *form_values(fields))

    def loaded(self, s: Session, seconds: float) -> dict:
        return {self.msg: keys_mapped(s, f"Loaded in {seconds:.1f} s (headers only): "), self.pending: None,
                self.download_btn: gr.update(visible=False)}

    def ask_download(self, downloads: list[HubDownload]) -> dict:
        total = human_bytes(sum(d.nbytes for d in downloads))
        what = "; ".join(f"{d.source} at {d.commit[:12]}: {len(d.files)} file{'s' if len(d.files) != 1 else ''}, "
                         f"{human_bytes(d.nbytes)}" for d in downloads)
        return {self.pending: downloads,
                self.download_btn: gr.update(visible=True, value=f"Download {total} and load"),
                self.msg: cards.inline_ask(f"Not in the local Hugging Face cache: {what} (sizes from the hub). "
                                           f"Nothing has been downloaded yet: “Download {total} and load” "
                                           f"fetches them.")}

    def download(self, pending: list[HubDownload] | None, progress: gr.Progress = gr.Progress(track_tqdm=True), *,
                 teacher: str, expert: str, kind: str, student_path: str) -> dict:
        """Fetch what Load showed, if the sources and the hub's files are still those the user saw (if not, the
        Load that follows asks again)."""
        if not pending:
            raise user_error("Press Load first: it shows what would be downloaded.", "Nothing to download")
        done = {self.pending: None, self.download_btn: gr.update(visible=False)}
        try:
            teacher_src = self.roots.source(teacher, "teacher")
            student = self.roots.source(student_path, "student") if kind != "form" else {}
            if missing_downloads(teacher_src, expert_of(expert), student) != pending:
                return {**done, self.msg: cards.inline_ask("The sources or the hub's files changed since "
                                                           "Load showed the size: nothing was downloaded.")}
            progress(0, desc=f"downloading {human_bytes(sum(d.nbytes for d in pending))}")
            for source, source_expert in ((teacher_src, expert_of(expert)), (student, None)):
                if isinstance(source, str) and (hub := hub_source(source)):
                    fetch_from_hub(*hub, source_expert)
        except ProjectionError as exc:
            raise user_error(exc, "Download failed") from exc
        return {**done, self.msg: cards.inline_ok("Downloaded; loading.")}
