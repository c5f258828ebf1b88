"""Map every student key to its teacher source, from metadata alone.

A rule says where a student tensor comes from: one canonical teacher key, several (stacked along axis 0,
e.g. q, k, v into a fused in_proj), or nothing (skipped, with the reason). Rules are YAML the user can edit,
layered on a built-in preset; a student key no rule names is looked up under its own name. `{i}` in a rule is
the student block index on the student side and the teacher block chosen for it on the teacher side.
"""
from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Union

import yaml

from ..arch.anatomy import SPACES, Axis, axes_of, infer_heads, space_sizes, template_of
from ..arch.config import ModelConfig
from ..errors import ProjectionError
from ..io.inputs import load_yaml
from .models import ModelView
from .strategy import Strategy

Status = Literal["exact", "mapped", "concatenated", "skipped"]
STATUSES: tuple[Status, ...] = ("exact", "mapped", "concatenated", "skipped")
Rule = Union[str, list[str], dict[str, str]]


# ---------------------------------------------------------------- rules

def preset_rules(layout: str) -> dict[str, Rule]:
    """The built-in rules for a student layout (empty for the reference student: its names are Wan's)."""
    name = f"{layout}.yaml"
    path = resources.files("projection") / "presets" / name
    return parse_rules(path.read_text(), f"preset {name}") if path.is_file() else {}


def parse_rules(text: str, origin: str = "rules") -> dict[str, Rule]:
    data = load_yaml(text, origin) or {}
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"] or {}
    if not isinstance(data, dict):
        raise ProjectionError(f"{origin}: expected a mapping 'student key: teacher key(s)'")
    for key, value in data.items():
        ok = (isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
              or (isinstance(value, dict) and set(value) == {"skip"} and isinstance(value["skip"], str)))
        if not isinstance(key, str) or not ok:
            raise ProjectionError(
                f"{origin}: rule '{key}': expected a teacher key, a list of teacher keys, or {{skip: reason}}")
    return data


def rules_to_yaml(rules: dict[str, Rule]) -> str:
    return yaml.safe_dump(rules, sort_keys=False, width=200) if rules else "{}\n"


def _rule_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"(?P<rest>\..+)?$")


def find_rule(rules: dict[str, Rule], key: str) -> tuple[Rule, str, int | None] | None:
    """The rule for a student key: a whole-key rule, else the longest module-prefix rule.

    Returns the rule, the suffix a prefix rule appends to its teacher keys ('' for whole-key rules) and the
    student block index that `{i}` matched (None when the rule has no `{i}`)."""
    best = None
    for pattern in rules:
        m = _rule_regex(pattern).match(key)
        if m and (best is None or (not m["rest"], len(pattern)) > (not best[1]["rest"], len(best[0]))):
            best = (pattern, m)
    if best is None:
        return None
    pattern, m = best
    return rules[pattern], m["rest"] or "", int(m["i"]) if "{i}" in pattern else None


# ---------------------------------------------------------------- layers

