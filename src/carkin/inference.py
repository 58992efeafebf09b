"""Population fitting: a hierarchical NumPyro model of a carkin model and a dataset; ``fit``.

    data --Design--> per-subject time grids, doses, covariates
    (theta_pop, omega, beta, z) --population--> individual parameters
    --solve (closed form where the model has one, else the piecewise ODE)--> predictions
    --error model, censored where BLQ--> log-likelihood --NUTS / SVI--> DataTree

The returned ``xarray.DataTree`` follows ArviZ's groups (posterior, sample_stats,
log_likelihood, posterior_predictive, observed_data, constant_data), with
``(chain, draw)`` first, named dims and units on every variable.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import xarray as xr

from carkin.data import StudyData
from carkin.errors import CarkinError, InputError, InputTypeError
from carkin.guards import check_memory, check_seed
from carkin.kinetics import Model
from carkin.observation import ErrorModel
from carkin.population import (
    CENTRED_SITE,
    Z_SITE,
    CovariateEffect,
    Population,
    effect_columns,
    eta_variable,
    individual_variable,
    omega_site,
    sigma_add_site,
    sigma_site,
    transform_of,
)
from carkin.samplers import NUTS, SVI, from_arguments
from carkin.solve import solve_subject

PRIOR_LOG_SD = 1.0  # default prior of a typical value: a factor e either way on its log/logit scale
OMEGA_PRIOR_FACTOR = 2.0  # default omega prior: HalfNormal(2 x the model's omega)
OMEGA_PRIOR_DEFAULT = 1.0  # ... or HalfNormal(1) where the model gives none
RHAT_MAX = 1.01
ESS_PER_CHAIN_MIN = 100
TREE_DEPTH_SATURATION_MAX = 0.01  # fraction of draws allowed to hit the maximal tree depth
DRAW_BATCH = 64  # posterior draws per compiled batch when computing predictions
SVI_STEP_SIZE = 0.01
SVI_INIT_SCALE = 0.05
# ODE gradients run in forward mode up to this many estimated parameters (measured: benchmarks/README.md)
FORWARD_MODE_MAX_PARAMETERS = 4
SVI_DRIFT_MAX = 0.01  # relative change of the loss over the last tenth of the steps that counts as converged


class FitWarning(UserWarning):
    """A sampler diagnostic is off (divergences, R-hat, ESS, tree depth)."""


# Per-draw, per-observation arrays a fit keeps (4, counted in a Stein fit's DataTree), each held twice at the
# peak while it is built (device buffer and host copy): a 200,000-row SVI fit was seen to reach 11.5 GB.
FIT_ARRAYS_PER_OBS = 2 * 4


class FitError(CarkinError, RuntimeError):
    """The fit itself failed numerically (not a problem with the arguments)."""


NO_START = ("no starting point with a finite log density was found (every solve failed or the data are impossible "
            "under the priors); check the data, fix parameters the data cannot identify, or set priors nearer the "
            "data")


class ModelDataError(InputError):
    """The dataset does not fit the model (unknown observable, missing covariate...)."""


# --- the design: what the likelihood needs from the data, as padded arrays -------------------


@dataclass(frozen=True)
class Design:
    """Per-subject time grids and doses, and per-observation indices into them."""

    times: np.ndarray  # (S, T) sorted unique observation times, padded with the last one
    dose_times: np.ndarray  # (S, D)
    dose_cells: np.ndarray  # (S, D)
    model_covariates: np.ndarray  # (S, C) values of the model's covariates (WT, BLAST...)
    obs_subject: np.ndarray  # (N,)
    obs_tindex: np.ndarray  # (N,)
    obs_kind: np.ndarray  # (N,) index into ``observables``
    observables: tuple[str, ...]
    y: np.ndarray  # (N,) natural units; NaN where BLQ without value
    blq: np.ndarray  # (N,)
    lloq: np.ndarray  # (N,)
    ids: tuple = ()  # subject IDs as in the data

    @property
    def n_subjects(self) -> int:
        return self.times.shape[0]


def build_design(model: Model, data: StudyData) -> Design:
    """Map the dataset onto the model: observables by name, model covariates by column."""
    names = [o.name for o in model.observables]
    obs_names = np.array([n if n else names[0] for n in data.obs_observable.astype(str)])
    unknown = sorted(str(n) for n in set(obs_names) - set(names))
    if unknown:
        raise ModelDataError(
            f"{data.path}: observable(s) {unknown} are not outputs of model {model.name!r} "
            f"(its observables: {', '.join(names)}); map each DVID to one of them in the sidecar"
        )
    fitted = tuple(n for n in names if n in set(obs_names))
    kind = np.array([fitted.index(n) for n in obs_names], dtype=np.int32)

    S = data.n_subjects
    # each subject's sorted unique observation times, by one sort of (subject, time) rather than a scan per subject
    pairs = np.unique(np.stack([data.obs_subject.astype(float), data.obs_time.astype(float)], axis=1), axis=0)
    per_subject = np.bincount(pairs[:, 0].astype(np.int64), minlength=S)
    T = max(1, int(per_subject.max(initial=0)))
    first = np.concatenate([[0], np.cumsum(per_subject)[:-1]])
    times = np.zeros((S, T))
    slot = np.arange(len(pairs)) - first[pairs[:, 0].astype(np.int64)]
    times[pairs[:, 0].astype(np.int64), slot] = pairs[:, 1]
    last = np.where(per_subject > 0, times[np.arange(S), np.maximum(per_subject - 1, 0)], 0.0)
    times = np.where(np.arange(T)[None, :] < per_subject[:, None], times, last[:, None])  # pad with the last time
    # index of each observation's time in its subject's grid
    row = times[data.obs_subject]
    tindex = np.argmax(row == np.asarray(data.obs_time, float)[:, None], axis=1).astype(np.int32)

    cov = np.zeros((S, len(model.covariates)))
    for j, c in enumerate(model.covariates):
        given = data.covariates.get(c.name)
        values = np.full(S, np.nan) if given is None else np.asarray(given, dtype=float)
        missing = ~(np.isfinite(values) & (values > 0))
        if missing.any():
            ids = [data.ids[i] for i in np.flatnonzero(missing)[:10]]
            warnings.warn(
                f"{data.path}: model covariate {c.name} ({c.description}) is missing for subject(s) {ids}"
                f"{' and more' if missing.sum() > 10 else ''}; the model's typical value {c.typical:g} {c.unit} "
                "is used for them", UserWarning, stacklevel=3)
            values = np.where(missing, c.typical, values)
        cov[:, j] = values

    dose_t, dose_c = data.dose_times, data.dose_cells
    if dose_t.shape[1] == 0:  # no doses anywhere: one empty infusion on day 0 keeps the shapes
        dose_t, dose_c = np.zeros((S, 1)), np.zeros((S, 1))
    return Design(times, np.asarray(dose_t, float), np.asarray(dose_c, float), cov,
                  np.asarray(data.obs_subject, np.int32), tindex, kind, fitted,
                  np.asarray(data.obs_value, float), np.asarray(data.obs_blq, bool),
                  np.asarray(data.obs_lloq, float), tuple(data.ids))


# --- predictions -------------------------------------------------------------------------------


def subject_observables(model: Model, names, times, dose_t, dose_c, theta, cov, adjoint=None):
    """Observables ``names`` of one subject at ``times``: (len(names), len(times)), and an ok flag.
    ``adjoint``: how an ODE solve is differentiated (carkin.solve.solve_subject)."""
    p = dict(zip(model.parameter_names, theta))
    c = dict(zip((cv.name for cv in model.covariates), cov))
    if model.has_closed_form:
        out, ok = model.closed_form_observables(times, p, c, dose_t, dose_c), True
    else:
        ys, ok, _ = solve_subject(model, times, dose_t, dose_c, p, c, adjoint=adjoint)
        out = model.observe(ys, p, c)
    f = jnp.stack([out[n] for n in names])
    return f, ok & jnp.all(jnp.isfinite(f))


def predict_grid(model: Model, names, times, dose_t, dose_c, theta, cov, free=None):
    """Batched :func:`subject_observables`: leading subject axis on every argument but ``names``.

    ``free`` (indices into the model's parameters) are the only parameters gradients are taken
    with respect to; ODE solves are then differentiated in forward mode over them (see
    :func:`_forward_mode_observables`). None: reverse mode through the solve."""
    one = lambda *a: subject_observables(model, names, *a)  # noqa: E731
    if free is not None and not model.has_closed_form:
        one = _forward_mode_observables(model, names, tuple(int(i) for i in free))
    args = jax.tree.map(jnp.asarray, (times, dose_t, dose_c, theta, cov))  # custom_vjp takes JAX arrays only
    return jax.vmap(one)(*args)


def _forward_mode_observables(model: Model, names, free: tuple):
    """:func:`subject_observables` whose reverse-mode gradient is computed in forward mode: the
    solve carries one tangent per parameter in ``free`` (a few, in a population fit), and the
    gradient is the Jacobian's product with the cotangent. With few parameters this costs no more
    than reverse mode's checkpointed sweep back through the solver, and it compiles in about half
    the time (benchmarks/README.md)."""
    import diffrax as dfx

    idx = np.asarray(free, int)

    def solve(times, dose_t, dose_c, theta, cov):
        f, ok = subject_observables(model, names, times, dose_t, dose_c, theta, cov, adjoint=dfx.ForwardMode())
        return f, ok.astype(theta.dtype)  # a float flag: custom_vjp outputs need cotangents

    @jax.custom_vjp
    def observables(times, dose_t, dose_c, theta, cov):
        return solve(times, dose_t, dose_c, theta, cov)

    def forward(times, dose_t, dose_c, theta, cov):
        def at(sub):
            out = solve(times, dose_t, dose_c, theta.at[idx].set(sub), cov)
            return out[0], out

        jac, out = jax.jacfwd(at, has_aux=True)(theta[idx])  # jac: (K, T, len(free))
        return out, (jac, theta, times, dose_t, dose_c, cov)

    def backward(res, ct):
        jac, theta, times, dose_t, dose_c, cov = res
        g = jnp.zeros_like(theta).at[idx].set(jnp.einsum("kt,ktf->f", ct[0], jac))
        # the design (times, doses, covariates) is data: no gradient flows to it
        return (jnp.zeros_like(times), jnp.zeros_like(dose_t), jnp.zeros_like(dose_c), g, jnp.zeros_like(cov))

    observables.defvjp(forward, backward)

    def one(times, dose_t, dose_c, theta, cov):
        f, ok = observables(times, dose_t, dose_c, theta, cov)
        return f, ok > 0.5

    return one


# --- the population model --------------------------------------------------------------------


@dataclass(frozen=True)
class FitProblem:
    """A model, a design and the population structure: everything the log density needs.

    ``estimated`` are the parameters with a population typical value to estimate;
    ``random`` those of them with between-subject variability; the others stay at
    ``model``'s values.
    """

    model: Model
    design: Design
    estimated: tuple[str, ...]
    random: tuple[str, ...]
    columns: tuple  # EffectColumn per covariate-effect coefficient
    x: np.ndarray  # (S, n_columns) covariate-effect design matrix
    errors: dict  # observable -> ErrorModel
    priors: dict  # site name -> numpyro distribution
    site_meta: dict = field(default_factory=dict)  # site -> (units, long_name)
    centred: tuple[str, ...] = ()  # random parameters sampled centred (see _standardised_effects)

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
                             d.model_covariates, self.forward_mode_parameters)
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
                                d.model_covariates, self.forward_mode_parameters)
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
        theta = self.individual(params)
        if obs is None:
            total, ok = self.log_likelihood(params, theta)
        else:
            f, ok = self.predictions(theta)
            total = self.pointwise_log_likelihood(params, f, obs).sum()
        # A failed solve rejects the point (the sampler counts a divergence) rather than crashing the run;
        # a non-finite term makes the sum non-finite, so one scalar check covers every observation.
        numpyro.factor("log_likelihood", jnp.where(ok & jnp.isfinite(total), total, -jnp.inf))

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


def default_priors(model: Model, estimated, random, columns, errors, design: Design, overrides: dict):
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


# --- fit -----------------------------------------------------------------------------------------


def fit(model: Model, data, *, estimate=None, fixed=None, variability=None, covariate_effects=(), error=None,
        priors=None, centred=(), method: str = "nuts", chains: int = 4, warmup: int = 500, samples: int = 500,
        seed: int = 0, target_accept: float = 0.8, max_tree_depth: int = 10, init: str = "median",
        svi_steps: int = 3000, svi_draws: int = 1000, progress: bool = True,
        sampler: NUTS | SVI | None = None) -> xr.DataTree:
    """Fit a population model of ``model`` to ``data`` (a StudyData or a CSV path).

    ``estimate``: parameters whose typical values are estimated (default: all not in
    ``fixed``); ``fixed``: name -> value held fixed; ``variability``: estimated
    parameters with between-subject variability (default: those the model gives an
    omega); ``covariate_effects``: CovariateEffect objects; ``error``: one error-model
    name for all observables, or observable -> name (``log-additive``, ``proportional``,
    ``combined``); ``priors``: site name -> numpyro distribution, overriding the defaults.

    ``method="nuts"`` samples the posterior (``chains``, ``warmup``, ``samples``,
    ``seed``); ``method="svi"`` fits a normal approximation of the posterior by
    stochastic variational inference (``svi_steps``) and returns ``svi_draws`` draws
    from it: a quick look, with less honest uncertainty. ``init`` is where NUTS chains
    start: ``median`` (prior medians) or ``svi`` (the variational fit's medians).
    The chains run as one compiled program split over every device (each CPU core is one),
    with the same draws however many devices there are.

    ``sampler`` (carkin.samplers.NUTS or SVI) gives all of these settings as one object; with it,
    leave ``method``, ``chains``, ``warmup``, ``samples``, ``target_accept``, ``max_tree_depth``,
    ``init``, ``svi_steps`` and ``svi_draws`` at their defaults.
    Sampler problems are reported as FitWarning with what to try.
    """
    from carkin.data import read_dataset

    if not isinstance(data, StudyData):
        data = read_dataset(data)
    given = from_arguments(method, chains, warmup, samples, target_accept, max_tree_depth, init, svi_steps,
                           svi_draws)
    if sampler is None:
        sampler = given
    elif not isinstance(sampler, (NUTS, SVI)):
        raise InputError(f"sampler must be carkin.NUTS(...) or carkin.SVI(...), got {sampler!r}")
    elif given != NUTS():
        raise InputError("give the sampler's settings either as sampler=... or as keyword arguments, not both")
    n_draws = sampler.n_draws
    # The DataTree keeps per-draw, per-observation arrays (log-likelihood, predictions, replicates) and
    # per-draw, per-subject random effects: refuse a fit whose results cannot fit in memory before it runs.
    check_memory(8.0 * n_draws * (FIT_ARRAYS_PER_OBS * data.n_obs + len(model.parameters) * data.n_subjects),
                 f"a fit with {n_draws:,} draws of {data.n_obs:,} observations",
                 "draw fewer samples (--samples / svi_draws), or fit a subset of the subjects")
    check_seed(seed)
    problem = make_problem(model, data, estimate=estimate, fixed=fixed, variability=variability,
                           covariate_effects=covariate_effects, error=error, priors=priors, centred=centred)
    key = jax.random.PRNGKey(seed)
    k_fit, k_post = jax.random.split(key)
    t0 = time.perf_counter()
    nuts = sampler if isinstance(sampler, NUTS) else None
    if nuts is None or nuts.init == "svi":
        # the union-attr ignore: nuts is None only when sampler is an SVI, which mypy cannot link
        steps, n_svi = ((nuts.svi_steps, svi_draws) if nuts is not None
                        else (sampler.steps, sampler.draws))  # type: ignore[union-attr]
        draws, mode = _svi(problem, k_fit, steps, n_svi, progress)
    stats, timing = None, {}
    if nuts is not None:
        start = mode if nuts.init == "svi" else None
        draws, stats, timing = _nuts(problem, k_fit, nuts.chains, nuts.warmup, nuts.samples, nuts.target_accept,
                                     nuts.max_tree_depth, start, progress)
    elapsed = time.perf_counter() - t0
    # the record keeps every setting (the chosen sampler's, the others at their defaults) for older readers
    svi = sampler if isinstance(sampler, SVI) else SVI(svi_steps, svi_draws)
    settings = {"method": "nuts" if nuts else "svi", "chains": nuts.chains if nuts else 1,
                "warmup": nuts.warmup if nuts else warmup, "samples": nuts.samples if nuts else samples,
                "seed": seed, "centred": list(problem.centred),
                "target_accept": nuts.target_accept if nuts else target_accept,
                "max_tree_depth": nuts.max_tree_depth if nuts else max_tree_depth, "init": nuts.init if nuts else init,
                "svi_steps": nuts.svi_steps if nuts else svi.steps, "svi_draws": svi.draws,
                "fit_time_s": round(elapsed, 3), "devices": jax.local_device_count(), **timing}
    tree = to_datatree(problem, data, draws, stats, settings, k_post)
    for message in convergence_report(tree):
        warnings.warn(message, FitWarning, stacklevel=2)
    return tree


def sample_posteriors(problem: FitProblem, init_keys, run_keys, obs, init_strategy, **options):
    """NUTS chains of ``problem``'s posterior, chain ``b`` given measurements ``obs[b]`` (a
    (y, blq, lloq) batch; None: the design's own measurements for every chain), started by
    ``init_strategy`` with ``init_keys[b]``; ``options`` go to carkin.sampling.run_nuts.
    Raises FitError when no chain finds a start."""
    from numpyro.infer.util import initialize_model

    from carkin.sampling import run_nuts

    first = jax.tree.map(lambda a: np.asarray(a)[0], obs)  # every dataset shares the design's shapes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*devices available.*")
        try:
            info = initialize_model(init_keys, problem.numpyro_model, model_args=(first,), dynamic_args=True,
                                    init_strategy=init_strategy)
        except RuntimeError as e:
            if "valid initial parameters" not in str(e):
                raise
            raise FitError(NO_START) from None
    return run_nuts(info.potential_fn, info.postprocess_fn, info.param_info.z, run_keys, obs, **options)


def _nuts(problem: FitProblem, key, chains, warmup, samples, target_accept, max_tree_depth, start, progress):
    """The chains as one compiled program over every device (carkin.sampling); returns draws,
    sampler statistics and the sampler's compile and run times."""
    from numpyro.infer import init_to_median, init_to_value

    k_init, k_run = jax.random.split(key)
    init = init_to_value(values=start) if start is not None else init_to_median(num_samples=15)
    # obs=None: every chain targets the design's own measurements, fixed in the compiled program
    run = sample_posteriors(problem, jax.random.split(k_init, chains), jax.random.split(k_run, chains), None,
                            init, warmup=warmup, samples=samples, target_accept=target_accept,
                            max_tree_depth=max_tree_depth, progress=progress, label="NUTS chains")
    keep = set(problem.priors) | {Z_SITE}
    draws = {k: v for k, v in run.draws.items() if k in keep}
    extra = run.stats
    stats = {
        "diverging": extra["diverging"].astype(bool),
        "n_steps": extra["num_steps"].astype(np.int64),
        "tree_depth": np.ceil(np.log2(extra["num_steps"].astype(float) + 1)).astype(np.int64),
        "energy": extra["energy"],
        "acceptance_rate": extra["accept_prob"],
        "step_size": extra["step_size"],
        "lp": -extra["potential_energy"],
    }
    return draws, stats, {"compile_s": round(run.compile_s, 3), "sampling_s": round(run.run_s, 3),
                          "devices": run.devices}


def _svi(problem: FitProblem, key, steps: int, n_draws: int, progress: bool):
    """Variational fit (independent normals on the unconstrained scale): a quick look, and a start for NUTS.

    The joint posterior mode of a hierarchical model is degenerate (omega -> 0 with the
    random effects pinned), so a MAP/Laplace point is a poor summary here; the ELBO
    fit of AutoNormal averages over the random effects instead.
    """
    from numpyro.infer import SVI, Trace_ELBO, init_to_median
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.optim import ClippedAdam

    guide = AutoNormal(problem.numpyro_model, init_loc_fn=init_to_median(num_samples=15), init_scale=SVI_INIT_SCALE)
    svi = SVI(problem.numpyro_model, guide, ClippedAdam(step_size=SVI_STEP_SIZE), Trace_ELBO())
    k_fit, k_draw = jax.random.split(key)
    result = svi.run(k_fit, steps, progress_bar=progress)
    losses = np.asarray(result.losses)
    if not np.isfinite(losses[-1]):
        raise FitError("the variational fit failed (its loss is not finite at the end); check the data and "
                           "priors, fix poorly identified parameters, or use method='nuts'")
    tail = max(steps // 10, 1)
    if steps >= 2 * tail and abs(losses[-tail:].mean() - losses[-2 * tail:-tail].mean()) > SVI_DRIFT_MAX * (
            1.0 + abs(losses[-tail:].mean())):
        warnings.warn(f"the variational fit was still improving after {steps} steps; increase svi_steps",
                      FitWarning, stacklevel=3)
    mode = {k: np.asarray(v) for k, v in guide.median(result.params).items()}
    draws = guide.sample_posterior(k_draw, result.params, sample_shape=(n_draws,))
    draws = {k: np.asarray(v)[None] for k, v in draws.items() if k in problem.priors or k == Z_SITE}
    return draws, mode


# --- results as an ArviZ DataTree ------------------------------------------------------------------


def _derived(problem: FitProblem, draws: dict, key):
    """Per draw: individual parameters, predictions (individual and population), pointwise
    log-likelihood and a replicate measurement of every observation."""

    def one(params, k):
        theta = problem.individual(params)
        f, _ = problem.predictions(theta)
        ll = problem.pointwise_log_likelihood(params, f)
        if problem.random:
            theta0 = problem.individual({**params, Z_SITE: jnp.zeros_like(params[Z_SITE])})
        else:
            theta0 = theta
        f0, _ = problem.predictions(theta0)
        rep = problem.sample_measurements(params, f, k)
        return theta, f, f0, jnp.where(jnp.isfinite(ll), ll, -jnp.inf), rep

    chains, n_draw = next(iter(draws.values())).shape[:2]
    flat = {k: v.reshape((chains * n_draw,) + v.shape[2:]) for k, v in draws.items()}
    total = chains * n_draw
    batched = jax.jit(jax.vmap(one))
    outs = []
    for start in range(0, total, DRAW_BATCH):
        idx = np.minimum(np.arange(start, start + DRAW_BATCH), total - 1)  # pad: one compiled shape
        keys = jax.random.split(jax.random.fold_in(key, start), DRAW_BATCH)
        res = batched({k: v[idx] for k, v in flat.items()}, keys)
        outs.append([np.asarray(r)[: min(DRAW_BATCH, total - start)] for r in res])
    return [np.concatenate(parts).reshape((chains, n_draw) + parts[0].shape[1:]) for parts in zip(*outs)]


def _obs_units(problem: FitProblem) -> str:
    units = {o.name: o.unit for o in problem.model.observables}
    names = problem.design.observables
    return units[names[0]] if len(names) == 1 else "; ".join(f"{n}: {units[n]}" for n in names)


def to_datatree(problem: FitProblem, data: StudyData, draws: dict, stats, settings: dict, key) -> xr.DataTree:
    model, d = problem.model, problem.design
    theta, ipred, pred, loglik, rep = _derived(problem, draws, key)
    chains, n_draw = ipred.shape[:2]
    ids = [str(i) for i in data.ids]
    obs_units = _obs_units(problem)
    obs_names = np.array(d.observables)[d.obs_kind]
    base = {"chain": np.arange(chains), "draw": np.arange(n_draw)}
    obs_coords = {
        "obs": np.arange(d.y.size),
        "obs_id": ("obs", np.array(ids)[d.obs_subject]),
        "obs_time": ("obs", data.obs_time.astype(float), {"units": "day", "long_name": "time after first infusion"}),
        "observable": ("obs", obs_names.astype(str)),
    }
    subject = {"subject": np.array(ids)}

    post: dict[str, tuple] = {}
    for site in problem.priors:
        unit, long_name = problem.site_meta.get(site, ("", site))
        post[site] = (("chain", "draw"), draws[site], {"units": unit, "long_name": long_name})
    for r, name in enumerate(problem.random):
        eta = draws[omega_site(name)][..., None] * draws[Z_SITE][..., r]
        post[eta_variable(name)] = (("chain", "draw", "subject"), eta,
                                    {"units": "1", "long_name": f"random effect of {name} (omega * z)"})
    for j, name in enumerate(model.parameter_names):
        if name in problem.estimated:
            p = model.parameter(name)
            post[individual_variable(name)] = (("chain", "draw", "subject"), theta[..., j],
                                   {"units": p.unit, "long_name": f"individual {p.description}"})
    post["ipred"] = (("chain", "draw", "obs"), ipred, {"units": obs_units, "long_name": "individual prediction"})
    post["pred"] = (("chain", "draw", "obs"), pred,
                    {"units": obs_units, "long_name": "population prediction (random effects at zero)"})
    groups = {"posterior": xr.Dataset(post, coords={**base, **subject, **obs_coords})}

    if stats is not None:
        meta = {"diverging": ("1", "divergent transition"), "n_steps": ("1", "leapfrog steps"),
                "tree_depth": ("1", "NUTS tree depth"), "energy": ("1", "Hamiltonian energy"),
                "acceptance_rate": ("1", "mean acceptance probability"), "step_size": ("1", "leapfrog step size"),
                "lp": ("1", "log posterior density (up to a constant)")}
        groups["sample_stats"] = xr.Dataset(
            {k: (("chain", "draw"), v, {"units": meta[k][0], "long_name": meta[k][1]}) for k, v in stats.items()},
            coords=base)
    groups["log_likelihood"] = xr.Dataset(
        {"dv": (("chain", "draw", "obs"), loglik, {"units": "1", "long_name": "pointwise log-likelihood "
                                                   "(censored where BLQ)"})}, coords={**base, **obs_coords})
    groups["posterior_predictive"] = xr.Dataset(
        {"dv": (("chain", "draw", "obs"), rep, {"units": obs_units, "long_name": "replicate measurement"})},
        coords={**base, **obs_coords})
    groups["observed_data"] = xr.Dataset(
        {"dv": ("obs", d.y, {"units": obs_units, "long_name": "observed value (NaN where BLQ without a value)"}),
         "blq": ("obs", d.blq.astype(np.int8), {"units": "1", "long_name": "below the limit of quantification"}),
         "lloq": ("obs", d.lloq, {"units": obs_units, "long_name": "lower limit of quantification"}),
         "row": ("obs", np.asarray(data.obs_row, np.int64), {"units": "1", "long_name": "row in the data file"})},
        coords=obs_coords)
    const: dict[str, tuple] = {
        "dose_time": (("subject", "dose"), d.dose_times, {"units": "day", "long_name": "infusion time"}),
        "dose_cells": (("subject", "dose"), d.dose_cells, {"units": "cells", "long_name": "infused CAR cells"}),
        "design_time": (("subject", "grid"), d.times, {"units": "day", "long_name": "observation times (padded)"}),
    }
    for j, c in enumerate(model.covariates):
        const[f"model_{c.name}"] = ("subject", d.model_covariates[:, j],
                                    {"units": c.unit, "long_name": f"{c.description} (as used by the model)"})
    for name, values in data.covariates.items():
        values = np.asarray(values)
        const[name] = ("subject", values.astype(str) if values.dtype == object else values.astype(float),
                       {"units": _cov_unit(data, name), "long_name": f"covariate {name}"})
    for i, col in enumerate(problem.columns):
        const[f"x_{col.name}"] = ("subject", problem.x[:, i], {"units": "1", "long_name": col.description})
    groups["constant_data"] = xr.Dataset(const, coords=subject)

    tree = xr.DataTree.from_dict(groups)
    tree.attrs.update(
        model=model.name,
        model_options=json.dumps(_model_options(model)),
        model_values=json.dumps(dict(model.values)),
        estimated=list(problem.estimated) or [""],
        random=list(problem.random) or [""],
        covariate_effects=json.dumps([[c.name, c.parameter] for c in problem.columns]),
        error_models=json.dumps({k: v.kind for k, v in problem.errors.items()}),
        observables=list(d.observables),
        data=str(data.path),
        settings=json.dumps(settings),
        created_by="carkin " + __import__("carkin").__version__,
    )
    return tree


def _cov_unit(data: StudyData, name: str) -> str:
    return str(data.meta.get("covariates", {}).get(name, "")) if isinstance(data.meta, dict) else ""


def _model_options(model: Model) -> dict:
    """Constructor settings of the model other than parameter values (e.g. product_type)."""
    import dataclasses

    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "values"}


def population_sites(tree: xr.DataTree) -> list[str]:
    """Names of the population-level posterior variables (no subject or obs dimension)."""
    post = tree["posterior"].to_dataset()
    return [k for k, v in post.data_vars.items() if v.dims == ("chain", "draw")]  # type: ignore[misc]  # names are str


def stuck_chains(tree: xr.DataTree) -> list[int]:
    """Chains whose population draws never changed (a sampler that could not move at all)."""
    settings = json.loads(tree.attrs.get("settings", "{}"))
    if settings.get("method") != "nuts":
        return []
    post = tree["posterior"].to_dataset()[population_sites(tree)]
    if not post.data_vars:
        return []
    moved = sum((v.max("draw") > v.min("draw")).astype(int) for v in post.data_vars.values())
    return [int(c) for c in post["chain"].values[np.asarray(moved) == 0]]


def convergence_report(tree: xr.DataTree) -> list[str]:
    """Sampler problems in plain words, each with what to try. Empty when all is well."""
    settings = json.loads(tree.attrs.get("settings", "{}"))
    if settings.get("method") != "nuts":
        return []
    stuck = stuck_chains(tree)
    messages = []
    if stuck:  # R-hat and ESS are undefined for a chain that never moved: judged on the others below
        messages.append(f"chain(s) {stuck} never moved (every draw the same): the sampler is stuck and the fit is "
                        "not usable. Try method='svi' first, fix parameters the data cannot identify, or more "
                        "warmup; check the data's units against the model.")
    stats = tree["sample_stats"].to_dataset()
    n_div = int(stats["diverging"].sum())
    total = stats["diverging"].size
    if n_div:
        messages.append(
            f"{n_div} of {total} transitions diverged: the sampler met curvature it could not follow, so the "
            "posterior may be biased there. Try target_accept=0.95, tighter priors, or fixing parameters the "
            "data cannot identify.")
    depth = settings.get("max_tree_depth", 10)
    saturated = float((stats["tree_depth"] >= depth).mean())
    if saturated > TREE_DEPTH_SATURATION_MAX:
        messages.append(
            f"{100 * saturated:.0f}% of draws hit the maximal tree depth {depth}: sampling is inefficient and may "
            "not have explored the posterior. Increase max_tree_depth, or rescale/reparameterise strongly "
            "correlated parameters.")
    sites = population_sites(tree)
    post = tree["posterior"].to_dataset()[sites]
    post = post.sel(chain=[c for c in post["chain"].values if int(c) not in stuck])
    chains = post.sizes["chain"]
    if chains == 0:
        return messages
    if chains > 1:
        rhat = _rhat(post)
        high = {k: v for k, v in rhat.items() if not v <= RHAT_MAX}
        if high:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(high.items(), key=lambda kv: -kv[1]))
            messages.append(
                f"R-hat above {RHAT_MAX} for {shown}: the chains disagree, so they have not converged. Run more "
                "warmup and samples, start from init='svi', or check for a multimodal posterior.")
    ess = _ess(post)
    low = {k: v for k, v in ess.items() if v < ESS_PER_CHAIN_MIN * chains}
    if low:
        shown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(low.items(), key=lambda kv: kv[1]))
        messages.append(
            f"bulk effective sample size below {ESS_PER_CHAIN_MIN * chains} ({ESS_PER_CHAIN_MIN} per chain) for "
            f"{shown}: the summaries of these are noisy. Draw more samples (or more chains).")
    return messages


