"""Maximum-likelihood population estimates with the random effects integrated out by the Laplace
approximation (FOCE with interaction), as NONMEM's FOCE-I or nlmixr2's FOCEi give them.

For subject i with standardised random effects z_i (eta = omega * z) and population parameters
psi (typical values, omegas, covariate coefficients, residual errors):

    l_i(z; psi)  = -log p(y_i | z; psi) + |z|^2 / 2                     (conditional objective)
    -log L_i(psi) ~ l_i(z_i*; psi) + log det H_i / 2                      (z_i* = argmin l_i)

with H_i = J_i' W_i J_i + I the FOCE-I information matrix: J_i the derivatives of the subject's
predictions with respect to z at its mode, W_i each record's expected Fisher information about its
prediction under the error model (the interaction: a residual SD that depends on the prediction
adds its own information), and for a BLQ record (M3) the curvature of its log-probability in the
standardised distance to the LLOQ (log-concave, so positive). Where the predictions are linear in z
with a constant residual SD this is the exact marginal likelihood.

Derivatives. Every derivative of the predictions passes through each subject's few individual
parameters, so one forward-mode solve carrying first and second derivatives with respect to them
(the ensemble engine, or a closed form) gives a local quadratic model of the predictions that is
exact to second order at the mode. The objective's gradient is then ordinary reverse mode on that
model, with the modes' own movement (d z*/d psi) by the implicit function theorem; no third
derivative of an ODE solution is needed. The modes are damped Newton solves on that local model,
all subjects at once (one solve per step), warm-started from the previous outer iterate.

The outer optimiser is BFGS (scipy) on the unconstrained scale of every population parameter:
the modes carried between its steps are state that a pure JAX optimiser loop cannot keep, and a
Python loop reports progress and can be interrupted.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to

from carkin.errors import CarkinError, InputError
from carkin.fitting.fit_problem import FitProblem
from carkin.fitting.predictions import ensemble_observables, subject_observables
from carkin.fitting.samplers import Laplace
from carkin.model.observation import PREDICTION_FLOOR, log_normal_cdf
from carkin.model.population import Z_SITE, omega_site, parameter_of_omega, sigma_add_site, sigma_site

# a subject's mode counts as found when the largest gradient component (z units) is below INNER_GTOL or the
# Newton decrement g' H^-1 g below INNER_DECREMENT: l within ~1e-10 of its minimum, above an ODE solve's own
# noise (its steps change with the parameters)
INNER_GTOL = 1e-6
INNER_DECREMENT = 1e-10
MAX_STEP = 1.0  # largest change of any z in one Newton step (z is in standard deviations)
INNER_MAX_ITER = 100  # damped Newton iterations per mode search
OUTER_GTOL = 1e-3  # largest gradient component of -log L (unconstrained scale) at which BFGS stops
CONVERGED_GTOL = 1e-2  # ... and below which a BFGS run that ends on its line search (ODE noise) counts as converged
FIRST_STEP = 0.3  # length of BFGS's first step (unconstrained scale) along its largest gradient component
START_SPREAD = 0.3  # SD of the unconstrained perturbation of each extra start
FD_STEP = 1e-4  # central-difference step (unconstrained scale) of the covariance step
LOG_2PI = math.log(2 * math.pi)
FAILED = 1e300  # objective reported to the optimiser where a solve fails


class LaplaceError(CarkinError, RuntimeError):
    """The Laplace fit failed numerically (no start with a finite objective)."""


# --- the objective ------------------------------------------------------------------------------


def _information(err, f, blq, lloq, sigma, add):
    """Each record's FOCE-I weight: expected Fisher information about its prediction ``f`` for a
    measured record (location and, the interaction, SD: c'^2/s^2 + 2 s'^2/s^2); for a BLQ record
    the curvature of log Phi(u) in u = (g(lloq) - c) / s times u'^2."""
    one = jnp.ones_like(f)
    (c, s), (dc, ds) = jax.jvp(lambda ff: err.scale(ff, sigma, add), (f,), (one,))
    measured = dc**2 / s**2 + 2.0 * ds**2 / s**2
    g_l = err.g(jnp.where(blq, lloq, 1.0))
    u = (g_l - c) / s
    du = (-dc * s - (g_l - c) * ds) / s**2
    # -d^2/du^2 log Phi(u) = m (m + u), m = phi(u) / Phi(u) the inverse Mills ratio
    mills = jnp.exp(-0.5 * u**2 - 0.5 * LOG_2PI - log_normal_cdf(u))
    curvature = mills * (mills + u)
    return jnp.where(blq, curvature * du**2, measured)


