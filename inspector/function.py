"""The Function view: run the teacher on a calibration set and show what the student computes next to it (the
core's `projection.engine.report.function_report`): the velocity error per noise level for the student and two
references of its shape, per student block, each teacher block's influence and removal effect, and how far
weight-ranked and activation-ranked index sets agree. The set measured on is also the one activation choices
and the least-squares fit use from then on. Below them, "Probe recoverability" ranks candidate starts by how far a
short distillation on the same set brings them (the core's `projection.probe`)."""
from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from projection import ProjectionError, Strategy
from projection.demo import teacher as demo_teacher
from projection.function import calibration as sets
from projection.io.diskcache import cache_dir
from projection.function.calibration import Calibration
from projection.io.checkpoint import read_safetensors_header
from projection.io.inputs import load_json, open_regular
from projection.probe import ProbeConfig, ProbeResult, recovery

from . import cards, charts
from .bridge import plot, progress_to, stoppable, user_error
from .paths import Roots
from .session import Session
from .units import human_bytes

DEMO, FILE, SYNTHETIC = "demo held-out digits", "file", "synthetic (a guess)"  # the choices, as shown
UPLOAD = "upload"
SOURCES = (DEMO, FILE, UPLOAD, SYNTHETIC)
MAX_LATENTS = 512  # latents measured at most (each is run through the teacher once per noise draw)
DEFAULT_LATENTS = 64
MAX_CALIBRATION_BYTES = 2 << 30  # a calibration file is read whole
MAX_CALIBRATION_UPLOAD_BYTES = 256 << 20  # an uploaded set (Gradio's max_file_size; larger ones: a file under --root)
MAX_FOUND = 50  # .safetensors files whose headers the list of sets found reads, at most, per folder
MAX_FOUND_ENTRIES = 10_000  # folder entries looked at, at most, per folder
MAX_FOUND_HEADER = 1 << 20  # a calibration set's header is a few hundred bytes; larger ones are weights, skipped
REFERENCES = ("student", "random init", "svd-per-matrix")
INTRO = ("### What the student computes\nThe teacher runs on a calibration set block by block (one block of its "
         "weights in memory); the student and two references of its shape (random init, and the seeds' per-matrix "
         "SVD) run on the same inputs at fixed noise. **Velocity error**: ‖v_student − v_teacher‖² / ‖v_teacher‖² "
         "(0 is the teacher's function; an unrelated model is near 1). **Per block**: each student block's output "
         "against the teacher block it came from, on the kept residual channels. The set measured on also becomes "
         "the one activation choices and the least-squares fit use.")


PROBE_A, PROBE_B, PROBE_CURRENT = "strategy A", "strategy B", "current strategy"  # the candidates, as shown
PROBE_PICKS = (PROBE_A, PROBE_B, PROBE_CURRENT)
PROBE_STEPS = 100  # K by default: the issue's, and about 10 s per candidate on the demo (2 cores)
MAX_PROBE_STEPS = min(recovery.MAX_STEPS, 1000)  # the app's bound: a longer probe belongs to the CLI
MAX_PROBE_FILES = 4  # saved strategy files per probe (with A, B, the current one, random init and the default: 9)
PROBE_INTRO = ("#### Probe recoverability: which start trains best?\nThe step-0 error above does not predict "
               "training. The probe distills each candidate start for K steps from the teacher's velocity on the "
               "calibration set chosen above (the same data, noise and steps for every start; a small grid of "
               "learning rates, each start's best kept), then ranks them by their **velocity error on the set's "
               "held-out latents after K steps** (‖v_student − v_teacher‖² / ‖v_teacher‖²: 0 is the teacher). "
               "Random init and the default projection always run. The teacher's targets are computed once and "
               "cached on disk; the Gallery can then draw each start before and after its probe.")
PROBE_COLUMNS = ["rank", "candidate", "error at step 0", "error after K steps", "best rate", "rank by step-0 error"]


def calibration_cache() -> Path:
    """Where `projection calibrate --out` is best pointed: $PROJECTION_CACHE/calibration, else
    $XDG_CACHE_HOME/projection-inspector/calibration, else ~/.cache/projection-inspector/calibration. The app may
    read it (a read-only root) and lists the sets in it."""
    return cache_dir() / "calibration"


def upload_folder() -> Path:
    """Gradio's upload folder (the app's scratch folder while it runs: inspector.scratch)."""
    return Path(gr.utils.get_upload_folder()).resolve()


