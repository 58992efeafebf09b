"""Diagnostics of a population fit: parameter table, shrinkage, individual curves, VPC, LOO.

Everything here reads the DataTree that ``carkin.fit`` returns (or ``load_fit`` reads
back), so a saved fit can be diagnosed again without the original session.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import jax
import numpy as np
import pandas as pd
import xarray as xr

from carkin.fitting.convergence import _ess, _rhat, population_sites
from carkin.fitting.fit_results import posterior_draws, problem_from_tree, simulate_replicates
from carkin.fitting.observations import FLAT_DIM, flat_values, observation_table
from carkin.fitting.predictions import predict_grid
from carkin.model.population import Z_SITE, eta_variable, omega_site, parameter_of_omega

INTERVAL = 0.90  # reported credible interval (equal-tailed)
VPC_PERCENTILES = (5, 50, 95)
VPC_MAX_BINS = 12  # more unique sampling times than this are grouped into quantile bins
CURVE_POINTS = 200


def shrinkage(tree: xr.DataTree) -> dict[str, float]:
    """Eta-shrinkage of each random effect: 1 - SD over subjects of the posterior-mean eta / omega."""
    post = tree["posterior"].to_dataset()
    out = {}
    for name in (str(n) for n in np.atleast_1d(tree.attrs["random"]) if str(n)):
        eta_mean = post[eta_variable(name)].mean(("chain", "draw")).values
        omega = float(post[omega_site(name)].mean())
        out[name] = float(1.0 - np.std(eta_mean, ddof=1) / omega) if eta_mean.size > 1 else float("nan")
    return out


def parameter_table(tree: xr.DataTree) -> pd.DataFrame:
    """One row per population parameter: posterior mean, sd, 90% interval, R-hat, bulk and
    tail ESS, and for each omega the shrinkage of its random effect. A Laplace fit's table:
    estimate, SE, RSE%, 95% Wald interval and shrinkage."""
    if "laplace" in tree.children:
        t = tree["laplace"].to_dataset()
        return pd.DataFrame({
            "parameter": t["parameter"].values.astype(str), "units": t["units"].values.astype(str),
            "estimate": t["estimate"].values, "se": t["se"].values, "rse_percent": t["rse"].values,
            "ci95_low": t["lower"].values, "ci95_high": t["upper"].values, "shrinkage": t["shrinkage"].values,
            "description": t["description"].values.astype(str)})
    sites = population_sites(tree)
    post = tree["posterior"].to_dataset()[sites]
    chains = post.sizes["chain"]
    rhat = _rhat(post) if chains > 1 else {k: float("nan") for k in sites}
    ess_bulk, ess_tail = _ess(post, "bulk"), _ess(post, "tail")
    shrink = shrinkage(tree)
    lo, hi = (1 - INTERVAL) / 2, 1 - (1 - INTERVAL) / 2
    sens = prior_sensitivity(tree)
    rows = []
    for k in sites:
        v = post[k].values.ravel()
        name = parameter_of_omega(k)
        rows.append({
            "parameter": k, "units": post[k].attrs.get("units", ""), "mean": v.mean(), "sd": v.std(ddof=1),
            "median": np.median(v), f"q{lo * 100:g}": np.quantile(v, lo), f"q{hi * 100:g}": np.quantile(v, hi),
            "r_hat": rhat[k], "ess_bulk": ess_bulk[k], "ess_tail": ess_tail[k],
            "shrinkage": shrink.get(name, np.nan) if name else np.nan,
            "prior_sensitivity": sens["prior"].get(k, np.nan),
            "likelihood_sensitivity": sens["likelihood"].get(k, np.nan),
            "prior_diagnosis": sens["diagnosis"].get(k, ""),
            "description": post[k].attrs.get("long_name", ""),
        })
    return pd.DataFrame(rows)


PRIOR_SENSITIVITY_THRESHOLD = 0.05  # power-scaling default (Kallioinen et al. 2024, doi:10.1007/s11222-023-10366-5)


def prior_sensitivity(tree: xr.DataTree) -> dict:
    """Power-scaling sensitivity of each population parameter's posterior to its prior and to the
    likelihood (ArviZ's psense: the cumulative Jensen-Shannon distance as the joint prior or the
    likelihood is raised to a power near 1, by importance sampling of the existing draws).

    Returns {"prior": site -> value, "likelihood": site -> value, "diagnosis": site -> text}; the
    diagnosis is ArviZ's: "potential strong prior / weak likelihood" (the posterior is driven by
    its prior) or "potential prior-data conflict" where values pass PRIOR_SENSITIVITY_THRESHOLD,
    else a tick. Empty where the fit has no ``log_prior`` group (fits saved before it), has too
    few draws, or was not sampled by NUTS."""
    import arviz_stats

    empty: dict = {"prior": {}, "likelihood": {}, "diagnosis": {}}
    post = tree["posterior"].to_dataset()
    sampled = json.loads(tree.attrs.get("settings", "{}")).get("method", "nuts") == "nuts"
    if not sampled or "log_prior" not in tree.children or post.sizes["chain"] * post.sizes["draw"] < 100:
        return empty  # importance sampling needs posterior draws: not SVI's or a Laplace fit's
    sites = population_sites(tree)
    ll = flat_values(tree, "log_likelihood", "dv")
    flat = xr.DataTree.from_dict({
        "posterior": post[sites],
        "log_prior": tree["log_prior"].to_dataset(),
        "log_likelihood": xr.Dataset({"all": (("chain", "draw", FLAT_DIM), ll)},
                                     coords={"chain": post["chain"], "draw": post["draw"]})})
    with np.errstate(all="ignore"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # (it prints its own advice; carkin words it as a FitWarning)
        table = arviz_stats.psense_summary(flat, threshold=PRIOR_SENSITIVITY_THRESHOLD, round_to=6)
    out: dict = {"prior": {}, "likelihood": {}, "diagnosis": {}}
    for label, row in table.iterrows():
        out["prior"][str(label)] = float(row["prior"])
        out["likelihood"][str(label)] = float(row["likelihood"])
        out["diagnosis"][str(label)] = str(row["diagnosis"])
    return out


def loo(tree: xr.DataTree):
    """PSIS-LOO over all observations of every observable (censored ones enter with their censored
    likelihood); ``pareto_k`` runs over the records in data-file order."""
    import arviz_stats

    ll = flat_values(tree, "log_likelihood", "dv")
    post = tree["posterior"].to_dataset()
    flat = xr.DataTree.from_dict({
        "posterior": post[population_sites(tree)],
        "log_likelihood": xr.Dataset({"all": (("chain", "draw", FLAT_DIM), ll)},
                                     coords={"chain": post["chain"], "draw": post["draw"]})})
    with np.errstate(all="ignore"):
        return arviz_stats.loo(flat, var_name="all")


def _thin(draws: dict, n: int, seed: int) -> dict:
    """At most ``n`` draws, picked evenly across chains, as a single-chain dict."""
    chains, n_draw = next(iter(draws.values())).shape[:2]
    flat = {k: v.reshape((chains * n_draw,) + v.shape[2:]) for k, v in draws.items()}
    total = chains * n_draw
    idx = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    return {k: v[np.sort(idx)] for k, v in flat.items()}


def individual_curves(tree: xr.DataTree, subjects=None, n_draws: int = 100, n_points: int = CURVE_POINTS,
                      seed: int = 0) -> xr.Dataset:
    """Individual and population predictions on a dense time grid, for plotting fits.

    Returns a Dataset with dims (observable, subject, time): ``ipred_median``, ``ipred_lo``
    and ``ipred_hi`` (90% interval over posterior draws) and ``pred_median`` (typical
    subject with the subject's covariates, random effects at zero).
    """
    problem = problem_from_tree(tree)
    d = problem.design
    ids = list(tree["constant_data"]["subject"].values.astype(str))  # type: ignore[union-attr]  # a variable: DataArray
    chosen = ids if subjects is None else [str(s) for s in subjects]
    rows = np.array([ids.index(s) for s in chosen])
    t_end = float(np.max(d.times))
    t_start = float(min(np.min(d.times), np.min(d.dose_times)))
    grid = np.linspace(t_start, t_end, n_points)
    draws = _thin(posterior_draws(tree), n_draws, seed)
    model = problem.model

    def curves(params):
        theta = problem.individual(params)[rows]
        theta0 = problem.individual({**params, Z_SITE: 0.0 * params[Z_SITE]})[rows] if problem.random else theta
        args = (np.broadcast_to(grid, (rows.size, grid.size)), d.dose_times[rows], d.dose_cells[rows])
        f, _ = predict_grid(model, d.observables, *args, theta, d.model_covariates[rows])
        f0, _ = predict_grid(model, d.observables, *args, theta0, d.model_covariates[rows])
        return f, f0

    f, f0 = jax.lax.map(jax.jit(curves), draws)  # (draw, subject, observable, time)
    f, f0 = np.moveaxis(np.asarray(f), 2, 1), np.moveaxis(np.asarray(f0), 2, 1)
    lo, hi = (1 - INTERVAL) / 2, 1 - (1 - INTERVAL) / 2
    units = {o.name: o.unit for o in model.observables}
    dims = ("observable", "subject", "time")
    unit = units[d.observables[0]] if len(d.observables) == 1 else "see observable"
    ds = xr.Dataset(
        {"ipred_median": (dims, np.nanmedian(f, axis=0), {"units": unit, "long_name": "individual prediction"}),
         "ipred_lo": (dims, np.nanquantile(f, lo, axis=0), {"units": unit, "long_name": "individual 5th pct"}),
         "ipred_hi": (dims, np.nanquantile(f, hi, axis=0), {"units": unit, "long_name": "individual 95th pct"}),
         "pred_median": (dims, np.nanmedian(f0, axis=0), {"units": unit, "long_name": "population prediction"})},
        coords={"observable": list(d.observables), "subject": chosen,
                "time": ("time", grid, {"units": "day", "long_name": "time after first infusion"})},
    )
    ds.attrs["observable_units"] = json.dumps(units)
    return ds


def _bins(times: np.ndarray, max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin index per observation and the bins' edges: one bin per sampling time when there
    are few, else quantile bins."""
    unique = np.unique(times)
    if unique.size <= max_bins:
        return np.searchsorted(unique, times), unique
    edges = np.unique(np.quantile(times, np.linspace(0, 1, max_bins + 1)))
    return np.clip(np.searchsorted(edges, times, side="right") - 1, 0, edges.size - 2), edges


def _censored_percentiles(values: np.ndarray, blq: np.ndarray, q) -> np.ndarray:
    """Percentiles with BLQ values ranked below every quantified one (placed at -inf);
    a percentile that falls among them is returned as NaN (it is below the LLOQ)."""
    v = np.where(blq, -np.inf, values)
    out = np.percentile(v, q, axis=-1, method="inverted_cdf")
    return np.where(np.isfinite(out), out, np.nan)


def vpc(tree: xr.DataTree, n_replicates: int = 200, seed: int = 0, max_bins: int = VPC_MAX_BINS) -> pd.DataFrame:
    """Visual predictive check data, BLQ-aware.

    The study design (doses, sampling times, covariates, LLOQs) is simulated
    ``n_replicates`` times from the posterior: each replicate takes a posterior draw of
    the population parameters, new random effects and residual error, and censors
    values below the LLOQ as the assay would. For each observable and time bin the
    5th, 50th and 95th percentiles of the observed data (BLQ ranked lowest; a percentile
    among the BLQ values is reported as NaN, "below LLOQ") are set against the 90%
    interval of the same percentile over replicates; the fraction BLQ likewise.
    Returns a long DataFrame: observable, bin, time, statistic, observed, sim_lo,
    sim_median, sim_hi, lloq, n_obs, units.
    """
    problem = problem_from_tree(tree)
    d = problem.design
    times = observation_table(tree)["time"].to_numpy()  # the order of problem_from_tree's design
    y_sim = simulate_replicates(problem, posterior_draws(tree), jax.random.PRNGKey(seed), n_replicates)
    has_lloq = np.isfinite(d.lloq)
    blq_sim = has_lloq & (y_sim < np.where(has_lloq, d.lloq, 0.0))
    units = {o.name: o.unit for o in problem.model.observables}
    rows = []
    for k, name in enumerate(d.observables):
        sel = np.flatnonzero(d.obs_kind == k)
        b, _ = _bins(times[sel], max_bins)
        for j in np.unique(b):
            idx = sel[b == j]
            lloq = float(np.nanmax(d.lloq[idx])) if has_lloq[idx].any() else np.nan
            observed = _censored_percentiles(d.y[idx], d.blq[idx], VPC_PERCENTILES)
            sims = _censored_percentiles(y_sim[:, idx], blq_sim[:, idx], VPC_PERCENTILES)  # (q, rep)
            base = {"observable": name, "bin": int(j), "time": float(np.median(times[idx])), "lloq": lloq,
                    "n_obs": int(idx.size), "units": units[name]}
            for qi, q in enumerate(VPC_PERCENTILES):
                s = sims[qi]
                finite = np.isfinite(s)
                # Replicates whose percentile is below the LLOQ count as the LLOQ for the band.
                s = np.where(finite, s, lloq)
                rows.append({**base, "statistic": f"p{q:02d}", "observed": observed[qi],
                             "sim_lo": np.nanpercentile(s, 5), "sim_median": np.nanpercentile(s, 50),
                             "sim_hi": np.nanpercentile(s, 95)})
            frac = blq_sim[:, idx].mean(axis=1)
            rows.append({**base, "statistic": "frac_blq", "observed": float(d.blq[idx].mean()),
                         "sim_lo": np.percentile(frac, 5), "sim_median": np.percentile(frac, 50),
                         "sim_hi": np.percentile(frac, 95)})
    return pd.DataFrame(rows)