@dataclass(frozen=True)
class _Objective:
    """The pieces of -log L for one problem, as pure functions (compiled once per problem)."""

    problem: FitProblem
    sites: tuple  # population sites in order
    free: np.ndarray  # indices of the model parameters that vary (the estimated ones)

    def constrain(self, u):
        return {s: biject_to(self.problem.priors[s].support)(u[k]) for k, s in enumerate(self.sites)}

    def unconstrain(self, values: dict):
        return jnp.stack([biject_to(self.problem.priors[s].support).inv(jnp.asarray(float(values[s])))
                          for s in self.sites])

    def theta(self, params, z):
        """(S, P) individual values of every model parameter."""
        d = self.problem.design
        x = np.asarray(self.problem.x, float).reshape(d.n_subjects, -1)
        return self.problem.population.individual(params, z, x)

    def predictions(self, theta):
        """(S, O, T) observables and (S,) ok flags at individual parameters ``theta``."""
        p, d = self.problem, self.problem.design
        args = [jnp.asarray(a) for a in (d.times, d.dose_times, d.dose_cells)]
        cov = jnp.asarray(d.model_covariates)
        if p.model.has_closed_form:
            return jax.vmap(lambda *a: subject_observables(p.model, d.observables, *a))(*args, theta, cov)
        # only the free parameters vary: the solve carries derivatives for them alone
        return ensemble_observables(p.model, d.observables, *args, theta, cov, free=self.free)

    def taylor(self, theta, order: int):
        """Predictions and their derivatives with respect to each subject's free parameters: a
        local model of the predictions, exact to ``order`` (1 or 2) at ``theta``. Subjects are
        independent, so one tangent moving a parameter of every subject at once gives each its own."""
        k = self.free.size

        def at(shift):
            return self.predictions(theta.at[:, self.free].add(shift))

        def values(shift):
            f, ok = at(shift)
            return f, (f, ok)

        def first(shift):
            jac, (f, ok) = jax.jacfwd(values, has_aux=True)(shift)
            return jac, (f, ok, jac)

        zero = jnp.zeros(k)
        if order == 1:
            jac, (f, ok, _) = first(zero)
            return f, ok, jac, jnp.zeros(jac.shape + (k,))
        hess, (f, ok, jac) = jax.jacfwd(first, has_aux=True)(zero)
        return f, ok, jac, hess

    def record_predictions(self, params, z, local, obs):
        """One subject's prediction of each of its records from the local model ``local`` =
        (theta0 (P,), f0, J0, K0) of its predictions, at standardised random effects ``z``."""
        theta0, f0, jac0, hess0 = local
        th = self.problem.population.individual(params, z[None], obs["x"][None])[0]
        delta = th[self.free] - theta0[self.free]
        f = f0 + jac0 @ delta + 0.5 * jnp.einsum("otk,k->ot", hess0 @ delta, delta)
        return f[obs["kind"], obs["tindex"]]

    def negative_log_likelihood(self, params, pred, obs):
        """-log p(y | predictions) of one subject's records (M3 where BLQ)."""
        ll = self.problem.pointwise_log_likelihood(params, pred, (obs["y"], obs["blq"], obs["lloq"]), kind=obs["kind"])
        return -jnp.sum(jnp.where(obs["mask"], ll, 0.0))

    def conditional(self, params, z, local, obs):
        """One subject's conditional objective l(z) = -log p(y | z) + |z|^2 / 2."""
        pred = self.record_predictions(params, z, local, obs)
        return self.negative_log_likelihood(params, pred, obs) + 0.5 * jnp.sum(z**2)

    def log_det(self, params, z, local, obs):
        """log det of one subject's FOCE-I information matrix J' W J + I at ``z``."""
        pred = self.record_predictions(params, z, local, obs)
        jz = jax.jacfwd(self.record_predictions, argnums=1)(params, z, local, obs)  # (M, R)
        w = jnp.where(obs["mask"], self._weights(params, pred, obs), 0.0)
        return jnp.linalg.slogdet(jz.T @ (w[:, None] * jz) + jnp.eye(z.size))[1]

    def _weights(self, params, pred, obs):
        return by_observable(self.problem, obs["kind"], lambda err, sigma, add: _information(
            err, pred, obs["blq"], obs["lloq"], sigma, add), params)


def by_observable(problem: FitProblem, kind, term, params):
    """``term(error model, sigma, sigma_add)`` of each record's own observable (``kind`` its index),
    selected elementwise; ``term`` may return a tuple of arrays."""
    out = None
    for k, name in enumerate(problem.design.observables):
        value = term(problem.errors[name], params[sigma_site(name)], params.get(sigma_add_site(name), 0.0))
        out = value if out is None else jax.tree.map(lambda new, old, k=k: jnp.where(kind == k, new, old), value, out)
    return out


def conditional_derivatives(ob: _Objective, params, z, local, obs):
    """One subject's conditional objective l(z), its gradient and its Hessian in z (on the local
    model ``local``), from one trace."""
    def grad_with_value(zz):
        v, g = jax.value_and_grad(ob.conditional, argnums=1)(params, zz, local, obs)
        return g, (v, g)

    h, (v, g) = jax.jacfwd(grad_with_value, has_aux=True)(z)
    return v, g, h


def mode_found(grad, hess, gtol: float = INNER_GTOL):
    """(S,) whether each subject's conditional objective is at its minimum: the largest gradient
    component below ``gtol``, or (where the Hessian is positive definite, without which its terms
    can cancel) the Newton decrement g' H^-1 g below INNER_DECREMENT."""
    positive = jnp.linalg.eigvalsh(hess)[:, 0] > 0
    decrement = jnp.einsum("sr,sr->s", grad, jax.vmap(jnp.linalg.solve)(hess, grad))
    return (jnp.max(jnp.abs(grad), axis=1) <= gtol) | (positive & (decrement <= INNER_DECREMENT))