def check_size(path: Path, what: str, limit: int, accepted: str, otherwise: str) -> None:
    """Refuse a set larger than the app reads, before reading it (one line naming it and both sizes)."""
    size = path.stat().st_size
    if size > limit:
        raise ProjectionError(f"{what} is {human_bytes(size)}; {accepted} up to {human_bytes(limit)} ({otherwise})")


def open_upload(upload: Any, config: dict[str, Any]) -> Calibration:
    """An uploaded set: a file in Gradio's upload folder only (never a path a client typed), named by its
    uploaded name, at most MAX_CALIBRATION_UPLOAD_BYTES."""
    path_text = upload if isinstance(upload, str) else getattr(upload, "path", None) or getattr(upload, "name", None)
    if not path_text:
        raise ProjectionError("calibration upload: no file uploaded (choose a .safetensors set)")
    folder, path = upload_folder(), Path(path_text)
    name = path.name

    def inside(given: Path, real: Path) -> None:
        if not real.is_relative_to(folder):
            raise ProjectionError(f"calibration upload '{name}': not a file uploaded to this app")

    inside(path, path.resolve())
    if not path.is_file():
        raise ProjectionError(f"calibration upload '{name}': not a file")
    check_size(path, f"calibration upload '{name}'", MAX_CALIBRATION_UPLOAD_BYTES, "uploads are accepted",
               "place larger sets under --root")
    try:
        calibration = sets.load_calibration(path, config, check=inside)
    except ProjectionError as exc:  # named by the uploaded name, not the server's copy
        raise ProjectionError(str(exc).replace(str(path), name)) from None
    source = f"uploaded {name}"
    if calibration.metadata.get("source"):
        source = f"{calibration.metadata['source']} (uploaded {name})"
    return dataclasses.replace(calibration, source=source,
                               metadata={**calibration.metadata, "source": source})


def open_source(source: str, path_text: str, count: float | None, roots: Roots, config: dict[str, Any],
                upload: Any = None) -> Calibration:
    """The calibration set the view's controls name, at most `count` latents; a file must lie under the roots, an
    upload in Gradio's upload folder."""
    n = int(count) if count is not None else DEFAULT_LATENTS
    if not 1 <= n <= MAX_LATENTS:
        raise ProjectionError(f"latents: {n} is outside 1..{MAX_LATENTS}")
    if source == DEMO:
        calibration = demo_teacher.open_calibration(demo_teacher.DEMO, config)  # refused outside the demo's space
    elif source == SYNTHETIC:
        calibration = sets.synthetic_calibration(config, n=n)
    elif source == UPLOAD:
        calibration = open_upload(upload, config)
    elif source == FILE:
        path = Path(roots.source(path_text, "calibration file", hub_ids=False))  # resolved, under a root
        if not path.is_file():
            raise ProjectionError(f"calibration file '{path_text}': not a file (a .safetensors with latents, context)")
        check_size(path, f"calibration file '{path_text}'", MAX_CALIBRATION_BYTES, "the app reads sets",
                   "use the CLI for larger ones")
        calibration = sets.load_calibration(path, config, check=roots.check)  # checked again as it is opened
    else:
        raise ProjectionError(f"calibration source '{source}': choose one of {', '.join(SOURCES)}")
    return calibration.subset(n) if len(calibration) > n else calibration


def _peek(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]] | None:
    """A file's tensors and metadata when it is a small-headed safetensors file, else None (never an error)."""
    try:
        with open_regular(path, "safetensors file") as f:
            head = f.read(8)
            if len(head) < 8 or not 0 < struct.unpack("<Q", head)[0] <= MAX_FOUND_HEADER:
                return None
            raw = f.read(struct.unpack("<Q", head)[0])
        tensors, _ = read_safetensors_header(path)  # validated as the loader would
        metadata = load_json(raw, str(path)).get("__metadata__") or {}
    except (ProjectionError, OSError, ValueError, AttributeError):
        return None
    return tensors, metadata if isinstance(metadata, dict) else {}


