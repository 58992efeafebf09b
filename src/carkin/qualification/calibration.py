"""Calibration of a model's population against published arms: an aggregate-data likelihood.

Each calibration claim of a model is a statistic of a virtual trial under the row's design
(carkin.arms). The likelihood of the reported value given the simulated one uses the same
distributions as the qualification tolerance (carkin.evidence):

- events/n (and Kaplan-Meier estimates, with n from their CI): binomial;
- a geometric mean with CV% and n: log GM ~ Normal(log simulated GM, s^2/n), and the log-scale
  variance (n-1) s^2 / sigma^2 ~ chi-square(n-1) with sigma from the simulated arm;
- a median or a population typical value: normal on the tolerance rule's scale.

The parameters (typical values and between-subject SDs on the log or logit scale) get normal
priors around the model's assumption values (``Prior``). With common random numbers (each
design's virtual patients fixed) and the thresholds as logistic steps (carkin.arms.statistic),
the log posterior is a smooth, deterministic function of the parameters: its mode is found by
Nelder-Mead (restarted from its best point with smaller simplexes), and its uncertainty by an
adaptive random-walk Metropolis chain started at the mode (Haario et al. 2001: the proposal
covariance is the chain's own, scaled by 2.38^2/d, adapted during warm-up only), whose draws are
what what-if runs and trial simulations carry forward. Acceptance rate and effective sample
sizes are reported with the result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special, stats

from carkin.errors import InputError
from carkin.model.library import load_model
from carkin.model.population import omega_site, parameter_of_omega
from carkin.qualification import evidence
from carkin.qualification.arms import Claim, VirtualArm, design_of, statistic

SMOOTH = 0.05  # width of the logistic threshold steps (log scale) in the calibration likelihood
P_FLOOR = 1e-6  # simulated proportions are kept in [P_FLOOR, 1 - P_FLOOR] inside the binomial
MAX_UNCONSTRAINED = 30.0  # |log| or |logit| beyond this is no longer a model (and overflows)
MAX_LOG_OMEGA = math.log(10.0)
KINETIC_GRID_SD = 3.0  # a kinetic parameter of the link calibration is tabulated over its prior's +-3 SD ...
KINETIC_GRID_POINTS = 41  # ... at this many log-spaced values (each patient's peak interpolated in log-log)


@dataclass(frozen=True)
class Prior:
    """Normal prior on the log (logit for fractions) scale, centred on an assumption value."""

    center: float
    sd: float = 1.0
    note: str = ""


@dataclass(frozen=True)
class CalibrationSpec:
    """What a model's calibration estimates: typical values and between-subject SDs, with priors."""

    typical: tuple = ()  # ((parameter, Prior), ...)
    omegas: tuple = ()  # ((parameter, Prior), ...) on log(omega)
    n_virtual: int = 400
    seed: int = 1
    max_evaluations: int = 800  # per Nelder-Mead run (three runs)
    warmup: int = 1000  # Metropolis steps adapting the proposal (discarded)
    steps: int = 3000  # Metropolis steps kept, thinned to n_draws
    n_draws: int = 200
    start: tuple = ()  # ((name, value), ...): where the optimiser starts, if not at the prior centres

    @property
    def names(self) -> list[str]:
        return [f"{p}" for p, _ in self.typical] + [omega_site(p) for p, _ in self.omegas]


def _logit(p):
    return math.log(p) - math.log1p(-p)