def subject_observations(problem: FitProblem, data=None) -> dict:
    """The measurements of ``problem`` (or of ``data``, another dataset on the same design) per
    subject, padded (S, M), with each subject's covariate-effect row."""
    from carkin.fitting.posthoc import _per_subject_observations

    d = problem.design
    if data is not None:
        import dataclasses

        problem = dataclasses.replace(problem, design=dataclasses.replace(
            d, y=np.asarray(data[0], float), blq=np.asarray(data[1], bool), lloq=np.asarray(data[2], float)))
    obs = {k: jnp.asarray(v) for k, v in _per_subject_observations(problem).items()}
    obs["x"] = jnp.asarray(np.asarray(problem.x, float).reshape(d.n_subjects, -1))
    return obs


def build(problem: FitProblem, use_priors: bool = False):
    """Compiled functions of a Laplace fit, one compile per problem whatever its measurements:
    ``value_and_grad(u, z0, obs) -> (-log L (+ -log prior), its gradient, modes, ok, per-subject terms,
    modes' gradient norms, inner iterations)`` and ``inner(params, z0, obs)``; ``obs`` is the
    per-subject layout of the measurements (:func:`subject_observations`)."""
    sites = tuple(problem.priors)
    free = np.array([problem.model.parameter_names.index(n) for n in problem.estimated], int)
    ob = _Objective(problem, sites, free)
    R = len(problem.random)

    def locals_at(params, z, order):
        theta = ob.theta(params, z)
        f, ok, jac, hess = ob.taylor(theta, order)
        return (theta, f, jac, hess), ok

    def over_subjects(fn, params, z, local, obs):
        return jax.vmap(lambda zz, loc, o: fn(params, zz, loc, o))(z, local, obs)

    def inner(params, z0, obs):
        """Modes of every subject's conditional objective, all subjects at once: Newton steps on the
        local second-order model (one solve with second derivatives per iteration), damped
        Levenberg-Marquardt style: a step that does not lower l is retried with more damping.
        Returns the modes, the local models there, and l with its gradient and Hessian at each
        mode (l infinite where a solve failed), and the iterations taken."""

        def evaluate(z):
            local, ok = locals_at(params, z, 2)
            value, grad, hess = over_subjects(functools.partial(conditional_derivatives, ob), params, z, local, obs)
            return jnp.where(ok, value, jnp.inf), grad, hess, local

        S = z0.shape[0]

        def cond(st):
            return (st[5] < INNER_MAX_ITER) & ~jnp.all(st[6])

        def body(st):
            z, v, g, h, lam, it, done, local = st
            step = jax.vmap(lambda hh, gg, ll: jnp.linalg.solve(hh + ll * jnp.eye(R), gg))(h, g, lam)
            # at most MAX_STEP standard deviations at once: a far step can reach parameters whose solve is slow
            step = step * jnp.minimum(1.0, MAX_STEP / jnp.max(jnp.abs(step), axis=1, keepdims=True))
            # the first pass evaluates the start itself (one traced evaluation keeps the compile short)
            z_try = jnp.where(done[:, None] | (it == 0), z, z - step)
            v_t, g_t, h_t, local_t = evaluate(z_try)
            better = ((v_t <= v) | (it == 0)) & jnp.isfinite(v_t) & ~done
            pick = lambda new, old: jnp.where(better.reshape((S,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            no_gain = better & (it > 0) & (jnp.abs(v - v_t) <= 1e-14 * (1.0 + jnp.abs(v)))
            z, v, g, h = pick(z_try, z), pick(v_t, v), pick(g_t, g), pick(h_t, h)
            local = jax.tree.map(pick, local_t, local)
            lam = jnp.where(it == 0, lam, jnp.clip(jnp.where(better, lam * 0.1, lam * 10.0), 1e-12, 1e12))
            converged = mode_found(g, h)
            failed = (it == 0) & ~jnp.isfinite(v_t)
            return z, v, g, h, lam, it + 1, done | converged | no_gain | (lam >= 1e12) | failed, local

        d = problem.design
        grid = (S, len(d.observables), d.times.shape[1])
        local0 = (jnp.zeros((S, len(problem.model.parameter_names))), jnp.zeros(grid),
                  jnp.zeros(grid + (free.size,)), jnp.zeros(grid + (free.size, free.size)))
        init = (z0, jnp.full(S, jnp.inf), jnp.zeros_like(z0), jnp.broadcast_to(jnp.eye(R), (S, R, R)),
                jnp.full(S, 1e-3), 0, jnp.zeros(S, bool), local0)
        z, v, g, h, _, it, _, local = jax.lax.while_loop(cond, body, init)
        return z, local, v, g, h, it

    def marginal(u, z, local, obs):
        """-log L (and -log prior) from the local model at the modes; (S,) subject terms too."""
        params = ob.constrain(u)
        per = (over_subjects(ob.conditional, params, z, local, obs)
               + 0.5 * over_subjects(ob.log_det, params, z, local, obs))
        total = jnp.sum(per)
        if use_priors:
            total = total - sum(jnp.sum(problem.priors[s].log_prob(params[s])) for s in sites)
        return total, per

    def value_and_grad(u, z0, obs):
        params = jax.lax.stop_gradient(ob.constrain(u))
        z, local, v_in, g_in, h_in, iterations = inner(params, z0, obs)
        ok, gnorm = jnp.isfinite(v_in), jnp.max(jnp.abs(g_in), axis=1)
        local = jax.lax.stop_gradient(local)
        # One more Newton step on the local model, which needs no solve: the modes' gradients fall from the
        # stopping rule's ~1e-5 to ~1e-10, so the envelope theorem holds to that (the local model stays
        # exact to second order over so short a step).
        positive = jnp.linalg.eigvalsh(h_in)[:, 0] > 0
        z = z - jnp.where(positive[:, None], jax.vmap(jnp.linalg.solve)(h_in, g_in), 0.0)
        (value, per), (g_u, g_z) = jax.value_and_grad(marginal, argnums=(0, 1), has_aux=True)(u, z, local, obs)

        # The modes move with psi: d z*/d psi = -H^-1 d(grad_z l)/d psi (implicit function theorem).
        grad_l = jax.grad(ob.conditional, argnums=1)
        hess_z = over_subjects(jax.hessian(ob.conditional, argnums=1), params, z, local, obs)
        w = jax.vmap(jnp.linalg.solve)(hess_z, g_z)
        correction = jax.grad(lambda uu: jnp.sum(over_subjects(grad_l, ob.constrain(uu), z, local, obs) * w))(u)
        ok_all = jnp.all(ok) & jnp.isfinite(value)
        return value, g_u - correction, z, ok_all, per, gnorm, iterations

    return ob, jax.jit(value_and_grad), jax.jit(inner)


# --- the fit ----------------------------------------------------------------------------------


def start_values(problem: FitProblem) -> dict:
    """Outer start: the model's typical values, its omegas (0.3 where it gives none), no covariate
    effects, and each residual SD at its prior's median."""
    values = dict(problem.model.values)
    sigmas = {f(n) for n in problem.design.observables for f in (sigma_site, sigma_add_site)}
    omegas = {omega_site(n): n for n in problem.random}
    out = {}
    for s, prior in problem.priors.items():
        if s in problem.estimated:
            out[s] = float(values[s])
        elif s in omegas:
            out[s] = problem.model.parameter(omegas[s]).omega or 0.3
        elif s in sigmas:
            out[s] = float(np.median(np.asarray(prior.sample(jax.random.PRNGKey(0), (2001,)))))
        else:
            out[s] = 0.0
    return out


@dataclass(frozen=True)
class LaplaceResult:
    """Estimates and what was learnt on the way: ``values`` (site -> estimate), ``u`` (unconstrained),
    ``z`` (S, R) modes, ``objective`` (-log L, + -log prior for a MAP), ``per_subject`` terms,
    ``converged`` and ``message`` in plain words, ``covariance`` of ``u`` (or None), ``starts``
    (objective of each start), and timings."""

    values: dict
    u: np.ndarray
    z: np.ndarray
    objective: float
    per_subject: np.ndarray
    converged: bool
    message: str
    covariance: np.ndarray | None
    covariance_message: str
    starts: tuple
    sites: tuple
    n_evaluations: int
    compile_s: float
    run_s: float
    iterations: int = 0  # BFGS iterations of the start kept


def estimate(problem: FitProblem, settings: Laplace | None = None, seed: int = 0, progress: bool = True,
             measurements=None, compiled=None) -> LaplaceResult:
    """Maximise the Laplace marginal likelihood (or posterior, with ``settings.priors``) of
    ``problem`` from ``settings.starts`` starts (default: ``Laplace()``); the best is kept.
    ``measurements`` = (y, blq, lloq) on the problem's design replaces its own (replicate
    datasets), and ``compiled`` (:func:`build`'s result) reuses one compile across them."""
    from scipy.optimize import minimize

    settings = Laplace() if settings is None else settings
    S, R = problem.design.n_subjects, len(problem.random)
    if R == 0:
        raise InputError("method='laplace' integrates out random effects, and no parameter has variability; "
                         "give variability=(...) or use method='nuts'")
    ob, compiled_vg, _ = compiled if compiled is not None else build(problem, settings.priors)
    obs = subject_observations(problem, measurements)

    def value_and_grad(u, z0):
        return compiled_vg(u, z0, obs)

    u0 = np.asarray(ob.unconstrain(start_values(problem)))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    compile_s = 0.0
    state: dict = {"z": jnp.zeros((S, R)), "n": 0}
    bar = _progress(progress, settings.starts, "Laplace starts")

    def fun(u):
        t = time.perf_counter()
        value, grad, z, ok, *_ = value_and_grad(jnp.asarray(u), state["z"])
        value = float(value)
        if state["n"] == 0:
            nonlocal compile_s
            compile_s = time.perf_counter() - t
        state["n"] += 1
        if not bool(ok) or not np.isfinite(value):
            return FAILED, np.zeros_like(u)  # finite: the line search then steps back
        state["z"] = z
        if bar is not None:
            bar.set_postfix(objective=f"{value:.4f}", evaluations=state["n"], refresh=False)
        return value, np.asarray(grad)

    results: list = []  # per start: (objective, u, z, per-subject terms, gradient, scipy result) or None
    for k in range(settings.starts):
        u_start = u0 if k == 0 else u0 + START_SPREAD * rng.standard_normal(u0.size)
        state["z"] = jnp.zeros((S, R))
        v_start, g_start = fun(u_start)
        if v_start >= FAILED:
            results.append(None)
            continue
        # BFGS from a scaled identity: its first step moves the parameter with the largest gradient by
        # FIRST_STEP on the unconstrained scale (the default, one gradient long, can reach parameters whose
        # solves fail)
        res = minimize(fun, u_start, jac=True, method="BFGS",
                       options={"gtol": OUTER_GTOL, "maxiter": settings.max_iter,
                                "hess_inv0": np.eye(u_start.size) * FIRST_STEP / max(np.abs(g_start).max(), 1e-12)})
        # the modes at the optimum (BFGS may end on an earlier point than its last evaluation)
        value, grad, z, ok, per, *_ = value_and_grad(jnp.asarray(res.x), state["z"])
        results.append((float(value), np.asarray(res.x), np.asarray(z), np.asarray(per), np.asarray(grad), res))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    found = [r for r in results if r is not None and np.isfinite(r[0])]
    if not found:
        raise LaplaceError("no start gave a finite Laplace objective (every solve failed or the data are impossible "
                           "at the starting values); check the data, fix parameters the data cannot identify, or "
                           "start nearer the data with fixed=...")
    value, u, z, per, grad, res = min(found, key=lambda r: r[0])
    gnorm = float(np.max(np.abs(grad)))
    converged = res.success or gnorm <= CONVERGED_GTOL
    message = (f"converged: largest gradient component {gnorm:.2g} after {res.nit} BFGS iterations"
               if converged else f"not converged: {res.message.rstrip('.')} (largest gradient component {gnorm:.2g} "
                                 f"after {res.nit} iterations)")
    cov, cov_message = None, "not computed"
    if settings.covariance:
        cov, cov_message = _covariance(lambda uu: value_and_grad(jnp.asarray(uu), jnp.asarray(z)), u)
    values = {s: float(v) for s, v in ob.constrain(jnp.asarray(u)).items()}
    return LaplaceResult(values, u, z, value, per, bool(converged), message, cov, cov_message,
                         tuple(r[0] if r is not None else math.inf for r in results), ob.sites, state["n"],
                         round(compile_s, 3), round(time.perf_counter() - t0 - compile_s, 3), int(res.nit))


def _covariance(value_and_grad, u):
    """Inverse Hessian of -log L on the unconstrained scale, by central differences of the exact
    gradient (symmetrised); None with the reason when it is not positive definite."""
    hess = _hessians(lambda uu: np.asarray(value_and_grad(uu[0])[1])[None], u[None])[0]
    if not np.all(np.isfinite(hess)):
        return None, "the Hessian has non-finite entries (a solve failed next to the estimate)"
    eig = np.linalg.eigvalsh(hess)
    if eig.min() <= 0:
        return None, (f"the Hessian is not positive definite (smallest eigenvalue {eig.min():.3g}): some parameters "
                      "are not identified by these data; fix them or give priors (priors=True)")
    return np.linalg.inv(hess), f"ok (condition number {eig.max() / eig.min():.3g})"


def _hessians(gradient, u):
    """(n, P, P) Hessians at the rows of ``u`` (n, P) by central differences of ``gradient`` (rows
    in, rows out), step FD_STEP relative to each coordinate (at least FD_STEP), symmetrised."""
    n, P = u.shape
    hess = np.zeros((n, P, P))
    for k in range(P):
        step = np.zeros_like(u)
        step[:, k] = FD_STEP * np.maximum(1.0, np.abs(u[:, k]))
        hess[:, :, k] = (gradient(u + step) - gradient(u - step)) / (2 * step[:, k:k + 1])
    return 0.5 * (hess + np.swapaxes(hess, 1, 2))


# --- nested Laplace: NUTS over the population parameters alone -----------------------------------


def nested_potential(problem: FitProblem, z0, measurements=None):
    """The potential energy of the population parameters alone, for NumPyro's
    ``NUTS(potential_fn=...)``: -log p(psi | y) on the unconstrained scale u (the transforms'
    Jacobian included), every subject's random effects integrated out by the Laplace
    approximation, with the priors of ``problem``. Its gradient is the implicit-function gradient
    of :func:`build` (a custom VJP), so NUTS never differentiates the mode search. ``z0`` (S, R):
    where each subject's mode search starts at every call (a Laplace fit's modes: the posterior
    stays near them). Returns (potential (P,) -> scalar, the objective's pieces with
    ``constrain``/``unconstrain``); the potential is infinite where a solve fails."""
    ob, vg, _ = build(problem, use_priors=True)
    obs = subject_observations(problem, measurements)
    z0 = jnp.asarray(z0)

    def log_jacobian(u):
        total = 0.0
        for k, s in enumerate(ob.sites):
            t = biject_to(problem.priors[s].support)
            total = total + jnp.sum(t.log_abs_det_jacobian(u[k], t(u[k])))
        return total

    def value_and_gradient(u):
        value, grad, _, ok, *_ = vg(u, z0, obs)
        jac, jac_grad = jax.value_and_grad(log_jacobian)(u)
        return jnp.where(ok, value - jac, jnp.inf), grad - jac_grad

    @jax.custom_vjp
    def potential(u):
        return value_and_gradient(u)[0]

    def backward(grad, cotangent):
        return (cotangent * grad,)

    potential.defvjp(value_and_gradient, backward)
    return potential, ob


# --- many datasets on one design ---------------------------------------------------------------

ARMIJO = 1e-4  # sufficient decrease of a batched BFGS line-search step
BACKTRACKS = 30  # halvings of a step before a dataset's search stops


def batched_observations(problem: FitProblem, y, blq) -> dict:
    """The per-subject layout (:func:`subject_observations`) of ``len(y)`` datasets on
    ``problem``'s design, stacked: each array gains a leading dataset axis."""
    y, blq = np.asarray(y, float), np.asarray(blq, bool)
    base = {k: np.asarray(v) for k, v in subject_observations(problem).items()}
    lloq = np.asarray(problem.design.lloq, float)
    # where each record lands in the (S, M) grid: lay out the record numbers once
    index = np.asarray(subject_observations(problem, (np.arange(y.shape[1], dtype=float),
                                                      np.zeros(y.shape[1], bool), lloq))["y"])
    index = np.where(base["mask"], index, 0).astype(int)
    out = {k: jnp.asarray(np.broadcast_to(v, (y.shape[0],) + v.shape)) for k, v in base.items()}
    out["blq"] = jnp.asarray(base["mask"] & blq[:, index])
    out["y"] = jnp.asarray(np.where(base["mask"] & ~blq[:, index], y[:, index], 1.0))
    return out


def estimate_many(problem: FitProblem, y, blq, *, priors: bool = False, max_iter: int = 200,
                  covariance: bool = True, progress: bool = False, batched: bool | None = None) -> dict:
    """Laplace (FOCE-I) estimates of ``len(y)`` datasets on ``problem``'s design: ``y`` and
    ``blq`` are (datasets, N) as in :func:`carkin.batch.fit_many`. One start each, from the
    model's values.

    ``batched=True``: one compiled objective vectorised over the datasets, BFGS for each dataset
    in lockstep, each with its own line search, modes and stopping rule (for a GPU, where a
    thousand datasets cost about what one does); ``False``: :func:`estimate` on one dataset after
    another with one compile (on a 2-core CPU as quick after compiling, 10.7 against 10.9 datasets/s
    for 50 stein_2019 datasets, and compiled once whatever the number of datasets);
    ``None``: batched on an accelerator, one at a time on a CPU.

    Returns the estimate of each population site (datasets,), ``u`` (datasets, P) on the
    unconstrained scale, ``objective`` (-log L), ``converged``, ``iterations`` and, with
    ``covariance``, ``covariance`` (datasets, P, P) of ``u`` (NaN where the Hessian is not
    positive definite), with ``sites`` naming the P columns."""
    if not problem.random:
        raise InputError("method='laplace' integrates out random effects, and no parameter has variability; "
                         "give variability=(...)")
    if batched is None:
        batched = jax.default_backend() != "cpu"
    if not batched:
        return _one_at_a_time(problem, y, blq, Laplace(starts=1, priors=priors, covariance=covariance,
                                                       max_iter=max_iter), progress)
    y = np.asarray(y, float)
    n, S, R = y.shape[0], problem.design.n_subjects, len(problem.random)
    ob, vg, _ = build(problem, priors)
    over_datasets = jax.jit(jax.vmap(vg))
    obs = batched_observations(problem, y, blq)

    def evaluate(u, z):
        value, grad, z_new, ok, *_ = over_datasets(jnp.asarray(u), z, obs)
        value = np.where(np.asarray(ok), np.asarray(value), np.inf)
        return value, np.asarray(grad), z_new

    u = np.broadcast_to(np.asarray(ob.unconstrain(start_values(problem))), (n, len(ob.sites))).copy()
    z = jnp.zeros((n, S, R))
    f, g, z = evaluate(u, z)
    eye = np.eye(u.shape[1])
    first = FIRST_STEP / np.maximum(np.abs(g).max(axis=1), 1e-12)
    h_inv = eye[None] * first[:, None, None]
    active = np.isfinite(f)
    converged = active & (np.abs(g).max(axis=1) <= OUTER_GTOL)
    active &= ~converged
    iterations = np.zeros(n, int)
    bar = _progress(progress, max_iter, "Laplace BFGS iterations")
    for _ in range(max_iter):
        if not active.any():
            break
        direction = -np.einsum("dij,dj->di", h_inv, g)
        slope = np.einsum("di,di->d", g, direction)
        uphill = slope >= 0  # a lost curvature model: start again from steepest descent
        direction[uphill] = -g[uphill] * first[uphill, None]
        slope = np.einsum("di,di->d", g, direction)
        step = np.where(active, 1.0, 0.0)
        searching = active.copy()
        u_new, f_new, g_new, z_new = u.copy(), f.copy(), g.copy(), z
        for _ in range(BACKTRACKS):
            trial = u + step[:, None] * direction
            f_t, g_t, z_t = evaluate(np.where(searching[:, None], trial, u), z)
            accept = searching & (f_t <= f + ARMIJO * step * slope)
            u_new[accept], f_new[accept], g_new[accept] = trial[accept], f_t[accept], g_t[accept]
            z_new = jnp.where(jnp.asarray(accept)[:, None, None], z_t, z_new)
            searching &= ~accept
            if not searching.any():
                break
            step = np.where(searching, step * 0.5, step)
        stalled = searching  # no step lowered the objective: the search ends where it stands
        moved = active & ~stalled
        s_k, y_k = u_new - u, g_new - g
        sy = np.einsum("di,di->d", s_k, y_k)
        update = moved & (sy > 1e-12)
        rho = np.where(update, 1.0 / np.where(update, sy, 1.0), 0.0)
        left = eye[None] - rho[:, None, None] * np.einsum("di,dj->dij", s_k, y_k)
        bfgs = (np.einsum("dij,djk,dlk->dil", left, h_inv, left)
                + rho[:, None, None] * np.einsum("di,dj->dij", s_k, s_k))
        h_inv = np.where(update[:, None, None], bfgs, h_inv)
        u, f, g, z = u_new, f_new, g_new, z_new
        iterations += moved
        done = moved & (np.abs(g).max(axis=1) <= OUTER_GTOL)
        converged |= done | (stalled & (np.abs(g).max(axis=1) <= CONVERGED_GTOL))
        active &= ~(done | stalled)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=int(active.sum()), refresh=False)
    if bar is not None:
        bar.close()
    out = {s: np.asarray(jax.vmap(ob.constrain)(jnp.asarray(u))[s]) for s in ob.sites}
    out.update(u=u, objective=f, converged=converged, iterations=iterations, sites=ob.sites)
    if covariance:
        out["covariance"] = _covariance_many(lambda uu: evaluate(uu, z)[1], u)
    return out


def _one_at_a_time(problem: FitProblem, y, blq, settings: Laplace, progress: bool) -> dict:
    """:func:`estimate_many`'s result from :func:`estimate` on each dataset in turn (one compile)."""
    compiled = build(problem, settings.priors)
    lloq = problem.design.lloq
    results = []
    bar = _progress(progress, len(y), "Laplace fits")
    for yy, bb in zip(np.asarray(y, float), np.asarray(blq, bool)):
        results.append(estimate(problem, settings, progress=False, measurements=(yy, bb, lloq), compiled=compiled))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    sites = compiled[0].sites
    out = {s: np.array([r.values[s] for r in results]) for s in sites}
    P = len(sites)
    out.update(u=np.stack([r.u for r in results]), objective=np.array([r.objective for r in results]),
               converged=np.array([r.converged for r in results]),
               iterations=np.array([r.iterations for r in results]), sites=sites)
    if settings.covariance:
        out["covariance"] = np.stack([r.covariance if r.covariance is not None else np.full((P, P), np.nan)
                                      for r in results])
    return out


def _covariance_many(gradient, u):
    """:func:`_covariance` for every dataset at once; NaN where the Hessian is not finite or not
    positive definite."""
    P = u.shape[1]
    hess = _hessians(gradient, u)
    good = np.all(np.isfinite(hess), axis=(1, 2))
    hess[~good] = np.eye(P)
    good &= np.linalg.eigvalsh(hess)[:, 0] > 0
    cov = np.linalg.inv(np.where(good[:, None, None], hess, np.eye(P)))
    return np.where(good[:, None, None], cov, np.nan)


def _progress(progress: bool, total: int, label: str):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=label, leave=False)


# --- residuals and the DataTree ------------------------------------------------------------------


def cwres(problem: FitProblem, values: dict, z, measurements=None) -> np.ndarray:
    """Conditional weighted residuals (FOCE linearisation at each subject's mode) of every record, in
    the design's record order; NaN for BLQ records, which have no measured value.

    On the error model's scale (log for log-additive): the subject's measured records are
    centred on c(z*) - G z* (G = dc/dz at the mode: the model linearised around the mode and
    evaluated at z = 0) with covariance G G' + diag(s^2), and whitened by its Cholesky factor.
    ``measurements`` = (y, blq, lloq) on the problem's design replaces its own."""
    free = np.array([problem.model.parameter_names.index(n) for n in problem.estimated], int)
    ob = _Objective(problem, tuple(problem.priors), free)
    obs = subject_observations(problem, measurements)
    params = {k: jnp.asarray(v) for k, v in values.items()}

    def centre_sd(pred, o):
        def one(err, sigma, add):
            c, sd = err.scale(jnp.maximum(pred, PREDICTION_FLOOR), sigma, add)
            return c, sd, err.g(jnp.where(o["blq"], 1.0, o["y"]))

        return by_observable(problem, o["kind"], one, params)

    def one(zz, local, o):
        centre = lambda z1: centre_sd(ob.record_predictions(params, z1, local, o), o)[0]  # noqa: E731
        c, sd, g_y = centre_sd(ob.record_predictions(params, zz, local, o), o)
        measured = o["mask"] & ~o["blq"]
        G = jnp.where(measured[:, None], jax.jacfwd(centre)(zz), 0.0)
        r = jnp.where(measured, g_y - (c - G @ zz), 0.0)
        cov = G @ G.T + jnp.diag(jnp.where(measured, sd**2, 1.0))
        w = jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(cov), r, lower=True)
        return jnp.where(measured, w, jnp.nan)

    @jax.jit
    def run(z):
        theta = ob.theta(params, z)
        f, _, jac, hess = ob.taylor(theta, 1)
        return jax.vmap(one)(z, (theta, f, jac, hess), obs)

    grid = np.asarray(run(jnp.asarray(z)))
    return _records(problem, grid)


