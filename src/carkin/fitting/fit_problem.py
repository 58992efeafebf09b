"""The population problem of a fit: model, design, population structure, error models and priors; its
NumPyro model and log-likelihood.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from carkin.errors import InputError, InputTypeError
from carkin.fitting.data import StudyData
from carkin.fitting.fit_design import FitDesign, build_design
from carkin.fitting.predictions import predict_grid
from carkin.model.kinetics import Model
from carkin.model.observation import ErrorModel
from carkin.model.population import (
    CENTRED_SITE,
    Z_SITE,
    CovariateEffect,
    Population,
    effect_columns,
    omega_site,
    sigma_add_site,
    sigma_site,
    transform_of,
)

PRIOR_LOG_SD = 1.0  # default prior of a typical value: a factor e either way on its log/logit scale
OMEGA_PRIOR_FACTOR = 2.0  # default omega prior: HalfNormal(2 x the model's omega)
OMEGA_PRIOR_DEFAULT = 1.0  # ... or HalfNormal(1) where the model gives none
# ODE gradients run in forward mode up to this many estimated parameters (measured: benchmarks/README.md)
FORWARD_MODE_MAX_PARAMETERS = 4


# --- the population model --------------------------------------------------------------------


@dataclass(frozen=True)
class FitProblem:
    """A model, a design and the population structure: everything the log density needs.

    ``estimated`` are the parameters with a population typical value to estimate;
    ``random`` those of them with between-subject variability; the others stay at
    ``model``'s values.
    """

    model: Model
    design: FitDesign
    estimated: tuple[str, ...]
    random: tuple[str, ...]
    columns: tuple  # EffectColumn per covariate-effect coefficient
    x: np.ndarray  # (S, n_columns) covariate-effect design matrix
    errors: dict  # observable -> ErrorModel
    priors: dict  # site name -> numpyro distribution
    site_meta: dict = field(default_factory=dict)  # site -> (units, long_name)
    centred: tuple[str, ...] = ()  # random parameters sampled centred (see _standardised_effects)
    engine: str = "auto"  # how ODE predictions are solved under forward mode (carkin.fitting.predictions)

    # -- structure ------------------------------------------------------------------
    @property
    def population(self) -> Population:
        return Population(self.model, self.estimated, self.random, self.columns)

    def subject_parameters(self, params: dict, x_row, z_row):
        """(P,) values of every model parameter for one subject with covariate-effect row ``x_row``
        and standardised random effects ``z_row`` (one per ``random`` parameter)."""
        return self.population.individual(params, z_row, x_row)

    @property
    def forward_mode_parameters(self):
        """Indices of the estimated parameters when an ODE solve's gradient is cheaper in forward
        mode over them (at most FORWARD_MODE_MAX_PARAMETERS of them); None for reverse mode."""
        if len(self.estimated) > FORWARD_MODE_MAX_PARAMETERS:
            return None
        return tuple(self.model.parameter_names.index(n) for n in self.estimated)

    def individual(self, params: dict):
        """(S, P) individual values of every model parameter from the sampled sites."""
        S = self.design.n_subjects
        z = params[Z_SITE] if self.random else jnp.zeros((S, 0))
        x = np.asarray(self.x, float).reshape(S, -1)  # (S, 0) when there are no covariate effects
        return self.population.individual(params, z, x)

    def predictions(self, theta):
        """Individual predictions at every observation (N,) and an all-solves-ok flag."""
        d = self.design
        f, ok = predict_grid(self.model, d.observables, d.times, d.dose_times, d.dose_cells, theta,
                             d.model_covariates, self.forward_mode_parameters, self.engine)
        return f[d.obs_subject, d.obs_kind, d.obs_tindex], jnp.all(ok)

    def pointwise_log_likelihood(self, params: dict, f, obs=None, kind=None):
        """Log-likelihood of each observation; ``obs`` = (y, blq, lloq) replaces the design's own
        measurements (same design, other data: batches of simulated datasets), and ``kind``
        the observable index of each (observations regrouped, as per subject)."""
        d = self.design
        y, blq, lloq = (d.y, d.blq, d.lloq) if obs is None else obs
        kind = d.obs_kind if kind is None else kind
        ll = None
        for k, name in enumerate(d.observables):
            err = self.errors[name]
            add = params.get(sigma_add_site(name), 0.0)
            term = err.log_likelihood(y, f, blq, lloq, params[sigma_site(name)], add)
            # elementwise selection, not a scatter: fewer kernels in the sampler's gradient
            ll = term if ll is None else jnp.where(kind == k, term, ll)
        return ll

    def log_likelihood(self, params: dict, theta):
        """Summed log-likelihood of the design's own measurements given individual parameters
        ``theta``, and the all-solves-ok flag. Which records are censored is known here, so each
        record gets only its own term: the censored term's log-CDF is costly, and computing both terms
        for every record (as a selection must) made the Stein gradient about 1.5x slower."""
        d = self.design
        grid, ok = predict_grid(self.model, d.observables, d.times, d.dose_times, d.dose_cells, theta,
                                d.model_covariates, self.forward_mode_parameters, self.engine)
        groups = [(k, censored, np.flatnonzero((d.obs_kind == k) & (d.blq == censored)))
                  for k in range(len(d.observables)) for censored in (False, True)]
        order = np.concatenate([rows for *_, rows in groups])
        f = grid[d.obs_subject[order], d.obs_kind[order], d.obs_tindex[order]]  # one gather, then slices
        total, start = 0.0, 0
        for k, censored, rows in groups:
            name = d.observables[k]
            err, sigma, add = self.errors[name], params[sigma_site(name)], params.get(sigma_add_site(name), 0.0)
            part = f[start:start + rows.size]
            start += rows.size
            if rows.size == 0:
                continue
            if censored:
                total = total + err.log_censored(d.lloq[rows], part, sigma, add).sum()
            else:
                total = total + err.log_density(d.y[rows], part, sigma, add).sum()
        return total, jnp.all(ok)

    def sample_measurements(self, params: dict, f, key):
        """Measurements around predictions ``f`` with each observable's residual error (uncensored)."""
        d = self.design
        y = jnp.zeros_like(f)
        for j, name in enumerate(d.observables):
            idx = np.flatnonzero(d.obs_kind == j)
            y = y.at[idx].set(self.errors[name].sample(jax.random.fold_in(key, j), f[idx], params[sigma_site(name)],
                                                       params.get(sigma_add_site(name), 0.0)))
        return y

    def numpyro_model(self, obs=None):
        params = {site: numpyro.sample(site, prior) for site, prior in self.priors.items()}
        if self.random:
            params[Z_SITE] = self._standardised_effects(params)
        total, ok = self._data_term(params, obs)
        # A failed solve rejects the point (the sampler counts a divergence) rather than crashing the run;
        # a non-finite term makes the sum non-finite, so one scalar check covers every observation.
        numpyro.factor("log_likelihood", jnp.where(ok & jnp.isfinite(total), total, -jnp.inf))

    @functools.cached_property
    def _data_term(self):
        """(log-likelihood of the data, all-solves-ok) from the sampled sites, compiled as one program.
        Inside a sampler's compiled step it is inlined; NumPyro's set-up runs the model op by op, where
        this is one compile instead of hundreds of tiny ones (measured: the start of a cd7_cart NUTS fit
        24.8 -> 16.3 s on one core, an SVI fit of six Stein subjects 21.2 -> 16.2 s on two)."""

        def term(params, obs):
            theta = self.individual(params)
            if obs is None:
                return self.log_likelihood(params, theta)
            f, ok = self.predictions(theta)
            return self.pointwise_log_likelihood(params, f, obs).sum(), ok

        return jax.jit(term)

    def _standardised_effects(self, params: dict):
        """Sample the (S, R) standardised random effects z.

        Non-centred (the default): z itself is sampled, which mixes well when the data say
        little about each subject. A centred parameter samples the subject's unconstrained
        value h ~ Normal(typical, omega) instead, and z = (h - typical) / omega: better when
        every subject's value is well determined, where the non-centred typical value and
        all the z's move along one narrow ridge.
        """
        R = len(self.random)
        with numpyro.plate("subject", self.design.n_subjects):
            if not self.centred:
                return numpyro.sample(Z_SITE, dist.Normal(0.0, 1.0).expand([R]).to_event(1))
            x = np.asarray(self.x, float).reshape(self.design.n_subjects, -1)
            typical = jnp.stack([self.population.typical_unconstrained(params, x, n) for n in self.random], axis=-1)
            centred = np.array([n in self.centred for n in self.random])
            omega = jnp.stack([params[omega_site(n)] for n in self.random])
            loc = jnp.where(centred, typical, 0.0)
            scale = jnp.where(centred, omega, 1.0)
            raw = numpyro.sample(CENTRED_SITE, dist.Normal(loc, scale).to_event(1))
        return numpyro.deterministic(Z_SITE, (raw - loc) / scale)

    def centred_value(self, params: dict, z):
        """The sampled site's value (CENTRED_SITE) for standardised random effects ``z`` (S, R): the
        centred parameters' unconstrained individual values, the others' z (a start for NUTS)."""
        x = np.asarray(self.x, float).reshape(self.design.n_subjects, -1)
        typical = np.stack([np.asarray(self.population.typical_unconstrained(params, x, n)) * np.ones(len(x))
                            for n in self.random], axis=-1)
        centred = np.array([n in self.centred for n in self.random])
        omega = np.array([float(params[omega_site(n)]) for n in self.random])
        return np.where(centred, typical + omega * np.asarray(z), np.asarray(z))


