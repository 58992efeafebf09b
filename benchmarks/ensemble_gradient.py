"""Gradient of the cd7_cart population log density with each ODE engine, in one run.

`cd7_cart` (naturally selected product) on the 30 subjects of data/cd7_sim.csv, both observables,
4 estimated parameters (rho, k_kill, d_e, f_blood, all with variability), at the prior medians, on
one CPU device: the log density's value and its value with gradient (best of 3 rounds of 10 calls,
compiled ahead of time), forward mode through the solve with

- diffrax (a vmapped solve per subject, diffrax's ForwardMode; the fit default), and
- the ensemble solver (one lane per subject, forward mode through its loop), carrying tangents for
  the 4 estimated parameters alone (the fit path), and
- the same with a tangent carried for every model parameter (the path before ``free=``: the held
  parameters' tangents are zero but go through the vector field), for the same-run comparison.

    python benchmarks/ensemble_gradient.py

Writes benchmarks/results/ensemble_gradient.json.
"""

from __future__ import annotations

import dataclasses
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
from ode_gradient import CANDIDATES, RANDOM, timed  # noqa: E402
from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.fitting import predictions  # noqa: E402
from carkin.fitting.fit_problem import make_problem  # noqa: E402

ensemble_free_tangents = predictions.ensemble_observables


def ensemble_every_tangent(*args, free=None):
    """The fit's ensemble predictions with a tangent carried for every parameter (``free`` ignored)."""
    return ensemble_free_tangents(*args, free=None)

DATA = Path(__file__).resolve().parents[1] / "data" / "cd7_sim.csv"


def main() -> int:
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import init_to_median
    from numpyro.infer.util import initialize_model

    warnings.simplefilter("ignore")
    model = ck.load_model("cd7_cart", product_type="naturally_selected")
    base = make_problem(model, ck.read_dataset(DATA), estimate=CANDIDATES[:4], variability=RANDOM)
    rows, grads = {}, {}
    every = "ensemble, tangents for every parameter"
    for engine in ("diffrax", "ensemble", every):
        problem = dataclasses.replace(base, engine="ensemble" if engine == every else engine)
        predictions.ensemble_observables = (ensemble_every_tangent if engine == every
                                            else ensemble_free_tangents)
        info = initialize_model(jax.random.PRNGKey(0), problem.numpyro_model, model_args=(None,),
                                dynamic_args=True, init_strategy=init_to_median(num_samples=15))
        potential = info.potential_fn(None)
        flat, unravel = ravel_pytree(info.param_info.z)

        def log_density(v, f=potential, u=unravel):
            return f(u(v))

        _, value_s, _ = timed(log_density, flat)
        compile_s, grad_s, (_, g) = timed(jax.value_and_grad(log_density), flat)
        grads[engine] = np.asarray(g)
        rows[engine] = {"value_ms": round(value_s * 1e3, 3), "value_and_gradient_ms": round(grad_s * 1e3, 3),
                        "compile_s": round(compile_s, 1)}
        print(f"{engine}: value {value_s * 1e3:7.2f} ms, value+gradient {grad_s * 1e3:7.2f} ms, "
              f"compile {compile_s:5.1f} s", flush=True)
    predictions.ensemble_observables = ensemble_free_tangents
    diff = float(np.abs(grads["ensemble"] - grads["diffrax"]).max() / np.abs(grads["diffrax"]).max())
    same = float(np.abs(grads["ensemble"] - grads[every]).max() / np.abs(grads[every]).max())
    print(f"largest gradient difference / largest gradient: ensemble vs diffrax {diff:.1e}, "
          f"free tangents vs every tangent {same:.1e}")
    record = {"benchmark": __doc__.split("\n")[0], "machine": machine(), "rows": rows,
              "max_gradient_difference_over_largest": diff,
              "free_vs_every_tangent_gradient_difference_over_largest": same,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(__file__).parent / "results" / "ensemble_gradient.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
