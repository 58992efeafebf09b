"""Gradient of the cd7_cart population log density with each ODE engine, in one run.

`cd7_cart` (naturally selected product) on the 30 subjects of data/cd7_sim.csv, both observables,
4 estimated parameters (rho, k_kill, d_e, f_blood, all with variability), at the prior medians, on
one CPU device: the log density's value and its value with gradient (best of 8 rounds of 20 calls,
compiled ahead of time), forward mode through the solve with

- diffrax (a vmapped solve per subject, diffrax's ForwardMode; the fit default), and
- the ensemble solver (one lane per subject, forward mode through its loop), carrying tangents for
  the 4 estimated parameters alone (the fit path), and
- the same with a tangent carried for every model parameter (the path before ``free=``: the held
  parameters' tangents are zero but go through the vector field), for the same-run comparison.

Measured twice in one run: with the process free to use every core (XLA may run independent
kernels of one device side by side, which on 2 cores made timings vary run to run), and pinned to
one core, as each chain of a fit runs on its own device and core.

    python benchmarks/ensemble_gradient.py

Writes benchmarks/results/ensemble_gradient.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("CARKIN_CPU_DEVICES", "1")  # one device: the cost of one gradient

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import ode_gradient  # noqa: E402
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
ISSUE_GRADIENT_MS = 19.8  # the diffrax gradient when the ensemble solver was asked for (issue 15), Intel machine
ode_gradient.CALLS, ode_gradient.ROUNDS = 20, 8


def measure() -> dict:
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
    return {"rows": rows, "max_gradient_difference_over_largest": diff,
            "free_vs_every_tangent_gradient_difference_over_largest": same}


def main() -> int:
    if "--measure" in sys.argv:  # the child: one setting, its record on stdout's last line
        print(json.dumps(measure()))
        return 0
    settings = {}
    for name, cores in (("all cores", None), ("one core", {0})):
        print(f"--- {name}", flush=True)
        child = subprocess.run([sys.executable, __file__, "--measure"], capture_output=True, text=True,
                               preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if cores else None)
        print(child.stdout[:child.stdout.rstrip().rfind("\n")], child.stderr[-2000:] if child.returncode else "")
        if child.returncode:
            return child.returncode
        settings[name] = json.loads(child.stdout.rstrip().splitlines()[-1])
    for name, rec in settings.items():
        best = rec["rows"]["ensemble"]["value_and_gradient_ms"]
        rec["issue_gradient_ms_over_ensemble"] = round(ISSUE_GRADIENT_MS / best, 2)
        rec["diffrax_over_ensemble"] = round(rec["rows"]["diffrax"]["value_and_gradient_ms"] / best, 2)
        print(f"{name}: ensemble value+gradient {best} ms: {rec['issue_gradient_ms_over_ensemble']}x the issue's "
              f"{ISSUE_GRADIENT_MS} ms, {rec['diffrax_over_ensemble']}x diffrax in this run")
    record = {"benchmark": __doc__.split("\n")[0], "machine": machine(), "calls": ode_gradient.CALLS,
              "rounds": ode_gradient.ROUNDS, "settings": settings,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(__file__).parent / "results" / "ensemble_gradient.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
