"""Simulation-based calibration of the population fit of stein_2019.

Draws population parameters from the fit's priors, simulates a dataset from each with the
design of the shipped Stein dataset (its subjects, sampling days and LLOQ), fits all of them
in one vectorised NUTS run, and ranks each true value among its posterior draws. For a correct
fitting pipeline the ranks are uniform: the script prints a chi-square p-value per parameter
and writes the ranks (netCDF) and their histograms (PNG).

    python examples/sbc_stein.py --out out/sbc                      # 100 datasets of 20 subjects
    python examples/sbc_stein.py --n-datasets 4 --warmup 20 --samples 20 --out /tmp/sbc
    python examples/sbc_stein.py --warmup 1000 --samples 1000 --thin 20 --max-tree-depth 10 \
        --target-accept 0.9 --out out/sbc_long                       # about 70 min on 2 cores
"""

# test-args: --n-datasets 3 --subjects 5 --warmup 10 --samples 10 --thin 2 --max-tree-depth 5 --out {out}
# test-outputs: sbc.nc sbc_ranks.png

from __future__ import annotations

import argparse
import time
from pathlib import Path

import carkin as ck
from carkin.fitting.batch import rank_uniformity, simulation_based_calibration
from carkin.plots.fit import plot_sbc_ranks

ck.configure()  # every CPU core a JAX device; compiled programs cached on disk

DATA = Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-datasets", type=int, default=100)
    ap.add_argument("--subjects", type=int, default=20, help="design: the first N subjects of the Stein dataset")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--thin", type=int, default=10, help="rank among every THIN-th draw (less autocorrelation)")
    ap.add_argument("--target-accept", type=float, default=0.8, help="NUTS target acceptance probability")
    ap.add_argument("--max-tree-depth", type=int, default=8, help="NUTS maximum tree depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/sbc")
    a = ap.parse_args(argv)

    design = ck.read_dataset(DATA)
    design = design.subset(design.ids[: a.subjects])
    t0 = time.perf_counter()
    sbc = simulation_based_calibration(ck.load_model("stein_2019"), design, a.n_datasets, warmup=a.warmup,
                                       samples=a.samples, thin=a.thin, seed=a.seed, target_accept=a.target_accept,
                                       max_tree_depth=a.max_tree_depth, progress=True)
    print(f"{a.n_datasets} datasets of {design.n_subjects} subjects fitted in {time.perf_counter() - t0:.1f} s; "
          f"{int((sbc['divergences'] > 0).sum())} fit(s) with divergences")
    bins = max(2, min(10, a.n_datasets // 5))
    for name, p in rank_uniformity(sbc, bins=bins).items():
        print(f"  {name:>18}: chi-square p = {p:.3f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sbc.to_netcdf(out / "sbc.nc", engine="h5netcdf")
    plot_sbc_ranks(sbc, bins=bins, path=out / "sbc_ranks.png")
    print(f"wrote {out / 'sbc.nc'}, {out / 'sbc_ranks.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
