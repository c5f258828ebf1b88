"""Cooperative cancellation: long loops stop between blocks and micro-batches when their caller says so.

A program (the app) makes a `CancelToken` per request, runs the work inside `cancellable(token)`, and calls
`token.cancel(why)` from any thread when the request's client goes away or the program stops. The core's loops
(the streamed teacher, fidelity, fitting, removal effects, sampling) call `checkpoint()` between steps, which
raises `Cancelled` (a ProjectionError naming why) once the token of the work they run for is cancelled.

The token travels in a context variable: it belongs to the code that set it (its thread, or the tasks it starts
with the context copied), never to the process, so nothing here touches process-wide state. Without a token
`checkpoint()` does nothing.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import ProjectionError


class Cancelled(ProjectionError):
    """The work was stopped by its caller (its client went away, the program is stopping)."""


class CancelToken:
    """Set once, from any thread; `check()` raises `Cancelled` from then on."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._finished = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(f"stopped: {self.reason}")

    def wait(self, timeout: float | None = None) -> bool:
        """Until cancelled (True) or `timeout` seconds (False)."""
        return self._event.wait(timeout)

    def finish(self) -> None:
        """The work under this token has ended (`cancellable` says so when its block exits)."""
        self._finished.set()

    def join(self, timeout: float | None = None) -> bool:
        """Until the work under this token has ended (True) or `timeout` seconds (False)."""
        return self._finished.wait(timeout)


_current: ContextVar[CancelToken | None] = ContextVar("projection_cancel_token", default=None)


@contextmanager
def cancellable(token: CancelToken) -> Iterator[CancelToken]:
    """Run the enclosed work under `token` (in this context only); on leaving, the token's work has ended."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)
        token.finish()


def current() -> CancelToken | None:
    """The token the running work answers to, if any."""
    return _current.get()


def checkpoint() -> None:
    """Raise `Cancelled` if the running work's token was cancelled; otherwise (or without one) return at once."""
    token = _current.get()
    if token is not None:
        token.check()
