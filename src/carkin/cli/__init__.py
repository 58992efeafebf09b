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
import os
import re
import sys

from carkin.cli import fit, models, nca, qualify, simulate, trial, whatif
from carkin.cli.common import (
    EXIT_USAGE,
    PROG,
    CliError,  # noqa: F401  (offered here before)
    _Parser,
)
from carkin.cli.trial import _design_options, _flag
from carkin.errors import CarkinError

# one module per command, in the order --help lists them
COMMANDS = (models, simulate, nca, fit, whatif, trial, qualify)


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

    fmt = argparse.RawDescriptionHelpFormatter
    for command in COMMANDS:
        command.add_parser(sub, fmt)
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
