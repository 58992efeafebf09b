"""CD7 CAR-T dose escalation: single vs split infusion over the calibration's uncertainty (the main job, `make run`).

Protocol (NCT06585345, examples/protocols/cd7_cart_split_escalation.toml): CD7 CAR-T (naturally
selected product) at 1, 3, 10, 30 and 100 x 10^6 cells/kg, split 10/30/60% over days 0-2 with a
hold rule, set beside a single infusion of the same dose, in r/r CD7+ acute leukaemia. The model
(cd7_cart) and the toxicity link (grade >= 3 CRS from peak expansion and marrow burden) are
calibrated against published arms (data/evidence/, calibration/calibrate.py); every virtual
patient is simulated under each of several calibration draws, so each result carries the interval
that the evidence leaves open.

Printed per dose and schedule: Cmax (median and 5-95th percentile over patients), P(grade >= 3 CRS)
and P(MRD-negative on day 28) with their 90% intervals over draws, and what published evidence
exists at that dose; then the split-versus-single difference with its interval; then P(DLT) against
the comparable published arms.

    python examples/cd7_escalation.py --out out                       # 200 patients x 20 draws
    python examples/cd7_escalation.py --n-subjects 20 --draws 2 --out /tmp/cd7
"""

# test-outputs: cd7_escalation.nc cd7_escalation_summary.csv cd7_escalation_split_vs_single.csv
# test-outputs: cd7_escalation_dose_exposure.png cd7_escalation_dose_response.png

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

import carkin as ck
from carkin.outputs import Outputs
from carkin.plots import plot_dose_response, plot_endpoints, whatif_table
from carkin.trials.protocol import arms_agreement, comparable_check, read_protocol, simulate_protocol
from carkin.trials.whatif import summarize

ck.configure()  # every CPU core a JAX device; compiled programs cached on disk

PROTOCOL = Path(__file__).resolve().parent / "protocols" / "cd7_cart_split_escalation.toml"
INTERVAL = (5, 95)


def _num(x: float) -> str:
    if not np.isfinite(x):
        return "n/a"
    return f"{float(f'{x:.3g}'):,.10g}" if 0.01 <= abs(x) < 1e7 or x == 0 else f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if np.isfinite(x) else "n/a"


def evidence_at(protocol, dose: float, schedule: str) -> str:
    """What published toxicity evidence stands at this dose and schedule."""
    for c in protocol.comparable:
        if c.dose_per_kg == dose and (schedule == c.schedule or schedule.startswith(c.schedule)):
            events, n = c.pooled()
            return f"{int(events)}/{int(n)} published"
    return "thin: no published arm"


def _mean_difference(a, b, both, name):
    """Per draw: mean over patients of ``name`` under schedule a minus under b (patients solved under both)."""
    mean = lambda x: x[name].astype(float).where(both).mean("subject")  # noqa: E731
    return (mean(a) - mean(b)).values


