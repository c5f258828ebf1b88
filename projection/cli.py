"""`projection`: the same core as the inspector, scriptable.

    projection inspect SOURCE [--expert E] [--json]
    projection map --teacher T --student S [--rules R] [--strategy F] [--[no-]energy] [--json | --csv]
    projection map --teacher T --student S [--rules R] --suggest-rules
    projection export --teacher T --student S [--strategy F] --out DIR [--device D] [--dtype D] [--force]
    projection spectra --teacher T --key KEY [--json]
    projection demo --out DIR [--synthetic] [--force]
    projection plan-student --teacher T --params 1.3B [--count N] [--expert E] [--json]
    projection probe --teacher T --student S [--strategies A.yaml B.yaml ...] [--steps K] [--lr R ...] [--json]
    projection calibrate --pipeline P --data FOLDER --size HxW --out FILE.safetensors [--max N] [--teacher T] ...

Errors are one line on stderr: exit 2 for bad input or a file that cannot be read or written, 1 for an
unexpected error (a bug: `--debug` prints its traceback).
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
import textwrap
import threading
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import ProjectionError

MEASURE_BYTES = 1 << 30  # `map` computes retained energy for teachers up to this size unless told otherwise


def _strategy(args: argparse.Namespace):
    from .core.strategy import Strategy

    strategy = Strategy.load(args.strategy) if getattr(args, "strategy", None) else Strategy()
    overrides = {k: getattr(args, k) for k in ("expert", "device", "dtype") if getattr(args, k, None)}
    return strategy.model_copy(update=overrides) if overrides else strategy


def _read_rules(args: argparse.Namespace) -> tuple[str, dict | None]:
    """The --rules file's text and rules ('' and None without one)."""
    from .core.mapping import parse_rules
    from .io.inputs import read_text

    if not getattr(args, "rules", None):
        return "", None
    text = read_text(args.rules, "rules")
    return text, parse_rules(text, args.rules)


def _projector(args: argparse.Namespace):
    from .engine.projector import Projector

    p = Projector.open(args.teacher, args.student, strategy=_strategy(args), rules=_read_rules(args)[1],
                       num_heads=args.num_heads, layout=getattr(args, "layout", None))
    if p.strategy.needs_calibration and getattr(args, "calibration", None) is not None:
        with _room(p):
            calibration = _calibration(args, p)
            p.calibrate(calibration)  # activation choices rank on it (statistics cached on disk)
            if p.strategy.layers == "recoverable":
                p = p.using(_recoverable(p, p.strategy, calibration))
    return p


def _recoverable(p, strategy, calibration, **kwargs):
    """`strategy` with `layers: recoverable` replaced by the block list its probes chose; the candidates' errors go
    to stderr, so the user sees why."""
    from .probe.choose import resolve_layers

    resolved, outcomes = resolve_layers(p, calibration, strategy, progress=_progress, **kwargs)
    sys.stderr.write(f"layers: recoverable chose blocks {resolved.layers}: held-out velocity error after "
                     f"{outcomes[0].curve.steps[-1]} distillation steps on {calibration.label}:\n")
    for o in sorted(outcomes, key=lambda o: o.error):
        sys.stderr.write(f"  {o.error:.4f}  {o.name}\n")
    return resolved


@contextmanager
def _room(p) -> Iterator[None]:
    """The work bound for this command's device (the operator's GPU may hold more than the app's default), and the
    threads that pay for this teacher's width (`runtime.parallel_pays`)."""
    from .function.budget import device_limit, work_limit
    from .runtime import command_threads

    with work_limit(device_limit(p.device)), command_threads(p.teacher.config.dim):
        yield


