"""Virtual populations: between-subject variability and covariates, reproducible per subject.

Each subject's random draws come from ``fold_in(key, subject_index)``, so a
subject's parameters depend only on the seed and its index: the same whatever
the chunk size, device count or regimen list.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from carkin.kinetics import Model

_KIND_CODE = {"positive": 0, "fraction": 1, "real": 2}


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


def individual_parameters(typ, omega, kinds, eta):
    """theta_i from typical values and standard-normal draws ``eta`` (log/logit/identity scale)."""
    z = omega * eta
    pos = typ * jnp.exp(z)
    logit = jnp.log(typ) - jnp.log1p(-typ)
    frac = jax.nn.sigmoid(jnp.where(kinds == 1, logit, 0.0) + z)
    return jnp.where(kinds == 0, pos, jnp.where(kinds == 1, frac, typ + z))


def draw_subject(key, index, typ, omega, kinds, cov_typ, cov_sd, cov_lo, cov_hi, variability: bool):
    """One subject's parameters and sampled covariates (before user overrides)."""
    k_eta, k_cov = jax.random.split(jax.random.fold_in(key, index))
    scale = 1.0 if variability else 0.0
    eta = scale * jax.random.normal(k_eta, typ.shape, typ.dtype)
    theta = individual_parameters(typ, omega, kinds, eta)
    zc = scale * jax.random.normal(k_cov, cov_typ.shape, cov_typ.dtype)
    cov = jnp.clip(cov_typ * jnp.exp(cov_sd * zc), cov_lo, cov_hi)
    return theta, cov