@dataclass
class CalibrationProblem:
    """The smoothed log posterior of one model's calibration, over its calibration claims."""

    model_name: str
    spec: CalibrationSpec
    claims: tuple
    dlt_model: object = None
    arms: dict = field(init=False)
    n_evaluations: int = field(init=False, default=0)

    def __post_init__(self):
        self.rows = {c.row: evidence.row(c.row) for c in self.claims}
        self.arms = {}
        self.claim_design = {}
        for c in self.claims:
            d = design_of(c, self.rows[c.row])
            key = d.key
            if key not in self.arms or self.arms[key].design.horizon < d.horizon:
                self.arms[key] = VirtualArm(load_model(self.model_name, **dict(c.options)), d,
                                            n=self.spec.n_virtual, seed=self.spec.seed)
            self.claim_design[c.row] = key
        model = load_model(self.model_name)
        self.kinds = {p.name: p.kind for p in model.parameters}
        self.x0 = np.array([self._to_x(p, pr.center) for p, pr in self.spec.typical] +
                           [math.log(pr.center) for _, pr in self.spec.omegas])

    def _to_x(self, name, value):
        return _logit(value) if self.kinds[name] == "fraction" else math.log(value)

    def _from_x(self, name, x):
        x = float(np.clip(x, -MAX_UNCONSTRAINED, MAX_UNCONSTRAINED))
        return float(special.expit(x)) if self.kinds[name] == "fraction" else math.exp(x)

    def unpack(self, x) -> tuple[dict, dict]:
        k = len(self.spec.typical)
        values = {p: self._from_x(p, xi) for (p, _), xi in zip(self.spec.typical, x[:k])}
        omegas = {p: math.exp(min(xi, MAX_LOG_OMEGA)) for (p, _), xi in zip(self.spec.omegas, x[k:])}
        return values, omegas

    def log_prior(self, x) -> float:
        k = len(self.spec.typical)
        lp = 0.0
        for (p, pr), xi in zip(self.spec.typical, x[:k]):
            lp += stats.norm.logpdf(xi, self._to_x(p, pr.center), pr.sd)
        for (_, pr), xi in zip(self.spec.omegas, x[k:]):
            lp += stats.norm.logpdf(xi, math.log(pr.center), pr.sd)
        return float(lp)

    def terms(self, x, smooth: float = SMOOTH) -> dict:
        """Per-claim log-likelihood terms at ``x`` (and the simulated statistics)."""
        values, omegas = self.unpack(x)
        sims = {key: arm.simulate(values, omegas) for key, arm in self.arms.items()}
        out = {}
        for c in self.claims:
            arm = self.arms[self.claim_design[c.row]]
            o = statistic(arm.model.with_values(**values), c, self.rows[c.row], sims[self.claim_design[c.row]],
                          self.dlt_model, smooth=smooth)
            out[c.row] = (log_likelihood(self.rows[c.row], c, o), o)
        return out

    def log_posterior(self, x) -> float:
        self.n_evaluations += 1
        lp = self.log_prior(x)
        if not np.all(np.abs(x) < MAX_UNCONSTRAINED):
            return -math.inf
        try:
            ll = sum(t for t, _ in self.terms(x).values())
        except (FloatingPointError, OverflowError, ValueError):
            return -math.inf
        v = lp + ll
        return v if math.isfinite(v) else -math.inf


def is_toxicity(claim: Claim) -> bool:
    """A claim on grade >= 3 CRS: calibrated with the toxicity link, not with the model's kinetics."""
    return (claim.quantity or evidence.row(claim.row).quantity) == "crs_grade3plus"


def toxicity_claims(model_names) -> list[tuple[str, Claim]]:
    """Every model's calibration claims on grade >= 3 CRS, as (model, claim)."""
    return [(m, c) for m in model_names
            for c in load_model(m).claims  # type: ignore[attr-defined]  # library models define claims
            if c.role == "calibration" and is_toxicity(c)]