def _progress(i: int, n: int, what: str) -> None:
    if sys.stderr.isatty() or i == n:
        sys.stderr.write(f"\r[{i}/{n}] {what[:60]:<60}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _print_json(data: Any) -> None:
    from .engine.export import report_json

    print(report_json(data))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .core.models import view_checkpoint
    from .io.checkpoint import open_checkpoint

    view = view_checkpoint(open_checkpoint(args.source, args.expert))
    info = view.summary()
    if args.json:
        return _print_json(info)
    expert = f", expert {info['expert']}" if info["expert"] else ""
    print(f"source   {info['source']}\nformat   {info['format']} ({len(info['files'])} file(s)){expert}")
    print(f"family   {info['family'] or 'unknown'}: {info['description']}  (layout {info['layout']})")
    print("config   " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    if info["heads_inferred"]:
        print(f"heads    inferred: {info['config']['num_heads']} x {info['config']['head_dim']}; the checkpoint "
              "does not record heads")
    print(f"keys     {info['keys']}\nparams   {info['params']:,}\ndtypes   {info['dtypes']}")
    print(f"size     {info['bytes'] / 1e9:.3f} GB")


def _percent(x: float | None) -> str:
    """The one format of shares, as the app shows them: 73.1%."""
    return "—" if x is None else f"{x:.1%}"


def _map_energy(args: argparse.Namespace, p) -> list | None:
    """Projected numbers for the energy column: by default only for teachers that fit MEASURE_BYTES (the app's
    rule), so a 57 GB teacher still maps from its headers alone; --energy / --no-energy decide otherwise."""
    nbytes = p.teacher.checkpoint.nbytes if p.teacher.checkpoint else 0
    if not (args.energy or (args.energy is None and nbytes <= MEASURE_BYTES)):
        return None
    return list(p.stream(progress=_transient_progress if sys.stderr.isatty() else None, tensors="numbers"))


def _transient_progress(i: int, n: int, what: str) -> None:
    """Progress on the terminal that leaves no line behind (the table or CSV is what the user asked for)."""
    sys.stderr.write(f"\r[{i}/{n}] {what[:60]:<60}" if i < n else "\r" + " " * 70 + "\r")
    sys.stderr.flush()


def cmd_map(args: argparse.Namespace) -> int:
    if args.suggest_rules:
        return cmd_suggest_rules(args)
    from .engine.projector import entry_rows

    p = _projector(args)
    mapping = p.mapping()
    results = _map_energy(args, p)
    rows = entry_rows(mapping, results)
    summary = p.summary(results)
    if args.json:
        _print_json({**mapping.to_dict(), "entries": rows, "warnings": summary["warnings"],
                     "retained_weight_energy": summary.get("retained_weight_energy")})
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["student_key", "status", "teacher_keys", "student_shape", "teacher_shapes", "params",
                         "transforms", "retained_weight_energy", "reason"])
        for r in rows:
            energy = r["retained_weight_energy"]
            writer.writerow([r["student_key"], r["status"], " ".join(r["teacher_keys"]),
                             "x".join(map(str, r["student_shape"])),
                             " ".join("x".join(map(str, s)) for s in r["teacher_shapes"]), r["params"],
                             "; ".join(r["transforms"]), "" if energy is None else energy, r["reason"]])
    else:
        _print_map_table(rows, p, summary)
    cov = mapping.coverage()["keys"]
    if cov["transferred"] == 0:
        print(f"nothing transfers: 0% coverage: none of the {cov['total']} keys of {args.student} maps to a key "
              f"of {args.teacher}; write rules (--rules), or get suggestions with --suggest-rules", file=sys.stderr)
        return 1
    return 0


def _print_map_table(rows: list[dict], p, summary: dict) -> None:
    from .core.measure import MEANING

    headers = ("student key", "status", "weight energy kept", "teacher keys or reason")
    width = max([len(headers[0])] + [len(r["student_key"]) for r in rows])
    line = "{:<%d}  {:<12}  {:>18}  {}" % width
    print(line.format(*headers))
    for r in rows:
        detail = r["reason"] if r["status"] == "skipped" else ", ".join(r["teacher_keys"])
        print(line.format(r["student_key"], r["status"], _percent(r["retained_weight_energy"]), detail))
    cov = p.mapping().coverage()
    print(f"\ncoverage: {cov['keys']['transferred']}/{cov['keys']['total']} keys ({cov['keys']['rate']:.1%}), "
          f"{cov['params']['transferred']:,}/{cov['params']['total']:,} params ({cov['params']['rate']:.1%})")
    energy = summary.get("retained_weight_energy")
    if energy is not None:
        print(f"retained weight energy: {_percent(energy['mean'])} ({MEANING})")
    else:
        size = p.teacher.checkpoint.nbytes / 1e9 if p.teacher.checkpoint else 0
        print(f"retained weight energy: not computed (the teacher is {size:.1f} GB); --energy computes it, "
              f"reading the teacher once")
    for w in summary["warnings"]:
        if cov["keys"]["transferred"] or not w.startswith("Nothing transfers"):  # stderr says that one
            print(f"WARNING: {w}")


def cmd_suggest_rules(args: argparse.Namespace) -> int:
    """The rules file (--rules, as written) followed by suggested rules for the keys that transfer nothing."""
    from .core.suggest import suggest_rules, with_suggestions

    text, rules = _read_rules(args)
    p = _projector(args)
    suggested = suggest_rules(p.mapping())
    sys.stdout.write(with_suggestions(text, rules or {}, suggested))
    if not suggested:
        skipped = p.mapping().counts()["skipped"]
        print("no rules to suggest: " + ("every student key transfers" if not skipped else
              f"the {skipped} student keys that transfer nothing are skipped on purpose or fit no unused teacher "
              "tensor"), file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> None:
    from .engine.build import load_student
    from .engine.export import export_student

    p = _projector(args)
    inputs = [f for f in (args.strategy, args.rules) if f]
    measure = None
    if args.calibration is not None:
        from .engine.report import student_fidelity
        from .io.diskcache import cache_dir

        calibration = p.calibration or _calibration(args, p)  # read once: _projector may have read it
        if args.calibration not in ("demo", "synthetic"):
            inputs.append(args.calibration)  # --force never replaces it
        measure = lambda folder: student_fidelity(p, calibration, load_student(folder), args.draws,  # noqa: E731
                                                  device=p.device, cache=cache_dir())
    with _room(p):
        report = export_student(p, args.out, force=args.force, progress=_progress, inputs=inputs, measure=measure)
    cov = report["coverage"]
    print(f"wrote {args.out}: {cov['keys']['transferred']}/{cov['keys']['total']} keys, "
          f"{cov['params']['rate']:.1%} of parameters from the teacher, retained weight energy "
          f"{_percent(report['retained_weight_energy']['mean'])} (a weight statistic), "
          f"{report['provenance']['seconds']} s")
    if "function" in report:
        _print_fidelity(report["function"])
    else:
        print("function: not measured; --calibration FILE|demo|synthetic measures the student's velocity error "
              "against the teacher (and records it in projection_report.json)")
    for w in report["warnings"]:
        print(f"WARNING: {w}")


def _calibration(args: argparse.Namespace, p):
    from .demo.gallery import demo_space
    from .demo.teacher import open_calibration

    if args.calibration is None:
        if not demo_space(p.teacher.config):
            raise ProjectionError(f"{args.teacher}: give --calibration: a .safetensors file of latents and context, "
                                  "or 'synthetic' (Gaussian inputs); 'demo' fits only the demo teacher")
        args.calibration = "demo"
    found = open_calibration(args.calibration, p.teacher.config)
    return found.subset(args.samples) if args.samples else found


def _print_fidelity(function: dict) -> None:
    """The student's function next to the teacher's, with two reference students for scale."""
    print(f"fidelity on {function['calibration']}, {function['noise_draws']} noise draws per latent, levels "
          f"s in [{function['noise_levels'][0]:g}, {function['noise_levels'][1]:g}]:")
    students = function["students"]
    bands = [f"s {b['s_low']:.2f}-{b['s_high']:.2f}" for b in next(iter(students.values()))["by_level"]]
    line = "  {:<16} {:>15} {:>7}" + " {:>13}" * len(bands)
    print(line.format("", "velocity error", "cosine", *bands))
    for name, f in students.items():
        print(line.format(name, f"{f['relative_error']:.4f}", f"{f['cosine']:.3f}",
                          *(f"{b['relative_error']:.4f}" for b in f["by_level"])))
    if function.get("blocks"):
        print("per student block: relative error of its output against the teacher block it came from, on the kept "
              "residual channels:")
        rows = function["blocks"]
        line = "  {:<16}" + " {:>9}" * len(rows["student"])
        print(line.format("", *(f"S{r['block']}<-T{r['teacher_block']}" for r in rows["student"])))
        for name, found in rows.items():
            print(line.format(name, *(f"{r['relative_error']:.4f}" for r in found)))
    if function["calibration_synthetic"]:
        print("WARNING: synthetic calibration (Gaussian inputs): these numbers say little about real inputs")


def cmd_fidelity(args: argparse.Namespace) -> None:
    """How close the student's velocity is to the teacher's on a calibration set (the teacher streams)."""
    from .engine.build import load_student
    from .engine.report import student_fidelity
    from .io.diskcache import cache_dir

    folder = Path(args.student)
    exported = folder.is_dir() and (folder / "projection_report.json").is_file()
    student = load_student(folder) if exported else None  # its own weights, not a new projection
    p = _projector(args)
    with _room(p):
        result = student_fidelity(p, p.calibration or _calibration(args, p), student, args.draws, device=p.device,
                                  cache=cache_dir())  # the teacher's outputs on the set: computed once
    if args.json:
        _print_json(result)
    else:
        _print_fidelity(result)


def cmd_spectra(args: argparse.Namespace) -> None:
    from .core.models import open_teacher
    from .core.spectra import cumulative_energy, singular_values

    teacher = open_teacher(args.teacher, args.expert)
    key = next((c for c, n in teacher.native.items() if args.key in (c, n)), None)
    if key is None:
        raise ProjectionError(f"{args.teacher}: no tensor named '{args.key}'")
    s = singular_values(teacher.read(key))
    curve = cumulative_energy(s)
    if args.json:
        return _print_json({"key": key, "shape": list(teacher.shapes[key]), "singular_values": s.tolist(),
                            "cumulative_energy": curve.tolist()})
    print(f"{key} {list(teacher.shapes[key])}: {len(s)} singular values")
    for share in (0.5, 0.9, 0.99):
        print(f"  rank for {share:.0%} of energy: {int((curve < share).sum()) + 1}")
    print("  top 10: " + ", ".join(f"{v:.4g}" for v in s[:10].tolist()))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo.folder import write_demo

    out = write_demo(args.out, force=args.force, synthetic=args.synthetic)
    print(f"demo written to {out} (" + ("synthetic weights: random, with trained-like spectra" if args.synthetic else
          "a small Wan teacher trained on handwritten digits, with its calibration set") + ")")


def _si(n: float) -> str:
    """3 significant digits and an SI prefix: 2.5G, 463k."""
    prefix = next(((p, x) for p, x in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)) if n >= x), ("", 1))
    return f"{n / prefix[1]:.3g}{prefix[0]}"


