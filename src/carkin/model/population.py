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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, final

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from carkin.errors import InputError
from carkin.model.kinetics import Model, Parameter

EFFECT_KINDS = ("power", "linear", "categorical")


# --- transforms: one per parameter, chosen by the parameter's domain -----------------------------


class Transform:
    """g and its inverse for one parameter's domain; abstract (the final subclasses below)."""

    scale: ClassVar[str]  # the name of the unconstrained scale, as shown in descriptions

    def to_unconstrained(self, value):
        raise NotImplementedError

    def from_unconstrained(self, h):
        raise NotImplementedError

    def prior(self, typical: float, sd: float):
        """A normal prior of width ``sd`` on this scale, centred on ``typical``."""
        raise NotImplementedError


@final
class LogTransform(Transform):
    """Positive parameters: log-normal between-subject variability."""

    scale = "log"

    def to_unconstrained(self, value):
        return jnp.log(value)

    def from_unconstrained(self, h):
        return jnp.exp(h)

    def prior(self, typical, sd):
        return dist.LogNormal(math.log(typical), sd)


@final
class LogitTransform(Transform):
    """Fractions in (0, 1): logit-normal between-subject variability."""

    scale = "logit"

    def to_unconstrained(self, value):
        value = jnp.asarray(value)
        return jnp.log(value) - jnp.log1p(-value)

    def from_unconstrained(self, h):
        return jax.nn.sigmoid(h)

    def prior(self, typical, sd):
        return dist.TransformedDistribution(dist.Normal(math.log(typical) - math.log1p(-typical), sd),
                                            dist.transforms.SigmoidTransform())


@final
class IdentityTransform(Transform):
    """Real parameters: normal between-subject variability."""

    scale = "natural"

    def to_unconstrained(self, value):
        return jnp.asarray(value)

    def from_unconstrained(self, h):
        return h

    def prior(self, typical, sd):
        return dist.Normal(typical, sd)


TRANSFORMS: dict[str, Transform] = {"positive": LogTransform(), "fraction": LogitTransform(),
                                    "real": IdentityTransform()}


def transform_of(parameter: Parameter) -> Transform:
    """The transform of a model parameter, from its declared domain."""
    return TRANSFORMS[parameter.kind]


# --- site names: the one owner of the names the sampler, the DataTree and every reader share -----

Z_SITE = "z"  # (subject, random parameter) standardised random effects
CENTRED_SITE = "h_centred"  # sampled site of the random effects when some are centred
_OMEGA, _SIGMA, _SIGMA_ADD, _BETA, _ETA, _IND = "omega_", "sigma_", "sigma_add_", "beta_", "eta_", "ind_"


def omega_site(parameter: str) -> str:
    """Between-subject SD of ``parameter`` (on its transform's scale)."""
    return _OMEGA + parameter


def sigma_site(observable: str) -> str:
    """Residual SD (log-scale or proportional) of ``observable``."""
    return _SIGMA + observable


def sigma_add_site(observable: str) -> str:
    """Additive residual SD of ``observable`` (combined error)."""
    return _SIGMA_ADD + observable


def effect_site(parameter: str, covariate: str, level: str | None = None) -> str:
    """Coefficient of a covariate effect (one per non-reference level of a categorical covariate)."""
    return f"{_BETA}{parameter}_{covariate}" + (f"_{level}" if level is not None else "")


def eta_variable(parameter: str) -> str:
    """Individual estimate of the random effect of ``parameter`` (omega * z)."""
    return _ETA + parameter


def individual_variable(parameter: str) -> str:
    """Individual estimate of ``parameter``'s value."""
    return _IND + parameter


def parameter_of_omega(site: str) -> str | None:
    """The parameter an ``omega_*`` site belongs to, or None for any other site."""
    return site[len(_OMEGA):] if site.startswith(_OMEGA) else None


