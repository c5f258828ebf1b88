"""Plotly figures, drawn from numbers the core computed, in the palette's colours.

Figures are plain plotly.js specs ({"data": [...], "layout": {...}}): building them through plotly's validated
object model costs 50-150 ms each, more than a whole refresh may take, and the browser draws the same JSON.
"""
from __future__ import annotations

import math
from typing import Any

from .palette import (A_SIDE, B_SIDE, CAUTION, CAUTION_TINT, EDGE, ENERGY_SCALE, FONT, NOT_COMPARABLE, STUDENT,
                      TEACHER, UNUSED)
from .units import percent

Figure = dict[str, Any]
AXIS = {"gridcolor": "#eef0f3", "linecolor": "#d1d5db", "zerolinecolor": "#e5e7eb", "automargin": True, "showline": True}


def axis(**kw: Any) -> dict[str, Any]:
    return {**AXIS, **kw}


def figure(data: list[dict[str, Any]], title: str, height: int, title_size: int = 17, **layout: Any) -> Figure:
    base = {
        "height": height, "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
        "font": {"family": FONT, "size": 14, "color": "#1f2937"},
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": title_size}},
        "margin": {"l": 64, "r": 24, "t": 64, "b": 56}, "hoverlabel": {"font": {"size": 14}},
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
        "xaxis": axis(), "yaxis": axis()}
    for key, value in layout.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return {"data": data, "layout": base}


def message(title: str, text: str, height: int = 300) -> Figure:
    """A chart-sized note where numbers are not available yet."""
    note = {"text": text, "showarrow": False, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                "font": {"size": 15, "color": "#4b5563"}}
    return figure([], title, height, xaxis={"visible": False}, yaxis={"visible": False}, annotations=[note])


LAYER_CHART_HEIGHT = 280  # the Layers tab's two charts, side by side


def subtitled(title: str, subtitle: str) -> str:
    """A title with a smaller grey second line (plotly titles are one line of HTML-ish text)."""
    return f"{title}<br><span style='font-size:13px;color:#4b5563'>{subtitle}</span>"


def block_label(i: int, layers: list[int]) -> str:
    return f"S{i} ← T{layers[i]}"


def layer_map(layers: list[int], teacher_blocks: int,
              influence: tuple[list[float], list[float] | None, str] | None = None) -> Figure:
    """Teacher blocks on top, student blocks below, a line from each student block to its source. `influence`:
    (1 - cos(h_in, h_out) per teacher block, the velocity error with each removed or None, what they were measured
    on), drawn as bars above the teacher blocks."""
    title = "Teacher → student blocks"
    n = len(layers)
    if not n or not teacher_blocks:
        return message(title, "The student has no blocks mapped to teacher blocks.")
    span = max(teacher_blocks - 1, 1)
    sx = [i * span / (n - 1) if n > 1 else span / 2 for i in range(n)]
    ex: list[float | None] = []
    ey: list[float | None] = []
    for i, t in enumerate(layers):
        ex += [t, sx[i], None]
        ey += [1, 0, None]
    used = set(layers)

    def labels(count: int) -> list[str]:  # every fifth label when there are too many to read
        return [str(j) if count <= 20 or j % 5 == 0 or j == count - 1 else "" for j in range(count)]

    data = [
        {"type": "scatter", "x": ex, "y": ey, "mode": "lines", "line": {"color": EDGE, "width": 3}, "hoverinfo": "skip",
             "showlegend": False, "name": "edges"},
        {"type": "scatter", "x": list(range(teacher_blocks)), "y": [1] * teacher_blocks, "mode": "markers+text",
             "name": "teacher block", "text": labels(teacher_blocks), "textposition": "top center",
             "marker": {"symbol": "square", "size": 18 if teacher_blocks <= 20 else 11, "line": {"width": 1, "color": "#ffffff"},
                         "color": [TEACHER if j in used else UNUSED for j in range(teacher_blocks)]},
             "hovertemplate": "teacher block %{x}<extra></extra>"},
        {"type": "scatter", "x": sx, "y": [0] * n, "mode": "markers+text", "name": "student block", "text": labels(n),
             "textposition": "bottom center", "customdata": list(zip(range(n), layers)),
             "marker": {"symbol": "square", "size": 22 if n <= 20 else 14, "color": STUDENT, "line": {"width": 1, "color": "#ffffff"}},
             "hovertemplate": "student block %{customdata[0]} ← teacher block %{customdata[1]}<extra></extra>"},
    ]
    note = f"{len(used)} of {teacher_blocks} teacher blocks used; grey ones feed no student block"
    top = 1.45
    if influence is not None and len(influence[0]) == teacher_blocks:
        data.append(_influence_bars(*influence))
        note = f"{len(used)} of {teacher_blocks} teacher blocks used (grey: unused); bars: block influence"
        top = INFLUENCE_BASE + INFLUENCE_HEIGHT + 0.05
    return figure(data, subtitled(title, note), LAYER_CHART_HEIGHT, showlegend=False,
                  yaxis={"tickvals": [0, 1], "ticktext": ["student", "teacher"], "range": [-0.45, top], "showgrid": False,
                             "zeroline": False, "showline": False, "tickfont": {"size": 15}},
                  xaxis={"visible": False, "range": [-0.8, span + 0.8]}, margin={"t": 72, "b": 20})