def _records(problem: FitProblem, grid: np.ndarray) -> np.ndarray:
    """(S, M) per-subject values (as subject_observations lays them out) back in the design's record order."""
    d = problem.design
    order = np.argsort(d.obs_subject, kind="stable")
    counts = np.bincount(d.obs_subject, minlength=d.n_subjects)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    subj = d.obs_subject[order]
    out = np.empty(d.y.size)
    out[order] = grid[subj, np.arange(d.y.size) - first[subj]]
    return out


def switch_with_variability(problem: FitProblem) -> list[str]:
    """Parameters with variability that move the model's switch time (Stein's Tmax): with them the
    Laplace objective has kinks wherever a subject's switch meets one of its observation times."""
    model = problem.model
    if not model.has_switch:
        return []
    base = dict(model.values)
    t0 = float(model.switch_time(base))
    return [n for n in problem.random if float(model.switch_time({**base, n: base[n] * 1.01})) != t0]


def laplace_tree(problem: FitProblem, data, result: LaplaceResult, settings: dict, key):
    """The fit's DataTree: the usual groups with the estimates as a single draw (so predictions,
    plots, VPCs and what-ifs read it as they read a sampled fit), CWRES beside IPRED, and a
    ``laplace`` group with the estimates table, the correlation matrix and the objective."""
    import xarray as xr

    from carkin.fitting.diagnostics import shrinkage
    from carkin.fitting.fit_results import to_datatree

    draws = {s: np.array([[result.values[s]]]) for s in result.sites}
    if problem.random:
        draws[Z_SITE] = result.z[None, None]
    res = cwres(problem, result.values, result.z)
    extra = {"cwres": (res[None, None], {"units": "1", "long_name": "conditional weighted residual (FOCE-I)"})}
    tree = to_datatree(problem, data, draws, None, settings, key, extra_posterior=extra)

    sites = list(result.sites)
    u = np.asarray(result.u)
    transforms = [biject_to(problem.priors[s].support) for s in sites]
    slope = np.array([float(jax.grad(lambda x, t=t: t(x))(jnp.asarray(v))) for t, v in zip(transforms, u)])
    if result.covariance is not None:
        se_u = np.sqrt(np.diag(result.covariance))
        corr = result.covariance / np.outer(se_u, se_u)
    else:
        se_u, corr = np.full(len(sites), np.nan), np.full((len(sites), len(sites)), np.nan)
    est = np.array([result.values[s] for s in sites])
    se = np.abs(slope) * se_u
    lower = np.array([float(t(jnp.asarray(a))) for t, a in zip(transforms, u - WALD_Z * se_u)])
    upper = np.array([float(t(jnp.asarray(a))) for t, a in zip(transforms, u + WALD_Z * se_u)])
    shrink = shrinkage(tree)
    meta = [problem.site_meta.get(s, ("", s)) for s in sites]
    n_obs = int(problem.design.y.size)
    ofv = float(2.0 * np.sum(result.per_subject))
    table = xr.Dataset(
        {"estimate": ("parameter", est, {"long_name": "estimate"}),
         "se": ("parameter", se, {"long_name": "standard error (delta method from the unconstrained scale)"}),
         "rse": ("parameter", 100 * se / np.abs(est), {"units": "%", "long_name": "relative standard error"}),
         "lower": ("parameter", lower, {"long_name": "95% Wald interval, lower (on the unconstrained scale)"}),
         "upper": ("parameter", upper, {"long_name": "95% Wald interval, upper (on the unconstrained scale)"}),
         "shrinkage": ("parameter", [shrink.get(parameter_of_omega(s) or "", np.nan) for s in sites],
                       {"units": "1", "long_name": "eta-shrinkage (1 - SD of the modes / omega)"}),
         "correlation": (("parameter", "parameter_b"), corr, {"long_name": "correlation of the estimates "
                                                                          "(unconstrained scale)"})},
        coords={"parameter": sites, "parameter_b": sites,
                "units": ("parameter", [m[0] for m in meta]), "description": ("parameter", [m[1] for m in meta])})
    table.attrs.update(
        approximation="Laplace with the FOCE-I information matrix (first-order conditional estimation with "
                      "interaction)",
        ofv=ofv, ofv_convention="-2 log-likelihood of the measurements in their own units, every constant included "
                                "(a log-additive record's density is log-normal, so it holds -log y; NONMEM's OFV "
                                f"of log-transformed data leaves out n log(2 pi) = {n_obs * LOG_2PI:.3f} and the "
                                "log y terms)",
        n_observations=n_obs, objective=float(result.objective), converged=int(result.converged),
        convergence=result.message, covariance_step=result.covariance_message,
        starts=json.dumps([None if not math.isfinite(v) else round(v, 6) for v in result.starts]),
        n_evaluations=result.n_evaluations)
    tree["laplace"] = xr.DataTree(table)
    return tree


WALD_Z = 1.959963984540054  # two-sided 95% normal quantile

__all__ = ["Laplace", "LaplaceError", "LaplaceResult", "build", "cwres", "estimate",
           "laplace_tree", "start_values", "switch_with_variability"]
