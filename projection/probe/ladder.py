"""Random init's ladder: what a start is worth in steps. Random init trains at several budgets (each its own
schedule); a start's equivalent budget is the random budget that reaches the start's error or loss, interpolated in
log N between rungs, and a bound beyond the ladder's ends."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Equivalent:
    """The random budget that reaches a loss: `budget`, or beyond the ladder a bound ('>' past its last rung, '<'
    below its first)."""
    budget: float
    bound: Literal["=", ">", "<"] = "="

    def speedup(self, steps: int) -> Equivalent:
        return Equivalent(self.budget / steps, self.bound)

    def __format__(self, spec: str) -> str:
        """The value in `spec` (default: whole steps), after its bound: '> 4.0' past the ladder's end."""
        return f"{'' if self.bound == '=' else self.bound + ' '}{self.budget:{spec or '.0f'}}"

    def __str__(self) -> str:
        return format(self)


def equivalent_budget(budgets: Sequence[int], losses: Sequence[float], target: float) -> Equivalent:
    """The budget at which random init's ladder (final losses per budget, ascending budgets) reaches `target`:
    the first rung at or below it, linear in log N from the rung before (a ladder is not always monotone)."""
    if not budgets or len(budgets) != len(losses) or list(budgets) != sorted(budgets):
        raise ValueError(f"ladder {list(budgets)}: expected ascending budgets with one loss each")
    if losses[0] <= target:
        return Equivalent(float(budgets[0]), "<" if losses[0] < target else "=")
    for (n0, l0), (n1, l1) in zip(zip(budgets, losses), zip(budgets[1:], losses[1:])):
        if l1 == target:
            return Equivalent(float(n1))
        if l1 < target:
            share = (l0 - target) / (l0 - l1)
            return Equivalent(math.exp(math.log(n0) + share * (math.log(n1) - math.log(n0))))
    return Equivalent(float(budgets[-1]), ">")
