"""Laplace (FOCE-I) fits: timings, Wald-interval coverage over simulated replicates, and agreement
with R's nlme on the same data and model, in one run.

    python benchmarks/laplace_fit.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/laplace_fit.py --replicates 10 --skip-nlme

1. Timings (compile and run, 1 and 3 starts; no disk cache, so compiles are measured):
   stein_2019 on data/stein_sim.csv (typical values of all six parameters, variability on all but
   tmax: a switch time with variability gives the objective kinks, see carkin.fitting.laplace), and
   cd7_cart (naturally selected) on data/cd7_sim.csv with rho, k_kill, d_e, f_blood estimated,
   all with variability.
2. Coverage: replicate datasets simulated on stein_sim's design (40 subjects) from Stein's closed
   form with variability on cmax and alpha (fold, cmax, alpha estimated; the rest at Table 1),
   log-normal error 0.56, no censoring; the share of 95% Wald intervals holding the true value.
3. nlme: one such dataset, fitted by carkin and by R's nlme (maximum likelihood, Lindstrom-Bates)
   with the same model on log y; estimates and log-likelihoods side by side (nlme's is of log y:
   carkin's plus the sum of log y).
4. NUTS: Laplace estimates against NUTS posterior medians (4 x 1000 + 1000) on stein_sim.csv.

Writes benchmarks/results/laplace_fit.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.fitting import laplace  # noqa: E402
from carkin.fitting.fit_problem import make_problem  # noqa: E402

ck.configure(compilation_cache=False)

ROOT = Path(__file__).resolve().parents[1]
STEIN = ck.load_model("stein_2019")
ORDER = ("fold", "tmax", "cmax", "alpha", "fb", "beta")
RANDOM = ("cmax", "alpha")
NLME_SCRIPT = r"""
suppressMessages(library(nlme))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
v <- read.csv(args[2])
TMAX <- v$tmax; FB <- v$fb; BETA <- v$beta
stein <- function(t, lfold, lcmax, lalpha) {
  fold <- exp(lfold); cmax <- exp(lcmax); alpha <- exp(lalpha)
  rho <- log(fold) / TMAX
  early <- cmax / fold * exp(rho * pmin(t, TMAX))
  after <- pmax(t - TMAX, 0)
  late <- cmax * ((1 - FB) * exp(-alpha * after) + FB * exp(-BETA * after))
  log(ifelse(t < TMAX, early, late))
}
t0 <- proc.time()[["elapsed"]]
m <- nlme(ly ~ stein(t, lfold, lcmax, lalpha), data = d, fixed = lfold + lcmax + lalpha ~ 1,
          random = pdDiag(lcmax + lalpha ~ 1), groups = ~id,
          start = c(lfold = log(v$fold), lcmax = log(v$cmax), lalpha = log(v$alpha)), method = "ML",
          control = nlmeControl(msMaxIter = 500, maxIter = 200, pnlsTol = 1e-6, tolerance = 1e-8))
el <- proc.time()[["elapsed"]] - t0
sds <- as.numeric(VarCorr(m)[c("lcmax", "lalpha"), "StdDev"])
se <- sqrt(diag(vcov(m)))
cat(sprintf("fold %.10g\ncmax %.10g\nalpha %.10g\nomega_cmax %.10g\nomega_alpha %.10g\nsigma %.10g\n",
            exp(fixef(m)[["lfold"]]), exp(fixef(m)[["lcmax"]]), exp(fixef(m)[["lalpha"]]), sds[1], sds[2],
            m$sigma))
cat(sprintf("se_log_fold %.10g\nse_log_cmax %.10g\nse_log_alpha %.10g\n", se[["lfold"]], se[["lcmax"]],
            se[["lalpha"]]))
