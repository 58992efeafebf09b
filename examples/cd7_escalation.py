"""CD7 CAR-T dose escalation: single vs split infusion in a virtual population (the main job, `make run`).

Protocol (NCT06585345): split intravenous infusion of CD7 CAR-T cells, dose
escalation over 1-100 x 10^6 cells/kg. Here each of 5 dose levels (1, 3, 10,
30, 100 x 10^6 cells/kg) is given either as one infusion on day 0 or split
10/30/60% over days 0/1/2: 10 regimens, every virtual subject receiving each
of them (a paired comparison), followed daily for 90 days.

Endpoints per subject: Cmax, Tmax and AUC0-28 of the CAR transgene level
(NCA, linear-up/log-down), and the CD7+ cell nadir in blood over days 0-90 with
its day. The table gives the median and 5th-95th percentile per regimen.

    python examples/cd7_escalation.py --out out                 # 1000 subjects
    python examples/cd7_escalation.py --n-subjects 50 --out /tmp/cd7
"""

# test-outputs: cd7_escalation.nc cd7_escalation_summary.csv cd7_escalation_endpoints.csv
# test-outputs: cd7_escalation_profiles.png cd7_escalation_dose_exposure.png

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

import carkin as ck
from carkin.cli import write_netcdf
from carkin.nca import nca
from carkin.plots import plot_endpoints, plot_panel, regimen_info

DOSE_LEVELS = (1e6, 3e6, 1e7, 3e7, 1e8)  # cells/kg, protocol range 1-100 x 10^6
SPLIT_FRACTIONS = (0.1, 0.3, 0.6)
SPLIT_DAYS = (0.0, 1.0, 2.0)
TIMES = "0:90:1"  # daily, days after the first infusion
NADIR_CANDIDATES = ("cd7_cells", "b_cells")  # the on-target, off-tumour normal cells of the model
ENDPOINTS = ("cmax", "tmax", "auc_0_28", "nadir", "nadir_day")


def regimens():
    single = [ck.single(d) for d in DOSE_LEVELS]
    split = [ck.split(d, fractions=SPLIT_FRACTIONS, days=SPLIT_DAYS) for d in DOSE_LEVELS]
    return single + split


def endpoints(ds) -> pd.DataFrame:
    """One row per (regimen, subject): CAR-level NCA and the normal-cell nadir."""
    res = nca(ds, variable="car_copies")[["cmax", "tmax", "auc_0_28"]]
    table = res.to_dataframe().reset_index()
    nadir_var = next((v for v in NADIR_CANDIDATES if v in ds), None)
    if nadir_var is not None:
        y = ds[nadir_var].sel(time=slice(0, 90))
        table["nadir"] = y.min("time").values.ravel()
        # first day the minimum is reached
        table["nadir_day"] = y["time"].values[y.argmin("time").values].ravel()
    failed = ds["failed"].values.ravel()
    table.loc[failed, [c for c in ENDPOINTS if c in table]] = np.nan  # a failed solve has no endpoints
    table.insert(1, "dose_per_kg", ds["dose_per_kg"].sel(regimen=table["regimen"].to_numpy()).values)
    schedule_of = {r.label: r.schedule for r in regimen_info(ds)}  # "single" / "split 10/30/60% d0/1/2"
    table.insert(2, "schedule", [schedule_of[r] for r in table["regimen"]])
    table["failed"] = failed
    table.attrs["units"] = {"cmax": res["cmax"].attrs["units"], "tmax": "day",
                            "auc_0_28": res["auc_0_28"].attrs["units"], "nadir_day": "day"}
    if nadir_var is not None:
        table.attrs["units"]["nadir"] = ds[nadir_var].attrs.get("units", "")
        table.attrs["nadir_variable"] = nadir_var
    return table


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ENDPOINTS if c in table]
    g = table.groupby(["dose_per_kg", "schedule"], sort=True)
    parts = {"n": g.size(), "n_failed": g["failed"].sum()}
    for c in cols:
        # days are sampled on a daily grid: nearest-rank percentiles keep them whole days
        how = "nearest" if c in ("tmax", "nadir_day") else "linear"
        parts[f"{c}_median"] = g[c].quantile(0.5, interpolation=how)
        parts[f"{c}_p05"] = g[c].quantile(0.05, interpolation=how)
        parts[f"{c}_p95"] = g[c].quantile(0.95, interpolation=how)
    return pd.DataFrame(parts).reset_index()


