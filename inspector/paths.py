"""Which paths the UI may open and write: everything the user types is confined to the roots.

Containment is decided on resolved paths (links followed), for every file the core reads, not only for the
path typed: the core hands each folder, weights file, index shard and config.json to `Roots.check` first."""
from __future__ import annotations

import datetime as dt
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from projection.errors import ProjectionError
from projection.io.checkpoint import hub_source, parse_hub_id


@dataclass(frozen=True)
class Roots:
    """Folders the UI may read (sources) and write (exports) under; `base` anchors relative paths.

    Sources given on the command line are trusted wherever they are (they and the files they hold): the operator
    chose them. Hub ids typed in the UI are allowed only with `hub` (see inspector.cli.hub_allowed)."""

    base: Path
    read: tuple[Path, ...]
    write: tuple[Path, ...]
    trusted: frozenset[Path] = field(default_factory=frozenset)
    hub: bool = True
    trusted_ids: frozenset[str] = field(default_factory=frozenset)  # hub ids given on the command line

    @classmethod
    def create(cls, root: Path, readable: list[Path] = (), trusted: list[str] = (), hub: bool = True) -> Roots:
        """ROOT: read and write; `readable`: read only (e.g. the demo in the user cache)."""
        base = Path(root).expanduser().resolve()
        read = tuple(dict.fromkeys([base, *(Path(r).expanduser().resolve() for r in readable)]))
        sources = frozenset(p.resolve() for t in trusted if t and (p := _absolute(t, base)).exists())
        ids = frozenset(t for t in trusted if t and not _absolute(t, base).exists() and hub_source(t))
        return cls(base, read, (base,), sources, hub, ids)

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.read)

    def source(self, text: str, what: str, hub_ids: bool = True) -> str:
        """A teacher or student the user typed: an absolute path under a root, or a hub id 'org/name' (only with
        `hub_ids`: a calibration set is always a local file)."""
        text = (text or "").strip()
        if not text:
            raise ProjectionError(f"{what}: no path given")
        path = _absolute(text, self.base)
        if path.exists():
            real = path.resolve()
            if real in self.trusted or _inside(real, self.read):
                return str(real)
            raise ProjectionError(f"{what} '{text}' is outside the folders this app may open ({self.describe()}); "
                                  f"start the app with --root to allow another folder")
        if hub_ids and hub_source(text, self.base):  # `demo/missing` under the base is a missing file, not an id
            if not (self.hub or text in self.trusted_ids):
                raise ProjectionError(f"{what} '{text}': hub ids are off in this app (it listens on a non-loopback "
                                      f"address); start it with --allow-hub to allow them")
            return text  # resolved by the core through the Hugging Face cache
        local = parse_hub_id(text) and not text.startswith((".", "/", "~"))  # shaped like an id, but a local path
        why = (f" ({Path(text).parts[0]}/ is a local folder: not looked up on the hub)" if hub_ids and local else
               " (and not a hub id 'org/name')" if hub_ids else "")
        raise ProjectionError(f"{what} '{text}': no such file or folder under {self.base}{why}")

    def check(self, given: Path, real: Path) -> None:
        """The core's check on every folder and file a source leads to, before it reads it: `real` (links
        followed) must be under a root, unless `given` lies in a source given on the command line."""
        if _inside(real, self.read) or _inside(given, tuple(self.trusted)):
            return
        link = f" (a link to {real})" if real != given else ""
        raise ProjectionError(f"{given}{link} is outside the folders this app may open ({self.describe()})")

    def output(self, text: str) -> Path:
        """An export folder: under a root, not existing yet (exports never overwrite anything)."""
        text = (text or "").strip()
        if not text:
            raise ProjectionError("export: choose an output folder")
        path = _absolute(text, self.base)
        real = path.parent.resolve() / path.name
        if not _inside(real, self.write):
            raise ProjectionError(f"export folder '{text}' is outside the folders this app may write "
                                  f"({', '.join(map(str, self.write))})")
        if os.path.lexists(real):  # a dangling link too: the export would replace it
            raise ProjectionError(f"export folder '{text}' already exists: exports never overwrite; choose a new name")
        return real

    def display(self, path: str | Path) -> str:
        """A path as short as it can be while still working from the base folder."""
        p = Path(path)
        try:
            return str(p.relative_to(self.base)) if p.is_absolute() else str(p)
        except ValueError:
            return str(p)


def _absolute(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def unique_export_name(layout: str, parent: str = "out") -> str:
    """A default export folder no other session will pick: time plus a random suffix."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{parent}/student-{layout}-{stamp}-{uuid.uuid4().hex[:4]}"
