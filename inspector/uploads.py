"""Uploads, bounded per client and removed: Gradio writes every upload (`POST /gradio_api/upload`, the strategy
"Load…" button's file, the Function tab's calibration set) into its cache folder, the app's scratch folder, and would keep it until the app stops,
whoever sent it. The app holds them to:

  MAX_UPLOADS files and MAX_UPLOAD_BYTES bytes per client (its network address) at once, and MAX_ALL_UPLOAD_BYTES
  for all clients together (an address can be forged in a proxy header on loopback): an upload beyond any is
  refused with HTTP 429 and a one-line reason, before its body is read where its size is announced
  an upload is removed `keep_seconds` after it arrived (`--upload-minutes`, default UPLOAD_MINUTES), and when the
  last session of its client closes (`Sessions`)

The bound is per address, not per browser tab: Gradio's upload request names no session. One file uploaded by two
clients (Gradio names uploads by content) is removed when the last of them lets it go.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

MAX_UPLOADS = 16  # files a client holds at once (strategies of a few kB, calibration sets)
MAX_UPLOAD_BYTES = 512 << 20  # bytes a client holds at once: two calibration sets (Gradio refuses a file over
#                               256 MiB: max_file_size = inspector.function.MAX_CALIBRATION_UPLOAD_BYTES)
MAX_ALL_UPLOAD_BYTES = 1 << 30  # bytes all clients hold at once
UPLOAD_MINUTES = 15.0  # an upload is removed this long after it arrived
UPLOAD_ROUTE = "/gradio_api/upload"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Uploads:
    """The uploads each client holds (path -> bytes, arrival), bounded; `middleware` enforces it on Gradio's app."""

    def __init__(self, folder: str | Path, keep_seconds: float = UPLOAD_MINUTES * 60, max_files: int = MAX_UPLOADS,
                 max_bytes: int = MAX_UPLOAD_BYTES, max_all_bytes: int = MAX_ALL_UPLOAD_BYTES):
        self.folder = Path(folder).resolve()
        self.keep_seconds, self.max_files, self.max_bytes = keep_seconds, max_files, max_bytes
        self.max_all_bytes = max_all_bytes
        self.held: dict[str, dict[str, tuple[int, float]]] = {}  # client -> path -> (bytes, arrived)
        self.lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------ the bound

    def holding(self, client: str | None = None) -> tuple[int, int]:
        """(files, bytes) the client (None: all clients) holds now (files removed by other means no longer count)."""
        with self.lock:
            for mine in self.held.values():
                for path in [p for p in mine if not os.path.lexists(p)]:
                    del mine[path]
            groups = list(self.held.values()) if client is None else [self.held.get(client, {})]
            sizes = {p: size for mine in groups for p, (size, _) in mine.items()}  # a shared file counts once
            return len(sizes), sum(sizes.values())

    def refusal(self, client: str, incoming: int = 0, files: int = 0) -> str | None:
        """Why `client` may not hold `files` more files (0: one more, of a size not known yet) of `incoming` more
        bytes, or None."""
        count, size = self.holding(client)
        removed = f"each is removed {self._age()} after it arrived, or when the client's session closes"
        if count + files > self.max_files or (files == 0 and count >= self.max_files):
            return (f"upload refused: this client holds {count} uploaded files (at most {self.max_files} at once); "
                    f"{removed}")
        if size + incoming > self.max_bytes:
            return (f"upload refused: this client holds {size:,} bytes of uploads and sends {incoming:,} more (at "
                    f"most {self.max_bytes:,} at once); {removed}")
        _, everyone = self.holding()
        if everyone + incoming > self.max_all_bytes:
            return (f"upload refused: the app holds {everyone:,} bytes of uploads (at most {self.max_all_bytes:,} for "
                    f"all clients); {removed}")
        return None

    def _age(self) -> str:
        return f"{self.keep_seconds / 60:g} minutes" if self.keep_seconds >= 60 else f"{self.keep_seconds:g} s"

    def add(self, client: str, paths: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            mine = self.held.setdefault(client, {})
            for path in paths:
                if self._inside(path):
                    try:
                        size = os.lstat(path).st_size
                    except OSError:
                        size = 0
                    mine[path] = (size, now)

    # ------------------------------------------------------------ removal

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove the uploads older than `keep_seconds`; returns the paths removed."""
        now = time.monotonic() if now is None else now
        with self.lock:
            old = [(c, p) for c, mine in self.held.items() for p, (_, t) in mine.items() if now - t > self.keep_seconds]
            return self._drop(old)

    def release(self, client: str) -> list[str]:
        """Remove every upload of `client` (its last session closed)."""
        with self.lock:
            return self._drop([(client, p) for p in self.held.get(client, {})])

    def release_all(self) -> None:
        with self.lock:
            self._drop([(c, p) for c, mine in self.held.items() for p in mine])

    def _drop(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Forget (client, path) pairs; remove a file no other client holds (and its folder, once empty)."""
        removed = []
        for client, path in pairs:
            self.held.get(client, {}).pop(path, None)
            if not self.held.get(client):
                self.held.pop(client, None)
            if any(path in mine for mine in self.held.values()):
                continue
            try:
                os.unlink(path)
                removed.append(path)
                os.rmdir(os.path.dirname(path))  # Gradio's folder for this upload's content
            except OSError:
                pass
        return removed

    def _inside(self, path: str) -> bool:
        """Only files in the app's scratch folder are ever removed."""
        try:
            return Path(path).resolve().is_relative_to(self.folder)
        except (OSError, ValueError):
            return False

    def start_sweeper(self) -> None:
        every = max(0.25, min(60.0, self.keep_seconds / 4))

        def run() -> None:
            while not self._stop.wait(every):
                self.sweep()

        threading.Thread(target=run, name="inspector-upload-sweeper", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.release_all()

    # ------------------------------------------------------------ the middleware

    def middleware(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> Callable:
        """An ASGI middleware around Gradio's app: uploads over the bound are refused (429), accepted ones are
        recorded under their client."""
        uploads = self

        async def bounded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope.get("method") != "POST" or \
                    not scope.get("path", "").rstrip("/").endswith(UPLOAD_ROUTE):
                return await app(scope, receive, send)
            client = (scope.get("client") or ("unknown", 0))[0]
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            length = int(headers["content-length"]) if headers.get("content-length", "").isdigit() else 0
            why = uploads.refusal(client, length)
            if why:
                return await _refuse(send, why)
            held: list[Message] = []

            async def keep(message: Message) -> None:  # the upload's answer waits until its files are counted
                held.append(message)

            await app(scope, receive, keep)
            start = next((m for m in held if m["type"] == "http.response.start"), None)
            if start is not None and start["status"] == 200:
                body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
                try:
                    paths = [p for p in json.loads(body) if isinstance(p, str) and uploads._inside(p)]
                except (ValueError, TypeError):
                    paths = []
                with uploads.lock:
                    fresh = [p for p in dict.fromkeys(paths) if p not in uploads.held.get(client, {})]
                size = sum(os.lstat(p).st_size for p in fresh if os.path.lexists(p))
                why = uploads.refusal(client, size, len(fresh)) if fresh else None
                if why:  # more than the client may hold (several files at once, or a race): none of them stays
                    with uploads.lock:
                        uploads._drop([("", p) for p in fresh])
                    return await _refuse(send, why)
                uploads.add(client, paths)
            for message in held:
                await send(message)

        return bounded


async def _refuse(send: Send, why: str) -> None:
    body = why.encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"retry-after", b"60")]})
    await send({"type": "http.response.body", "body": body})
