"""The ensemble solver's loop schedule on a GPU (issue 15): what a GPU pays per loop iteration, and
which schedule `simulate` should use there.

A GPU runs each iteration of a `while_loop` as a launch driven by the host, which reads the loop's
condition back (and a `cond`'s predicate, for the lane refill) before going on. This check solves the
same population of cd7_cart subjects (split 1e7 cells/kg, daily saves to day 90) with the ensemble
solve alone, inputs and outputs kept on the device, under each schedule:

- ``check1_cond``: the condition checked every iteration, refill under a branch (the earlier default);
- ``check1_select``: checked every iteration, refill by selects (no branch);
- ``check8_select`` / ``check8_select_rolled``: the condition checked once every 8 iterations
  (unrolled, or as an inner loop of known trip count), refill by selects;
- in a second process with XLA's command buffers for while loops and branches turned on
  (``XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL``), the first two again: the loop
  then runs as one CUDA graph with device-side conditions.

Every schedule must give the same numbers bit for bit (checked on the device against the first).
Then the end-to-end ``simulate`` rate (outputs copied to the host, Dataset built) with the schedule
the library uses on a GPU, and the GPU's agreement with the CPU on 100 subjects.

    python benchmarks/gpu_loop_check.py --out loop.json            # GPU sizes (10^6 subjects)
    python benchmarks/gpu_loop_check.py --quick --out /tmp/l.json  # tiny, to test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

TIMES = np.arange(0.0, 91.0)
SCHEDULES = {"check1_cond": (1, False, True), "check1_select": (1, True, True), "check8_select": (8, True, True),
             "check8_select_rolled": (8, True, False)}
GRAPH_FLAGS = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
FLOOR = 1e-3


def population(n: int, seed: int = 2):
    """cd7_cart's virtual population of ``n`` subjects and its split-dose table, on the default device."""
    import jax
    import jax.numpy as jnp

    import carkin as ck
    from carkin.model import population as pop

    model = ck.load_model("cd7_cart")
    virtual = pop.Population.of(model)
    typ, omega = (jnp.asarray(a) for a in pop.site_arrays(model))
    ctab = tuple(jnp.asarray(a) for a in pop.covariate_table(model))
    draw = jax.jit(jax.vmap(lambda i: pop.draw_subject(jax.random.PRNGKey(seed), i, virtual, typ, omega, *ctab,
                                                       True)))
    theta, cov = draw(jnp.arange(n))
    weight = cov[:, [c.name for c in model.covariates].index(model.role("weight"))]
    dose_t = jnp.broadcast_to(jnp.array([0.0, 1.0, 2.0]), (n, 3))
    cells = jnp.array([0.1, 0.3, 0.6]) * 1e7 * weight[:, None]
    return model, (jnp.asarray(TIMES), dose_t, cells, theta, cov)


def solve_schedules(n: int, lanes: int, names, record: dict, budget_s: float) -> None:
    import jax
    import jax.numpy as jnp

    from carkin.simulation import ensemble

    started = time.perf_counter()
    model, args = population(n)
    rows = record.setdefault("schedules", {})
    reference = None
    for name in names:
        if time.perf_counter() - started > budget_s:
            rows[name] = "skipped: time budget spent"
            continue
        per_check, branch_free, unrolled = SCHEDULES[name]
        ensemble.UNROLL_BETWEEN_CHECKS = unrolled  # read when the solve is traced
        solve = jax.jit(lambda *a, k=per_check, b=branch_free: ensemble.solve_ensemble(
            model, *a, lanes=lanes, iterations_per_check=k, branch_free=b))
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(solve(*args))
            first = time.perf_counter() - t0
            runs = []
            for _ in range(2):
                t0 = time.perf_counter()
                ys, ok, steps = jax.block_until_ready(solve(*args))
                runs.append(time.perf_counter() - t0)
            row = {"subjects": n, "lanes": lanes, "run_s": min(runs), "runs_s": runs,
                   "subjects_per_s": n / min(runs), "compile_and_run_s": first,
                   "failed": int(jnp.sum(~ok)), "mean_steps": float(jnp.mean(steps)),
                   "max_steps": int(jnp.max(steps))}
            if reference is None:
                reference = (name, ys, ok, steps)
            else:
                row["identical_to"] = reference[0]
                row["identical"] = bool(jnp.array_equal(ys, reference[1], equal_nan=True)
                                        & jnp.array_equal(ok, reference[2]) & jnp.array_equal(steps, reference[3]))
            del ys, ok, steps
            rows[name] = row
        except Exception as error:  # recorded; the other schedules still run
            rows[name] = f"failed: {type(error).__name__}: {str(error)[:1500]}"
        finally:
            ensemble.UNROLL_BETWEEN_CHECKS = True
        print(name, rows[name], flush=True)


def lanes_sweep(n: int, lanes_list, record: dict, budget_s: float) -> None:
    """The earlier default schedule on other lane counts (the solve's rate against the lanes' use)."""
    rows = record.setdefault("lanes", {})
    for lanes in lanes_list:
        one: dict = {}
        solve_schedules(n, lanes, ["check1_cond"], one, budget_s)
        rows[str(lanes)] = one["schedules"]["check1_cond"]