def found_sets(teacher_source: str, roots: Roots) -> list[tuple[str, str]]:
    """(label, path) of the calibration sets beside the teacher (its folder and that folder's parent, for a file
    teacher the folder holding it and its parent) and in the calibration cache, not recursive: `.safetensors` files
    whose header holds `latents` and `context`, at most MAX_FOUND headers read per folder (the first by name), only
    folders and files under the roots. Each is labelled with its path, its latents' shape and its metadata `source`
    (control characters removed, clipped)."""
    folders: list[Path] = []
    teacher = Path(teacher_source)
    if teacher.is_absolute() and teacher.exists():  # a hub id has no folder here
        near = teacher if teacher.is_dir() else teacher.parent
        folders += [near, near.parent]
    folders.append(calibration_cache())

    def under_roots(real: Path) -> bool:
        return any(real == r or real.is_relative_to(r) for r in roots.read)

    candidates: list[Path] = []
    for folder in dict.fromkeys(f.resolve() for f in folders):
        if not (under_roots(folder) and folder.is_dir()):
            continue
        names = []
        try:
            with os.scandir(folder) as entries:
                for i, entry in enumerate(entries):
                    if i >= MAX_FOUND_ENTRIES:
                        break
                    if entry.name.endswith(".safetensors"):
                        names.append(entry.name)
        except OSError:
            continue
        candidates += [folder / name for name in sorted(names)[:MAX_FOUND]]
    found, seen = [], set()
    for path in candidates:
        real = path.resolve()
        if real in seen or not under_roots(real):
            continue
        seen.add(real)
        peeked = _peek(real)
        if peeked is None or not {"latents", "context"} <= set(peeked[0]):
            continue
        tensors, metadata = peeked
        source = sets.shown({"source": str(metadata.get("source", ""))})["source"] or path.name
        shape = "x".join(map(str, tensors["latents"]["shape"][1:]))
        n = tensors["latents"]["shape"][0] if tensors["latents"]["shape"] else 0
        found.append((f"{roots.display(path)} · {n} latents of {shape} · {source}", roots.display(path)))
    return found


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def placeholder(columns: list[str], what: str = "press Measure") -> pd.DataFrame:
    """A table before its measurement: the columns it will have, and one row that says what fills them."""
    return pd.DataFrame([[what, *["—"] * (len(columns) - 1)]], columns=columns)


ERRORS = [f"{name}: error" for name in REFERENCES]
LEVEL_COLUMNS = ["noise levels", *ERRORS, "student: cosine"]
BLOCK_COLUMNS = ["student block", "from teacher block", *ERRORS]
TEACHER_COLUMNS = ["teacher block", "influence 1 − cos(h_in, h_out)", "velocity error with it removed",
                   "feeds student blocks"]
AGREEMENT_COLUMNS = ["space", "weights and activations keep the same", "by chance"]


def levels_frame(fidelity: dict[str, Any]) -> pd.DataFrame:
    """Velocity error (and the student's cosine) per band of noise levels, then over all of them."""
    students = fidelity["students"]
    bands = [(f"s {b['s_low']:.2f}–{b['s_high']:.2f}", k) for k, b in enumerate(students["student"]["by_level"])]
    rows = []
    for label, k in [*bands, ("all levels", None)]:
        pick = (lambda f: f) if k is None else (lambda f, k=k: f["by_level"][k])
        row = {"noise levels": label}
        for name in REFERENCES:
            row[f"{name}: error"] = _num(pick(students[name])["relative_error"])
        row["student: cosine"] = _num(pick(students["student"])["cosine"])
        rows.append(row)
    return pd.DataFrame(rows, columns=LEVEL_COLUMNS)


def blocks_frame(fidelity: dict[str, Any]) -> pd.DataFrame:
    per_block = fidelity.get("blocks")
    if not per_block:
        return pd.DataFrame([{"per student block": "not measured for this student layout"}])
    return pd.DataFrame([{"student block": row["block"], "from teacher block": row["teacher_block"],
                          **{f"{name}: error": _num(per_block[name][i]["relative_error"]) for name in REFERENCES}}
                         for i, row in enumerate(per_block["student"])], columns=BLOCK_COLUMNS)


