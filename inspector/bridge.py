"""What the core hands over, in the form Gradio takes: figures as plot payloads, progress callbacks as
gr.Progress updates, a user's mistake as an error toast (and one server log line), a strategy field's values and
help as control options. Shared by every view."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import gradio as gr
from gradio.components.plot import PlotData

from projection import ProjectionError, Strategy
from projection.cancel import CancelToken, cancellable

from . import charts

LOG = logging.getLogger("inspector")
ERROR_SECONDS = 15  # an error toast closes on its own (style.css places it below the cards)


def plot(fig: charts.Figure) -> PlotData:
    """A plotly.js spec as Gradio's plot payload (no plotly object model on the way)."""
    return PlotData(type="plotly", plot=json.dumps(fig, allow_nan=False))


def progress_to(progress: gr.Progress, label: str) -> Callable[[int, int, str], None]:
    """The core's progress callback (i of n, what), shown on `progress` under `label`."""
    def report(i: int, n: int, what: str) -> None:
        progress((i, n), desc=f"{label}: {what}")
    return report


def user_error(message: str | Exception, title: str = "Error") -> gr.Error:
    """A user's mistake (bad input, a refused request) as an error toast that closes on its own, and one line in
    the server's log: it is not a bug, so no traceback (a bug's exception is not one of these, and keeps its)."""
    text = str(message)
    LOG.warning("%s: %s", title, " ".join(text.split())[:2000])
    return gr.Error(text, title=title, duration=ERROR_SECONDS, print_exception=False)


def toast(title: str) -> Callable[[ProjectionError], dict]:
    """A rejection shown as an error toast with this title."""
    def fail(exc: ProjectionError) -> dict:
        raise user_error(exc, title) from exc
    return fail


def choices(field: str) -> list[str]:
    """A strategy field's allowed values, read from the core's model."""
    annotation = Strategy.model_fields[field].annotation
    return list(getattr(annotation, "__args__", ()))


def info(field: str) -> str:
    return Strategy.model_fields[field].description or ""


Components = dict[str, gr.components.Component]  # an event's inputs by the handler's parameter names
Refresh = Callable[..., dict]  # the app's refresh: (state, table view, change, rejected=None, extra=None) -> updates


WATCH_SECONDS = 0.25  # how often a long handler looks whether its client is still there
F = TypeVar("F", bound=Callable[..., Any])


def client_gone() -> str | None:
    """Why the event this code runs for has lost its client, or None while it has one (or where that cannot be
    told). Gradio marks a running event not alive when its client's event stream closes (a closed tab, a client
    that went away), and stops its queue when the app stops; it does not stop the event's function itself."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return None
    if getattr(queue, "stopped", False):
        return "the app is stopping"
    for job in list(getattr(queue, "active_jobs", ())):
        for event in job or ():
            if getattr(event, "_id", None) == event_id:
                return None if getattr(event, "alive", True) else "its client went away"
    return None


async def _watch(token: CancelToken) -> None:
    while not token.cancelled:
        why = client_gone()
        if why:
            token.cancel(why)
            return
        await asyncio.sleep(WATCH_SECONDS)


def stoppable(handler: F) -> F:
    """A long handler (a teacher pass, a comparison, a gallery) that stops when nobody waits for it any more: its
    client's event stream closes, its event is cancelled (Gradio's /cancel), its session closes (the tab's
    heartbeat ends: `Sessions.close`) or the app stops. It runs in a worker thread under a `CancelToken` that the
    core's loops check between blocks and micro-batches (`projection.cancel`); what cancels it sets the token, and
    the handler ends with `Cancelled` (a ProjectionError) within one step. Same signature as `handler`."""
    @functools.wraps(handler)
    async def run(*args: Any, **kwargs: Any) -> Any:
        token = CancelToken()
        watcher = asyncio.create_task(_watch(token))

        def work() -> Any:
            with cancellable(token):
                return handler(*args, **kwargs)
        try:
            # abandon_on_cancel: a cancelled event returns at once; its thread stops at the next check
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except asyncio.CancelledError:
            token.cancel("its event was cancelled")
            raise
        finally:
            watcher.cancel()
    return run  # type: ignore[return-value]