def transfer(record: dict, n: int = 1 << 20, count: int = 6) -> None:
    """Copying ``count`` (n, 91) float64 arrays (simulate's daily outputs) from the device to numpy:
    straight into pageable memory, and through page-locked host memory."""
    import jax
    import jax.numpy as jnp

    xs = [jax.block_until_ready(jnp.full((n, TIMES.size), float(k))) for k in range(count)]
    rows = {"bytes": int(sum(x.nbytes for x in xs))}
    for label in ("pageable", "pinned", "pageable_again", "pinned_again"):
        t0 = time.perf_counter()
        if label.startswith("pinned"):
            moved = [jax.device_put(x, x.sharding.with_memory_kind("pinned_host")) for x in xs]
            jax.block_until_ready(moved)
            rows[label + "_to_pinned_s"] = time.perf_counter() - t0
            host = [np.asarray(m) for m in moved]
            del moved
        else:
            host = [np.asarray(x) for x in xs]
        rows[label + "_s"] = time.perf_counter() - t0
        rows[label + "_GB_per_s"] = rows["bytes"] / rows[label + "_s"] / 1e9
        assert all(float(h[7, 3]) == k for k, h in enumerate(host))
        del host
    record["transfer"] = rows
    print("transfer", rows, flush=True)


def end_to_end(n: int, record: dict, key: str = "simulate") -> None:
    import jax

    import carkin as ck
    from carkin.simulation import simulate as sim

    model, regimen = ck.load_model("cd7_cart"), ck.split(1e7)
    t0 = time.perf_counter()
    ck.simulate(model, regimen, TIMES, n_subjects=n, seed=1, progress=False)
    first = time.perf_counter() - t0
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        ds = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, progress=False)
        runs.append(time.perf_counter() - t0)
    run_s = min(runs)
    record[key] = {"subjects": n, "schedule": sim.ensemble_schedule(), "lanes_at_most": sim.ensemble_sizes()[0],
                   "pinned_fetch": sim.PINNED_FETCH, "run_s": run_s, "runs_s": runs, "subjects_per_s": n / run_s,
                   "compile_and_run_s": first, "failed": int(ds["failed"].sum()),
                   "mean_steps": float(ds["n_steps"].mean()),
                   "output_bytes": int(sum(ds[o.name].nbytes for o in model.observables))}
    print(key, record[key], flush=True)
    if key != "simulate":
        return
    with jax.default_device(jax.devices("cpu")[0]):
        cpu = ck.simulate(model, regimen, TIMES, n_subjects=100, seed=2, progress=False)
    worst = 0.0
    for o in model.observables:
        a, b = ds[o.name].values[:100], cpu[o.name].values
        keep = np.abs(b) > FLOOR
        worst = max(worst, float(np.max(np.abs(a[keep] - b[keep]) / np.abs(b[keep]))))
    record["simulate"]["max_rel_gpu_vs_cpu_100_subjects"] = worst
    print("gpu vs cpu", worst, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help="comma-separated schedules to run in this process only (no other steps)")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--probe", action="store_true",
                    help="instead: lane counts, the copy to the host, and simulate with and without pinned copies")
    a = ap.parse_args(argv)
    import jax

    import carkin as ck

    ck.configure()
    n, lanes = (2_048, 256) if a.quick else (1_000_000, 1 << 18)
    record: dict = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "quick": a.quick}
    out = Path(a.out)
    started = time.perf_counter()
    if a.probe:
        from carkin.simulation import simulate as sim

        steps = (("transfer", lambda: transfer(record) if not a.quick else transfer(record, 4096)),
                 ("simulate", lambda: end_to_end(n, record)),
                 ("simulate_pageable", lambda: (setattr(sim, "PINNED_FETCH", False),
                                                end_to_end(n, record, "simulate_pageable"))),
                 ("lanes", lambda: lanes_sweep(n, (1 << 16, 1 << 17, 1 << 19, 1 << 20) if not a.quick else (128,),
                                               record, a.budget_s)))
        for name, step in steps:
            if time.perf_counter() - started > a.budget_s:
                record[name] = "skipped: time budget spent"
                continue
            try:
                step()
            except Exception:
                record[name + "_error"] = traceback.format_exc()[-3000:]
            out.write_text(json.dumps(record, indent=1, default=str))
        record["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(record, indent=1, default=str))
        return 0
    if a.child:
        solve_schedules(n, lanes, a.child.split(","), record, a.budget_s)
        out.write_text(json.dumps(record, indent=1, default=str))
        return 0
    try:
        solve_schedules(n, lanes, list(SCHEDULES), record, a.budget_s * 0.45)
    except Exception:
        record["schedules_error"] = traceback.format_exc()[-3000:]
    out.write_text(json.dumps(record, indent=1, default=str))
    try:
        end_to_end(n, record)
    except Exception:
        record["simulate_error"] = traceback.format_exc()[-3000:]
    out.write_text(json.dumps(record, indent=1, default=str))
    left = a.budget_s - (time.perf_counter() - started)
    if left > 60 and not a.quick:
        child_out = out.with_name(out.stem + "_graphs.json")
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + GRAPH_FLAGS).strip())
        try:
            proc = subprocess.run([sys.executable, __file__, "--out", str(child_out), "--child",
                                   "check1_cond,check1_select", "--budget-s", str(left - 40)], env=env,
                                  timeout=left, capture_output=True, text=True)
            record["graphs"] = json.loads(child_out.read_text()) if child_out.exists() else None
            record["graphs_log"] = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as error:
            record["graphs"] = f"timed out after {left:.0f} s: {str(error.stdout)[-1500:]}"
    record["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
