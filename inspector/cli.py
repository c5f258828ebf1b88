"""`python app.py`: parse the command line, make sure the demo exists, launch. Heavy imports wait for parsing."""
from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO_TEACHER, DEMO_STUDENT = "teacher-wan", "student-diffusers.yaml"
STOP_SECONDS = 30  # at a stop signal, how long running work may take to reach its next step (one block) and end
GRACE_SECONDS = 1  # then how long the server waits for open connections before closing them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="Projection Inspector: explore a teacher -> student "
                                "projection in the browser (opens on the built-in demo).")
    p.add_argument("--teacher", help="teacher checkpoint file, folder or hub id (default: the demo teacher)")
    p.add_argument("--student", help="student config (.yaml/.json) or checkpoint (default: the demo student)")
    p.add_argument("--strategy", help="strategy YAML to start from")
    p.add_argument("--expert", choices=["high", "low"], help="expert of a two-expert teacher")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--root", help="the only folder the UI may open or write under (default: the current "
                                  "directory, plus the demo folder)")
    p.add_argument("--allow-hub", action=argparse.BooleanOptionalAction, default=None,
                   help="let the UI open hub ids ('org/name'), downloading them after the user confirms the size "
                        "(default: allowed when --host is a loopback address, refused otherwise)")
    p.add_argument("--idle-minutes", type=float, default=30,
                   help="close a session after this long without a request, freeing its memory (default 30)")
    p.add_argument("--max-sessions", type=int, default=16,
                   help="sessions held at once; a new one closes the least recently used idle one (default 16)")
    p.add_argument("--upload-minutes", type=float, default=15,
                   help="remove an uploaded file this long after it arrived (default 15); it also goes when its "
                        "client's last session closes")
    return p


def hub_allowed(host: str, allow_hub: bool | None) -> bool:
    """Whether hub ids typed in the UI may be opened (and so downloaded): as asked, else only on loopback."""
    if allow_hub is not None:
        return allow_hub
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def demo_folder(root: Path) -> Path:
    """The demo under ROOT/demo, or in the user cache when ROOT is not writable (or holds another 'demo')."""
    from projection import ProjectionError
    from projection.demo.folder import demo_kind, write_demo

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "projection-inspector" / "demo"
    older = None  # a demo of the other kind (the synthetic one of earlier versions): better than none
    for folder in (root / "demo", cache):
        try:
            return write_demo(folder)
        except (OSError, ProjectionError) as exc:
            print(f"demo: cannot use {folder}: {exc}", file=sys.stderr)
            older = older or (folder if demo_kind(folder) else None)
    if older is not None:
        print(f"demo: opening the {demo_kind(older)} demo in {older}", file=sys.stderr)
        return older
    raise SystemExit("cannot write the demo anywhere; pass --teacher and --student")


def start(argv: Sequence[str] | None = None, *, stop_on_signals: bool = False, **launch_kwargs: Any) -> Any:
    """Parse, prepare and launch; returns the running gr.Blocks (its `local_url` says where). stop_on_signals (the
    program, not an embedding test): SIGTERM and SIGINT first stop the work running for every session, then stop
    the server as Ctrl-C does."""
    args = build_parser().parse_args(argv)
    if not (args.idle_minutes > 0 and args.upload_minutes > 0) or args.max_sessions < 1:
        raise SystemExit("--idle-minutes and --upload-minutes must be positive and --max-sessions at least 1")
    from projection import ProjectionError, Strategy
    from projection.engine.projector import Caches

    from .paths import Roots
    from .scratch import Scratch

    root = Path(args.root).expanduser().resolve() if args.root else Path.cwd().resolve()
    if not root.is_dir():
        raise SystemExit(f"--root {args.root}: not a folder")
    demo = demo_folder(root) if not (args.teacher and args.student) else None
    try:
        strategy = Strategy.load(args.strategy) if args.strategy else Strategy()
    except ProjectionError as exc:
        raise SystemExit(f"--strategy: {exc}") from exc
    # The app's temporary folder, Gradio's cache included (before Gradio is imported): removed when the app stops,
    # or at the next start if it was killed.
    scratch = Scratch(os.environ.get("GRADIO_TEMP_DIR"))
    atexit.register(scratch.close)
    scratch.hold_gradio_cache()
    for folder in scratch.removed:
        print(f"removed {folder}: the temporary folder of an app that did not stop cleanly")

    from .app import AppConfig, build_app, launch
    from .sessions import Sessions
    from .function import calibration_cache
    # read only: the demo, and the calibration cache (`projection calibrate --out` there; the Function tab lists it)
    readable = [*([demo] if demo else []), calibration_cache()]
    roots = Roots.create(root, readable, trusted=[args.teacher or "", args.student or ""],
                         hub=hub_allowed(args.host, args.allow_hub))
    teacher = args.teacher or roots.display(demo / DEMO_TEACHER)
    student = args.student or roots.display(demo / DEMO_STUDENT)
    config = AppConfig(roots, teacher, student, args.expert or strategy.expert, strategy, demo)
    print(f"Projection Inspector: teacher {teacher}, student {student}; may open and write under {roots.describe()}"
          f"; hub ids {'allowed (downloads after confirmation)' if roots.hub else 'refused (--allow-hub to allow)'}")
    from .uploads import Uploads
    uploads = Uploads(scratch.path, keep_seconds=args.upload_minutes * 60)
    sessions = Sessions(scratch, Caches(), idle_seconds=args.idle_minutes * 60, max_sessions=args.max_sessions,
                        uploads=uploads)
    blocks = build_app(config, sessions)
    if stop_on_signals:
        def stop(signum: int, frame: Any) -> None:
            # Running work stops within one step of its loop (it holds its session's lock, which closing every
            # session at shutdown waits for). Then Gradio closes as a whole: the clients' heartbeat streams end
            # and the queue stops, so the server is not kept waiting for connections; launch() returns.
            sessions.stop_work(f"the app is stopping ({signal.Signals(signum).name})", wait=STOP_SECONDS)
            if not blocks.is_running:  # not serving yet: stop as Ctrl-C does
                signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
            if getattr(blocks, "server", None) is not None:
                # an event stream left open (its client waiting on a stopped queue) holds the server no longer
                blocks.server.config.timeout_graceful_shutdown = GRACE_SECONDS
            blocks.close()

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, stop)
    launch(blocks, sessions, args.host, args.port, **launch_kwargs)
    return blocks


def main(argv: Sequence[str] | None = None) -> None:
    # SIGTERM stops the app as Ctrl-C does (the server closes, sessions and temporary files are removed).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start(argv, stop_on_signals=True)
