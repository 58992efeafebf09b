"""What every carkin command shares: its errors, number and name parsing, output sets and size checks."""

from __future__ import annotations

import argparse
import math
import sys

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
