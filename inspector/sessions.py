"""Every live session of one running app, and what they share.

Memory is bounded for all sessions together: teacher tensors and SVD bases live in one `Caches` shared by every
session (keyed by teacher fingerprint, so sessions on one teacher share entries), and what each session keeps for
itself is small and bounded (see `Session`). A session is freed when its browser tab or API client goes away
(Gradio's unload), after `idle_seconds` without a request, or, when `max_sessions` are open, to make room for a
new one (the least recently used one that is not busy). Its files live in the app's scratch folder.
"""
from __future__ import annotations

import shutil
import threading
import time
from typing import Any

from projection import ProjectionError, Strategy
from projection.cache import SHARED_GALLERY, Lru
from projection.engine.projector import Caches
from projection.io.checkpoint import PathCheck

from .scratch import Scratch
from .session import Session
from .uploads import Uploads

IDLE_SECONDS = 30 * 60
MAX_SESSIONS = 16


class Sessions:
    def __init__(self, scratch: Scratch, caches: Caches | None = None, idle_seconds: float = IDLE_SECONDS,
                 max_sessions: int = MAX_SESSIONS, uploads: Uploads | None = None):
        """uploads: the clients' uploads, removed when a client's last session closes."""
        self.scratch, self.caches, self.uploads = scratch, caches or Caches(), uploads
        self.gallery: Lru = Lru(SHARED_GALLERY)  # rows one session drew, another drawing the same reuses
        self.idle_seconds, self.max_sessions = idle_seconds, max_sessions
        self.live: dict[str, Session] = {}  # by owner: Gradio's session hash
        self.clients: dict[str, str] = {}  # owner -> its client's address (whose uploads it may use)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def open(self, owner: str, teacher: str, student: str | dict[str, Any], expert: str | None,
             strategy: Strategy, num_heads: int | None = None, check: PathCheck | None = None,
             client: str | None = None) -> Session:
        """A new session for `owner` (from `client`, an address); the owner's previous session (if any) is closed
        once it is not busy."""
        self._make_room(owner)
        folder = self.scratch.folder("session-")
        try:
            session = Session.open(teacher, student, expert, strategy, caches=self.caches, folder=folder,
                                   num_heads=num_heads, check=check, gallery=self.gallery)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self.lock:
            previous = self.live.get(owner)
            self.live[owner] = session
            if client is not None:
                self.clients[owner] = client
        if previous is not None:
            previous.stop_work("a new session replaced it")
            self._close(previous)
        return session

    def close(self, owner: str) -> None:
        """The owner went away (tab closed, client disconnected)."""
        with self.lock:
            session = self.live.pop(owner, None)
        self._release_client(owner)
        if session is not None:
            session.stop_work("its browser tab or client closed")  # nobody waits for its work: stop it first
            self._close(session, "its browser tab or client closed")

    def discard(self, session: Session) -> None:
        """Gradio dropped a session's state (an hour after its tab closed): close it if it is still live."""
        with self.lock:
            owners = [o for o, s in self.live.items() if s is session]
            for owner in owners:
                del self.live[owner]
        for owner in owners:
            self._release_client(owner)
        session.stop_work("its browser tab closed")
        self._close(session, "its browser tab closed")

    def sweep(self, now: float | None = None) -> list[Session]:
        """Close the sessions idle for longer than `idle_seconds` (a busy one is left for the next sweep)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            idle = [(o, s) for o, s in self.live.items() if now - s.last_used > self.idle_seconds]
        closed = []
        for owner, session in idle:
            if not session.lock.acquire(blocking=False):
                continue
            try:
                if now - session.last_used > self.idle_seconds:  # not touched by a request meanwhile
                    self._forget(owner, session)
                    session.close(f"it was idle for more than {self.idle_seconds / 60:g} minutes")
                    closed.append(session)
            finally:
                session.lock.release()
        return closed

    def close_all(self) -> None:
        self._stop.set()
        with self.lock:
            sessions, self.live = list(self.live.values()), {}
        for session in sessions:
            session.stop_work("the app stopped")
        for session in sessions:
            self._close(session, "the app stopped")

    def stop_work(self, why: str, wait: float = 0.0) -> bool:
        """Stop every request working on a live session (the app is stopping); wait up to `wait` seconds for them
        to end. Whether they all did."""
        with self.lock:
            sessions = list(self.live.values())
        tokens = [token for session in sessions for token in session.stop_work(why)]
        deadline = time.monotonic() + wait
        return all(token.join(max(0.0, deadline - time.monotonic())) for token in tokens)

    def start_sweeper(self, every: float | None = None) -> None:
        """Sweep idle sessions in the background until `close_all`."""
        every = every or max(1.0, min(60.0, self.idle_seconds / 4))

        def run() -> None:
            while not self._stop.wait(every):
                self.sweep()

        self._sweeper = threading.Thread(target=run, name="inspector-session-sweeper", daemon=True)
        self._sweeper.start()

    # ------------------------------------------------------------ internals

    def _make_room(self, owner: str) -> None:
        with self.lock:
            others = sorted(((s.last_used, o, s) for o, s in self.live.items() if o != owner), key=lambda x: x[0])
        for _, other, session in others[:max(0, len(others) + 1 - self.max_sessions)]:
            if not session.lock.acquire(blocking=False):
                continue
            try:
                self._forget(other, session)
                session.close("the app needed room for a newer session")
            finally:
                session.lock.release()
        with self.lock:
            if len([o for o in self.live if o != owner]) >= self.max_sessions:
                raise ProjectionError(f"the app already holds {self.max_sessions} sessions, all busy; try again "
                                      "in a moment")

    def _forget(self, owner: str, session: Session) -> None:
        with self.lock:
            if self.live.get(owner) is session:
                del self.live[owner]
        self._release_client(owner)
        self._drop_unused_teacher(session)

    def _release_client(self, owner: str) -> None:
        """The owner's session is gone: its client's uploads go too, unless another live session of it remains."""
        with self.lock:
            client = self.clients.pop(owner, None)
            others = client is None or any(self.clients.get(o) == client for o in self.live)
        if not others and self.uploads is not None:
            self.uploads.release(client)

    def _close(self, session: Session, why: str = "a new one replaced it") -> None:
        with session.lock:  # let a request still using it finish first
            session.close(why)
        self._drop_unused_teacher(session)

    def _drop_unused_teacher(self, session: Session) -> None:
        """Free the shared cache entries of a teacher no live session uses any more."""
        fingerprint = session.projector.fingerprint
        with self.lock:
            in_use = any(s.projector.fingerprint == fingerprint for s in self.live.values())
        if not in_use:
            self.caches.drop(fingerprint)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.live)