def cmd_plan_student(args: argparse.Namespace) -> None:
    """Student shapes near a parameter target that the teacher can fill (headers only), closest first."""
    from .arch.presets import FRAMEWORKS
    from .arch.sizing import FLOPS_MEANING, count_params, parse_params, plan_students
    from .core.models import open_teacher

    teacher = open_teacher(args.teacher, args.expert)
    total = count_params(teacher.config)
    target = parse_params(args.params, total)
    found = plan_students(teacher.config, target, args.count)
    if args.json:
        return _print_json({"teacher": teacher.config.to_dict(), "teacher_params": total, "target": target,
                            "flops_per_token": FLOPS_MEANING, "candidates": [c.to_dict() for c in found]})
    cfg = teacher.config
    inferred = " (inferred: the checkpoint does not record heads)" if teacher.heads_inferred else ""
    print(f"teacher {args.teacher}: {total:,} params; dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads x "
          f"{cfg.head_dim}{inferred}, {cfg.num_layers} layers; target {target:,}\n")
    line = "{:<12} {:>6} {:>6} {:>8} {:>6} {:>15} {:>6} {:>11}  {}"
    print(line.format("preset", "dim", "ffn", "heads", "layers", "params", "share", "FLOPs/token", "loads as is in"))
    for c in found:
        s = c.config
        print(line.format(c.preset or "", s.dim, s.ffn_dim, f"{s.num_heads}x{s.head_dim}", s.num_layers,
                          f"{c.params:,}", _percent(c.share), _si(c.flops), ", ".join(c.frameworks)))
    notes = (FLOPS_MEANING + ".", "Frameworks: " + "; ".join(f"{f.name}: {f.needs}" for f in FRAMEWORKS) + ".")
    print("\n" + "\n".join(textwrap.fill(n, 120) for n in notes))
    print("Use a row as the student config (--student FILE.yaml): a preset row as `preset: NAME`, another as its "
          "fields; the first:\n" +
          "".join(f"  {k}: {v}\n" for k, v in found[0].fields.items()), end="")


