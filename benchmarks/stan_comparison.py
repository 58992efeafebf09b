"""Full NUTS on the same hierarchical model and dataset in carkin and in Stan (rstan), in one run.

    python benchmarks/stan_comparison.py                              # 4 chains, 1000 warmup + 1000 draws each
    python benchmarks/stan_comparison.py --warmup 100 --samples 100   # quick
    python benchmarks/stan_comparison.py --skip-stan                  # carkin only (no equivalence check)

Model: stein_2019 (closed form) on data/stein_sim.csv, all six parameters estimated with
between-subject variability, carkin's default priors, log-additive error with M3 censoring
of BLQ records. The Stan program is benchmarks/stan/stein_population.stan; its data (the
design, and the prior parameters read from carkin's prior objects) are generated here.

Steps:
1. Stan is compiled (``stan_model``, timed: the compile time) in an ``Rscript`` process,
   which also evaluates Stan's log density (``log_prob``, Jacobian adjusted, on the
   unconstrained scale) at two random parameter points. carkin's log density at the same
   points (numpyro's potential energy on the unconstrained scale, negated) must agree:
   the run aborts if the difference between the two points differs by more than 1e-6
   relative. Both keep every normalising constant, so the absolute values are reported too.
2. carkin: ``carkin.fit(chains=4, warmup=W, samples=S, seed, progress=False)``; the fit records
   the compile time of its sampler program (ahead-of-time ``lower().compile()``) and the run
   time of that program (warmup and draws of all chains: the sampling time); wall time is the
   whole ``fit`` call (start points, compile, sampling, predictions and the DataTree). The
   chains run split over both cores (two JAX CPU devices). Init at prior medians (carkin's default).
3. Stan: ``sampling(chains=4, cores=2, iter=W+S, warmup=W, seed)`` in a second ``Rscript``
   process that loads the compiled model; sampling time = wall time of that call (it includes
   rstan's start of 2 worker R processes; the chains' own times from ``get_elapsed_time`` are
   recorded too: Stan 2.21 measures them with ``clock()``, so they are CPU seconds of each
   chain's process, and their sum over the cores, against the wall time, shows how much other
   load on the machine slowed the run). Init at
   the prior medians (typical values = the model's, omegas = 0.674 x their HalfNormal scale,
   sigma = 0.674, z = 0), the same for every chain. adapt_delta 0.8 and max_treedepth 10 in
   both tools (numpyro's target_accept_prob / max_tree_depth).

Bulk ESS and R-hat of both tools come from the same functions (arviz_stats ``ess(method="bulk")``
and ``rhat`` on an xarray Dataset with dims (chain, draw)), over the 13 population parameters
(6 typical values, 6 omegas, sigma). ESS/s divides by the sampling time (warmup included).
Divergences are counted over the post-warmup draws.

If R's rstan is missing, Debian's r-cran-rstan is installed with apt-get (needs root).
Writes a JSON record (machine, versions, numbers, command) to benchmarks/results/stan_comparison.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.inference import _ess, _rhat, make_problem, population_sites  # noqa: E402
from carkin.observation import PREDICTION_FLOOR  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "stein_sim.csv"
STAN_FILE = Path(__file__).resolve().parent / "stan" / "stein_population.stan"
MODEL = "stein_2019"
ORDER = ("fold", "tmax", "cmax", "alpha", "fb", "beta")  # column order of z / omega in the Stan program
POSITIVE = ("fold", "tmax", "cmax", "alpha", "beta")
OBSERVABLE = "car_copies"
CHAINS = 4
STAN_CORES = 2
TARGET_ACCEPT = 0.8
MAX_TREE_DEPTH = 10
CHECK_RTOL = 1e-6
HALF_NORMAL_MEDIAN = 0.6744897501960817  # median of HalfNormal(1)
CHECK_SEED = 20240607


# --- R / rstan ---------------------------------------------------------------------------------------


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def rstan_available() -> bool:
    try:
        return _run(["Rscript", "-e", "suppressPackageStartupMessages(library(rstan))"]).returncode == 0
    except FileNotFoundError:
        return False


def ensure_rstan() -> None:
    """Install Debian's r-cran-rstan (and R with it) when ``library(rstan)`` fails."""
    if rstan_available():
        return
    print("rstan not found: installing Debian's r-cran-rstan with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "r-cran-rstan"]
    r = _run(install, env=env)
    if r.returncode != 0:  # stale or missing package lists: update, then try again
        _run(["apt-get", "update"], env=env)
        r = _run(install, env=env)
    if r.returncode != 0 or not rstan_available():
        sys.exit(f"could not install r-cran-rstan (apt-get exit {r.returncode}):\n{r.stderr[-3000:]}")


def rscript(script: str, workdir: Path, name: str) -> float:
    """Run an R script in ``workdir``; return the process wall time. Exits with R's output on failure."""
    path = workdir / f"{name}.R"
    path.write_text(script)
    t0 = time.perf_counter()
    r = _run(["Rscript", "--vanilla", str(path)], cwd=workdir)
    wall = time.perf_counter() - t0
    (workdir / f"{name}.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    if r.returncode != 0:
        sys.exit(f"Rscript {name}.R failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return wall


def r_value(v) -> str:
    """An R expression for a Python scalar / numpy array (arrays keep their dims; R is column-major)."""
    a = np.asarray(v)
    if a.dtype == bool:
        a = a.astype(np.int64)
    integer = np.issubdtype(a.dtype, np.integer)

    def num(x):
        return f"{int(x)}L" if integer else repr(float(x))

    if a.ndim == 0:
        return num(a)
    flat = ", ".join(num(x) for x in a.ravel(order="F"))
    dims = ", ".join(f"{d}L" for d in a.shape)
    if not a.size:
        return f"array({'integer' if integer else 'numeric'}(0), dim = c({dims}))"
    return f"array(c({flat}), dim = c({dims}))"


def r_list(d: dict) -> str:
    return "list(" + ",\n  ".join(f"{k} = {r_value(v)}" for k, v in d.items()) + ")"


def read_keyvalues(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


# --- the model on both sides --------------------------------------------------------------------------


def build_problem():
    model = ck.load_model(MODEL)
    data = ck.read_dataset(DATA)
    problem = make_problem(model, data)
    if problem.estimated != ORDER or problem.random != ORDER or problem.columns:
        raise SystemExit(f"unexpected population structure {problem.estimated} / {problem.random}")
    if problem.design.observables != (OBSERVABLE,) or problem.errors[OBSERVABLE].kind != "log-additive":
        raise SystemExit("unexpected observables or error model")
    return model, data, problem


def stan_data(problem) -> dict:
    """The Stan program's data: the design as carkin sees it, and carkin's prior parameters."""
    d, pr = problem.design, problem.priors
    obs_t = d.times[d.obs_subject, d.obs_tindex] - d.dose_times[d.obs_subject, 0]
    blq = d.blq.astype(bool)
    idx_obs, idx_cens = np.flatnonzero(~blq), np.flatnonzero(blq)
    sd = {float(pr[n].scale) for n in POSITIVE} | {float(pr["fb"].base_dist.scale)}
    if len(sd) != 1:
        raise SystemExit(f"the Stan program assumes one prior SD for all typical values, got {sd}")
    return {
        "S": np.int64(d.n_subjects), "N": np.int64(d.y.size),
        "subject": d.obs_subject.astype(np.int64) + 1, "t": obs_t,
        "N_obs": np.int64(idx_obs.size), "idx_obs": idx_obs.astype(np.int64) + 1, "log_y": np.log(d.y[idx_obs]),
        "N_cens": np.int64(idx_cens.size), "idx_cens": idx_cens.astype(np.int64) + 1,
        "log_lloq": np.log(d.lloq[idx_cens]),
        "mu_log": np.array([float(pr[n].loc) for n in POSITIVE]),
        "mu_logit_fb": float(pr["fb"].base_dist.loc),
        "prior_sd": sd.pop(),
        "omega_scale": np.array([float(pr[f"omega_{n}"].scale) for n in ORDER]),
        "sigma_scale": float(pr[f"sigma_{OBSERVABLE}"].scale),
        "prediction_floor": PREDICTION_FLOOR,
    }


def stan_point(carkin_params: dict) -> dict:
    """carkin's sampled sites (constrained) as the Stan program's parameters."""
    p = {n: float(carkin_params[n]) for n in ("fold", "tmax", "cmax", "alpha")}
    fb = float(carkin_params["fb"])
    p["logit_fb"] = math.log(fb) - math.log1p(-fb)
    p["beta"] = float(carkin_params["beta"])
    p["omega"] = np.array([float(carkin_params[f"omega_{n}"]) for n in ORDER])
    p["sigma"] = float(carkin_params[f"sigma_{OBSERVABLE}"])
    p["z"] = np.asarray(carkin_params["z"], float)
    return p


def check_points(model, problem, seed: int) -> list[dict]:
    """Two random parameter points around the model's values (carkin's site names, constrained)."""
    rng = np.random.default_rng(seed)
    values = dict(model.values)
    points = []
    for _ in range(2):
        p = {n: values[n] * math.exp(0.3 * rng.standard_normal()) for n in POSITIVE}
        logit = math.log(values["fb"]) - math.log1p(-values["fb"]) + 0.3 * rng.standard_normal()
        p["fb"] = 1.0 / (1.0 + math.exp(-logit))
        for n in ORDER:
            p[f"omega_{n}"] = model.parameter(n).omega * math.exp(0.3 * rng.standard_normal())
        p[f"sigma_{OBSERVABLE}"] = 0.56 * math.exp(0.2 * rng.standard_normal())
        p["z"] = rng.standard_normal((problem.design.n_subjects, len(ORDER)))
        points.append(p)
    return points


def carkin_log_density(problem, params: dict) -> tuple[float, float]:
    """(log density on the unconstrained scale with Jacobians, log density of the constrained sites)."""
    import jax.numpy as jnp
    from numpyro.infer.util import log_density, potential_energy, unconstrain_fn

    params = {k: jnp.asarray(v) for k, v in params.items()}
    u = unconstrain_fn(problem.numpyro_model, (), {}, params)
    lp_u = -float(potential_energy(problem.numpyro_model, (), {}, u))
    lp_c = float(log_density(problem.numpyro_model, (), {}, params)[0])
    return lp_u, lp_c


def stan_init(model, data: dict) -> dict:
    """Prior medians of the Stan program's parameters."""
    values = dict(model.values)
    return {
        "fold": values["fold"], "tmax": values["tmax"], "cmax": values["cmax"], "alpha": values["alpha"],
        "logit_fb": float(data["mu_logit_fb"]), "beta": values["beta"],
        "omega": HALF_NORMAL_MEDIAN * data["omega_scale"],
        "sigma": HALF_NORMAL_MEDIAN * data["sigma_scale"],
        "z": np.zeros((int(data["S"]), len(ORDER))),
    }


# compiles {stan_file} into sm (saved as model.rds); Debian's rstan needs the system Boost found for it
R_STAN_MODEL = r"""
suppressPackageStartupMessages(library(rstan))
source("inputs.R")
boost <- rstan_options("boost_lib")
if (!file.exists(boost) && file.exists("/usr/include/boost")) {
  # Debian's r-cran-bh ships no headers (it depends on libboost-dev): point rstan at the system Boost
  # through a folder holding only a link to it (passing /usr/include itself would reorder system headers)
  dir.create("boost_include")
  file.symlink("/usr/include/boost", file.path("boost_include", "boost"))
  boost <- normalizePath("boost_include")
}
t0 <- proc.time()[["elapsed"]]
sm <- stan_model(file = "{stan_file}", model_name = "{model_name}", save_dso = TRUE, auto_write = FALSE,
                 boost_lib = boost)
compile_s <- proc.time()[["elapsed"]] - t0
saveRDS(sm, "model.rds")
"""

# the end of compile.txt's writeLines(c(...)): the versions of R, rstan, Stan and the toolchain
R_VERSIONS = r"""  sprintf("R=%s", R.version.string),
  sprintf("rstan=%s", as.character(packageVersion("rstan"))),
  sprintf("StanHeaders=%s", as.character(packageVersion("StanHeaders"))),
  sprintf("stan=%s", stan_version()),
  sprintf("boost=%s", if (file.exists(file.path(boost, "boost"))) Sys.readlink(file.path(boost, "boost")) else boost),
  sprintf("cxx=%s", system2(file.path(R.home("bin"), "R"), c("CMD", "config", "CXX14"), stdout = TRUE)[1]),
  sprintf("cxxflags=%s", system2(file.path(R.home("bin"), "R"), c("CMD", "config", "CXX14FLAGS"), stdout = TRUE)[1])
), "compile.txt")
"""

R_COMPILE = R_STAN_MODEL.replace("{model_name}", "stein_population") + r"""
fit0 <- sampling(sm, data = stan_data, chains = 0)
lp <- sapply(check_points, function(p) log_prob(fit0, unconstrain_pars(fit0, p), adjust_transform = TRUE))
lp_c <- sapply(check_points, function(p) log_prob(fit0, unconstrain_pars(fit0, p), adjust_transform = FALSE))
writeLines(c(
  sprintf("compile_s=%.6f", compile_s),
  sprintf("lp=%s", paste(sprintf("%.17g", lp), collapse = ",")),
  sprintf("lp_constrained=%s", paste(sprintf("%.17g", lp_c), collapse = ",")),
""" + R_VERSIONS

R_SAMPLE = r"""
suppressPackageStartupMessages(library(rstan))
source("inputs.R")
sm <- readRDS("model.rds")
t0 <- proc.time()[["elapsed"]]
fit <- sampling(sm, data = stan_data, chains = {chains}L, cores = {cores}L, iter = {iter}L, warmup = {warmup}L,
                seed = {seed}L, init = rep(list(init_point), {chains}L), refresh = 0, open_progress = FALSE,
                control = list(adapt_delta = {adapt_delta}, max_treedepth = {max_treedepth}L))
sampling_s <- proc.time()[["elapsed"]] - t0
pars <- c("fold", "tmax", "cmax", "alpha", "fb", "beta", "omega", "sigma")
draws <- as.array(fit, pars = pars)
sp <- get_sampler_params(fit, inc_warmup = FALSE)
cols <- c("divergent__", "treedepth__", "n_leapfrog__", "stepsize__", "accept_stat__")
parts <- lapply(seq_len(dim(draws)[2]), function(ch) {{
  x <- matrix(draws[, ch, ], nrow = dim(draws)[1], dimnames = list(NULL, dimnames(draws)[[3]]))
  data.frame(chain = ch - 1L, draw = seq_len(dim(draws)[1]) - 1L, x,
             sp[[ch]][, cols, drop = FALSE], check.names = FALSE)
}})
write.csv(do.call(rbind, parts), "draws.csv", row.names = FALSE)
el <- get_elapsed_time(fit)
writeLines(c(
  sprintf("sampling_s=%.6f", sampling_s),
  sprintf("chain_warmup_s=%s", paste(sprintf("%.3f", el[, "warmup"]), collapse = ",")),
  sprintf("chain_sample_s=%s", paste(sprintf("%.3f", el[, "sample"]), collapse = ","))
), "sample.txt")
"""


# --- the runs -----------------------------------------------------------------------------------------


def stan_compile_and_check(model, problem, workdir: Path, data: dict) -> tuple[dict, dict]:
    points = check_points(model, problem, CHECK_SEED)
    inputs = (f"stan_data <- {r_list(data)}\n"
              f"check_points <- list({', '.join(r_list(stan_point(p)) for p in points)})\n"
              f"init_point <- {r_list(stan_init(model, data))}\n")
    (workdir / "inputs.R").write_text(inputs)
    print("Stan: compiling the model (stan_model) and evaluating log_prob ...", flush=True)
    process_s = rscript(R_COMPILE.replace("{stan_file}", str(STAN_FILE)), workdir, "compile")
    out = read_keyvalues(workdir / "compile.txt")
    lp_stan = [float(x) for x in out["lp"].split(",")]
    lp_carkin = [carkin_log_density(problem, p)[0] for p in points]
    d_stan, d_carkin = lp_stan[1] - lp_stan[0], lp_carkin[1] - lp_carkin[0]
    rel = abs(d_carkin - d_stan) / max(abs(d_stan), 1e-300)
    check = {
        "what": "log density on the unconstrained scale with Jacobians (Stan log_prob(adjust_transform=TRUE); "
                "carkin -potential_energy of numpyro) at two random points, all normalising constants kept",
        "point_seed": CHECK_SEED,
        "stan": lp_stan, "carkin": lp_carkin,
        "abs_diff": [abs(a - b) for a, b in zip(lp_stan, lp_carkin)],
        "difference_stan": d_stan, "difference_carkin": d_carkin,
        "relative_error_of_difference": rel, "tolerance": CHECK_RTOL, "passed": bool(rel <= CHECK_RTOL),
    }
    print("log-density check (unconstrained scale, Jacobian adjusted):")
    for i, (s, c) in enumerate(zip(lp_stan, lp_carkin)):
        print(f"  point {i}: Stan {s:.10f}  carkin {c:.10f}  |diff| {abs(s - c):.3g}")
    print(f"  difference point1 - point0: Stan {d_stan:.10f}  carkin {d_carkin:.10f}  relative error {rel:.3g}")
    if not check["passed"]:
        sys.exit(f"log densities disagree (relative error {rel:.3g} > {CHECK_RTOL:g}): the models are not the same")
    versions = {"R": out["R"], "rstan": out["rstan"], "StanHeaders": out["StanHeaders"], "stan": out["stan"],
                "boost": out.get("boost", ""), "cxx": out.get("cxx", ""), "cxxflags": out.get("cxxflags", "")}
    compile_info = {"compile_s": float(out["compile_s"]), "compile_process_s": process_s}
    return check, {"versions": versions, **compile_info}


def run_stan(workdir: Path, warmup: int, samples: int, seed: int, compile_s: float) -> tuple[dict, object]:
    import pandas as pd
    import xarray as xr

    script = R_SAMPLE.format(chains=CHAINS, cores=STAN_CORES, iter=warmup + samples, warmup=warmup, seed=seed,
                             adapt_delta=TARGET_ACCEPT, max_treedepth=MAX_TREE_DEPTH)
    print(f"Stan: sampling ({CHAINS} chains on {STAN_CORES} cores, {warmup} warmup + {samples} draws) ...", flush=True)
    load0 = os.getloadavg()
    process_s = rscript(script, workdir, "sample")
    out = read_keyvalues(workdir / "sample.txt")
    df = pd.read_csv(workdir / "draws.csv")
    names = {n: n for n in ORDER} | {f"omega[{k + 1}]": f"omega_{n}" for k, n in enumerate(ORDER)} | {
        "sigma": f"sigma_{OBSERVABLE}"}
    chains, draws = df["chain"].nunique(), df["draw"].nunique()
    df = df.sort_values(["chain", "draw"])

    def grid(col):
        return df[col].to_numpy().reshape(chains, draws)

    post = xr.Dataset({new: (("chain", "draw"), grid(old)) for old, new in names.items()},
                      coords={"chain": np.arange(chains), "draw": np.arange(draws)})
    sampling_s = float(out["sampling_s"])
    record = {
        "compile_s": compile_s, "sampling_s": sampling_s, "wall_s": compile_s + sampling_s,
        "sampling_process_s": process_s,
        "chain_warmup_s": [float(x) for x in out["chain_warmup_s"].split(",")],
        "chain_sample_s": [float(x) for x in out["chain_sample_s"].split(",")],
        "chains_elapsed_over_cores_s": (sum(float(x) for x in out["chain_warmup_s"].split(","))
                                        + sum(float(x) for x in out["chain_sample_s"].split(","))) / STAN_CORES,
        "divergences": int(df["divergent__"].sum()), "draws_total": int(len(df)),
        "mean_leapfrog_per_draw": float(df["n_leapfrog__"].mean()),
        "max_tree_depth_hits": int((df["treedepth__"] >= MAX_TREE_DEPTH).sum()),
        "step_size_per_chain": [float(df.loc[df["chain"] == c, "stepsize__"].iloc[0]) for c in range(chains)],
        "init": "prior medians (typical values = model values, logit_fb = logit(0.0079), omega = 0.674 x "
                "HalfNormal scale, sigma = 0.674, z = 0), same for all chains",
        "cores": STAN_CORES, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }
    return record, post


def run_carkin(model, data, warmup: int, samples: int, seed: int, chains: int = CHAINS,
               init_text: str = "prior medians (carkin's default: numpyro init_to_median, 15 prior draws)",
               **fit_options) -> tuple[dict, object]:
    """carkin's NUTS fit with the comparison's sampler settings (``fit_options`` go to ``carkin.fit``): the
    timing record and the posterior of the population parameters."""
    opts = dict(chains=chains, seed=seed, progress=False, target_accept=TARGET_ACCEPT, max_tree_depth=MAX_TREE_DEPTH,
                **fit_options)
    load0 = os.getloadavg()
    print(f"carkin: {chains} chains, {warmup} warmup + {samples} draws {fit_options or ''}...", flush=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = ck.fit(model, data, warmup=warmup, samples=samples, **opts)
    wall = time.perf_counter() - t0
    post = tree["posterior"].to_dataset()[population_sites(tree)]
    stats = tree["sample_stats"].to_dataset()
    settings = json.loads(tree.attrs["settings"])
    record = {
        "compile_s": settings["compile_s"], "sampling_s": settings["sampling_s"], "wall_s": wall,
        "fit_time_s": settings.get("fit_time_s"), "chains": chains,
        "divergences": int(stats["diverging"].sum()), "draws_total": int(stats["diverging"].size),
        "mean_leapfrog_per_draw": float(stats["n_steps"].mean()),
        "max_tree_depth_hits": int((stats["tree_depth"] >= MAX_TREE_DEPTH).sum()),
        "step_size_per_chain": [float(v) for v in stats["step_size"].isel(draw=0).values],
        "init": init_text,
        "devices": settings["devices"], "centred": settings.get("centred", []),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, ck.FitWarning)],
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }
    return record, post


def diagnostics(record: dict, post) -> dict:
    ess = _ess(post)
    multi = post.sizes["chain"] > 1
    rhat = _rhat(post) if multi else {k: float("nan") for k in ess}
    k_ess = min(ess, key=ess.get)
    record.update(min_ess_bulk=ess[k_ess], min_ess_bulk_parameter=k_ess,
                  min_ess_bulk_per_s=ess[k_ess] / record["sampling_s"] if record["sampling_s"] > 0 else None)
    if multi:
        k_rhat = max(rhat, key=rhat.get)
        record.update(max_r_hat=rhat[k_rhat], max_r_hat_parameter=k_rhat)
    else:
        record.update(max_r_hat=None, max_r_hat_parameter=None)
    return {k: {"median": float(post[k].median()), "q05": float(post[k].quantile(0.05)),
                "q95": float(post[k].quantile(0.95)), "ess_bulk": ess[k], "r_hat": rhat[k]} for k in post.data_vars}


def print_table(results: dict) -> None:
    head = (f"{'tool':<8} {'wall s':>8} {'compile s':>10} {'sampling s':>11} {'min bulk ESS':>24} "
            f"{'min ESS/s':>10} {'max R-hat':>10} {'divergences':>12}")
    print(head)
    print("-" * len(head))
    for tool, r in results.items():
        ess = f"{r['min_ess_bulk']:.0f} ({r['min_ess_bulk_parameter']})"
        per_s = "n/a" if r["min_ess_bulk_per_s"] is None else f"{r['min_ess_bulk_per_s']:.3f}"
        rhat = "n/a" if r["max_r_hat"] is None else f"{r['max_r_hat']:.4f}"
        print(f"{tool:<8} {r['wall_s']:>8.1f} {r['compile_s']:>10.1f} {r['sampling_s']:>11.1f} {ess:>24} "
              f"{per_s:>10} {rhat:>10} {str(r['divergences']) + '/' + str(r['draws_total']):>12}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-stan", action="store_true", help="carkin only (no Stan, no log-density check)")
    ap.add_argument("--skip-carkin", action="store_true", help="Stan only (the log-density check still runs)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stan_comparison.json"))
    a = ap.parse_args(argv)
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])

    model, data, problem = build_problem()
    versions = {"python": sys.version.split()[0], "jax": __import__("jax").__version__,
                "numpyro": __import__("numpyro").__version__, "arviz_stats": __import__("arviz_stats").__version__,
                "carkin": ck.__version__}
    record = {
        "benchmark": "full NUTS, same hierarchical stein_2019 model and dataset, carkin vs Stan (rstan)",
        "command": command, "machine": machine(), "loadavg_start": os.getloadavg(), "versions": versions,
        "settings": {"chains": CHAINS, "warmup": a.warmup, "samples": a.samples, "seed": a.seed,
                     "target_accept": TARGET_ACCEPT, "max_tree_depth": MAX_TREE_DEPTH, "stan_cores": STAN_CORES,
                     "stan_program": str(STAN_FILE.relative_to(ROOT))},
        "dataset": {"path": str(DATA.relative_to(ROOT)), "subjects": problem.design.n_subjects,
                    "observations": int(problem.design.y.size), "blq_fraction": float(problem.design.blq.mean())},
    }
    results, params = {}, {}
    with tempfile.TemporaryDirectory(prefix="stan_comparison_") as tmp:
        workdir = Path(tmp)
        if not a.skip_stan:
            ensure_rstan()
            data_stan = stan_data(problem)
            check, compiled = stan_compile_and_check(model, problem, workdir, data_stan)
            record["log_density_check"] = check
            versions.update(compiled.pop("versions"))
        if not a.skip_carkin:
            results["carkin"], post = run_carkin(model, data, a.warmup, a.samples, a.seed)
            params["carkin"] = diagnostics(results["carkin"], post)
        if not a.skip_stan:
            results["stan"], post = run_stan(workdir, a.warmup, a.samples, a.seed, compiled["compile_s"])
            results["stan"]["compile_process_s"] = compiled["compile_process_s"]
            params["stan"] = diagnostics(results["stan"], post)
    record.update(results)
    record["parameters"] = {k: {tool: p[k] for tool, p in params.items()} for k in next(iter(params.values()))} \
        if params else {}
    record["loadavg_end"] = os.getloadavg()

    print()
    if params:
        tools = list(params)
        print(f"{'parameter':>18} " + " ".join(f"{t + ' median [90%]':>34} {'ESS':>6} {'R-hat':>6}" for t in tools))
        for k, row in record["parameters"].items():
            cells = [f"{row[t]['median']:.4g} [{row[t]['q05']:.4g}, {row[t]['q95']:.4g}]" for t in tools]
            print(f"{k:>18} " + " ".join(f"{c:>34} {row[t]['ess_bulk']:>6.0f} {row[t]['r_hat']:>6.3f}"
                                         for c, t in zip(cells, tools)))
        print()
        print_table(results)
    print(f"load average start {record['loadavg_start']}, end {record['loadavg_end']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