def log_likelihood(row: evidence.Row, claim: Claim, o) -> float:
    """log p(reported | simulated statistic ``o``) by the row's statistic (module docstring)."""
    x = o.value
    if not math.isfinite(x):
        return -1e6
    s = row.statistic
    if s in ("proportion", "km_estimate"):
        p = min(max(x, P_FLOOR), 1 - P_FLOOR)
        n, k = row.n, row.events
        if s == "km_estimate" and row.dispersion_kind == "ci95":
            se = (row.dispersion_high - row.dispersion_low) / (2 * evidence.Z)
            pv = min(max(row.value, 0.01), 0.99)
            n = pv * (1 - pv) / se**2  # effective n of the KM estimate
        if not math.isfinite(k):
            k = row.value * n
        # relative to the saturated model (p = k/n), so a perfect fit scores 0 and -2x is the deviance
        ph = min(max(k / n, P_FLOOR), 1 - P_FLOOR)
        return float(k * math.log(p / ph) + (n - k) * math.log((1 - p) / (1 - ph)))
    if s == "geometric_mean" and row.dispersion_kind == "cv_percent":
        sd = evidence.sd_log_from_cv(row.dispersion_low)
        ll = stats.norm.logpdf(math.log(row.value), math.log(x), sd / math.sqrt(row.n))
        if math.isfinite(o.cv_percent) and o.cv_percent > 0:
            var_sim = evidence.sd_log_from_cv(o.cv_percent) ** 2
            df = row.n - 1
            ll += stats.chi2.logpdf(df * sd**2 / var_sim, df) + math.log(df / var_sim)
        return float(ll)
    tol = evidence.tolerance(row) if claim.tolerance is None else evidence.Interval(*claim.tolerance, "explicit")
    if tol.scale == "log":
        half = (math.log(tol.high) - math.log(tol.low)) / 2
        return float(stats.norm.logpdf(math.log(row.value), math.log(max(x, 1e-300)), half / evidence.Z))
    half = (tol.high - tol.low) / 2
    return float(stats.norm.logpdf(row.value, x, half / evidence.Z))


def _mode(logp, start, max_evaluations: int, progress, label: str, t0: float) -> tuple:
    """Nelder-Mead on -logp, restarted from its best point with smaller simplexes: (mode, evaluations,
    converged, message)."""
    nfev = 0
    for step in (0.5, 0.2, 0.05):
        res = optimize.minimize(lambda x: -logp(x), start, method="Nelder-Mead",
                                options={"maxfev": max_evaluations, "xatol": 1e-3, "fatol": 1e-3,
                                         "initial_simplex": start + np.vstack([np.zeros(start.size),
                                                                               step * np.eye(start.size)])})
        nfev += res.nfev
        start = res.x
        progress(f"{label}: Nelder-Mead (simplex {step}) log posterior {-res.fun:.2f} after {nfev} "
                 f"evaluations ({time.perf_counter() - t0:.0f} s)")
    return res.x, int(nfev), bool(res.success), str(res.message)


def laplace_covariance(logp, x, step) -> np.ndarray | None:
    """Inverse of minus the central-difference Hessian of ``logp`` at ``x`` (steps ``step`` per coordinate):
    the Laplace approximation's covariance at a mode, or None where that Hessian is not negative definite."""
    h = np.asarray(step, float)
    d = x.size
    f0 = logp(x)
    hess = np.empty((d, d))
    e = np.eye(d) * h
    for i in range(d):
        hess[i, i] = (logp(x + e[i]) - 2.0 * f0 + logp(x - e[i])) / h[i] ** 2
        for j in range(i):
            hess[i, j] = hess[j, i] = (logp(x + e[i] + e[j]) - logp(x + e[i] - e[j]) - logp(x - e[i] + e[j])
                                       + logp(x - e[i] - e[j])) / (4.0 * h[i] * h[j])
    w, v = np.linalg.eigh(-0.5 * (hess + hess.T))
    if not np.all(np.isfinite(w)) or w.min() <= 0:
        return None
    return (v / w) @ v.T