def cmd_calibrate(args: argparse.Namespace) -> None:
    """A calibration set from a diffusers Wan pipeline (VAE, text encoder) and a folder of captioned images."""
    from .function.calibrate import calibrate

    result = calibrate(args.pipeline, args.data, args.size, args.out, max_samples=args.max, frames=args.frames,
                       device=args.device, dtype=args.dtype, batch=args.batch, teacher=args.teacher,
                       force=args.force, progress=_progress)
    checked = f"checked against {args.teacher}" if args.teacher else "read back and checked (format)"
    print(f"wrote {result.out}: {result.source}; {checked}")


def cmd_probe(args: argparse.Namespace) -> None:
    """Distill each candidate start a few steps on the calibration set and rank them by the held-out error."""
    from .core.strategy import Strategy
    from .probe import ProbeConfig, candidates, probe
    from .probe.choose import CHOOSE

    named: dict[str, Strategy] = {}
    origins: dict[str, str] = {}
    for path in args.strategies or ():
        name = Path(path).stem if Path(path).stem not in named else str(path)
        named[name], origins[name] = Strategy.load(path), str(path)
    found = candidates(named, origins)  # refuses a bad list before the teacher is opened
    config = ProbeConfig(steps=args.steps, batch=args.batch, rates=tuple(args.lr) if args.lr else None,
                         holdout=args.holdout, draws=args.draws, seed=args.seed, ladder=tuple(args.random_ladder or ()))
    config.check()
    p = _projector(args)
    with _room(p):
        calibration = _calibration(args, p)
        chooser = replace(CHOOSE, holdout=config.holdout, draws=config.draws, seed=config.seed)  # the same split
        found = [replace(c, strategy=_recoverable(p, c.strategy, calibration, config=chooser))
                 if c.strategy is not None and c.strategy.layers == "recoverable" else c for c in found]
        result = probe(p, calibration, found, config, device=p.device, progress=_progress)
    if args.json:
        return _print_json(result.to_dict())
    _print_probe(result)


