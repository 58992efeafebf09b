"""NUTS on the population parameters alone, the random effects integrated out by the Laplace
approximation (nested Laplace), against NUTS on the full model (population parameters and every
subject's random effects), in one run.

    python benchmarks/nested_laplace.py [--chains 4 --warmup 500 --samples 500]

Model: stein_2019 on data/stein_sim.csv (40 subjects), all six typical values estimated,
variability on all but tmax (a switch time with variability gives the Laplace objective kinks),
carkin's default priors, M3 censoring. Both samplers: NumPyro's NUTS, target acceptance 0.8,
tree depth up to 10, the chains split over both cores.

- nested: ``carkin.fitting.laplace.nested_potential`` (the Laplace marginal likelihood, priors
  and the transforms' Jacobian on the unconstrained scale, implicit-function gradient), its
  mode searches starting at a Laplace fit's modes, chains started at that fit's estimates
  (jittered by 0.1 on the unconstrained scale). Time = the Laplace start plus the sampling,
  compile included (two runs of chains/2 parallel chains).
- full: ``carkin.fit(method="nuts", init="laplace")``; time = its sampling (``sampling_s``) and
  compile (``compile_s``), and the same Laplace start (its ``wall``).

Minimum bulk ESS over the population parameters (arviz_stats), per second of each tool's total
time; posterior medians side by side (the nested posterior is approximate: it is exact only
where each subject's conditional posterior is normal). Writes results/nested_laplace.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.fitting import laplace  # noqa: E402
from carkin.fitting.convergence import _ess, _rhat  # noqa: E402
from carkin.fitting.fit_problem import make_problem  # noqa: E402

ck.configure(compilation_cache=False)
DATA = Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv"
VARIABILITY = ("fold", "cmax", "alpha", "fb", "beta")


def nested(problem, chains: int, warmup: int, samples: int, seed: int) -> dict:
    from numpyro.infer import MCMC, NUTS

    t0 = time.perf_counter()
    fit = laplace.estimate(problem, ck.Laplace(starts=1, covariance=False), progress=False)
    start_s = time.perf_counter() - t0
    potential, ob = laplace.nested_potential(problem, fit.z)
    per_run = min(chains, jax.local_device_count())
    rng = np.random.default_rng(seed)
    draws, stats = [], []
    t0 = time.perf_counter()
    for r in range(chains // per_run):
        mcmc = MCMC(NUTS(potential_fn=potential, target_accept_prob=0.8, max_tree_depth=10), num_warmup=warmup,
                    num_samples=samples, num_chains=per_run, chain_method="parallel", progress_bar=False)
        init = jnp.asarray(fit.u + 0.1 * rng.standard_normal((per_run, fit.u.size)))
        mcmc.run(jax.random.PRNGKey(seed + r), init_params=init, extra_fields=("diverging", "num_steps"))
        draws.append(np.asarray(mcmc.get_samples(group_by_chain=True)))
        stats.append({k: np.asarray(v) for k, v in mcmc.get_extra_fields(group_by_chain=True).items()})
    sampling_s = time.perf_counter() - t0
    u = np.concatenate(draws)  # (chain, draw, P)
    values = jax.vmap(jax.vmap(ob.constrain))(jnp.asarray(u))
    post = xr.Dataset({s: (("chain", "draw"), np.asarray(values[s])) for s in ob.sites})
    return {"post": post, "laplace_start_s": start_s, "sampling_s": sampling_s,
            "divergences": int(sum(s["diverging"].sum() for s in stats)),
            "mean_leapfrogs": float(np.mean(np.concatenate([s["num_steps"] for s in stats])))}


def full(problem_kw, chains: int, warmup: int, samples: int, seed: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        tree = ck.fit(ck.load_model("stein_2019"), DATA, sampler=ck.NUTS(chains=chains, warmup=warmup,
                      samples=samples, init="laplace"), seed=seed, progress=False, **problem_kw)
        wall = time.perf_counter() - t0
    settings = json.loads(tree.attrs["settings"])
    post = tree["posterior"].to_dataset()
    return {"post": post, "wall_s": wall, "sampling_s": settings["sampling_s"], "compile_s": settings["compile_s"],
            "divergences": int(tree["sample_stats"]["diverging"].sum()),
            "mean_leapfrogs": float(tree["sample_stats"]["n_steps"].mean())
            if "n_steps" in tree["sample_stats"] else None}


def summary(post: xr.Dataset, sites, seconds: float) -> dict:
    post = post[list(sites)]
    ess, rhat = _ess(post, "bulk"), _rhat(post)
    return {"seconds": round(seconds, 1), "min_bulk_ess": round(min(ess.values()), 1),
            "min_bulk_ess_per_s": round(min(ess.values()) / seconds, 3), "max_rhat": round(max(rhat.values()), 4),
            "medians": {s: float(post[s].median()) for s in sites}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nested_laplace.json"))
    a = ap.parse_args(argv)
    problem_kw = {"variability": VARIABILITY}
    problem = make_problem(ck.load_model("stein_2019"), ck.read_dataset(DATA), **problem_kw)
    sites = tuple(problem.priors)
    n = nested(problem, a.chains, a.warmup, a.samples, a.seed)
    f = full(problem_kw, a.chains, a.warmup, a.samples, a.seed)
    record = {
        "machine": machine(), "command": "python benchmarks/nested_laplace.py " + " ".join(argv or sys.argv[1:]),
        "chains": a.chains, "warmup": a.warmup, "samples": a.samples,
        "nested": dict(summary(n["post"], sites, n["laplace_start_s"] + n["sampling_s"]),
                       laplace_start_s=round(n["laplace_start_s"], 1), sampling_s=round(n["sampling_s"], 1),
                       divergences=n["divergences"], mean_leapfrogs=round(n["mean_leapfrogs"], 1)),
        "full": dict(summary(f["post"], sites, f["wall_s"]), sampling_s=f["sampling_s"], compile_s=f["compile_s"],
                     divergences=f["divergences"], mean_leapfrogs=f["mean_leapfrogs"]),
    }
    record["nested_over_full_ess_per_s"] = round(record["nested"]["min_bulk_ess_per_s"]
                                                 / record["full"]["min_bulk_ess_per_s"], 2)
    record["median_relative_difference"] = {
        s: round(record["nested"]["medians"][s] / record["full"]["medians"][s] - 1, 4) for s in sites}
    print(json.dumps(record, indent=1))
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
