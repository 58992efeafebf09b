"""carkin nca: NCA of observed concentrations in a CSV (long format or a NONMEM dataset)."""

from __future__ import annotations

import math
from pathlib import Path

from carkin.cli.common import CliError, _add_overwrite, _fmt, _numbers, _outputs, _table


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


def add_parser(sub, fmt) -> None:
    """Add this command's subparser to ``sub``."""

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
