"""The ensemble solver on a GPU (issue 15): its rate on each lane count, what copying its outputs to the
host costs, and simulate's rate end to end.

Steps, each recorded as it finishes (a failed step is recorded and the rest go on):

1. ``lanes``: the ensemble solve alone of 10^6 cd7_cart subjects (split 1e7 cells/kg, daily saves to
   day 90), inputs and outputs kept on the device, on 2^16 (simulate's default on a GPU), 2^14 and
   2^15 lanes.
2. ``simulate``: ``carkin.simulate`` of the same design end to end (outputs copied to the host through
   page-locked memory, Dataset built), four calls in a row, each made while the last one's Dataset is
   held; then the first 100 subjects on the CPU and the GPU's agreement with them.
3. ``simulate_pageable``: the same with the copy straight into pageable memory (the earlier way).
4. ``transfer``: six (2^20, 91) float64 arrays (4.6 GB) copied to numpy both ways, twice.
5. ``graphs``: step 1 at 2^16 lanes again in a child process with XLA's command buffers for while loops
   and branches (``XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL``: the loop runs as one
   CUDA graph with its condition on the device instead of a read-back per iteration).

Other loop schedules (the loop condition checked every 8 iterations, lane refill by selects instead of
a branch) were measured with this script at commit 9916a0d (results/gpu_loop_h200.json): no gain.

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
RUNS = {"simulate": 4, "simulate_pageable": 2}  # one Dataset is held while the next is made, as in a loop
LANE_COUNTS = (1 << 16, 1 << 14, 1 << 15)
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


def device_solve(n: int, lanes_list, record: dict, budget_s: float, key: str = "lanes") -> None:
    """The ensemble solve alone (inputs and outputs on the device) of the same population on each lane count."""
    import jax
    import jax.numpy as jnp

    from carkin.simulation.ensemble import solve_ensemble

    started = time.perf_counter()
    model, args = population(n)
    rows = record.setdefault(key, {})
    for lanes in lanes_list:
        if time.perf_counter() - started > budget_s:
            rows[str(lanes)] = "skipped: time budget spent"
            continue
        solve = jax.jit(lambda *a, lanes=lanes: solve_ensemble(model, *a, lanes=lanes))
        t0 = time.perf_counter()
        jax.block_until_ready(solve(*args))
        first = time.perf_counter() - t0
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            _, ok, steps = jax.block_until_ready(solve(*args))
            runs.append(time.perf_counter() - t0)
        rows[str(lanes)] = {"subjects": n, "lanes": lanes, "run_s": min(runs), "runs_s": runs,
                            "subjects_per_s": n / min(runs), "compile_and_run_s": first,
                            "failed": int(jnp.sum(~ok)), "mean_steps": float(jnp.mean(steps)),
                            "max_steps": int(jnp.max(steps))}
        print(key, lanes, rows[str(lanes)], flush=True)


def transfer(record: dict, n: int = 1 << 20, count: int = 6) -> None:
    """Copying ``count`` (n, 91) float64 arrays (simulate's daily outputs) from the device to numpy:
    straight into pageable memory, and through page-locked host memory."""
    import jax
    import jax.numpy as jnp

    rows: dict = {"bytes": count * n * TIMES.size * 8}
    for label in ("pageable", "pinned", "pageable_again", "pinned_again"):
        # fresh device arrays each time: a jax array keeps its first host copy
        xs = [jax.block_until_ready(jnp.full((n, TIMES.size), float(k))) for k in range(count)]
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
        del host, xs
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
    for _ in range(RUNS[key]):
        t0 = time.perf_counter()
        ds = ck.simulate(model, regimen, TIMES, n_subjects=n, seed=2, progress=False)
        runs.append(time.perf_counter() - t0)
    run_s = min(runs)
    record[key] = {"subjects": n, "lanes_at_most": sim.ensemble_sizes()[0],
                   "pinned_fetch": sim.PINNED_FETCH, "run_s": run_s, "runs_s": runs, "subjects_per_s": n / run_s,
                   "median_run_s": float(np.median(runs)),
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
    ap.add_argument("--graphs-only", action="store_true", help="the device solve at the default lanes alone "
                    "(run in a child process with XLA's while-loop command buffers turned on)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="no step starts after this many seconds")
    default_lanes = ",".join(str(k) for k in LANE_COUNTS)
    ap.add_argument("--lanes", help=f"comma-separated lane counts for the lanes step (default: {default_lanes})")
    ap.add_argument("--steps", default="lanes,simulate,simulate_pageable,transfer,graphs",
                    help="comma-separated steps to run, in their fixed order")
    a = ap.parse_args(argv)
    import jax

    import carkin as ck
    from carkin.simulation import simulate as sim

    ck.configure()
    n = 2_048 if a.quick else 1_000_000
    lanes = (128, 256) if a.quick else LANE_COUNTS
    if a.lanes:
        lanes = tuple(int(k) for k in a.lanes.split(","))
    record: dict = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "quick": a.quick}
    out = Path(a.out)
    started = time.perf_counter()
    if a.graphs_only:
        device_solve(n, lanes[:1], record, a.budget_s)
        out.write_text(json.dumps(record, indent=1, default=str))
        return 0

    def graphs():
        child_out = out.with_name(out.stem + "_graphs.json")
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + GRAPH_FLAGS).strip())
        args = ["--quick"] if a.quick else []
        proc = subprocess.run([sys.executable, __file__, "--out", str(child_out), "--graphs-only", *args],
                              env=env, timeout=120, capture_output=True, text=True)
        record["graphs"] = json.loads(child_out.read_text()) if child_out.exists() else proc.stderr[-3000:]

    def pageable():
        sim.PINNED_FETCH = False
        try:
            end_to_end(n, record, "simulate_pageable")
        finally:
            sim.PINNED_FETCH = True

    steps = (("lanes", lambda: device_solve(n, lanes, record, a.budget_s)),
             ("simulate", lambda: end_to_end(n, record)),
             ("simulate_pageable", pageable),
             ("transfer", lambda: transfer(record, 4096 if a.quick else 1 << 20)),
             ("graphs", graphs))
    run_steps(steps, a.steps.split(","), record, out, a.budget_s, started)
    return 0


def run_steps(steps, chosen, record: dict, out: Path, budget_s: float, started: float) -> None:
    """Run the ``chosen`` of ``steps`` ((name, function) pairs) in order, recording each failure and skipping
    those that would start after ``budget_s``; ``record`` is written to ``out`` after each."""
    for name, step in steps:
        if name not in chosen:
            continue
        if time.perf_counter() - started > budget_s:
            record[name] = "skipped: time budget spent"
            continue
        try:
            step()
        except Exception:  # recorded; the other steps still run
            record[name + "_error"] = traceback.format_exc()[-3000:]
        out.write_text(json.dumps(record, indent=1, default=str))
    record["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
