"""Figures of what-if grids and dose-escalation trials (matplotlib): dose-response curves with their
interval over draws, and one simulated trial beside the design's operating characteristics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from carkin.outputs import save_figure
from carkin.plots.simulation import DPI, _sci

__all__ = ["plot_dose_response", "plot_trial", "whatif_table"]


def whatif_table(ds: xr.Dataset) -> pd.DataFrame:
    """Per-subject endpoints of a what-if Dataset as a long table (dose_per_kg, schedule, endpoints)."""
    names = [k for k in ("cmax", "tmax", "auc_0_28", "nadir", "recovery_day", "tumour_reduction", "p_dlt")
             if k in ds]
    df = ds[names].where(~ds["failed"].astype(bool)).to_dataframe().reset_index()
    df = df.rename(columns={"dose": "dose_per_kg"})
    df.attrs["units"] = {k: ds[k].attrs.get("units", "") for k in names}
    return df


def plot_dose_response(ds: xr.Dataset, *, path=None, dpi: int = DPI, title: str | None = None, published=()):
    """Population probabilities against dose, one line per schedule: P(DLT), MRD negativity on
    day 28 and the fraction whose normal cells recover, with the 90% interval over draws
    (posterior or calibration) when the Dataset has a ``draw`` dimension. ``published``: dicts
    with dose_per_kg, p, low, high (published arms and their 95% interval) drawn on the P(DLT) panel."""
    import matplotlib

    panels = [(k, lab) for k, lab in (("p_dlt", "P(DLT)"), ("mrd_negative", "MRD-negative on day 28"),
                                      ("recovered", "normal cells back to half of baseline")) if k in ds or
              (k == "recovered" and "recovery_day" in ds)]
    fig = Figure(figsize=(4.2 * len(panels) + 0.6, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    colours = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]  # tab10 is a ListedColormap
    doses = ds["dose"].values
    ok = ~ds["failed"].astype(bool)
    for ax, (key, label) in zip(axes, panels):
        value = np.isfinite(ds["recovery_day"]) if key == "recovered" else ds[key]
        value = value.astype(float).where(ok)  # type: ignore[union-attr]  # np.isfinite keeps the DataArray
        for j, sched in enumerate(ds["schedule"].values):
            v = value.sel(schedule=sched)
            pooled = [d for d in ("draw", "subject") if d in v.dims]
            ax.plot(doses, v.mean(pooled).values, marker="o", color=colours[j % 10], label=str(sched))
            if "draw" in v.dims:
                per_draw = v.mean("subject")
                ax.fill_between(doses, per_draw.quantile(0.05, "draw").values, per_draw.quantile(0.95, "draw").values,
                                color=colours[j % 10], alpha=0.2, lw=0)
        if key == "p_dlt" and published:
            for k, arm in enumerate(published):
                ax.errorbar([arm["dose_per_kg"]], [arm["p"]], yerr=[[arm["p"] - arm["low"]], [arm["high"] - arm["p"]]],
                            fmt="s", color="black", capsize=3, label="published arms (95% CI)" if k == 0 else None)
        ax.set_xscale("log")
        ax.set_xticks(doses, [_sci(d) for d in doses])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("total dose (cells/kg)")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize="medium")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)), fontsize="small",
               frameon=False)
    band = " (band: 90% interval over draws)" if "draw" in ds.dims else ""
    fig.suptitle(title or f"Dose-response, population fraction{band}", fontsize="large")
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def plot_trial(patients: xr.Dataset, oc: dict, *, path=None, dpi: int = DPI, title: str | None = None):
    """An escalation trial: the example trial's patients by enrolment order and dose (DLTs marked),
    and the design's operating characteristics (probability of selecting each dose, expected
    patients per dose) over the simulated trials."""
    doses = list(oc["doses_per_kg"])
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    ax_path, ax_oc = fig.subplots(1, 2)
    level = np.searchsorted(doses, patients["patient_dose"].values) + 1
    dlt = patients["patient_dlt"].values.astype(bool)
    number = patients["patient"].values
    ax_path.step(number, level, where="mid", color="0.6", lw=1)
    ax_path.scatter(number[~dlt], level[~dlt], marker="o", color="tab:blue", label="no DLT", zorder=3)
    ax_path.scatter(number[dlt], level[dlt], marker="X", s=70, color="tab:red", label="DLT", zorder=3)
    ax_path.set_yticks(range(1, len(doses) + 1), [_sci(d) for d in doses])
    ax_path.set_xlabel("patient (enrolment order)")
    ax_path.set_ylabel("dose (cells/kg)")
    ax_path.set_title("one simulated trial", fontsize="medium")
    ax_path.legend(fontsize="small", loc="upper left")
    ax_path.grid(True, alpha=0.3)
    if "p_select" in oc:
        labels = ["none"] + [_sci(d) for d in doses]
        x = np.arange(len(labels))
        err = oc.get("se_p_select")
        ax_oc.bar(x - 0.2, oc["p_select"], width=0.4, color="tab:green", label="P(selected as MTD)",
                  yerr=None if err is None else 1.96 * np.asarray(err, float), capsize=2)
        ax2 = ax_oc.twinx()
        ax2.bar(x[1:] + 0.2, oc["expected_n_per_dose"], width=0.4, color="tab:grey", alpha=0.7,
                label="expected patients")
        ax2.set_ylabel("expected patients per dose")
        ax_oc.set_xticks(x, labels)
        ax_oc.set_ylim(0, 1)
        ax_oc.set_ylabel("probability of selection")
        ax_oc.set_xlabel("dose (cells/kg)")
        handles = ax_oc.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax_oc.legend(handles, ["P(selected as MTD)", "expected patients"], fontsize="small", loc="upper left")
        ax_oc.set_title(f"operating characteristics, {oc.get('n_trials')} simulated trials", fontsize="medium")
    else:  # single-arm study: no selection
        ax_oc.axis("off")
        ax_oc.text(0.02, 0.5, "\n".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                        for k, v in oc.items() if k.startswith(("expected", "p_", "n_"))),
                   family="monospace", fontsize="small", va="center")
    fig.suptitle(title or f"{oc.get('protocol', '')}: {oc.get('design', '')}", fontsize="large")
    if path is not None:
        save_figure(fig, path, dpi)
    return fig
