"""Every GPU check in one run, writing one JSON record (run by benchmarks/gpu_check.sh).

Steps, each timed and recorded as it finishes (a step that fails or would overrun the time budget is
recorded as such and the rest go on):

1. cd7_cart simulation (split 10/30/60% of 1e7 cells/kg, daily saves to day 90) at 10^5 and 10^6
   subjects with the default (ensemble) engine; at 10^6 also other lane counts, and the vmapped
   diffrax path (in chunks of 65,536) with the two engines' agreement; the first 100 subjects again
   on the CPU, with the GPU/CPU agreement.
2. The ensemble solve alone at 10^6 subjects on two lane counts, inputs and outputs kept on the
   device (the solver's own rate, beside simulate's end-to-end one).
3. Individual (MAP) estimates for 10^5 subjects (stein_2019, the design of data/stein_sim.csv repeated).
4. Laplace (FOCE-I) fits of 1,000 replicate datasets on data/stein_sim.csv's design (40 subjects;
   fold, cmax, alpha estimated, variability on cmax and alpha) in one batched call, with the Wald
   intervals' coverage; the same fits one dataset at a time on this machine's CPU for comparison.
5. 10^7 subjects streamed to disk (carkin.stream.simulate_to_netcdf; weekly saves, so the file
   stays near 5 GB).
6. fit_many: NUTS on 1,000 simulated stein_2019 datasets (the first 6 subjects' design), one chain each.

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
        "nuts": (200, 200), "laplace": (1_000, 20), "lanes": (1 << 18, 1 << 20), "diffrax_chunk": 65_536,
        "block": 1 << 20, "device_solve": (1_000_000, (1 << 16, 1 << 18))}
QUICK = {"simulate": (256, 1_024), "stream": 4_096, "posthoc": 512, "fit_many": 4, "nuts": (20, 20),
         "laplace": (8, 2), "lanes": (512,), "diffrax_chunk": 256, "block": 2_048, "device_solve": (1_024, (256,))}
TIMES = np.arange(0.0, 91.0)
FLOOR = 1e-3


def _max_rel(a, b) -> float:
    keep = np.abs(b) > FLOOR
    return float(np.max(np.abs(a[keep] - b[keep]) / np.abs(b[keep]))) if keep.any() else 0.0


def step_simulate(sizes, other_lanes, diffrax_chunk, record):
    import jax

    from carkin.simulation import simulate as sim

    model, regimen = ck.load_model("cd7_cart"), ck.split(1e7)
    rows = {}
    for n in sizes:
        t0 = time.perf_counter()
        ck.simulate(model, regimen, TIMES, n_subjects=n, seed=1, progress=False)  # compiles for this chunk shape
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, progress=False)
        run_s = time.perf_counter() - t0
        rows[str(n)] = {"engine": ds.attrs["engine"], "lanes_at_most": sim.ensemble_sizes()[0],
                        "subjects_per_s": n / run_s, "run_s": run_s, "compile_and_run_s": first,
                        "failed": int(ds["failed"].sum()), "mean_steps": float(ds["n_steps"].mean())}
        record["simulate"] = rows
    n = sizes[-1]
    default_lanes = sim.GPU_LANES
    for lanes in other_lanes:  # the same population on other lane counts (each compiles once)
        sim.GPU_LANES = lanes
        try:
            t0 = time.perf_counter()
            ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, progress=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            other = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, progress=False)
            run_s = time.perf_counter() - t0
            rows[f"{n}_lanes_{lanes}"] = {"subjects_per_s": n / run_s, "run_s": run_s, "compile_and_run_s": first,
                                          "max_rel_vs_default_lanes": max(_max_rel(other[o.name].values,
                                                                                   ds[o.name].values)
                                                                          for o in model.observables)}
        finally:
            sim.GPU_LANES = default_lanes
        record["simulate"] = rows
    ck.simulate(model, regimen, TIMES, n_subjects=diffrax_chunk, seed=1, engine="diffrax", progress=False,
                chunk_size=diffrax_chunk)  # compile: one chunk of the same shape
    t0 = time.perf_counter()
    ref = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, engine="diffrax", progress=False,
                      chunk_size=diffrax_chunk)
    run_s = time.perf_counter() - t0
    rows[f"{n}_diffrax"] = {"engine": "diffrax", "chunk": diffrax_chunk, "subjects_per_s": n / run_s, "run_s": run_s,
                            "failed": int(ref["failed"].sum())}
    rows["ensemble_over_diffrax"] = rows[str(n)]["subjects_per_s"] / rows[f"{n}_diffrax"]["subjects_per_s"]
    rows["max_rel_ensemble_vs_diffrax"] = max(_max_rel(ds[o.name].values[:1000], ref[o.name].values[:1000])
                                              for o in model.observables)
    with jax.default_device(jax.devices("cpu")[0]):
        cpu = ck.simulate(model, regimen, TIMES, n_subjects=100, seed=2, progress=False)
    rows["max_rel_gpu_vs_cpu_100_subjects"] = max(_max_rel(ds[o.name].values[:100], cpu[o.name].values)
                                                  for o in model.observables)
    record["simulate"] = rows


def step_device_solve(n, lanes_list, record):
    """The ensemble solve alone at ``n`` subjects, inputs and outputs kept on the device (no copy to
    the host, no Dataset): what the solver itself does, beside simulate's end-to-end rate."""
    from gpu_loop_check import device_solve

    device_solve(n, lanes_list, record, budget_s=float("inf"), key="device_solve")