def _print_probe(result) -> None:
    c = result.config
    rates = ", ".join(f"{r:g}" for r in result.outcomes[0].by_rate)
    print(f"probe on {result.calibration}")
    print(f"  {result.train_latents} latents to train on, {result.heldout_latents} held out ({c.draws} noise draws "
          f"each, s in [{result.band[0]:g}, {result.band[1]:g}]); each start distilled {c.steps} steps of batch "
          f"{c.batch} from the teacher's velocity at each rate of {rates} (its best kept)")
    print(f"  teacher: {result.teacher_passes} streamed passes" if result.teacher_passes else
          "  teacher: targets read from the cache (no teacher pass)")
    ladder = any(o.random_budget is not None for o in result.outcomes)
    line = "  {:>4}  {:<24} {:>8} {:>11} {:>11} {:>12}" + ("  {:>18}" if ladder else "{}")
    print(line.format("rank", "start", "rate", "error@0", f"error@{c.steps}", "step-0 rank",
                      "random-init steps" if ladder else ""))
    for o in sorted(result.outcomes, key=lambda o: (o.rank, o.name)):
        print(line.format(o.rank, o.name[:24], f"{o.rate:g}", f"{o.error_0:.4f}", f"{o.error:.4f}", o.rank_0,
                          format(o.random_budget, ".0f") if ladder else ""))
    print("error: velocity error on the held-out latents relative to the teacher's output (0: the teacher's function)"
          "; rank 1 trains best. The step-0 rank is what the error before training would have chosen.")
    if ladder:
        print("random-init steps: the budget at which random init, trained with its own schedule and best rate, "
              "reaches the start's error (ladder: " + ", ".join(f"{r['steps']}" for r in result.ladder) + " steps)")
    for o in result.outcomes:
        if o.edge:
            print(f"WARNING: {o.name}: its best rate {o.rate:g} is at the grid's edge; a rate beyond it (--lr) may do "
                  "better")
    if result.synthetic:
        print("WARNING: synthetic calibration (Gaussian inputs): the ranking says little about real inputs")


