"""carkin trial: dose-escalation trials from a protocol file, or a design's operating characteristics."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from carkin.cli.common import (
    CliError,
    _add_overwrite,
    _check_trial_size,
    _fmt,
    _numbers,
    _outputs,
    _print_warnings,
    _seed,
    _table,
)
from carkin.cli.whatif import _summary_rows


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

    from carkin.trials.operating import exact_operating_characteristics, simulate_trials

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
    from carkin.plots.trials import plot_trial
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


def add_parser(sub, fmt) -> None:
    """Add this command's subparser to ``sub``."""

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
