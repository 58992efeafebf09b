"""Strict reading of user files: unknown keys are refused with the closest valid key, and numbers
are held to plausibility ranges stated with their units.

A misspelt key that is silently dropped runs the wrong analysis without a word (a sidecar
``transfrom`` fits the data on the wrong scale), so every TOML table carkin reads names its keys.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

# Plausible values (low, high): outside these a unit or a digit slipped. Every reader uses these.
UNIT_RANGES = {"kg": (0.5, 300.0), "year": (0.0, 120.0), "%": (0.0, 100.0), "cells/µL": (0.0, 1e6)}
DOSE_PER_KG_RANGE = (1e2, 1e10)  # cells/kg: CAR products are dosed at 1e5-1e8/kg
TOTAL_CELLS_RANGE = (1e4, 1e12)  # cells
TIME_RANGE = (-3650.0, 36525.0)  # days: ten years before to a century after the first infusion


def unknown_keys(table: dict, allowed: Iterable[str], where: str) -> list[str]:
    """One message per key of ``table`` not in ``allowed``, suggesting the closest valid key."""
    allowed = sorted(allowed)
    out = []
    for key in table:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "remove it"
        out.append(f"{where}: unknown key {key!r}; {hint} (valid keys: {', '.join(allowed)})")
    return out


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def range_problem(name: str, value, low: float, high: float, unit: str, why: str = "") -> str | None:
    """A message when ``value`` is not a finite number in [low, high] (None when it is)."""
    if is_number(value) and low <= value <= high:
        return None
    reason = f" ({why})" if why else ""
    return f"{name} = {value!r} is outside the plausible range [{low:g}, {high:g}] {unit}{reason}"


def interval_problem(name: str, pair, low: float, high: float, unit: str) -> str | None:
    """A message unless ``pair`` is [lo, hi] with low <= lo <= hi <= high."""
    if (len(pair) == 2 and all(is_number(v) for v in pair) and low <= pair[0] <= pair[1] <= high):
        return None
    return (f"{name} = {list(pair)!r} must be [low, high] {unit} with {low:g} <= low <= high <= {high:g}; "
            "give the eligible range in increasing order")