def _sample(logp, mode, scale0, spec, names, progress, label: str, t0: float) -> dict:
    """Adaptive Metropolis from the mode, its proposal started from the Laplace approximation there (a chain
    started with small steps adapted too slowly for the correlated calibration posteriors): draws thinned to
    ``spec.n_draws``, their SDs and the chain's diagnostics."""
    cov0 = laplace_covariance(logp, mode, 2.0 * np.asarray(scale0))
    progress(f"{label}: Laplace covariance at the mode " + ("found" if cov0 is not None else
                                                            "not positive definite: small diagonal steps instead"))
    chain, _, acceptance = metropolis(logp, mode, scale0, spec.warmup, spec.steps, np.random.default_rng(spec.seed),
                                      cov0=cov0)
    pick = np.linspace(0, len(chain) - 1, spec.n_draws).round().astype(int)
    ess = _ess(chain)
    progress(f"{label}: Metropolis acceptance {acceptance:.2f}, smallest ESS {min(ess):.0f} of {len(chain)} steps; "
             f"{time.perf_counter() - t0:.0f} s in all")
    return {"sd_unconstrained": chain.std(axis=0).tolist(), "draws_unconstrained": chain[pick].tolist(),
            "metropolis": {"warmup": spec.warmup, "steps": spec.steps, "acceptance": acceptance,
                           "ess": dict(zip(names, [float(e) for e in ess]))}}


