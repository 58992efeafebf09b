"""Simulation throughput: carkin.simulate against a scipy solve_ivp (LSODA) per-subject loop.

Same model (default cd7_cart), same virtual subjects, split dosing 10/30/60% on
days 0/1/2, 91 daily save points, same tolerances (the model's: rtol 1e-6).
Compile time is reported apart from run time. Accuracy of both is measured
against a tight-tolerance reference (Radau, rtol 1e-10) on a subset of subjects.

    python benchmarks/simulate_throughput.py                      # full table
    python benchmarks/simulate_throughput.py --sizes 1,100 --scipy-subjects 20   # quick

Writes a JSON record (machine, versions, numbers) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from scipy_reference import compiled_rhs, solve_scipy  # noqa: E402

import carkin as ck  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured

FLOOR = 1e-3  # relative errors are measured where the observable exceeds this (its units)


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
        "diffrax": __import__("diffrax").__version__, "scipy": __import__("scipy").__version__,
    }


def subject_inputs(ds, model, i):
    p = {k: float(ds[k].values[i]) for k in model.parameter_names}
    cov = {c.name: float(ds[c.name].values[i]) for c in model.covariates}
    return p, cov


def time_carkin(model, regimen, times, n, seed, repeats):
    t0 = time.perf_counter()
    ds = ck.simulate(model, regimen, times=times, n_subjects=n, seed=seed, progress=False)
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ck.simulate(model, regimen, times=times, n_subjects=n, seed=seed, progress=False)
        runs.append(time.perf_counter() - t0)
    run = min(runs)
    return ds, {"n": n, "first_call_s": first, "run_s": run, "compile_s": max(first - run, 0.0),
                "subjects_per_s": n / run, "mean_steps": float(ds["n_steps"].mean()),
                "max_steps": int(ds["n_steps"].max()), "failed": int(ds["failed"].sum())}


def time_scipy(model, regimen, times, ds, m):
    per_kg = np.array(regimen.amounts_per_kg)
    t_total, outs = 0.0, []
    for i in range(m):
        p, cov = subject_inputs(ds, model, i)
        rhs = compiled_rhs(model, p, cov)  # compiled outside the timed region
        t0 = time.perf_counter()
        y = solve_scipy(model, regimen.days, per_kg * cov["WT"], times, p, cov, method="LSODA",
                        rtol=model.solver.rtol, atol=model.solver.atol, rhs=rhs)
        t_total += time.perf_counter() - t0
        outs.append(y)
    return outs, {"n": m, "run_s": t_total, "subjects_per_s": m / t_total}


def accuracy(model, regimen, times, ds, m, scipy_outs):
    """Max relative error of carkin and of LSODA vs Radau rtol 1e-10, per observable."""
    per_kg = np.array(regimen.amounts_per_kg)
    err = {"carkin": {}, "scipy_lsoda": {}}
    for i in range(m):
        p, cov = subject_inputs(ds, model, i)
        ref_states = solve_scipy(model, regimen.days, per_kg * cov["WT"], times, p, cov,
                                 method="Radau", rtol=1e-10, atol=1e-12)
        ref = {k: np.asarray(v) for k, v in model.observe(ref_states, p, cov).items()}
        lsoda = {k: np.asarray(v) for k, v in model.observe(scipy_outs[i], p, cov).items()}
        for o in model.observables:
            mask = np.abs(ref[o.name]) > FLOOR
            for who, val in (("carkin", ds[o.name].values[i]), ("scipy_lsoda", lsoda[o.name])):
                e = float(np.max(np.abs(val[mask] / ref[o.name][mask] - 1))) if mask.any() else 0.0
                err[who][o.name] = max(err[who].get(o.name, 0.0), e)
    return err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cd7_cart")
    ap.add_argument("--dose", type=float, default=1e7, help="total dose, cells/kg (split 10/30/60)")
    ap.add_argument("--sizes", default="1,100,1000,10000,100000")
    ap.add_argument("--scipy-subjects", type=int, default=200)
    ap.add_argument("--accuracy-subjects", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "simulate_cpu.json"))
    a = ap.parse_args(argv)

    model = ck.load_model(a.model)
    regimen = ck.split(a.dose)
    times = np.arange(0.0, 91.0)
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        ds, row = time_carkin(model, regimen, times, n, a.seed, a.repeats if n <= 10_000 else 1)
        rows.append(row)
        print(f"carkin  N={n:>7}: {row['subjects_per_s']:>10.0f} subjects/s  run {row['run_s']:.3f} s  "
              f"compile {row['compile_s']:.1f} s  steps mean {row['mean_steps']:.0f} max {row['max_steps']}",
              flush=True)
    pop = ck.simulate(model, regimen, times=times, n_subjects=max(a.scipy_subjects, a.accuracy_subjects),
                      seed=a.seed, progress=False)
    scipy_outs, srow = time_scipy(model, regimen, times, pop, a.scipy_subjects)
    print(f"scipy LSODA loop N={srow['n']}: {srow['subjects_per_s']:.0f} subjects/s", flush=True)
    err = accuracy(model, regimen, times, pop, min(a.accuracy_subjects, a.scipy_subjects), scipy_outs)
    print("max relative error vs Radau rtol 1e-10:", json.dumps(err, indent=1))
    at10k = next((r for r in rows if r["n"] == 10_000), rows[-1])
    print(f"speed-up over scipy at N={at10k['n']}: {at10k['subjects_per_s'] / srow['subjects_per_s']:.0f}x")
    record = {"model": a.model, "regimen": regimen.label, "save_points": len(times),
              "tolerances": {"rtol": model.solver.rtol, "atol": model.solver.atol, "solver": model.solver.solver},
              "machine": machine(), "carkin": rows, "scipy_lsoda": srow, "max_rel_error": err,
              "command": "python benchmarks/simulate_throughput.py " + " ".join(argv or sys.argv[1:])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