def split_vs_single(ds, split: str, single: str) -> pd.DataFrame:
    """Per dose: the split/single ratio of median Cmax and the differences in P(DLT) and P(MRD-negative),
    each as the mean over calibration draws with its 90% interval (paired: same patients, same draw)."""
    rows = []
    ok = ~ds["failed"].astype(bool)
    for dose in ds["dose"].values:
        cell = ds.sel(dose=dose)
        a, b = cell.sel(schedule=split), cell.sel(schedule=single)
        both = ok.sel(dose=dose, schedule=split) & ok.sel(dose=dose, schedule=single)
        ratio = (a["cmax"].where(both).median("subject") / b["cmax"].where(both).median("subject")).values

        row = {"dose_per_kg": float(dose)}
        for name, v in (("cmax_ratio", ratio), ("delta_p_dlt", _mean_difference(a, b, both, "p_dlt")),
                        ("delta_p_mrd_negative", _mean_difference(a, b, both, "mrd_negative"))):
            lo, hi = np.percentile(v, INTERVAL)
            row.update({name: float(np.mean(v)), f"{name}_p{INTERVAL[0]}": float(lo),
                        f"{name}_p{INTERVAL[1]}": float(hi)})
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-subjects", type=int, default=200, help="virtual patients per draw (default %(default)s)")
    ap.add_argument("--draws", type=int, default=20, help="calibration draws (default %(default)s)")
    ap.add_argument("--seed", type=int, default=2024, help="population seed (default %(default)s)")
    ap.add_argument("--out", default="out", help="output folder (default %(default)s)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    names = ("cd7_escalation.nc", "cd7_escalation_summary.csv", "cd7_escalation_split_vs_single.csv",
             "cd7_escalation_dose_exposure.png", "cd7_escalation_dose_response.png")
    # The main job owns its output files and refreshes them on every run; they are replaced as one set
    # only when all are written, so an interrupted run leaves the previous results intact.
    outputs = Outputs([out / n for n in names], overwrite=True, what="main job outputs")
    t_start = time.perf_counter()

    protocol = read_protocol(PROTOCOL)
    print(f"{protocol.id}: {protocol.title}")
    print(f"{protocol.model} ({protocol.model_options.get('product_type', '')}), {args.n_subjects} virtual patients "
          f"x {args.draws} calibration draws x {len(protocol.doses)} doses x 2 schedules (seed {args.seed})",
          flush=True)
    t0 = time.perf_counter()
    ds = simulate_protocol(protocol, n_subjects=args.n_subjects, seed=args.seed, calibration=True,
                           n_draws=args.draws)
    t_sim = time.perf_counter() - t0
    ds.attrs["protocol"] = protocol.id

    table = summarize(ds)
    ok = ~ds["failed"].astype(bool)
    early = [float(ds["dlt_exposure"].sel(dose=d, schedule=sc).where(ok.sel(dose=d, schedule=sc)).median())
             for d, sc in zip(table["dose_per_kg"], table["schedule"])]
    table["dlt_exposure_median"] = early
    split = next(s for s in ds["schedule"].values if str(s).startswith("split"))
    single = next(s for s in ds["schedule"].values if str(s) == "single")
    diff = split_vs_single(ds, str(split), str(single))
    checks = comparable_check(protocol, ds)

    printable = pd.DataFrame({
        "dose (1e6/kg)": [f"{d / 1e6:g}" for d in table["dose_per_kg"]],
        "schedule": table["schedule"],
        "Cmax median [5-95%] (copies/µg)": [f"{_num(m)} [{_num(lo)}-{_num(hi)}]" for m, lo, hi in
                                            zip(table["cmax_median"], table["cmax_p5"], table["cmax_p95"])],
        "days 0-3 peak median (copies/µg)": [_num(v) for v in early],
        "P(CRS>=3) [90% draws]": [f"{_pct(m)} [{_pct(lo)}-{_pct(hi)}]" for m, lo, hi in
                                  zip(table["p_dlt"], table["p_dlt_p5"], table["p_dlt_p95"])],
        "P(MRD-neg d28) [90% draws]": [f"{_pct(m)} [{_pct(lo)}-{_pct(hi)}]" for m, lo, hi in
                                       zip(table["mrd_negative"], table["mrd_negative_p5"],
                                           table["mrd_negative_p95"])],
        "toxicity evidence": [evidence_at(protocol, d, s) for d, s in zip(table["dose_per_kg"], table["schedule"])],
    })
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 40):
        print()
        print("Dose-exposure and dose-response (Cmax over patients; probabilities as population fractions, with "
              "the 90% interval over calibration draws)")
        print(printable.to_string(index=False))
        print("Peak expansion (Cmax) is nearly flat over 100-fold doses: antigen, not dose, ends expansion, as for "
              "tisagenlecleucel over 0.2-5e6/kg (no dose-exposure relation: Mueller 2018, doi:10.1158/1078-0432."
              "CCR-18-0758; Awasthi 2020, doi:10.1182/bloodadvances.2019000525). The level in the first three days, "
              "when CRS begins, scales with dose and drives P(CRS>=3) (carkin.toxicity). A BCMA dose-finding trial "
              "saw peaks rise from 0.3-1e6 to 3-9e6/kg (kinetics.csv, nci_bcma_*), which this model does not "
              "reproduce.")
        print()
        print(f"{split} against single, paired (same patients, same draw): mean [90% interval over draws]")
        print(pd.DataFrame({
            "dose (1e6/kg)": [f"{d / 1e6:g}" for d in diff["dose_per_kg"]],
            "Cmax ratio (median)": [f"{m:.3g} [{lo:.3g}-{hi:.3g}]" for m, lo, hi in
                                    zip(diff["cmax_ratio"], diff["cmax_ratio_p5"], diff["cmax_ratio_p95"])],
            "delta P(CRS>=3)": [f"{100 * m:+.1f} [{100 * lo:+.1f} to {100 * hi:+.1f}] pts" for m, lo, hi in
                                zip(diff["delta_p_dlt"], diff["delta_p_dlt_p5"], diff["delta_p_dlt_p95"])],
            "delta P(MRD-neg)": [f"{100 * m:+.1f} [{100 * lo:+.1f} to {100 * hi:+.1f}] pts" for m, lo, hi in
                                 zip(diff["delta_p_mrd_negative"], diff["delta_p_mrd_negative_p5"],
                                     diff["delta_p_mrd_negative_p95"])],
        }).to_string(index=False))
    print()
    print("P(CRS>=3) against the comparable published arms (95% Clopper-Pearson interval of the pooled arms):")
    for c in checks:
        print(f"  {c['dose_per_kg']:.0e}/kg {c['schedule']}: carkin {_pct(c['p_dlt'])} "
              f"[{_pct(c['p_dlt_p05'])}-{_pct(c['p_dlt_p95'])}] vs published {int(c['published_events'])}/"
              f"{int(c['published_n'])} ({_pct(c['interval_low'])}-{_pct(c['interval_high'])}): "
              f"{'inside' if c['passed'] else 'OUTSIDE'}; {c['note']}")
        agreement = arms_agreement(c)
        if agreement:
            print(f"    {agreement}")
        if c["known_failure"]:
            print(f"    known failure: {c['known_failure']}")
    print("Where the evidence is thin: no published CD7 arm used a split infusion or a dose above 1.5e7/kg, and "
          "between 2e6 and 1e7/kg only WU-CART-007's mixed flat doses reach; there the numbers rest on the model's "
          "structure and the link's calibration on other doses and products (data/evidence/README.md).")

    t0 = time.perf_counter()
    published = [{"dose_per_kg": c["dose_per_kg"], "p": c["published_events"] / c["published_n"],
                  "low": c["interval_low"], "high": c["interval_high"]} for c in checks]
    with outputs:
        ds.to_netcdf(outputs.temp(out / names[0]), engine="h5netcdf")
        table.to_csv(outputs.temp(out / names[1]), index=False)
        diff.to_csv(outputs.temp(out / names[2]), index=False)
        plot_endpoints(whatif_table(ds), ["cmax", "auc_0_28", "nadir"], path=outputs.temp(out / names[3]),
                       title=f"{protocol.id}: dose-exposure (median and 5-95th percentile over patients and draws)")
        plot_dose_response(ds, path=outputs.temp(out / names[4]), published=published,
                           title=f"{protocol.id}: dose-response (band: 90% over calibration draws; "
                                 "points: published arms, 95% CI)")
    t_write = time.perf_counter() - t0
    print()
    print(f"wrote {out}/: cd7_escalation.nc, cd7_escalation_summary.csv, cd7_escalation_split_vs_single.csv, "
          "cd7_escalation_dose_exposure.png, cd7_escalation_dose_response.png")
    print(f"timing: simulate {t_sim:.1f} s (includes JIT compile), files and plots {t_write:.1f} s, "
          f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
