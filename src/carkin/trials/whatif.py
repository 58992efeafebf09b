"""What-if grids: dose levels x schedules x a population, simulated with the kinetic model.

Every subject of the population receives every (dose, schedule) combination, so the
comparison between single and split infusion is paired. The population is either the
model's typical values with between-subject variability, or posterior draws of a fit
(``posterior=``), so that parameter uncertainty propagates: each draw's population
parameters generate its own virtual subjects.

A schedule may carry a hold rule: a later fraction is not given when the CAR level
just before it has already reached a threshold (protocols hold remaining fractions when
early expansion or CRS appears). Held fractions are simply not infused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from carkin.errors import InputError
from carkin.model import dosing
from carkin.model.kinetics import Model
from carkin.model.population import Population, omega_site
from carkin.simulation.nca import nca
from carkin.simulation.simulate import parse_times, simulate
from carkin.trials.toxicity import DLTModel, default_dlt_model

RECOVERY_FRACTION = 0.5  # recovered when the normal-cell count is back to half its baseline
MRD_THRESHOLD = 0.01  # % marrow blasts: below this counts as MRD-negative (flow cytometry, 1e-4)
RESPONSE_DAY = 28.0
INTERVAL = (5, 95)


@dataclass(frozen=True)
class HoldRule:
    """Hold a later fraction when ``observable`` just before it is at or above ``threshold``."""

    threshold: float
    observable: str | None = None  # None: the model's exposure

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise InputError(f"hold rule: threshold must be a positive number, got {self.threshold!r}")


@dataclass(frozen=True)
class Schedule:
    """How a total dose is infused: fractions on days (one fraction = a single infusion)."""

    name: str
    fractions: tuple[float, ...] = (1.0,)
    days: tuple[float, ...] = (0.0,)
    hold: HoldRule | None = None

    def __post_init__(self):
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "days", tuple(float(d) for d in self.days))
        dosing.split(1e6, self.fractions, self.days)  # same checks, same messages as carkin.split
        if self.hold is not None and len(self.fractions) < 2:
            raise InputError(f"schedule {self.name!r}: a hold rule needs at least two fractions")

    def regimen(self, dose_per_kg: float, n_fractions: int | None = None) -> dosing.Regimen:
        """The regimen for a total dose; ``n_fractions`` keeps only the first fractions (the rest held)."""
        k = len(self.fractions) if n_fractions is None else n_fractions
        label = f"{dose_per_kg:.6g} {self.name}" + ("" if k == len(self.fractions) else f" (first {k})")
        return dosing.custom(self.days[:k], [dose_per_kg * f for f in self.fractions[:k]], label)


SINGLE = Schedule("single")
SPLIT = Schedule("split 10/30/60", (0.1, 0.3, 0.6), (0.0, 1.0, 2.0))


def posterior_population(tree, model: Model, n_draws: int, n_per_draw: int, seed: int) -> dict:
    """Per-subject parameter values: ``n_draws`` posterior draws x ``n_per_draw`` new subjects each."""
    from carkin.fitting.fit_results import posterior_draws

    if json.loads(tree.attrs.get("covariate_effects", "[]")):
        raise InputError("what-if runs from a fit with covariate effects are not supported yet; refit without "
                         "covariate_effects, or use the model's population (posterior=None)")
    if tree.attrs["model"] != model.name:
        raise InputError(f"the posterior is a fit of {tree.attrs['model']!r}, not of {model.name!r}")
    if int(n_draws) < 1 or int(n_per_draw) < 1:
        raise InputError(f"n_draws and n_subjects must be >= 1, got {n_draws} and {n_per_draw}")
    draws = posterior_draws(tree)
    chains, n_all = next(iter(draws.values())).shape[:2]
    if n_draws > chains * n_all:
        raise InputError(f"the fit has {chains * n_all} posterior draws; ask for at most that many (got {n_draws})")
    rng = np.random.default_rng(seed)
    pick = rng.choice(chains * n_all, size=min(n_draws, chains * n_all), replace=False)
    fitted = json.loads(tree.attrs["model_values"])
    population = Population.of(model)
    theta_pop, eta = {}, []
    for p in model.parameters:  # one block of normals per parameter, in model order
        site = omega_site(p.name)
        theta_pop[p.name] = (draws[p.name].reshape(-1)[pick] if p.name in draws
                             else np.full(pick.size, fitted.get(p.name, model.typical[p.name])))[:, None]
        theta_pop[site] = (draws[site].reshape(-1)[pick] if site in draws else np.zeros(pick.size))[:, None]
        eta.append(rng.standard_normal((pick.size, n_per_draw)))
    theta = np.asarray(population.individual(theta_pop, np.stack(eta, axis=-1)))  # (draw, subject, P)
    out = {name: theta[..., j].reshape(-1) for j, name in enumerate(model.parameter_names)}
    return out


def _simulate_schedule(model, schedule, doses, grid, n, covariates, params, seed, engine="auto"):
    """Trajectories (dose, subject, time) of every observable under one schedule, holds applied,
    and the number of fractions each subject received."""
    full = len(schedule.fractions)
    options = [full] if schedule.hold is None else list(range(1, full + 1))
    runs = {}
    for k in options:
        regs = [schedule.regimen(d, k) for d in doses]
        runs[k] = simulate(model, regs, times=grid, n_subjects=n, covariates=covariates, params=params, seed=seed,
                           progress=False, engine=engine)
    given = np.full((len(doses), n), full)
    if schedule.hold is not None:
        obs = schedule.hold.observable or model.role("exposure")
        # Fraction j is held (with all later ones) when the level just before it reaches the threshold.
        # Regimen j stops before fraction j, so its value on day j is the pre-infusion level, and it is
        # what a subject not yet held has received up to then.
        for j in range(1, full):
            crossed = runs[j][obs].sel(time=schedule.days[j]).values >= schedule.hold.threshold
            given = np.where((given == full) & crossed, j, given)
    pick = {name: np.stack([runs[k][name].values for k in options]) for name in runs[options[-1]].data_vars
            if "time" in runs[options[-1]][name].dims}
    idx = np.array(options).searchsorted(given)  # (dose, subject) -> option index
    chosen = {name: np.take_along_axis(v, idx[None, :, :, None], axis=0)[0] for name, v in pick.items()}
    failed = np.take_along_axis(np.stack([runs[k]["failed"].values for k in options]), idx[None], axis=0)[0]
    return chosen, given, failed, runs[options[-1]]


def whatif(model: Model, doses, schedules=(SINGLE, SPLIT), *, n_subjects: int = 200, posterior=None,
           n_draws: int = 20, covariates: dict | None = None, times="0:90:1", seed: int = 0,
           dlt_model: DLTModel | None = None, visit_days=(), marrow_days=(), calibration: bool = False,
           engine: str = "auto") -> xr.Dataset:
    """Simulate every dose level under every schedule for one virtual population.

    ``doses``: total doses in cells/kg. ``schedules``: Schedule objects (default single vs
    10/30/60% split over days 0-2). Population: ``n_subjects`` subjects with the model's
    between-subject variability, or with ``posterior`` (a fit's DataTree) ``n_draws``
    posterior draws of ``n_subjects`` new subjects each. ``covariates`` fixes covariate values
    (one per subject, or per draw x subject). Returns a Dataset with dims (dose, schedule,
    subject) or (dose, schedule, draw, subject): Cmax, Tmax, AUC0-28 of the CAR level,
    the nadir of the antigen-positive normal cells and the day they recover to half their
    baseline, tumour reduction and MRD negativity on day 28, the DLT probability, the
    fractions and dose received; with ``visit_days`` the CAR level and normal-cell count
    at those blood-sampling days, with ``marrow_days`` the marrow blasts at those days.
    Summaries come from :func:`summarize`. ``engine``: how the model is solved (see
    :func:`carkin.simulation.simulate.simulate`).
    """
    doses = [float(d) for d in np.atleast_1d(doses)]
    if not doses or any(not (math.isfinite(d) and d > 0) for d in doses) or len(set(doses)) != len(doses):
        raise InputError(f"doses must be distinct positive numbers of cells/kg, got {doses}")
    schedules = list(schedules)
    names = [s.name for s in schedules]
    if not schedules or len(set(names)) != len(names):
        raise InputError(f"schedules must be a non-empty list with distinct names, got {names}")
    dlt_model = (dlt_model or default_dlt_model(model)).for_model(model)
    grid = np.union1d(parse_times(times), [d for s in schedules for d in s.days] + list(visit_days)
                      + list(marrow_days))
    if RESPONSE_DAY not in grid and grid[-1] >= RESPONSE_DAY:
        grid = np.union1d(grid, [RESPONSE_DAY])
    params = None
    n = int(n_subjects)
    links = None
    if posterior is not None and calibration:
        raise InputError("whatif: give posterior= (a fit) or calibration=True, not both")
    if posterior is not None:
        params = posterior_population(posterior, model, n_draws, n, seed)
        n_draws = params[model.parameter_names[0]].size // n
        n = n_draws * n
    elif calibration:
        from carkin.qualification.uncertainty import draws, population_over_draws

        chosen = draws(model, n_draws)
        params = population_over_draws(model, chosen, n, seed)
        links = [d.dlt for d in chosen]
        n = len(chosen) * n
    sims = [_simulate_schedule(model, s, doses, grid, n, covariates, params, seed, engine) for s in schedules]
    template = sims[0][3]
    ds = _endpoints(model, schedules, doses, grid, sims, template, dlt_model)
    ds = ds.merge(_visit_values(model, grid, sims, visit_days, marrow_days))
    if posterior is not None or links is not None:
        ds = _unflatten(ds, n_draws)
    if links is not None:
        ds["p_dlt"] = _dlt_by_draw(ds, links)
    ds.attrs.update(model=model.name, dlt_model=dlt_model.describe(), seed=seed,
                    population=("posterior draws" if posterior is not None else
                                "calibration draws" if links is not None else "model population"),
                    schedules=json.dumps({s.name: {"fractions": s.fractions, "days": s.days,
                                                   "hold": None if s.hold is None else vars(s.hold)}
                                          for s in schedules}),
                    mrd_threshold_percent=MRD_THRESHOLD, recovery_fraction=RECOVERY_FRACTION)
    return ds


def _endpoints(model, schedules, doses, grid, sims, template, dlt_model) -> xr.Dataset:
    obs_units = {o.name: o.unit for o in model.observables}
    n = template.sizes["subject"]
    dims = ("dose", "schedule", "subject")

    def stack(name):
        return np.stack([s[0][name] for s in sims], axis=1)  # (dose, schedule, subject, time)

    exposure_name = model.role("exposure")
    car = xr.DataArray(stack(exposure_name), dims=(*dims, "time"), coords={"time": grid},
                       attrs={"units": obs_units[exposure_name]})
    res = nca(car)
    data: dict[str, tuple] = {
        k: (dims, res[k].values, {"units": res[k].attrs["units"], "long_name": res[k].attrs["long_name"]})
        for k in ("cmax", "tmax", "auc_0_28")}
    normal = model.role("normal", required=False)
    if normal is not None:
        y = stack(normal)
        base = y[..., :1]
        nadir_i = np.argmin(y, axis=-1)
        data["nadir"] = (dims, np.min(y, axis=-1), {"units": obs_units[normal],
                                                    "long_name": f"nadir of {normal.replace('_', ' ')}"})
        data["nadir_day"] = (dims, grid[nadir_i], {"units": "day", "long_name": "day of the nadir"})
        after = grid[None, None, None, :] > grid[nadir_i][..., None]
        recovered = after & (y >= RECOVERY_FRACTION * base)
        first = np.where(recovered.any(-1), grid[np.argmax(recovered, axis=-1)], np.nan)
        # Never below the threshold: nothing to recover from (day 0), not "recovered the day after the nadir".
        first = np.where(np.min(y, axis=-1) >= RECOVERY_FRACTION * base[..., 0], grid[0], first)
        data["recovery_day"] = (dims, first, {"units": "day", "long_name": f"day {normal.replace('_', ' ')} "
                                              f"recover to {RECOVERY_FRACTION:.0%} of baseline (NaN: not by "
                                              f"day {grid[-1]:g})"})
    burden = None
    tumour = model.role("tumour", required=False)
    if tumour is not None:
        b = stack(tumour)
        at = np.searchsorted(grid, RESPONSE_DAY)
        if at < grid.size and grid[at] == RESPONSE_DAY:
            b0, b28 = b[..., 0], b[..., at]
            data["tumour_reduction"] = (dims, 100.0 * (1.0 - b28 / b0), {
                "units": "%", "long_name": f"reduction of marrow blasts by day {RESPONSE_DAY:g}"})
            data["mrd_negative"] = (dims, b28 < MRD_THRESHOLD,
                                    {"units": "1", "long_name": f"MRD-negative on day {RESPONSE_DAY:g} "
                                                                f"(blasts < {MRD_THRESHOLD}%)"})
        if dlt_model.burden_covariate in template:
            burden = template[dlt_model.burden_covariate].values
    level = xr.DataArray(stack(dlt_model.peak_observable), dims=(*dims, "time"), coords={"time": grid})
    exposure = dlt_model.exposure(level).values
    data["dlt_exposure"] = (dims, exposure, {"units": obs_units[dlt_model.peak_observable],
                                             "long_name": f"highest {dlt_model.peak_observable} on days "
                                                          f"0-{dlt_model.window_end_day:g} (the DLT link's exposure)"})
    data["p_dlt"] = (dims, dlt_model.probability(exposure, None if burden is None else burden[None, None, :]),
                     {"units": "1", "long_name": f"probability of DLT ({dlt_model.name})"})
    given = np.stack([s[1] for s in sims], axis=1)
    fractions = np.array([[np.sum(s.fractions[:k]) for k in range(len(s.fractions) + 1)] for s in schedules],
                         dtype=object)
    received = np.stack([np.array([[doses[i] * fractions[j][g] for g in given[i, j]] for j in range(len(schedules))])
                         for i in range(len(doses))])
    data["fractions_given"] = (dims, given, {"units": "1", "long_name": "infusions given (after holds)"})
    data["dose_received"] = (dims, received, {"units": "cells/kg", "long_name": "total dose received"})
    data["failed"] = (dims, np.stack([s[2] for s in sims], axis=1), {"units": "1", "long_name": "solve failed"})
    # Covariates keep their names; parameters get a prefix, as some share a name with an endpoint
    # (Stein's typical Cmax and Tmax parameters are not the simulated subject's Cmax and Tmax).
    for c in model.covariates:
        data[c.name] = ("subject", template[c.name].values, dict(template[c.name].attrs))
    for prm in model.parameters:
        data[f"param_{prm.name}"] = ("subject", template[prm.name].values, dict(template[prm.name].attrs))
    coords = {"dose": ("dose", np.array(doses), {"units": "cells/kg", "long_name": "total dose"}),
              "schedule": ("schedule", [s.name for s in schedules]), "subject": np.arange(n)}
    return xr.Dataset(data, coords=coords)


def _visit_values(model, grid, sims, visit_days, marrow_days) -> xr.Dataset:
    """Observables at the protocol's visits: blood levels on sampling days, blasts on marrow days."""
    units = {o.name: (o.unit, o.long_name) for o in model.observables}
    out: dict[str, tuple] = {}
    blood = [n for n in (model.role("exposure"), model.role("normal", required=False)) if n is not None]
    marrow = [n for n in (model.role("tumour", required=False),) if n is not None]
    for names, days, dim in ((blood, visit_days, "visit"), (marrow, marrow_days, "marrow_visit")):
        if not len(days):
            continue
        idx = np.searchsorted(grid, np.asarray(days, float))
        for name in names:
            v = np.stack([s[0][name][..., idx] for s in sims], axis=1)
            out[f"{name}_at_{dim}"] = (("dose", "schedule", "subject", dim), v,
                                       {"units": units[name][0], "long_name": f"{units[name][1]} at each {dim}"})
        out[dim] = (dim, np.asarray(days, float), {"units": "day", "long_name": f"{dim.replace('_', ' ')} day"})
    return xr.Dataset({k: v for k, v in out.items() if k not in ("visit", "marrow_visit")},
                      coords={k: v for k, v in out.items() if k in ("visit", "marrow_visit")})


def _dlt_by_draw(ds: xr.Dataset, links) -> xr.DataArray:
    """P(DLT) recomputed with each draw's own link (dims dose, schedule, draw, subject)."""
    p = ds["p_dlt"].copy()
    burden_name = links[0].burden_covariate
    for d, link in enumerate(links):
        burden = ds[burden_name].isel(draw=d).values[None, None, :] if burden_name in ds else None
        p.values[:, :, d, :] = link.probability(ds["dlt_exposure"].isel(draw=d).values, burden)
    return p


def _unflatten(ds: xr.Dataset, n_draws: int) -> xr.Dataset:
    """subject -> (draw, subject) for a posterior population (subjects are draw-major)."""
    n = ds.sizes["subject"] // n_draws
    out: dict[Hashable, xr.DataArray | tuple] = {}
    for name, var in ds.data_vars.items():
        if "subject" not in var.dims:
            out[name] = var
            continue
        axis = var.dims.index("subject")
        values = var.values.reshape(var.shape[:axis] + (n_draws, n) + var.shape[axis + 1:])
        out[name] = (var.dims[:axis] + ("draw", "subject") + var.dims[axis + 1:], values, var.attrs)
    coords = {k: v for k, v in ds.coords.items() if k != "subject"}
    coords.update(draw=np.arange(n_draws), subject=np.arange(n))
    return xr.Dataset(out, coords=coords, attrs=ds.attrs)


def summarize(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (dose, schedule): median and 5-95th percentiles of the continuous endpoints over
    subjects, and the population fraction for probabilities (P(DLT), MRD negativity); with
    posterior draws also the 90% interval of those fractions over draws."""
    continuous = [k for k in ("cmax", "tmax", "auc_0_28", "nadir", "recovery_day", "tumour_reduction",
                              "dose_received") if k in ds]
    fractions = [k for k in ("p_dlt", "mrd_negative") if k in ds]
    pooled = [d for d in ("draw", "subject") if d in ds.dims]
    rows = []
    for dose in ds["dose"].values:
        for sched in ds["schedule"].values:
            cell = ds.sel(dose=dose, schedule=sched)
            ok = ~cell["failed"].astype(bool)
            row = {"dose_per_kg": float(dose), "schedule": str(sched), "n": int(ok.sum())}
            for k in continuous:
                v = cell[k].where(ok).values.ravel()
                v = v[np.isfinite(v)]
                row[f"{k}_median"] = float(np.median(v)) if v.size else np.nan
                row[f"{k}_p{INTERVAL[0]}"] = float(np.percentile(v, INTERVAL[0])) if v.size else np.nan
                row[f"{k}_p{INTERVAL[1]}"] = float(np.percentile(v, INTERVAL[1])) if v.size else np.nan
            if "recovery_day" in ds:
                row["recovered_fraction"] = float(np.isfinite(cell["recovery_day"].values[ok.values]).mean())
            for k in fractions:
                p = cell[k].where(ok).astype(float)
                row[k] = float(p.mean(pooled))
                if "draw" in ds.dims:
                    per_draw = p.mean("subject").values
                    row[f"{k}_p{INTERVAL[0]}"] = float(np.nanpercentile(per_draw, INTERVAL[0]))
                    row[f"{k}_p{INTERVAL[1]}"] = float(np.nanpercentile(per_draw, INTERVAL[1]))
            rows.append(row)
    return pd.DataFrame(rows)
