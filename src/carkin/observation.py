"""Residual error models and censoring (BLQ) for observed CAR levels and PD counts.

Three error models, one per observable:

- ``log-additive``: log y ~ Normal(log f, sigma); y is log-normal around f. The usual
  model for qPCR transgene levels (Stein et al. 2019 used it, sigma 0.56).
- ``proportional``: y ~ Normal(f, sigma * f).
- ``combined``: y ~ Normal(f, sqrt(sigma_add^2 + (sigma * f)^2)).

Every log density is of y in its natural units (the log-additive one includes the
-log y Jacobian), so models with different error models can be compared by LOO.

A BLQ observation enters as censored (Beal's M3): its likelihood is the probability
that the measurement lies below the LLOQ, ``P(y < LLOQ | f)``. It is never dropped and
never imputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

ERROR_MODELS = ("log-additive", "proportional", "combined")
# Predictions are floored here before a log: an ODE state that is exactly zero (or
# undershoots by the solver's atol) must give a finite, very small likelihood, not NaN.
PREDICTION_FLOOR = 1e-12
# Below this standardised value log Phi comes from its asymptotic series: erfc(-u / sqrt 2)
# underflows near u = -38.
LOG_CDF_SERIES_BELOW = -30.0


@dataclass(frozen=True)
class ErrorModel:
    """The residual error of one observable: ``kind`` is one of ERROR_MODELS."""

    kind: str = "log-additive"

    def __post_init__(self):
        if self.kind not in ERROR_MODELS:
            raise ValueError(f"error model must be one of {', '.join(ERROR_MODELS)}; got {self.kind!r}")

    @property
    def has_additive(self) -> bool:
        return self.kind == "combined"


def _scale(kind: str, f, sigma, sigma_add):
    """(centre, sd) of the normal distribution the error model puts on g(y)."""
    f = jnp.maximum(f, PREDICTION_FLOOR)
    if kind == "log-additive":
        return jnp.log(f), sigma + 0.0 * f
    if kind == "proportional":
        return f, sigma * f
    return f, jnp.sqrt(sigma_add**2 + (sigma * f) ** 2)


def log_likelihood(kind: str, y, f, blq, lloq, sigma, sigma_add=0.0):
    """Pointwise log-likelihood of observations ``y`` given predictions ``f``.

    ``blq`` marks censored records, whose term is log P(y < lloq); ``y`` is ignored
    there (it may be NaN). All arrays share one shape.
    """
    safe_y = jnp.where(blq, 1.0, y)  # keep NaN out of the unused branch (its gradient too)
    safe_lloq = jnp.where(blq, lloq, 1.0)
    return jnp.where(blq, log_censored(kind, safe_lloq, f, sigma, sigma_add),
                     log_density(kind, safe_y, f, sigma, sigma_add))


def log_density(kind: str, y, f, sigma, sigma_add=0.0):
    """Log density of measured (uncensored) values ``y`` given predictions ``f``."""
    centre, sd = _scale(kind, f, sigma, sigma_add)
    if kind == "log-additive":
        g_y = jnp.log(jnp.maximum(y, PREDICTION_FLOOR))
        return norm.logpdf(g_y, centre, sd) - g_y
    return norm.logpdf(y, centre, sd)


def log_censored(kind: str, lloq, f, sigma, sigma_add=0.0):
    """Log probability that a measurement lies below ``lloq`` given predictions ``f`` (M3)."""
    centre, sd = _scale(kind, f, sigma, sigma_add)
    g_lloq = jnp.log(lloq) if kind == "log-additive" else lloq
    return log_normal_cdf((g_lloq - centre) / sd)


def log_normal_cdf(u):
    """log Phi(u), the standard normal's log CDF, to float64 rounding.

    One erfc of |u| where Phi(u) is representable (erfc keeps its relative accuracy far into
    the tail), the asymptotic series below that. It is cheaper than jax.scipy's log_ndtr, which
    evaluates Phi twice on every element; this term is the costliest one in a sampler's
    gradient when many records are BLQ."""
    above = u > LOG_CDF_SERIES_BELOW  # selections, not max/min: those halve the gradient at a tie
    clipped = jnp.where(above, u, LOG_CDF_SERIES_BELOW)
    positive = u > 0
    tail = 0.5 * jax.scipy.special.erfc(jnp.where(positive, clipped, -clipped) / math.sqrt(2.0))  # Phi(-|u|)
    # each log sees only its own side, so the other's overflow cannot put NaN into the gradient
    direct = jnp.where(positive, jnp.log1p(-jnp.where(positive, tail, 0.0)), jnp.log(jnp.where(positive, 0.5, tail)))
    v = jnp.where(above, LOG_CDF_SERIES_BELOW, u)
    w = 1.0 / (v * v)
    # Phi(v) = phi(v) / -v * (1 - w + 3 w^2 - 15 w^3 + 105 w^4 ...); the next term is below 1e-13 here
    series = -0.5 * v * v - jnp.log(-v) - 0.5 * math.log(2 * math.pi) + jnp.log1p(
        w * (-1 + w * (3 + w * (-15 + 105 * w))))
    return jnp.where(above, direct, series)


def sample(kind: str, key, f, sigma, sigma_add=0.0):
    """Draw measurements around predictions ``f`` (for predictive checks)."""
    centre, sd = _scale(kind, f, sigma, sigma_add)
    z = centre + sd * jax.random.normal(key, jnp.shape(f))
    return jnp.exp(z) if kind == "log-additive" else z


@dataclass(frozen=True)
class Assay:
    """How an observable is measured: residual error model, its SDs, and the lower limit of quantification.

    ``lloq`` 0 means no limit. ``source`` says where the values come from (or that they are assumptions)."""

    error: str = "log-additive"
    sigma: float = 0.5
    sigma_add: float = 0.0
    lloq: float = 0.0
    source: str = ""

    def __post_init__(self):
        ErrorModel(self.error)  # same check, same message
        for k in ("sigma", "sigma_add", "lloq"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"assay: {k} must be a finite number >= 0, got {v!r}")