def default_priors(model: Model, estimated, random, columns, errors, design: FitDesign, overrides: dict):
    """Priors built from the model's parameter table; ``overrides`` (site -> distribution) win."""
    priors, meta = {}, {}
    for name in estimated:
        p = model.parameter(name)
        priors[name] = transform_of(p).prior(dict(model.values)[name], PRIOR_LOG_SD)
        meta[name] = (p.unit, f"typical value of {p.description}")
    for name in random:
        p = model.parameter(name)
        scale = OMEGA_PRIOR_FACTOR * p.omega if p.omega > 0 else OMEGA_PRIOR_DEFAULT
        priors[omega_site(name)] = dist.HalfNormal(scale)
        meta[omega_site(name)] = ("1", f"between-subject SD of {name} ({transform_of(p).scale} scale)")
    for col in columns:
        priors[col.name] = dist.Normal(0.0, 1.0)
        meta[col.name] = ("1", col.description)
    units = {o.name: o.unit for o in model.observables}
    for k, name in enumerate(design.observables):
        err = errors[name]
        y = design.y[(design.obs_kind == k) & ~design.blq]
        own = err.default_priors(float(np.nanmedian(y)) if y.size else 1.0)
        priors[sigma_site(name)] = own["sigma"]
        meta[sigma_site(name)] = ("1", f"{err.sigma_meaning} of {name}")
        if "sigma_add" in own:
            priors[sigma_add_site(name)] = own["sigma_add"]
            meta[sigma_add_site(name)] = (units[name], f"additive residual SD of {name}")
    unknown = sorted(set(overrides) - set(priors))
    if unknown:
        raise InputError(f"priors given for unknown site(s) {unknown}; the model's sites are {sorted(priors)}")
    priors.update(overrides)
    return priors, meta


