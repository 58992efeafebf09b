"""Gradient of an ODE model's population log density: forward mode against reverse mode.

    python benchmarks/ode_gradient.py                   # 4, 5, 6 and 8 estimated parameters
    python benchmarks/ode_gradient.py --estimated 4 12

`cd7_cart` (6 states, split infusion) on the 30 subjects of data/cd7_sim.csv, both
observables, with the first N of a fixed list of parameters estimated (variability on
rho, k_kill, d_e and f_blood). At the prior medians, on one CPU device, it times the
log density's value and its value with gradient (best of 3 rounds of 10 calls, each
compiled once ahead of time), differentiating the solve either

- in forward mode: diffrax's ForwardMode, one tangent per estimated parameter, the
  gradient taken as the Jacobian's product with the cotangent (carkin's custom VJP), or
- in reverse mode: diffrax's default checkpointed adjoint.

Both gradients must agree (their largest relative difference is recorded). carkin uses
forward mode up to FORWARD_MODE_MAX_PARAMETERS estimated parameters, chosen from this
table. Writes benchmarks/results/ode_gradient.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("CARKIN_CPU_DEVICES", "1")  # one device: the cost of one gradient

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import numpy as np  # noqa: E402
from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
import carkin.inference as inference  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured

DATA = Path(__file__).resolve().parents[1] / "data" / "cd7_sim.csv"
CANDIDATES = ("rho", "k_kill", "d_e", "f_blood", "k_ex", "d_m", "r_t", "k_em", "a_m", "g_inf", "k_a", "d_x")
RANDOM = ("rho", "k_kill", "d_e", "f_blood")
CALLS, ROUNDS = 10, 3


def timed(fn, x) -> tuple[float, float, object]:
    """Compile time, best seconds per call, and the last result of ``fn`` at points near ``x``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(x).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(x))
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for i in range(CALLS):
            out = compiled(x + 1e-9 * i)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / CALLS)
    return compile_s, best, out


def flat_log_density(potential, unravel):
    """numpyro's potential energy as a function of one flat vector."""
    return lambda flat: potential(unravel(flat))


def measure(model, data, n_estimated: int) -> dict:
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    estimate = CANDIDATES[:n_estimated]
    problem = inference.make_problem(model, data, estimate=estimate, variability=RANDOM)
    row = {"estimated": list(estimate), "subjects": data.n_subjects, "unconstrained_dim": None}
    grads = {}
    for mode, limit in (("forward", len(estimate)), ("reverse", -1)):
        inference.FORWARD_MODE_MAX_PARAMETERS = limit
        info = initialize_model(jax.random.PRNGKey(0), problem.numpyro_model, model_args=(None,),
                                dynamic_args=True, init_strategy=init_to_median(num_samples=15))
        potential = info.potential_fn(None)
        flat, unravel = ravel_pytree(info.param_info.z)
        row["unconstrained_dim"] = int(flat.size)
        log_density = flat_log_density(potential, unravel)
        _, value_s, _ = timed(log_density, flat)
        compile_s, grad_s, (_, g) = timed(jax.value_and_grad(log_density), flat)
        grads[mode] = np.asarray(g)
        row[mode] = {"value_ms": round(value_s * 1e3, 3), "value_and_gradient_ms": round(grad_s * 1e3, 3),
                     "gradient_over_value": round(grad_s / value_s, 2), "compile_s": round(compile_s, 1)}
        print(f"{n_estimated} estimated, {mode:>7}: value {value_s * 1e3:8.2f} ms, value+gradient "
              f"{grad_s * 1e3:8.2f} ms, compile {compile_s:5.1f} s", flush=True)
    scale = np.abs(grads["reverse"]).max()
    row["max_gradient_difference_over_largest"] = float(np.abs(grads["forward"] - grads["reverse"]).max() / scale)
    row["forward_over_reverse"] = round(row["forward"]["value_and_gradient_ms"]
                                        / row["reverse"]["value_and_gradient_ms"], 2)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimated", type=int, nargs="+", default=[4, 5, 6, 8])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ode_gradient.json"))
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    model = ck.load_model("cd7_cart", product_type="naturally_selected")
    data = ck.read_dataset(DATA)
    limit = inference.FORWARD_MODE_MAX_PARAMETERS
    rows = [measure(model, data, n) for n in a.estimated]
    inference.FORWARD_MODE_MAX_PARAMETERS = limit
    record = {"benchmark": "gradient of the cd7_cart population log density, forward vs reverse mode",
              "command": "python benchmarks/ode_gradient.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "calls": CALLS, "rounds": ROUNDS,
              "forward_mode_max_parameters": limit, "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
