"""carkin simulate: dose levels for the typical subject or a virtual population, NCA and a plot."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

from carkin.cli.common import (
    DEFAULT_DAYS,
    DEFAULT_FRACTIONS,
    DEFAULT_TIMES,
    CliError,
    _add_overwrite,
    _check_size,
    _fmt,
    _load,
    _outputs,
    _print_warnings,
    _regimens,
    _seed,
    _table,
)


def _nca_frame(ds, variable: str):
    """Per (regimen, subject) NCA endpoints as a DataFrame with dose and schedule columns."""
    from carkin.plots.simulation import regimen_info
    from carkin.simulation.nca import nca

    res = nca(ds, variable=variable)
    if "failed" in ds:
        res = res.where(~ds["failed"].astype(bool))  # a failed solve has no trustworthy endpoints
    df = res.to_dataframe().reset_index().drop(columns=["dose_per_kg", "schedule"], errors="ignore")
    info = {r.label: r for r in regimen_info(ds)}
    df.insert(1, "dose_per_kg", [info[str(x)].dose_per_kg for x in df["regimen"]])
    df.insert(2, "schedule", [info[str(x)].schedule for x in df["regimen"]])
    df.attrs["units"] = {k: res[k].attrs.get("units", "") for k in res.data_vars}
    return df


def _summary(df, population: bool) -> str:
    units = df.attrs.get("units", {})
    cols = [("cmax", "Cmax"), ("tmax", "Tmax"), ("auc_0_28", "AUC0-28")]
    header = ["regimen"] + [f"{name} ({units.get(k, '')})" if units.get(k) else name for k, name in cols]
    rows = []
    for label, g in df.groupby("regimen", sort=False):
        row = [label]
        for k, _ in cols:
            v = g[k].dropna()
            if v.empty:
                row.append("n/a")
            elif population:
                # Tmax lies on the output grid: nearest-rank percentiles keep it there
                lo, med, hi = v.quantile([0.05, 0.5, 0.95], interpolation="nearest" if k == "tmax" else "linear")
                row.append(f"{_fmt(med)} [{_fmt(lo)}-{_fmt(hi)}]")
            else:
                row.append(_fmt(v.iloc[0]))
        rows.append(row)
    return _table(rows, header)


def _cmd_simulate(args) -> int:
    import numpy as np

    import carkin as ck
    from carkin.simulation.simulate import parse_times

    if args.n_subjects is not None and args.n_subjects < 1:
        raise CliError(f"--n-subjects must be >= 1, got {args.n_subjects}")
    if args.weight is not None and not (math.isfinite(args.weight) and args.weight > 0):
        raise CliError(f"--weight must be a positive number of kg, got {args.weight:g}")
    out = outputs = None
    model = _load(args.model, args.product_type)
    regimens = _regimens(args)
    times = parse_times(args.times)
    _check_size(args.n_subjects or 1, len(regimens), times.size, len(model.observables))
    if args.out is not None:
        out = Path(args.out)
        if out.suffix != ".nc":
            raise CliError(f"--out must name a netCDF file ending in .nc, got {args.out!r}")
        if out.exists() and out.is_dir():
            raise CliError(f"--out {args.out!r} is a directory; give a file name ending in .nc")
        stem = out.with_suffix("")
        csv = stem.parent / f"{stem.name}_nca.csv"
        png = stem.parent / f"{stem.name}.png"
        outputs = _outputs(args, [out, csv, png], "simulation outputs")
    variable = model.role("exposure", required=False) or model.observables[0].name

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ck.SimulationWarning)
        ds = ck.simulate(model, regimens, times=times, n_subjects=args.n_subjects, weight_kg=args.weight,
                         seed=args.seed, engine=args.engine)
    _print_warnings(caught)
    elapsed = time.perf_counter() - t0
    ds.attrs["history"] = "carkin simulate " + " ".join(args.argv)
    population = args.n_subjects is not None
    df = _nca_frame(ds, variable)

    who = f"{args.n_subjects} virtual subjects" if population else "typical subject"
    n_failed = int(np.asarray(ds["failed"]).sum())
    print(f"{model.name}: {who}, {len(regimens)} regimen(s), days {times[0]:g}-{times[-1]:g} "
          f"({times.size} times), simulated in {elapsed:.1f} s" + (f"; {n_failed} failed solve(s)" if n_failed else ""),
          flush=True)
    print(f"NCA of {variable}" + (": median [5th-95th percentile]" if population else ""))
    print(_summary(df, population))

    if out is not None:
        from carkin.plots.simulation import plot_panel

        assert outputs is not None  # set together with out
        with outputs:
            ds.to_netcdf(outputs.temp(out), engine="h5netcdf")
            df.to_csv(outputs.temp(csv), index=False)
            plot_panel(ds, path=outputs.temp(png))
        print(f"wrote {out}, {csv}, {png}")
    return 0


def add_parser(sub, fmt) -> None:
    """Add this command's subparser to ``sub``."""

    p = sub.add_parser(
        "simulate", help="simulate one or more dose levels (typical subject or a virtual population)",
        formatter_class=fmt,
        description="Simulate a model under one regimen per dose level, print median Cmax, Tmax and AUC0-28 "
                    "per regimen and, with --out, write the Dataset (netCDF), NCA endpoints (CSV) and a plot (PNG).",
        epilog="examples:\n"
               "  carkin simulate --model stein_2019 --dose 1e6\n"
               "  carkin simulate --model cd7_cart --dose 1e6,1e7,1e8 --n-subjects 500 --out out/cd7.nc\n"
               "  carkin simulate --model cd7_cart --dose 3e6 --schedule split --fractions 0.2,0.8 --days 0,3\n"
               "\nwith --out run.nc it writes run.nc (xarray Dataset, dims regimen x subject x time),\n"
               "run_nca.csv (one row per regimen and subject) and run.png (profiles).",
    )
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see 'carkin models')")
    p.add_argument("--dose", required=True, metavar="D1,D2,...",
                   help="total dose level(s) in cells/kg, comma-separated (e.g. 1e6,3e6); one regimen each")
    p.add_argument("--schedule", choices=("single", "split"), default="single",
                   help="single infusion on day 0, or split over several days (default: single)")
    p.add_argument("--fractions", metavar="F1,F2,...",
                   help=f"split only: fraction of the dose per infusion, summing to 1 (default {DEFAULT_FRACTIONS})")
    p.add_argument("--days", metavar="T1,T2,...",
                   help=f"split only: infusion days, one per fraction (default {DEFAULT_DAYS})")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--typical", action="store_true",
                     help="simulate the typical subject (default when --n-subjects is not given)")
    who.add_argument("--n-subjects", type=int, metavar="N",
                     help="simulate a virtual population of N subjects with between-subject variability")
    p.add_argument("--weight", type=float, metavar="KG",
                   help="body weight in kg (default: the model's, 60 kg typical or sampled for a population)")
    p.add_argument("--times", default=DEFAULT_TIMES, metavar="GRID",
                   help="output times in days: start:stop:step or a comma list (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the virtual population (default 0)")
    p.add_argument("--product-type", metavar="TYPE",
                   help="product type, for models that have one (cd7_cart: naturally_selected, knockout, pebl, "
                        "unedited)")
    p.add_argument("--engine", choices=("auto", "closed-form", "ensemble", "fused", "diffrax"), default="auto",
                   help="how the model is solved: its closed form where it has one, else the ensemble ODE solver, "
                        "on a GPU as one kernel (auto, the default); the ensemble solver (ensemble); its one-kernel "
                        "form (fused; interpreted on a CPU, for checking); or the vmapped diffrax solve (the "
                        "reference)")
    p.add_argument("--out", metavar="FILE.nc",
                   help="write FILE.nc, FILE_nca.csv and FILE.png (parent folders are created); "
                        "without it only the summary is printed")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_simulate)
