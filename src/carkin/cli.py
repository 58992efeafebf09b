"""The ``carkin`` command line: list models, simulate dose regimens, run NCA on a CSV, fit data.

    carkin models
    carkin simulate --model cd7_cart --dose 1e6,1e7 --schedule split --n-subjects 500 --out out/run.nc
    carkin nca data.csv --id ID --time TIME --dv DV --out nca.csv
    carkin fit data/stein_sim.csv --model stein_2019 --out out/fit
    carkin vpc out/fit

User errors (bad numbers, unknown model, missing file or column) end with one
line ``carkin: error: ...`` on stderr and exit status 2. Set CARKIN_DEBUG=1 to
get the full traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

from carkin.errors import CarkinError

DEFAULT_FRACTIONS = "0.1,0.3,0.6"
DEFAULT_DAYS = "0,1,2"
DEFAULT_TIMES = "0:90:1"
EXIT_USAGE = 2
PROG = "carkin"


class CliError(CarkinError):
    """A user error with a message fit for one line on stderr."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors use the same one-line format as carkin's own."""

    def error(self, message):
        raise CliError(f"{message} (see '{self.prog} --help')")


# --- small parsing helpers -------------------------------------------------------------------


def _seed(text: str) -> int:
    """--seed: a whole number the random generators take."""
    from carkin.guards import check_seed

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    try:
        return check_seed(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (without it, a run whose outputs exist is refused before "
                        "any work)")


def _numbers(text: str, what: str, *, positive: bool = False, nonnegative: bool = False) -> list[float]:
    items = [x.strip() for x in str(text).split(",")]
    if not items or any(x == "" for x in items):
        raise CliError(f"{what}: give a comma-separated list of numbers, got {text!r}")
    out = []
    for x in items:
        try:
            v = float(x)
        except ValueError:
            raise CliError(f"{what}: {x!r} is not a number") from None
        if not math.isfinite(v):
            raise CliError(f"{what}: {x!r} is not a finite number")
        if positive and v <= 0:
            raise CliError(f"{what}: values must be > 0, got {x}")
        if nonnegative and v < 0:
            raise CliError(f"{what}: values must be >= 0, got {x}")
        out.append(v)
    return out


def _fmt(x) -> str:
    """3 significant digits; thousands separators instead of exponents in the readable range."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return "n/a"
    if x == 0 or 1e-2 <= abs(x) < 1e7:
        return f"{float(f'{x:.3g}'):,.10g}"
    return f"{x:.3g}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    """Plain aligned text table (first column left, the rest right-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


# --- subcommands --------------------------------------------------------------------------------


def _cmd_models(args) -> int:
    from carkin.model.library import list_models

    models = list_models()
    if not models:
        print("no models found")
        return 0
    width = max(len(n) for n in models)
    for name, title in models.items():
        print(f"{name.ljust(width)}  {title}")
    return 0


def _load(name: str, product_type: str | None):
    from carkin.model.library import load_model

    options = {}
    if product_type is not None:  # only models that know the option get it
        options["product_type"] = product_type
    try:
        return load_model(name, **options)
    except TypeError as e:
        if product_type is not None and "product_type" in str(e):
            raise CliError(f"model {name!r} takes no --product-type option") from None
        raise


def _regimens(args):
    import carkin as ck

    doses = _numbers(args.dose, "--dose (cells/kg)", positive=True)
    if len(set(doses)) != len(doses):
        raise CliError(f"--dose: dose levels must be distinct, got {args.dose!r}")
    if args.schedule == "single":
        if args.fractions is not None or args.days is not None:
            raise CliError("--fractions and --days apply to --schedule split only")
        return [ck.single(d) for d in doses]
    fractions = _numbers(args.fractions or DEFAULT_FRACTIONS, "--fractions", nonnegative=True)
    days = _numbers(args.days or DEFAULT_DAYS, "--days (days)", nonnegative=True)
    if len(fractions) != len(days):
        raise CliError(f"--fractions has {len(fractions)} values but --days has {len(days)}; give one fraction per day")
    return [ck.split(d, fractions=tuple(fractions), days=tuple(days)) for d in doses]


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
                         seed=args.seed)
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


def _cmd_nca(args) -> int:
    import pandas as pd

    from carkin.simulation.nca import nca_long

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such file: {args.file}")
    try:  # missing values as the dataset reader takes them: empty, NONMEM's '.' or NA
        df = pd.read_csv(path, na_values=[".", "NA"], keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {args.file} as CSV: {e}") from None
    df = _nonmem_frame(df)
    for opt in ("id", "time", "dv", "blq", "lloq_col"):  # NONMEM ignores the case of column names
        setattr(args, opt, _column_named(df, getattr(args, opt)))
    wanted = {"--id": args.id, "--time": args.time, "--dv": args.dv, "--blq": args.blq, "--lloq-col": args.lloq_col}
    missing = [f"{opt} {col!r}" for opt, col in wanted.items() if col is not None and col not in df.columns]
    if missing:
        raise CliError(f"{args.file} has no column {', '.join(missing)}; its columns are {list(df.columns)}")
    for opt, col in (("--time", args.time), ("--dv", args.dv)):
        if not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            raise CliError(f"{opt} column {col!r} must be numeric; first bad value {df[col][bad].iloc[0]!r}")
    if args.lloq is not None and not (math.isfinite(args.lloq) and args.lloq >= 0):
        raise CliError(f"--lloq must be a finite number >= 0, got {args.lloq:g}")

    window = None
    if args.lambda_z_window is not None:
        window = _numbers(args.lambda_z_window, "--lambda-z-window")
        if len(window) != 2 or not window[0] < window[1]:
            raise CliError(f"--lambda-z-window must be START,END in days with START < END, "
                           f"got {args.lambda_z_window!r}")
    if args.min_span_ratio is not None and not (math.isfinite(args.min_span_ratio) and args.min_span_ratio >= 0):
        raise CliError(f"--min-span-ratio must be a finite number >= 0 (0: no rule), got {args.min_span_ratio:g}")
    outputs = _outputs(args, [args.out], "NCA table") if args.out else None
    res = nca_long(df, id_col=args.id, time_col=args.time, dv_col=args.dv, blq_col=args.blq,
                   lloq_col=args.lloq_col, lloq=args.lloq, method=args.method, partial_end=args.partial_end,
                   lambda_z_window=window, min_span_ratio=args.min_span_ratio,
                   contraction_end=args.contraction_end)
    header = list(res.columns)
    rows = [[str(r[c]) if c == args.id else _fmt(r[c]) for c in header] for _, r in res.iterrows()]
    print(f"NCA of {args.dv} vs {args.time} (days), {len(res)} profile(s), method {args.method}")
    print(_table(rows, header))
    if outputs is not None:
        with outputs:
            res.to_csv(outputs.temp(args.out), index=False)
        print(f"wrote {args.out}")
    return 0


def _column_named(df, name):
    """``name`` as the file spells it when only the letter case differs (None stays None)."""
    if name is None or name in df.columns:
        return name
    match = [c for c in df.columns if str(c).upper() == name.upper()]
    return match[0] if len(match) == 1 else name


def _nonmem_frame(df):
    """Records flagged in a C column dropped (NONMEM's IGNORE=C), and only observation records (EVID 0 or
    no EVID, MDV 0 or no MDV) kept, so a NONMEM dataset can be given to NCA as it is."""
    import pandas as pd

    cols = {str(c).upper(): c for c in df.columns}
    if "C" in cols:
        flag = df[cols["C"]]
        df = df[flag.isna() | (flag.astype(str).str.strip().isin(["", "0", "0.0"]))]
    for item in ("EVID", "MDV"):  # dose records and records without an observation
        if item in cols:
            df = df[pd.to_numeric(df[cols[item]], errors="coerce").fillna(0) == 0]
    return df.reset_index(drop=True)


FIT_FILE = "fit.nc"
FIT_PLOTS = ("individual_fits.png", "gof.png", "vpc.png")  # what carkin.fitplots.save_fit_plots writes


def _outputs(args, paths, what: str, manifest: bool | str = False):
    """A command's output set, checked (writable, not already there unless --overwrite) before any work."""
    from carkin.outputs import OutputError, Outputs

    try:
        return Outputs(paths, overwrite=getattr(args, "overwrite", False), what=what, manifest=manifest)
    except OutputError as e:
        raise CliError(str(e)) from None


def _check_size(n_subjects: int, n_regimens: int, n_times: int, n_series: int, what: str = "simulation") -> None:
    """Refuse a run whose outputs would not fit in memory, before it starts."""
    from carkin.guards import check_memory

    try:
        check_memory(8 * float(n_subjects) * n_regimens * n_times * n_series, what,
                     "use fewer subjects or times, or stream a large population to disk with "
                     "carkin.stream.simulate_to_netcdf")
    except ValueError as e:
        raise CliError(str(e)) from None


def _check_trial_size(protocol, args) -> None:
    n = args.n_subjects or protocol.n_subjects
    draws = max(1, args.calibration_draws)
    _check_size(n * draws, len(protocol.doses), int(max(90, *protocol.sampling_days)) + 1, 4, what="trial simulation")
    n_trials = args.n_trials or protocol.design.get("n_trials", 1000)
    from carkin.trials.protocol import MAX_TRIALS

    if n_trials > MAX_TRIALS:
        raise CliError(f"--n-trials {n_trials} is above the limit of {MAX_TRIALS:,} simulated trials (the Monte Carlo "
                       "error of the operating characteristics is then below 0.1 percentage point); give fewer")


def _check_sampler(tree) -> None:
    """A chain that never moved makes every summary meaningless: refuse before writing anything."""
    from carkin.fitting.convergence import stuck_chains

    stuck = stuck_chains(tree)
    if stuck:
        raise CliError(f"NUTS chain(s) {stuck} did not move (every draw the same): the sampler is stuck, nothing was "
                       "written. Try --method svi first, fix fewer parameters with --fix, or more --warmup; check the "
                       "data's units and the model against the data")


def _assignments(items, what: str) -> dict:
    """NAME=VALUE pairs (repeatable option or comma list) -> dict of floats."""
    out = {}
    for item in (x for chunk in items or () for x in chunk.split(",") if x.strip()):
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"{what}: expected NAME=VALUE, got {item!r}")
        out[name.strip()] = _numbers(value, f"{what} {name.strip()}")[0]
    return out


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def _print_warnings(caught) -> None:
    for w in caught:  # one readable line per warning instead of warnings' two-line format
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)