def select_layers(choice: str | list[int], teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher block index for each student block."""
    if student_layers == 0:
        return []
    if isinstance(choice, list):
        if len(choice) != student_layers:
            raise ProjectionError(f"layers: {len(choice)} indices given for {student_layers} student blocks")
        bad = [i for i in choice if not 0 <= i < teacher_layers]
        if bad:
            raise ProjectionError(f"layers: teacher block {bad[0]} out of range 0..{teacher_layers - 1}")
        return list(choice)
    if student_layers > teacher_layers:
        raise ProjectionError(f"layers: the student has {student_layers} blocks but the teacher only "
                              f"{teacher_layers}; give an explicit list to repeat blocks")
    if choice == "first":
        return list(range(student_layers))
    if choice == "last":
        return list(range(teacher_layers - student_layers, teacher_layers))
    return uniform_layers(teacher_layers, student_layers)


def blocks_per_stack(config: ModelConfig, depth: int | None = None) -> tuple[int, ...]:
    """A model's blocks per stack (`depth`: its block count where its config does not tell it)."""
    return config.stack_layers or (config.num_layers or 0 if depth is None else depth,)


def stack_ranges(teacher: Sequence[int], student: Sequence[int]) -> list[tuple[range, range]]:
    """(teacher blocks, student blocks) of each stack, given the blocks per stack of each (one entry: one stack). A
    student of one stack reads the teacher's stacks as one sequence."""
    if len(student) == 1:
        teacher = (sum(teacher),)
    if len(teacher) != len(student):
        raise ProjectionError(f"the student has {len(student)} stacks of blocks {list(student)} and the teacher "
                              f"{len(teacher)} {list(teacher)}: a student block takes a teacher block of its own stack")
    starts = [[0, *itertools.accumulate(counts)] for counts in (teacher, student)]
    return [(range(t0, t1), range(s0, s1)) for (t0, t1), (s0, s1) in zip(*(itertools.pairwise(s) for s in starts))]


def stacked_layers(choice: str | list[int], teacher: Sequence[int], student: Sequence[int]) -> list[int]:
    """Teacher block for each student block, each stack's from its own (`select_layers` within every stack)."""
    pairs = stack_ranges(teacher, student)
    if not isinstance(choice, list) or len(pairs) == 1:
        return [t.start + b for t, s in pairs for b in select_layers(choice, len(t), len(s))]
    if len(choice) != sum(student):
        raise ProjectionError(f"layers: {len(choice)} indices given for {sum(student)} student blocks")
    for n, (t, s) in enumerate(pairs):
        stray = [k for k in s if choice[k] not in t]
        if stray:
            raise ProjectionError(f"layers: student block {stray[0]} is in stack {n}, whose teacher blocks are "
                                  f"{t.start}..{t.stop - 1}, but takes teacher block {choice[stray[0]]}")
    return list(choice)


def top_blocks(score: Sequence[float], teacher: Sequence[int], student: Sequence[int]) -> list[int]:
    """In each stack, as many of its highest-scoring teacher blocks as the student's stack has, in teacher order
    (ties: the earlier block)."""
    return [b for t, s in stack_ranges(teacher, student)
            for b in sorted(sorted(t, key=lambda b: (-score[b], b))[:len(s)])]


def uniform_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher blocks, both ends included: round(i * (T - 1) / (S - 1)), halves rounded up (integer
    arithmetic, so no float ties). One student block takes block 0. Distinct whenever S <= T."""
    if student_layers == 1:
        return [0]
    span, steps = teacher_layers - 1, student_layers - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(student_layers)]


# ---------------------------------------------------------------- entries

@dataclass
class Part:
    """One teacher tensor feeding a student tensor (or its slice along axis 0, when concatenated)."""

    teacher_key: str  # canonical name
    native_key: str  # the name in the teacher's files
    teacher_shape: tuple[int, ...]
    student_shape: tuple[int, ...]
    axes: tuple[Axis, ...] | None  # None: no anatomy known, copied as is
    block: int | None  # teacher block

    @property
    def collapses_time(self) -> bool:
        return self.axes is not None and len(self.teacher_shape) == len(self.student_shape) + 1


@dataclass
class Entry:
    student_key: str
    status: Status
    student_shape: tuple[int, ...]
    parts: list[Part] = field(default_factory=list)
    reason: str = ""
    transforms: list[str] = field(default_factory=list)
    student_block: int | None = None

    @property
    def params(self) -> int:
        return math.prod(self.student_shape)

    @property
    def teacher_keys(self) -> list[str]:
        return [p.native_key for p in self.parts]

    def row(self) -> dict[str, Any]:
        return {
            "student_key": self.student_key, "status": self.status,
            "teacher_keys": self.teacher_keys, "student_shape": list(self.student_shape),
            "teacher_shapes": [list(p.teacher_shape) for p in self.parts], "params": self.params,
            "transforms": self.transforms, "reason": self.reason,
        }


@dataclass
class Mapping:
    teacher: ModelView
    student: ModelView
    layers: list[int]
    entries: list[Entry]
    rules: dict[str, Rule]
    student_sizes: dict[str, int]
    teacher_sizes: dict[str, int]
    strategy: Strategy

    def coverage(self) -> dict[str, dict[str, float]]:
        moved = [e for e in self.entries if e.status != "skipped"]
        total_params = sum(e.params for e in self.entries) or 1
        n = len(self.entries) or 1
        return {
            "keys": {"transferred": len(moved), "total": len(self.entries), "rate": len(moved) / n},
            "params": {"transferred": sum(e.params for e in moved), "total": sum(e.params for e in self.entries),
                       "rate": sum(e.params for e in moved) / total_params},
        }

    def counts(self) -> dict[str, int]:
        return {s: sum(e.status == s for e in self.entries) for s in STATUSES}

    def unused_teacher_keys(self) -> list[str]:
        used = {p.native_key for e in self.entries if e.status != "skipped" for p in e.parts}
        return [k for k in self.teacher.checkpoint.keys() if k not in used]

    def entry(self, student_key: str) -> Entry:
        for e in self.entries:
            if e.student_key == student_key:
                return e
        raise ProjectionError(f"student has no key '{student_key}'")

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [e.row() for e in self.entries], "coverage": self.coverage(), "counts": self.counts(),
                "layers": self.layers, "unused_teacher_keys": self.unused_teacher_keys()}


def _check_heads(teacher: dict[str, int], student: dict[str, int]) -> None:
    th, td, sh, sd = teacher.get("sa_heads"), teacher.get("sa_qk"), student.get("sa_heads"), student.get("sa_qk")
    if None in (th, td, sh, sd):
        return
    if sh > th or sd > td:  # suggest the fewest heads that fit: the largest head dim, the teacher's if it divides
        fits = [h for h in range(1, th + 1) if student["resid"] % h == 0 and student["resid"] // h <= td]
        hint = (f"e.g. num_heads {fits[0]} (head dim {student['resid'] // fits[0]})" if fits
                else f"a width of at most {th * td}")
        raise ProjectionError(
            f"the student has {sh} heads of {sd} but the teacher has {th} heads of {td}: heads are kept whole "
            f"and cannot be split or widened; use at most {th} heads of at most {td}, {hint}")
    if sd % 2:
        raise ProjectionError(f"student head dim {sd} is odd: RoPE rotates channel pairs, so it must be even")


def _problems(part: Part, t_sizes: dict[str, int], s_sizes: dict[str, int]) -> list[str]:
    """Why this part cannot be projected faithfully (empty when it can), axis by axis."""
    if part.axes is None:
        if part.teacher_shape != part.student_shape:
            return [f"no anatomy known for teacher key '{part.teacher_key}' and shapes differ "
                    f"({list(part.teacher_shape)} vs {list(part.student_shape)})"]
        return []
    if len(part.teacher_shape) not in (len(part.student_shape), len(part.student_shape) + 1):
        return [f"rank {len(part.teacher_shape)} teacher tensor {list(part.teacher_shape)} vs rank "
                f"{len(part.student_shape)} student tensor: no faithful source"]
    out = []
    kept = [(a, n) for a, n in zip(part.axes, part.teacher_shape) if not (part.collapses_time and a == ("kt",))]
    for (axis, t_n), s_n in zip(kept, part.student_shape):
        if len(axis) == 1:
            space = axis[0]
            label, kind = SPACES[space].label or space, SPACES[space].kind
            if s_n == t_n:
                continue
            if kind in ("fixed", "temporal"):
                out.append(f"{label} {t_n} vs {s_n}: no faithful source")
            elif s_n > t_n:
                out.append(f"{label}: the student has {s_n}, more than the teacher's {t_n}")
            elif s_sizes.get(space, s_n) != s_n:
                out.append(f"{label}: {s_n} here but {s_sizes[space]} in the student config")
            continue
        resized = [f"{SPACES[s].label or s} {t_sizes[s]} vs {s_sizes[s]}" for s in axis if SPACES[s].kind == "fixed"
                   and s in s_sizes and s in t_sizes and s_sizes[s] != t_sizes[s]]
        if resized:  # e.g. the head's output channels: a fixed space inside a flattened axis
            out.append(f"{', '.join(resized)}: no faithful source")
            continue
        expected = math.prod(s_sizes.get(s, t_sizes.get(s, 0)) for s in axis)
        if expected != s_n:
            fixed = [f"{SPACES[s].label or s} {t_sizes[s]}" for s in axis if SPACES[s].kind == "fixed"]
            out.append(f"axis of {' x '.join(axis)}: the student has {s_n}, its config gives {expected}"
                       + (f" (keeping {', '.join(fixed)}): no faithful source" if fixed else ""))
    return out


def _describe(part: Part, t_sizes: dict[str, int], s_sizes: dict[str, int], strategy: Strategy) -> list[str]:
    steps = []
    if part.collapses_time:
        steps.append(f"Conv3d->Conv2d ({strategy.conv} over time)")
    if part.axes is None:
        return steps
    methods = {"free": strategy.width, "neurons": f"ffn {strategy.ffn}", "heads": f"heads {strategy.heads}",
               "rope": f"rope pairs {strategy.head_dim}",
               "dims": "head dim " + ("magnitude" if strategy.head_dim == "frequency" else strategy.head_dim)}
    for s in dict.fromkeys(s for axis in part.axes for s in axis):
        t, st = t_sizes.get(s), s_sizes.get(s)
        if t and st and st < t:
            steps.append(f"{s} {t}->{st} ({methods.get(SPACES[s].kind, '')})")
    if strategy.rescale == "variance" and len(part.axes) == 2:
        t_in = math.prod(t_sizes.get(s, 1) for s in part.axes[1])
        s_in = math.prod(s_sizes.get(s, 1) for s in part.axes[1])
        if s_in < t_in:
            steps.append(f"rescale x{math.sqrt(t_in / s_in):.3g}")
    return steps


def build_mapping(teacher: ModelView, student: ModelView, strategy: Strategy | None = None,
                  rules: dict[str, Rule] | None = None) -> Mapping:
    """One entry per student key. Reads no tensor data."""
    strategy = strategy or Strategy()
    _check_rules_match(rules or {}, student)
    rules = {**preset_rules(student.layout), **(rules or {})}
    t_sizes = space_sizes(teacher.config)
    n_student = student.config.num_layers or 0
    if student.layout == "custom":  # its blocks are whatever the rules' `{i}` match
        n_student = 1 + max((f[2] for k in student.shapes if (f := find_rule(rules, k)) and f[2] is not None),
                            default=n_student - 1)
    layers = stacked_layers(strategy.layers, blocks_per_stack(teacher.config),
                            blocks_per_stack(student.config, n_student))
    if student.layout == "custom":  # unknown names: learn the student's widths from what the rules map
        s_sizes = _infer_sizes(student, teacher, layers, rules, t_sizes)
    else:
        s_sizes = space_sizes(student.config)
    _check_heads(t_sizes, s_sizes)
    entries = [_map_key(key, shape, teacher, layers, rules, t_sizes, s_sizes, strategy)
               for key, shape in student.shapes.items()]
    return Mapping(teacher, student, layers, entries, rules, s_sizes, t_sizes, strategy)


def _check_rules_match(rules: dict[str, Rule], student: ModelView) -> None:
    """A rule whose student side matches no student key is a typo, not a rule that applies to nothing."""
    for pattern in rules:
        regex = _rule_regex(pattern)
        if any(regex.match(k) for k in student.shapes):
            continue
        parts = [k.split(".") for k in student.shapes]  # every key and module, its first index as {i}
        modules = {re.sub(r"(^|\.)\d+(?=\.|$)", r"\1{i}", ".".join(p[:n]), count=1)
                   for p in parts for n in range(1, len(p) + 1)}
        close = difflib.get_close_matches(pattern, sorted(modules), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ProjectionError(f"rule '{pattern}' matches no student key (the student has {len(student.shapes)} "
                              f"keys){hint}")


def _infer_sizes(student: ModelView, teacher: ModelView, layers: list[int], rules: dict[str, Rule],
                 t_sizes: dict[str, int]) -> dict[str, int]:
    """Space sizes of a student with unknown names, from the shapes of the tensors its rules map."""
    pairs = []
    for key, shape in student.shapes.items():
        entry = _map_key(key, shape, teacher, layers, rules, t_sizes, t_sizes, Strategy())
        for part in entry.parts:
            axes = [a for a in part.axes or () if not (part.collapses_time and a == ("kt",))]
            pairs += [(key, axis, n) for axis, n in zip(axes, part.student_shape)] if len(axes) == len(shape) else []
    sizes = {s: space.size for s, space in SPACES.items() if isinstance(space.size, int)}  # e.g. the 2x2 patch
    if student.config.num_heads:
        sizes.update(sa_heads=student.config.num_heads, ca_heads=student.config.num_heads)
    changed = True
    while changed:
        changed = False
        for key, axis, n in pairs:
            unknown = [s for s in axis if s not in sizes]
            known = math.prod(sizes[s] for s in axis if s in sizes)
            if len(unknown) == 2 and unknown[0].endswith("_heads") and unknown[1] in t_sizes:
                # heads x head dim, neither known: one head count for the student, a guess flagged as such
                heads = infer_heads(n, t_sizes[unknown[1]], t_sizes[unknown[1]])
                sizes.setdefault("sa_heads", heads)
                sizes.setdefault("ca_heads", heads)
                changed = True
                continue
            if len(unknown) == 1 and n % known == 0:
                sizes[unknown[0]] = n // known
                changed = True
            elif len(unknown) == 1 and axis[0].endswith("_heads") and axis[0] in sizes:
                raise ProjectionError(f"student key '{key}': width {n} is not divisible by num_heads {sizes[axis[0]]}")
    for qk, vo in (("sa_qk", "sa_vo"), ("ca_qk", "ca_vo")):
        if qk in sizes:
            sizes.setdefault(vo, sizes[qk])
    return sizes


def _map_key(key: str, shape: tuple[int, ...], teacher: ModelView, layers: list[int], rules: dict[str, Rule],
             t_sizes: dict[str, int], s_sizes: dict[str, int], strategy: Strategy) -> Entry:
    found = find_rule(rules, key)
    if found:
        rule, suffix, s_block = found
    else:  # no rule: the teacher key of the same name
        rule, s_block = template_of(key)
        suffix = ""
    entry = Entry(key, "skipped", shape, student_block=s_block)
    if isinstance(rule, dict):
        entry.reason = rule["skip"]
        return entry
    targets = [t + suffix for t in ([rule] if isinstance(rule, str) else rule)]
    t_block = None
    if s_block is not None:
        if s_block >= len(layers):
            entry.reason = f"student block {s_block} has no teacher block (the student config has {len(layers)})"
            return entry
        t_block = layers[s_block]
    names = [t.replace("{i}", str(t_block)) for t in targets]
    if any("{i}" in t for t in targets) and t_block is None:
        entry.reason = f"a rule for '{key}' names a teacher block '{{i}}' but the student key has no block index"
        return entry
    missing = [n for n in names if n not in teacher.shapes]
    if missing:
        entry.reason = (f"the teacher has no key '{missing[0]}'" if found
                        else f"no rule maps it and the teacher has no key '{key}'")
        return entry
    if len(names) > 1 and (not shape or shape[0] % len(names)):
        entry.reason = f"cannot split axis 0 of {list(shape)} into {len(names)} equal parts"
        return entry
    part_shape = (shape[0] // len(names), *shape[1:]) if shape else shape
    entry.parts = [Part(n, teacher.native[n], teacher.shapes[n], part_shape, axes_of(n), t_block) for n in names]
    problems = [p for part in entry.parts for p in _problems(part, t_sizes, s_sizes)]
    if problems:
        entry.reason = "; ".join(dict.fromkeys(problems))
        return entry
    entry.transforms = [step for part in entry.parts for step in _describe(part, t_sizes, s_sizes, strategy)]
    entry.transforms = list(dict.fromkeys(entry.transforms))
    if len(names) > 1:
        entry.status = "concatenated"
        entry.transforms.append(f"stack {len(names)} along axis 0")
    elif entry.parts[0].native_key == key and not entry.transforms:
        entry.status = "exact"
    else:
        entry.status = "mapped"
        if entry.parts[0].native_key != key:
            entry.transforms.insert(0, f"from {entry.parts[0].native_key}")
    return entry
