"""Individual (MAP) estimates for 10^5 subjects in one call, against a scipy per-subject loop.

    python benchmarks/posthoc_scale.py                         # 100,000 subjects, scipy on 200
    python benchmarks/posthoc_scale.py --subjects 4096 --scipy-subjects 20   # quick

The 40-subject design of data/stein_sim.csv (its doses, sampling days and LLOQ) is repeated
until there are N subjects; their measurements are simulated from stein_2019 at the dataset's
true population values (random effects, log-additive residual error, censored below the
LLOQ). carkin.posthoc.individual_estimates then finds every subject's MAP random effects at
those population values (8 starts per subject, the best kept). The baseline is what a user
would otherwise write: scipy's BFGS (gtol 1e-9, from z = 0) on a numpy objective, one subject
after another (the objective of tests/test_posthoc.py). Accuracy: how often each found the
lower optimum, and where both found the same optimum the largest difference in eta.

Writes a JSON record to benchmarks/results/posthoc_scale.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from simulate_throughput import machine  # noqa: E402
from test_posthoc import scipy_map  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.inference import make_problem  # noqa: E402
from carkin.posthoc import individual_estimates  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured

DATA = Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv"
ORDER = ("fold", "tmax", "cmax", "alpha", "fb", "beta")


def repeated_design(data: ck.StudyData, n: int) -> ck.StudyData:
    """``data``'s subjects repeated (with new IDs 1..n) until there are n of them."""
    pick = np.arange(n) % data.n_subjects
    per_obs = [np.flatnonzero(data.obs_subject == s) for s in range(data.n_subjects)]
    rows = np.concatenate([per_obs[s] for s in pick])
    subject = np.repeat(np.arange(n), [len(per_obs[s]) for s in pick])
    return dataclasses.replace(
        data, ids=tuple(range(1, n + 1)), dose_times=data.dose_times[pick], dose_cells=data.dose_cells[pick],
        n_doses=data.n_doses[pick], obs_subject=subject, obs_time=data.obs_time[rows],
        obs_observable=data.obs_observable[rows], obs_value=data.obs_value[rows], obs_blq=data.obs_blq[rows],
        obs_lloq=data.obs_lloq[rows], obs_row=data.obs_row[rows],
        covariates={k: v[pick] for k, v in data.covariates.items()})


def simulated(data: ck.StudyData, truth: dict, seed: int) -> ck.StudyData:
    """New measurements of ``data``'s design from the population at ``truth``, censored below the LLOQ."""
    problem = make_problem(ck.load_model("stein_2019"), data)
    params = {k: float(v) for k, v in truth.items()}
    k_z, k_eps = jax.random.split(jax.random.PRNGKey(seed))
    params["z"] = jax.random.normal(k_z, (data.n_subjects, len(problem.random)))
    f, _ = jax.jit(lambda p: problem.predictions(problem.individual(p)))(params)
    y = np.asarray(problem.sample_measurements(params, f, k_eps))
    blq = y < data.obs_lloq
    return dataclasses.replace(data, obs_value=np.where(blq, np.nan, y), obs_blq=blq)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=100_000)
    ap.add_argument("--scipy-subjects", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "posthoc_scale.json"))
    a = ap.parse_args(argv)
    base = ck.read_dataset(DATA)
    truth = dict(base.meta["generation"]["true_values"])
    data = simulated(repeated_design(base, a.subjects), truth, a.seed)
    t0 = time.perf_counter()
    problem = make_problem(ck.load_model("stein_2019"), data)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = individual_estimates(problem, truth, starts=a.starts, progress=False)
    wall = time.perf_counter() - t0
    run_s = est.attrs["run_s"]

    n_ref = min(a.scipy_subjects, a.subjects)
    t0 = time.perf_counter()
    reference = [scipy_map(data, s, truth) for s in range(n_ref)]
    scipy_s = time.perf_counter() - t0
    eta = np.stack([est[f"eta_{n}"].values[:n_ref] for n in ORDER], axis=1)
    eta_ref = np.stack([r[0] for r in reference])
    obj_ref = np.array([r[1] for r in reference])
    diff = est["objective"].values[:n_ref] - obj_ref
    same = np.abs(diff) <= 1e-6
    record = {
        "subjects": a.subjects, "observations": int(data.n_obs), "blq_fraction": float(data.obs_blq.mean()),
        "problem_setup_s": setup_s, "wall_s": wall, "compile_s": est.attrs["compile_s"], "run_s": run_s,
        "subjects_per_s": a.subjects / run_s, "devices": est.attrs["devices"],
        "converged": int(est["converged"].sum()), "mean_iterations": float(est["iterations"].mean()),
        "max_iterations": int(est["iterations"].max()),
        "shrinkage": {k[len("shrinkage_"):]: v for k, v in est.attrs.items() if k.startswith("shrinkage_")},
        "scipy_subjects": n_ref, "scipy_s": scipy_s, "scipy_subjects_per_s": n_ref / scipy_s,
        "speedup": (a.subjects / run_s) / (n_ref / scipy_s),
        # the per-subject posterior can have several modes: compare the optima found, then the
        # estimates where both found the same one
        "scipy_better_by_1e-6": int((diff > 1e-6).sum()), "carkin_better_by_1e-6": int((diff < -1e-6).sum()),
        "largest_excess_over_scipy": float(diff.max()),
        "max_abs_eta_diff_same_optimum": float(np.abs(eta - eta_ref)[same].max()) if same.any() else None,
        "starts": a.starts,
        "warnings": [str(w.message) for w in caught],
        "machine": machine(), "command": "python benchmarks/posthoc_scale.py " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
