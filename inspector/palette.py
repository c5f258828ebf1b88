"""The one palette: the table, its legend, the cards and every chart take their colours from here."""
from __future__ import annotations

STATUS_COLORS: dict[str, str] = {
    "exact": "#15803d",  # green: copied as is
    "mapped": "#1d4ed8",  # blue: renamed and/or reduced
    "concatenated": "#7e22ce",  # purple: several teacher tensors stacked
    "skipped": "#6b7280",  # grey: keeps its initial value
}
# Light versions for whole-row tints, so a long table stays readable under its status colours.
STATUS_TINTS: dict[str, str] = {
    "exact": "#ecfdf3",
    "mapped": "#eff4ff",
    "concatenated": "#f7f0fe",
    "skipped": "#f3f4f6",
}
STATUS_MEANINGS: dict[str, str] = {
    "exact": "copied as is: same name, same shape",
    "mapped": "from a teacher tensor, renamed and/or reduced",
    "concatenated": "several teacher tensors stacked (e.g. q, k, v into in_proj)",
    "skipped": "no faithful source: keeps its initial value (see reason)",
}
STATUS_SHORT: dict[str, str] = {  # the legend's line: STATUS_MEANINGS is its tooltip
    "exact": "copied as is",
    "mapped": "renamed and/or reduced",
    "concatenated": "several stacked",
    "skipped": "keeps its initial value",
}

TEACHER = "#ea580c"  # orange
STUDENT = "#1d4ed8"  # the "mapped" blue: what the projection produced
UNUSED = "#d1d5db"  # teacher blocks no student block reads
EDGE = "#94a3b8"
WARNING = "#b91c1c"
A_SIDE, B_SIDE = "#0e7490", "#c2410c"  # strategy A / B in comparisons
NOT_COMPARABLE = "#9ca3af"  # a basis-inconsistent side: grey and hatched, never a coloured "winner"
CAUTION, CAUTION_TINT = "#92400e", "#fffbeb"  # notes drawn inside a chart

# Retained energy, 0 -> 100 %: light amber (little kept) to deep green (all kept).
ENERGY_SCALE: list[list[float | str]] = [
    [0.0, "#fff7ed"], [0.35, "#fde68a"], [0.6, "#86efac"], [0.8, "#22c55e"], [1.0, "#14532d"]]

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
