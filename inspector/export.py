"""The Export view: write the student (folder under --root, dtype, device), offer the files for download, and
show the `projection export` command that reproduces the same export from a shell."""
from __future__ import annotations

import shlex
import time
from collections.abc import Callable

import gradio as gr
import torch
import yaml

from projection import ProjectionError, Strategy
from projection.core.mapping import rules_to_yaml

from . import cards
from .bridge import choices, progress_to, user_error
from .paths import Roots, unique_export_name
from .session import Session
from .units import percent

EXPORTS_AT_ONCE = 2  # exports running at the same time (each holds a few tensor groups in flight); others queue


def export_command(s: Session, roots: Roots) -> str:
    """The `projection export` command that reproduces this session's export. Its input files go to a new
    temporary folder, so pasting it never overwrites a file of the user's."""
    lines = [f"cd {shlex.quote(str(roots.base))}", "inputs=$(mktemp -d)  # a new folder for the input files below"]

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


class ExportView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error)."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session], roots: Roots,
                 strategy: Strategy):
        self.state, self.session, self.roots = state, session, roots
        with gr.Row(equal_height=True):
            self.out_dir = gr.Textbox(unique_export_name("student"), scale=3, elem_id="out-dir",
                                      label=f"Output folder (new, under {roots.base})")
            self.dtype = gr.Radio(choices("dtype"), value=strategy.dtype, label="dtype", scale=2)
            devices = [d for d in choices("device") if d != "cuda" or torch.cuda.is_available()]
            self.device = gr.Radio(devices, value=strategy.device, label="device", scale=1)
        with gr.Row(equal_height=True):
            self.button = gr.Button("Export student", variant="primary", elem_id="export-button", scale=0,
                                    min_width=220)
            self.msg = gr.HTML(elem_id="export-msg")
        self.cli = gr.Code(language="shell", label="The same export from the command line", interactive=False,
                           elem_id="cli")
        self.files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="export-files")

    def wire(self, strategy_yaml: gr.Code) -> None:
        """`strategy_yaml` (the Strategy tab's editor) shows the dtype and device chosen here."""
        options = [self.state, self.out_dir, self.dtype, self.device]
        for i, event in enumerate((self.dtype.input, self.device.input, self.out_dir.blur)):
            event(self.set_options, options, [self.cli, strategy_yaml], show_progress="hidden",
                  api_name="set_export_options" if i == 0 else None, api_visibility="public" if i == 0 else "private")
        self.button.click(self.export, options, [self.msg, self.files, self.out_dir, self.cli, strategy_yaml],
                          api_name="export", concurrency_limit=EXPORTS_AT_ONCE, concurrency_id="export")

    @property
    def components(self) -> list[gr.components.Component]:
        """What `redraw` updates."""
        return [self.cli]

    def redraw(self, s: Session) -> dict:
        return {self.cli: export_command(s, self.roots)}

    def loaded(self, s: Session) -> dict:
        """The options of a newly loaded session."""
        return {self.dtype: s.strategy.dtype, self.device: s.strategy.device, self.out_dir: s.out_dir}

    def set_options(self, state: Session | None, out_dir: str, dtype: str, device: str) -> tuple:
        s = self.session(state)
        with s.lock:
            s.out_dir = out_dir
            try:
                s.update_strategy(dtype=dtype, device=device)
            except ProjectionError as exc:
                raise user_error(exc, "Export option rejected") from exc
            return export_command(s, self.roots), s.strategy.to_yaml()

    def export(self, state: Session | None, out_dir: str, dtype: str, device: str,
               progress: gr.Progress = gr.Progress()) -> tuple:
        s = self.session(state)
        with s.lock:
            try:
                out = self.roots.output(out_dir)
                s.out_dir = out_dir
                s.update_strategy(dtype=dtype, device=device)
                started = time.perf_counter()
                report, files = s.export(out, progress_to(progress, "exporting"))
            except (ProjectionError, OSError) as exc:
                raise user_error(exc, "Export refused") from exc
            cov = report["coverage"]
            msg = cards.inline_ok(
                f"Wrote {self.roots.display(out)} in {time.perf_counter() - started:.1f} s: "
                f"{cov['keys']['transferred']}/{cov['keys']['total']} keys, {percent(cov['params']['rate'])} of "
                f"parameters from the teacher, retained weight energy "
                f"{percent(report['retained_weight_energy']['mean'])}, {s.strategy.dtype}.")
            command = export_command(s, self.roots)  # the command for the export just written
            s.out_dir = unique_export_name(s.projector.student.layout)  # the next export gets a new folder
            return msg, [str(f) for f in files], s.out_dir, command, s.strategy.to_yaml()
