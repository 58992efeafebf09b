"""A fit's results as an ArviZ DataTree (posterior, sample_stats, log_likelihood, posterior_predictive,
observed_data, constant_data; named dims, units on every variable), saving, loading and reusing it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from carkin.errors import InputError
from carkin.fitting.convergence import population_sites
from carkin.fitting.data import StudyData
from carkin.fitting.fit_design import FitDesign
from carkin.fitting.fit_problem import FitProblem
from carkin.fitting.observations import observation_table, split_observables
from carkin.model.kinetics import Model
from carkin.model.observation import ErrorModel
from carkin.model.population import (
    Z_SITE,
    eta_variable,
    individual_variable,
    omega_site,
)

DRAW_BATCH = 64  # posterior draws per compiled batch when computing predictions


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


def to_datatree(problem: FitProblem, data: StudyData, draws: dict, stats, settings: dict, key,
                extra_posterior: dict | None = None) -> xr.DataTree:
    """The fit's DataTree from its draws. ``extra_posterior``: more per-observation variables of the
    posterior group, name -> ((chain, draw, obs) values, attrs), e.g. a Laplace fit's CWRES."""
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
    for name, (values, attrs) in (extra_posterior or {}).items():
        post[name] = (("chain", "draw", "obs"), values, attrs)
    groups = {"posterior": xr.Dataset(post, coords={**base, **subject, **obs_coords})}

    if stats is not None:
        meta = {"diverging": ("1", "divergent transition"), "n_steps": ("1", "leapfrog steps"),
                "tree_depth": ("1", "NUTS tree depth"), "energy": ("1", "Hamiltonian energy"),
                "acceptance_rate": ("1", "mean acceptance probability"), "step_size": ("1", "leapfrog step size"),
                "lp": ("1", "log posterior density (up to a constant)")}
        groups["sample_stats"] = xr.Dataset(
            {k: (("chain", "draw"), v, {"units": meta[k][0], "long_name": meta[k][1]}) for k, v in stats.items()},
            coords=base)
    # the joint log prior of the population parameters (the random effects' N(0, 1) is part of the model):
    # what power-scaling sensitivity scales (carkin.fitting.diagnostics.prior_sensitivity)
    # one compiled sum: site by site, each prior's log_prob is a dozen small compiles
    log_prior = np.asarray(jax.jit(lambda d: sum(prior.log_prob(d[site]) for site, prior in problem.priors.items()))(
        {site: draws[site] for site in problem.priors}))
    groups["log_prior"] = xr.Dataset(
        {"lprior": (("chain", "draw"), np.broadcast_to(log_prior, (chains, n_draw)),
                    {"units": "1", "long_name": "joint log prior density of the population parameters"})},
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

    tree = xr.DataTree.from_dict(groups)  # flat: all observables on one `obs` axis
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
    return split_observables(tree, units={o.name: o.unit for o in model.observables})


def _cov_unit(data: StudyData, name: str) -> str:
    return str(data.meta.get("covariates", {}).get(name, "")) if isinstance(data.meta, dict) else ""


def _model_options(model: Model) -> dict:
    """Constructor settings of the model other than parameter values (e.g. product_type)."""
    import dataclasses

    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "values"}


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
    return split_observables(tree)  # fits saved before one-variable-per-observable load in today's layout


# --- reuse a saved fit --------------------------------------------------------------------------


def problem_from_tree(tree: xr.DataTree) -> FitProblem:
    """Rebuild the population problem of a fit (for predictions and VPCs) from the DataTree alone."""
    from carkin.model.library import load_model
    from carkin.model.population import EffectColumn

    model = load_model(tree.attrs["model"], **json.loads(tree.attrs.get("model_options", "{}")))
    model = model.with_values(**json.loads(tree.attrs["model_values"]))
    const = tree["constant_data"].to_dataset()
    obs = observation_table(tree)
    observables = tuple(np.atleast_1d(tree.attrs["observables"]).astype(str))
    cov = np.stack([const[f"model_{c.name}"].values for c in model.covariates], axis=1)
    subjects = list(const["subject"].values.astype(str))
    obs_subject = np.array([subjects.index(s) for s in obs["id"]], np.int32)
    times = const["design_time"].values
    t_obs = obs["time"].to_numpy()
    tindex = np.array([int(np.argmin(np.abs(times[s] - t))) for s, t in zip(obs_subject, t_obs)], np.int32)
    kind = np.array([observables.index(o) for o in obs["observable"]], np.int32)
    design = FitDesign(times=times, dose_times=const["dose_time"].values, dose_cells=const["dose_cells"].values,
                       model_covariates=cov, obs_subject=obs_subject, obs_tindex=tindex, obs_kind=kind,
                       observables=observables, y=obs["dv"].to_numpy(), blq=obs["blq"].to_numpy(bool),
                       lloq=obs["lloq"].to_numpy(), ids=tuple(subjects))
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
