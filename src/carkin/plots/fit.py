"""Plots of a population fit's diagnostics: individual fits, goodness of fit, VPC (matplotlib).

Every function reads the DataTree that ``carkin.fit`` returns (or ``load_fit`` reads
back) and the tables of ``carkin.diagnostics``. As in ``carkin.plots``, figures are
built with ``matplotlib.figure.Figure``, never pyplot, so they need no display.
BLQ records are never drawn as if measured: they appear at their LLOQ with their own
marker, or are left out of a panel with a note saying how many.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from carkin.errors import InputError
from carkin.fitting import diagnostics
from carkin.fitting.observations import (
    flat_values,
    observable_units,
    observable_variable,
    observables_of,
    observation_table,
)
from carkin.model.observation import ErrorModel
from carkin.model.population import sigma_add_site, sigma_site
from carkin.outputs import save_figure
from carkin.plots.simulation import DPI, MAX_DECADES, _clip_log_limits, _wrap

__all__ = ["plot_gof", "plot_individual_fits", "plot_vpc", "save_fit_plots"]

TIME_LABEL = "time after first infusion (day)"
Z_REF = 1.96  # two-sided 95% limits of a standard normal residual
OBS_COLOUR = "0.15"
PRED_COLOUR = "tab:blue"
POP_COLOUR = "tab:orange"
BLQ_COLOUR = "tab:red"
VPC_MEDIAN_COLOUR = "#1f3f77"  # darker than PRED_COLOUR
LLOQ_STYLE: dict[str, Any] = {"color": "0.45", "ls": "--", "lw": 0.9}
SQRT_TIME_AFTER = 60.0  # days of follow-up beyond which time axes are drawn on a square-root scale
TIME_TICKS = (0, 7, 14, 28, 56, 90, 180, 365, 730, 1095, 1460, 1825)
# Predictions may fall far below anything measured (before expansion, after clearance);
# below the lowest observation or LLOQ the axis shows at most this many decades.
DECADES_BELOW_DATA = 2


# --- reading the fit ---------------------------------------------------------------------------------------


def _long_names(tree: xr.DataTree) -> dict[str, str]:
    """Observable -> readable name from the fitted model; the bare name when the model is not in the library."""
    from carkin.model.library import load_model

    names = observables_of(tree)
    try:
        model = load_model(str(tree.attrs["model"]), **json.loads(tree.attrs.get("model_options", "{}")))
    except (KeyError, TypeError, ValueError):
        return {n: n for n in names}
    found = {o.name: o.long_name for o in model.observables}
    return {n: found.get(n, n) for n in names}


def _label(name: str, units: str) -> str:
    return f"{name} ({units})" if units and units != "1" else name


def _observations(tree: xr.DataTree) -> pd.DataFrame:
    """One row per record: id, time, observable, dv, blq, lloq, and posterior medians of PRED and IPRED."""
    frame = observation_table(tree).drop(columns="row")
    names = ("pred", "ipred", "cwres") if _has_cwres(tree) else ("pred", "ipred")
    for name in names:
        draws = xr.DataArray(flat_values(tree, "posterior", name), dims=("chain", "draw", "obs"))
        frame[name] = draws.median(("chain", "draw")).values  # NaN-skipping, as xarray does
    return frame


def _has_cwres(tree: xr.DataTree) -> bool:
    """A Laplace fit keeps CWRES beside its predictions."""
    return observable_variable(observables_of(tree)[0], "cwres") in tree["posterior"].data_vars


def _quantified(df: pd.DataFrame) -> pd.Series:
    """Records with a measured value: not BLQ and not missing."""
    return ~df["blq"] & np.isfinite(df["dv"])


def _positive_range(*arrays) -> tuple[float, float]:
    values = np.concatenate([np.ravel(np.asarray(a, dtype=float)) for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    return (float(values.min()), float(values.max())) if values.size else (math.nan, math.nan)


def _sigma(tree: xr.DataTree, site: str) -> float:
    post = tree["posterior"]
    return float(post[site].median()) if site in post else math.nan


def _iwres(kind: str, dv, ipred, sigma: float, sigma_add: float = 0.0) -> np.ndarray:
    """Individual weighted residuals under the error model named ``kind`` (posterior-median sigmas)."""
    return ErrorModel(kind).residual(dv, ipred, sigma, sigma_add)


def _time_axis(ax, t_min: float, t_max: float) -> str:
    """Scale and tick the time axis; returns the matching axis label.

    Long follow-up gets a square-root scale: expansion happens in the first weeks but sampling
    runs for months, and on a linear axis the samples around the peak pile up at the left.
    """
    if not (t_max > SQRT_TIME_AFTER and t_min >= 0):
        return TIME_LABEL
    # signed, so the axis can start a hair before day 0 and markers there are not cut in half
    ax.set_xscale("function", functions=(lambda t: np.sign(t) * np.sqrt(np.abs(t)), lambda u: np.sign(u) * u**2))
    ticks: list[int] = []
    gap = math.sqrt(t_max) / 13  # keep tick labels apart in the scaled space
    for d in TIME_TICKS:
        if d <= t_max * 1.05 and (not ticks or math.sqrt(d) - math.sqrt(ticks[-1]) >= gap):
            ticks.append(d)
    ax.set_xticks(ticks, [f"{d:g}" for d in ticks])
    ax.set_xlim(-((0.02 * math.sqrt(t_max)) ** 2), t_max * 1.03)
    return TIME_LABEL.replace(")", ", square-root scale)")


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    ncols = min(max_cols, max(1, n))
    return -(-n // ncols), ncols


# --- individual fits ---------------------------------------------------------------------------------------


def plot_individual_fits(tree: xr.DataTree, curves: xr.Dataset, max_subjects: int = 16) -> Figure:
    """One panel per subject (a block of rows per observable): observations, BLQ records at their
    LLOQ, the individual prediction (median and 90% band over posterior draws) and the population
    prediction. ``curves`` comes from ``carkin.diagnostics.individual_curves``; at most
    ``max_subjects`` of its subjects are drawn."""
    df = _observations(tree)
    subjects = [str(s) for s in curves["subject"].values[:max_subjects]]
    if not subjects:
        raise InputError("plot_individual_fits: the curves have no subjects")
    names = [str(o) for o in curves["observable"].values]
    units = {**observable_units(tree), **json.loads(curves.attrs.get("observable_units", "{}"))}
    long_names = _long_names(tree)
    rows_per, ncols = _grid(len(subjects))
    nrows = rows_per * len(names)
    fig = Figure(figsize=(3.0 * ncols + 2.6, 2.3 * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    t = curves["time"].values
    for k, name in enumerate(names):
        block = axes[k * rows_per:(k + 1) * rows_per].ravel()
        sub_df = df[df["observable"] == name]
        for ax, sid in zip(block, subjects):
            _individual_panel(ax, t, curves.sel(observable=name, subject=sid), sub_df[sub_df["id"] == sid])
            ax.set_title(f"ID {sid}", fontsize="medium")
        for ax in block[len(subjects):]:
            ax.remove()
        used = block[:len(subjects)]
        lo, hi = _individual_range(sub_df[sub_df["id"].isin(subjects)], curves.sel(observable=name, subject=subjects))
        for i, ax in enumerate(used):
            ax.set_yscale("log")
            _clip_log_limits(ax, lo, hi, MAX_DECADES)  # one y range per observable: subjects compare at a glance
            xlabel = _time_axis(ax, float(t[0]), float(t[-1]))
            if i % ncols == 0:
                ax.set_ylabel(_y_label(long_names.get(name, name), units.get(name, "")), fontsize="small")
    _label_bottom_axes(axes, len(subjects), rows_per, ncols)
    fig.supxlabel(xlabel, fontsize="medium")  # once: the label is wider than a panel
    fig.legend(*_individual_legend(), loc="outside right upper", fontsize="small", frameon=False)
    fig.suptitle(f"Individual fits — {tree.attrs.get('model', '')}", fontsize="large")
    return fig


def _individual_range(obs: pd.DataFrame, c: xr.Dataset) -> tuple[float, float]:
    """Log y range of an observable's panels: the data, LLOQ and predictions, but no lower than
    DECADES_BELOW_DATA under the lowest observation or LLOQ."""
    data = (obs.loc[_quantified(obs), "dv"], obs["lloq"])
    lo, hi = _positive_range(*data, c["ipred_lo"].values, c["ipred_hi"].values, c["pred_median"].values)
    data_lo, _ = _positive_range(*data)
    if math.isfinite(data_lo):
        lo = max(lo, data_lo / 10**DECADES_BELOW_DATA)
    return lo, hi


def _y_label(name: str, units: str, width: int = 28) -> str:
    return _wrap(name, width) + (f"\n({units})" if units and units != "1" else "")


def _individual_panel(ax, t, c: xr.Dataset, obs: pd.DataFrame) -> None:
    ax.fill_between(t, c["ipred_lo"].values, c["ipred_hi"].values, color=PRED_COLOUR, alpha=0.2, lw=0)
    ax.plot(t, c["ipred_median"].values, color=PRED_COLOUR, lw=1.6)
    ax.plot(t, c["pred_median"].values, color=POP_COLOUR, lw=1.2, ls="--")
    lloq = obs["lloq"].to_numpy(float)
    if np.isfinite(lloq).any():
        ax.axhline(float(np.nanmax(lloq)), **LLOQ_STYLE)  # the highest, should the assay's LLOQ change
    seen = obs[_quantified(obs)]
    ax.plot(seen["time"], seen["dv"], "o", color=OBS_COLOUR, ms=4, ls="none", label="observed")
    blq = obs[obs["blq"]]
    ax.plot(blq["time"], blq["lloq"], "v", mfc="none", mec=BLQ_COLOUR, mew=1.2, ms=6, ls="none", label="BLQ")
    ax.grid(True, which="major", alpha=0.3)


def _individual_legend():
    handles = [
        Line2D([], [], marker="o", color=OBS_COLOUR, ls="none", ms=4),
        Line2D([], [], marker="v", mfc="none", mec=BLQ_COLOUR, mew=1.2, ls="none", ms=6),
        Line2D([], [], **LLOQ_STYLE),
        Line2D([], [], color=PRED_COLOUR, lw=1.6),
        Patch(color=PRED_COLOUR, alpha=0.2),
        Line2D([], [], color=POP_COLOUR, lw=1.2, ls="--"),
    ]
    labels = ["observed", "BLQ (drawn at the LLOQ)", "LLOQ", "individual prediction\n(posterior median)",
              "individual prediction,\n90% credible band", "population prediction\n(random effects at zero)"]
    return handles, labels


def _label_bottom_axes(axes, n_subjects: int, rows_per: int, ncols: int) -> None:
    """Shared x: the lowest drawn panel of each column keeps its tick labels."""
    for j in range(ncols):
        drawn = [i for i in range(axes.shape[0]) if (i % rows_per) * ncols + j < n_subjects]
        if drawn:
            axes[drawn[-1], j].xaxis.set_tick_params(labelbottom=True)


# --- goodness of fit ---------------------------------------------------------------------------------------


def plot_gof(tree: xr.DataTree) -> Figure:
    """Goodness-of-fit plots, one row per observable: observed vs population and individual
    predictions (posterior medians, log-log, identity line) and individual weighted residuals
    against time and against the individual prediction (zero and ±1.96 lines).

    BLQ records have no measured value to compare, so they are left out; each row says how many.
    """
    df = _observations(tree)
    names = observables_of(tree)
    units, long_names = observable_units(tree), _long_names(tree)
    errors = json.loads(tree.attrs.get("error_models", "{}"))
    fig = Figure(figsize=(18.75 if _has_cwres(tree) else 15.0, 3.9 * len(names) + 0.9), layout="constrained")
    rows = np.atleast_1d(fig.subfigures(len(names), 1))  # type: ignore[arg-type]  # wraps a lone SubFigure
    for sub_fig, name in zip(rows, names):
        sub = df[df["observable"] == name]
        keep = sub[_quantified(sub)]
        err = ErrorModel(errors.get(name))
        res = err.residual(keep["dv"], keep["ipred"], _sigma(tree, sigma_site(name)),
                           _sigma(tree, sigma_add_site(name)) if err.has_additive else 0.0)
        axes = sub_fig.subplots(1, 5 if "cwres" in keep else 4)
        unit = units.get(name, "")
        _identity_panel(axes[0], keep["pred"], keep["dv"], _label("population prediction", unit),
                        _label("observed", unit), "observed vs population prediction")
        _identity_panel(axes[1], keep["ipred"], keep["dv"], _label("individual prediction", unit),
                        _label("observed", unit), "observed vs individual prediction")
        _residual_panel(axes[2], keep["time"], res, "", log_x=False)
        axes[2].set_xlabel(_time_axis(axes[2], float(df["time"].min()), float(df["time"].max())), fontsize="small")
        _residual_panel(axes[3], keep["ipred"], res, _label("individual prediction", unit), log_x=True)
        axes[2].set_title("IWRES vs time", fontsize="medium")
        axes[3].set_title("IWRES vs individual prediction", fontsize="medium")
        if "cwres" in keep:
            _residual_panel(axes[4], keep["pred"], keep["cwres"].to_numpy(), _label("population prediction", unit),
                            log_x=True)
            axes[4].set_ylabel("CWRES", fontsize="small")
            axes[4].set_title("CWRES vs population prediction", fontsize="medium")
        left_out = int(len(sub) - len(keep))
        note = f"{left_out} of {len(sub)} records BLQ or missing, not shown" if left_out else "no BLQ records"
        sub_fig.suptitle(f"{long_names.get(name, name)} — {err.name} error — {note}", fontsize="medium")
    handles = [Line2D([], [], marker="o", color=PRED_COLOUR, alpha=0.6, ls="none", ms=4),
               Line2D([], [], color="0.2", lw=1.0), Line2D([], [], color="0.4", lw=0.9, ls="--")]
    labels = ["quantified observation", "identity (observed = predicted) / residual = 0", f"residual = ±{Z_REF}"]
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    how = "Laplace estimates" if _has_cwres(tree) else "posterior medians"
    fig.suptitle(f"Goodness of fit — {tree.attrs.get('model', '')} ({how})", fontsize="large")
    return fig


def _identity_panel(ax, x, y, xlabel: str, ylabel: str, title: str) -> None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ax.plot(x, y, "o", color=PRED_COLOUR, alpha=0.6, ms=4, mew=0)
    lo, hi = _positive_range(x, y)
    if math.isfinite(hi):
        lo = max(lo, hi / 10**MAX_DECADES) / 1.5  # a few near-zero predictions must not flatten the cloud
        hi *= 1.5
        ax.plot([lo, hi], [lo, hi], color="0.2", lw=1.0)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_box_aspect(1)
    ax.set_xlabel(xlabel, fontsize="small")
    ax.set_ylabel(ylabel, fontsize="small")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)


def _residual_panel(ax, x, res, xlabel: str, log_x: bool) -> None:
    x, res = np.asarray(x, dtype=float), np.asarray(res, dtype=float)
    ax.plot(x, res, "o", color=PRED_COLOUR, alpha=0.6, ms=4, mew=0)
    ax.axhline(0.0, color="0.2", lw=1.0)
    for z in (-Z_REF, Z_REF):
        ax.axhline(z, color="0.4", lw=0.9, ls="--")
    finite = res[np.isfinite(res)]
    top = max(3.0, 1.1 * float(np.abs(finite).max())) if finite.size else 3.0
    ax.set_ylim(-top, top)
    if log_x:
        ax.set_xscale("log")
        lo, hi = _positive_range(x)
        if math.isfinite(hi):
            ax.set_xlim(max(lo, hi / 10**MAX_DECADES) / 1.5, hi * 1.5)
    ax.set_xlabel(xlabel, fontsize="small")
    ax.set_ylabel("IWRES", fontsize="small")
    ax.grid(True, which="major", alpha=0.3)


# --- visual predictive check -------------------------------------------------------------------------------

VPC_STATS = ("p05", "p50", "p95")


def plot_vpc(vpc_df: pd.DataFrame, labels: dict | None = None) -> Figure:
    """Visual predictive check from the table of ``carkin.diagnostics.vpc``, one column per observable.

    Top: observed 5th, 50th and 95th percentiles per time bin over the 90% intervals of the
    same percentiles in the simulated replicates (log scale, LLOQ dashed); a percentile that
    lies among the BLQ values is not drawn. Bottom (observables with an LLOQ): the observed
    fraction BLQ against its simulated 90% interval. ``labels`` maps observables to readable
    names.
    """
    names = list(dict.fromkeys(vpc_df["observable"].astype(str)))
    if not names:
        raise InputError("plot_vpc: the VPC table is empty")
    has_lloq = {n: bool(np.isfinite(vpc_df.loc[vpc_df["observable"] == n, "lloq"]).any()) for n in names}
    nrows = 2 if any(has_lloq.values()) else 1
    # one observable still needs room for a legend three entries wide
    fig = Figure(figsize=(max(8.0, 5.6 * len(names) + 0.4), 4.6 + 2.2 * (nrows - 1) + 0.9), layout="constrained")
    axes = fig.subplots(nrows, len(names), squeeze=False, sharex="col",
                        gridspec_kw={"height_ratios": [3, 1.4][:nrows]})
    for j, name in enumerate(names):
        part = vpc_df[vpc_df["observable"] == name].sort_values("time")
        units = str(part["units"].iloc[0]) if "units" in part else ""
        title = (labels or {}).get(name, name)
        _vpc_percentiles(axes[0, j], part, _y_label(title, units, 40))
        axes[0, j].set_title(_wrap(title, 45), fontsize="medium")
        bottom = axes[0, j]
        if nrows == 2 and has_lloq[name]:
            bottom = axes[1, j]
            _vpc_blq(bottom, part)
        elif nrows == 2:
            axes[1, j].remove()
            bottom.xaxis.set_tick_params(labelbottom=True)
        bottom.set_xlabel(_time_axis(bottom, float(part["time"].min()), float(part["time"].max())),
                          fontsize="small")
    fig.legend(*_vpc_legend(any(has_lloq.values())), loc="outside lower center", ncols=3 if len(names) > 1 else 2,
               fontsize="small", frameon=False)
    fig.suptitle("Visual predictive check", fontsize="large")
    return fig


def _vpc_percentiles(ax, part: pd.DataFrame, ylabel: str) -> None:
    for stat in VPC_STATS:
        s = part[part["statistic"] == stat]
        t = s["time"].to_numpy(float)
        median = stat == "p50"
        # the median's band is drawn last and in a darker colour so it stays apart where bands overlap
        ax.fill_between(t, s["sim_lo"].to_numpy(float), s["sim_hi"].to_numpy(float),
                        color=VPC_MEDIAN_COLOUR if median else PRED_COLOUR, alpha=0.45 if median else 0.15, lw=0,
                        zorder=1.5 if median else 1)
        # NaN (percentile below the LLOQ) breaks the line: nothing is drawn there
        ax.plot(t, s["observed"].to_numpy(float), color=OBS_COLOUR, lw=1.6 if median else 1.0,
                ls="-" if median else "--", marker="o" if median else "s", ms=4 if median else 3,
                mfc=OBS_COLOUR if median else "white")
    lloq = part["lloq"].to_numpy(float)
    if np.isfinite(lloq).any():
        ax.axhline(float(np.nanmax(lloq)), **LLOQ_STYLE)
    stats = part[part["statistic"].isin(VPC_STATS)]
    lo, hi = _positive_range(stats[["observed", "sim_lo", "sim_hi"]].to_numpy(), lloq)
    ax.set_yscale("log")
    _clip_log_limits(ax, lo, hi, MAX_DECADES)
    ax.set_ylabel(ylabel, fontsize="small")
    ax.grid(True, which="major", alpha=0.3)


def _vpc_blq(ax, part: pd.DataFrame) -> None:
    s = part[part["statistic"] == "frac_blq"]
    t = s["time"].to_numpy(float)
    ax.fill_between(t, s["sim_lo"].to_numpy(float), s["sim_hi"].to_numpy(float), color=BLQ_COLOUR, alpha=0.2,
                    lw=0)
    ax.plot(t, s["observed"].to_numpy(float), color=OBS_COLOUR, lw=1.2, marker="D", ms=4)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("fraction BLQ", fontsize="small")
    ax.grid(True, which="major", alpha=0.3)


def _vpc_legend(with_blq: bool):
    handles = [
        Line2D([], [], color=OBS_COLOUR, lw=1.6, marker="o", ms=4),
        Line2D([], [], color=OBS_COLOUR, lw=1.0, ls="--", marker="s", ms=3, mfc="white"),
        Line2D([], [], **LLOQ_STYLE),
        Patch(color=VPC_MEDIAN_COLOUR, alpha=0.45),
        Patch(color=PRED_COLOUR, alpha=0.15),
    ]
    labels = ["observed median", "observed 5th / 95th percentile", "LLOQ",
              "simulated median, 90% interval", "simulated 5th / 95th percentile, 90% interval"]
    if with_blq:
        handles += [Line2D([], [], color=OBS_COLOUR, lw=1.2, marker="D", ms=4), Patch(color=BLQ_COLOUR, alpha=0.2)]
        labels += ["observed fraction BLQ", "simulated fraction BLQ, 90% interval"]
    return handles, labels


# --- all at once -------------------------------------------------------------------------------------------


def fit_figures(tree: xr.DataTree, curves: xr.Dataset | None = None, vpc_df: pd.DataFrame | None = None,
                max_subjects: int = 16) -> dict:
    """File name -> Figure for ``individual_fits.png``, ``gof.png`` and ``vpc.png``.

    ``curves`` and ``vpc_df`` are computed with ``carkin.diagnostics`` when not given (the
    first ``max_subjects`` subjects for the individual fits)."""
    if curves is None:
        # the index ignore: a variable of the tree is a DataArray, so .values is an array
        ids = [str(s) for s in tree["constant_data"]["subject"].values[:max_subjects]]  # type: ignore[index]
        curves = diagnostics.individual_curves(tree, subjects=ids)
    if vpc_df is None:
        vpc_df = diagnostics.vpc(tree)
    return {
        "individual_fits.png": plot_individual_fits(tree, curves, max_subjects=max_subjects),
        "gof.png": plot_gof(tree),
        "vpc.png": plot_vpc(vpc_df, labels=_long_names(tree)),
    }


def save_fit_plots(tree: xr.DataTree, out_dir, curves: xr.Dataset | None = None,
                   vpc_df: pd.DataFrame | None = None, max_subjects: int = 16, overwrite: bool = True) -> list[str]:
    """Write the figures of :func:`fit_figures` into ``out_dir`` as one set (carkin.outputs); returns
    their paths."""
    from carkin.outputs import Outputs

    out = Path(out_dir)
    figures = fit_figures(tree, curves, vpc_df, max_subjects)
    with Outputs([out / f for f in figures], overwrite=overwrite, what="fit plots") as outputs:
        for filename, fig in figures.items():
            fig.savefig(outputs.temp(out / filename), dpi=DPI)
    return [str(out / f) for f in figures]


def plot_sbc_ranks(sbc, bins: int = 10, path=None) -> Figure:
    """Rank histograms of a simulation-based calibration, one panel per population parameter, with
    the 99% band of a uniform histogram (binomial counts) shaded: bars outside it, or a slope or a
    U shape across the panels, point at a biased or over/under-confident fit."""
    from scipy.stats import binom

    params = [str(p) for p in sbc["parameter"].values]
    n_draws = int(sbc.attrs["n_draws"])
    n = sbc.sizes["dataset"]
    cols = min(4, len(params))
    rows = -(-len(params) // cols)
    fig = Figure(figsize=(3.0 * cols, 2.3 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    lo, hi = binom.ppf([0.005, 0.995], n, 1.0 / bins)
    for ax, p in zip(axes, params):
        r = sbc["rank"].sel(parameter=p).values
        ax.axhspan(lo, hi, color="0.85", lw=0)
        ax.axhline(n / bins, color="0.5", lw=0.8)
        ax.hist(r, bins=bins, range=(0, n_draws + 1), color="tab:blue", edgecolor="white")
        ax.set_title(p, fontsize="small")
        ax.set_xticks([0, n_draws])
    for ax in axes[len(params):]:
        ax.axis("off")
    fig.supxlabel(f"rank of the true value among {n_draws} posterior draws")
    fig.supylabel("datasets")
    fig.suptitle(f"Simulation-based calibration: {n} prior-simulated datasets (grey: 99% band if uniform)")
    if path is not None:
        save_figure(fig, path, DPI)
    return fig