def step_stream(n, block, record):
    from carkin.simulation.stream import simulate_to_netcdf

    with tempfile.TemporaryDirectory() as tmp:
        out = simulate_to_netcdf(ck.load_model("cd7_cart"), ck.split(1e7), Path(tmp) / "population.nc", n,
                                 times=TIMES[::7], seed=3, progress=False, block_size=block)
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


def step_laplace(n, serial, record):
    """Batched Laplace fits of ``n`` replicates on the GPU, and ``serial`` of them one at a time on the CPU."""
    import jax

    from carkin.fitting import laplace
    from carkin.fitting.batch import fit_many, replicate_datasets
    from carkin.fitting.fit_problem import make_problem

    data = ck.read_dataset(Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv")
    truth = dict(data.meta["generation"]["true_values"])
    problem = make_problem(ck.load_model("stein_2019"), data, estimate=("fold", "cmax", "alpha"),
                           variability=("cmax", "alpha"))
    values = {s: truth[s] for s in problem.priors}
    y, blq = replicate_datasets(problem, values, n, seed=11)
    fit_many(problem, y[:2], blq[:2], method="laplace")  # compile (the batch size is part of the shape)
    t0 = time.perf_counter()
    fit_many(problem, y[:2], blq[:2], method="laplace")
    small_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fit_many(problem, y, blq, method="laplace")
    wall = time.perf_counter() - t0
    ob = laplace.build(problem)[0]
    u_true = np.asarray(ob.unconstrain(values))
    se = np.sqrt(np.stack([np.diag(c) for c in out["covariance"]]))
    used = out["converged"] & np.all(np.isfinite(se), axis=1)
    hits = np.abs(out["u"] - u_true) <= 1.959963984540054 * se
    rec = {"datasets": n, "subjects": data.n_subjects, "wall_s": wall, "datasets_per_s": n / wall,
           "two_datasets_s": small_s, "converged": int(out["converged"].sum()), "used_for_coverage": int(used.sum()),
           "coverage_95": {s: float(hits[used, k].mean()) for k, s in enumerate(out["sites"])},
           "median_iterations": float(np.median(out["iterations"]))}
    record["laplace"] = rec
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        built = laplace.build(problem)
        laplace.estimate(problem, ck.Laplace(starts=1), progress=False, compiled=built,
                         measurements=(y[0], blq[0], problem.design.lloq))  # compile
        t0 = time.perf_counter()
        diffs = []
        for r in range(serial):
            one = laplace.estimate(problem, ck.Laplace(starts=1), progress=False, compiled=built,
                                   measurements=(y[r], blq[r], problem.design.lloq))
            diffs.append(max(abs(one.values[s] / out[s][r] - 1) for s in one.sites))
        cpu_s = time.perf_counter() - t0
    rec.update(cpu_serial_datasets=serial, cpu_serial_datasets_per_s=serial / cpu_s,
               max_rel_batched_vs_serial=float(max(diffs)))
    record["laplace"] = rec


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
    ap.add_argument("--steps", default="simulate,device_solve,posthoc,laplace,stream,fit_many",
                    help="comma-separated steps to run, in their fixed order")
    ap.add_argument("--stack", default="as installed", help="which package versions ran (recorded)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="no step starts after this many seconds")
    a = ap.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    ck.configure()
    import equinox
    import jax
    import numpyro
    from simulate_throughput import machine

    record: dict = {"machine": machine(), "devices": [str(d) for d in jax.devices()],
                    "device_kind": jax.devices()[0].device_kind, "equinox": equinox.__version__,
                    "numpyro": numpyro.__version__, "quick": a.quick, "stack": a.stack, "steps": {}}
    started = time.perf_counter()
    steps = (("simulate", lambda: step_simulate(sizes["simulate"], sizes["lanes"], sizes["diffrax_chunk"], record)),
             ("device_solve", lambda: step_device_solve(*sizes["device_solve"], record)),
             ("posthoc", lambda: step_posthoc(sizes["posthoc"], record)),
             ("laplace", lambda: step_laplace(*sizes["laplace"], record)),
             ("stream", lambda: step_stream(sizes["stream"], sizes["block"], record)),
             ("fit_many", lambda: step_fit_many(sizes["fit_many"], sizes["nuts"], record)))
    warnings.simplefilter("ignore")
    wanted = set(a.steps.split(","))
    for name, run in steps:
        if name not in wanted:
            continue
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