MAX_DRAWS = 64  # noise draws per latent: the teacher runs once per draw
LAYOUT_NAMES = ("diffusers", "wan", "wanlite", "seed")  # layout.LAYOUTS, not imported: torch (tested equal)
MAX_SAMPLES = 4096  # calibration.MAX_SAMPLES, not imported: torch would slow every command's start (tested equal)
PROBE_STEPS = 10_000  # probe.recovery.MAX_STEPS, likewise (tested equal)


def count(most: int) -> Callable[[str], int]:
    """An argparse type: a whole number 1..most (argparse names the option in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number from 1 to {most}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="projection", description="Project a Wan teacher into a small student.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    debug = argparse.ArgumentParser(add_help=False)  # also after the command; SUPPRESS keeps a leading --debug
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def pair(p: argparse.ArgumentParser, strategy: bool = True) -> None:
        p.add_argument("--teacher", required=True, help="checkpoint file, folder or hub id 'org/name[@rev][:sub]'")
        p.add_argument("--student", required=True, help="student config (.json/.yaml) or checkpoint to fill")
        if strategy:
            p.add_argument("--strategy", help="strategy YAML")
        p.add_argument("--expert", choices=["high", "low"], help="expert of a two-expert teacher")
        p.add_argument("--num-heads", type=int, metavar="N",
                       help="the student's heads: a checkpoint does not record them (default: config.json beside it, "
                            "else inferred and flagged); for a config, overrides its num_heads")

    p = sub.add_parser("inspect", parents=[debug], help="format, family, config, counts, dtypes, size")
    p.add_argument("source", help="checkpoint file, folder, two-expert root or hub id 'org/name[@rev][:sub]'")
    p.add_argument("--expert", choices=["high", "low"], help="expert of a two-expert checkpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("map", parents=[debug], help="the mapping table and coverage")
    pair(p)
    p.add_argument("--rules", help="mapping rules YAML, on top of the student layout's preset")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the mapping and coverage as JSON")
    fmt.add_argument("--csv", action="store_true", help="the mapping table as CSV")
    fmt.add_argument("--suggest-rules", action="store_true",
                     help="print the rules (--rules) plus suggested rules for the keys that transfer nothing")
    p.add_argument("--energy", action=argparse.BooleanOptionalAction, default=None,
                   help=f"compute each entry's retained weight energy (default: for teachers up to "
                        f"{MEASURE_BYTES >> 30} GiB, which are read once)")
    p.set_defaults(func=cmd_map)
    maps = p

    p = export = sub.add_parser("export", parents=[debug], help="project and write the student folder")
    pair(p)
    p.add_argument("--rules", help="mapping rules YAML, on top of the student layout's preset")
    p.add_argument("--out", required=True, help="the export folder to create (written atomically; never overwritten "
                   "without --force)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where tensors are projected (and fitted); "
                   "overrides the strategy's")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="the exported weights' dtype; "
                   "overrides the strategy's")
    p.add_argument("--layout", choices=LAYOUT_NAMES, help="names, files and config.json of the export (overrides the "
                   "student config's): diffusers (WanTransformer3DModel, the default), wan (Wan's WanModel), wanlite "
                   "(this tool's reference module), seed (the seed documents')")
    p.add_argument("--force", action="store_true", help="replace a previous export in --out (only that: never "
                   "other files or an input of this run)")
    p.set_defaults(func=cmd_export)

    def calibrated(p: argparse.ArgumentParser) -> None:
        p.add_argument("--calibration", help="calibration set: a .safetensors file (latents, context), 'demo' (the "
                       "demo teacher's held-out digits; the default for it) or 'synthetic' (Gaussian inputs)")
        p.add_argument("--draws", type=count(MAX_DRAWS), default=4,
                       help=f"noise draws per latent, 1..{MAX_DRAWS} (default %(default)s)")
        p.add_argument("--samples", type=count(MAX_SAMPLES), help="use the first N latents of the set")

    calibrated(export)
    calibrated(maps)

    p = sub.add_parser("fidelity", parents=[debug], help="the student's velocity against the teacher's, on a "
                       "calibration set (with random init and svd-per-matrix for scale)")
    pair(p)
    p.add_argument("--rules", help="mapping rules YAML, on top of the student layout's preset")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the teacher and students run")
    calibrated(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("probe", parents=[debug], help="rank candidate starts by the held-out velocity error a short "
                       "distillation brings them to (random init and the default always among them)")
    pair(p, strategy=False)
    p.add_argument("--strategies", nargs="+", metavar="FILE.yaml", help="the candidate strategies, besides random "
                   "init and the default")
    p.add_argument("--rules", help="mapping rules YAML, on top of the student layout's preset")
    p.add_argument("--steps", type=count(PROBE_STEPS), default=100, metavar="K", help="distillation steps per start "
                   "(default %(default)s)")
    p.add_argument("--batch", type=count(1024), default=16, metavar="B", help="latents per step (default "
                   "%(default)s; Wan-sized latents: 1-4)")
    p.add_argument("--lr", type=float, nargs="+", metavar="RATE", help="the rate grid each start trains at (its "
                   "best kept; default: three rates 4x apart, scaled to the student's width)")
    p.add_argument("--holdout", type=float, default=0.2, metavar="SHARE", help="share of the set held out for "
                   "measuring (the last latents; default %(default)s)")
    p.add_argument("--random-ladder", type=count(PROBE_STEPS), nargs="+", metavar="N", help="also train random init "
                   "for these budgets, to say how many random-init steps each start is worth")
    p.add_argument("--seed", type=int, default=0, help="the data order, noise and random init (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the teacher and students run")
    calibrated(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("spectra", parents=[debug], help="singular values of one teacher matrix")
    p.add_argument("--teacher", required=True, help="checkpoint file, folder or hub id")
    p.add_argument("--key", required=True, help="the teacher tensor, by canonical or checkpoint name")
    p.add_argument("--expert", choices=["high", "low"], help="expert of a two-expert teacher")
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    p.set_defaults(func=cmd_spectra)

    p = sub.add_parser("demo", parents=[debug], help="write the built-in demo teacher and students")
    p.add_argument("--out", required=True, help="the demo folder to write")
    p.add_argument("--synthetic", action="store_true", help="the synthetic teacher instead (random weights with "
                   "trained-like spectra, width 256: for spectra at a larger size)")
    p.add_argument("--force", action="store_true", help="write over a demo folder of the other kind")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plan-student", parents=[debug], help="student shapes near a parameter target that the "
                       "teacher can fill, with their FLOPs and the frameworks that load them")
    p.add_argument("--teacher", required=True, help="checkpoint file, folder or hub id (headers only are read)")
    p.add_argument("--params", required=True, metavar="N", help="the target parameter count: 1.3B, 300M, 5e8, ...")
    p.add_argument("--count", type=count(50), default=5, metavar="N",
                   help="candidates besides the presets that fit (default %(default)s)")
    p.add_argument("--expert", choices=["high", "low"], help="expert of a two-expert teacher")
    p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    p.set_defaults(func=cmd_plan_student)

    p = sub.add_parser("calibrate", parents=[debug], help="a calibration set from a diffusers Wan pipeline's VAE "
                       "and text encoder and a folder of captioned images (needs the [calibrate] extra)")
    p.add_argument("--pipeline", required=True, help="diffusers Wan pipeline folder (vae/, text_encoder/, "
                   "tokenizer/) or hub id 'org/name[@rev][:sub]'; its transformer is never loaded")
    p.add_argument("--data", required=True, help="folder of images (png, jpg, webp) or videos (mp4, webm) with "
                   "same-name .txt captions, or a metadata.jsonl / metadata.csv (file_name, text)")
    p.add_argument("--size", required=True, metavar="HEIGHTxWIDTH", help="e.g. 480x832: multiples of 16 (32 for a "
                   "16x VAE); images are resized (shorter side) and center-cropped to it")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="the calibration set to write "
                   "(refused if it exists, unless --force)")
    p.add_argument("--max", type=count(MAX_SAMPLES), metavar="N", help="at most N samples (default: 512, or fewer "
                   "where the calibration set's bounds allow fewer)")
    p.add_argument("--frames", default="first", metavar="first|every:K",
                   help="of a video: its first frame (default) or every K-th frame")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the text encoder and "
                   "the VAE run (default: %(default)s, CUDA when present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the text encoder's dtype and the context's stored dtype (latents: float32)")
    p.add_argument("--batch", type=count(64), default=8, metavar="B", help="captions or images per batch "
                   "(default %(default)s)")
    p.add_argument("--teacher", help="check the set against this teacher (latent channels, context width)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_calibrate)
    for action in sub._choices_actions:  # `projection CMD --help` opens with the line `projection --help` shows
        sub.choices[action.dest].description = action.help[0].upper() + action.help[1:] + "."
    return parser


class Terminated(SystemExit):
    """SIGTERM or SIGHUP while a command ran: exit 128 + N once cleanup has run, saying so in one line. The work
    runs in short steps (its size is bounded before it starts: `budget`), so the signal is seen within one."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum).name