def _rhat(post: xr.Dataset) -> dict:
    from arviz_stats import rhat

    r = rhat(post)
    return {k: float(r[k]) for k in r.data_vars}


def _ess(post: xr.Dataset, method: str = "bulk") -> dict:
    from arviz_stats import ess

    e = ess(post, method=method)
    return {k: float(e[k]) for k in e.data_vars}


def save_fit(tree: xr.DataTree, path, *, overwrite: bool = False) -> str:
    """Write a fit to netCDF (one file, all groups), atomically; an existing file is replaced only with
    ``overwrite=True``."""
    from carkin.outputs import write_netcdf

    return write_netcdf(tree, path, overwrite=overwrite)


def load_fit(path) -> xr.DataTree:
    """Read a fit written by :func:`save_fit`."""
    with xr.open_datatree(path, engine="h5netcdf") as t:
        tree = t.load()
    missing = [g for g in ("posterior", "observed_data", "constant_data") if g not in tree.children]
    if "model" not in tree.attrs or missing:
        raise InputError(f"{path} is not a carkin fit (written by carkin fit / save_fit): it lacks "
                         f"{missing or ['the model attribute']}")
    return tree


# --- reuse a saved fit --------------------------------------------------------------------------


def problem_from_tree(tree: xr.DataTree) -> FitProblem:
    """Rebuild the population problem of a fit (for predictions and VPCs) from the DataTree alone."""
    from carkin.library import load_model
    from carkin.population import EffectColumn

    model = load_model(tree.attrs["model"], **json.loads(tree.attrs.get("model_options", "{}")))
    model = model.with_values(**json.loads(tree.attrs["model_values"]))
    const = tree["constant_data"].to_dataset()
    obs = tree["observed_data"].to_dataset()
    observables = tuple(np.atleast_1d(tree.attrs["observables"]).astype(str))
    cov = np.stack([const[f"model_{c.name}"].values for c in model.covariates], axis=1)
    subjects = list(const["subject"].values.astype(str))
    obs_subject = np.array([subjects.index(s) for s in obs["obs_id"].values.astype(str)], np.int32)
    times = const["design_time"].values
    t_obs = obs["obs_time"].values
    tindex = np.array([int(np.argmin(np.abs(times[s] - t))) for s, t in zip(obs_subject, t_obs)], np.int32)
    kind = np.array([observables.index(o) for o in obs["observable"].values.astype(str)], np.int32)
    design = Design(times, const["dose_time"].values, const["dose_cells"].values, cov, obs_subject, tindex, kind,
                    observables, obs["dv"].values, obs["blq"].values.astype(bool), obs["lloq"].values,
                    tuple(subjects))
    pairs = json.loads(tree.attrs.get("covariate_effects", "[]"))
    columns = tuple(EffectColumn(name, param, "") for name, param in pairs)
    x = (np.stack([const[f"x_{name}"].values for name, _ in pairs], axis=1) if pairs
         else np.zeros((len(subjects), 0)))
    errors = {k: ErrorModel(v) for k, v in json.loads(tree.attrs["error_models"]).items()}
    estimated = tuple(n for n in np.atleast_1d(tree.attrs["estimated"]).astype(str) if n)
    random = tuple(n for n in np.atleast_1d(tree.attrs["random"]).astype(str) if n)
    sites = population_sites(tree)
    return FitProblem(model, design, estimated, random, columns, x, errors, {s: None for s in sites})


