"""Individual (MAP) estimates for an ODE model, against a scipy per-subject loop.

    python benchmarks/posthoc_ode.py                     # 30 subjects, scipy on the first 10

`cd7_cart` (naturally selected product, 6 states, split infusion) on the 30 subjects of
data/cd7_sim.csv (both observables, BLQ records on both), random effects on rho, k_kill, d_e
and f_blood at the dataset's true population values. carkin.posthoc.individual_estimates
takes value, gradient and Hessian in forward mode through the solve (8 starts per subject,
the best kept): by default all subjects in one ensemble solve per Newton step
(``--engine diffrax``: a vectorised diffrax solve per subject, on every CPU device). The
baseline is what a user would otherwise write: scipy's Nelder-Mead on an objective whose
states come from solve_ivp (LSODA, rtol 1e-6, atol 1e-6, carkin's own tolerances), one
subject after another, from z = 0 (the objective of tests/test_posthoc.py). Accuracy: the
same objective at tight tolerances (rtol 1e-10) is evaluated at both answers, and the
largest difference in eta where both found the same optimum.

Writes a JSON record to benchmarks/results/posthoc_ode.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from simulate_throughput import machine  # noqa: E402
from test_posthoc import scipy_ode_objective  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.inference import make_problem  # noqa: E402
from carkin.posthoc import individual_estimates  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured

DATA = Path(__file__).resolve().parents[1] / "data" / "cd7_sim.csv"
RANDOM = ("rho", "k_kill", "d_e", "f_blood")
SAME_OPTIMUM = 1e-6  # objectives closer than this count as the same optimum


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scipy-subjects", type=int, default=10)
    ap.add_argument("--engine", default="auto", choices=("auto", "ensemble", "diffrax"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "posthoc_ode.json"))
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    data = ck.read_dataset(DATA)
    model = ck.load_model("cd7_cart", product_type="naturally_selected")
    truth = data.meta["generation"]["true_values"]
    problem = make_problem(model, data, estimate=RANDOM, variability=RANDOM)
    population = {s: truth[s] for s in problem.priors}
    omega = np.array([population[f"omega_{n}"] for n in RANDOM])

    t0 = time.perf_counter()
    est = individual_estimates(problem, population, progress=False, engine=a.engine)
    wall = time.perf_counter() - t0
    eta = np.stack([est[f"eta_{n}"].values for n in RANDOM], axis=1)
    carkin = {"subjects": data.n_subjects, "devices": est.attrs["devices"], "wall_s": round(wall, 1),
              "compile_s": est.attrs["compile_s"], "run_s": est.attrs["run_s"],
              "subjects_per_s_after_compile": round(data.n_subjects / est.attrs["run_s"], 2),
              "converged": int(est["converged"].sum()), "engine": est.attrs["engine"]}
    print(f"carkin: {carkin}", flush=True)

    n_ref = min(a.scipy_subjects, data.n_subjects)
    objectives = [scipy_ode_objective(model, data, s, population, RANDOM, rtol=1e-6, atol=1e-6) for s in range(n_ref)]
    for objective in objectives:  # compiles each subject's right-hand side before the clock starts
        objective(np.zeros(len(RANDOM)))
    t0 = time.perf_counter()
    scipy_z, evaluations = [], 0
    for objective in objectives:
        res = minimize(objective, np.zeros(len(RANDOM)), method="Nelder-Mead",
                       options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 4000})
        scipy_z.append(res.x)
        evaluations += res.nfev
    scipy_wall = time.perf_counter() - t0
    lower, eta_diff = {"carkin": 0, "scipy": 0}, []
    for s in range(n_ref):
        tight = scipy_ode_objective(model, data, s, population, RANDOM)
        f_carkin, f_scipy = tight(eta[s] / omega), tight(scipy_z[s])
        if abs(f_carkin - f_scipy) <= SAME_OPTIMUM * max(1.0, abs(f_scipy)):
            eta_diff.append(np.abs(eta[s] - omega * scipy_z[s]).max())
        else:
            lower["carkin" if f_carkin < f_scipy else "scipy"] += 1
    scipy = {"subjects": n_ref, "wall_s": round(scipy_wall, 1), "subjects_per_s": round(n_ref / scipy_wall, 3),
             "objective_evaluations": evaluations}
    print(f"scipy: {scipy}")
    record = {"benchmark": "individual estimates of cd7_cart (ODE) against scipy Nelder-Mead on solve_ivp",
              "command": "python benchmarks/posthoc_ode.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "random_effects": list(RANDOM), "carkin": carkin, "scipy": scipy,
              "lower_optimum_at_tight_tolerance": lower,
              "max_eta_difference_same_optimum": float(max(eta_diff)) if eta_diff else None,
              "same_optimum": len(eta_diff),
              "speed_ratio_after_compile": round(carkin["subjects_per_s_after_compile"] / scipy["subjects_per_s"], 1),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"lower optimum: {lower}; same optimum for {len(eta_diff)}, max eta difference "
          f"{record['max_eta_difference_same_optimum']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
