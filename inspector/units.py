"""Numbers as people read them on a slide: 8.15 M, 32.6 MB, 73.1%."""
from __future__ import annotations

import math


def _scaled(n: float, units: tuple[tuple[str, float], ...], plain: str) -> str:
    for unit, size in units:
        text = f"{n / size:.3g}"
        if abs(float(text)) >= 1 and "e" not in text:  # 999,960 is "1 M", not "1e+03 k"
            return f"{text} {unit}"
    return plain


def human_count(n: float) -> str:
    return _scaled(n, (("B", 1e9), ("M", 1e6), ("k", 1e3)), f"{n:.0f}")


def human_bytes(n: float) -> str:
    return _scaled(n, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)), f"{n:.0f} B")


def percent(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"
