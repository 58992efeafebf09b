"""An ODE population fit's NUTS chains on one CPU device and split over every core.

    python benchmarks/ode_fit_devices.py              # 6 estimated parameters (reverse mode), 4 chains
    python benchmarks/ode_fit_devices.py --estimated 4

`cd7_cart` (naturally selected product, 6 states, split infusion) on the first subjects of
data/cd7_sim.csv, both observables, the first N of (rho, k_kill, d_e, f_blood, k_ex, d_m, r_t,
k_em) estimated with variability on rho and d_e. With more than FORWARD_MODE_MAX_PARAMETERS
estimated the gradient runs in reverse mode through diffrax's checkpointed adjoint. The same
fit (same seed) runs twice, each in a fresh process because JAX fixes its devices when it
starts: with CARKIN_CPU_DEVICES=1 and with one device per core. It records wall, compile
and sampling time, minimum bulk ESS over the population parameters, and whether the two
runs gave the same draws. Writes benchmarks/results/ode_fit_devices.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(__file__).resolve().parents[1] / "data" / "cd7_sim.csv"
CANDIDATES = ("rho", "k_kill", "d_e", "f_blood", "k_ex", "d_m", "r_t", "k_em")
RANDOM = ("rho", "d_e")


def fit_once(a) -> None:
    """One fit in this process; draws and timings to ``a.draws``."""
    import numpy as np

    import carkin as ck
    from carkin.inference import FORWARD_MODE_MAX_PARAMETERS, _ess, population_sites

    ck.configure(compilation_cache=False)  # CARKIN_CPU_DEVICES (set by the parent run) picks the devices
    data = ck.read_dataset(DATA)
    data = data.subset(data.ids[: a.subjects])
    model = ck.load_model("cd7_cart", product_type="naturally_selected")
    estimate = CANDIDATES[: a.estimated]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ck.fit(model, data, estimate=estimate, variability=RANDOM, chains=a.chains, warmup=a.warmup,
                      samples=a.samples, max_tree_depth=a.max_tree_depth, seed=a.seed, progress=False)
    wall = time.perf_counter() - t0
    settings = json.loads(tree.attrs["settings"])
    post = tree["posterior"].to_dataset()[population_sites(tree)]
    ess = _ess(post)
    stats = tree["sample_stats"]
    np.savez(a.draws, **{k: post[k].values for k in post.data_vars})
    Path(a.draws).with_suffix(".json").write_text(json.dumps({
        "devices": settings["devices"], "wall_s": round(wall, 1), "compile_s": round(settings["compile_s"], 1),
        "sampling_s": round(settings["sampling_s"], 1), "min_ess_bulk": round(min(ess.values()), 1),
        "min_ess_bulk_per_sampling_s": round(min(ess.values()) / settings["sampling_s"], 3),
        "mean_leapfrog_per_draw": round(float(stats["n_steps"].mean()), 1),
        "divergences": int(stats["diverging"].sum()),
        "gradient": "forward" if a.estimated <= FORWARD_MODE_MAX_PARAMETERS else "reverse"}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--estimated", type=int, default=6)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--max-tree-depth", type=int, default=6, help="bounds each draw's cost (63 leapfrog steps)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ode_fit_devices.json"))
    ap.add_argument("--draws", help=argparse.SUPPRESS)  # set in the child processes
    a = ap.parse_args(argv)
    if a.draws:
        return fit_once(a)

    import numpy as np
    from simulate_throughput import machine

    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("out", "draws")]
    runs, draws = {}, {}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for label, devices in (("one device", "1"), ("every core", str(os.cpu_count() or 1))):
        path = out.with_name(f"{out.stem}_{devices}dev.npz")
        env = {**os.environ, "CARKIN_CPU_DEVICES": devices}
        env.pop("XLA_FLAGS", None)
        subprocess.run([sys.executable, __file__, *args, f"--draws={path}"], env=env, check=True)
        runs[label] = json.loads(path.with_suffix(".json").read_text())
        draws[label] = dict(np.load(path))
        path.unlink()
        path.with_suffix(".json").unlink()
        print(f"{label:>10}: {runs[label]}", flush=True)
    one, every = draws.values()
    identical = all(np.array_equal(one[k], every[k]) for k in one)
    record = {"benchmark": "cd7_cart population NUTS fit on one CPU device and on every core",
              "command": "python benchmarks/ode_fit_devices.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "subjects": a.subjects, "estimated": list(CANDIDATES[: a.estimated]),
              "variability": list(RANDOM), "chains": a.chains, "warmup": a.warmup, "samples": a.samples,
              "max_tree_depth": a.max_tree_depth,
              "seed": a.seed, "runs": runs, "identical_draws": identical,
              "sampling_speedup": round(runs["one device"]["sampling_s"] / runs["every core"]["sampling_s"], 2),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.write_text(json.dumps(record, indent=1))
    print(f"identical draws: {identical}; sampling speedup {record['sampling_speedup']}x; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
