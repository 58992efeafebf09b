"""Batch inference: many datasets of one study design fitted in one compiled call, and
simulation-based calibration (SBC) of the fitting pipeline built on it.

All datasets share the design (subjects, doses, sampling times, LLOQs); only the
measurements differ, so one NUTS program, vectorised over datasets, fits them all. SBC
(Talts et al. 2018, arXiv:1804.06788) draws parameters from the prior, simulates a
dataset from each, fits it, and ranks the true value among the posterior draws: for a
correct pipeline the ranks are uniform.
"""

from __future__ import annotations

import jax
import numpy as np
import xarray as xr

from carkin.errors import InputError
from carkin.fitting.data import StudyData
from carkin.fitting.fit_problem import FitProblem, make_problem
from carkin.fitting.inference import sample_posteriors
from carkin.model.kinetics import Model
from carkin.model.population import Z_SITE


def fit_many(problem: FitProblem, y, blq, *, method: str = "nuts", warmup: int = 300, samples: int = 300,
             seed: int = 0, target_accept: float = 0.8, max_tree_depth: int = 8, thin: int = 1,
             progress: bool = False) -> dict:
    """Fits of ``len(y)`` datasets on one design at once: ``y`` and ``blq`` are (datasets, N).

    ``method="nuts"``: one NUTS chain per dataset, the datasets split over every device
    (carkin.sampling); a dataset's draws do not depend on how many devices there are. Returns
    the population sites' draws, each (dataset, draw), and ``diverging`` (dataset, draw).

    ``method="laplace"``: Laplace (FOCE-I) estimates of every dataset
    (:func:`carkin.fitting.laplace.estimate_many`): each site's estimate (dataset,), with the
    objective, convergence and the covariance of the unconstrained estimates.
    """
    if method == "laplace":
        from carkin.fitting.laplace import estimate_many

        return estimate_many(problem, y, blq, progress=progress)
    if method != "nuts":
        raise InputError(f"fit_many: method must be 'nuts' or 'laplace', got {method!r}")
    from numpyro.infer import init_to_median

    blq = np.asarray(blq, bool)
    y = np.where(blq, 1.0, np.asarray(y, float))  # censored values are never read
    lloq = np.broadcast_to(np.asarray(problem.design.lloq, float), y.shape)
    n = y.shape[0]
    key = jax.random.PRNGKey(seed)
    run = sample_posteriors(problem, jax.random.split(key, n), jax.random.split(jax.random.fold_in(key, 1), n),
                            (y, blq, lloq), init_to_median(num_samples=15), warmup=warmup, samples=samples,
                            target_accept=target_accept, max_tree_depth=max_tree_depth, thin=thin,
                            progress=progress, label="NUTS fits")
    out = {s: run.draws[s] for s in problem.priors}
    out["diverging"] = run.stats["diverging"]
    return out


def prior_datasets(problem: FitProblem, n: int, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """``n`` parameter sets from the priors and a dataset simulated from each (censored at the
    design's LLOQs). Returns (true population values per site (n,), y (n, N), blq (n, N))."""
    return _simulated(problem, n, seed, None)


def replicate_datasets(problem: FitProblem, values: dict, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` datasets simulated on ``problem``'s design at the population values ``values`` (site ->
    value, every site of the problem), each with its own random effects and residual errors,
    censored at the design's LLOQs. Returns (y (n, N), blq (n, N)): replicates for coverage and
    operating characteristics of an estimator."""
    missing = sorted(set(problem.priors) - set(values))
    if missing:
        raise InputError(f"replicate_datasets needs a value for every population parameter; missing: {missing}")
    _, y, blq = _simulated(problem, n, seed, {s: float(values[s]) for s in problem.priors})
    return y, blq


def _simulated(problem: FitProblem, n: int, seed: int, values: dict | None):
    d = problem.design

    def one(k):
        keys = jax.random.split(k, len(problem.priors) + 2)
        if values is None:
            params = {s: prior.sample(kk) for (s, prior), kk in zip(problem.priors.items(), keys)}
        else:
            params = {s: jax.numpy.asarray(v) for s, v in values.items()}
        if problem.random:
            params[Z_SITE] = jax.random.normal(keys[-2], (d.n_subjects, len(problem.random)))
        f, _ = problem.predictions(problem.individual(params))
        y = problem.sample_measurements(params, f, keys[-1])
        return {s: params[s] for s in problem.priors}, y

    truth, y = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed), n))
    y = np.asarray(y)
    blq = np.isfinite(d.lloq) & (y < np.where(np.isfinite(d.lloq), d.lloq, 0.0))
    return {s: np.asarray(v) for s, v in truth.items()}, np.where(blq, np.nan, y), blq


def simulation_based_calibration(model: Model, design_data: StudyData, n_datasets: int = 100, *,
                                 warmup: int = 300, samples: int = 300, thin: int = 10, seed: int = 0,
                                 target_accept: float = 0.8, max_tree_depth: int = 8, progress: bool = False,
                                 **problem_options) -> xr.Dataset:
    """SBC ranks of every population parameter over ``n_datasets`` prior-simulated datasets with the
    design of ``design_data``. Returns a Dataset: ``rank`` (dataset, parameter) in 0..L with
    L = samples // thin draws per fit, the true values, and divergences per fit. The sampler
    options go to ``fit_many``; ``problem_options`` to ``make_problem``."""
    problem = make_problem(model, design_data, **problem_options)
    truth, y, blq = prior_datasets(problem, n_datasets, seed)
    draws = fit_many(problem, y, blq, warmup=warmup, samples=samples, seed=seed + 1, thin=thin,
                     target_accept=target_accept, max_tree_depth=max_tree_depth, progress=progress)
    sites = list(problem.priors)
    ranks = np.stack([(draws[s] < truth[s][:, None]).sum(axis=1) for s in sites], axis=1)
    n_draws = draws[sites[0]].shape[1]
    return xr.Dataset(
        {"rank": (("dataset", "parameter"), ranks, {"units": "1", "long_name": f"rank of the truth among {n_draws} "
                                                                               "posterior draws"}),
         "truth": (("dataset", "parameter"), np.stack([truth[s] for s in sites], axis=1),
                   {"units": "", "long_name": "value drawn from the prior"}),
         "divergences": ("dataset", draws["diverging"].sum(axis=1), {"units": "1", "long_name": "divergent draws"})},
        coords={"dataset": np.arange(n_datasets), "parameter": sites},
        attrs={"n_draws": n_draws, "warmup": warmup, "samples": samples, "thin": thin, "seed": seed,
               "target_accept": target_accept, "max_tree_depth": max_tree_depth,
               "model": model.name, "subjects": design_data.n_subjects},
    )


def rank_uniformity(sbc: xr.Dataset, bins: int = 10) -> dict:
    """Chi-square test of uniform ranks per parameter: name -> p-value."""
    from scipy.stats import chisquare

    n_draws = int(sbc.attrs["n_draws"])
    # Ranks take the L + 1 integer values 0..L; bins hold whole ranks, so they may differ in how
    # many they hold, and each bin's expected count is in proportion.
    edges = np.unique(np.floor(np.linspace(0, n_draws + 1, bins + 1)).astype(int))
    width = np.diff(edges)
    out = {}
    for p in sbc["parameter"].values:
        r = sbc["rank"].sel(parameter=p).values
        counts = np.histogram(r, bins=edges)[0]
        expected = r.size * width / (n_draws + 1)
        out[str(p)] = float(chisquare(counts, f_exp=expected).pvalue)
    return out
