"""Virtual populations and population-model structure: variability and covariate effects.

Simulation: each subject's random draws come from ``fold_in(key, subject_index)``,
so a subject's parameters depend only on the seed and its index: the same whatever
the chunk size, device count or regimen list.

Fitting: a parameter's individual value is

    g(theta_i) = g(theta_pop) + sum_c beta_c x_ic + omega * z_i,     z_i ~ Normal(0, 1)

with g = log for positive parameters, logit for fractions and the identity for
real ones (non-centred), and x_ic the covariate-effect columns built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from carkin.kinetics import Model

_KIND_CODE = {"positive": 0, "fraction": 1, "real": 2}
EFFECT_KINDS = ("power", "linear", "categorical")


def parameter_table(model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Typical values, omegas and kind codes as arrays in the model's parameter order."""
    typ = np.array([v for _, v in model.values])
    omega = np.array([p.omega for p in model.parameters])
    kinds = np.array([_KIND_CODE[p.kind] for p in model.parameters])
    return typ, omega, kinds


def covariate_table(model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Typical values, log-SDs, lower and upper bounds of the model's covariates."""
    cs = model.covariates
    return (
        np.array([c.typical for c in cs]),
        np.array([c.log_sd for c in cs]),
        np.array([c.bounds[0] for c in cs]),
        np.array([c.bounds[1] for c in cs]),
    )


def to_unconstrained(value, kind_code):
    """g(theta): log for positive, logit for fractions, identity for real parameters."""
    value = jnp.asarray(value)
    safe = jnp.where(kind_code == 2, 0.5, value)
    return jnp.where(kind_code == 0, jnp.log(jnp.where(kind_code == 0, safe, 1.0)),
                     jnp.where(kind_code == 1, jnp.log(safe) - jnp.log1p(-jnp.where(kind_code == 1, safe, 0.5)),
                               value))


def from_unconstrained(h, kind_code):
    """The inverse of :func:`to_unconstrained`."""
    return jnp.where(kind_code == 0, jnp.exp(h), jnp.where(kind_code == 1, jax.nn.sigmoid(h), h))


def individual_parameters(typ, omega, kinds, eta):
    """theta_i from typical values and standard-normal draws ``eta`` (log/logit/identity scale)."""
    return from_unconstrained(to_unconstrained(typ, kinds) + omega * eta, kinds)


def draw_subject(key, index, typ, omega, kinds, cov_typ, cov_sd, cov_lo, cov_hi, variability: bool):
    """One subject's parameters and sampled covariates (before user overrides)."""
    k_eta, k_cov = jax.random.split(jax.random.fold_in(key, index))
    scale = 1.0 if variability else 0.0
    eta = scale * jax.random.normal(k_eta, typ.shape, typ.dtype)
    theta = individual_parameters(typ, omega, kinds, eta)
    zc = scale * jax.random.normal(k_cov, cov_typ.shape, cov_typ.dtype)
    cov = jnp.clip(cov_typ * jnp.exp(cov_sd * zc), cov_lo, cov_hi)
    return theta, cov


@dataclass(frozen=True)
class CovariateEffect:
    """A covariate effect on one parameter, on the parameter's log/logit scale.

    - ``power``: theta * (X / reference)^beta (e.g. weight on a volume);
      reference defaults to the median of X.
    - ``linear``: theta * exp(beta * (X - reference)) (log-linear in a continuous X);
      reference defaults to the median of X.
    - ``categorical``: theta * exp(beta_level) for each level other than the
      reference (default: the most common level), e.g. product type or disease.
    """

    parameter: str
    covariate: str
    kind: str = "power"
    reference: float | str | None = None

    def __post_init__(self):
        if self.kind not in EFFECT_KINDS:
            raise ValueError(
                f"covariate effect {self.parameter}~{self.covariate}: kind must be one of "
                f"{', '.join(EFFECT_KINDS)}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class EffectColumn:
    """One column of the covariate design matrix: its coefficient name and target parameter."""

    name: str
    parameter: str
    description: str


def effect_columns(effects, covariates: dict, source: str) -> tuple[list[EffectColumn], np.ndarray]:
    """The columns x_ic of every covariate effect, from per-subject covariate values.

    ``covariates`` maps a covariate name to one value per subject. Returns the
    columns' metadata and an (n_subjects, n_columns) float matrix.
    """
    cols, xs = [], []
    n = len(next(iter(covariates.values()))) if covariates else 0
    for eff in effects:
        if eff.covariate not in covariates:
            raise ValueError(
                f"{source}: covariate effect on {eff.parameter!r} needs column {eff.covariate!r}, "
                f"which the dataset does not have (its covariates: {sorted(covariates)})"
            )
        x = np.asarray(covariates[eff.covariate])
        if eff.kind == "categorical":
            levels = [str(v) for v in x]
            values, counts = np.unique(levels, return_counts=True)
            ref = str(eff.reference) if eff.reference is not None else str(values[np.argmax(counts)])
            if ref not in values:
                raise ValueError(f"{source}: reference level {ref!r} of {eff.covariate} is not in the data "
                                 f"(levels: {list(values)})")
            for level in values:
                if level != ref:
                    cols.append(EffectColumn(f"beta_{eff.parameter}_{eff.covariate}_{level}", eff.parameter,
                                             f"effect of {eff.covariate}={level} (vs {ref}) on {eff.parameter}"))
                    xs.append(np.array([lv == level for lv in levels], float))
            continue
        try:
            x = x.astype(float)
        except ValueError:
            raise ValueError(f"{source}: covariate {eff.covariate} must be numeric for a {eff.kind} effect; "
                             "use kind='categorical' for text values") from None
        bad = ~np.isfinite(x) | ((x <= 0) if eff.kind == "power" else False)
        if bad.any():
            raise ValueError(f"{source}: covariate {eff.covariate} is missing or invalid for "
                             f"{int(bad.sum())} subject(s) (a {eff.kind} effect needs "
                             f"{'positive ' if eff.kind == 'power' else ''}values for every subject)")
        ref = float(eff.reference) if eff.reference is not None else float(np.median(x))
        if eff.kind == "power":
            xs.append(np.log(x / ref))
            desc = f"power of {eff.covariate}/{ref:g} on {eff.parameter}"
        else:
            xs.append(x - ref)
            desc = f"log-linear effect of ({eff.covariate} - {ref:g}) on {eff.parameter}"
        cols.append(EffectColumn(f"beta_{eff.parameter}_{eff.covariate}", eff.parameter, desc))
    matrix = np.stack(xs, axis=1) if xs else np.zeros((n, 0))
    return cols, matrix