def posterior_draws(tree: xr.DataTree) -> dict:
    """The sampled sites of a fit as arrays with leading (chain, draw) axes (z rebuilt from eta)."""
    post = tree["posterior"].to_dataset()
    draws = {s: post[s].values for s in population_sites(tree)}
    random = [n for n in np.atleast_1d(tree.attrs["random"]).astype(str) if n]
    if random:
        draws[Z_SITE] = np.stack([post[eta_variable(n)].values / post[omega_site(n)].values[..., None] for n in random],
                              axis=-1)
    return draws


def simulate_replicates(problem: FitProblem, draws: dict, key, n_replicates: int) -> np.ndarray:
    """(n_replicates, N) new measurements of the study design: each replicate takes a posterior
    draw of the population parameters, new subjects (new random effects) and residual error."""
    d = problem.design
    chains, n_draw = next(iter(draws.values())).shape[:2]
    flat = {k: v.reshape((chains * n_draw,) + v.shape[2:]) for k, v in draws.items() if k != Z_SITE}

    def one(params, k):
        k_pick, k_z, k_eps = jax.random.split(k, 3)
        i = jax.random.randint(k_pick, (), 0, chains * n_draw)
        p = {name: v[i] for name, v in params.items()}
        if problem.random:
            p[Z_SITE] = jax.random.normal(k_z, (d.n_subjects, len(problem.random)))
        f, _ = problem.predictions(problem.individual(p))
        y = problem.sample_measurements(p, f, k_eps)
        return y

    batched = jax.jit(jax.vmap(one, in_axes=(None, 0)))
    out = []
    for start in range(0, n_replicates, DRAW_BATCH):
        keys = jax.random.split(jax.random.fold_in(key, start), DRAW_BATCH)
        out.append(np.asarray(batched(flat, keys)))
    return np.concatenate(out)[:n_replicates]
