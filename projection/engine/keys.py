"""What decides a projection, as one frozen, hashable key that every cache of projections uses.

A projection is decided by the strategy's fields that matter, the rules, the calibration set the strategy ranks or
fits on (its digest: the activations' key) and the teacher (its fingerprint). Which strategy fields and whether
the calibration set matter depends on what is cached (`SCOPES`):

  mapping   the mapping (it carries the whole strategy): every field, the calibration set whenever one is there
  numbers   projected entries and plans: less the export dtype, device, seed and expert; the calibration set
            where the strategy ranks on activations
  student   a runnable student (fresh values of untransferred keys are seeded; fits and compensation run on the
            calibration set): less the export dtype and device; the calibration set where the strategy needs one
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from ..core.strategy import Strategy

Scope = Literal["mapping", "numbers", "student"]
SCOPES: dict[str, tuple[frozenset[str], str | None]] = {  # scope -> (strategy fields left out, calibration when)
    "mapping": (frozenset(), None),
    "numbers": (frozenset({"dtype", "device", "seed", "expert"}), "needs_activations"),
    "student": (frozenset({"dtype", "device"}), "needs_calibration"),
}


@dataclass(frozen=True)
class ProjectionKey:
    scope: Scope
    strategy: str  # canonical JSON of the strategy fields that matter in this scope
    rules: str  # canonical JSON of the rules
    calibration: str | None  # the calibration set's digest (the activations' key), where it matters
    teacher: str  # the teacher's fingerprint

    @classmethod
    def of(cls, scope: Scope, strategy: Strategy, rules: dict[str, Any], activations: Any,
           teacher: str) -> ProjectionKey:
        """The key of `strategy` + `rules` on `teacher` (a fingerprint), with `activations` (an `Activations` or
        None) the teacher's on the calibration set in use."""
        left_out, when = SCOPES[scope]
        used = activations is not None and (when is None or getattr(strategy, when))
        return cls(scope, json.dumps(strategy.model_dump(exclude=set(left_out)), sort_keys=True),
                   json.dumps(rules, sort_keys=True), activations.key if used else None, teacher)


@dataclass(frozen=True)
class ReferenceKey:
    """What decides the teacher's outputs on a calibration set (`fidelity.Reference`): the teacher (its
    fingerprint), the set (its content digest), the noise draws per latent, their seed and the band of levels.
    Every view measuring on the same set under the same key shares one teacher forward."""
    teacher: str
    calibration: str
    draws: int
    seed: int
    band: tuple[float, float]
