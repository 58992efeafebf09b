"""Plots of simulated profiles and dose-exposure endpoints (matplotlib).

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so they
need no display, never pile up in pyplot's figure registry in long runs, and
still show inline when returned in a notebook. Axis labels come from the
Dataset's ``long_name``/``units`` attributes.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from carkin.errors import InputError, InputTypeError, UnknownNameError
from carkin.model.kinetics import variable_with_role
from carkin.outputs import save_figure

__all__ = ["plot_endpoints", "plot_panel", "plot_profiles", "regimen_info"]

DPI = 120
DEFAULT_PANEL_ROLES = ("exposure", "exposure_cells", "normal", "tumour")  # panel rows by default, in this order
LINESTYLES = ("-", "--", ":", "-.")
# Log axes spanning more than this many decades bury the interesting part of the
# profile (e.g. blasts falling to 1e-12 %), so the lower limit is clipped.
MAX_DECADES = 6

# Endpoint names used by carkin.nca and the examples, with readable axis labels.
ENDPOINT_LABELS = {
    "cmax": "Cmax",
    "tmax": "Tmax",
    "auc_0_28": "AUC$_{0-28}$",
    "auclast": "AUC$_{last}$",
    "clast": "Clast",
    "half_life": "terminal half-life",
    "nadir": "nadir",
    "nadir_day": "day of nadir",
}


@dataclass(frozen=True)
class RegimenInfo:
    label: str
    dose_per_kg: float
    schedule: str


def _dose_prefix(dose: float) -> str:
    return f"{dose:.3g} cells/kg"


def regimen_info(ds: xr.Dataset) -> list[RegimenInfo]:
    """Label, total dose (cells/kg) and schedule of each regimen in a simulated Dataset.

    The schedule is the label without its leading dose (``"single"``, ``"split
    10/30/60% d0/1/2"``); custom labels that do not start with the dose keep the
    whole label as the schedule.
    """
    if "regimen" in ds.dims:
        labels = [str(x) for x in ds["regimen"].values]
    else:
        labels = [str(ds.attrs.get("regimens", "regimen"))]
    if "schedule" in ds.coords and "dose_per_kg" in ds.coords:  # written by simulate: read, not parsed
        dose_values = np.atleast_1d(np.asarray(ds["dose_per_kg"].values, dtype=float))
        schedules = np.atleast_1d(ds["schedule"].values)
        return [RegimenInfo(label, float(d), str(s)) for label, d, s in zip(labels, dose_values, schedules)]
    # files written before dose and schedule were coordinates: parse the labels
    doses = np.atleast_1d(np.asarray(ds["dose_per_kg"].values, dtype=float)) if "dose_per_kg" in ds else None
    out = []
    for i, label in enumerate(labels):
        dose = float(doses[i]) if doses is not None and doses.size == len(labels) else _dose_from_label(label)
        prefix = _dose_prefix(dose) if math.isfinite(dose) else None
        schedule = label[len(prefix):].strip() if prefix and label.startswith(prefix) else label
        out.append(RegimenInfo(label, dose, schedule or "single"))
    return out


def _dose_from_label(label: str) -> float:
    m = re.match(r"\s*([0-9.eE+-]+)\s*cells/kg", label)
    try:
        return float(m.group(1)) if m else math.nan
    except ValueError:
        return math.nan


def _sci(x: float) -> str:
    """1e6 -> '1×10⁶' style mathtext tick label."""
    if not (math.isfinite(x) and x > 0):
        return f"{x:g}"
    e = math.floor(math.log10(x) + 1e-9)
    m = x / 10**e
    mant = f"{m:.3g}"
    return rf"$10^{{{e}}}$" if mant == "1" else rf"${mant}\times10^{{{e}}}$"


def _axis_label(attrs: dict, fallback: str) -> str:
    name = attrs.get("long_name", fallback)
    units = attrs.get("units")
    return f"{name} ({units})" if units and units != "1" else name


def _is_dose_grid(infos: list[RegimenInfo]) -> bool:
    return all(math.isfinite(r.dose_per_kg) for r in infos) and len({r.dose_per_kg for r in infos}) > 1


def _styles(infos: list[RegimenInfo], colour_by: str = "auto") -> dict:
    """Regimen label -> (colour, line style).

    ``"dose"``: an ordered sequential colour per dose and a line style per
    schedule; ``"schedule"``: a distinct colour per schedule; ``"regimen"``: a
    distinct colour each. ``"auto"`` picks ``"dose"`` when the regimens span
    several doses, else ``"regimen"``.
    """
    import matplotlib

    if colour_by == "auto":
        colour_by = "dose" if _is_dose_grid(infos) else "regimen"
    schedules = list(dict.fromkeys(r.schedule for r in infos))
    cycle = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap
    if colour_by == "dose":
        doses = sorted({r.dose_per_kg for r in infos})
        # stop before viridis' pale yellow end so the highest dose stays visible on white
        cols = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(doses)))
        return {r.label: (cols[doses.index(r.dose_per_kg)], LINESTYLES[schedules.index(r.schedule) % 4])
                for r in infos}
    if colour_by == "schedule":
        return {r.label: (cycle[schedules.index(r.schedule) % 10], "-") for r in infos}
    return {r.label: (cycle[i % 10], "-") for i, r in enumerate(infos)}


def _values(ds: xr.Dataset, variable: str) -> xr.DataArray:
    if variable not in ds:
        have = [k for k, v in ds.data_vars.items() if "time" in v.dims]
        raise UnknownNameError(f"no variable {variable!r} in the Dataset; time-dependent variables are {have}")
    da = ds[variable]
    if "failed" in ds:
        da = da.where(~ds["failed"].astype(bool))  # failed solves must not drag the bands
    if "regimen" not in da.dims:
        da = da.expand_dims(regimen=[regimen_info(ds)[0].label])
    return da.transpose("regimen", "subject", "time")


def _clip_log_limits(ax, lo: float, hi: float, decades: float) -> None:
    if not (math.isfinite(hi) and hi > 0):
        return
    lo = lo if math.isfinite(lo) and lo > 0 else hi / 10**decades
    lo = max(lo, hi / 10**decades)
    ax.set_ylim(lo / 1.5, hi * 1.5)


def plot_profiles(
    ds: xr.Dataset,
    variable: str | None = None,
    ax=None,
    *,
    regimens=None,
    band=(5, 95),
    n_individual: int = 3,
    log: bool = True,
    legend: bool = True,
    title: str | None = None,
    decades: float = MAX_DECADES,
    styles: dict | None = None,
):
    """Time profile of ``variable`` per regimen; returns the figure.

    For a population: the median line, a shaded ``band`` percentile band and
    ``n_individual`` thin individual lines per regimen. For the typical subject:
    one line per regimen. ``regimens`` picks a subset of regimen labels.
    Log-scale y by default (lower limit clipped to ``decades`` below the top). ``variable``
    defaults to the model's exposure (the variable with attribute role='exposure').
    """
    variable = variable or variable_with_role(ds, "exposure") or ""
    da = _values(ds, variable)
    infos = regimen_info(ds)
    if regimens is not None:
        wanted = [str(r) for r in regimens]
        unknown = sorted(set(wanted) - {r.label for r in infos})
        if unknown:
            raise UnknownNameError(f"no regimen(s) {unknown} in the Dataset; regimens are {[r.label for r in infos]}")
        infos = [r for r in infos if r.label in wanted]
    style = styles or _styles(regimen_info(ds))
    if ax is None:
        fig = Figure(figsize=(7.5, 4.5), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.get_figure()
    t = da["time"].values
    population = da.sizes["subject"] > 1
    # stacked bands turn to mud: fainter the more regimens share the axes
    band_alpha = max(0.06, min(0.2, 0.4 / len(infos)))
    lo, hi = math.inf, 0.0
    for info in infos:
        y = da.sel(regimen=info.label).values  # (subject, time)
        colour, ls = style[info.label]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns when every solve failed
            if population:
                q_lo, med, q_hi = np.nanpercentile(y, [band[0], 50, band[1]], axis=0)
            else:
                q_lo = med = q_hi = y[0]
        if population:
            for row in y[: max(0, n_individual)]:
                ax.plot(t, row, color=colour, lw=0.5, alpha=0.35, ls=ls)
            ax.fill_between(t, q_lo, q_hi, color=colour, alpha=band_alpha, lw=0)
        ax.plot(t, med, color=colour, lw=2.0, ls=ls, label=info.label)
        finite = q_lo[np.isfinite(q_lo) & (q_lo > 0)]
        if finite.size:
            lo = min(lo, float(finite.min()))
        if np.isfinite(q_hi).any():
            hi = max(hi, float(np.nanmax(q_hi)))
    if log:
        ax.set_yscale("log")
        _clip_log_limits(ax, lo, hi, decades)
    ax.set_xlabel(_axis_label(da["time"].attrs, "time"))
    ax.set_ylabel(_axis_label(da.attrs, variable))
    ax.set_xlim(t[0], t[-1])
    ax.grid(True, which="major", alpha=0.3)
    if title is not None:
        ax.set_title(title)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        if population:
            handles += [Patch(color="0.6", alpha=0.4), Line2D([], [], color="0.4", lw=0.5)]
            labels += [f"{band[0]}-{band[1]}th percentile", "individual subjects"]
        if len(handles) > 5:  # a long legend would cover the curves: put it beside the axes
            ax.legend(handles, labels, fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
        else:
            ax.legend(handles, labels, fontsize="small", frameon=False)
    return fig


def plot_panel(
    ds: xr.Dataset,
    variables=None,
    path=None,
    *,
    facet: str | None = "auto",
    n_individual: int = 2,
    band=(5, 95),
    title: str | None = None,
    dpi: int = DPI,
):
    """A grid of profile plots, one row (or panel) per observable; saved to ``path`` (PNG) when given.

    ``variables`` defaults to the usual observables present (CAR copies, CAR
    cells, CD7+ or B cells, blasts), else every time-dependent variable.
    ``facet``: ``"dose"`` gives one column per dose with the schedules overlaid
    (colour = schedule), ``"schedule"`` one column per schedule with the doses
    overlaid (colour = dose), ``None`` overlays everything. ``"auto"`` facets by
    dose when the regimens cross several doses with several schedules, so every
    panel compares single vs split at one dose without a pile of bands.
    Rows share their y range. Returns the figure.
    """
    if variables is None:
        variables = [v for v in (variable_with_role(ds, r) for r in DEFAULT_PANEL_ROLES) if v is not None]
        if not variables:
            # the attr-defined ignore: xarray types variable names as Hashable; these are str
            variables = [k for k, v in ds.data_vars.items()
                         if "time" in v.dims and not k.startswith("state_")]  # type: ignore[attr-defined]
    variables = [variables] if isinstance(variables, str) else list(variables)
    if not variables:
        raise InputError("plot_panel: no time-dependent variables to plot")
    for v in variables:
        _values(ds, v)  # fail early with the list of available variables
    if facet not in ("auto", "dose", "schedule", None):
        raise InputError(f"plot_panel: facet must be 'auto', 'dose', 'schedule' or None, got {facet!r}")

    infos = regimen_info(ds)
    schedules = list(dict.fromkeys(r.schedule for r in infos))
    grid_ok = _is_dose_grid(infos)
    if facet == "auto":
        facet = "dose" if grid_ok and len(schedules) > 1 else None
    if facet == "dose" and grid_ok:
        columns: list[float] | list[str] | list[None] = sorted({r.dose_per_kg for r in infos})
        col_of = lambda r: r.dose_per_kg
        col_title = lambda c: f"{_sci(c)} cells/kg"
        style = _styles(infos, "schedule")
    elif facet == "schedule" and len(schedules) > 1:
        columns, col_of, col_title = schedules, (lambda r: r.schedule), str
        style = _styles(infos, "dose" if grid_ok else "regimen")
    else:
        columns, col_of, col_title = [None], (lambda r: None), str
        style = _styles(infos)
    faceted = columns != [None]

    if faceted or len(variables) == 1:
        ncols, nrows = len(columns), len(variables)
        cells: list[list] = [[(v, c) for c in columns] for v in variables]  # (variable, column) or None
    else:
        ncols = 2 if len(variables) == 4 else min(3, len(variables))
        nrows = -(-len(variables) // ncols)
        flat = [(v, None) for v in variables] + [None] * (nrows * ncols - len(variables))
        cells = [flat[i * ncols:(i + 1) * ncols] for i in range(nrows)]

    width = (3.3 if ncols > 3 else 4.4) * ncols + 2.4
    fig = Figure(figsize=(width, 2.9 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    population = ds.sizes.get("subject", 1) > 1
    for i in range(nrows):
        for j in range(ncols):
            ax, cell = axes[i, j], cells[i][j]
            if cell is None:
                ax.set_visible(False)
                continue
            var, col = cell
            regs = [r.label for r in infos if col_of(r) == col]
            plot_profiles(ds, var, ax, regimens=regs, band=band, n_individual=n_individual,
                          legend=False, styles=style)
            attrs = ds[var].attrs
            units = attrs.get("units", "")
            if faceted:
                if i == 0:
                    ax.set_title(col_title(col), fontsize="medium")
                ax.set_ylabel(_wrap(attrs.get("long_name", var)) + (f"\n({units})" if units else "")
                              if j == 0 else "", fontsize="small")
                if i < nrows - 1:
                    ax.set_xlabel("")
            else:
                ax.set_title(_wrap(attrs.get("long_name", var), 45), fontsize="medium")
                ax.set_ylabel(units)
                # shared x: only the lowest panel of each column keeps its x label and tick labels
                below = cells[i + 1][j] if i + 1 < nrows else None
                if below is None:
                    ax.xaxis.set_tick_params(labelbottom=True)
                else:
                    ax.set_xlabel("")
    if faceted:
        # one y range per row so the columns compare at a glance
        for i in range(nrows):
            lows, highs = zip(*(axes[i, j].get_ylim() for j in range(ncols)))
            for j in range(ncols):
                axes[i, j].set_ylim(min(lows), max(highs))

    handles, labels = _panel_legend(infos, style, facet if faceted else None, population, band)
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
    model = ds.attrs.get("model", "")
    pop = ds.attrs.get("population", "")
    fig.suptitle(title or " — ".join(x for x in (model, pop) if x), fontsize="large")
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def _wrap(text: str, width: int = 30) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _panel_legend(infos, style, facet, population, band):
    handles, labels = [], []
    if facet == "dose":
        for r in infos:  # one entry per schedule (colour)
            if r.schedule not in labels:
                handles.append(Line2D([], [], color=style[r.label][0], lw=2))
                labels.append(r.schedule)
    elif _is_dose_grid(infos):
        for r in infos:  # one entry per dose (colour), then per schedule (line style) if shown together
            lab = f"{_sci(r.dose_per_kg)} cells/kg"
            if lab not in labels:
                handles.append(Line2D([], [], color=style[r.label][0], lw=2))
                labels.append(lab)
        if facet is None:
            for r in infos:
                if r.schedule not in labels and len({x.schedule for x in infos}) > 1:
                    handles.append(Line2D([], [], color="0.2", ls=style[r.label][1]))
                    labels.append(r.schedule)
    else:
        handles += [Line2D([], [], color=style[r.label][0], lw=2) for r in infos]
        labels += [r.label for r in infos]
    if population:
        handles += [Line2D([], [], color="0.2", lw=2), Patch(color="0.6", alpha=0.4),
                    Line2D([], [], color="0.4", lw=0.5)]
        labels += ["median", f"{band[0]}-{band[1]}th percentile", "individual subjects"]
    return handles, labels


def _endpoint_frame(table_or_nca, metrics) -> tuple[pd.DataFrame, dict]:
    """Long table with dose_per_kg, schedule and the metric columns, plus units."""
    units = {}
    if isinstance(table_or_nca, xr.Dataset):
        nca = table_or_nca
        missing = [m for m in metrics if m not in nca]
        if missing:
            raise UnknownNameError(f"plot_endpoints: no {missing} in the NCA Dataset; it has {list(nca.data_vars)}")
        units = {m: nca[m].attrs.get("units", "") for m in metrics}
        if "regimen" not in nca.dims:
            raise InputError(
                "plot_endpoints: the NCA Dataset needs a 'regimen' dimension (simulate a list of regimens)"
            )
        df = nca[list(metrics)].to_dataframe().reset_index()
        by_label = {r.label: r for r in regimen_info(nca)}
        df["dose_per_kg"] = [by_label[str(x)].dose_per_kg for x in df["regimen"]]
        df["schedule"] = [by_label[str(x)].schedule for x in df["regimen"]]
    elif isinstance(table_or_nca, pd.DataFrame):
        df = table_or_nca.copy()
        units = dict(df.attrs.get("units", {}))
        if "dose_per_kg" not in df and "regimen" in df:
            df["dose_per_kg"] = [_dose_from_label(str(x)) for x in df["regimen"]]
        if "schedule" not in df:
            if "regimen" in df:
                df["schedule"] = [
                    (str(x)[len(_dose_prefix(d)):].strip() or "single") if str(x).startswith(_dose_prefix(d))
                    else str(x)
                    for x, d in zip(df["regimen"], df["dose_per_kg"])
                ]
            else:
                df["schedule"] = "single"
        missing = [c for c in ("dose_per_kg", *metrics) if c not in df]
        if missing:
            raise UnknownNameError(f"plot_endpoints: table has no column(s) {missing}; columns are {list(df.columns)}")
    else:
        raise InputTypeError(
            f"plot_endpoints: expected a pandas DataFrame or an NCA xarray.Dataset, got {type(table_or_nca).__name__}"
        )
    return df, units


def plot_endpoints(
    table_or_nca,
    metrics=("cmax", "auc_0_28"),
    *,
    interval=(5, 95),
    units: dict | None = None,
    labels: dict | None = None,
    path=None,
    title: str | None = None,
    dpi: int = DPI,
):
    """Dose-exposure plot: each metric against total dose on log-log axes.

    ``table_or_nca`` is either a per-subject table (columns ``dose_per_kg``,
    ``schedule`` or ``regimen``, and the metrics) or the Dataset returned by
    ``carkin.nca`` on a multi-regimen simulation. Markers are medians, bars the
    ``interval`` percentiles; schedules sit side by side at each dose. Units come
    from ``units``, the Dataset attributes or ``DataFrame.attrs["units"]``;
    ``labels`` maps metric names to axis names. Returns the figure (saved to ``path`` when given).
    """
    import matplotlib
    import matplotlib.ticker

    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    df, found_units = _endpoint_frame(table_or_nca, metrics)
    found_units.update(units or {})
    schedules = list(dict.fromkeys(df["schedule"]))
    doses = np.sort(df["dose_per_kg"].dropna().unique())
    colours = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap
    fig = Figure(figsize=(4.4 * len(metrics) + 0.6, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)[0])
    # spread schedules over +/- 6% of a dose (log x) so their bars do not overlap
    shift = {s: 10 ** (0.05 * (k - (len(schedules) - 1) / 2)) for k, s in enumerate(schedules)}
    for ax, metric in zip(axes, metrics):
        positive = True
        for k, sched in enumerate(schedules):
            sub = df[df["schedule"] == sched]
            stats = sub.groupby("dose_per_kg")[metric].agg(
                median="median",
                lo=lambda x: np.nanpercentile(x, interval[0]) if x.notna().any() else np.nan,
                hi=lambda x: np.nanpercentile(x, interval[1]) if x.notna().any() else np.nan,
                n="count",
            ).sort_index()
            if stats.empty:
                continue
            x = stats.index.to_numpy(float) * shift[sched]
            med = stats["median"].to_numpy(float)
            yerr = np.vstack([med - stats["lo"].to_numpy(float), stats["hi"].to_numpy(float) - med])
            one_each = bool((stats["n"] <= 1).all())
            ax.errorbar(x, med, yerr=None if one_each else yerr, color=colours[k % 10], marker="o", ms=5,
                        capsize=3, lw=1.2, label=sched)
            positive &= bool(np.all(stats["lo"].dropna() > 0) and np.all(med[np.isfinite(med)] > 0))
        ax.set_xscale("log")
        if positive:
            ax.set_yscale("log")
        ax.set_xticks(doses, [_sci(d) for d in doses])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the dose levels are ticked
        ax.set_xlabel("total dose (cells/kg)")
        name = {**ENDPOINT_LABELS, **(labels or {})}.get(metric, metric)
        unit = found_units.get(metric, "")
        ax.set_ylabel(f"{name} ({unit})" if unit and unit != "1" else name)
        ax.set_title(name, fontsize="medium")
        ax.grid(True, which="major", alpha=0.3)
    n_sub = df.groupby(["schedule", "dose_per_kg"]).size()
    many = bool(len(n_sub) and n_sub.max() > 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)), fontsize="small",
               frameon=False)
    note = f"median and {interval[0]}-{interval[1]}th percentile" if many else "typical subject"
    fig.suptitle(title or f"Dose-exposure ({note})", fontsize="large")
    if path is not None:
        save_figure(fig, path, dpi)
    return fig
