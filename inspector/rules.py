"""The Rules view: the active mapping rules as YAML (edit, apply, or ask for suggestions for the keys they leave
unmapped), beside the student keys that transfer nothing and the teacher keys nobody reads."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from projection import ProjectionError

from . import cards
from .bridge import Components, Refresh
from .mapping import keys_mapped
from .session import Session

SYNTAX = ("**Rule syntax**: `student key: teacher key`, a list of teacher keys (stacked on axis 0), or "
          "`{skip: reason}`. A key naming a module applies to each of its parameters; `{i}` is the student block "
          "(the teacher block comes from the Layers tab). Teacher keys use Wan's original names in any format. The "
          "layout's preset rules always apply; give a key a new value to override one.\n\n```yaml\n"
          "layers.{i}.attn: blocks.{i}.self_attn\nstem: patch_embedding\n"
          "blocks.{i}.norm1: {skip: \"no affine in the teacher\"}\n```")


def rules_text(s: Session) -> str:
    if s.mapping.rules:
        return s.rules_text()
    return ("# No rules yet: every student key is looked up under its own name.\n"
            "# Map a student key or module to a teacher key ({i} = block), e.g.\n"
            "#   layers.{i}.attn: blocks.{i}.self_attn\n{}\n")


def unmapped(s: Session, limit: int = 40) -> str:
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


class RulesView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error), and
    `refresh` is the app's: it applies a change and redraws every view."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session], refresh: Refresh):
        self.state, self.session, self.refresh = state, session, refresh
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.rules = gr.Code(language="yaml", lines=22, max_lines=40, label="Active mapping rules (YAML)",
                                     interactive=True, elem_id="rules-editor")
                with gr.Row():
                    self.apply_btn = gr.Button("Apply rules", variant="primary", scale=0, min_width=180,
                                               elem_id="apply-rules")
                    self.suggest_btn = gr.Button("Suggest rules", scale=0, min_width=180, elem_id="suggest-rules")
                self.msg = gr.HTML(elem_id="rules-msg")
            with gr.Column(scale=2):
                gr.Markdown(SYNTAX, elem_classes="note")
                self.unmapped = gr.Markdown(elem_id="unmapped", max_height=560)

    @property
    def components(self) -> list[gr.components.Component]:
        """What `redraw` updates."""
        return [self.unmapped]

    def wire(self, table_view: Components, outputs: list[gr.components.Component],
             elsewhere: Callable[[Session], dict], elsewhere_outputs: list[gr.components.Component]) -> None:
        """`table_view`: the Mapping tab's filters a redraw keeps; `outputs`: everything a refresh redraws;
        `elsewhere`: what else applied rules change (other tabs' `elsewhere_outputs`)."""
        self.elsewhere = elsewhere
        self.apply_btn.click(self.apply, [self.state, self.rules], outputs + [self.rules, self.msg, *elsewhere_outputs],
                             inputs_kwargs=table_view, api_name="apply_rules")
        self.suggest_btn.click(self.suggest, [self.state, self.rules], [self.rules, self.msg],
                               api_name="suggest_rules")

    def redraw(self, s: Session) -> dict:
        return {self.unmapped: unmapped(s)}

    def loaded(self, s: Session) -> dict:
        return {self.rules: rules_text(s), self.msg: ""}

    def apply(self, state: Session | None, text: str, **table_view: Any) -> dict:
        def applied(s: Session) -> dict:
            return {self.rules: rules_text(s), self.msg: keys_mapped(s, "Applied: "), **self.elsewhere(s)}

        return self.refresh(state, table_view, lambda s: s.set_rules(text),
                            lambda exc: {self.msg: cards.inline_error(str(exc))}, applied)

    def suggest(self, state: Session | None, text: str) -> tuple:
        """The editor's rules plus suggestions for the keys they leave unmapped, in the editor: not applied."""
        s = self.session(state)
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