def _cmd_fit(args) -> int:
    import carkin as ck
    from carkin.fitting.diagnostics import parameter_table
    from carkin.plots.fit import fit_figures
    from carkin.plots.simulation import DPI

    for opt in ("chains", "warmup", "samples", "svi_steps"):
        if getattr(args, opt) < 1:
            raise CliError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    data_path = Path(args.data)
    if not data_path.is_file():
        raise CliError(f"no such file: {args.data}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out!r} is a file; give a folder for the fit's outputs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ck.read_dataset(data_path)
    _print_warnings(w for w in caught if issubclass(w.category, UserWarning))
    plots = [] if args.no_plots else [out / name for name in FIT_PLOTS]
    outputs = _outputs(args, [out / FIT_FILE, out / "parameters.csv", *plots], "fit outputs", manifest=True)
    model = _load(args.model, args.product_type)
    error = args.error
    if error and "=" in error:
        items = [x.partition("=") for x in error.split(",")]
        if any(not sep or not v.strip() for _, sep, v in items):
            raise CliError(f"--error: give one kind for all observables, or OBS=KIND for each, got {args.error!r}")
        error = {k.strip(): v.strip() for k, _, v in items}
    print(f"fitting {model.name} to {data_path} ({data.n_subjects} subjects, {data.n_obs} observations, "
          f"{int(data.obs_blq.sum())} BLQ) by {args.method.upper()}", flush=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = ck.fit(model, data, estimate=_names(args.estimate), fixed=_assignments(args.fix, "--fix"),
                      error=error, centred=_names(args.centred) or (), method=args.method, chains=args.chains,
                      warmup=args.warmup, samples=args.samples, seed=args.seed, svi_steps=args.svi_steps,
                      progress=not args.quiet)
    _print_warnings(w for w in caught if issubclass(w.category, UserWarning))
    elapsed = time.perf_counter() - t0
    tree.attrs["history"] = "carkin fit " + " ".join(args.argv)
    _check_sampler(tree)  # a stuck chain is reported before anything is written
    fit_file = str(out / FIT_FILE)
    table = parameter_table(tree)
    figures = {} if args.no_plots else fit_figures(tree)  # computed first: the write phase only writes
    with outputs:
        tree.to_netcdf(outputs.temp(fit_file), engine="h5netcdf")
        table.to_csv(outputs.temp(out / "parameters.csv"), index=False)
        for name, fig in figures.items():
            fig.savefig(outputs.temp(out / name), dpi=DPI)
    paths = [str(out / name) for name in figures]
    cols = [c for c in table.columns if c not in ("units", "description")]
    rows = [[str(r["parameter"])] + [_fmt(r[c]) for c in cols[1:]] for _, r in table.iterrows()]
    print(f"done in {elapsed:.1f} s")
    print(_table(rows, cols))
    if args.method == "nuts":
        from carkin.fitting.diagnostics import loo

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            elpd = loo(tree)
        bad_k = int((elpd.pareto_k.values > elpd.good_k).sum())
        note = f"; {bad_k} observation(s) with Pareto k > {elpd.good_k:.2f} (LOO unreliable there)" if bad_k else ""
        print(f"PSIS-LOO: elpd_loo {elpd.elpd:.1f} (SE {elpd.se:.1f}), p_loo {elpd.p:.1f}{note}")
    print(f"wrote {fit_file}, {out / 'parameters.csv'}" + "".join(f", {p}" for p in paths))
    return 0


def _cmd_vpc(args) -> int:
    import carkin as ck
    from carkin.fitting.diagnostics import vpc
    from carkin.plots.fit import plot_vpc

    folder = Path(args.fit_dir)
    path = folder / FIT_FILE if folder.is_dir() else folder
    if not path.is_file():
        raise CliError(f"no fit found at {path}; give the --out folder of 'carkin fit' (it holds {FIT_FILE})")
    if args.n_replicates < 1:
        raise CliError(f"--n-replicates must be >= 1, got {args.n_replicates}")
    tree = ck.load_fit(path)
    _check_size(args.n_replicates * max(1, tree["observed_data"].sizes.get("obs", 1)), 1, 1, 1, what="VPC replicates")
    out = path.parent
    outputs = _outputs(args, [out / "vpc.csv", out / "vpc.png"], "VPC outputs", manifest="add")
    table = vpc(tree, n_replicates=args.n_replicates, seed=args.seed)
    with outputs:
        table.to_csv(outputs.temp(out / "vpc.csv"), index=False)
        plot_vpc(table).savefig(outputs.temp(out / "vpc.png"), dpi=120)
    print(f"VPC of {tree.attrs['model']} fit ({args.n_replicates} replicates of the study): wrote {out / 'vpc.csv'}, "
          f"{out / 'vpc.png'}")
    return 0


def _summary_rows(table, columns) -> tuple[list[list[str]], list[str]]:
    header = [name for _, name in columns]
    rows = [[_fmt(r[k]) if not isinstance(r[k], str) else r[k] for k, _ in columns] for _, r in table.iterrows()]
    return rows, header


def _cmd_whatif(args) -> int:
    import carkin as ck
    from carkin.plots.simulation import plot_dose_response, plot_endpoints, whatif_table
    from carkin.trials.protocol import read_protocol, simulate_protocol
    from carkin.trials.whatif import summarize

    protocol = read_protocol(args.protocol)
    if args.n_subjects is not None and args.n_subjects < 1:
        raise CliError(f"--n-subjects must be >= 1, got {args.n_subjects}")
    if args.n_draws < 1:
        raise CliError(f"--n-draws must be >= 1, got {args.n_draws}")
    if args.calibration_draws < 0:
        raise CliError(f"--calibration-draws must be >= 0, got {args.calibration_draws}")
    if args.calibration_draws and args.posterior is not None:
        raise CliError("give --posterior (a fit) or --calibration-draws, not both")
    out = Path(args.out)
    model = protocol.load_model()
    n_draws = args.calibration_draws or (args.n_draws if args.posterior else 1)
    _check_size((args.n_subjects or protocol.n_subjects) * n_draws * len(protocol.compare), len(protocol.doses),
                int(max(90, *protocol.sampling_days, *protocol.marrow_days)) + 1, len(model.states) + 2)
    outputs = _outputs(args, [out / n for n in ("whatif.nc", "whatif_summary.csv", "dose_exposure.png",
                                                "dose_response.png")], "what-if outputs", manifest=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ck.SimulationWarning)
        posterior = None
        if args.posterior is not None:
            fit_path = Path(args.posterior)
            fit_path = fit_path / FIT_FILE if fit_path.is_dir() else fit_path
            if not fit_path.is_file():
                raise CliError(f"--posterior: no fit at {fit_path}")
            posterior = ck.load_fit(fit_path)
        calibrated = args.calibration_draws > 0
        ds = simulate_protocol(protocol, n_subjects=args.n_subjects, seed=args.seed, posterior=posterior,
                               n_draws=args.calibration_draws if calibrated else args.n_draws,
                               calibration=calibrated)
    _print_warnings(caught)
    ds.attrs.update(protocol=protocol.id, history="carkin whatif " + " ".join(args.argv))
    table = summarize(ds)
    cols = [("dose_per_kg", "dose (cells/kg)"), ("schedule", "schedule"), ("cmax_median", "Cmax median"),
            ("tmax_median", "Tmax median (d)"), ("auc_0_28_median", "AUC0-28 median")]
    cols += [(k, name) for k, name in (("nadir_median", "normal-cell nadir"), ("recovery_day_median", "recovery day"),
                                       ("mrd_negative", "P(MRD-neg d28)"), ("p_dlt", "P(DLT)"),
                                       ("dose_received_median", "dose received")) if k in table]
    for k in ("mrd_negative", "p_dlt"):  # with draws: the interval over draws beside the value
        if f"{k}_p5" in table:
            table[f"{k}_interval"] = [f"{_fmt(a)}-{_fmt(b)}" for a, b in zip(table[f"{k}_p5"], table[f"{k}_p95"])]
            cols.insert(cols.index((k, dict(cols)[k])) + 1, (f"{k}_interval", "90% over draws"))
    rows, header = _summary_rows(table, cols)
    print(f"{protocol.id}: {protocol.title}")
    kind = "calibration" if ds.attrs.get("population") == "calibration draws" else "posterior"
    draws = f" x {ds.sizes['draw']} {kind} draws" if "draw" in ds.dims else ""
    print(f"{protocol.model}, {ds.sizes['subject']} virtual patients{draws} x {ds.sizes['dose']} doses x "
          f"{ds.sizes['schedule']} schedules in {time.perf_counter() - t0:.1f} s; median over patients, "
          "probabilities as population fractions")
    print(_table(rows, header))
    _print_comparable(protocol, ds)
    metrics = [m for m in ("cmax", "auc_0_28", "nadir") if m in ds]
    with outputs:
        ds.to_netcdf(outputs.temp(out / "whatif.nc"), engine="h5netcdf")
        table.to_csv(outputs.temp(out / "whatif_summary.csv"), index=False)
        plot_endpoints(whatif_table(ds), metrics, path=outputs.temp(out / "dose_exposure.png"),
                       title=f"{protocol.id}: dose-exposure (median, 5-95th percentile)")
        plot_dose_response(ds, path=outputs.temp(out / "dose_response.png"), title=f"{protocol.id}: dose-response")
    print(f"wrote {out / 'whatif.nc'}, {out / 'whatif_summary.csv'}, {out / 'dose_exposure.png'}, "
          f"{out / 'dose_response.png'}")
    return 0


def _print_comparable(protocol, ds) -> None:
    """P(DLT) of the what-if arms against the published arms the protocol file names as comparable."""
    from carkin.trials.protocol import comparable_check

    checks = comparable_check(protocol, ds)
    if not checks:
        print("no published arm is comparable in toxicity to this protocol's arms (see its [evidence] table): "
              "P(DLT) here rests on the link's extrapolation")
        return
    rows = [[_fmt(c["dose_per_kg"]), c["schedule"], _fmt(c["p_dlt"]),
             f"{int(c['published_events'])}/{int(c['published_n'])}",
             f"{_fmt(c['interval_low'])}-{_fmt(c['interval_high'])}", "yes" if c["passed"] else "NO"]
            for c in checks]
    print("P(DLT) against comparable published arms (grade >= 3 CRS, 95% Clopper-Pearson interval of the pooled "
          "arms; other doses have no comparable arm):")
    print(_table(rows, ["dose (cells/kg)", "schedule", "carkin P(DLT)", "published", "95% interval", "inside"]))


def _flag(option_name: str) -> str:
    return "--" + option_name.replace("_", "-")


def _design_options() -> dict:
    """Every option of every registered design (carkin.trials.DESIGNS), by name, with the designs taking it."""
    from carkin.trials.designs import DESIGNS

    out: dict = {}
    for key, cls in DESIGNS.items():
        for o in cls.options:
            out.setdefault(o.name, (o, []))[1].append(key)
    return out


def _design_from_args(args):
    from carkin.trials.designs import DESIGNS, design_from_options

    if args.design is None:
        raise CliError(f"give a PROTOCOL.toml, or --design ({', '.join(DESIGNS)}) with --p-dlt")
    own = {o.name for o in DESIGNS[args.design].options}
    given = {name: getattr(args, name) for name in _design_options() if getattr(args, name, None) is not None}
    for name, (_, takers) in _design_options().items():
        if name in given and name not in own:
            raise CliError(f"{_flag(name)} applies to --design {' or '.join(takers)} only")
    for o in DESIGNS[args.design].options:
        if o.kind == "floats" and o.name in given:
            given[o.name] = tuple(_numbers(given[o.name], _flag(o.name)))
        if o.required and o.name not in given:
            raise CliError(f"--design {args.design} needs {_flag(o.name)} ({o.help})")
    return design_from_options(args.design, given)


def _cmd_trial_design(args) -> int:
    import json

    from carkin.trials.designs import exact_operating_characteristics, simulate_trials

    if args.p_dlt is None:
        raise CliError("give a PROTOCOL.toml, or --design with --p-dlt (DLT probability per dose, e.g. 0.05,0.1,0.2)")
    p = _numbers(args.p_dlt, "--p-dlt")
    if any(not 0 <= x <= 1 for x in p):
        raise CliError(f"--p-dlt: probabilities must lie in [0, 1], got {args.p_dlt}")
    design = _design_from_args(args)
    if args.exact:
        from carkin.trials.designs import DESIGNS

        if not DESIGNS[args.design].exact:
            exact = " or ".join(k for k, c in DESIGNS.items() if c.exact)
            raise CliError(f"--exact works for --design {exact}; use --n-trials for {args.design}")
        oc = exact_operating_characteristics(design, p)
    else:
        if args.n_trials is None or args.n_trials < 1:
            raise CliError("give --exact, or --n-trials N (>= 1) for a Monte Carlo estimate")
        oc = simulate_trials(design, p_dlt=p, n_trials=args.n_trials, seed=args.seed)
    result = oc.to_dict()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['design']}" + (f" ({result['variant']})" if result.get("variant") else "")
          + f", {result['method']}" + (f", {result['n_trials']} trials" if result.get("n_trials") else ""))
    rows = [["none", "", _fmt(result["p_select"][0]), "", ""]]
    rows += [[f"dose {k + 1}", _fmt(p[k]), _fmt(result["p_select"][k + 1]), _fmt(result["expected_n_per_dose"][k]),
              _fmt(result["expected_dlt_per_dose"][k])] for k in range(len(p))]
    print(_table(rows, ["", "P(DLT)", "P(select)", "E[n]", "E[DLT]"]))
    print(f"expected subjects {_fmt(result['expected_n'])}, expected DLTs {_fmt(result['expected_dlt'])}")
    return 0


