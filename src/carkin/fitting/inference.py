"""Population fitting: a hierarchical NumPyro model of a carkin model and a dataset; ``fit``.

    data --FitDesign--> per-subject time grids, doses, covariates
    (theta_pop, omega, beta, z) --population--> individual parameters
    --solve (closed form where the model has one, else the piecewise ODE)--> predictions
    --error model, censored where BLQ--> log-likelihood --NUTS / SVI--> DataTree

The returned ``xarray.DataTree`` follows ArviZ's groups (posterior, sample_stats,
log_likelihood, posterior_predictive, observed_data, constant_data), with
``(chain, draw)`` first, named dims and units on every variable.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import jax
import numpy as np
import xarray as xr

from carkin.errors import CarkinError, InputError
from carkin.fitting.convergence import (  # noqa: F401  (the names this module always offered)
    ESS_PER_CHAIN_MIN,
    RHAT_MAX,
    TREE_DEPTH_SATURATION_MAX,
    FitWarning,
    _ess,
    _rhat,
    convergence_report,
    population_sites,
    stuck_chains,
)
from carkin.fitting.data import StudyData
from carkin.fitting.fit_design import Design, FitDesign, ModelDataError, build_design  # noqa: F401
from carkin.fitting.fit_problem import (  # noqa: F401
    FORWARD_MODE_MAX_PARAMETERS,
    OMEGA_PRIOR_DEFAULT,
    OMEGA_PRIOR_FACTOR,
    PRIOR_LOG_SD,
    FitProblem,
    default_priors,
    make_problem,
)
from carkin.fitting.fit_results import (  # noqa: F401
    DRAW_BATCH,
    _derived,
    load_fit,
    posterior_draws,
    problem_from_tree,
    save_fit,
    simulate_replicates,
    to_datatree,
)
from carkin.fitting.predictions import _forward_mode_observables, predict_grid, subject_observables  # noqa: F401
from carkin.fitting.samplers import NUTS, SVI, Laplace, from_arguments
from carkin.guards import check_memory, check_seed
from carkin.model.kinetics import Model
from carkin.model.population import CENTRED_SITE, Z_SITE

SVI_STEP_SIZE = 0.01
SVI_INIT_SCALE = 0.05
SVI_DRIFT_MAX = 0.01  # relative change of the loss over the last tenth of the steps that counts as converged

# Per-draw, per-observation arrays a fit keeps (4, counted in a Stein fit's DataTree), each held twice at the
# peak while it is built (device buffer and host copy): a 200,000-row SVI fit was seen to reach 11.5 GB.
FIT_ARRAYS_PER_OBS = 2 * 4


class FitError(CarkinError, RuntimeError):
    """The fit itself failed numerically (not a problem with the arguments)."""


NO_START = ("no starting point with a finite log density was found (every solve failed or the data are impossible "
            "under the priors); check the data, fix parameters the data cannot identify, or set priors nearer the "
            "data")


# --- fit -----------------------------------------------------------------------------------------


def fit(model: Model, data, *, estimate=None, fixed=None, variability=None, covariate_effects=(), error=None,
        priors=None, centred=(), method: str = "nuts", chains: int = 4, warmup: int = 500, samples: int = 500,
        seed: int = 0, target_accept: float = 0.8, max_tree_depth: int = 10, init: str = "median",
        svi_steps: int = 3000, svi_draws: int = 1000, progress: bool = True,
        sampler: NUTS | SVI | Laplace | None = None) -> xr.DataTree:
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
    from it: a quick look, with less honest uncertainty; ``method="laplace"`` maximises the
    likelihood with each subject's random effects integrated out by the Laplace approximation
    (FOCE-I; carkin.fitting.laplace): estimates with standard errors, the objective function value,
    individual estimates (the modes) and CWRES, in minutes. ``init`` is where NUTS chains
    start: ``median`` (prior medians), ``svi`` (the variational fit's medians) or ``laplace`` (a
    Laplace fit's estimates and modes).
    The chains run as one compiled program split over every device (each CPU core is one),
    with the same draws however many devices there are.

    ``sampler`` (carkin.samplers.NUTS, SVI or Laplace) gives all of these settings as one object; with it,
    leave ``method``, ``chains``, ``warmup``, ``samples``, ``target_accept``, ``max_tree_depth``,
    ``init``, ``svi_steps`` and ``svi_draws`` at their defaults.
    Sampler problems are reported as FitWarning with what to try.
    """
    from carkin.fitting.data import read_dataset

    if not isinstance(data, StudyData):
        data = read_dataset(data)
    given = from_arguments(method, chains, warmup, samples, target_accept, max_tree_depth, init, svi_steps,
                           svi_draws)
    if sampler is None:
        sampler = given
    elif not isinstance(sampler, (NUTS, SVI, Laplace)):
        raise InputError(f"sampler must be carkin.NUTS(...), carkin.SVI(...) or carkin.Laplace(...), "
                         f"got {sampler!r}")
    elif given != NUTS():
        raise InputError("give the sampler's settings either as sampler=... or as keyword arguments, not both")
    n_draws = sampler.n_draws
    # The DataTree keeps per-draw, per-observation arrays (log-likelihood, predictions, replicates) and
    # per-draw, per-subject random effects: refuse a fit whose results cannot fit in memory before it runs.
    check_memory(8.0 * n_draws * (FIT_ARRAYS_PER_OBS * data.n_obs + len(model.parameters) * data.n_subjects),
                 f"a fit with {n_draws:,} draws of {data.n_obs:,} observations",
                 "draw fewer samples (--samples / svi_draws), or fit a subset of the subjects")
    check_seed(seed)
    auto = isinstance(centred, str) and centred == "auto"
    problem = make_problem(model, data, estimate=estimate, fixed=fixed, variability=variability,
                           covariate_effects=covariate_effects, error=error, priors=priors,
                           centred=() if auto else centred)
    if auto and not isinstance(sampler, NUTS):
        raise InputError("centred='auto' chooses the parameterisation NUTS samples; give method='nuts'")
    key = jax.random.PRNGKey(seed)
    k_fit, k_post = jax.random.split(key)
    if isinstance(sampler, Laplace):
        return _laplace(problem, data, sampler, seed, progress, k_post)
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
        if auto or nuts.init == "laplace":
            laplace_fit = _laplace_fit(problem, seed)
            if auto:
                problem = dataclasses.replace(problem, centred=auto_centred(problem, laplace_fit.z))
            if nuts.init == "laplace":
                start = _laplace_start(problem, laplace_fit)
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
    for message in convergence_report(tree) + prior_report(tree):
        warnings.warn(message, FitWarning, stacklevel=2)
    return tree