INFLUENCE_BASE, INFLUENCE_HEIGHT = 1.3, 0.55  # where the influence bars sit above the teacher row (y units)


def _influence_bars(influence: list[float], removal: list[float] | None, about: str) -> dict[str, Any]:
    """Bars scaled to the most influential block; the hover gives the measured values."""
    peak = max(max(influence), 1e-12)
    removed = removal or [None] * len(influence)
    hover = [f"teacher block {b}<br>influence 1 − cos(h_in, h_out): {x:.4f}"
             + ("" if r is None else f"<br>teacher's velocity error with it removed: {r:.4f}") + f"<br>on {about}"
             for b, (x, r) in enumerate(zip(influence, removed))]
    return {"type": "bar", "x": list(range(len(influence))), "y": [INFLUENCE_HEIGHT * x / peak for x in influence],
            "base": INFLUENCE_BASE, "width": 0.6, "name": "influence", "marker": {"color": TEACHER, "opacity": 0.55},
            "hovertext": hover, "hoverinfo": "text", "customdata": influence}


def _hline(y: float, color: str, dash: str, text: str, where: str = "left") -> tuple[dict, dict]:
    """A horizontal line across the plot, labelled above its left or right end, or `outside` (right margin)."""
    shape = {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": y, "y1": y, "line": {"color": color, "width": 2, "dash": dash}}
    note = {"xref": "paper", "x": 0 if where == "left" else 1, "xanchor": where, "yref": "y", "y": y, "yanchor": "bottom",
                "text": text, "showarrow": False, "font": {"color": color, "size": 13}}
    if where == "outside":
        note.update(x=1.01, xanchor="left", yanchor="middle", align="left")
    return shape, note


NOT_MEASURED = "Not computed yet for this large teacher.<br>Press “Compute retained weight energy” (reads it once)."


def layer_energy(energy: dict[str, float] | None, layers: list[int], mean: float | None) -> Figure:
    """Retained energy per student layer ('top' = embeddings, time projection and head)."""
    title = "Retained weight energy per student layer (a weight statistic)"
    if energy is None:
        return message(title, NOT_MEASURED)
    names = [n for n in ["top"] + [f"block {i}" for i in range(len(layers))] if n in energy]
    labels = ["embeddings & head" if n == "top" else block_label(int(n.split()[1]), layers) for n in names]
    ticks = [label.replace(" ← ", "<br>← ").replace(" & ", "<br>& ") for label in labels]  # two short lines each
    values = [100 * energy[n] for n in names]
    data = [{"type": "bar", "x": labels, "y": values, "marker": {"color": STUDENT}, "text": [f"{v:.0f}%" for v in values],
                 "textposition": "auto", "insidetextanchor": "middle",  # inside the bar, clear of the mean line
                 "hovertemplate": "%{x}: %{y:.1f}%<extra></extra>", "name": "retained"}]
    shapes, notes = [], []
    if mean is not None:  # labelled in the right margin, where no bar or bar label can be
        shape, note = _hline(100 * mean, TEACHER, "dash", f"mean<br>{percent(mean)}", "outside")
        shapes, notes = [shape], [note]
    return figure(data, subtitled(title, "% of the teacher tensors' squared norm kept"), LAYER_CHART_HEIGHT,
                  shapes=shapes, annotations=notes, margin={"t": 72, "r": 72, "b": 40},
                  xaxis={"tickangle": 0 if len(names) <= 12 else "auto", "tickfont": {"size": 13},
                         "tickvals": labels, "ticktext": ticks},
                  yaxis={"range": [0, 115], "ticksuffix": "%"})


def energy_heatmap(grid: tuple[list[str], list[str], dict[tuple[str, str], float]] | None,
                   layers: list[int]) -> Figure:
    title = "Retained weight energy: student block × matrix"
    if grid is None:
        return message(title, NOT_MEASURED)
    rows, kinds, values = grid
    if not rows or not kinds:
        return message(title, "No block matrix transfers from the teacher.")
    z = [[round(100 * values[(r, k)], 2) if (r, k) in values else None for k in kinds] for r in rows]
    data = [{"type": "heatmap", "z": z, "x": kinds, "y": [block_label(int(r.split()[1]), layers) for r in rows],
                 "zmin": 0, "zmax": 100, "colorscale": ENERGY_SCALE, "texttemplate": "%{z:.0f}", "textfont": {"size": 13},
                 "colorbar": {"title": {"text": "% kept"}, "ticksuffix": "%"}, "xgap": 2, "ygap": 2,
                 "hovertemplate": "%{y}, %{x}: %{z:.1f}% kept<extra></extra>"}]
    return figure(data, title, max(320, 170 + 34 * len(rows)),
                  yaxis={"autorange": "reversed", "showgrid": False}, xaxis={"tickangle": -30, "showgrid": False})


def spectrum(teacher: list[float], student: list[float] | None, title: str) -> Figure:
    """Singular values on a log scale: the teacher's, with the student's overlaid."""
    data = [{"type": "scatter", "x": list(range(1, len(teacher) + 1)), "y": teacher, "mode": "lines",
                 "name": f"teacher ({len(teacher)})", "line": {"color": TEACHER, "width": 3}}]
    if student is not None:
        data.append({"type": "scatter", "x": list(range(1, len(student) + 1)), "y": student, "mode": "lines",
                         "name": f"student ({len(student)})", "line": {"color": STUDENT, "width": 3}})
    lines = title.split("\n")
    return figure(data, subtitled("Singular values", "<br>".join(lines)), 400, margin={"t": 54 + 18 * len(lines)},
                  yaxis={"type": "log", "dtick": 1, "title": {"text": "singular value"}},
                  xaxis={"title": {"text": "index (largest first)"}},
                  legend={"orientation": "v", "x": 0.98, "xanchor": "right", "y": 0.98, "yanchor": "top",
                          "bgcolor": "rgba(255,255,255,0.85)"})


def cumulative(curve: list[float], rank: int, energy: float | None, stacked: bool) -> Figure:
    """The teacher's cumulative energy, the student's kept rank, and what the projection actually kept. The curve at
    the student's rank is an upper bound: only a per-matrix SVD (basis-inconsistent) reaches it."""
    k = min(rank, len(curve))
    best = curve[k - 1] if k else 0.0
    data = [{"type": "scatter", "x": list(range(1, len(curve) + 1)), "y": [100 * c for c in curve], "mode": "lines",
                 "name": "teacher: top-k singular values", "line": {"color": TEACHER, "width": 3}},
            {"type": "scatter", "x": [k], "y": [100 * best], "mode": "markers+text", "name": f"student rank {k}",
                 "marker": {"color": STUDENT, "size": 13},
                 "text": [f" upper bound at rank {k}: {percent(best)} <br> only per-matrix SVD reaches it <br>"
                          " (basis-inconsistent) "],
                 "textposition": "bottom left" if k >= 0.4 * len(curve) else "bottom right",
                 "hovertemplate": "upper bound at rank %{x}: %{y:.1f}% (the top %{x} singular values); only "
                                  "svd-per-matrix, which is basis-inconsistent, reaches it<extra></extra>"}]
    shapes = [{"type": "line", "xref": "x", "x0": k, "x1": k, "yref": "paper", "y0": 0, "y1": 1,
                   "line": {"color": STUDENT, "width": 2, "dash": "dash"}}]
    notes = []
    if energy is not None:
        label = "this projection keeps" + (" (whole stacked entry)" if stacked else "")
        shape, note = _hline(100 * energy, STUDENT, "dot", f"{label} {percent(energy)}", "right")
        shapes.append(shape)
        notes.append(note)
    return figure(data, "Cumulative energy and the student's kept rank", 400, shapes=shapes, annotations=notes,
                  margin={"t": 90},  # as the singular values' beside it, so that the two plots line up
                  yaxis={"title": {"text": "% of squared norm"}, "range": [0, 105], "ticksuffix": "%"},
                  xaxis={"title": {"text": "k (top singular values kept)"}})


def histograms(centres: list[float], teacher: list[float], student: list[float] | None, key: str) -> Figure:
    data = [{"type": "bar", "x": centres, "y": teacher, "name": "teacher", "marker": {"color": TEACHER}, "opacity": 0.55}]
    if student is not None:
        data.append({"type": "bar", "x": centres, "y": student, "name": "student", "marker": {"color": STUDENT}, "opacity": 0.55})
    return figure(data, f"Values: {key}", 340, barmode="overlay", bargap=0,
                  xaxis={"title": {"text": "value"}}, yaxis={"title": {"text": "density"}})


def index_choices(choices: list[tuple[str, list[int], int]]) -> Figure:
    """One strip per space: which teacher indices the plan keeps (ticks) out of how many (grey)."""
    if not choices:
        return message("Index choices", "Nothing is reduced for this entry: every index is kept.", 200)
    n, row = len(choices), 84  # pixels per space: label, strip, tick labels
    plot_h = row * n
    data, layout, notes = [], {}, []
    for r, (label, kept, total) in enumerate(choices):
        suffix = "" if r == 0 else str(r + 1)
        top = 1 - r / n
        ticks = {"dtick": 1} if total <= 16 else {}
        layout[f"xaxis{suffix}"] = axis(domain=[0, 1], anchor=f"y{suffix}", range=[-0.5, total - 0.5],
                                        showgrid=False, zeroline=False, **ticks)
        layout[f"yaxis{suffix}"] = axis(domain=[top - 42 / plot_h, top - 24 / plot_h], anchor=f"x{suffix}",
                                        visible=False, range=[-1, 1])
        data.append({"type": "scatter", "x": [-0.5, total - 0.5], "y": [0, 0], "mode": "lines", "hoverinfo": "skip",
                         "showlegend": False, "line": {"color": UNUSED, "width": 16}, "xaxis": f"x{suffix}", "yaxis": f"y{suffix}"})
        data.append({"type": "scatter", "x": kept, "y": [0] * len(kept), "mode": "markers", "showlegend": False,
                         "marker": {"symbol": "line-ns", "size": 16, "line": {"width": 2, "color": STUDENT}},
                         "hovertemplate": "teacher index %{x}<extra></extra>", "xaxis": f"x{suffix}", "yaxis": f"y{suffix}"})
        notes.append({"text": f"<b>{label}</b>: {len(kept)} of {total} kept", "xref": "paper", "yref": "paper", "x": 0,
                          "y": top, "xanchor": "left", "yanchor": "top", "showarrow": False, "font": {"size": 13}})
    fig = figure(data, "Index choices: the teacher indices kept", plot_h + 90, annotations=notes,
                 margin={"l": 24, "r": 24, "t": 64, "b": 26})
    fig["layout"].update(layout)
    return fig


INCONSISTENT_NOTE = ("<b>{sides} basis-inconsistent</b>: each matrix in its own basis, so the student does not "
                     "compute<br>the teacher's function; its retained energy is not comparable.")


FUNCTION_SIDES = (("A", "strategy A", A_SIDE), ("B", "strategy B", B_SIDE), ("random init", "random init", EDGE))


def compare_function(levels: list[str], by_level: dict[str, list[float]],
                     by_block: dict[str, list[tuple[int, float]] | None], on: str) -> Figure:
    """What the students of A and B compute, beside a random student of the same shape (the reference): velocity
    error per band of noise levels (left) and each student block's output error against the teacher block it came
    from (right; the block's source in its hover). Keys of `by_level` and `by_block`: 'A', 'B', 'random init'.
    A log axis where the errors span more than 20x (a basis-inconsistent student's are far above the rest)."""
    data = []
    values = [v for side in by_level.values() for v in side] + [
        e for rows in by_block.values() if rows for _, e in rows]
    positive = [v for v in values if v > 0]
    log = bool(positive) and max(positive) > 20 * min(positive)
    for key, name, color in FUNCTION_SIDES:
        data.append({"type": "bar", "x": levels, "y": by_level[key], "name": name, "marker": {"color": color},
                     "legendgroup": key, "hovertemplate": "noise %{x}: %{y:.3f}<extra>" + name + "</extra>"})
        rows = by_block.get(key)
        if rows:
            data.append({"type": "bar", "x": [f"S{i}" for i in range(len(rows))], "y": [e for _, e in rows],
                         "customdata": [t for t, _ in rows], "name": name, "marker": {"color": color},
                         "legendgroup": key, "showlegend": False, "xaxis": "x2", "yaxis": "y2",
                         "hovertemplate": "block %{x} (from teacher block %{customdata}): %{y:.3f}<extra>" + name
                                          + "</extra>"})
    scale = {"type": "log"} if log else {"rangemode": "tozero"}
    notes = [{"text": text, "xref": "paper", "yref": "paper", "x": x, "y": 1.0, "xanchor": "left",
              "yanchor": "bottom", "showarrow": False, "font": {"size": 13, "color": "#4b5563"}}
             for text, x in (("per noise level", 0), ("per student block (kept channels)", 0.56))]
    return figure(data, subtitled("What the students compute: velocity error vs the teacher (lower is better)",
                                  f"on {on}; random init of the same shape is the reference"), 400, barmode="group",
                  annotations=notes, margin={"t": 96},
                  xaxis={"domain": [0, 0.44], "title": {"text": "noise level s"}},
                  yaxis={"title": {"text": "relative error"}, **scale},
                  xaxis2=axis(domain=[0.56, 1], anchor="y2", title={"text": "student block"}),
                  yaxis2=axis(anchor="x2", **scale))


ENERGY_TITLE = "Weight statistic: retained weight energy per student layer, A vs B"


def compare(a: dict[str, float], b: dict[str, float], consistent: tuple[bool, bool] = (True, True)) -> Figure:
    """Retained weight energy per student layer under strategies A and B (a weight statistic, secondary to what
    the students compute); a basis-inconsistent side is drawn grey and hatched, with a note saying why its bars
    are not a result."""
    names = list(dict.fromkeys([*a, *b]))
    labels = ["embeddings & head" if n == "top" else n for n in names]
    data = []
    for (side, values, color), ok in zip((("A", a, A_SIDE), ("B", b, B_SIDE)), consistent):
        y = [100 * values[n] if n in values else None for n in names]
        bar = {"type": "bar", "x": labels, "y": y, "name": f"strategy {side}", "marker": {"color": color},
               "text": [f"{v:.0f}%" if v is not None else "" for v in y], "textposition": "outside",
               "hovertemplate": "%{x}: %{y:.1f}%<extra>strategy " + side + "</extra>"}
        if not ok:
            bar.update(name=f"strategy {side} (basis-inconsistent: not comparable)",
                       marker={"color": "#ffffff", "line": {"color": NOT_COMPARABLE, "width": 1.5},
                               "pattern": {"shape": "/", "fgcolor": NOT_COMPARABLE, "size": 8, "solidity": 0.35}},
                       textfont={"color": NOT_COMPARABLE},
                       hovertemplate="%{x}: %{y:.1f}% (basis-inconsistent: not comparable)<extra>strategy "
                                     + side + "</extra>")
        data.append(bar)
    inconsistent = [side for side, ok in zip("AB", consistent) if not ok]
    if not inconsistent:
        return figure(data, ENERGY_TITLE, 380, barmode="group",
                      yaxis={"title": {"text": "% of teacher's squared weight norm"}, "range": [0, 112],
                             "ticksuffix": "%"})
    sides = " and ".join(inconsistent) + (" are" if len(inconsistent) > 1 else " is")
    note = {"text": INCONSISTENT_NOTE.format(sides=sides), "xref": "paper", "yref": "paper", "x": 0, "y": 1,
            "xanchor": "left", "yanchor": "top", "align": "left", "showarrow": False, "bgcolor": CAUTION_TINT,
            "bordercolor": CAUTION, "borderwidth": 1, "borderpad": 6, "font": {"size": 13, "color": CAUTION}}
    return figure(data, ENERGY_TITLE, 440, barmode="group",
                  annotations=[note],
                  yaxis={"title": {"text": "% of teacher's squared weight norm"}, "range": [0, 140],
                         "tickvals": [0, 20, 40, 60, 80, 100], "ticksuffix": "%"})


PROBE_COLORS = (STUDENT, A_SIDE, B_SIDE, "#7e22ce", "#15803d", "#be185d", "#4d7c0f", "#0369a1", "#a16207")


def probe_curves(curves: list[tuple[str, list[int], list[float]]], random_name: str, on: str) -> Figure:
    """Each probed start's held-out velocity error against the distillation steps (its best rate's run), random
    init grey and dashed beside them: (name, steps, errors) per start, in the order probed. A diverged run's
    infinite error is left out (its line stops). A log axis where the errors span more than 20x."""
    finite = [e for _, _, errors in curves for e in errors if e > 0 and math.isfinite(e)]
    log = bool(finite) and max(finite) > 20 * min(finite)
    data, colours = [], iter(PROBE_COLORS * 2)
    for name, steps, errors in curves:
        random = name == random_name
        colour = EDGE if random else next(colours)
        data.append({"type": "scatter", "mode": "lines+markers", "x": steps,
                     "y": [e if math.isfinite(e) else None for e in errors], "name": name,
                     "line": {"color": colour, "width": 2.5, "dash": "dash" if random else "solid"},
                     "marker": {"size": 7}, "hovertemplate": "step %{x}: %{y:.4f}<extra>" + name + "</extra>"})
    scale = {"type": "log"} if log else {"rangemode": "tozero"}
    on = on if len(on) <= 110 else on[:109] + "…"  # one line of the subtitle (the summary line names it whole)
    return figure(data, subtitled("Held-out velocity error during a short distillation (lower trains better)",
                                  f"{on}<br>each start at its best rate; random init dashed"), 460,
                  margin={"t": 110, "b": 96}, xaxis={"title": {"text": "distillation step"}},
                  yaxis={"title": {"text": "relative error (0: the teacher)"}, **scale},
                  legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.2, "yanchor": "top"})
