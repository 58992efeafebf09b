"""NUTS on the 30-subject cd7_cart dataset started at a Laplace fit: the default `carkin fit` of
data/cd7_sim.csv (both observables, rho, k_kill, d_e, f_blood with variability, 4 chains x 500
warmup + 500 draws) with ``init="laplace"``.

    python benchmarks/nuts_from_laplace.py [--chains 4 --warmup 500 --samples 500] [--centred auto]

Wall time of the whole fit (Laplace start included), the sampler's compile and run times, the
minimum bulk ESS over the population parameters and per second of sampling, divergences and the
largest R-hat. Writes benchmarks/results/nuts_from_laplace.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.fitting.convergence import _ess, _rhat, population_sites  # noqa: E402

ck.configure(compilation_cache=False)
DATA = Path(__file__).resolve().parents[1] / "data" / "cd7_sim.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--init", default="laplace")
    ap.add_argument("--centred", default="", help="'auto', or comma-separated parameters (default: none)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nuts_from_laplace.json"))
    a = ap.parse_args(argv)
    model = ck.load_model("cd7_cart", product_type="naturally_selected")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = ck.fit(model, DATA, estimate=("rho", "k_kill", "d_e", "f_blood"), chains=a.chains, warmup=a.warmup,
                      samples=a.samples, init=a.init, seed=1, progress=False,
                      centred="auto" if a.centred == "auto" else tuple(filter(None, a.centred.split(","))))
    wall = time.perf_counter() - t0
    settings = json.loads(tree.attrs["settings"])
    sites = population_sites(tree)
    post = tree["posterior"].to_dataset()[sites]
    ess = _ess(post, "bulk")
    rhat = _rhat(post)
    record = {
        "machine": machine(), "command": "python benchmarks/nuts_from_laplace.py " + " ".join(argv or sys.argv[1:]),
        "wall_s": round(wall, 1), "sampler_compile_s": settings.get("compile_s"),
        "sampling_s": settings.get("sampling_s"), "min_bulk_ess": round(min(ess.values()), 1),
        "min_bulk_ess_per_s": round(min(ess.values()) / settings["sampling_s"], 3),
        "max_rhat": round(max(rhat.values()), 4), "centred": settings.get("centred"),
        "mean_leapfrogs": float(tree["sample_stats"]["n_steps"].mean()),
        "divergences": int(tree["sample_stats"]["diverging"].sum()),
        "medians": {k: float(post[k].median()) for k in sites},
        "warnings": [str(w.message)[:200] for w in caught if issubclass(w.category, UserWarning)],
    }
    print(json.dumps(record, indent=1))
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