@contextmanager
def termination_raises() -> Iterator[None]:
    """While the command runs, SIGTERM and SIGHUP (`kill`, a scheduler, a closed terminal) raise SystemExit(128 + N)
    in the main thread instead of ending the process at once, so cleanup runs (an export deletes its partial
    folder). The program's setting, not the library's; restored afterwards. Ignored signals stay ignored (nohup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # `projection` alone: what it can do, not a usage error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    from .runtime import setup_runtime

    setup_runtime()  # this program's process-wide settings (huge pages, allocator), before any tensor is made
    try:
        with termination_raises():
            code = args.func(args)
    except Terminated as exc:
        print(f"stopped: {exc.signal} (exit {exc.code}); the command did not finish", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # the reader left (`projection map --csv | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, the status a shell reports for `cat` here
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        known = _describe(exc)
        if known is None:  # a bug, not bad input: one line, and where to find more
            hint = "" if debug else " (run with --debug for the traceback)"
            print(f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))}{hint}", file=sys.stderr)
            return 1
        print("error: " + _one_line(known), file=sys.stderr)
        return 2
    return code or 0


def _describe(exc: Exception) -> str | None:
    """The message of an error the CLI can name (bad input, a file it cannot read or write), else None."""
    import yaml

    if isinstance(exc, OSError):  # e.g. an output folder that cannot be created
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{where}: {exc.strerror or exc}" if where else str(exc)
    if isinstance(exc, (ProjectionError, yaml.YAMLError, ValueError)):  # ValueError: json and pydantic too
        return str(exc)
    return None


def _one_line(text: str, limit: int = 2000) -> str:
    """Whatever the message holds (YAML marks, pydantic's lines), one line of bounded length."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "..."


if __name__ == "__main__":
    sys.exit(main())
