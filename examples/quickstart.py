"""A short tour of carkin: models, regimens, the typical subject, a virtual population, NCA and a plot.

    python examples/quickstart.py --out out/quickstart
"""

# test-outputs: quickstart_profiles.png quickstart_nca.csv

from __future__ import annotations

import argparse
from pathlib import Path

import carkin as ck
from carkin.plots import plot_panel
from carkin.simulation.nca import nca

ck.configure()  # every CPU core a JAX device; compiled programs cached on disk


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="carkin quickstart")
    ap.add_argument("--n-subjects", type=int, default=200, help="virtual subjects (default %(default)s)")
    ap.add_argument("--out", default="out/quickstart", help="output folder (default %(default)s)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The model library: name -> one-line description.
    for name, title in ck.list_models().items():
        print(f"{name:12s} {title}")

    # 2. Stein 2019 (tisagenlecleucel), typical subject: a published empirical model, dose-independent.
    stein = ck.load_model("stein_2019")
    ds = ck.simulate(stein, ck.single(3e6), times="0:90:1")
    c = ds["car_copies"].isel(subject=0)
    print(f"\nstein_2019 typical subject: peak {float(c.max()):,.0f} {c.attrs['units']} "
          f"on day {float(c.idxmax('time')):g}, day 90 level {float(c.sel(time=90)):,.0f}")

    # 3. CD7 CAR-T, one total dose of 1e7 cells/kg given at once or split 10/30/60% over days 0/1/2.
    cd7 = ck.load_model("cd7_cart")
    regimens = [ck.single(1e7), ck.split(1e7, fractions=(0.1, 0.3, 0.6), days=(0, 1, 2))]
    typical = ck.simulate(cd7, regimens)
    print("\ncd7_cart typical subject, CD7+ cell nadir (cells/µL):")
    for label, v in zip(typical["regimen"].values, typical["cd7_cells"].min("time").values[:, 0]):
        print(f"  {label:40s} {v:8.1f}")

    # 4. A virtual population: between-subject variability, the same subjects under both regimens.
    pop = ck.simulate(cd7, regimens, n_subjects=args.n_subjects, seed=1)

    # 5. NCA of the CAR transgene level for every subject and regimen.
    res = nca(pop, variable="car_copies")
    summary = res[["cmax", "tmax", "auc_0_28"]].median("subject").to_dataframe()
    print(f"\ncd7_cart, {args.n_subjects} virtual subjects, median NCA endpoints:")
    print(summary.to_string(float_format=lambda x: f"{x:,.3g}"))
    res.to_dataframe().to_csv(out / "quickstart_nca.csv")

    # 6. Profiles: median, 5-95% band and a few individuals per regimen.
    plot_panel(pop, ["car_copies", "cd7_cells", "blasts"], out / "quickstart_profiles.png")
    print(f"\nwrote {out / 'quickstart_nca.csv'} and {out / 'quickstart_profiles.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
