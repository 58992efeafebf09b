"""Every GPU check in one run, writing one JSON record (run by benchmarks/gpu_check.sh).

Steps, each timed and recorded as it finishes (a step that fails or would overrun the time budget is
recorded as such and the rest go on):

1. cd7_cart simulation (split 10/30/60% of 1e7 cells/kg, daily saves to day 90) at 10^5 and 10^6
   subjects with the default (ensemble) engine; at 10^6 also the vmapped diffrax path, with the two
   engines' agreement; the first 100 subjects again on the CPU, with the GPU/CPU agreement.
2. 10^7 subjects streamed to disk (carkin.stream.simulate_to_netcdf).
3. Individual (MAP) estimates for 10^5 subjects (stein_2019, the design of data/stein_sim.csv repeated).
4. fit_many: NUTS on 1,000 simulated stein_2019 datasets (the first 6 subjects' design), one chain each.

    python benchmarks/gpu_check.py --out results.json            # the GPU sizes (8-minute budget)
    python benchmarks/gpu_check.py --quick --out /tmp/check.json # the same steps, tiny, to test on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import carkin as ck  # noqa: E402

FULL = {"simulate": (100_000, 1_000_000), "stream": 10_000_000, "posthoc": 100_000, "fit_many": 1_000,
        "nuts": (200, 200)}
QUICK = {"simulate": (256, 1_024), "stream": 4_096, "posthoc": 512, "fit_many": 4, "nuts": (20, 20)}
TIMES = np.arange(0.0, 91.0)
FLOOR = 1e-3


def _max_rel(a, b) -> float:
    keep = np.abs(b) > FLOOR
    return float(np.max(np.abs(a[keep] - b[keep]) / np.abs(b[keep]))) if keep.any() else 0.0


def step_simulate(sizes, record):
    import jax

    model, regimen = ck.load_model("cd7_cart"), ck.split(1e7)
    rows = {}
    for n in sizes:
        ck.simulate(model, regimen, TIMES, n_subjects=min(n, 4096), seed=1, progress=False)  # compile
        t0 = time.perf_counter()
        ds = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, progress=False)
        run_s = time.perf_counter() - t0
        rows[str(n)] = {"engine": ds.attrs["engine"], "subjects_per_s": n / run_s, "run_s": run_s,
                        "failed": int(ds["failed"].sum()), "mean_steps": float(ds["n_steps"].mean())}
        record["simulate"] = rows
    n = sizes[-1]
    ck.simulate(model, regimen, TIMES, n_subjects=min(n, 4096), seed=1, engine="diffrax", progress=False)
    t0 = time.perf_counter()
    ref = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, engine="diffrax", progress=False)
    run_s = time.perf_counter() - t0
    rows[f"{n}_diffrax"] = {"engine": "diffrax", "subjects_per_s": n / run_s, "run_s": run_s,
                            "failed": int(ref["failed"].sum())}
    rows["ensemble_over_diffrax"] = rows[str(n)]["subjects_per_s"] / rows[f"{n}_diffrax"]["subjects_per_s"]
    rows["max_rel_ensemble_vs_diffrax"] = max(_max_rel(ds[o.name].values[:1000], ref[o.name].values[:1000])
                                              for o in model.observables)
    with jax.default_device(jax.devices("cpu")[0]):
        cpu = ck.simulate(model, regimen, TIMES, n_subjects=100, seed=2, progress=False)
    rows["max_rel_gpu_vs_cpu_100_subjects"] = max(_max_rel(ds[o.name].values[:100], cpu[o.name].values)
                                                  for o in model.observables)
    record["simulate"] = rows


def step_stream(n, record):
    from carkin.simulation.stream import simulate_to_netcdf

    with tempfile.TemporaryDirectory() as tmp:
        out = simulate_to_netcdf(ck.load_model("cd7_cart"), ck.split(1e7), Path(tmp) / "population.nc", n,
                                 times=TIMES, seed=3, progress=False)
        out["file_bytes"] = (Path(tmp) / "population.nc").stat().st_size
    record["stream"] = {k: (float(v) if isinstance(v, (int, float, np.number)) else str(v)) for k, v in out.items()}


def step_posthoc(n, record):
    from posthoc_scale import repeated_design, simulated

    from carkin.fitting.fit_problem import make_problem
    from carkin.fitting.posthoc import individual_estimates

    base = ck.read_dataset(Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv")
    truth = dict(base.meta["generation"]["true_values"])
    data = simulated(repeated_design(base, n), truth, 7)
    problem = make_problem(ck.load_model("stein_2019"), data)
    t0 = time.perf_counter()
    est = individual_estimates(problem, truth, progress=False)
    wall = time.perf_counter() - t0
    record["posthoc"] = {"subjects": n, "wall_s": wall, "run_s": float(est.attrs.get("run_s", wall)),
                         "subjects_per_s": n / float(est.attrs.get("run_s", wall))}


def step_fit_many(n, nuts, record):
    from carkin.fitting.batch import fit_many, prior_datasets
    from carkin.fitting.fit_problem import make_problem

    data = ck.read_dataset(Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv")
    data = data.subset(data.ids[:6])
    problem = make_problem(ck.load_model("stein_2019"), data)
    _, y, blq = prior_datasets(problem, n, seed=1)
    t0 = time.perf_counter()
    draws = fit_many(problem, y, blq, warmup=nuts[0], samples=nuts[1], seed=2)
    wall = time.perf_counter() - t0
    record["fit_many"] = {"datasets": n, "warmup": nuts[0], "samples": nuts[1], "wall_s": wall,
                          "datasets_per_s": n / wall, "divergent_fraction": float(np.mean(draws["diverging"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450.0, help="no step starts after this many seconds")
    a = ap.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    ck.configure()
    import jax
    from simulate_throughput import machine

    record: dict = {"machine": machine(), "devices": [str(d) for d in jax.devices()], "quick": a.quick, "steps": {}}
    started = time.perf_counter()
    steps = (("simulate", lambda: step_simulate(sizes["simulate"], record)),
             ("stream", lambda: step_stream(sizes["stream"], record)),
             ("posthoc", lambda: step_posthoc(sizes["posthoc"], record)),
             ("fit_many", lambda: step_fit_many(sizes["fit_many"], sizes["nuts"], record)))
    warnings.simplefilter("ignore")
    for name, run in steps:
        if time.perf_counter() - started > a.budget_s:
            record["steps"][name] = "skipped: time budget spent"
            continue
        t0 = time.perf_counter()
        try:
            run()
            record["steps"][name] = f"done in {time.perf_counter() - t0:.1f} s"
        except Exception as error:  # a failed step is recorded and the others still run
            record["steps"][name] = f"failed: {type(error).__name__}: {error}"
            record.setdefault("tracebacks", {})[name] = traceback.format_exc()[-4000:]
        Path(a.out).write_text(json.dumps(record, indent=1, default=str))
        print(f"{name}: {record['steps'][name]}", flush=True)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
