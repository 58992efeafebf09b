"""carkin qualify: a model held against every published row it claims to describe."""

from __future__ import annotations

import time

from carkin.cli.common import CliError, _add_overwrite, _outputs, _seed, _table


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


def add_parser(sub, fmt) -> None:
    """Add this command's subparser to ``sub``."""

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