cat(sprintf("loglik %.10g\nseconds %.4g\nversion %s\n", as.numeric(logLik(m)), el, packageVersion("nlme")))
"""


def stein(t, p):
    """Stein et al. 2019's closed form (the library model's own) at days ``t`` after the infusion."""
    return np.asarray(STEIN.closed_form(np.asarray(t, float), {k: float(v) for k, v in p.items()}))


def simulate(data, truth, seed):
    rng = np.random.default_rng(seed)
    y = np.empty(data.obs_value.size)
    for s in range(data.n_subjects):
        p = {n: truth[n] for n in ORDER}
        for name in RANDOM:
            p[name] = truth[name] * np.exp(truth[f"omega_{name}"] * rng.standard_normal())
        rows = data.obs_subject == s
        f = stein(data.obs_time[rows] - data.dose_times[s, 0], p)
        y[rows] = f * np.exp(truth["sigma_car_copies"] * rng.standard_normal(rows.sum()))
    return y, np.zeros(y.size, bool), np.ones(y.size)


def timed_fit(model, data, starts: int, **kw):
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = ck.fit(model, data, sampler=ck.Laplace(starts=starts), progress=False, **kw)
    attrs = tree["laplace"].attrs
    settings = json.loads(tree.attrs["settings"])
    return {"wall_s": round(time.perf_counter() - t0, 2), "compile_s": settings["compile_s"],
            "optimise_s": settings["run_s"], "ofv": round(attrs["ofv"], 4), "convergence": attrs["convergence"],
            "covariance_step": attrs["covariance_step"], "starts": json.loads(attrs["starts"]),
            "estimates": {str(p): float(v) for p, v in zip(tree["laplace"]["parameter"].values,
                                                           tree["laplace"]["estimate"].values)},
            "rse_percent": {str(p): round(float(v), 2) for p, v in zip(tree["laplace"]["parameter"].values,
                                                                       tree["laplace"]["rse"].values)},
            "warnings": [str(w.message)[:160] for w in caught if issubclass(w.category, UserWarning)]}


def timings() -> dict:
    out = {}
    stein = ck.load_model("stein_2019")
    data = ck.read_dataset(ROOT / "data" / "stein_sim.csv")
    for starts in (1, 3):
        out[f"stein_2019, variability on 5 (not tmax), {starts} start(s)"] = timed_fit(
            stein, data, starts, variability=("fold", "cmax", "alpha", "fb", "beta"))
    out["stein_2019, variability on all 6 (tmax too), 1 start"] = timed_fit(stein, data, 1)
    cd7 = ck.load_model("cd7_cart", product_type="naturally_selected")
    cd7_data = ck.read_dataset(ROOT / "data" / "cd7_sim.csv")
    for starts in (1, 3):
        out[f"cd7_cart, 4 parameters with variability, {starts} start(s)"] = timed_fit(
            cd7, cd7_data, starts, estimate=("rho", "k_kill", "d_e", "f_blood"))
    return out


def coverage(n_replicates: int, data, truth, problem) -> dict:
    built = laplace.build(problem)
    hits = {s: 0 for s in problem.priors}
    fitted, failed, t0 = 0, 0, time.perf_counter()
    for r in range(n_replicates):
        meas = simulate(data, truth, seed=1000 + r)
        res = laplace.estimate(problem, ck.Laplace(starts=1), progress=False, measurements=meas, compiled=built)
        if not res.converged or res.covariance is None:
            failed += 1
            continue
        fitted += 1
        se = np.sqrt(np.diag(res.covariance))
        for k, s in enumerate(res.sites):  # every site here is on the log scale
            hits[s] += abs(np.log(res.values[s]) - np.log(truth[s])) <= 1.959963984540054 * se[k]
    return {"replicates": n_replicates, "used": fitted, "not_converged_or_no_covariance": failed,
            "coverage_95": {s: round(h / max(fitted, 1), 3) for s, h in hits.items()},
            "binomial_se_at_0.95": round(float(np.sqrt(0.95 * 0.05 / max(fitted, 1))), 3),
            "seconds": round(time.perf_counter() - t0, 1)}


def nlme_comparison(data, truth, problem) -> dict:
    meas = simulate(data, truth, seed=7)
    t0 = time.perf_counter()
    res = laplace.estimate(problem, ck.Laplace(starts=1), progress=False, measurements=meas)
    carkin_s = time.perf_counter() - t0
    y = meas[0]
    carkin_loglik = -res.objective + 0.0
    with tempfile.TemporaryDirectory() as tmp:
        rows = [f"{data.ids[s]},{float(t - data.dose_times[s, 0])!r},{float(np.log(v))!r}"
                for s, t, v in zip(data.obs_subject, data.obs_time, y)]
        (Path(tmp) / "d.csv").write_text("id,t,ly\n" + "\n".join(rows) + "\n")
        names = ("fold", "cmax", "alpha", "tmax", "fb", "beta")
        (Path(tmp) / "v.csv").write_text(",".join(names) + "\n" + ",".join(repr(float(truth[n])) for n in names) + "\n")
        (Path(tmp) / "fit.R").write_text(NLME_SCRIPT)
        out = subprocess.run(["Rscript", str(Path(tmp) / "fit.R"), str(Path(tmp) / "d.csv"), str(Path(tmp) / "v.csv")],
                             capture_output=True, text=True, check=True).stdout
    r = dict(line.split(" ", 1) for line in out.strip().splitlines())
    nlme = {k: (r[k] if k == "version" else float(r[k])) for k in r}
    ours = {"fold": res.values["fold"], "cmax": res.values["cmax"], "alpha": res.values["alpha"],
            "omega_cmax": res.values["omega_cmax"], "omega_alpha": res.values["omega_alpha"],
            "sigma": res.values["sigma_car_copies"]}
    se = np.sqrt(np.diag(res.covariance)) if res.covariance is not None else np.full(len(res.sites), np.nan)
    # nlme's likelihood is of log y; carkin's is of y (log-normal density): they differ by sum(log y)
    return {"nlme": nlme, "carkin": {**ours, "se_log_fold": float(se[res.sites.index("fold")]),
                                     "se_log_cmax": float(se[res.sites.index("cmax")]),
                                     "se_log_alpha": float(se[res.sites.index("alpha")]),
                                     "loglik_of_log_y": float(carkin_loglik + np.sum(np.log(y))),
                                     "seconds_with_compile": round(carkin_s, 2)},
            "relative_difference": {k: float(ours[k] / nlme[k] - 1) for k in ours},
            "loglik_difference": float(carkin_loglik + np.sum(np.log(y)) - nlme["loglik"])}


def nuts_comparison() -> dict:
    """Laplace estimates against NUTS posterior medians on stein_sim.csv (variability on all but tmax),
    for the parameters the data identify well (Laplace RSE below 25%)."""
    model = ck.load_model("stein_2019")
    data = ck.read_dataset(ROOT / "data" / "stein_sim.csv")
    variability = ("fold", "cmax", "alpha", "fb", "beta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lap = ck.fit(model, data, variability=variability, method="laplace", progress=False)
        t0 = time.perf_counter()
        post = ck.fit(model, data, variability=variability, chains=4, warmup=1000, samples=1000, seed=1,
                      progress=False)
        nuts_s = time.perf_counter() - t0
    table = lap["laplace"].to_dataset()
    rows = {}
    for p, est, rse in zip(table["parameter"].values, table["estimate"].values, table["rse"].values):
        median = float(post["posterior"][str(p)].median())
        rows[str(p)] = {"laplace": float(est), "laplace_rse_percent": round(float(rse), 2), "nuts_median": median,
                        "relative_difference": round(float(est) / median - 1, 4), "well_identified": bool(rse < 25)}
    return {"parameters": rows, "nuts_wall_s": round(nuts_s, 1),
            "warnings": [str(w.message)[:160] for w in caught if issubclass(w.category, UserWarning)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=50)
    ap.add_argument("--skip-nlme", action="store_true")
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument("--skip-coverage", action="store_true")
    ap.add_argument("--skip-nuts", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "laplace_fit.json"))
    a = ap.parse_args(argv)
    record = {"machine": machine(), "command": "python benchmarks/laplace_fit.py " + " ".join(argv or sys.argv[1:])}
    if not a.skip_timings:
        record["timings"] = timings()
        print(json.dumps(record["timings"], indent=1), flush=True)
    data = ck.read_dataset(ROOT / "data" / "stein_sim.csv")
    truth = dict(data.meta["generation"]["true_values"])
    problem = make_problem(ck.load_model("stein_2019"), data, estimate=("fold", "cmax", "alpha"), variability=RANDOM)
    if not a.skip_coverage:
        record["coverage"] = coverage(a.replicates, data, truth, problem)
        print(json.dumps(record["coverage"], indent=1), flush=True)
    if not a.skip_nlme:
        if shutil.which("Rscript") is None:
            record["nlme"] = "not run: Rscript not found (Debian: apt install r-base-core r-cran-nlme)"
        else:
            record["nlme"] = nlme_comparison(data, truth, problem)
        print(json.dumps(record["nlme"], indent=1), flush=True)
    if not a.skip_nuts:
        record["nuts_vs_laplace"] = nuts_comparison()
        print(json.dumps(record["nuts_vs_laplace"], indent=1), flush=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
