"""The app's temporary folder: one per running app, marked as the app's own, gone when the app is.

`inspector-XXXXXXXX` under the system's temporary folder holds every session's files (downloads, saved strategies)
and Gradio's cache. A marker file inside it is locked (`flock`) for as long as the app runs. The app removes the
folder when it stops; at the next start, it removes every marked folder of this user whose lock is free, i.e.
whose app has gone however it ended (`kill -9` included). Folders without the marker are never touched.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

PREFIX = "inspector-"
MARKER = ".projection-inspector-scratch"


class Scratch:
    def __init__(self, parent: str | Path | None = None):
        self.parent = Path(parent or tempfile.gettempdir())
        self.parent.mkdir(parents=True, exist_ok=True)
        self.removed = remove_stale(self.parent)
        self._gradio_before: str | None = None
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.parent))
        # Lock the marker before it has its name, so no other app ever sees it unlocked.
        staging = self.path / f"{MARKER}.new"
        self._fd: int | None = os.open(staging, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._fd, f"projection-inspector pid {os.getpid()}\n".encode())
        staging.rename(self.path / MARKER)

    def hold_gradio_cache(self) -> None:
        """Point Gradio's cache (uploads, files handed to the browser) here, via GRADIO_TEMP_DIR, until `close`.
        Files a session hands out are then served in place, not copied again."""
        self._gradio_before = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)

    def folder(self, prefix: str) -> Path:
        """A new folder inside the scratch folder (one per session)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.path))

    def close(self) -> None:
        """Remove the folder and everything in it (idempotent)."""
        if self._fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)  # releases the lock
        self._fd = None
        if os.environ.get("GRADIO_TEMP_DIR") == str(self.path):  # Gradio's cache goes back where it was
            if self._gradio_before is None:
                del os.environ["GRADIO_TEMP_DIR"]
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._gradio_before


def remove_stale(parent: Path) -> list[Path]:
    """Remove the marked scratch folders of apps that are gone; returns them."""
    removed = []
    for folder in parent.glob(PREFIX + "*"):
        try:
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue  # a link, a file, or another user's
            fd = os.open(folder / MARKER, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # no marker: not a folder this app made
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: its app is running
            continue
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