# --- the population model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """Typical values, between-subject variability and covariate effects of a model's parameters.

    ``estimated`` parameters take their typical value from the population sites (``theta_pop``,
    keyed by parameter name); the others stay at the model's values. ``random`` (a subset of
    ``estimated``) have a random effect, ``omega_site(name)`` its SD. ``columns`` are the
    covariate-effect coefficients. The one implementation of

        g(theta_i) = g(theta_pop) + sum_c beta_c x_ic + omega * eta_i

    used by simulation, fitting, individual estimates and what-ifs alike."""

    model: Model
    estimated: tuple[str, ...]
    random: tuple[str, ...]
    columns: tuple = ()  # EffectColumn per covariate-effect coefficient

    def __post_init__(self):
        names = self.model.parameter_names
        for group, chosen in (("estimated", self.estimated), ("random", self.random)):
            bad = [n for n in chosen if n not in names]
            if bad:
                raise InputError(f"population of {self.model.name!r}: {group} parameter(s) {bad} are not in the "
                                 f"model; its parameters are {list(names)}")
        stray = [n for n in self.random if n not in self.estimated]
        if stray:
            raise InputError(f"population of {self.model.name!r}: random parameter(s) {stray} must be estimated too")

    @classmethod
    def of(cls, model: Model) -> Population:
        """Every parameter at its typical value with its own random effect (SD 0 where the model
        gives none): the structure virtual populations are drawn from."""
        names = model.parameter_names
        return cls(model, names, names)

    def model_sites(self, model: Model | None = None) -> dict:
        """Population sites from a model's typical values and omegas (default: this population's model)."""
        model = model or self.model
        typ = dict(model.values)
        sites = {n: typ[n] for n in self.estimated}
        sites.update({omega_site(n): model.parameter(n).omega for n in self.random})
        return sites

    def typical_unconstrained(self, theta_pop: Mapping, x_row, name: str):
        """g(typical value) of ``name`` for a subject with covariate-effect row ``x_row``: the centre of
        that subject's random effect."""
        h = transform_of(self.model.parameter(name)).to_unconstrained(theta_pop[name])
        for c, col in enumerate(self.columns):
            if col.parameter == name:
                h = h + theta_pop[col.name] * x_row[..., c]
        return h

    def individual(self, theta_pop: Mapping, eta, x_row=None):
        """Every model parameter of one subject, (..., P) in the model's order.

        ``eta`` (..., R) are standardised random effects, one per ``random`` parameter;
        ``x_row`` (..., C) the subject's covariate-effect columns. Leading axes broadcast, so
        a batch of subjects (or of posterior draws) needs no vmap."""
        eta = jnp.asarray(eta)
        batch = eta.shape[:-1]
        typ = dict(self.model.values)
        values = []
        for name in self.model.parameter_names:
            if name not in self.estimated:
                values.append(jnp.broadcast_to(jnp.asarray(typ[name], eta.dtype), batch))
                continue
            h = self.typical_unconstrained(theta_pop, x_row, name)
            if name in self.random:
                h = h + theta_pop[omega_site(name)] * eta[..., self.random.index(name)]
            values.append(jnp.broadcast_to(transform_of(self.model.parameter(name)).from_unconstrained(h), batch))
        return jnp.stack(values, axis=-1)

    def fraction_mask(self) -> np.ndarray:
        """(P,) True where the parameter is a fraction (its value must stay inside (0, 1))."""
        return np.array([p.kind == "fraction" for p in self.model.parameters])


def covariate_table(model: Model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Typical values, log-SDs, lower and upper bounds of the model's covariates."""
    cs = model.covariates
    return (
        np.array([c.typical for c in cs]),
        np.array([c.log_sd for c in cs]),
        np.array([c.bounds[0] for c in cs]),
        np.array([c.bounds[1] for c in cs]),
    )


def site_arrays(model: Model) -> tuple[np.ndarray, np.ndarray]:
    """Typical values and omegas of a model as arrays in its parameter order (compiled code takes these
    as inputs, so new values never recompile)."""
    return np.array([v for _, v in model.values]), np.array([p.omega for p in model.parameters])


def draw_subject(key, index, population: Population, typ, omega, cov_typ, cov_sd, cov_lo, cov_hi,
                 variability: bool):
    """One virtual subject's parameters and sampled covariates (before user overrides): standard-normal
    draws from ``fold_in(key, index)`` through :meth:`Population.individual` of ``Population.of(model)``."""
    k_eta, k_cov = jax.random.split(jax.random.fold_in(key, index))
    scale = 1.0 if variability else 0.0
    eta = scale * jax.random.normal(k_eta, typ.shape, typ.dtype)
    names = population.model.parameter_names
    theta_pop = {**dict(zip(names, typ)), **{omega_site(n): omega[j] for j, n in enumerate(names)}}
    theta = population.individual(theta_pop, eta)
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
            raise InputError(
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
            raise InputError(
                f"{source}: covariate effect on {eff.parameter!r} needs column {eff.covariate!r}, "
                f"which the dataset does not have (its covariates: {sorted(covariates)})"
            )
        x = np.asarray(covariates[eff.covariate])
        if eff.kind == "categorical":
            levels = [str(v) for v in x]
            values, counts = np.unique(levels, return_counts=True)
            ref: str | float = str(eff.reference) if eff.reference is not None else str(values[np.argmax(counts)])
            if ref not in values:
                raise InputError(f"{source}: reference level {ref!r} of {eff.covariate} is not in the data "
                                 f"(levels: {list(values)})")
            for level in values:
                if level != ref:
                    cols.append(EffectColumn(effect_site(eff.parameter, eff.covariate, level), eff.parameter,
                                             f"effect of {eff.covariate}={level} (vs {ref}) on {eff.parameter}"))
                    xs.append(np.array([lv == level for lv in levels], float))
            continue
        try:
            x = x.astype(float)
        except ValueError:
            raise InputError(f"{source}: covariate {eff.covariate} must be numeric for a {eff.kind} effect; "
                             "use kind='categorical' for text values") from None
        bad = ~np.isfinite(x) | ((x <= 0) if eff.kind == "power" else False)
        if bad.any():
            raise InputError(f"{source}: covariate {eff.covariate} is missing or invalid for "
                             f"{int(bad.sum())} subject(s) (a {eff.kind} effect needs "
                             f"{'positive ' if eff.kind == 'power' else ''}values for every subject)")
        ref = float(eff.reference) if eff.reference is not None else float(np.median(x))
        if eff.kind == "power":
            xs.append(np.log(x / ref))
            desc = f"power of {eff.covariate}/{ref:g} on {eff.parameter}"
        else:
            xs.append(x - ref)
            desc = f"log-linear effect of ({eff.covariate} - {ref:g}) on {eff.parameter}"
        cols.append(EffectColumn(effect_site(eff.parameter, eff.covariate), eff.parameter, desc))
    matrix = np.stack(xs, axis=1) if xs else np.zeros((n, 0))
    return cols, matrix