def make_problem(model: Model, data: StudyData, *, estimate=None, fixed=None, variability=None,
                 covariate_effects=(), error=None, priors=None, centred=()) -> FitProblem:
    """Assemble the population problem, checking every name against the model and the data."""
    if not isinstance(model, Model):
        raise InputTypeError(f"model must be a carkin model (see carkin.load_model), got {type(model).__name__}")
    pnames = model.parameter_names
    fixed = dict(fixed or {})
    for group, names in (("estimate", estimate or ()), ("fixed", fixed), ("variability", variability or ())):
        bad = sorted(set(names) - set(pnames))
        if bad:
            raise InputError(f"{group}: model {model.name!r} has no parameter(s) {bad}; its parameters are "
                             f"{list(pnames)}")
    if fixed:
        model = model.with_values(**fixed)
    estimated = tuple(n for n in pnames if (n in estimate if estimate is not None else n not in fixed))
    clash = sorted(set(estimated) & set(fixed))
    if clash:
        raise InputError(f"parameter(s) {clash} are both estimated and fixed; choose one")
    if not estimated:
        raise InputError("nothing to estimate: every parameter is fixed")
    if variability is None:
        random = tuple(n for n in estimated if model.parameter(n).omega > 0)
    else:
        stray = sorted(set(variability) - set(estimated))
        if stray:
            raise InputError(f"variability on {stray} needs them estimated too (add them to estimate)")
        random = tuple(n for n in estimated if n in variability)
    centred = (centred,) if isinstance(centred, str) else tuple(centred)
    stray = sorted(set(centred) - set(random))
    if stray:
        raise InputError(f"centred: {stray} have no between-subject variability; only parameters with "
                         f"variability can be centred ({list(random)})")
    design = build_design(model, data)
    scales = {n: spec.scale for n, spec in data.observables.items()}
    if isinstance(error, dict):
        stray = sorted(set(error) - set(design.observables))
        if stray:
            raise InputError(f"error: {stray} are not observables of this dataset; its observables are "
                             f"{list(design.observables)}")
    errors = {}
    for name in design.observables:
        given = (error or {}).get(name) if isinstance(error, dict) else error
        default = "log-additive" if scales.get(name, "log") == "log" else "combined"
        errors[name] = given if isinstance(given, ErrorModel) else ErrorModel(given or default)
    effects = tuple(e if isinstance(e, CovariateEffect) else CovariateEffect(*e) for e in covariate_effects)
    for e in effects:
        if e.parameter not in estimated:
            raise InputError(f"covariate effect on {e.parameter!r}: that parameter is not estimated")
    columns, x = effect_columns(effects, data.covariates, data.path)
    prior_table, meta = default_priors(model, estimated, random, columns, errors, design, dict(priors or {}))
    return FitProblem(model, design, estimated, random, tuple(columns), x, errors, prior_table, meta,
                      tuple(n for n in random if n in centred))
