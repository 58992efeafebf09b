"""The toxicity link: the probability of a dose-limiting toxicity from the simulated kinetics.

    logit P(DLT) = intercept + slope_peak * log10(peak / peak_reference)
                             + slope_burden * log10(burden / burden_reference)

``peak`` is the subject's simulated peak of ``peak_observable`` (CAR transgene level)
and ``burden`` its baseline tumour burden (the model covariate ``burden_covariate``,
marrow blast %). The DLT here is severe cytokine release syndrome (CRS grade >= 3),
the dominant DLT of CAR-T dose escalation. Every coefficient carries its source or is
labelled an assumption; users override any of them with ``dataclasses.replace`` or a
protocol file's ``[toxicity]`` table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Qualitative anchors of the default CAR-T link (the numbers below are assumptions chosen to
# respect them, not fitted):
#  - Severe CRS after CD19 CAR-T in B-ALL is common at high marrow burden and rare at MRD
#    level, and rises with peak CAR-T expansion (Hay KA et al. Blood 2017;130:2295; Maude SL
#    et al. N Engl J Med 2018;378:439: grade >= 3 CRS in 46% of ELIANA patients, mostly with
#    high burden).
#  - CAR-NK products rarely cause CRS (Liu E et al. N Engl J Med 2020;382:545: no CRS in 11
#    patients; Marin D et al. Nat Med 2024: no severe CRS).
CART_SOURCE = (
    "assumption: P(CRS >= 3) = 10% at a peak of 10^4 copies/µg and 10% marrow blasts, odds x2.7 per ten-fold "
    "higher peak and x2 per ten-fold higher blast burden; chosen to respect the associations of severe CRS with "
    "peak expansion and tumour burden (Hay et al. 2017, Blood 130:2295) and ~45% severe CRS at high burden "
    "(Maude et al. 2018, NEJM 378:439); not fitted"
)
CARNK_SOURCE = (
    "assumption: CRS is rare after CAR-NK cells (Liu et al. 2020, NEJM 382:545; Marin et al. 2024, Nat Med): "
    "P(DLT) = 2% at the reference peak and burden, same slopes as the CAR-T link; not fitted"
)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclass(frozen=True)
class DLTModel:
    """Logistic DLT probability from peak CAR expansion and baseline tumour burden."""

    intercept: float = _logit(0.10)
    slope_peak: float = 1.0  # per log10 of the peak
    slope_burden: float = 0.7  # per log10 of the burden
    peak_observable: str = "car_copies"
    peak_reference: float = 1e4  # copies/µg gDNA
    burden_covariate: str = "BLAST"
    burden_reference: float = 10.0  # % marrow blasts
    name: str = "severe CRS (grade >= 3)"
    source: str = CART_SOURCE

    def __post_init__(self):
        for k in ("intercept", "slope_peak", "slope_burden", "peak_reference", "burden_reference"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"DLT model: {k} must be a finite number, got {v!r}")
        for k in ("peak_reference", "burden_reference"):
            if getattr(self, k) <= 0:
                raise ValueError(f"DLT model: {k} must be > 0, got {getattr(self, k)!r}")

    def probability(self, peak, burden=None) -> np.ndarray:
        """P(DLT) per subject; ``burden`` None (a model without tumour) uses the reference burden."""
        peak = np.maximum(np.asarray(peak, float), 1e-12)
        eta = self.intercept + self.slope_peak * np.log10(peak / self.peak_reference)
        if burden is not None:
            burden = np.maximum(np.asarray(burden, float), 1e-12)
            eta = eta + self.slope_burden * np.log10(burden / self.burden_reference)
        return 1.0 / (1.0 + np.exp(-eta))

    def describe(self) -> str:
        return (f"P({self.name}) = logistic({self.intercept:.3g} + {self.slope_peak:.3g} log10({self.peak_observable}"
                f"/{self.peak_reference:g}) + {self.slope_burden:.3g} log10({self.burden_covariate}"
                f"/{self.burden_reference:g})); {self.source}")


def default_dlt_model(model_name: str) -> DLTModel:
    """The default link for a model: CAR-NK products get a much lower baseline risk."""
    if "carnk" in model_name:
        return DLTModel(intercept=_logit(0.02), source=CARNK_SOURCE)
    return DLTModel()
