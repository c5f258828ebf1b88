"""Suggested rules for the student keys nothing maps: teacher tensors of a compatible shape with the closest name.

Suggestions are guesses for a person to review; nothing here applies them. Student keys are grouped into modules
(`layers.{i}.wq` holds `.weight` and `.bias`; `{i}` is the student block), each module is paired with one unused
teacher module whose tensors its shapes fit, closest names first, and a pairing is kept only when mapping with it
transfers every key it covers and changes no key that already transfers. The kept pairs are then written as the
shortest rules that say the same (`layers.{i}.attn: blocks.{i}.self_attn` rather than one rule per tensor).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import yaml

from ..arch.anatomy import SPACES, WAN_TENSORS, template_of
from ..errors import ProjectionError
from .mapping import Entry, Mapping, Rule, build_mapping, find_rule, rules_to_yaml

PARAMS = ("weight", "bias")
ROUNDS = 4  # pairings rejected by the mapper are replaced by the next best this many times
NUMBERED = re.compile(r"^(?P<pre>.+?)\.(?P<i>\d+)\.(?P<rest>.+)$")  # the first '.N.' in a key


@dataclass
class Module:
    name: str  # a template: 'layers.{i}.wq' (block modules carry `{i}`)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter ('weight', 'bias', '') -> shape
    keys: list[str] = field(default_factory=list)  # student keys

    @property
    def in_block(self) -> bool:
        return "{i}" in self.name

    def key(self, param: str) -> str:
        return join(self.name, param)


def join(module: str, param: str) -> str:
    return f"{module}.{param}" if param else module


def block_container(keys: list[str]) -> str | None:
    """The student's block list ('layers' in 'layers.3.wq.weight'): of the prefixes followed by a number, the
    one with most keys whose numbers run 0..n-1 (Sequential indices such as 'mlp.0', 'mlp.2' do not)."""
    counts: Counter[str] = Counter()
    numbers: dict[str, set[int]] = {}
    for key in keys:
        if m := NUMBERED.match(key):
            counts[m["pre"]] += 1
            numbers.setdefault(m["pre"], set()).add(int(m["i"]))
    runs = [p for p in counts if numbers[p] == set(range(len(numbers[p])))]
    return max(runs, key=lambda p: counts[p], default=None)


def student_template(key: str, container: str | None) -> str:
    m = NUMBERED.match(key)
    return f"{container}.{{i}}.{m['rest']}" if container and m and m["pre"] == container else key


def split_param(template: str) -> tuple[str, str]:
    """'blocks.{i}.ffn.0.weight' -> ('blocks.{i}.ffn.0', 'weight'); a bare tensor is its own module."""
    module, _, param = template.rpartition(".")
    return (module, param) if module and param in PARAMS else (template, "")


def fits(shape: tuple[int, ...], template: str, t_shape: tuple[int, ...], sizes: dict[str, int]) -> bool:
    """Could a student tensor of `shape` be projected from this teacher tensor? Axes of fixed spaces must match,
    others may shrink (keeping whole multiples of their fixed parts); a Conv3d kernel may lose its time axis."""
    axes = WAN_TENSORS.get(template)
    if axes is None:
        return tuple(shape) == tuple(t_shape)
    pairs = list(zip(axes, t_shape))
    if len(t_shape) == len(shape) + 1:
        pairs = [p for p in pairs if p[0] != ("kt",)]
    if len(pairs) != len(shape):
        return False
    for (axis, t_n), s_n in zip(pairs, shape):
        fixed = [s for s in axis if SPACES[s].kind in ("fixed", "temporal")]
        if len(fixed) == len(axis):
            if s_n != t_n:
                return False
        elif s_n > t_n or s_n % math.prod(sizes.get(s, 1) for s in fixed):
            return False
    return True


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[._]", name) if t and t != "{i}"]


def similarity(a: str, b: str) -> float:
    """Closeness of two module names (without their block list): shared name parts and shared characters."""
    ta, tb = _tokens(a), _tokens(b)
    common = sum((Counter(ta) & Counter(tb)).values())
    parts = 2 * common / (len(ta) + len(tb)) if ta or tb else 1.0
    return (parts + SequenceMatcher(None, ".".join(ta), ".".join(tb)).ratio()) / 2


def _local(name: str) -> str:
    """The name inside its block: 'layers.{i}.attn.q' -> 'attn.q'."""
    return name.partition("{i}.")[2] if "{i}" in name else name


def _modules(tensors: list[tuple[str, tuple[int, ...], str | None]]) -> dict[str, Module]:
    """Modules from (template, shape, key) triples, in order; a template's shape is its first tensor's."""
    out: dict[str, Module] = {}
    for template, shape, key in tensors:
        name, param = split_param(template)
        module = out.setdefault(name, Module(name))
        module.shapes.setdefault(param, shape)
        if key is not None:
            module.keys.append(key)
    return out


def _compatible(s: Module, t: Module, sizes: dict[str, int]) -> bool:
    return (s.in_block == t.in_block and set(s.shapes) <= set(t.shapes)
            and all(fits(shape, t.key(p), t.shapes[p], sizes) for p, shape in s.shapes.items()))


def _greedy(candidates: list[tuple[float, int, str, str]], taken: set[str]) -> dict[str, str]:
    """One teacher module per student module, best score first."""
    out: dict[str, str] = {}
    for _, _, s, t in sorted(candidates, key=lambda c: (-c[0], c[1])):
        if s not in out and t not in taken:
            out[s] = t
            taken.add(t)
    return out


def _verify(mapping: Mapping, student: dict[str, Module], pairs: dict[str, str],
            rules: dict[str, Rule]) -> set[str]:
    """The student modules of `pairs` that map as intended with `rules` on top of the mapping's own, without
    changing any key that already transfers."""
    try:
        trial = build_mapping(mapping.teacher, mapping.student, mapping.strategy, {**mapping.rules, **rules})
    except ProjectionError:
        return set()
    entries = {e.student_key: e for e in trial.entries}
    ok = {s for s, t in pairs.items()
          if all(_maps_to(entries[k], join(t, split_param(k)[1])) for k in student[s].keys)}
    patterns = {p: p for p in rules}
    for before in mapping.entries:  # a suggestion must not redirect what already transfers
        if before.status != "skipped" and entries[before.student_key].teacher_keys != before.teacher_keys:
            culprit = find_rule(patterns, before.student_key)
            ok -= {s for s in pairs if culprit and (s == culprit[0] or s.startswith(f"{culprit[0]}."))}
    return ok


def _maps_to(entry: Entry, teacher_template: str) -> bool:
    return (entry.status != "skipped" and len(entry.parts) == 1
            and template_of(entry.parts[0].teacher_key)[0] == teacher_template)


def suggest_rules(mapping: Mapping) -> dict[str, Rule]:
    """Rules (in the rules file's format) for the student keys that transfer nothing and are not skipped by a
    rule on purpose; {} when there is nothing to suggest. Reads no tensor data."""
    def on_purpose(key: str) -> bool:
        found = find_rule(mapping.rules, key)
        return found is not None and isinstance(found[0], dict)

    wanted = [e.student_key for e in mapping.entries if e.status == "skipped" and not on_purpose(e.student_key)]
    if not wanted:
        return {}
    shapes = mapping.student.shapes
    container = block_container(list(shapes))
    student = _modules([(student_template(k, container), shapes[k], k) for k in wanted])
    used = {split_param(template_of(p.teacher_key)[0])[0]
            for e in mapping.entries if e.status != "skipped" for p in e.parts}
    teacher_tensors = [(template_of(k)[0], shape, None) for k, shape in mapping.teacher.shapes.items()]
    teacher = {n: m for n, m in _modules(teacher_tensors).items() if n not in used}
    sizes = mapping.teacher_sizes
    candidates = [(similarity(_local(s.name), _local(t.name)), i, s.name, t.name)
                  for i, s in enumerate(student.values()) for t in teacher.values() if _compatible(s, t, sizes)]

    accepted: dict[str, str] = {}
    for _ in range(ROUNDS):
        proposal = _greedy([c for c in candidates if c[2] not in accepted], set(accepted.values()))
        if not proposal:
            break
        trial = {**accepted, **proposal}
        ok = _verify(mapping, student, trial, trial)
        accepted = {s: t for s, t in trial.items() if s in ok}
        rejected = {(s, t) for s, t in proposal.items() if s not in ok}
        candidates = [c for c in candidates if (c[2], c[3]) not in rejected]
        if not rejected:
            break
    return _shortest(mapping, student, accepted, container)


def _shortest(mapping: Mapping, student: dict[str, Module], accepted: dict[str, str],
              container: str | None) -> dict[str, Rule]:
    """The accepted module pairs as the fewest rules: a module prefix where every student key under it maps to
    the teacher's prefix with the same rest, else one rule per module."""
    accepted = {s: accepted[s] for s in student if s in accepted}  # in the student's order
    target = {}  # student key template -> teacher template, for every key the pairs cover
    for s, t in accepted.items():
        for param in student[s].shapes:
            target[student[s].key(param)] = join(t, param)
    templates = list(dict.fromkeys(student_template(k, container) for k in mapping.student.shapes))

    def covers(sp: str, tp: str) -> bool:
        under = [st for st in templates if st == sp or st.startswith(sp + ".")]
        return all(target.get(st) == tp + st[len(sp):] for st in under)

    rules: dict[str, Rule] = {}
    for s, t in accepted.items():
        sc, tc = s.split("."), t.split(".")
        common = 0
        while (common < min(len(sc), len(tc)) - 1 and sc[-1 - common] == tc[-1 - common]
               and sc[-1 - common] != "{i}"):
            common += 1
        for keep in range(common, -1, -1):  # the shortest prefix first
            sp, tp = ".".join(sc[:len(sc) - keep]), ".".join(tc[:len(tc) - keep])
            if covers(sp, tp):
                break
        else:
            sp, tp = s, t
        if not any(sp == r or sp.startswith(r + ".") for r in rules):
            rules = {r: v for r, v in rules.items() if not r.startswith(sp + ".")}
            rules[sp] = tp
    if len(_verify(mapping, student, accepted, rules)) < len(accepted):
        return accepted  # a shorter rule collided with another rule: the module rules are verified
    return rules


def with_suggestions(text: str, rules: dict[str, Rule], suggested: dict[str, Rule]) -> str:
    """A rules file: `text` (parsed as `rules`) as written, then the suggestions under a comment that marks them
    for review. The text is regenerated (its comments dropped) only where a suggestion replaces one of its
    rules or it is not a plain 'student key: teacher key' mapping."""
    if not suggested:
        return text
    replaced = [k for k in suggested if k in rules]
    header = (f"# Suggested rules ({len(suggested)}), to review before applying: for student keys that transfer "
              "nothing,\n# the unused teacher tensors of a compatible shape with the closest name.\n")
    if replaced:
        header += f"# They replace your rule(s) for {', '.join(replaced)}, which transferred nothing.\n"
    block = header + rules_to_yaml(suggested)
    kept = {k: v for k, v in rules.items() if k not in suggested}
    if not kept:
        return block
    combined = text.rstrip("\n") + "\n\n" + block
    try:
        plain = not replaced and yaml.safe_load(combined) == {**rules, **suggested}
    except yaml.YAMLError:
        plain = False
    return combined if plain else rules_to_yaml(kept) + "\n" + block
