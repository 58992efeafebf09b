"""carkin fit and carkin vpc: a population fit of a NONMEM-style dataset, and its VPC redrawn."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from carkin.cli.common import (
    FIT_FILE,
    FIT_PLOTS,
    CliError,
    _add_overwrite,
    _assignments,
    _check_sampler,
    _check_size,
    _fmt,
    _load,
    _names,
    _outputs,
    _print_warnings,
    _seed,
    _table,
)


def _cmd_fit(args) -> int:
    import carkin as ck
    from carkin.fitting.diagnostics import parameter_table
    from carkin.plots.fit import fit_figures
    from carkin.plots.simulation import DPI

    for opt in ("chains", "warmup", "samples", "svi_steps", "starts"):
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
        common = dict(estimate=_names(args.estimate), fixed=_assignments(args.fix, "--fix"), error=error,
                      variability=_names(args.variability),
                      centred="auto" if args.centred == "auto" else (_names(args.centred) or ()), seed=args.seed,
                      progress=not args.quiet)
        if args.method == "laplace":
            tree = ck.fit(model, data, sampler=ck.Laplace(starts=args.starts, priors=args.map), **common)
        else:
            tree = ck.fit(model, data, method=args.method, chains=args.chains, warmup=args.warmup,
                          samples=args.samples, svi_steps=args.svi_steps, init=args.init, **common)
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
    if "laplace" in tree.children:
        attrs = tree["laplace"].attrs
        print(f"OFV {attrs['ofv']:.3f} (-2 log-likelihood, {attrs['n_observations']} observations; every constant "
              "included, see the fit's laplace group)")
        print(f"{attrs['convergence']}; covariance step: {attrs['covariance_step']}")
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
    from carkin.fitting.observations import n_observations
    from carkin.plots.fit import plot_vpc

    folder = Path(args.fit_dir)
    path = folder / FIT_FILE if folder.is_dir() else folder
    if not path.is_file():
        raise CliError(f"no fit found at {path}; give the --out folder of 'carkin fit' (it holds {FIT_FILE})")
    if args.n_replicates < 1:
        raise CliError(f"--n-replicates must be >= 1, got {args.n_replicates}")
    tree = ck.load_fit(path)
    _check_size(args.n_replicates * max(1, n_observations(tree)), 1, 1, 1, what="VPC replicates")
    out = path.parent
    outputs = _outputs(args, [out / "vpc.csv", out / "vpc.png"], "VPC outputs", manifest="add")
    table = vpc(tree, n_replicates=args.n_replicates, seed=args.seed)
    with outputs:
        table.to_csv(outputs.temp(out / "vpc.csv"), index=False)
        plot_vpc(table).savefig(outputs.temp(out / "vpc.png"), dpi=120)
    print(f"VPC of {tree.attrs['model']} fit ({args.n_replicates} replicates of the study): wrote {out / 'vpc.csv'}, "
          f"{out / 'vpc.png'}")
    return 0


def add_parser(sub, fmt) -> None:
    """Add this command's subparser to ``sub``."""

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
               "  carkin fit data/cd7_sim.csv --model cd7_cart --product-type naturally_selected "
               "--estimate rho,k_kill,d_e,f_blood --method laplace --out out/cd7_laplace\n"
               "\nBad data: every problem is listed (file, row, ID, column) and the exit status is 2.",
    )
    p.add_argument("data", metavar="DATA.csv", help="NONMEM-style CSV (a sidecar DATA.toml beside it is read)")
    p.add_argument("--model", required=True, metavar="NAME", help="model name (see 'carkin models')")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    _add_overwrite(p)
    p.add_argument("--method", choices=("nuts", "svi", "laplace"), default="nuts",
                   help="nuts: full posterior (default); svi: quick variational approximation; laplace: maximum "
                        "likelihood with the random effects integrated out (FOCE-I): estimates, SE/RSE%%, OFV, "
                        "shrinkage and CWRES in minutes")
    p.add_argument("--init", choices=("median", "svi", "laplace"), default="median",
                   help="where NUTS chains start: prior medians (default), an SVI fit's medians, or a Laplace fit's "
                        "estimates and modes")
    p.add_argument("--starts", type=int, default=3, help="Laplace: optimisations from different starts; the best "
                   "is kept (default %(default)s)")
    p.add_argument("--map", action="store_true", help="Laplace: add the log prior (a MAP estimate)")
    p.add_argument("--chains", type=int, default=4, help="NUTS chains (default %(default)s)")
    p.add_argument("--warmup", type=int, default=500, help="NUTS warmup iterations per chain (default %(default)s)")
    p.add_argument("--samples", type=int, default=500, help="NUTS draws per chain (default %(default)s)")
    p.add_argument("--svi-steps", type=int, default=3000, help="SVI optimisation steps (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default %(default)s)")
    p.add_argument("--estimate", metavar="P1,P2,...",
                   help="parameters to estimate (default: all not fixed); the rest stay at the model's values")
    p.add_argument("--variability", metavar="P1,P2,...",
                   help="estimated parameters with between-subject variability (default: those the model gives "
                        "an omega)")
    p.add_argument("--fix", action="append", metavar="NAME=VALUE", help="fix a parameter at a value (repeatable)")
    p.add_argument("--centred", metavar="P1,P2,...",
                   help="random effects to sample centred (mu-referenced), for parameters every subject's data "
                        "pin down; 'auto' centres those with eta-shrinkage below 0.3 in a Laplace fit; check the "
                        "divergences and ESS it gives (default: all non-centred)")
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