def _cmd_trial(args) -> int:
    if args.protocol is None:
        return _cmd_trial_design(args)
    if args.design is not None:
        raise CliError("give either a PROTOCOL.toml or --design options, not both")
    if args.out is None:
        raise CliError("with a PROTOCOL.toml, --out DIR is required")
    import json

    import pandas as pd

    import carkin as ck
    from carkin.plots.simulation import plot_trial
    from carkin.trials.protocol import read_protocol, run_protocol_trial

    protocol = read_protocol(args.protocol)
    for opt in ("n_trials", "n_subjects"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise CliError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    if args.calibration_draws < 0:
        raise CliError(f"--calibration-draws must be >= 0, got {args.calibration_draws}")
    _check_trial_size(protocol, args)
    out = Path(args.out)
    outputs = _outputs(args, [out / n for n in ("trial.nc", "operating_characteristics.json", "trial_summary.csv",
                                                "trial_patients.csv", "trial.png")], "trial outputs", manifest=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ck.SimulationWarning)
        ds, oc = run_protocol_trial(protocol, n_trials=args.n_trials, n_subjects=args.n_subjects, seed=args.seed,
                                    calibration_draws=args.calibration_draws)
    _print_warnings(caught)
    ds.attrs["history"] = "carkin trial " + " ".join(args.argv)
    rows = []
    pop_cmax = ds["population_cmax"].median("subject").values
    for k, dose in enumerate(protocol.doses):
        row = {"dose_per_kg": dose, "population_p_dlt": oc["p_dlt_per_dose"][k],
               "population_cmax_median": pop_cmax[k]}
        if "p_dlt_per_dose_p05" in oc:
            row["p_dlt_90pct_over_draws"] = f"{_fmt(oc['p_dlt_per_dose_p05'][k])}-{_fmt(oc['p_dlt_per_dose_p95'][k])}"
        if "p_select" in oc:
            row.update(p_select=oc["p_select"][k + 1], expected_n=oc["expected_n_per_dose"][k],
                       expected_dlt=oc["expected_dlt_per_dose"][k])
        rows.append(row)
    summary = pd.DataFrame(rows)
    # the attr-defined ignore: xarray types variable names as Hashable; these are str
    patient_cols = [k for k in ds.data_vars
                    if k.startswith("patient_") and ds[k].dims == ("patient",)]  # type: ignore[attr-defined]
    with outputs:
        ds.to_netcdf(outputs.temp(out / "trial.nc"), engine="h5netcdf")
        outputs.temp(out / "operating_characteristics.json").write_text(json.dumps(oc, indent=1))
        summary.to_csv(outputs.temp(out / "trial_summary.csv"), index=False)
        ds[patient_cols].to_dataframe().to_csv(outputs.temp(out / "trial_patients.csv"))
        plot_trial(ds, oc, path=outputs.temp(out / "trial.png"), title=f"{protocol.id}: {oc['design']}")
    print(f"{protocol.id}: {protocol.title}")
    print(f"design {oc['design']}" + (f" ({oc['variant']})" if oc.get("variant") else "")
          + f"; {oc['n_trials']} simulated trials; DLT link: {protocol.dlt.name}; in {time.perf_counter() - t0:.1f} s")
    cols = [(c, c) for c in summary.columns]
    table_rows, header = _summary_rows(summary, cols)
    if "p_select" in oc:
        none = [""] * len(header)
        none[0], none[header.index("p_select")] = "none", _fmt(oc["p_select"][0])
        table_rows.insert(0, none)
    print(_table(table_rows, header))
    n_pat = ds.sizes["patient"]
    print(f"example trial: {n_pat} patients, {int(ds['patient_dlt'].sum())} DLT(s)"
          + (f", selected dose {_fmt(oc['example_trial_selected_dose'])} cells/kg"
             if oc.get("example_trial_selected_dose") else ""))
    print(f"wrote {out / 'trial.nc'}, {out / 'trial_summary.csv'}, {out / 'trial_patients.csv'}, "
          f"{out / 'operating_characteristics.json'}, {out / 'trial.png'}")
    return 0


def _cmd_qualify(args) -> int:
    from carkin.model.library import list_models
    from carkin.qualification.qualify import model_claims, qualify, summary_lines

    if args.all == (args.model is not None):
        raise CliError("give one MODEL or --all")
    names = [m for m in list_models() if model_claims(m)] if args.all else [args.model]
    if not args.all and args.model not in list_models():
        raise CliError(f"unknown model {args.model!r}; available models: {', '.join(list_models())}")
    if args.n_subjects is not None and args.n_subjects < 1:
        raise CliError(f"--n-subjects must be >= 1, got {args.n_subjects}")
    outputs = _outputs(args, [args.out], "qualification table") if args.out else None
    frames, unexpected = [], 0
    for name in names:
        t0 = time.perf_counter()
        table = qualify(name, **{k: v for k, v in (("n", args.n_subjects), ("seed", args.seed)) if v is not None})
        frames.append(table)
        print(f"{name}: {len(table)} line(s) from {table['row_id'].nunique()} evidence row(s) in "
              f"{time.perf_counter() - t0:.1f} s")
        lines, bad = summary_lines(table)
        unexpected += bad
        print(_table(lines, ["row", "role", "quantity", "reported (source)", "carkin", "tolerance", "pass"]))
        for _, r in table.iterrows():
            if r["note"] and "known failure" in r["note"]:
                print(f"  {r['row_id']}: {r['note'][r['note'].index('known failure'):]}")
        print()
    if args.out:
        import pandas as pd

        assert outputs is not None  # set when args.out is
        with outputs:
            pd.concat(frames).to_csv(outputs.temp(args.out), index=False)
        print(f"wrote {args.out}")
    if unexpected:
        print(f"{unexpected} line(s) disagree with their claim's mark (an unmarked failure or a marked row that "
              "passes)")
    return 1 if unexpected else 0


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="carkin: CAR-T / CAR-NK cellular kinetics - models, dose regimens, simulation, NCA, population "
                    "fitting, what-if runs and dose-escalation trials.",
        epilog="Run 'carkin COMMAND --help' for the options of a command. Units: doses in cells/kg "
               "(total over all infusions), times in days after the first infusion.",
    )
    from carkin import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("models", help="list the models in the library",
                       description="List the models in the library with a one-line description each.")
    p.set_defaults(func=_cmd_models)

    fmt = argparse.RawDescriptionHelpFormatter
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
    p.add_argument("--out", metavar="FILE.nc",
                   help="write FILE.nc, FILE_nca.csv and FILE.png (parent folders are created); "
                        "without it only the summary is printed")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "nca", help="non-compartmental analysis of a long-format CSV (one row per sample)",
        formatter_class=fmt,
        description="NCA of observed data: Cmax, Tmax, AUC0-28, AUClast, Clast, Tlast, the terminal phase "
                    "(lambda_z, half-life, span ratio) and the contraction phase (Tmax to --contraction-end) per "
                    "subject. Times must be in days.",
        epilog="BLQ handling: a sample is BLQ when DV is missing, its --blq flag is non-zero or DV < LLOQ\n"
               "(--lloq-col per row, else --lloq). BLQ before the first quantifiable sample counts as 0,\n"
               "after it as missing.\n"
               "Terminal phase: log-linear fits on the last k >= 3 points after Tmax (inside --lambda-z-window);\n"
               "best adjusted R² (ties within 1e-4: most points); NaN unless lambda_z > 0 and the fit spans at\n"
               "least --min-span-ratio half-lives.\n\nexample:\n"
               "  carkin nca pk.csv --id ID --time TIME --dv DV --lloq 10 --out nca.csv",
    )
    p.add_argument("file", metavar="FILE.csv", help="long-format CSV, one row per sample")
    p.add_argument("--id", default="ID", metavar="COL", help="subject id column (default %(default)s)")
    p.add_argument("--time", default="TIME", metavar="COL", help="time column, in days (default %(default)s)")
    p.add_argument("--dv", default="DV", metavar="COL",
                   help="concentration column, e.g. copies/µg gDNA (default %(default)s)")
    p.add_argument("--blq", metavar="COL", help="column flagging BLQ samples (non-zero = BLQ)")
    p.add_argument("--lloq-col", metavar="COL", help="column with each sample's lower limit of quantification")
    p.add_argument("--lloq", type=float, metavar="VALUE",
                   help="one LLOQ for all samples, in the DV's units (used where --lloq-col is absent or empty)")
    p.add_argument("--method", choices=("linear", "linear-up/log-down"), default="linear-up/log-down",
                   help="AUC trapezoid rule (default %(default)s)")
    p.add_argument("--partial-end", type=float, default=28.0, metavar="DAY",
                   help="end of the partial AUC in days (default %(default)s: AUC0-28)")
    p.add_argument("--lambda-z-window", metavar="START,END",
                   help="days whose samples may enter the terminal fit (default: every sample after Tmax)")
    p.add_argument("--min-span-ratio", type=float, default=2.0, metavar="R",
                   help="terminal fits spanning fewer half-lives are not estimable (default %(default)s; 0: no rule)")
    p.add_argument("--contraction-end", type=float, default=28.0, metavar="DAY",
                   help="last day of the contraction-phase fit after Tmax (default %(default)s)")
    p.add_argument("--out", metavar="RESULT.csv", help="also write the results to this CSV")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_nca)

    p = sub.add_parser(
        "fit", help="fit a population model to a NONMEM-style dataset (NUTS, or SVI for a quick look)",
        formatter_class=fmt,
        description="Fit a model's population parameters (typical values, between-subject variability, residual "
                    "error) to a NONMEM-style CSV (ID, TIME in days, EVID, AMT, DV, DVID, BLQ/LLOQ, covariates; "
                    "optional TOML sidecar beside it). BLQ records enter as censored (M3). Writes the fit "
                    f"({FIT_FILE}, an ArviZ DataTree), parameters.csv (also printed) and plots to --out.",
        epilog="examples:\n"
               "  carkin fit data/stein_sim.csv --model stein_2019 --out out/stein\n"
               "  carkin fit data/cd7_sim.csv --model cd7_cart --estimate rho,k_kill,d_e,f_blood --method svi "
               "--out out/cd7\n"
               "\nBad data: every problem is listed (file, row, ID, column) and the exit status is 2.",
    )
    p.add_argument("data", metavar="DATA.csv", help="NONMEM-style CSV (a sidecar DATA.toml beside it is read)")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see 'carkin models')")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    _add_overwrite(p)
    p.add_argument("--method", choices=("nuts", "svi"), default="nuts",
                   help="nuts: full posterior (default); svi: quick variational approximation")
    p.add_argument("--chains", type=int, default=4, help="NUTS chains (default %(default)s)")
    p.add_argument("--warmup", type=int, default=500, help="NUTS warmup iterations per chain (default %(default)s)")
    p.add_argument("--samples", type=int, default=500, help="NUTS draws per chain (default %(default)s)")
    p.add_argument("--svi-steps", type=int, default=3000, help="SVI optimisation steps (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default %(default)s)")
    p.add_argument("--estimate", metavar="P1,P2,...",
                   help="parameters to estimate (default: all not fixed); the rest stay at the model's values")
    p.add_argument("--fix", action="append", metavar="NAME=VALUE", help="fix a parameter at a value (repeatable)")
    p.add_argument("--centred", metavar="P1,P2,...",
                   help="random effects to sample centred (mu-referenced), for parameters every subject's data "
                        "pin down; check the divergences and ESS it gives (default: all non-centred)")
    p.add_argument("--error", metavar="KIND | OBS=KIND,...",
                   help="residual error: log-additive, proportional or combined, for all observables or per "
                        "observable (default: log-additive)")
    p.add_argument("--product-type", metavar="TYPE", help="product type, for models that have one")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("vpc", help="redraw the visual predictive check of a saved fit",
                       description="Simulate the study design of a saved fit from its posterior and redraw the "
                                   "BLQ-aware visual predictive check (vpc.csv and vpc.png in the fit's folder).")
    p.add_argument("fit_dir", metavar="DIR", help=f"the --out folder of 'carkin fit' (or its {FIT_FILE})")
    p.add_argument("--n-replicates", type=int, default=200, help="simulated replicates of the study "
                   "(default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default %(default)s)")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_vpc)

    p = sub.add_parser(
        "whatif", help="simulate a protocol's dose levels x schedules (single vs split) for its population",
        formatter_class=fmt,
        description="Simulate every dose level of a protocol under its schedule and the alternative (single vs "
                    "10/30/60 split) for a virtual population drawn from its eligibility ranges: Cmax, Tmax, "
                    "AUC0-28, normal-cell nadir and recovery, tumour reduction and MRD negativity on day 28, and "
                    "the DLT probability from the toxicity link. Writes whatif.nc, whatif_summary.csv, "
                    "dose_exposure.png and dose_response.png.",
        epilog="example:\n  carkin whatif examples/protocols/cd7_cart_split_escalation.toml --out out/whatif",
    )
    p.add_argument("protocol", metavar="PROTOCOL.toml", help="protocol file (see examples/protocols/)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    _add_overwrite(p)
    p.add_argument("--n-subjects", type=int, metavar="N", help="virtual patients (default: the protocol's)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default %(default)s)")
    p.add_argument("--posterior", metavar="FIT", help="a 'carkin fit' folder or fit.nc of the protocol's model: "
                   "parameters from posterior draws, so their uncertainty propagates")
    p.add_argument("--n-draws", type=int, default=20, help="posterior draws with --posterior (default %(default)s)")
    p.add_argument("--calibration-draws", type=int, default=0, metavar="D",
                   help="run over D draws of the model's calibration (population values and DLT link, see "
                        "'carkin qualify'), so P(DLT) and P(MRD-negative) come with 90%% intervals (default 0: the "
                        "calibrated values only)")
    p.set_defaults(func=_cmd_whatif)

    p = sub.add_parser(
        "trial", help="simulate a protocol's dose-escalation trial, or a design's operating characteristics",
        formatter_class=fmt,
        description="With PROTOCOL.toml: simulate the trial end to end (virtual patients per dose from the kinetic "
                    "model, DLTs from the toxicity link, the escalation design) and write trial.nc, "
                    "trial_summary.csv, trial_patients.csv, operating_characteristics.json and trial.png. "
                    "Without it: operating characteristics of a design for given DLT probabilities per dose.",
        epilog="examples:\n"
               "  carkin trial examples/protocols/cd7_carnk_accelerated_titration.toml --out out/trial\n"
               "  carkin trial --design 3+3 --variant escalation-only --p-dlt 0.05,0.1,0.2 --exact --json\n"
               "  carkin trial --design 3+3 --accelerated-doses 1 --p-dlt 0.02,0.08,0.25 --n-trials 100000 --seed 1\n"
               "  carkin trial --design boin --target 0.3 --cohort-size 3 --n-cohorts 10 --p-dlt 0.05,0.1,0.3,0.5 "
               "--n-trials 10000\n"
               "\n3+3 variants: escalation-only (stop at the first dose with >= 2 DLTs; MTD = the dose below);\n"
               "de-escalation (go down and expand the lower dose to 6; MTD = highest dose with <= 1/6 DLTs).",
    )
    p.add_argument("protocol", nargs="?", metavar="PROTOCOL.toml", help="protocol file (see examples/protocols/)")
    p.add_argument("--out", metavar="DIR", help="output folder (protocol mode)")
    _add_overwrite(p)
    p.add_argument("--n-subjects", type=int, metavar="N",
                   help="virtual patients per dose level (default: the protocol's)")
    from carkin.trials.designs import DESIGNS

    p.add_argument("--design", choices=tuple(DESIGNS), help="design-only mode: the escalation design")
    p.add_argument("--p-dlt", metavar="P1,P2,...", help="DLT probability per dose, lowest dose first")
    for o, takers in _design_options().values():  # each registered design's own settings
        kinds: dict[str, dict] = {"int": dict(type=int, metavar="N"), "float": dict(type=float),
                                  "floats": dict(metavar="V1,V2,..."), "str": dict(choices=o.choices or None)}
        default = "" if o.default is None else f"; default {o.default}"
        p.add_argument(_flag(o.name), default=None, help=f"{o.help} ({', '.join(takers)}{default})", **kinds[o.kind])
    p.add_argument("--exact", action="store_true", help="exact operating characteristics (3+3, enumerating paths)")
    p.add_argument("--n-trials", type=int, metavar="N", help="simulated trials (Monte Carlo)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default %(default)s)")
    p.add_argument("--json", action="store_true", help="design-only mode: print the result as JSON")
    p.add_argument("--calibration-draws", type=int, default=0, metavar="D",
                   help="protocol mode: run the trials over D calibration draws (each trial in one draw), so "
                        "P(DLT) per dose and the selection probabilities come with 90%% intervals (default 0)")
    p.set_defaults(func=_cmd_trial)

    p = sub.add_parser(
        "qualify", help="hold a model against every published row it claims to describe",
        formatter_class=fmt,
        description="For every evidence row the model claims (data/evidence/, the model's claims): the reported value "
                    "and its source, carkin's value from a virtual arm of the row's design, the tolerance and "
                    "whether it passes. Rows the model is known not to meet stay in the table, marked with the "
                    "reason. Exit status 1 when a row fails that is not marked, or a marked row passes.",
        epilog="examples:\n  carkin qualify cd7_cart\n  carkin qualify --all --out out/qualification.csv",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="a library model (see 'carkin models')")
    p.add_argument("--all", action="store_true", help="every library model with claims")
    p.add_argument("--n-subjects", type=int, default=None, metavar="N",
                   help="virtual patients per design (default: as the calibration)")
    p.add_argument("--seed", type=_seed, default=None, help="virtual-population seed (default: as the calibration)")
    p.add_argument("--out", metavar="FILE.csv", help="also write the table as CSV")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_qualify)
    return parser