def prior_report(tree: xr.DataTree) -> list[str]:
    """Population parameters whose posterior moves with the prior (power-scaling sensitivity), in words."""
    from carkin.fitting.diagnostics import PRIOR_SENSITIVITY_THRESHOLD, prior_sensitivity

    sens = prior_sensitivity(tree)
    flagged = [f"{site} ({sens['diagnosis'][site]}: prior {sens['prior'][site]:.3f}, likelihood "
               f"{sens['likelihood'][site]:.3f})"
               for site, diagnosis in sens["diagnosis"].items() if "prior" in diagnosis]
    if not flagged:
        return []
    return [f"power-scaling sensitivity above {PRIOR_SENSITIVITY_THRESHOLD} to the prior for {', '.join(flagged)}: "
            "these posteriors move when the prior is scaled, so they reflect the prior as well as the data (with "
            "a weak likelihood, mostly the prior); check them against a wider prior (priors=...), fix what the data "
            "cannot identify, or report them as prior-informed"]


AUTO_CENTRED_SHRINKAGE = 0.3  # centre a random effect whose Laplace eta-shrinkage is below this (centred="auto")


def _laplace_fit(problem: FitProblem, seed: int):
    """The Laplace fit NUTS starts from or chooses its parameterisation by (one start, no covariance step)."""
    from carkin.fitting import laplace

    if not problem.random:
        raise InputError("init='laplace' and centred='auto' need parameters with variability; use init='median'")
    return laplace.estimate(problem, Laplace(starts=1, covariance=False), seed=seed, progress=False)


def auto_centred(problem: FitProblem, z) -> tuple[str, ...]:
    """The random effects to sample centred: those whose eta-shrinkage at the modes ``z`` (S, R),
    1 - SD(z), is below AUTO_CENTRED_SHRINKAGE."""
    shrinkage = 1.0 - np.std(np.asarray(z), axis=0)
    return tuple(n for n, sh in zip(problem.random, shrinkage) if sh < AUTO_CENTRED_SHRINKAGE)


def _laplace_start(problem: FitProblem, result) -> dict:
    """NUTS's start at a Laplace fit: population estimates and the modes (as the sampled site holds them)."""
    start = {s: np.asarray(v) for s, v in result.values.items()}
    if problem.centred:
        start[CENTRED_SITE] = problem.centred_value(result.values, result.z)
    else:
        start[Z_SITE] = np.asarray(result.z)
    return start


def _laplace(problem: FitProblem, data: StudyData, settings: Laplace, seed: int, progress: bool, key) -> xr.DataTree:
    """``fit(method="laplace")``: estimates, then the DataTree; problems reported as FitWarning."""
    from carkin.fitting import laplace

    kinked = laplace.switch_with_variability(problem)
    if kinked:
        warnings.warn(f"{problem.model.name}'s switch time moves with {kinked}, which have between-subject "
                      "variability: the Laplace objective has kinks wherever a subject's switch meets one of its "
                      "observation times, so the optimiser may stop short and the standard errors fail; fit those "
                      "parameters without variability (variability=...) or use method='nuts'", FitWarning, stacklevel=3)
    t0 = time.perf_counter()
    result = laplace.estimate(problem, settings, seed=seed, progress=progress)
    record = {"method": "laplace", "starts": settings.starts, "priors": settings.priors,
              "covariance": settings.covariance, "seed": seed, "chains": 1, "samples": 1,
              "fit_time_s": round(time.perf_counter() - t0, 3), "compile_s": result.compile_s,
              "run_s": result.run_s, "devices": jax.local_device_count()}
    tree = laplace.laplace_tree(problem, data, result, record, key)
    if not result.converged:
        warnings.warn(f"the Laplace fit did not converge ({result.message}); try more starts (Laplace(starts=...)), "
                      "fix parameters the data cannot identify, or compare with method='nuts'", FitWarning,
                      stacklevel=3)
    if settings.covariance and result.covariance is None:
        warnings.warn(f"no standard errors: {result.covariance_message}", FitWarning, stacklevel=3)
    return tree


def sample_posteriors(problem: FitProblem, init_keys, run_keys, obs, init_strategy, **options):
    """NUTS chains of ``problem``'s posterior, chain ``b`` given measurements ``obs[b]`` (a
    (y, blq, lloq) batch; None: the design's own measurements for every chain), started by
    ``init_strategy`` with ``init_keys[b]``; ``options`` go to carkin.sampling.run_nuts.
    Raises FitError when no chain finds a start."""
    from numpyro.infer.util import initialize_model

    from carkin.fitting.sampling import run_nuts

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
