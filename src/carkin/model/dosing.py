"""Dose regimens in cells/kg: single, split and custom infusions.

A regimen is a list of (day, cells/kg) infusions. Each subject's weight turns it
into total cells; the model turns cells into its dose state's unit. Every
regimen is padded to a common number of infusions (zero amounts at the last
infusion time) so subjects with different regimens share one compiled solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from carkin.errors import InputError, InputTypeError
from carkin.strict import DOSE_PER_KG_RANGE

FRACTION_SUM_TOL = 1e-9


@dataclass(frozen=True)
class Regimen:
    """Infusions at ``days`` (days after the first, sorted, >= 0) of ``amounts_per_kg`` cells/kg."""

    days: tuple[float, ...]
    amounts_per_kg: tuple[float, ...]
    label: str = ""

    def __post_init__(self):
        days = tuple(float(d) for d in self.days)
        amounts = tuple(float(a) for a in self.amounts_per_kg)
        if len(days) == 0:
            raise InputError("a regimen needs at least one infusion")
        if len(days) != len(amounts):
            raise InputError(
                f"regimen has {len(days)} infusion days but {len(amounts)} amounts; give one amount per day"
            )
        if any(not math.isfinite(d) or d < 0 for d in days):
            raise InputError(f"infusion days must be finite and >= 0, got {list(days)}")
        if any(b < a for a, b in zip(days, days[1:])):
            raise InputError(f"infusion days must be sorted in increasing order, got {list(days)}")
        if any(not math.isfinite(a) or a < 0 for a in amounts):
            raise InputError(f"infused amounts must be finite and >= 0 cells/kg, got {list(amounts)}")
        total = sum(amounts)
        lo, hi = DOSE_PER_KG_RANGE
        if total > 0 and not lo <= total <= hi:
            raise InputError(f"a total dose of {total:g} cells/kg is outside the plausible range [{lo:g}, {hi:g}] "
                             "cells/kg; doses are in cells per kg (1 million per kg is 1e6), not in millions")
        object.__setattr__(self, "days", days)
        object.__setattr__(self, "amounts_per_kg", amounts)
        if not self.label:
            object.__setattr__(self, "label", _default_label(days, amounts))

    @property
    def total_per_kg(self) -> float:
        return float(sum(self.amounts_per_kg))

    @property
    def n_infusions(self) -> int:
        return len(self.days)

    @property
    def schedule(self) -> str:
        """How the total is given, without the dose: ``single`` or ``split 10/30/60% d0/1/2``."""
        return _schedule(self.days, self.amounts_per_kg)


def _schedule(days, amounts) -> str:
    total = sum(amounts)
    if len(days) == 1:
        return "single"
    fr = "/".join(f"{100 * a / total:.3g}" for a in amounts) if total > 0 else "0"
    dd = "/".join(f"{d:g}" for d in days)
    return f"split {fr}% d{dd}"


def _default_label(days, amounts) -> str:
    return f"{sum(amounts):.3g} cells/kg {_schedule(days, amounts)}"


def single(dose_per_kg: float, day: float = 0.0) -> Regimen:
    """One infusion of ``dose_per_kg`` cells/kg on ``day``."""
    return Regimen((day,), (dose_per_kg,))


def split(
    dose_per_kg: float,
    fractions: tuple[float, ...] = (0.1, 0.3, 0.6),
    days: tuple[float, ...] = (0.0, 1.0, 2.0),
) -> Regimen:
    """A total of ``dose_per_kg`` cells/kg given as ``fractions`` on ``days`` (default 10/30/60% on days 0/1/2)."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(days):
        raise InputError(
            f"split: {len(fractions)} fractions but {len(days)} days; give one fraction per day"
        )
    if any(f < 0 for f in fractions):
        raise InputError(f"split: fractions must be >= 0, got {list(fractions)}")
    if abs(sum(fractions) - 1.0) > FRACTION_SUM_TOL:
        raise InputError(
            f"split: fractions must sum to 1, got {list(fractions)} (sum {sum(fractions):.6g}); "
            "rescale them, e.g. 0.1,0.3,0.6"
        )
    if not (math.isfinite(dose_per_kg) and dose_per_kg >= 0):
        raise InputError(f"split: dose must be a finite number >= 0 cells/kg, got {dose_per_kg!r}")
    return Regimen(tuple(days), tuple(dose_per_kg * f for f in fractions))


def custom(days, amounts_per_kg, label: str = "") -> Regimen:
    """Any list of infusions: ``amounts_per_kg`` cells/kg on ``days``."""
    return Regimen(tuple(days), tuple(amounts_per_kg), label)


def as_regimens(regimen_or_list) -> tuple[list[Regimen], bool]:
    """Normalise the user's argument; the flag says whether a list was given."""
    if isinstance(regimen_or_list, Regimen):
        return [regimen_or_list], False
    try:
        regs = [] if isinstance(regimen_or_list, str | bytes) else list(regimen_or_list)
    except TypeError:  # a number or another single object
        regs = []
    if not regs or not all(isinstance(r, Regimen) for r in regs):
        raise InputTypeError(
            "expected a Regimen or a list of Regimens (make them with carkin.single, carkin.split "
            f"or carkin.custom, e.g. carkin.single(1e7) for 1e7 cells/kg), got {regimen_or_list!r}"
        )
    labels = [r.label for r in regs]
    if len(set(labels)) != len(labels):
        raise InputError(f"regimen labels must be unique, got {labels}; pass label= to tell them apart")
    return regs, True


def dose_table(regimen: Regimen, weight_kg: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-subject infusion times (day) and total cells, padded to ``n_slots`` infusions.

    Padding repeats the last infusion time with zero cells, which the solver
    treats as empty segments, so all subjects share one shape.
    """
    weight_kg = np.asarray(weight_kg, dtype=float)
    k = regimen.n_infusions
    if n_slots < k:
        raise InputError(f"n_slots={n_slots} is smaller than the regimen's {k} infusions")
    days = np.array(regimen.days + (regimen.days[-1],) * (n_slots - k))
    per_kg = np.array(regimen.amounts_per_kg + (0.0,) * (n_slots - k))
    times = np.broadcast_to(days, weight_kg.shape + (n_slots,)).copy()
    cells = weight_kg[..., None] * per_kg
    return times, cells