# Options whose value may be a negative number, which argparse would take for an option flag.
_NUMERIC_OPTIONS = ("--dose", "--fractions", "--days", "--times", "--weight", "--lloq", "--partial-end", "--seed",
                    "--n-subjects", "--chains", "--warmup", "--samples", "--svi-steps", "--n-replicates", "--n-trials",
                    "--p-dlt", "--calibration-draws", "--min-span-ratio", "--contraction-end")


def _glue_negative_values(argv: list[str]) -> list[str]:
    """'--dose -1e6' -> '--dose=-1e6' so the value reaches carkin's own check and its clear message."""
    numeric = _NUMERIC_OPTIONS + tuple(_flag(name) for name, (o, _) in _design_options().items() if o.kind != "str")
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if tok in numeric and re.match(r"^-\.?\d", nxt):
            out.append(f"{tok}={nxt}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split())
    return msg or type(e).__name__


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(_glue_negative_values(argv))
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        from carkin.config import configure

        configure()  # every core a device; compiled programs cached on disk for the next run
        args.argv = argv
        return args.func(args)
    # carkin's own errors (CarkinError: bad input, explained numerical failures) and the system's file
    # errors (OSError: missing file, no permission, disk full) are one line; anything else is a bug
    # and keeps its traceback.
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output file was changed (outputs are replaced only when complete)",
              file=sys.stderr)
        return 130
    except Exception as e:
        from carkin.fitting.data import DatasetError

        if not isinstance(e, (CarkinError, OSError)):
            raise
        if os.environ.get("CARKIN_DEBUG"):
            raise

        # A dataset's problems are listed one per line, all of them; other errors fit on one line.
        text = str(e) if isinstance(e, DatasetError) else _one_line(e)
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
