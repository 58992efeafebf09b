"""Simulation engines side by side, in one run: the ensemble ODE solver, the vmapped diffrax solve and
(stein_2019) the closed form.

1. cd7_cart through ``carkin.simulate`` (split 10/30/60% on days 0/1/2 at 1e7 cells/kg, daily saves to
   day 90, the model's tolerances rtol 1e-6 / atol 1e-6, every CPU core a device), engine "ensemble"
   against engine "diffrax".
2. Mixed doses: cd7_cart subjects whose single doses spread log-uniformly over 1e5-1e9 cells/kg, so
   their step counts differ widely. Engine level, one device: ``solve_ensemble`` on its default lanes,
   compiled with the options simulate gives its loop (here in one program with the preparation: the
   speed is the same), against ``jit(vmap(solve_subject))`` in chunks of 256 (simulate's chunk for that
   path), same subjects and inputs.
3. The C reference (benchmarks/c_reference/dopri5_cd7.c, built here with -O3 -march=native -fopenmp):
   the same Dormand-Prince method, controller, events and dense output, one subject at a time per
   thread, on the same subjects and doses as 1., on 1 and on 2 threads (solve time only: inputs are
   prepared in Python). Agreement of its observables with carkin's ensemble path is reported.
4. The scipy loop a user would otherwise write: solve_ivp (LSODA) per subject, same tolerances,
   jit-compiled right-hand side, 200 subjects (benchmarks/scipy_reference.py).
5. stein_2019 through ``carkin.simulate`` at N = 100,000: the closed form against diffrax.

Accuracy: each engine's observables against diffrax at rtol 1e-10 on the first 100 subjects.
Run time is the best of five calls after a first one (the median is recorded too); compile time is the
first call minus the best.

    python benchmarks/ensemble_throughput.py              # N = 10,000
    python benchmarks/ensemble_throughput.py --n 1000     # quick

Writes benchmarks/results/ensemble_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.simulation.ensemble import DEFAULT_LANES, compiler_options, solve_ensemble  # noqa: E402
from carkin.simulation.solve import solve_subject  # noqa: E402

ck.configure(compilation_cache=False)
TIMES = np.arange(0.0, 91.0)
ACCURACY_SUBJECTS = 100
FLOOR = 1e-3  # relative errors where the observable exceeds this (its units)


def _timed(fn, repeats: int = 5):
    """(result, best run seconds of ``repeats`` calls after a first one, compile seconds = first - best,
    median run seconds): on two CPU devices a call now and then takes up to 1.5x the others
    (benchmarks/README.md), so the records give best and median."""
    t0 = time.perf_counter()
    fn()  # compiles
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return out, min(runs), max(0.0, first - min(runs)), float(np.median(runs))


def _max_rel(got, want) -> float:
    keep = np.abs(want) > FLOOR
    return float(np.max(np.abs(got[keep] - want[keep]) / np.abs(want[keep])))


def through_simulate(model, regimen, n, engines, keep=None):
    rows = {}
    ref = ck.simulate(model, regimen, TIMES, n_subjects=min(n, ACCURACY_SUBJECTS), seed=2, engine="diffrax",
                      rtol=1e-10, atol=1e-12, progress=False)
    for engine in engines:
        def run(engine=engine):
            return ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, engine=engine, progress=False)

        ds, run_s, compile_s, median_s = _timed(run)
        err = max(_max_rel(ds[o.name].values[:ACCURACY_SUBJECTS], ref[o.name].values) for o in model.observables)
        if keep is not None:
            keep[engine] = ds
        rows[engine] = {"subjects_per_s": n / run_s, "run_s": run_s, "median_run_s": median_s,
                        "subjects_per_s_median": n / median_s, "compile_s": compile_s,
                        "mean_steps": float(ds["n_steps"].mean()), "failed": int(ds["failed"].sum()),
                        "max_rel_error_vs_rtol1e-10": err}
        print(f"  {model.name} {engine:11s} {n / run_s:12,.0f} subjects/s (median {n / median_s:,.0f})  "
              f"run {run_s:6.2f} s  "
              f"compile {compile_s:5.1f} s  steps {rows[engine]['mean_steps']:.0f}  max rel error {err:.1e}")
    return rows


C_SOURCE = Path(__file__).parent / "c_reference" / "dopri5_cd7.c"
C_PARAMS = ("rho", "k_a", "k_ld", "g_inf", "k_c", "k_em", "a_m", "k_ex", "d_e", "d_m", "d_x", "k_kill",
            "km_kill", "k_fr", "r_t", "k_t", "s_n", "r_n")  # the order of the C program's enum


def c_reference(model, regimen, ds, workdir: Path) -> dict:
    """Build and run the C reference on the subjects of ``ds`` (a carkin simulation of ``regimen``)."""
    import subprocess

    exe = workdir / "dopri5_cd7"
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", str(C_SOURCE), "-o", str(exe), "-lm"], check=True)
    n = ds.sizes["subject"]
    p = {k: jnp.asarray(ds[k].values) for k in model.parameter_names}
    cov = {c.name: jnp.asarray(ds[c.name].values) for c in model.covariates}
    y0 = np.asarray(jax.vmap(lambda pp, cc: model.initial_state(pp, cc))(p, cov))
    per_cell = np.asarray(model.cells_to_state(p, cov))
    weight = ds[model.role("weight")].values
    dose_t = np.broadcast_to(np.array(regimen.days, float), (n, regimen.n_infusions))
    dose_a = np.array(regimen.amounts_per_kg)[None, :] * (weight * per_cell)[:, None]
    s = model.solver
    header = [n, TIMES.size, regimen.n_infusions, s.rtol, s.atol, s.dt0, s.max_steps, model.fratricide_scale]
    rows = np.concatenate([np.stack([ds[k].values for k in C_PARAMS], 1), ds["CD7N0"].values[:, None], y0,
                           dose_t, dose_a], axis=1)
    (workdir / "in.bin").write_bytes(np.concatenate([np.array(header, float), TIMES, rows.ravel()]).tobytes())
    out = {}
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        run = subprocess.run([str(exe), str(workdir / "in.bin"), str(workdir / "out.bin")], env=env, check=True,
                             capture_output=True, text=True)
        seconds = float(run.stdout.strip())
        raw = np.frombuffer((workdir / "out.bin").read_bytes(), float)
        ys = raw[: n * TIMES.size * 6].reshape(n, TIMES.size, 6)
        ok, steps = raw[n * TIMES.size * 6: n * TIMES.size * 6 + n], raw[-n:]
        out[f"{threads}_thread"] = {"subjects_per_s": n / seconds, "run_s": seconds, "mean_steps": float(steps.mean()),
                                    "failed": int((ok < 0.5).sum())}
        print(f"  C reference, {threads} thread(s) {n / seconds:12,.0f} subjects/s  run {seconds:6.2f} s  "
              f"steps {steps.mean():.0f}")
    pp = {k: v[:, None] for k, v in p.items()}
    obs = model.observe(jnp.asarray(ys), pp, {k: v[:, None] for k, v in cov.items()})
    out["max_rel_difference_vs_carkin_ensemble"] = max(
        _max_rel(np.asarray(obs[o.name]), ds[o.name].values) for o in model.observables)
    diff = out["max_rel_difference_vs_carkin_ensemble"]
    print(f"  C reference vs carkin ensemble: max relative difference {diff:.1e}")
    return out


def scipy_loop(model, regimen, ds, n_subjects: int = 200) -> dict:
    from scipy_reference import compiled_rhs, solve_scipy

    rhs = None
    t0 = time.perf_counter()
    for i in range(n_subjects):
        p = {k: float(ds[k].values[i]) for k in model.parameter_names}
        cov = {c.name: float(ds[c.name].values[i]) for c in model.covariates}
        rhs = rhs or compiled_rhs(model, p, cov)
        weight = cov[model.role("weight")]
        solve_scipy(model, np.array(regimen.days), np.array(regimen.amounts_per_kg) * weight, TIMES, p, cov,
                    rtol=model.solver.rtol, atol=model.solver.atol, rhs=rhs)
    seconds = time.perf_counter() - t0
    print(f"  scipy LSODA loop       {n_subjects / seconds:12,.0f} subjects/s  ({n_subjects} subjects, "
          f"{seconds:.1f} s)")
    return {"subjects_per_s": n_subjects / seconds, "run_s": seconds, "subjects": n_subjects}


def mixed_doses(n):
    model = ck.load_model("cd7_cart")
    rng = np.random.default_rng(0)
    per_kg = 10 ** rng.uniform(5, 9, n)
    pop = ck.simulate(model, ck.single(1e6), [0.0], n_subjects=n, seed=3, engine="diffrax", progress=False)
    theta = np.stack([pop[p].values for p in model.parameter_names], 1)
    cov = np.stack([pop[c.name].values for c in model.covariates], 1)
    cells = (per_kg * pop[model.role("weight")].values)[:, None]
    dose_t = np.zeros((n, 1))
    device = jax.devices()[0]
    args = [jax.device_put(a, device) for a in (TIMES, dose_t, cells, theta, cov)]

    # with the options simulate compiles the lanes' loop with (carkin.simulation.ensemble.compiler_options)
    ensemble = jax.jit(lambda *a: solve_ensemble(model, *a, lanes=DEFAULT_LANES), compiler_options=compiler_options())
    names, cnames = model.parameter_names, [c.name for c in model.covariates]

    def one(times, d_t, d_c, th, cv):
        return solve_subject(model, times, d_t, d_c, dict(zip(names, th)), dict(zip(cnames, cv)))

    vmapped = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0)))
    # the same vmap path compiled with the ensemble's options: how much of the gap the options alone make
    vmapped_options = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0)), compiler_options=compiler_options())
    chunk = 256

    def run_vmap(solve=vmapped):
        outs = [solve(args[0], *(a[i:i + chunk] for a in args[1:])) for i in range(0, n, chunk)]
        return [np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(3)]

    def run_ensemble():
        return [np.asarray(x) for x in ensemble(*args)]

    rows = {}
    (ys_e, ok_e, st_e), t_e, c_e, m_e = _timed(run_ensemble)
    (ys_v, ok_v, st_v), t_v, c_v, m_v = _timed(run_vmap)
    (ys_o, ok_o, st_o), t_o, c_o, m_o = _timed(lambda: run_vmap(vmapped_options))
    tight = jax.jit(jax.vmap(lambda *a: solve_subject(model, a[0], a[1], a[2], dict(zip(names, a[3])),
                                                      dict(zip(cnames, a[4])), rtol=1e-10, atol=1e-12),
                             in_axes=(None, 0, 0, 0, 0)))
    k = ACCURACY_SUBJECTS
    ref = np.asarray(tight(args[0], *(a[:k] for a in args[1:]))[0])
    for name, ys, ok, st, t, c, med in (("ensemble", ys_e, ok_e, st_e, t_e, c_e, m_e),
                                        ("diffrax", ys_v, ok_v, st_v, t_v, c_v, m_v),
                                        ("diffrax_with_ensemble_options", ys_o, ok_o, st_o, t_o, c_o, m_o)):
        rows[name] = {"subjects_per_s": n / t, "run_s": t, "median_run_s": med,
                      "subjects_per_s_median": n / med, "compile_s": c, "mean_steps": float(np.mean(st)),
                      "max_steps": int(np.max(st)), "failed": int((~ok).sum()),
                      "max_rel_error_vs_rtol1e-10": _max_rel(ys[:k], ref)}
        print(f"  mixed doses {name:29s} {n / t:12,.0f} subjects/s (median {n / med:,.0f})  "
              f"run {t:6.2f} s  compile {c:5.1f} s  "
              f"steps mean {np.mean(st):.0f} max {np.max(st)}  max rel error (states) "
              f"{rows[name]['max_rel_error_vs_rtol1e-10']:.1e}")
    return rows


def lane_counts(n, counts=(64, 96, 128, 136, 192, 256)):
    """The ensemble solve alone of cd7_cart's split design on one device, on each lane count (the default,
    DEFAULT_LANES, is chosen from this table: powers of two ran slower on the AMD machine)."""
    from gpu_loop_check import population

    model, args = population(n)
    rows = {}
    for lanes in counts:
        solve = jax.jit(lambda *a, lanes=lanes: solve_ensemble(model, *a, lanes=lanes),
                        compiler_options=compiler_options())
        _, t, c, _ = _timed(lambda f=solve: jax.block_until_ready(f(*args)), repeats=3)
        rows[str(lanes)] = {"subjects_per_s": n / t, "run_s": t, "compile_s": c}
        print(f"  {lanes:4d} lanes {n / t:12,.0f} subjects/s  run {t:6.3f} s"
              f"{'  (default)' if lanes == DEFAULT_LANES else ''}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n-closed-form", type=int, default=100_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ensemble_throughput.json"))
    args = ap.parse_args()
    jnp.zeros(1).block_until_ready()
    record = {"machine": machine(), "n": args.n, "times": "0:90:1"}
    print(f"cd7_cart, split 1e7 cells/kg, N = {args.n:,}")
    cd7, split, runs = ck.load_model("cd7_cart"), ck.split(1e7), {}
    record["cd7_cart_split"] = through_simulate(cd7, split, args.n, ("ensemble", "diffrax"), keep=runs)
    with tempfile.TemporaryDirectory() as tmp:
        record["cd7_cart_split"]["c_reference"] = c_reference(cd7, split, runs["ensemble"], Path(tmp))
    record["cd7_cart_split"]["scipy_lsoda"] = scipy_loop(cd7, split, runs["ensemble"])
    print(f"cd7_cart, single doses log-uniform 1e5-1e9 cells/kg, N = {args.n:,}, one device")
    record["cd7_cart_mixed_doses"] = mixed_doses(args.n)
    print(f"cd7_cart split, the ensemble solve alone on one device by lane count, N = {args.n // 2:,}")
    record["lane_counts"] = lane_counts(args.n // 2)
    print(f"stein_2019, single 1e6 cells/kg, N = {args.n_closed_form:,}")
    record["stein_2019"] = through_simulate(ck.load_model("stein_2019"), ck.single(1e6), args.n_closed_form,
                                            ("closed-form", "diffrax"))
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
