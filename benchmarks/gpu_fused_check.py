"""The fused ensemble kernel on a GPU (issue 15): its rate against the XLA ensemble in the same run.

Steps, each recorded as it finishes (a failed step is recorded and the rest go on):

1. ``solve``: the solve alone of 10^6 cd7_cart subjects (split 1e7 cells/kg, daily saves to day 90, the
   model's tolerances), inputs and outputs on the device: the XLA ensemble (``integrate_ensemble``, 2^16
   lanes, simulate's default) first, then the fused kernel (``integrate_fused``) for each (lanes, lanes
   per program, warps, parameters held in registers or read at each step) of ``--configs``; each with its
   first call (compile) and the best of two more, its failures and steps, and the fused outputs' largest
   relative difference from the XLA ensemble's (values above 1e-3 of their unit).
2. ``simulate``: ``carkin.simulate(engine="fused")`` of the same design end to end (outputs on the host,
   Dataset built), three calls, then ``engine="ensemble"``'s three; then the fused outputs of the first
   100 subjects against the CPU's ensemble.

    python benchmarks/gpu_fused_check.py --out fused.json              # GPU sizes
    python benchmarks/gpu_fused_check.py --quick --out /tmp/f.json     # tiny, interpreted, to test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
from gpu_loop_check import FLOOR, TIMES, population, run_steps

# (lanes, lanes per program, warps per program, parameters held in registers: 1, or read at each step: 0)
CONFIGS = ((1 << 16, 32, 1, 1), (1 << 17, 32, 1, 1), (1 << 16, 64, 2, 1), (1 << 16, 32, 1, 0), (1 << 15, 32, 1, 1),
           (1 << 16, 128, 4, 1))  # the likeliest first: a time budget may stop the list
ENSEMBLE_LANES = 1 << 16


def _largest_difference(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    keep = np.abs(b) > FLOOR
    return float(np.max(np.abs(a[keep] - b[keep]) / np.abs(b[keep]))) if keep.any() else 0.0


def _timed(fn, *args, runs=2):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, first, times


def solve(n: int, configs, record: dict, budget_s: float, quick: bool, save) -> None:
    import jax
    import jax.numpy as jnp

    from carkin.simulation.ensemble import integrate_ensemble, prepare_ensemble
    from carkin.simulation.fused import integrate_fused

    started = time.perf_counter()
    model, (times, dose_t, cells, theta, cov) = population(n)
    prepared = jax.block_until_ready(jax.jit(lambda *a: prepare_ensemble(model, *a))(times, dose_t, cells, theta,
                                                                                       cov))
    rows = record.setdefault("solve", {})

    def row(out, first, runs, **extra):
        ys, ok, steps = out
        return {"subjects": n, "run_s": min(runs), "runs_s": runs, "subjects_per_s": n / min(runs),
                "compile_and_run_s": first, "failed": int(jnp.sum(~ok)), "mean_steps": float(jnp.mean(steps)),
                "max_steps": int(jnp.max(steps)), **extra}

    lanes0 = 128 if quick else ENSEMBLE_LANES
    # the population enters as arguments: closed over, it would be a constant XLA folds at compile time
    ensemble = jax.jit(lambda p, th, cv: integrate_ensemble(model, p, times, th, cv, lanes=lanes0))
    base, first, runs = _timed(ensemble, prepared, theta, cov)
    rows["ensemble"] = row(base, first, runs, lanes=lanes0)
    print("ensemble", rows["ensemble"], flush=True)
    save()
    for lanes, block, warps, hold in configs:
        key = f"fused_{lanes}_{block}_{warps}_{'held' if hold else 'read'}"
        if time.perf_counter() - started > budget_s:
            rows[key] = "skipped: time budget spent"
            continue
        try:
            fused = jax.jit(lambda p, th, cv, lanes=lanes, block=block, warps=warps, hold=hold: integrate_fused(
                model, p, times, th, cv, lanes=lanes, block=block, warps=warps, hold_parameters=bool(hold)))
            out, first, runs = _timed(fused, prepared, theta, cov)
            rows[key] = row(out, first, runs, lanes=lanes, block=block, warps=warps, hold_parameters=bool(hold),
                            max_rel_vs_ensemble=_largest_difference(out[0], base[0]),
                            same_steps=bool(jnp.all(out[2] == base[2])))
        except Exception:  # recorded; the other configurations still run
            rows[key] = traceback.format_exc()[-3000:]
        print(key, rows[key], flush=True)
        save()  # each configuration on disk as it finishes (a compile that hangs loses nothing before it)


def end_to_end(n: int, record: dict, runs: int = 3) -> None:
    import jax

    import carkin as ck

    model, regimen = ck.load_model("cd7_cart"), ck.split(1e7)
    rows, last = record.setdefault("simulate", {}), {}
    for engine in ("fused", "ensemble"):
        try:
            t0 = time.perf_counter()
            ck.simulate(model, regimen, TIMES, n_subjects=n, seed=1, progress=False, engine=engine)
            first = time.perf_counter() - t0
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                ds = last[engine] = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, progress=False,
                                                engine=engine)
                times.append(time.perf_counter() - t0)
            rows[engine] = {"subjects": n, "run_s": min(times), "runs_s": times, "subjects_per_s": n / min(times),
                            "median_run_s": float(np.median(times)), "compile_and_run_s": first,
                            "failed": int(ds["failed"].sum()), "mean_steps": float(ds["n_steps"].mean())}
        except Exception:  # recorded; the other engine still runs
            rows[engine] = traceback.format_exc()[-3000:]
        print("simulate", engine, rows[engine], flush=True)
    if "fused" not in last:
        return
    k = min(n, 100)  # a population's first k subjects are the k-subject population of the same seed
    with jax.default_device(jax.devices("cpu")[0]):
        cpu = ck.simulate(model, regimen, TIMES, n_subjects=k, seed=2, progress=False, engine="ensemble")
    rows[f"max_rel_fused_gpu_vs_cpu_{k}_subjects"] = max(
        _largest_difference(last["fused"][o.name].values[:k], cpu[o.name].values) for o in model.observables)
    print("fused gpu vs cpu", rows[f"max_rel_fused_gpu_vs_cpu_{k}_subjects"], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=330.0, help="no step or configuration starts after this")
    ap.add_argument("--configs", help="semicolon-separated lanes,block,warps,hold quadruples (default: "
                    + ";".join(",".join(map(str, c)) for c in CONFIGS) + ")")
    ap.add_argument("--steps", default="solve,simulate", help="comma-separated steps, in their fixed order")
    a = ap.parse_args(argv)
    import jax

    import carkin as ck

    ck.configure()
    n = 256 if a.quick else 1_000_000
    configs = ((64, 32, 1, 1), (64, 16, 1, 0)) if a.quick else CONFIGS
    if a.configs:
        configs = tuple(tuple(int(v) for v in c.split(",")) for c in a.configs.split(";"))
    record: dict = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "quick": a.quick}
    out = Path(a.out)
    started = time.perf_counter()

    def save():
        out.write_text(json.dumps(record, indent=1, default=str))

    steps = (("solve", lambda: solve(n, configs, record, a.budget_s, a.quick, save)),
             ("simulate", lambda: end_to_end(64 if a.quick else n, record)))
    run_steps(steps, a.steps.split(","), record, out, a.budget_s, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
