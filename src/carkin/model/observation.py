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
from typing import ClassVar, final

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.stats import norm

from carkin.errors import InputError

# Predictions are floored here before a log: an ODE state that is exactly zero (or
# undershoots by the solver's atol) must give a finite, very small likelihood, not NaN.
PREDICTION_FLOOR = 1e-12
# Below this standardised value log Phi comes from its asymptotic series: erfc(-u / sqrt 2)
# underflows near u = -38.
LOG_CDF_SERIES_BELOW = -30.0
SIGMA_PRIOR_SCALE = 1.0  # HalfNormal scale of proportional / log-scale residual SDs

# name -> class: every final subclass of ErrorModel registers itself here
ERROR_MODELS: dict[str, type[ErrorModel]] = {}


class ErrorModel:
    """The residual error of one observable; abstract.

    ``ErrorModel("proportional")`` returns the registered model of that name. A new error model is
    one final subclass with a ``name``: it owns its density, its censored probability, sampling,
    residuals and default priors, and registers itself (``ERROR_MODELS``) for sidecars, the CLI
    and saved fits. Its log density is of y in natural units, so error models compare by LOO."""

    name: ClassVar[str] = ""
    has_additive: ClassVar[bool] = False  # carries a second, additive SD (site ``sigma_add_*``)
    sigma_meaning: ClassVar[str] = ""  # what ``sigma`` is, for parameter tables

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            ERROR_MODELS[cls.name] = cls

    def __new__(cls, kind: str | ErrorModel | None = None):
        if cls is not ErrorModel:
            return super().__new__(cls)
        if isinstance(kind, ErrorModel):
            return kind
        kind = "log-additive" if kind is None else kind
        if kind not in ERROR_MODELS:
            raise InputError(f"error model must be one of {', '.join(ERROR_MODELS)}; got {kind!r}")
        return super().__new__(ERROR_MODELS[kind])

    def __init__(self, kind: str | ErrorModel | None = None):
        pass  # stateless: the SDs are sampled sites, not attributes

    @property
    def kind(self) -> str:
        return self.name

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"ErrorModel({self.name!r})"

    # -- what each model defines ------------------------------------------------------------------
    def scale(self, f, sigma, sigma_add):
        """(centre, sd) of the normal distribution the model puts on g(y)."""
        raise NotImplementedError

    def g(self, y):
        """The scale the error is normal on (identity unless overridden)."""
        return y

    def g_inverse(self, z):
        return z

    def log_jacobian(self, g_y):
        """log |dg/dy| at g(y), so the density is of y in natural units."""
        return 0.0 * g_y

    # -- derived ----------------------------------------------------------------------------------
    def log_density(self, y, f, sigma, sigma_add=0.0):
        """Log density of measured (uncensored) values ``y`` given predictions ``f``."""
        centre, sd = self.scale(jnp.maximum(f, PREDICTION_FLOOR), sigma, sigma_add)
        g_y = self.g(y)
        return norm.logpdf(g_y, centre, sd) + self.log_jacobian(g_y)

    def log_censored(self, lloq, f, sigma, sigma_add=0.0):
        """Log probability that a measurement lies below ``lloq`` given predictions ``f`` (M3)."""
        centre, sd = self.scale(jnp.maximum(f, PREDICTION_FLOOR), sigma, sigma_add)
        return log_normal_cdf((self.g(lloq) - centre) / sd)

    def log_likelihood(self, y, f, blq, lloq, sigma, sigma_add=0.0):
        """Pointwise log-likelihood; ``blq`` marks censored records, whose term is log P(y < lloq)
        (``y`` is ignored there and may be NaN). All arrays share one shape."""
        safe_y = jnp.where(blq, 1.0, y)  # keep NaN out of the unused branch (its gradient too)
        # the unused censored term of a measured record sits at its median (u = 0), where log Phi and its
        # derivatives of every order are finite (far in the tail, its second derivative underflows to NaN)
        safe_lloq = jnp.where(blq, lloq, self.g_inverse(self.scale(jnp.maximum(f, PREDICTION_FLOOR), sigma,
                                                                   sigma_add)[0]))
        return jnp.where(blq, self.log_censored(safe_lloq, f, sigma, sigma_add),
                         self.log_density(safe_y, f, sigma, sigma_add))

    def sample(self, key, f, sigma, sigma_add=0.0):
        """Draw measurements around predictions ``f`` (for predictive checks)."""
        centre, sd = self.scale(jnp.maximum(f, PREDICTION_FLOOR), sigma, sigma_add)
        return self.g_inverse(centre + sd * jax.random.normal(key, jnp.shape(f)))

    def residual(self, y, f, sigma, sigma_add=0.0) -> np.ndarray:
        """Individual weighted residuals (IWRES) of measurements ``y`` around predictions ``f``."""
        f = jnp.maximum(jnp.asarray(f, dtype=float), PREDICTION_FLOOR)
        centre, sd = self.scale(f, sigma, sigma_add)
        return np.asarray((self.g(jnp.asarray(y, dtype=float)) - centre) / sd)

    def default_priors(self, typical_measurement: float) -> dict:
        """Priors of this model's SDs, keyed "sigma" (and "sigma_add"); ``typical_measurement`` is the
        median measured value, the scale of an additive SD."""
        priors = {"sigma": dist.HalfNormal(SIGMA_PRIOR_SCALE)}
        if self.has_additive:
            priors["sigma_add"] = dist.HalfNormal(typical_measurement)
        return priors


