"""carkin whatif: dose levels x schedules over a virtual population, summarised with intervals."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from carkin.cli.common import (
    FIT_FILE,
    CliError,
    _add_overwrite,
    _check_size,
    _fmt,
    _outputs,
    _print_warnings,
    _seed,
    _table,
)


def _summary_rows(table, columns) -> tuple[list[list[str]], list[str]]:
    header = [name for _, name in columns]
    rows = [[_fmt(r[k]) if not isinstance(r[k], str) else r[k] for k, _ in columns] for _, r in table.iterrows()]
    return rows, header


def _cmd_whatif(args) -> int:
    import carkin as ck
    from carkin.plots.simulation import plot_endpoints
    from carkin.plots.trials import plot_dose_response, whatif_table
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
    from carkin.trials.protocol import arms_agreement, comparable_check

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
    for c in checks:
        line = arms_agreement(c)
        if line:
            print(f"  {_fmt(c['dose_per_kg'])} {c['schedule']}: {line}")


def add_parser(sub, fmt) -> None:
    """Add this command's subparser to ``sub``."""

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
