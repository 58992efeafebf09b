"""Fit the Stein 2019 tisagenlecleucel model to the shipped simulated dataset, with diagnostics.

The dataset (data/stein_sim.csv) holds 40 subjects simulated from stein_2019 at its
published values, qPCR-like sampling over 180 days and ~24% of samples BLQ (censored
in the fit, Beal's M3). The script fits the population model by NUTS, prints the
parameter table next to the true values, LOO, and writes the fit (netCDF), the
table (CSV) and the diagnostic plots (individual fits, goodness of fit, VPC).

    python examples/fit_stein.py --out out/fit_stein                 # 4 chains x 1000 draws
    python examples/fit_stein.py --subjects 10 --chains 2 --warmup 50 --samples 50 --out /tmp/fs
"""

# test-args: --subjects 8 --chains 2 --warmup 30 --samples 30 --vpc-replicates 20 --out {out}
# test-outputs: fit.nc parameters.csv individual_fits.png gof.png vpc.png

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd

import carkin as ck
from carkin.fitting.diagnostics import individual_curves, loo, parameter_table, vpc
from carkin.plots.fit import save_fit_plots

ck.configure()  # every CPU core a JAX device; compiled programs cached on disk

DATA = Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=None, help="fit only the first N subjects")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vpc-replicates", type=int, default=200)
    ap.add_argument("--out", default="out/fit_stein")
    a = ap.parse_args(argv)

    data = ck.read_dataset(DATA)
    if a.subjects:
        data = data.subset(data.ids[: a.subjects])
    truth = data.meta["generation"]["true_values"]
    model = ck.load_model("stein_2019")
    print(f"{data.n_subjects} subjects, {data.n_obs} samples, {int(data.obs_blq.sum())} BLQ (censored)")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ck.FitWarning)
        tree = ck.fit(model, data, chains=a.chains, warmup=a.warmup, samples=a.samples, seed=a.seed, progress=False)
    print(f"NUTS: {a.chains} chains x {a.samples} draws in {time.perf_counter() - t0:.1f} s")
    for w in caught:
        print("warning:", w.message)

    table = parameter_table(tree)
    table.insert(2, "truth", [truth.get(p) for p in table["parameter"]])
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 4):
        print(table.drop(columns=["description"]).to_string(index=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto-k warnings are summarised in the printout
        print(loo(tree))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ck.save_fit(tree, out / "fit.nc", overwrite=True)
    table.to_csv(out / "parameters.csv", index=False)
    curves = individual_curves(tree, subjects=[str(i) for i in data.ids[:16]], n_draws=100)
    paths = save_fit_plots(tree, out, curves=curves, vpc_df=vpc(tree, n_replicates=a.vpc_replicates, seed=a.seed))
    print("wrote", ", ".join([str(out / "fit.nc"), str(out / "parameters.csv"), *map(str, paths)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