def metropolis(logp, x0, scale0, warmup: int, steps: int, rng, cov0=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Adaptive random-walk Metropolis (Haario et al. 2001): (kept draws, their log densities, acceptance rate
    after warm-up). The proposal starts as ``cov0`` scaled by 2.38^2/d (the optimal scale for a Gaussian
    target) where given, else as diagonal steps ``scale0``, and adapts to the warm-up history."""
    d = x0.size
    x, lp = x0.copy(), logp(x0)
    cov = np.diag(np.asarray(scale0, float) ** 2) if cov0 is None else np.asarray(cov0, float) * 2.38**2 / d
    chain, lps, accepted = [], [], 0
    history: list[np.ndarray] = []
    for i in range(warmup + steps):
        if warmup // 4 <= i < warmup and i % 100 == 0 and len(history) > 2 * d:
            cov = np.cov(np.array(history).T) * 2.38**2 / d + 1e-10 * np.eye(d)
        y = rng.multivariate_normal(x, cov)
        ly = logp(y)
        if np.log(rng.random()) < ly - lp:
            x, lp = y, ly
            accepted += i >= warmup
        if i < warmup:
            history.append(x.copy())
        else:
            chain.append(x.copy())
            lps.append(lp)
    return np.array(chain), np.array(lps), accepted / max(steps, 1)


def calibrate(model_name: str, spec: CalibrationSpec, claims=None, dlt_model=None, progress=print,
              draws: bool = True) -> dict:
    """Posterior mode (Nelder-Mead) and Metropolis draws of a model's calibration, as a JSON-ready dict;
    ``draws=False`` stops at the mode (what a reproducibility check compares)."""
    model = load_model(model_name)
    # the attr-defined ignore: library models define claims, the Model base class does not
    claims = tuple(c for c in (claims if claims is not None else model.claims)  # type: ignore[attr-defined]
                   if c.role == "calibration" and not is_toxicity(c))
    if not claims:
        raise evidence.EvidenceError(f"model {model_name!r} has no calibration claims")
    t0 = time.perf_counter()
    prob = CalibrationProblem(model_name, spec, claims, dlt_model)
    given = dict(spec.start)
    start = np.array([prob._to_x(p, given.get(p, pr.center)) for p, pr in spec.typical] +
                     [math.log(given.get(omega_site(p), pr.center)) for p, pr in spec.omegas])
    names = spec.names
    scale0 = 0.05 * np.array([pr.sd for _, pr in spec.typical] + [pr.sd for _, pr in spec.omegas])
    mode, nfev, converged, message = _mode(prob.log_posterior, start, spec.max_evaluations, progress, model_name, t0)
    sampled = _sample(prob.log_posterior, mode, scale0, spec, names, progress, model_name, t0) if draws else {}
    terms = prob.terms(mode)
    values, omegas = prob.unpack(mode)
    return {
        "model": model_name,
        "method": "aggregate-data likelihood; Nelder-Mead mode and adaptive Metropolis draws of the smoothed "
                  "posterior",
        "smoothing_log_width": SMOOTH,
        "n_virtual_per_design": spec.n_virtual,
        "seed": spec.seed,
        "parameters": names,
        "mode": {**values, **{omega_site(k): v for k, v in omegas.items()}},
        "mode_unconstrained": mode.tolist(),
        "scale": ["logit" if prob.kinds[p] == "fraction" else "log" for p, _ in spec.typical] + ["log"] * len(
            spec.omegas),
        "priors": {**{p: {"center": pr.center, "sd": pr.sd, "note": pr.note} for p, pr in spec.typical},
                   **{omega_site(p): {"center": pr.center, "sd": pr.sd, "note": pr.note} for p, pr in spec.omegas}},
        **sampled,
        "log_posterior_at_mode": float(prob.log_posterior(mode)),
        "optimizer": {"evaluations": nfev, "converged": converged, "message": message},
        "claims": {row: {"log_likelihood": float(t), "simulated": float(o.value), "simulated_cv_percent":
                         float(o.cv_percent) if math.isfinite(o.cv_percent) else None}
                   for row, (t, o) in terms.items()},
        "evaluations": prob.n_evaluations,
        "seconds": time.perf_counter() - t0,
    }


def _ess(chain: np.ndarray) -> list[float]:
    """Effective sample size of each coordinate (initial positive sequence of autocorrelations)."""
    out = []
    for x in chain.T:
        x = x - x.mean()
        n = x.size
        if n < 4 or not np.any(x):
            out.append(float(n))
            continue
        f = np.fft.rfft(x, 2 * n)
        ac = np.fft.irfft(f * np.conj(f))[:n] / (x @ x)
        s, k = 0.0, 1
        while k + 1 < n and ac[k] + ac[k + 1] > 0:
            s += ac[k] + ac[k + 1]
            k += 2
        out.append(float(n / (1.0 + 2.0 * s)))
    return out


def natural_draws(result: dict) -> list[tuple[dict, dict]]:
    """The calibration's draws as (typical values, omegas) on their natural scales."""
    out = []
    for d in result["draws_unconstrained"]:
        values, omegas = {}, {}
        for name, scale, x in zip(result["parameters"], result["scale"], d):
            v = 1.0 / (1.0 + math.exp(-x)) if scale == "logit" else math.exp(x)
            if parameter_of_omega(name):
                omegas[parameter_of_omega(name)] = v
            else:
                values[name] = v
        out.append((values, omegas))
    return out


def save(result: dict, path) -> None:
    """Write a result atomically: a complete new file replaces the old one, or the old one stays."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- the toxicity link, fitted to the toxicity table --------------------------------------------


@dataclass(frozen=True)
class LinkSpec:
    """The DLT link's coefficients with their priors, and kinetic parameters estimated with them.

    The link's dose signal comes through simulated peak expansion, so where a model's
    dose-exposure relation is pinned only by dose-toxicity data (cd7_cart's density limit),
    that kinetic parameter is estimated together with the link: ``kinetic`` holds
    ((model, parameter, Prior), ...)."""

    intercept: Prior
    slope_peak: Prior
    slope_burden: Prior
    offsets: tuple = ()  # ((model, Prior), ...): a log-odds offset for the arms of that model
    kinetic: tuple = ()
    window_end_day: float | None = None  # the link's CRS window (None: carkin.toxicity's default)
    n_virtual: int = 400
    seed: int = 1
    max_evaluations: int = 600
    warmup: int = 1000
    steps: int = 10000  # evaluations are cheap (the kinetics are simulated once per arm)
    n_draws: int = 200

    @property
    def names(self) -> list[str]:
        return (["intercept", "slope_peak", "slope_burden"] + [f"offset.{m}" for m, _ in self.offsets]
                + [f"{m}.{p}" for m, p, _ in self.kinetic])

    @property
    def priors(self) -> list[Prior]:
        return ([self.intercept, self.slope_peak, self.slope_burden] + [pr for _, pr in self.offsets]
                + [pr for _, _, pr in self.kinetic])


@dataclass
class LinkProblem:
    """Binomial likelihood of every toxicity claim (grade >= 3 CRS) under the link, over virtual arms."""

    spec: LinkSpec
    claims: tuple  # ((model_name, Claim), ...)
    fitted: dict  # model_name -> (values, omegas) from the kinetic calibrations
    n_evaluations: int = field(init=False, default=0)

    def __post_init__(self):
        from carkin.trials.toxicity import DLTModel

        self.template = DLTModel() if self.spec.window_end_day is None else DLTModel(
            window_end_day=self.spec.window_end_day)
        self.rows = {c.row: evidence.row(c.row) for _, c in self.claims}
        self.arms = {}
        for m, c in self.claims:
            d = design_of(c, self.rows[c.row])
            self.arms[(m, c.row)] = VirtualArm(load_model(m, **dict(c.options)), d, n=self.spec.n_virtual,
                                               seed=self.spec.seed)
        kinetic = {}
        for m, p, pr in self.spec.kinetic:
            if m in kinetic:
                raise InputError(f"link calibration: one kinetic parameter per model ({m!r} has two)")
            kinetic[m] = (p, pr)
        self.kinetic = kinetic
        self.cache = {}  # (model, row) -> (peaks, burden) or, for kinetic models, (grid, log peaks table, burden)
        for (m, row), arm in self.arms.items():
            values, omegas = self.fitted.get(m, ({}, {}))
            if m not in kinetic:
                self.cache[(m, row)] = self._peaks(arm, values, omegas)
                continue
            # the kinetic parameter enters only through peak expansion: tabulate each patient's peak over a
            # log-spaced grid covering the prior's +-KINETIC_GRID_SD standard deviations, then interpolate
            p, pr = kinetic[m]
            grid = np.linspace(math.log(pr.center) - KINETIC_GRID_SD * pr.sd,
                               math.log(pr.center) + KINETIC_GRID_SD * pr.sd, KINETIC_GRID_POINTS)
            table, burden, ok = [], None, None
            for g in grid:
                ds = arm.simulate({**values, p: math.exp(g)}, omegas)
                ok = ~ds["failed"].values if ok is None else ok & ~ds["failed"].values
                link = self.template.for_model(arm.model)
                table.append(np.log(np.maximum(link.exposure(ds[link.peak_observable]).values, 1e-300)))
                if link.burden_covariate in ds:
                    burden = ds[link.burden_covariate].values
            self.cache[(m, row)] = (grid, np.array(table)[:, ok], None if burden is None else burden[ok])

    def _peaks(self, arm, values, omegas):
        ds = arm.simulate(values, omegas)
        ok = ~ds["failed"].values
        link = self.template.for_model(arm.model)
        burden = ds[link.burden_covariate].values if link.burden_covariate in ds else None
        return link.exposure(ds[link.peak_observable]).values[ok], None if burden is None else burden[ok]

    def peaks(self, m: str, row: str, kinetic: dict):
        """(peaks, burden) of an arm's virtual patients at the kinetic parameter value in ``kinetic``."""
        if m not in self.kinetic:
            return self.cache[(m, row)]
        grid, table, burden = self.cache[(m, row)]
        x = math.log(kinetic[m][self.kinetic[m][0]])
        i = int(np.clip(np.searchsorted(grid, x) - 1, 0, grid.size - 2))
        w = float(np.clip((x - grid[i]) / (grid[i + 1] - grid[i]), 0.0, 1.0))
        return np.exp((1 - w) * table[i] + w * table[i + 1]), burden

    def unpack(self, x):
        """(link, offsets by model, kinetic values by model) at ``x``."""
        from dataclasses import replace

        link = replace(self.template, intercept=float(x[0]), slope_peak=float(x[1]), slope_burden=float(x[2]))
        k = 3 + len(self.spec.offsets)
        offsets = {m: float(xi) for (m, _), xi in zip(self.spec.offsets, x[3:k])}
        kinetic = {}
        for (m, p, _), xi in zip(self.spec.kinetic, x[k:]):
            kinetic.setdefault(m, {})[p] = math.exp(float(np.clip(xi, -MAX_UNCONSTRAINED, MAX_UNCONSTRAINED)))
        return link, offsets, kinetic

    def log_prior(self, x) -> float:
        k = 3 + len(self.spec.offsets)
        lp = sum(stats.norm.logpdf(xi, pr.center, pr.sd) for pr, xi in zip(self.spec.priors[:k], x[:k]))
        lp += sum(stats.norm.logpdf(xi, math.log(pr.center), pr.sd) for (_, _, pr), xi in zip(self.spec.kinetic, x[k:]))
        return float(lp)

    def arm_probabilities(self, x) -> dict:
        from dataclasses import replace

        link, offsets, kinetic = self.unpack(x)
        out = {}
        for m, row in self.arms:
            peak, burden = self.peaks(m, row, kinetic)
            out[(m, row)] = float(np.mean(replace(link, offset=offsets.get(m, 0.0)).probability(peak, burden)))
        return out

    def log_posterior(self, x) -> float:
        self.n_evaluations += 1
        if not np.all(np.isfinite(x)) or np.any(np.abs(x) > MAX_UNCONSTRAINED):
            return -math.inf
        for (_, _, pr), xi in zip(self.spec.kinetic, x[3 + len(self.spec.offsets):]):
            if abs(xi - math.log(pr.center)) > KINETIC_GRID_SD * pr.sd:  # outside the tabulated range
                return -math.inf
        probs = self.arm_probabilities(x)
        ll = sum(_binomial(self.rows[row], p) for (_, row), p in probs.items())
        return self.log_prior(x) + ll


def _binomial(row: evidence.Row, p: float) -> float:
    p = min(max(p, P_FLOOR), 1 - P_FLOOR)
    n = row.n
    k = row.events if math.isfinite(row.events) else row.value * n
    ph = min(max(k / n, P_FLOOR), 1 - P_FLOOR)
    return float(k * math.log(p / ph) + (n - k) * math.log((1 - p) / (1 - ph)))


def calibrate_link(spec: LinkSpec, claims, fitted: dict, progress=print, draws: bool = True) -> dict:
    """Posterior mode and Metropolis draws of the toxicity link (and any kinetic parameters with it);
    ``draws=False`` stops at the mode."""
    t0 = time.perf_counter()
    prob = LinkProblem(spec, tuple(claims), fitted)
    k = 3 + len(spec.offsets)
    start = np.array([pr.center for pr in spec.priors[:k]] + [math.log(pr.center) for _, _, pr in spec.kinetic])
    names = spec.names
    scale0 = 0.05 * np.array([pr.sd for pr in spec.priors])
    mode, *_ = _mode(prob.log_posterior, start, spec.max_evaluations, progress, "toxicity link", t0)
    sampled = _sample(prob.log_posterior, mode, scale0, spec, names, progress, "toxicity link", t0) if draws else {}
    probs = prob.arm_probabilities(mode)
    return {
        "link": prob.template.describe(),
        "window_end_day": prob.template.window_end_day,
        "parameters": names,
        "scale": ["identity"] * k + ["log"] * len(spec.kinetic),
        "mode": dict(zip(names, [float(v) if i < k else math.exp(float(v)) for i, v in enumerate(mode)])),
        "mode_unconstrained": mode.tolist(),
        "priors": dict(zip(names, [vars(pr) for pr in spec.priors])),
        **sampled,
        "arms": {f"{m}:{row}": {"simulated": p, "reported": prob.rows[row].value, "n": prob.rows[row].n,
                                "events": prob.rows[row].events}
                 for (m, row), p in probs.items()},
        "log_posterior_at_mode": float(prob.log_posterior(mode)),
        "evaluations": prob.n_evaluations,
        "seconds": time.perf_counter() - t0,
    }