@final
class LogAdditive(ErrorModel):
    """log y ~ Normal(log f, sigma): y log-normal around f; the usual model of qPCR transgene levels
    (Stein et al. 2019 used it, sigma 0.56)."""

    name = "log-additive"
    sigma_meaning = "log-scale residual SD"

    def scale(self, f, sigma, sigma_add):
        return jnp.log(f), sigma + 0.0 * f

    def g(self, y):
        return jnp.log(jnp.maximum(y, PREDICTION_FLOOR))

    def g_inverse(self, z):
        return jnp.exp(z)

    def log_jacobian(self, g_y):
        return -g_y


@final
class Proportional(ErrorModel):
    """y ~ Normal(f, sigma * f)."""

    name = "proportional"
    sigma_meaning = "proportional residual SD (CV)"

    def scale(self, f, sigma, sigma_add):
        return f, sigma * f


@final
class Combined(ErrorModel):
    """y ~ Normal(f, sqrt(sigma_add^2 + (sigma * f)^2))."""

    name = "combined"
    has_additive = True
    sigma_meaning = "proportional residual SD (CV)"

    def scale(self, f, sigma, sigma_add):
        return f, jnp.sqrt(sigma_add**2 + (sigma * f) ** 2)


# The functional forms take the model's name (older API, kept for scripts that call them).
def log_likelihood(kind: str, y, f, blq, lloq, sigma, sigma_add=0.0):
    """:meth:`ErrorModel.log_likelihood` of the error model named ``kind``."""
    return ErrorModel(kind).log_likelihood(y, f, blq, lloq, sigma, sigma_add)


def log_density(kind: str, y, f, sigma, sigma_add=0.0):
    """:meth:`ErrorModel.log_density` of the error model named ``kind``."""
    return ErrorModel(kind).log_density(y, f, sigma, sigma_add)


def log_censored(kind: str, lloq, f, sigma, sigma_add=0.0):
    """:meth:`ErrorModel.log_censored` of the error model named ``kind``."""
    return ErrorModel(kind).log_censored(lloq, f, sigma, sigma_add)


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
    """:meth:`ErrorModel.sample` of the error model named ``kind``."""
    return ErrorModel(kind).sample(key, f, sigma, sigma_add)


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
                raise InputError(f"assay: {k} must be a finite number >= 0, got {v!r}")
