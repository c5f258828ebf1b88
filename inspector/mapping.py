"""The Mapping view: one row per student key, coloured by status (filter, search, sort), an entry's details
(its teacher sources, transforms, index choices and value histograms), and the teacher keys nothing reads."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import torch

from projection import ProjectionError

from . import cards, charts, table
from .bridge import Components, plot
from .session import Session
from .units import percent


def details(s: Session, key: str) -> tuple:
    """An entry's details as (markdown, index-choice chart, histogram chart); charts None where not known yet."""
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


def default_key(s: Session) -> str | None:
    """The entry whose details open first: the first transferred matrix of block 0 (a good demo)."""
    entries = s.mapping.entries
    for wanted in (lambda e: e.student_block == 0 and e.status != "skipped" and len(e.student_shape) == 2,
                   lambda e: e.status != "skipped", lambda e: True):
        found = next((e.student_key for e in entries if wanted(e)), None)
        if found:
            return found
    return None


class MappingView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error)."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session]):
        self.state, self.session = state, session
        self.legend = gr.HTML(elem_id="legend")
        with gr.Row(equal_height=True, elem_id="table-filters"):  # one line, right above the table
            self.statuses = gr.CheckboxGroup(list(table.STATUSES), value=list(table.STATUSES), label="Show",
                                             show_label=False, container=False, scale=3, min_width=470,
                                             elem_id="status-filter")
            self.search = gr.Textbox(label="Search keys", placeholder="Search keys, e.g. ffn, blocks.3, in_proj",
                                     show_label=False, container=False, scale=2, elem_id="search")
            self.sort = gr.Dropdown(list(table.SORTS), value="student order", label="Sort", show_label=False,
                                    container=False, scale=1, min_width=230, elem_id="sort")
        self.table = gr.Dataframe(table.frame([]), interactive=False, wrap=False, max_height=540,
                                  column_widths=table.WIDTHS, datatype=table.DATATYPES, elem_id="mapping-table",
                                  show_label=False, buttons=["fullscreen", "copy"])
        gr.Markdown("Click a row (or pick a key) for its sources, index choices and value histograms.",
                    elem_classes="note")
        self.key = gr.Dropdown([], value=None, label="Entry details", filterable=True, elem_id="entry-key",
                               allow_custom_value=True)  # API clients may name any student key
        self.details = gr.Markdown(elem_id="details")
        with gr.Row():
            self.index_plot = gr.Plot(show_label=False, elem_id="index-plot")
            self.hist_plot = gr.Plot(show_label=False, elem_id="hist-plot")
        with gr.Accordion("Unused teacher keys", open=False, elem_id="unused") as self.unused_box:
            self.unused = gr.Dataframe(table.unused_frame([]), interactive=False, max_height=360, show_label=False)

    @property
    def table_view(self) -> Components:
        """The filters, sort and open entry every redraw keeps, by name: handlers take them as keywords."""
        return {"statuses": self.statuses, "search": self.search, "sort": self.sort, "key": self.key}

    @property
    def components(self) -> list[gr.components.Component]:
        """What `redraw` updates."""
        return [self.legend, self.table, self.unused_box, self.unused, self.details, self.index_plot, self.hist_plot]

    def wire(self) -> None:
        for i, event in enumerate((self.statuses.input, self.search.input, self.search.submit, self.sort.input)):
            event(self.filter_table, [self.state, self.statuses, self.search, self.sort], self.table,
                  show_progress="hidden", trigger_mode="always_last", api_name="filter_table" if i == 0 else None,
                  api_visibility="public" if i == 0 else "private")
        self.table.select(pick_row, None, self.key, api_visibility="private")
        self.key.change(self.show_details, [self.state, self.key], [self.details, self.index_plot, self.hist_plot],
                        api_name="details")

    def redraw(self, s: Session, summary: dict[str, Any], *, statuses: list[str], search: str, sort: str,
               key: str | None) -> dict:
        unused = s.unused_teacher_keys()
        out = {self.legend: table.legend(summary["counts"]),
               self.table: table.styled(table.select(table.frame(s.rows()), statuses, search, sort)),
               self.unused_box: gr.update(label=f"Unused teacher keys ({len(unused)})"),
               self.unused: table.unused_frame(unused)}
        if key:
            out[self.details], out[self.index_plot], out[self.hist_plot] = details(s, key)
        return out

    def loaded(self, s: Session, key: str | None) -> dict:
        """A newly loaded session's keys to pick from, `key` open."""
        return {self.key: gr.update(choices=[e.student_key for e in s.mapping.entries], value=key)}

    def filter_table(self, state: Session | None, statuses: list[str], search: str, sort: str) -> Any:
        s = self.session(state)
        with s.lock:
            return table.styled(table.select(table.frame(s.rows()), statuses, search, sort))

    def show_details(self, state: Session | None, key: str | None) -> tuple:
        if state is None or not key:
            return "", None, None
        s = self.session(state)
        with s.lock:
            return details(s, key)


def pick_row(evt: gr.SelectData) -> Any:
    row = evt.row_value or []
    return row[0] if row else gr.skip()


def keys_mapped(s: Session, prefix: str) -> str:
    """How many student keys map to a teacher key, flagged when none do."""
    keys = s.mapping.coverage()["keys"]
    text = f"{prefix}{keys['transferred']} of {keys['total']} student keys map to a teacher key"
    if keys["transferred"] == 0:
        return cards.inline_error(f"{text}: nothing transfers until rules map them (Rules tab).")
    return cards.inline_ok(f"{text}.")


def histogram(a: torch.Tensor, b: torch.Tensor | None, bins: int = 60,
              share: float = 0.998) -> tuple[list[float], list[float], list[float] | None]:
    """Bin centres and densities of two value sets on one range: the central `share` of both (display only;
    trained-like weights have long tails that would squeeze everything else into one bin)."""
    def bounds(t: torch.Tensor) -> tuple[float, float]:
        sample = t.flatten()[::max(1, t.numel() // 1_000_000)].double()  # quantile needs a bounded input
        lo, hi = torch.quantile(sample, torch.tensor([(1 - share) / 2, (1 + share) / 2], dtype=torch.float64))
        return lo.item(), hi.item()

    lo, hi = bounds(a)
    if b is not None and b.numel():
        blo, bhi = bounds(b)
        lo, hi = min(lo, blo), max(hi, bhi)
    if hi <= lo:
        hi = lo + 1e-6
    width = (hi - lo) / bins
    centres = [lo + (i + 0.5) * width for i in range(bins)]

    def density(t: torch.Tensor) -> list[float]:
        counts = torch.histc(t.double(), bins=bins, min=lo, max=hi)
        return (counts / max(t.numel() * width, 1e-30)).tolist()

    return centres, density(a), density(b) if b is not None and b.numel() else None