def teacher_frame(report: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([[b["block"], _num(b["influence"], 4), _num(b["removal_error"], 4),
                          ", ".join(map(str, b["feeds"])) or "none"] for b in report["teacher_blocks"]],
                        columns=TEACHER_COLUMNS)


def agreement_frame(report: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([[a["label"], f"{100 * a['overlap']:.0f}%", f"{100 * a['chance']:.0f}%"]
                         for a in report["agreement"]], columns=AGREEMENT_COLUMNS)


def summary(report: dict[str, Any], calibration: Calibration) -> str:
    fidelity = report["fidelity"]
    students = fidelity["students"]
    line = (f"Measured on {calibration.label}: {len(calibration)} latents × {fidelity['noise_draws']} noise draws, "
            f"levels s in [{fidelity['noise_levels'][0]:.3f}, {fidelity['noise_levels'][1]:.3f}]. Velocity error: "
            f"student {students['student']['relative_error']:.3f}, random init "
            f"{students['random init']['relative_error']:.3f}, svd-per-matrix "
            f"{students['svd-per-matrix']['relative_error']:.3f}.")
    if calibration.synthetic:
        return cards.warnings_banner([f"SYNTHETIC calibration: Gaussian latents and context, not real inputs. These "
                                      f"numbers are a guess at what the student computes. {line}"])
    return cards.inline_ok(line)


def probe_steps(value: float | None) -> int:
    """The probe's K from the steps box: a whole number 1..MAX_PROBE_STEPS."""
    if value is None or not float(value).is_integer() or not 1 <= value <= MAX_PROBE_STEPS:
        raise ProjectionError(f"probe steps: {value} is not a whole number from 1 to {MAX_PROBE_STEPS} (longer "
                              "probes: `projection probe` on the command line)")
    return int(value)


def strategy_files(text: str, roots: Roots) -> list[tuple[str, Path]]:
    """The saved strategy files typed (one per line or comma-separated): (as typed, resolved path), each under
    the roots, a .yaml or .yml file, at most MAX_PROBE_FILES."""
    typed = [t.strip() for line in (text or "").splitlines() for t in line.split(",") if t.strip()]
    if len(typed) > MAX_PROBE_FILES:
        raise ProjectionError(f"strategy files: {len(typed)} given; a probe takes at most {MAX_PROBE_FILES}")
    found = []
    for t in typed:
        path = Path(roots.source(t, "strategy file", hub_ids=False))  # resolved, under a root
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            raise ProjectionError(f"strategy file '{t}': not a .yaml file (save one from the Strategy tab)")
        found.append((t, path))
    return found


def probe_candidates(picked: list[str], a_text: str, b_text: str, current: Strategy, files: list[tuple[str, Path]],
                     expert: str | None) -> tuple[dict[str, Strategy], dict[str, str]]:
    """The probe's named candidates (random init and the default come with every probe) and where each came
    from: the Strategy tab's A and B editors, the session's strategy, and saved files (named by their stem, or as
    typed where the stem is taken). Each runs with the session's expert (chosen with the teacher)."""
    named: dict[str, Strategy] = {}
    origins: dict[str, str] = {}
    texts = {PROBE_A: a_text, PROBE_B: b_text}
    for pick in PROBE_PICKS:
        if pick in (picked or ()):
            named[pick] = current if pick == PROBE_CURRENT else Strategy.from_yaml(texts[pick], pick)
            origins[pick] = "the Strategy tab's editor" if pick != PROBE_CURRENT else "the session's strategy"
    for typed, path in files:
        name = path.stem if path.stem not in {*named, recovery.RANDOM, recovery.DEFAULT} else typed
        named[name], origins[name] = Strategy.load(path), typed
    return {k: v.model_copy(update={"expert": expert}) for k, v in named.items()}, origins


def probe_frame(result: ProbeResult) -> pd.DataFrame:
    """The ranking: best first, each start's error before and after the probe, its best rate (flagged where it
    is at the grid's edge: a rate outside the grid may do better) and the rank its step-0 error would give."""
    k = result.config.steps
    rows = []
    for o in sorted(result.outcomes, key=lambda o: (o.rank, o.name)):
        name = o.name if o.origin in (o.name, "built in") or o.name in PROBE_PICKS else f"{o.name} ({o.origin})"
        rate = f"{o.rate:g}" + (" ⚠ at the grid's edge" if o.edge else "")
        rows.append([o.rank, name, _num(o.error_0, 4), _num(o.error, 4) if o.error != float("inf") else "diverged",
                     rate, o.rank_0])
    return pd.DataFrame(rows, columns=[c.replace("K", str(k)) if c.endswith("K steps") else c
                                       for c in PROBE_COLUMNS])


def probe_summary(result: ProbeResult) -> str:
    """What the probe's numbers were measured on: the set, its latents (trained on, held out), the steps."""
    c = result.config
    rates = ", ".join(f"{r:g}" for r in result.outcomes[0].by_rate)
    teacher = (f"{result.teacher_passes} streamed teacher passes" if result.teacher_passes else
               "the teacher's targets read from the cache (no teacher pass)")
    line = (f"Probed on {result.calibration}: {result.train_latents} latents trained on, {result.heldout_latents} "
            f"held out × {c.draws} noise draws; each start distilled {c.steps} steps of batch {c.batch} at rates "
            f"{rates} (its best kept); {teacher}. Error: held-out velocity error after {c.steps} steps (0 is the "
            "teacher); rank 1 trains best.")
    notes = [f"{o.name}: its best rate {o.rate:g} is at the grid's edge; a rate beyond it may do better"
             for o in result.outcomes if o.edge]
    if result.synthetic:
        return cards.warnings_banner([f"SYNTHETIC calibration: Gaussian latents and context, not real inputs; the "
                                      f"ranking says little about real ones. {line}", *notes])
    return cards.inline_ok(line) + (cards.warnings_banner(notes) if notes else "")


def probe_chart(result: ProbeResult) -> charts.Figure:
    on = (f"on {result.heldout_latents} held-out latents of {'SYNTHETIC ' if result.synthetic else ''}"
          f"{result.calibration}")
    return charts.probe_curves([(o.name, o.curve.steps, o.curve.error) for o in result.outcomes], recovery.RANDOM, on)


class FunctionView:
    """Built inside a gr.Tab; `session` turns the gr.State value into a live session (or raises gr.Error);
    `a_yaml` and `b_yaml` are the Strategy tab's A/B editors (candidates of the probe)."""

    def __init__(self, state: gr.State, session: Callable[[Session | None], Session], roots: Roots,
                 a_yaml: gr.Code, b_yaml: gr.Code):
        self.state, self.session, self.roots, self.a_yaml, self.b_yaml = state, session, roots, a_yaml, b_yaml
        gr.Markdown(INTRO, elem_classes="note")
        with gr.Row(equal_height=True):
            self.source = gr.Radio(list(SOURCES), value=DEMO, label="Calibration set", scale=2,
                                   elem_id="function-source")
            self.path = gr.Textbox(label=f"Calibration file (.safetensors under {roots.base})", scale=3,
                                   elem_id="function-path")
            self.count = gr.Number(DEFAULT_LATENTS, label=f"Latents (at most {MAX_LATENTS})", precision=0,
                                   minimum=1, maximum=MAX_LATENTS, scale=1, elem_id="function-count")
        with gr.Row(equal_height=True):
            self.found = gr.Dropdown([], value=None, label="Calibration sets found beside the teacher and in "
                                     f"the calibration cache ({calibration_cache()})", scale=4,
                                     allow_custom_value=False, elem_id="function-found")
            self.find_btn = gr.Button("Find sets", scale=0, min_width=120, elem_id="function-find")
            self.upload = gr.File(label=f"or upload a set (.safetensors, at most "
                                  f"{human_bytes(MAX_CALIBRATION_UPLOAD_BYTES)})", file_types=[".safetensors"],
                                  file_count="single", type="filepath", height=90, scale=2,
                                  elem_id="function-upload")
        with gr.Row(equal_height=True):
            self.measure_btn = gr.Button("Measure", variant="primary", scale=0, min_width=200,
                                         elem_id="function-measure")
            self.msg = gr.HTML(elem_id="function-msg")
        gr.Markdown("#### Velocity error against the teacher, per noise level")
        self.levels = gr.Dataframe(placeholder(LEVEL_COLUMNS), interactive=False, show_label=False,
                                   elem_id="function-levels")
        gr.Markdown("#### Per student block: its output against the teacher block it came from (kept channels)")
        self.blocks = gr.Dataframe(placeholder(BLOCK_COLUMNS), interactive=False, show_label=False,
                                   elem_id="function-blocks")
        gr.Markdown("#### Teacher blocks: influence, and the teacher's velocity error with each removed alone")
        self.teacher = gr.Dataframe(placeholder(TEACHER_COLUMNS), interactive=False, show_label=False,
                                    elem_id="function-teacher")
        gr.Markdown("#### Do weights and activations choose the same? Share of kept indices both rankings keep")
        self.agreement = gr.Dataframe(placeholder(AGREEMENT_COLUMNS), interactive=False, show_label=False,
                                      elem_id="function-agreement")
        gr.Markdown(PROBE_INTRO, elem_classes="note")
        with gr.Row(equal_height=True):
            self.picks = gr.CheckboxGroup(list(PROBE_PICKS), value=[PROBE_A, PROBE_B], scale=2,
                                          label="Candidates (random init and the default always run)",
                                          elem_id="probe-picks")
            self.files = gr.Textbox(label=f"Saved strategy files (.yaml under {roots.base}; one per line, at most "
                                    f"{MAX_PROBE_FILES})", lines=1, max_lines=MAX_PROBE_FILES, scale=3,
                                    elem_id="probe-files")
            self.steps = gr.Number(PROBE_STEPS, label=f"Steps K (at most {MAX_PROBE_STEPS})", precision=0, minimum=1,
                                   maximum=MAX_PROBE_STEPS, scale=1, elem_id="probe-steps")
        with gr.Row(equal_height=False):  # the button keeps its height beside a long summary
            self.probe_btn = gr.Button("Probe", variant="primary", scale=0, min_width=200, elem_id="probe-run")
            self.probe_msg = gr.HTML(elem_id="probe-msg")
        self.probe_table = gr.Dataframe(placeholder(PROBE_COLUMNS, "press Probe: one row per candidate, best first"),
                                        interactive=False, show_label=False, elem_id="probe-table")
        self.probe_plot = gr.Plot(show_label=False, visible=False, elem_id="probe-chart")

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [self.msg, self.levels, self.blocks, self.teacher, self.agreement]

    def wire(self, tab: gr.Tab | None = None) -> gr.events.Dependency:
        """The Measure event; the caller chains its own redraw (the Layers tab's influence) on success. The sets
        found are listed again when `tab` is selected and on Find sets."""
        self.find_btn.click(self.find, [self.state, self.found], self.found, api_name="function_sets")
        if tab is not None:
            tab.select(self.find, [self.state, self.found], self.found, api_visibility="private")
        self.found.input(lambda path: (FILE, path) if path else (gr.skip(), gr.skip()), self.found,
                         [self.source, self.path], api_visibility="private")
        self.upload.upload(lambda: UPLOAD, None, self.source, api_visibility="private")
        self.probe_btn.click(stoppable(self.probe), [self.state, self.source, self.path, self.count, self.upload,
                                                     self.picks, self.files, self.steps, self.a_yaml, self.b_yaml],
                             [self.probe_msg, self.probe_table, self.probe_plot], api_name="probe",
                             show_progress_on=[self.probe_msg])
        return self.measure_btn.click(stoppable(self.measure),
                                      [self.state, self.source, self.path, self.count, self.upload],
                                      self.outputs, api_name="function", show_progress_on=[self.msg])

    def find(self, state: Session | None, current: str | None = None) -> dict:
        """The sets found beside this session's teacher and in the calibration cache (the choice kept while it is
        still found; the last measurement's summary is left as it is)."""
        if state is None or state.closed:
            return gr.update(choices=[], value=None)
        found = found_sets(state.teacher_source, self.roots)
        note = (f"{len(found)} found" if found else "none found") + (f" (the first {MAX_FOUND} .safetensors files "
                                                                     "looked at)")
        return gr.update(choices=found, value=current if current in {v for _, v in found} else None, info=note)

    def measure(self, state: Session | None, source: str, path: str, count: float | None, upload: Any = None,
                progress: gr.Progress = gr.Progress()) -> tuple:
        s = self.session(state)
        with s.lock:
            try:
                calibration = open_source(source, path, count, self.roots, s.projector.teacher.config, upload)
                report = s.measure_function(calibration, lambda i, n, what: progress((i, max(n, 1)), desc=what))
            except ProjectionError as exc:
                raise user_error(exc, "Function not measured") from exc
        fidelity = report["fidelity"]
        return (summary(report, calibration), levels_frame(fidelity), blocks_frame(fidelity), teacher_frame(report),
                agreement_frame(report))

    def probe(self, state: Session | None, source: str, path: str, count: float | None, upload: Any,
              picked: list[str], files: str, steps: float | None, a_text: str, b_text: str,
              progress: gr.Progress = gr.Progress()) -> tuple:
        """Probe recoverability on the set the view's controls name: the ranking, the summary, the curves."""
        s = self.session(state)
        with s.lock:
            try:
                config = ProbeConfig(steps=probe_steps(steps), seed=s.strategy.seed)  # random init: the Gallery's
                named, origins = probe_candidates(picked, a_text, b_text, s.strategy, strategy_files(files, self.roots),
                                                  s.strategy.expert)
                calibration = open_source(source, path, count, self.roots, s.projector.teacher.config, upload)
                result = s.probe(calibration, named, origins, config, progress_to(progress, "probe"))
            except ProjectionError as exc:
                raise user_error(exc, "Not probed") from exc
        return probe_summary(result), probe_frame(result), gr.update(value=plot(probe_chart(result)), visible=True)
