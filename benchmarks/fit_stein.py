"""NUTS on the shipped 40-subject Stein dataset: wall time, compile time, ESS per second.

    python benchmarks/fit_stein.py                       # 4 chains, 1000 warmup + 1000 samples
    CARKIN_CPU_DEVICES=1 python benchmarks/fit_stein.py --out benchmarks/results/fit_stein_cpu_1device.json

Compile time is the fit's own record of compiling its sampler program (ahead of time);
sampling time is the run time of that program (warmup and draws of every chain); wall
time is the whole fit call. Minimum bulk ESS/s is over the population parameters
(typical values, omegas, residual error), divided by the sampling time. Writes a JSON
record to benchmarks/results/.
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
from carkin.inference import _ess, _rhat, population_sites  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured

DATA = Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_stein_cpu.json"))
    a = ap.parse_args(argv)
    model = ck.load_model("stein_2019")
    data = ck.read_dataset(DATA)
    opts = dict(chains=a.chains, seed=a.seed, progress=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = ck.fit(model, data, warmup=a.warmup, samples=a.samples, **opts)
    wall = time.perf_counter() - t0
    post = tree["posterior"].to_dataset()[population_sites(tree)]
    ess, rhat = _ess(post), _rhat(post)
    settings = json.loads(tree.attrs["settings"])
    compile_s, sampling = settings["compile_s"], settings["sampling_s"]
    truth = ck.read_dataset(DATA).meta["generation"]["true_values"]
    rows = {k: {"median": float(post[k].median()), "q05": float(post[k].quantile(0.05)),
                "q95": float(post[k].quantile(0.95)), "truth": truth.get(k), "ess_bulk": ess[k], "r_hat": rhat[k]}
            for k in post.data_vars}
    record = {"chains": a.chains, "warmup": a.warmup, "samples": a.samples,
              "devices": settings["devices"], "mean_leapfrog_per_draw": float(tree["sample_stats"]["n_steps"].mean()),
              "wall_s": wall, "compile_s": compile_s, "sampling_s": sampling,
              "min_ess_bulk": min(ess.values()), "min_ess_bulk_per_s": min(ess.values()) / sampling,
              "max_r_hat": max(rhat.values()), "divergences": int(tree["sample_stats"]["diverging"].sum()),
              "warnings": [str(w.message) for w in caught if issubclass(w.category, ck.FitWarning)],
              "parameters": rows, "machine": machine(),
              "command": "python benchmarks/fit_stein.py " + " ".join(argv or sys.argv[1:])}
    for k, r in rows.items():
        print(f"{k:>18}: median {r['median']:.4g} 90% [{r['q05']:.4g}, {r['q95']:.4g}] truth {r['truth']} "
              f"ESS {r['ess_bulk']:.0f} R-hat {r['r_hat']:.3f}")
    print(f"wall {wall:.1f} s, compile {compile_s:.1f} s, min bulk ESS {record['min_ess_bulk']:.0f}, "
          f"min ESS/s {record['min_ess_bulk_per_s']:.1f}, max R-hat {record['max_r_hat']:.4f}, "
          f"divergences {record['divergences']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
