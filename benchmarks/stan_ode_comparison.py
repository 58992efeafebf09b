"""Full NUTS on the same hierarchical ODE model (cd7_cart) and dataset in carkin and in Stan (rstan), in one run.

    python benchmarks/stan_ode_comparison.py                              # 4 chains, 500 warmup + 500 draws each
    python benchmarks/stan_ode_comparison.py --warmup 100 --samples 100   # shorter
    python benchmarks/stan_ode_comparison.py --check-only                 # log-density check only, no sampling
    python benchmarks/stan_ode_comparison.py --stan-only --chains 1 --warmup 20 --samples 20   # Stan pilot
    python benchmarks/stan_ode_comparison.py --skip-stan                  # carkin only (no equivalence check)
    python benchmarks/stan_ode_comparison.py --workdir /tmp/stan_ode      # keep Stan's files; progress in iters*.csv
    python benchmarks/stan_ode_comparison.py --centred none               # both tools non-centred

Model: cd7_cart (mechanistic ODE, naturally selected product) on data/cd7_sim.csv, as
benchmarks/nuts_from_laplace.py fits it: both observables (car_copies, cd7_cells), rho, k_kill, d_e
and f_blood estimated with between-subject variability, every other parameter at the
model's value, carkin's default priors, log-additive error per observable with M3 censoring of BLQ
records, the split doses of the dataset. The Stan program is benchmarks/stan/cd7_cart_population.stan
(integrate_ode_rk45 between dose times); its data (the design, the solve segments between doses, the
fixed values and carkin's prior parameters) are generated here from carkin's own objects.

Parameterisation (``--centred``): ``auto`` (default) is carkin's ``centred="auto"``: a Laplace fit (same
seed) decides which random effects are sampled centred (eta-shrinkage below 0.3), and the Stan program
samples the same ones centred (its data flag ``centred``), so both tools sample the same density in the
same coordinates; ``none`` samples every effect non-centred in both.

Steps:
1. Stan is compiled (``stan_model``, timed) in an ``Rscript`` process, which also evaluates Stan's log
   density (``log_prob``, Jacobian adjusted, unconstrained scale) at two random points, and times
   ``grad_log_prob`` at the sampling tolerances. carkin's log density at the same points (numpyro's
   potential energy, negated) must agree where the ODE solves are tight (rtol = atol = 1e-10 on both
   sides, so that solver error does not hide a modelling difference): the run aborts if the difference
   between the two points differs by more than 1e-6 relative. Both keep every normalising constant, so
   the absolute values are reported too, and so is the agreement at the sampling tolerances.
2. carkin: ``carkin.fit(chains=C, warmup=W, samples=S, init=..., seed, progress=False)``; compile and
   sampling times from the fit's record, wall time of the whole ``fit`` (a Laplace start included).
3. Stan: ``sampling(chains=C, cores=min(C, 2), iter=W+S, warmup=W, seed)`` in a second ``Rscript``
   process; sampling time = wall time of that call; each chain's own (CPU) time and leapfrog count
   are recorded too. Stan's solver: the model's rtol and atol, max_num_steps = the model's max_steps.
   Init: ``--init laplace`` (default, as nuts_from_laplace.py) starts Stan's chains where carkin's
   start, at carkin's Laplace estimates and modes (computed here with the same seed, timed apart);
   ``--init median`` starts carkin at its prior medians (numpyro init_to_median) and Stan at the prior
   medians (typical values = the model's, omega = 0.674 x HalfNormal scale, sigma = 0.674 x scale, z = 0).
   adapt_delta 0.8 and max_treedepth 10 in both tools.

Bulk ESS and R-hat of both tools come from the same functions (arviz_stats, via carkin) over the 10
population parameters. ESS/s divides by the sampling time (warmup included). Divergences are counted
over the post-warmup draws. Writes a JSON record to benchmarks/results/stan_ode_comparison.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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
import stan_comparison  # noqa: E402
from simulate_throughput import machine  # noqa: E402
from stan_comparison import (  # noqa: E402
    R_STAN_MODEL,
    R_VERSIONS,
    carkin_log_density,
    diagnostics,
    ensure_rstan,
    print_table,
    r_list,
    read_keyvalues,
)

import carkin as ck  # noqa: E402
from carkin.fitting.fit_problem import make_problem  # noqa: E402
from carkin.model.observation import PREDICTION_FLOOR  # noqa: E402
from carkin.model.physiology import blood_volume_ul  # noqa: E402
from carkin.model.population import CENTRED_SITE  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "cd7_sim.csv"
STAN_FILE = Path(__file__).resolve().parent / "stan" / "cd7_cart_population.stan"
MODEL = "cd7_cart"
PRODUCT = "naturally_selected"
ESTIMATE = ("rho", "k_kill", "d_e", "f_blood")
ORDER = ("rho", "d_e", "k_kill", "f_blood")  # carkin's order (the model's): columns of z / omega in Stan
POSITIVE = ("rho", "d_e", "k_kill")
FRACTION = "f_blood"
OBSERVABLES = ("car_copies", "cd7_cells")  # obs_kind 1 and 2 in the Stan program
SIGMA_GUESS = {"car_copies": 0.4, "cd7_cells": 0.3}  # centres of the check points' residual SDs
FIXED = ("k_a", "k_ld", "g_inf", "k_c", "k_em", "a_m", "k_ex", "d_m", "d_x", "km_kill", "k_fr", "r_t", "k_t", "f_r",
         "f_pb", "r_n", "s_n", "wbc", "vcn")
STAN_MAX_CORES = 2
TARGET_ACCEPT = 0.8
MAX_TREE_DEPTH = 10
CHECK_RTOL = 1e-6
CHECK_SOLVER = {"rtol": 1e-10, "atol": 1e-10, "max_steps": 200_000}  # tight solves: solver error far below the check
GRADIENT_REPEATS = 5
HALF_NORMAL_MEDIAN = 0.6744897501960817  # median of HalfNormal(1)
CHECK_SEED = 20240607


# --- the model on both sides --------------------------------------------------------------------------


def with_solver(model, **settings):
    """The same model with other solver settings (a subclass: the settings are a class attribute)."""
    cls = type(model)
    sub = type(cls.__name__, (cls,), {"solver": dataclasses.replace(cls.solver, **settings),
                                      "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return sub(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


def build_problem(solver: dict | None = None, centred: tuple = ()):
    model = ck.load_model(MODEL, product_type=PRODUCT)
    if solver:
        model = with_solver(model, **solver)
    data = ck.read_dataset(DATA)
    problem = make_problem(model, data, estimate=ESTIMATE, centred=centred)
    if problem.estimated != ORDER or problem.random != ORDER or problem.columns:
        raise SystemExit(f"unexpected population structure {problem.estimated} / {problem.random}")
    if problem.design.observables != OBSERVABLES or any(problem.errors[o].kind != "log-additive"
                                                        for o in OBSERVABLES):
        raise SystemExit("unexpected observables or error models")
    if model.dose_state != "E" or model.has_switch or model.has_closed_form:
        raise SystemExit("unexpected dosing or solve structure")
    return model, data, problem


def segments(design) -> dict:
    """The solve segments of every subject, as carkin's piecewise solve runs them (carkin.simulation.solve):
    integration starts at the first dose, each dose is added at its time, a time before the first dose
    takes the initial state and a time equal to a dose time the post-dose state."""
    grid_t, grid_s, pre_grid, pre_subject, seg, ts_all = [], [], [], [], [], []
    index = {}
    for s in range(design.n_subjects):
        times = np.unique(design.times[s])
        for t in times:
            index[(s, float(t))] = len(grid_t) + 1
            grid_t.append(float(t))
            grid_s.append(s + 1)
        dose_t, dose_c = design.dose_times[s], design.dose_cells[s]
        events = np.unique(dose_t)
        for t in times[times < events[0]]:
            pre_grid.append(index[(s, float(t))])
            pre_subject.append(s + 1)
        for k, te in enumerate(events):
            nxt = events[k + 1] if k + 1 < events.size else None
            at = times[times == te]
            out = times[(times > te) & (times < nxt)] if nxt is not None else times[times > te]
            ts = list(out) + ([nxt] if nxt is not None else [])
            seg.append({
                "subject": s + 1, "first": int(k == 0), "t0": float(te),
                "cells": float(dose_c[dose_t == te].sum()),
                "n_at": at.size, "at_start": index[(s, float(at[0]))] if at.size else 1,
                "n_ts": len(ts), "ts_start": len(ts_all) + 1,
                "n_out": out.size, "out_start": index[(s, float(out[0]))] if out.size else 1,
            })
            ts_all += [float(t) for t in ts]
    obs_t = design.times[design.obs_subject, design.obs_tindex]
    obs_grid = np.array([index[(int(s), float(t))] for s, t in zip(design.obs_subject, obs_t)])
    covered = set(pre_grid)
    for g in seg:
        covered |= set(range(g["at_start"], g["at_start"] + g["n_at"]))
        covered |= set(range(g["out_start"], g["out_start"] + g["n_out"]))
    if covered != set(range(1, len(grid_t) + 1)):
        raise SystemExit("the solve segments do not cover every observation time")
    col = {k: np.array([g[k] for g in seg]) for k in seg[0]}
    return {
        "NG": np.int64(len(grid_t)), "N_pre": np.int64(len(pre_grid)),
        "pre_grid": np.array(pre_grid, np.int64), "pre_subject": np.array(pre_subject, np.int64),
        "G": np.int64(len(seg)), "seg_subject": col["subject"].astype(np.int64),
        "seg_first": col["first"].astype(np.int64), "seg_t0": col["t0"].astype(float),
        "seg_cells": col["cells"].astype(float), "seg_n_at": col["n_at"].astype(np.int64),
        "seg_at_start": col["at_start"].astype(np.int64), "seg_n_ts": col["n_ts"].astype(np.int64),
        "seg_ts_start": col["ts_start"].astype(np.int64), "seg_n_out": col["n_out"].astype(np.int64),
        "seg_out_start": col["out_start"].astype(np.int64),
        "NTS": np.int64(max(len(ts_all), 1)), "ts_all": np.array(ts_all or [0.0]),
        "obs_grid": obs_grid.astype(np.int64),
    }


def stan_data(model, problem, solver: dict | None = None) -> dict:
    """The Stan program's data: the design as carkin sees it, the fixed values, carkin's prior parameters
    and the solver settings (the model's unless ``solver`` says otherwise)."""
    d, pr = problem.design, problem.priors
    values = dict(model.values)
    cov = {c.name: d.model_covariates[:, j] for j, c in enumerate(model.covariates)}
    bv = np.asarray(blood_volume_ul(cov["WT"]), float)
    # the Stan program's dose conversion is f_blood / blood volume: hold carkin's to it
    factor = np.array([float(model.cells_to_state({"f_blood": 1.0}, {"WT": w})) for w in cov["WT"]])
    if not np.allclose(factor * bv, 1.0, rtol=1e-14, atol=0):
        raise SystemExit("the model's cells_to_state is not f_blood / blood volume")
    blq = d.blq.astype(bool)
    idx_obs, idx_cens = np.flatnonzero(~blq), np.flatnonzero(blq)
    sd = {float(pr[n].scale) for n in POSITIVE} | {float(pr[FRACTION].base_dist.scale)}
    if len(sd) != 1:
        raise SystemExit(f"the Stan program assumes one prior SD for all typical values, got {sd}")
    settings = {"rtol": model.solver.rtol, "atol": model.solver.atol, "max_steps": model.solver.max_steps,
                **(solver or {})}
    cells_per_ug = sys.modules[type(model).__module__].CELLS_PER_UG_GDNA
    return {
        "S": np.int64(d.n_subjects),
        **{n: float(values[n]) for n in FIXED},
        "phi": float(model.fratricide_scale), "cells_per_ug": float(cells_per_ug),
        "blast": cov["BLAST"].astype(float), "cd7n0": cov["CD7N0"].astype(float), "blood_volume": bv,
        **segments(d),
        "N": np.int64(d.y.size), "obs_kind": d.obs_kind.astype(np.int64) + 1,
        "N_obs": np.int64(idx_obs.size), "idx_obs": idx_obs.astype(np.int64) + 1,
        "log_y": np.log(np.maximum(d.y[idx_obs], PREDICTION_FLOOR)),
        "N_cens": np.int64(idx_cens.size), "idx_cens": idx_cens.astype(np.int64) + 1,
        "log_lloq": np.log(np.maximum(d.lloq[idx_cens], PREDICTION_FLOOR)),
        "mu_log": np.array([float(pr[n].loc) for n in POSITIVE]),
        "mu_logit_f_blood": float(pr[FRACTION].base_dist.loc),
        "prior_sd": sd.pop(),
        "omega_scale": np.array([float(pr[f"omega_{n}"].scale) for n in ORDER]),
        "sigma_scale": np.array([float(pr[f"sigma_{o}"].scale) for o in OBSERVABLES]),
        "prediction_floor": PREDICTION_FLOOR,
        "rtol": float(settings["rtol"]), "atol": float(settings["atol"]),
        "max_num_steps": np.int64(settings["max_steps"]),
        "centred": np.array([int(n in problem.centred) for n in ORDER], np.int64),
    }


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def stan_point(carkin_params: dict) -> dict:
    """carkin's sampled sites (constrained) as the Stan program's parameters (the random effects as sampled:
    ``z``, or the centred site where some are centred: Stan's ``z`` holds the same columns)."""
    p = {n: float(carkin_params[n]) for n in POSITIVE}
    p["logit_f_blood"] = logit(float(carkin_params[FRACTION]))
    p["omega"] = np.array([float(carkin_params[f"omega_{n}"]) for n in ORDER])
    p["sigma"] = np.array([float(carkin_params[f"sigma_{o}"]) for o in OBSERVABLES])
    p["z"] = np.asarray(carkin_params[CENTRED_SITE if CENTRED_SITE in carkin_params else "z"], float)
    return p


def as_sampled(problem, params: dict) -> dict:
    """A point given with standardised effects ``z`` as the sites ``problem`` samples (centred ones as their
    unconstrained individual values)."""
    if not problem.centred:
        return params
    rest = {k: v for k, v in params.items() if k != "z"}
    return {**rest, CENTRED_SITE: problem.centred_value(params, params["z"])}


def check_points(model, problem, seed: int) -> list[dict]:
    """Two random parameter points around the model's values (carkin's site names, constrained)."""
    rng = np.random.default_rng(seed)
    values = dict(model.values)
    points = []
    for _ in range(2):
        p = {n: values[n] * math.exp(0.3 * rng.standard_normal()) for n in POSITIVE}
        p[FRACTION] = 1.0 / (1.0 + math.exp(-(logit(values[FRACTION]) + 0.3 * rng.standard_normal())))
        for n in ORDER:
            p[f"omega_{n}"] = model.parameter(n).omega * math.exp(0.3 * rng.standard_normal())
        for o in OBSERVABLES:
            p[f"sigma_{o}"] = SIGMA_GUESS[o] * math.exp(0.2 * rng.standard_normal())
        p["z"] = rng.standard_normal((problem.design.n_subjects, len(ORDER)))
        points.append(p)
    return points


def carkin_gradient_time(problem, params: dict) -> dict:
    """Seconds per value-and-gradient of carkin's potential (compiled, after a first call)."""
    import jax
    import jax.numpy as jnp
    from numpyro.infer.util import potential_energy, unconstrain_fn

    u = unconstrain_fn(problem.numpyro_model, (), {}, {k: jnp.asarray(v) for k, v in params.items()})
    vg = jax.jit(jax.value_and_grad(lambda x: potential_energy(problem.numpyro_model, (), {}, x)))
    t0 = time.perf_counter()
    jax.block_until_ready(vg(u))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(GRADIENT_REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(vg(u))
        runs.append(time.perf_counter() - t0)
    return {"first_call_s": first, "gradient_s": float(np.median(runs)), "repeats": GRADIENT_REPEATS}


def prior_median_init(model, data: dict) -> dict:
    """Prior medians of the Stan program's parameters (z = 0; a centred column at its typical value)."""
    values = dict(model.values)
    typical = np.array([math.log(values[n]) for n in POSITIVE] + [float(data["mu_logit_f_blood"])])
    centred = np.asarray(data["centred"], bool)
    return {
        **{n: values[n] for n in POSITIVE},
        "logit_f_blood": float(data["mu_logit_f_blood"]),
        "omega": HALF_NORMAL_MEDIAN * data["omega_scale"],
        "sigma": HALF_NORMAL_MEDIAN * data["sigma_scale"],
        "z": np.zeros((int(data["S"]), len(ORDER))) + np.where(centred, typical, 0.0),
    }


def laplace_start(problem, seed: int, centred: str) -> tuple[dict, tuple, float]:
    """carkin's NUTS start for init="laplace" (the same Laplace fit, same seed) as Stan parameters, and the
    random effects carkin samples centred (``centred="auto"``: chosen by that fit; ``none``: none)."""
    from carkin.fitting.inference import _laplace_fit, _laplace_start, auto_centred

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _laplace_fit(problem, seed)
    chosen = auto_centred(problem, result.z) if centred == "auto" else ()
    start = _laplace_start(dataclasses.replace(problem, centred=chosen), result)
    return stan_point(start), chosen, time.perf_counter() - t0


R_COMPILE = R_STAN_MODEL.replace("{model_name}", "cd7_cart_population") + r"""
lines <- c(sprintf("compile_s=%.6f", compile_s))
for (nm in names(check_data)) {
  fit0 <- sampling(sm, data = check_data[[nm]], chains = 0)
  t0 <- proc.time()[["elapsed"]]
  lp <- sapply(check_points, function(p) log_prob(fit0, unconstrain_pars(fit0, p), adjust_transform = TRUE))
  lp_s <- (proc.time()[["elapsed"]] - t0) / length(check_points)
  lp_c <- sapply(check_points, function(p) log_prob(fit0, unconstrain_pars(fit0, p), adjust_transform = FALSE))
  lines <- c(lines, sprintf("lp_%s=%s", nm, paste(sprintf("%.17g", lp), collapse = ",")),
             sprintf("lp_constrained_%s=%s", nm, paste(sprintf("%.17g", lp_c), collapse = ",")),
             sprintf("log_prob_s_%s=%.6f", nm, lp_s))
  if (nm == "model") {
    upar <- unconstrain_pars(fit0, check_points[[1]])
    invisible(grad_log_prob(fit0, upar, adjust_transform = TRUE))
    t0 <- proc.time()[["elapsed"]]
    for (i in seq_len({repeats})) invisible(grad_log_prob(fit0, upar, adjust_transform = TRUE))
    lines <- c(lines, sprintf("gradient_s=%.6f", (proc.time()[["elapsed"]] - t0) / {repeats}))
  }
}
writeLines(c(lines,
""" + R_VERSIONS

R_SAMPLE = r"""
suppressPackageStartupMessages(library(rstan))
source("inputs.R")
sm <- readRDS("model.rds")
t0 <- proc.time()[["elapsed"]]
fit <- sampling(sm, data = stan_data, chains = {chains}L, cores = {cores}L, iter = {iter}L, warmup = {warmup}L,
                seed = {seed}L, init = rep(list(init_point), {chains}L), refresh = {refresh}L, open_progress = FALSE,
                sample_file = "iters.csv",
                control = list(adapt_delta = {adapt_delta}, max_treedepth = {max_treedepth}L))
sampling_s <- proc.time()[["elapsed"]] - t0
pars <- c("rho", "d_e", "k_kill", "f_blood", "omega", "sigma")
draws <- as.array(fit, pars = pars)
sp <- get_sampler_params(fit, inc_warmup = FALSE)
sp_all <- get_sampler_params(fit, inc_warmup = TRUE)
cols <- c("divergent__", "treedepth__", "n_leapfrog__", "stepsize__", "accept_stat__")
parts <- lapply(seq_len(dim(draws)[2]), function(ch) {{
  x <- matrix(draws[, ch, ], nrow = dim(draws)[1], dimnames = list(NULL, dimnames(draws)[[3]]))
  data.frame(chain = ch - 1L, draw = seq_len(dim(draws)[1]) - 1L, x,
             sp[[ch]][, cols, drop = FALSE], check.names = FALSE)
}})
write.csv(do.call(rbind, parts), "draws.csv", row.names = FALSE)
el <- get_elapsed_time(fit)
warm_leap <- sapply(sp_all, function(x) sum(x[seq_len({warmup}), "n_leapfrog__"]))
samp_leap <- sapply(sp_all, function(x) sum(x[{warmup} + seq_len({samples}), "n_leapfrog__"]))
writeLines(c(
  sprintf("sampling_s=%.6f", sampling_s),
  sprintf("chain_warmup_s=%s", paste(sprintf("%.3f", el[, "warmup"]), collapse = ",")),
  sprintf("chain_sample_s=%s", paste(sprintf("%.3f", el[, "sample"]), collapse = ",")),
  sprintf("chain_warmup_leapfrog=%s", paste(sprintf("%d", as.integer(warm_leap)), collapse = ",")),
  sprintf("chain_sample_leapfrog=%s", paste(sprintf("%d", as.integer(samp_leap)), collapse = ","))
), "sample.txt")
"""


# --- the runs -----------------------------------------------------------------------------------------


def rscript(script: str, workdir: Path, name: str) -> float:
    """Run an R script in ``workdir``, its output going to ``name.log`` as it runs (a Stan run of this model
    takes hours: the log and the chains' iters*.csv show how far it is); return the process wall time."""
    path = workdir / f"{name}.R"
    path.write_text(script)
    log = workdir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["Rscript", "--vanilla", str(path)], cwd=workdir, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"Rscript {name}.R failed (exit {rc}):\n{log.read_text()[-5000:]}")
    return wall



def density_check(lp_stan: list, lp_carkin: list, label: str) -> dict:
    d_stan, d_carkin = lp_stan[1] - lp_stan[0], lp_carkin[1] - lp_carkin[0]
    rel = abs(d_carkin - d_stan) / max(abs(d_stan), 1e-300)
    print(f"log-density check, {label}:")
    for i, (s, c) in enumerate(zip(lp_stan, lp_carkin)):
        print(f"  point {i}: Stan {s:.10f}  carkin {c:.10f}  |diff| {abs(s - c):.3g}")
    print(f"  difference point1 - point0: Stan {d_stan:.10f}  carkin {d_carkin:.10f}  relative error {rel:.3g}")
    return {"stan": lp_stan, "carkin": lp_carkin, "abs_diff": [abs(a - b) for a, b in zip(lp_stan, lp_carkin)],
            "difference_stan": d_stan, "difference_carkin": d_carkin, "relative_error_of_difference": rel}


def stan_compile_and_check(model, problem, tight_problem, workdir: Path, data: dict,
                           init_point: dict) -> tuple[dict, dict]:
    points = [as_sampled(problem, p) for p in check_points(model, problem, CHECK_SEED)]
    tight = {**data, "rtol": CHECK_SOLVER["rtol"], "atol": CHECK_SOLVER["atol"],
             "max_num_steps": np.int64(CHECK_SOLVER["max_steps"])}
    inputs = (f"stan_data <- {r_list(data)}\n"
              f"check_data <- list(tight = {r_list(tight)}, model = stan_data)\n"
              f"check_points <- list({', '.join(r_list(stan_point(p)) for p in points)})\n"
              f"init_point <- {r_list(init_point)}\n")
    (workdir / "inputs.R").write_text(inputs)
    print("Stan: compiling the model (stan_model) and evaluating log_prob ...", flush=True)
    script = R_COMPILE.replace("{stan_file}", str(STAN_FILE)).replace("{repeats}", str(GRADIENT_REPEATS))
    process_s = rscript(script, workdir, "compile")
    out = read_keyvalues(workdir / "compile.txt")
    lp = {nm: [float(x) for x in out[f"lp_{nm}"].split(",")] for nm in ("tight", "model")}
    carkin_tight = [carkin_log_density(tight_problem, p)[0] for p in points]
    carkin_model = [carkin_log_density(problem, p)[0] for p in points]
    tight_check = density_check(lp["tight"], carkin_tight,
                                f"tight solves (rtol {CHECK_SOLVER['rtol']:g}, atol {CHECK_SOLVER['atol']:g})")
    model_check = density_check(lp["model"], carkin_model,
                                f"the model's solver settings (rtol {data['rtol']:g}, atol {data['atol']:g}); "
                                "solver error included")
    rel = tight_check["relative_error_of_difference"]
    gradient = carkin_gradient_time(problem, points[0])
    check = {
        "what": "log density on the unconstrained scale with Jacobians (Stan log_prob(adjust_transform=TRUE); "
                "carkin -potential_energy of numpyro) at two random points, all normalising constants kept; the "
                "pass criterion is on the tight solves, where solver error is far below it",
        "point_seed": CHECK_SEED, "tolerance": CHECK_RTOL, "passed": bool(rel <= CHECK_RTOL),
        "tight_solver": CHECK_SOLVER, "tight": tight_check,
        "model_solver": {"rtol": data["rtol"], "atol": data["atol"], "max_steps": int(data["max_num_steps"])},
        "model": model_check,
        "stan_log_prob_s": {nm: float(out[f"log_prob_s_{nm}"]) for nm in ("tight", "model")},
        "gradient_s": {"stan": float(out["gradient_s"]), "carkin": gradient["gradient_s"],
                       "carkin_first_call_s": gradient["first_call_s"], "repeats": GRADIENT_REPEATS,
                       "at": "check point 0, the model's solver settings; carkin value_and_grad of its potential "
                             "(jit), Stan grad_log_prob"},
    }
    print(f"gradient at check point 0: Stan {check['gradient_s']['stan'] * 1e3:.1f} ms, "
          f"carkin {gradient['gradient_s'] * 1e3:.1f} ms")
    if not check["passed"]:
        sys.exit(f"log densities disagree (relative error {rel:.3g} > {CHECK_RTOL:g}): the models are not the same")
    versions = {"R": out["R"], "rstan": out["rstan"], "StanHeaders": out["StanHeaders"], "stan": out["stan"],
                "boost": out.get("boost", ""), "cxx": out.get("cxx", ""), "cxxflags": out.get("cxxflags", "")}
    return check, {"versions": versions, "compile_s": float(out["compile_s"]), "compile_process_s": process_s}


def run_stan(workdir: Path, chains: int, warmup: int, samples: int, seed: int, compile_s: float,
             init: str) -> tuple[dict, object]:
    import pandas as pd
    import xarray as xr

    cores = min(chains, STAN_MAX_CORES)
    script = R_SAMPLE.format(chains=chains, cores=cores, iter=warmup + samples, warmup=warmup, samples=samples,
                             seed=seed, adapt_delta=TARGET_ACCEPT, max_treedepth=MAX_TREE_DEPTH,
                             refresh=max(1, (warmup + samples) // 20))
    print(f"Stan: sampling ({chains} chains on {cores} cores, {warmup} warmup + {samples} draws) ...", flush=True)
    load0 = os.getloadavg()
    process_s = rscript(script, workdir, "sample")
    out = read_keyvalues(workdir / "sample.txt")
    df = pd.read_csv(workdir / "draws.csv")
    names = ({n: n for n in ORDER} | {f"omega[{k + 1}]": f"omega_{n}" for k, n in enumerate(ORDER)}
             | {f"sigma[{k + 1}]": f"sigma_{o}" for k, o in enumerate(OBSERVABLES)})
    n_chains, draws = df["chain"].nunique(), df["draw"].nunique()
    df = df.sort_values(["chain", "draw"])

    def grid(col):
        return df[col].to_numpy().reshape(n_chains, draws)

    def floats(key):
        return [float(x) for x in out[key].split(",")]

    post = xr.Dataset({new: (("chain", "draw"), grid(old)) for old, new in names.items()},
                      coords={"chain": np.arange(n_chains), "draw": np.arange(draws)})
    sampling_s = float(out["sampling_s"])
    warm_s, samp_s = floats("chain_warmup_s"), floats("chain_sample_s")
    warm_leap, samp_leap = floats("chain_warmup_leapfrog"), floats("chain_sample_leapfrog")
    chain_s = [w + s for w, s in zip(warm_s, samp_s)]
    leapfrogs = [w + s for w, s in zip(warm_leap, samp_leap)]
    record = {
        "compile_s": compile_s, "sampling_s": sampling_s, "wall_s": compile_s + sampling_s,
        "sampling_process_s": process_s, "chains": chains, "cores": cores,
        "chain_warmup_s": warm_s, "chain_sample_s": samp_s,
        "chain_warmup_leapfrog": warm_leap, "chain_sample_leapfrog": samp_leap,
        "chains_elapsed_over_cores_s": sum(chain_s) / cores,
        "s_per_iteration": [c / (warmup + samples) for c in chain_s],
        "s_per_leapfrog": [c / n if n else None for c, n in zip(chain_s, leapfrogs)],
        "divergences": int(df["divergent__"].sum()), "draws_total": int(len(df)),
        "mean_leapfrog_per_draw": float(df["n_leapfrog__"].mean()),
        "max_tree_depth_hits": int((df["treedepth__"] >= MAX_TREE_DEPTH).sum()),
        "step_size_per_chain": [float(df.loc[df["chain"] == c, "stepsize__"].iloc[0]) for c in range(n_chains)],
        "init": init, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }
    return record, post


def run_carkin(model, data, chains: int, warmup: int, samples: int, seed: int, init: str,
               centred: str) -> tuple[dict, object]:
    init_text = ("a Laplace fit's estimates and modes (carkin init='laplace')" if init == "laplace"
                 else "prior medians (numpyro init_to_median, 15 prior draws)")
    return stan_comparison.run_carkin(model, data, warmup, samples, seed, chains=chains, init_text=init_text,
                                      estimate=ESTIMATE, init=init, centred="auto" if centred == "auto" else ())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--init", choices=("laplace", "median"), default="laplace",
                    help="where both tools' chains start (default: carkin's Laplace start, as nuts_from_laplace.py)")
    ap.add_argument("--centred", choices=("auto", "none"), default="auto",
                    help="auto (default): the effects carkin's centred='auto' centres are centred in both tools; "
                         "none: all non-centred")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check-only", action="store_true", help="compile and the log-density check only, no sampling")
    mode.add_argument("--skip-stan", action="store_true", help="carkin only (no Stan, no log-density check)")
    mode.add_argument("--stan-only", action="store_true", help="Stan only (the log-density check still runs)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stan_ode_comparison.json"))
    ap.add_argument("--workdir", default=None,
                    help="keep Stan's files here (R scripts, logs, iters*.csv written as the chains run); "
                         "default a temporary folder")
    a = ap.parse_args(argv)
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])

    model, data, problem = build_problem()
    versions = {"python": sys.version.split()[0], "jax": __import__("jax").__version__,
                "numpyro": __import__("numpyro").__version__, "arviz_stats": __import__("arviz_stats").__version__,
                "carkin": ck.__version__}
    design = problem.design
    record = {
        "benchmark": "full NUTS, same hierarchical cd7_cart ODE model and dataset, carkin vs Stan (rstan)",
        "command": command, "machine": machine(), "loadavg_start": os.getloadavg(), "versions": versions,
        "settings": {"chains": a.chains, "warmup": a.warmup, "samples": a.samples, "seed": a.seed, "init": a.init,
                     "centred": a.centred,
                     "target_accept": TARGET_ACCEPT, "max_tree_depth": MAX_TREE_DEPTH,
                     "stan_cores": min(a.chains, STAN_MAX_CORES), "stan_program": str(STAN_FILE.relative_to(ROOT)),
                     "model": MODEL, "product_type": PRODUCT, "estimated": list(ORDER),
                     "solver": dataclasses.asdict(model.solver),
                     "stan_solver": "integrate_ode_rk45 (Dormand-Prince 5(4), forward sensitivities), the model's "
                                    "rtol and atol, max_num_steps = the model's max_steps"},
        "dataset": {"path": str(DATA.relative_to(ROOT)), "subjects": design.n_subjects,
                    "observations": int(design.y.size), "blq_fraction": float(design.blq.mean()),
                    "observables": list(design.observables)},
    }
    results, params = {}, {}
    with tempfile.TemporaryDirectory(prefix="stan_ode_comparison_") as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if not a.skip_stan:
            ensure_rstan()
            init_point, centred, init_s = None, (), 0.0
            if a.init == "laplace" or a.centred == "auto":
                print("carkin Laplace fit (Stan's start, the centred effects) ...", flush=True)
                init_point, centred, init_s = laplace_start(problem, a.seed, a.centred)
            problem = dataclasses.replace(problem, centred=centred)
            record["settings"]["centred_effects"] = list(centred)
            print(f"sampled centred in both tools: {list(centred) or 'none'}")
            data_stan = stan_data(model, problem)
            if a.init == "median":
                init_point = prior_median_init(model, data_stan)
            _, _, tight_problem = build_problem(CHECK_SOLVER, centred)
            check, compiled = stan_compile_and_check(model, problem, tight_problem, workdir, data_stan, init_point)
            record["log_density_check"] = check
            versions.update(compiled.pop("versions"))
            record["stan_compile"] = compiled
        if not (a.check_only or a.stan_only):
            results["carkin"], post = run_carkin(model, data, a.chains, a.warmup, a.samples, a.seed, a.init,
                                                 a.centred)
            if "centred_effects" in record["settings"] and \
                    results["carkin"]["centred"] != record["settings"]["centred_effects"]:
                sys.exit(f"carkin's fit centred {results['carkin']['centred']}, the Stan program "
                         f"{record['settings']['centred_effects']}: not the same parameterisation")
            params["carkin"] = diagnostics(results["carkin"], post)
        if not (a.check_only or a.skip_stan):
            init_text = ("carkin's Laplace start (estimates and modes, same seed), same for all chains"
                         if a.init == "laplace" else
                         "prior medians (typical values = model values, logit_f_blood = prior centre, omega = 0.674 "
                         "x HalfNormal scale, sigma = 0.674 x scale, z = 0), same for all chains")
            results["stan"], post = run_stan(workdir, a.chains, a.warmup, a.samples, a.seed, compiled["compile_s"],
                                             init_text)
            results["stan"]["compile_process_s"] = compiled["compile_process_s"]
            results["stan"]["init_laplace_s"] = init_s
            params["stan"] = diagnostics(results["stan"], post)
    record.update(results)
    record["parameters"] = ({k: {tool: p[k] for tool, p in params.items()} for k in next(iter(params.values()))}
                            if params else {})
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
    if "stan" in results:
        r = results["stan"]
        print(f"Stan per chain: {', '.join(f'{s:.2f}' for s in r['s_per_iteration'])} s/iteration, "
              f"{', '.join(f'{1e3 * s:.1f}' for s in r['s_per_leapfrog'] if s)} ms/leapfrog")
    print(f"load average start {record['loadavg_start']}, end {record['loadavg_end']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1, default=float))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
