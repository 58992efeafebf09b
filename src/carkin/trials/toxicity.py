"""The toxicity link: the probability of a dose-limiting toxicity from the simulated kinetics.

    logit P(DLT) = intercept + slope_peak * log10(exposure / peak_reference)
                             + slope_burden * log10(burden / burden_reference)

``exposure`` is the subject's highest simulated CAR level (``peak_observable``) up to
``window_end_day``, the median day CRS begins (day 3, range 1-22, in 108 paediatric
tisagenlecleucel patients: Levine et al. 2021, toxicity.csv row levine2021_pooled_crs_onset),
rather than the peak of the whole course (days 10-14), which expansion limited by antigen makes
almost the same at every dose. Among windows of 3 to 6 days the 3-day one fitted the
toxicity table best (log posterior -17.9, against -18.3, -19.6 and -20.9 for 4, 5 and 6 days).
``burden`` is the baseline tumour burden (the model covariate ``burden_covariate``, marrow
blast %); ``offset`` shifts the log-odds for a model or class of product (CAR-NK cells, whose arms
report no severe CRS at all; cd19_cart, whose arms are graded on the Penn scale). The DLT is severe
cytokine release syndrome (grade >= 3), the dominant DLT of CAR-T dose escalation. The
coefficients are the mode of the link's calibration against the toxicity table
(calibration/calibrate.py, data/calibration/toxicity.json, which also holds their draws); users
override any of them with ``dataclasses.replace`` or a protocol file's ``[toxicity]`` table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from carkin.errors import InputError

CALIBRATED = (
    "calibrated against the grade >= 3 CRS arms of data/evidence/toxicity.csv claimed by cd19_cart, cd7_cart and "
    "cd7_carnk (calibration/calibrate.py; mode of data/calibration/toxicity.json, draws there); grading scales "
    "taken as reported (Penn, ASTCT, not stated), an assumption"
)
CRS_WINDOW_DAYS = 3.0  # the median day of CRS onset (Levine 2021); best of 3-6 days on the toxicity table


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclass(frozen=True)
class DLTModel:
    """Logistic DLT probability from early CAR exposure and baseline tumour burden."""

    intercept: float = -0.4475
    slope_peak: float = 1.947  # per log10 of the early exposure
    slope_burden: float = 1.404  # per log10 of the burden
    peak_observable: str | None = None  # None: the model's exposure role (see for_model)
    peak_reference: float = 1e4  # copies/µg gDNA
    burden_covariate: str | None = None  # None: the model's burden role; a model without one has no burden term
    burden_reference: float = 10.0  # % marrow blasts
    window_end_day: float = CRS_WINDOW_DAYS
    offset: float = 0.0  # log-odds shift for a model or product class (calibrated: MODEL_OFFSETS)
    name: str = "severe CRS (grade >= 3)"
    source: str = CALIBRATED

    def __post_init__(self):
        for k in ("intercept", "slope_peak", "slope_burden", "peak_reference", "burden_reference", "window_end_day",
                  "offset"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise InputError(f"DLT model: {k} must be a finite number, got {v!r}")
        for k in ("peak_reference", "burden_reference", "window_end_day"):
            if getattr(self, k) <= 0:
                raise InputError(f"DLT model: {k} must be > 0, got {getattr(self, k)!r}")

    def for_model(self, model) -> DLTModel:
        """This link with the names it reads filled in from ``model``'s roles where not given."""
        return replace(self, peak_observable=self.peak_observable or model.role("exposure"),
                       burden_covariate=self.burden_covariate or model.role("burden", required=False))

    def exposure(self, level):
        """Each subject's highest level in the CRS window (an xarray object with a ``time`` dim, in days)."""
        early = level.sel(time=level["time"] <= self.window_end_day)
        if early.sizes["time"] == 0:
            raise InputError(f"DLT model: no simulated time within the first {self.window_end_day:g} days")
        return early.max("time")

    def probability(self, peak, burden=None) -> np.ndarray:
        """P(DLT) per subject from the exposure; ``burden`` None (a model without tumour) uses the reference."""
        peak = np.maximum(np.asarray(peak, float), 1e-12)
        eta = self.intercept + self.offset + self.slope_peak * np.log10(peak / self.peak_reference)
        if burden is not None:
            burden = np.maximum(np.asarray(burden, float), 1e-12)
            eta = eta + self.slope_burden * np.log10(burden / self.burden_reference)
        return 1.0 / (1.0 + np.exp(-eta))

    def describe(self) -> str:
        offset = f" {self.offset:+.3g}" if self.offset else ""
        return (f"P({self.name}) = logistic({self.intercept:.3g}{offset} + {self.slope_peak:.3g} log10(max "
                f"{self.peak_observable or 'exposure'} on days 0-{self.window_end_day:g} / {self.peak_reference:g}) + "
                f"{self.slope_burden:.3g} "
                f"log10({self.burden_covariate or 'burden'}/{self.burden_reference:g})); {self.source}")


# log-odds offsets calibrated with the link (data/calibration/toxicity.json): for a library model's own arms,
# and for any other model of a cell type whose arms were fitted (the CAR-NK offset, from the cd7_carnk arms).
# cd19_cart's offset carries, among other things, the Penn grading of the CD19 arms, which counts more
# grade >= 3 CRS than ASTCT (JULIET regrading, data/evidence/physiology.csv).
MODEL_OFFSETS = {"cd7_carnk": -3.471, "cd19_cart": 0.7682}
CELL_TYPE_OFFSETS = {"CAR-NK": MODEL_OFFSETS["cd7_carnk"]}


def default_dlt_model(model) -> DLTModel:
    """The calibrated link for ``model`` (a model or a library name): its own offset (or its cell type's), and
    the names it reads from the model's roles."""
    if isinstance(model, str):
        from carkin.model.library import load_model

        model = load_model(model)
    offset = MODEL_OFFSETS.get(model.name, CELL_TYPE_OFFSETS.get(model.cell_type, 0.0))
    return DLTModel(offset=offset).for_model(model)


def dlt_model_for(model) -> DLTModel:
    """The link used for a library model's virtual patients."""
    return default_dlt_model(model)
