"""The mapping table: the core's entry rows as a DataFrame, filtered, sorted and coloured by status."""
from __future__ import annotations

import math
from html import escape
from typing import Any

import pandas as pd

from .palette import STATUS_COLORS, STATUS_MEANINGS, STATUS_SHORT, STATUS_TINTS
from .units import percent

STATUSES = tuple(STATUS_COLORS)
COLUMNS = ["student key", "status", "teacher keys", "student shape", "teacher shapes", "params", "transform",
           "retained weight energy", "reason"]
SORTS = {
    "student order": None,
    "status": ("status", True),
    "student key": ("student key", True),
    "params (largest first)": ("params", False),
    "retained weight energy (lowest first)": ("retained weight energy", True),
    "retained weight energy (highest first)": ("retained weight energy", False),
}
# Every row is one line, so that at 1280x720 the first screen shows 8 rows or more: a text too long for its column
# ends in an ellipsis and shows whole in its tooltip (and in the entry's details, a click away). The widths give
# the keys most room and fit "concatenated" at 1280 px.
WIDTHS = ["18%", "8%", "18%", "8.5%", "8.5%", "6%", "13%", "7%", "13%"]
NUMBERS = ("params", "retained weight energy")
# Text columns are HTML: each cell's text is also its title (the tooltip), several teacher keys one a line there.
DATATYPES = ["str" if column in NUMBERS else "html" for column in COLUMNS]


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per student key, in the student's order."""
    data = [{
        "student key": r["student_key"], "status": r["status"], "teacher keys": "\n".join(r["teacher_keys"]),
        "student shape": _shape(r["student_shape"]), "teacher shapes": "\n".join(map(_shape, r["teacher_shapes"])),
        "params": r["params"], "transform": "; ".join(_steps(r)),
        "retained weight energy": float("nan") if (e := r["retained_weight_energy"]) is None else e, "reason": r["reason"],
    } for r in rows]
    return pd.DataFrame(data, columns=COLUMNS)


def _steps(row: dict[str, Any]) -> list[str]:
    """The core's transform steps, less 'from <key>': the teacher keys column already says it."""
    return [s for s in row["transforms"] if not (s.startswith("from ") and s[5:] in row["teacher_keys"])]


def select(df: pd.DataFrame, statuses: list[str] | None, search: str, sort: str) -> pd.DataFrame:
    """Filter by status, search student and teacher keys (case-insensitive), sort."""
    out = df[df["status"].isin(statuses if statuses is not None else STATUSES)]
    needle = (search or "").strip().lower()
    if needle:
        hit = out["student key"].str.lower().str.contains(needle, regex=False)
        hit |= out["teacher keys"].str.lower().str.contains(needle, regex=False)
        out = out[hit]
    order = SORTS.get(sort)
    if order:
        column, ascending = order
        key = (lambda s: s.map(STATUSES.index)) if column == "status" else None
        out = out.sort_values(column, ascending=ascending, kind="stable", na_position="last", key=key)
    return out.reset_index(drop=True)


def styled(df: pd.DataFrame) -> dict[str, Any]:
    """Status cell in its colour, the rest of the row in its tint; numbers formatted for reading.

    This is the payload Gradio builds from a pandas Styler (values, display values, per-cell CSS), written
    directly: a Styler takes ~60 ms to compute for the demo's 123 rows, most of a refresh's budget."""
    status_at = COLUMNS.index("status")
    styling, display = [], []
    for row in df.itertuples(index=False):
        status = row[status_at]
        tint = f"background-color: {STATUS_TINTS[status]}"
        styling.append([f"background-color: {STATUS_COLORS[status]}; color: #ffffff; font-weight: 600"
                        if i == status_at else tint for i in range(len(COLUMNS))])
        display.append([_display(column, value) for column, value in zip(COLUMNS, row)])
    data = [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in df.itertuples(index=False)]
    return {"headers": COLUMNS, "data": data, "metadata": {"styling": styling, "display_value": display}}


def _display(column: str, value: Any) -> str:
    if column == "params":
        return f"{value:,}"
    if column == "retained weight energy":
        return percent(value)
    return one_line(str(value))


def one_line(text: str) -> str:
    """Escaped HTML of a cell: its lines joined with ', ' (the row stays one line), the text whole in its title."""
    if not text:
        return ""
    return f'<span class="cell-text" title="{escape(text)}">{escape(", ".join(text.splitlines()))}</span>'



def legend(counts: dict[str, int]) -> str:
    """One line of HTML chips in the table's colours, with counts and what each status means (in short; whole in
    the tooltip)."""
    chips = "".join(
        f'<div class="legend-chip" data-status="{s}" title="{STATUS_MEANINGS[s]}">'
        f'<span class="swatch" style="background:{STATUS_COLORS[s]}"></span>'
        f'<b>{s}</b> <span class="count">{counts.get(s, 0)}</span>'
        f'<span class="meaning">{STATUS_SHORT[s]}</span></div>' for s in STATUSES)
    return f'<div class="legend">{chips}</div>'


def unused_frame(keys: list[tuple[str, tuple[int, ...]]]) -> pd.DataFrame:
    return pd.DataFrame([{"teacher key": k, "shape": _shape(list(s))} for k, s in keys],
                        columns=["teacher key", "shape"])
