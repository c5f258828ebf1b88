"""What the core hands over, in the form Gradio takes: figures as plot payloads, progress callbacks as
gr.Progress updates, a strategy field's values and help as control options. Shared by every view."""
from __future__ import annotations

import json
from collections.abc import Callable

import gradio as gr
from gradio.components.plot import PlotData

from projection import ProjectionError, Strategy

from . import charts


def plot(fig: charts.Figure) -> PlotData:
    """A plotly.js spec as Gradio's plot payload (no plotly object model on the way)."""
    return PlotData(type="plotly", plot=json.dumps(fig, allow_nan=False))


def progress_to(progress: gr.Progress, label: str) -> Callable[[int, int, str], None]:
    """The core's progress callback (i of n, what), shown on `progress` under `label`."""
    def report(i: int, n: int, what: str) -> None:
        progress((i, n), desc=f"{label}: {what}")
    return report


def toast(title: str) -> Callable[[ProjectionError], dict]:
    """A rejection shown as an error toast with this title."""
    def fail(exc: ProjectionError) -> dict:
        raise gr.Error(str(exc), title=title) from exc
    return fail


def choices(field: str) -> list[str]:
    """A strategy field's allowed values, read from the core's model."""
    annotation = Strategy.model_fields[field].annotation
    return list(getattr(annotation, "__args__", ()))


def info(field: str) -> str:
    return Strategy.model_fields[field].description or ""


Components = dict[str, gr.components.Component]  # an event's inputs by the handler's parameter names
Refresh = Callable[..., dict]  # the app's refresh: (state, table view, change, rejected=None, extra=None) -> updates