def _num(x: float) -> str:
    if not np.isfinite(x):
        return "n/a"
    return f"{float(f'{x:.3g}'):,.10g}" if 0.01 <= abs(x) < 1e7 or x == 0 else f"{x:.3g}"


def printable(summary: pd.DataFrame, units: dict, nadir_name: str) -> pd.DataFrame:
    names = {"cmax": "Cmax", "tmax": "Tmax", "auc_0_28": "AUC0-28", "nadir": f"{nadir_name} nadir",
             "nadir_day": "nadir day"}
    out = pd.DataFrame({
        "dose (1e6 cells/kg)": [f"{d / 1e6:g}" for d in summary["dose_per_kg"]],
        "schedule": summary["schedule"],
    })
    for c, name in names.items():
        if f"{c}_median" in summary:
            u = units.get(c, "")
            out[f"{name} ({u})" if u else name] = [
                f"{_num(m)} [{_num(lo)}-{_num(hi)}]"
                for m, lo, hi in zip(summary[f"{c}_median"], summary[f"{c}_p05"], summary[f"{c}_p95"])
            ]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-subjects", type=int, default=1000, help="virtual subjects (default %(default)s)")
    ap.add_argument("--seed", type=int, default=2024, help="population seed (default %(default)s)")
    ap.add_argument("--out", default="out", help="output folder (default %(default)s)")
    ap.add_argument("--model", default="cd7_cart", help="model name (default %(default)s)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model = ck.load_model(args.model)
    regs = regimens()
    print(f"{model.name}: {len(regs)} regimens x {args.n_subjects} virtual subjects (seed {args.seed}), "
          f"daily to day 90", flush=True)

    t0 = time.perf_counter()
    ds = ck.simulate(model, regs, times=TIMES, n_subjects=args.n_subjects, seed=args.seed, progress=True)
    t_sim = time.perf_counter() - t0
    ds.attrs["protocol"] = "NCT06585345 dose escalation, 1-100 x 10^6 CD7 CAR-T cells/kg, single vs split 10/30/60%"

    t0 = time.perf_counter()
    table = endpoints(ds)
    summary = summarise(table)
    t_nca = time.perf_counter() - t0
    units = table.attrs["units"]
    nadir_name = {"cd7_cells": "CD7+", "b_cells": "B-cell"}.get(table.attrs.get("nadir_variable"), "")

    t0 = time.perf_counter()
    write_netcdf(ds, out / "cd7_escalation.nc")
    table.to_csv(out / "cd7_escalation_endpoints.csv", index=False)
    summary.to_csv(out / "cd7_escalation_summary.csv", index=False)
    panel_vars = [v for v in ("car_copies", "cd7_cells", "b_cells", "blasts") if v in ds]
    plot_panel(ds, panel_vars, out / "cd7_escalation_profiles.png",
               title=f"{model.name}: dose escalation, single vs split 10/30/60% (days 0/1/2), "
                     f"{args.n_subjects} virtual subjects")
    metrics = [m for m in ("cmax", "auc_0_28", "nadir") if m in table]
    plot_endpoints(table, metrics, units=units, labels={"nadir": f"{nadir_name} nadir"},
                   path=out / "cd7_escalation_dose_exposure.png",
                   title=f"{model.name}: dose-exposure, median and 5th-95th percentile "
                         f"({args.n_subjects} virtual subjects)")
    t_write = time.perf_counter() - t0

    n_failed = int(table["failed"].sum())
    print()
    print("Median [5th-95th percentile] per regimen" + (f"; {n_failed} failed solves excluded" if n_failed else ""))
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(printable(summary, units, nadir_name).to_string(index=False))
    print()
    print(f"wrote {out}/: cd7_escalation.nc, cd7_escalation_endpoints.csv, cd7_escalation_summary.csv, "
          "cd7_escalation_profiles.png, cd7_escalation_dose_exposure.png")
    print(f"timing: simulate {t_sim:.1f} s (includes JIT compile), endpoints {t_nca:.1f} s, "
          f"files and plots {t_write:.1f} s, total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
