"""`projection`: the same core as the inspector, scriptable.

    projection inspect SOURCE [--expert E] [--json]
    projection map --teacher T --student S [--rules R] [--strategy F] [--json | --csv]
    projection export --teacher T --student S [--strategy F] --out DIR [--device D] [--dtype D] [--force]
    projection spectra --teacher T --key KEY [--json]
    projection demo --out DIR
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ProjectionError


def _strategy(args: argparse.Namespace):
    from .strategy import Strategy

    strategy = Strategy.load(args.strategy) if getattr(args, "strategy", None) else Strategy()
    overrides = {k: getattr(args, k) for k in ("expert", "device", "dtype") if getattr(args, k, None)}
    return strategy.model_copy(update=overrides) if overrides else strategy


def _projector(args: argparse.Namespace):
    from .mapping import parse_rules
    from .pipeline import Projector

    rules = None
    if getattr(args, "rules", None):
        try:
            rules = parse_rules(Path(args.rules).read_text(), args.rules)
        except OSError as exc:
            raise ProjectionError(f"{args.rules}: cannot read rules: {exc}") from exc
    return Projector.open(args.teacher, args.student, strategy=_strategy(args), rules=rules)


def _progress(i: int, n: int, what: str) -> None:
    if sys.stderr.isatty() or i == n:
        sys.stderr.write(f"\r[{i}/{n}] {what[:60]:<60}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .checkpoint import open_checkpoint
    from .models import view_checkpoint

    view = view_checkpoint(open_checkpoint(args.source, args.expert))
    info = view.summary()
    if args.json:
        return _print_json(info)
    expert = f", expert {info['expert']}" if info["expert"] else ""
    print(f"source   {info['source']}\nformat   {info['format']} ({len(info['files'])} file(s)){expert}")
    print(f"family   {info['family'] or 'unknown'}: {info['description']}  (layout {info['layout']})")
    print("config   " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    print(f"keys     {info['keys']}\nparams   {info['params']:,}\ndtypes   {info['dtypes']}")
    print(f"size     {info['bytes'] / 1e9:.3f} GB")


def cmd_map(args: argparse.Namespace) -> None:
    p = _projector(args)
    mapping = p.mapping
    rows = [e.row() for e in mapping.entries]
    if args.json:
        return _print_json({**mapping.to_dict(), "warnings": p.summary()["warnings"]})
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["student_key", "status", "teacher_keys", "student_shape", "teacher_shapes", "params",
                         "transforms", "reason"])
        for r in rows:
            writer.writerow([r["student_key"], r["status"], " ".join(r["teacher_keys"]),
                             "x".join(map(str, r["student_shape"])),
                             " ".join("x".join(map(str, s)) for s in r["teacher_shapes"]), r["params"],
                             "; ".join(r["transforms"]), r["reason"]])
        return
    width = max(len(r["student_key"]) for r in rows) if rows else 10
    for r in rows:
        detail = r["reason"] if r["status"] == "skipped" else ", ".join(r["teacher_keys"])
        print(f"{r['student_key']:<{width}}  {r['status']:<12}  {detail}")
    cov = mapping.coverage()
    print(f"\ncoverage: {cov['keys']['transferred']}/{cov['keys']['total']} keys ({cov['keys']['rate']:.1%}), "
          f"{cov['params']['transferred']:,}/{cov['params']['total']:,} params ({cov['params']['rate']:.1%})")
    for w in p.summary()["warnings"]:
        print(f"WARNING: {w}")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_student

    p = _projector(args)
    report = export_student(p, args.out, force=args.force, progress=_progress)
    cov = report["coverage"]
    print(f"wrote {args.out}: {cov['keys']['transferred']}/{cov['keys']['total']} keys, "
          f"{cov['params']['rate']:.1%} of parameters from the teacher, mean retained energy "
          f"{report['mean_energy']:.3f}, {report['provenance']['seconds']} s")


def cmd_spectra(args: argparse.Namespace) -> None:
    from .models import open_teacher
    from .spectra import cumulative_energy, singular_values

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
    from .demo import write_demo

    out = write_demo(args.out, force=args.force)
    print(f"demo written to {out} (synthetic weights)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="projection", description="Project a Wan teacher into a small student.")
    sub = parser.add_subparsers(dest="command", required=True)

    def pair(p: argparse.ArgumentParser) -> None:
        p.add_argument("--teacher", required=True, help="checkpoint file, folder or hub id 'org/name[@rev][:sub]'")
        p.add_argument("--student", required=True, help="student config (.json/.yaml) or checkpoint to fill")
        p.add_argument("--strategy", help="strategy YAML")
        p.add_argument("--expert", choices=["high", "low"], help="expert of a two-expert teacher")

    p = sub.add_parser("inspect", help="format, family, config, counts, dtypes, size")
    p.add_argument("source")
    p.add_argument("--expert", choices=["high", "low"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("map", help="the mapping table and coverage")
    pair(p)
    p.add_argument("--rules", help="mapping rules YAML, on top of the student layout's preset")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("export", help="project and write the student folder")
    pair(p)
    p.add_argument("--rules")
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("spectra", help="singular values of one teacher matrix")
    p.add_argument("--teacher", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--expert", choices=["high", "low"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_spectra)

    p = sub.add_parser("demo", help="write the built-in demo teacher and students")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime import setup_runtime

    args = build_parser().parse_args(argv)
    setup_runtime()  # this program's process-wide settings (huge pages, allocator), before any tensor is made
    try:
        args.func(args)
    except BrokenPipeError:  # the reader left (`projection map --csv | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, the status a shell reports for `cat` here
    except (ProjectionError, OSError) as exc:  # OSError: e.g. an output folder that cannot be created
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
