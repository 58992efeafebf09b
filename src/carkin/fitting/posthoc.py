"""Individual estimates: each subject's maximum a posteriori random effects given the
population parameters (NONMEM's POSTHOC / empirical Bayes estimates), for any number of
subjects at once.

For subject i with standardised random effects z_i (eta = omega * z), the estimate
maximises

    log p(y_i | theta_i(z_i)) - |z_i|^2 / 2

with the same likelihood as the population fit (error models, BLQ by M3). Every subject
is its own small optimisation (damped Newton, the best of a few starts); blocks of subjects are solved together,
vectorised, and split over every device, so 10^5 subjects take one compiled program.
"""

from __future__ import annotations

import time
import warnings

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from carkin.errors import InputError
from carkin.fitting.convergence import population_sites
from carkin.fitting.fit_problem import FitProblem
from carkin.fitting.predictions import subject_observables
from carkin.fitting.sampling import over_devices
from carkin.model.population import eta_variable, individual_variable, omega_site

BLOCK_PER_DEVICE = 256  # subjects optimised together on each device per call
GTOL = 1e-6  # gradient norm (in z units) at which a subject's optimisation has converged
MAX_ITER = 200  # Newton iterations per start; kinks at Tmax take some (each stall is about 15)
ENSEMBLE_MAX_SUBJECTS = 4096  # ODE models: all subjects in one ensemble solve up to this many (engine="auto")
STARTS = 8  # optimisations per subject (z = 0, then fixed prior draws); the best is kept
START_SEED = 0


class PosthocWarning(UserWarning):
    """Some subjects' optimisations did not converge."""


def population_estimates(tree: xr.DataTree) -> dict:
    """Posterior medians of a fit's population parameters (typical values, omegas,
    covariate coefficients, residual errors): a starting point for individual estimates."""
    post = tree["posterior"].to_dataset()
    return {s: float(post[s].median()) for s in population_sites(tree)}


def _per_subject_observations(problem: FitProblem):
    """The flat observation arrays regrouped as (S, M) per subject, padded, with a mask."""
    d = problem.design
    S, N = d.n_subjects, d.y.size
    order = np.argsort(d.obs_subject, kind="stable")
    counts = np.bincount(d.obs_subject, minlength=S)
    M = max(1, int(counts.max(initial=0)))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    subj = d.obs_subject[order]
    slot = np.arange(N) - first[subj]

    def grid(values, fill, dtype):
        out = np.full((S, M), fill, dtype=dtype)
        out[subj, slot] = values[order]
        return out

    y = np.where(d.blq, 1.0, d.y)
    return dict(tindex=grid(d.obs_tindex, 0, np.int32), kind=grid(d.obs_kind, 0, np.int32),
                y=grid(y, 1.0, float), blq=grid(d.blq, False, bool), lloq=grid(d.lloq, 1.0, float),
                mask=grid(np.ones(N, bool), False, bool))


def individual_estimates(problem: FitProblem, population: dict, *, starts: int = STARTS, max_iter: int = MAX_ITER,
                         gtol: float = GTOL, progress: bool | None = None, engine: str = "auto") -> xr.Dataset:
    """MAP random effects and individual parameters of every subject in ``problem``'s data.

    ``population``: site name -> value for every population parameter of the problem
    (typical values, ``omega_*``, covariate coefficients, ``sigma_*``), e.g.
    :func:`population_estimates` of a fit. Returns a Dataset over ``subject`` with
    ``eta_<p>`` and ``ind_<p>`` for each parameter with variability, the objective
    (-log posterior up to a constant), ``converged`` and ``iterations`` (summed over the
    ``starts`` optimisations of each subject: z = 0 and fixed prior draws; the best is kept); the
    attributes hold the eta-shrinkage of each parameter (1 - SD(eta) / omega).
    Subjects whose optimisation fails are named in a PosthocWarning and marked
    ``converged = False``.

    ``engine``: how an ODE model's subjects are solved. ``"ensemble"``: all subjects at once in
    the ensemble engine, Newton steps on its second-order forward derivatives (the Laplace fit's
    mode search, carkin.fitting.laplace; ``iterations`` then counts the shared Newton loop);
    ``"diffrax"``: a vectorised diffrax solve per subject (``max_iter`` and ``gtol`` apply here);
    ``"auto"``: the ensemble for ODE models up to ENSEMBLE_MAX_SUBJECTS subjects (measured some 100x
    quicker on cd7_cart, benchmarks/README.md), diffrax above that (blocks over devices) and
    for closed forms.
    """
    if engine not in ("auto", "ensemble", "diffrax"):
        raise InputError(f"engine must be 'auto', 'ensemble' or 'diffrax', got {engine!r}")
    if int(starts) < 1:
        raise InputError(f"starts must be >= 1, got {starts}")
    if not problem.random:
        raise InputError("no parameter has between-subject variability, so there are no random effects to estimate; "
                         "give variability=(...) when building the problem")
    sites = [s for s in problem.priors]
    missing = sorted(set(sites) - set(population))
    if missing:
        raise InputError(f"population values missing for {missing}; give every one of {sites}")
    params = {s: jnp.asarray(float(population[s])) for s in sites}
    for name in problem.random:
        if not float(population[omega_site(name)]) > 0:
            raise InputError(f"{omega_site(name)} must be > 0 to estimate random effects of {name}, "
                             f"got {population[omega_site(name)]}")
    d = problem.design
    obs = _per_subject_observations(problem)
    model, names, R = problem.model, d.observables, len(problem.random)

    # An ODE solve is differentiated in forward mode: diffrax's checkpointed reverse mode admits no
    # derivative on top of it (the Hessian), and a subject has only a few random effects.
    adjoint = None if model.has_closed_form else dfx.ForwardMode()

    def neg_log_posterior(z, s):
        theta = problem.subject_parameters(params, s["x"], z)
        f, ok = subject_observables(model, names, s["times"], s["dose_t"], s["dose_c"], theta, s["cov"],
                                    adjoint=adjoint)
        pred = f[s["kind"], s["tindex"]]
        ll = problem.pointwise_log_likelihood(params, pred, (s["y"], s["blq"], s["lloq"]), kind=s["kind"])
        value = -(jnp.sum(jnp.where(s["mask"], ll, 0.0)) - 0.5 * jnp.sum(z**2))
        return jnp.where(ok, value, jnp.inf)

    # z = 0 and starts - 1 fixed draws from the prior: the per-subject posterior can have several
    # modes (a kink at Tmax makes local minima), so the best of a few starts is kept.
    z0 = jnp.concatenate([jnp.zeros((1, R)), jax.random.normal(jax.random.PRNGKey(START_SEED), (starts - 1, R))])

    def solve_one(s):
        x, f, ok, it = jax.vmap(lambda z: _damped_newton(lambda zz: neg_log_posterior(zz, s), z, max_iter, gtol,
                                                         forward=adjoint is not None))(z0)
        best = jnp.argmin(jnp.where(ok, f, jnp.inf))
        return x[best], f[best], ok[best], it.sum()

    per_subject = dict(x=np.asarray(problem.x, float).reshape(d.n_subjects, -1), times=d.times,
                       dose_t=d.dose_times, dose_c=d.dose_cells, cov=d.model_covariates, **obs)
    t0 = time.perf_counter()
    use_ensemble = not model.has_closed_form and (
        engine == "ensemble" or (engine == "auto" and d.n_subjects <= ENSEMBLE_MAX_SUBJECTS))
    if use_ensemble:
        (z, fun, ok, nit), compile_s = _ensemble_modes(problem, params, np.asarray(z0), gtol)
    else:
        (z, fun, ok, nit), compile_s = _blocks(solve_one, per_subject, d.n_subjects, jax.local_device_count(),
                                               progress)
    run_s = time.perf_counter() - t0 - compile_s
    theta = np.asarray(jax.jit(lambda x, z: problem.population.individual(params, z, x))(per_subject["x"], z))
    ds = _as_dataset(problem, params, z, fun, ok, nit, theta)
    ds.attrs.update(compile_s=round(compile_s, 3), run_s=round(run_s, 3),
                    devices=1 if use_ensemble else jax.local_device_count(),  # the ensemble runs on one device
                    engine="ensemble" if use_ensemble else ("closed form" if model.has_closed_form else "diffrax"))
    return ds


def _ensemble_modes(problem: FitProblem, params: dict, starts_z: np.ndarray, gtol: float):
    """Every subject's mode from each start by the Laplace fit's mode search (all subjects in one
    ensemble solve per Newton step); the best start per subject is kept. Returns ((z, objective,
    converged, iterations), compile seconds): converged where the solve is ok and the gradient is
    below ``gtol`` or the Newton decrement below the mode search's own (an ODE solve's noise floor)."""
    from carkin.fitting import laplace

    _, _, inner = laplace.build(problem)
    obs = laplace.subject_observations(problem)
    found = jax.jit(lambda g, h: laplace.mode_found(g, h, gtol))

    S = problem.design.n_subjects
    z_best, f_best, ok_best = np.zeros((S, starts_z.shape[1])), np.full(S, np.inf), np.zeros(S, bool)
    iterations, compile_s, t0 = 0, 0.0, time.perf_counter()
    for k, start in enumerate(starts_z):
        z, _, value, g, h, it = inner(params, jnp.broadcast_to(jnp.asarray(start), (S, start.size)), obs)
        value = np.asarray(value)  # infinite where a solve failed
        flat = np.isfinite(value) & np.asarray(found(g, h))
        if k == 0:
            compile_s = time.perf_counter() - t0
        better = value < f_best
        z_best[better], f_best[better] = np.asarray(z)[better], value[better]
        ok_best[better] = flat[better]
        iterations += int(it)
    return (z_best, f_best, ok_best, np.full(S, iterations)), compile_s


def _solve(a, b):
    """``a x = b`` by Gaussian elimination with partial pivoting, in plain array operations.

    For the few random effects of a subject this is as fast as LAPACK, and it avoids the
    batched LAPACK call, which stalled when several CPU devices ran it at once."""
    n = b.size
    m = jnp.concatenate([a, b[:, None]], axis=1)
    rows = jnp.arange(n)
    for k in range(n):
        p = jnp.argmax(jnp.where(rows >= k, jnp.abs(m[:, k]), -1.0))
        rk, rp = m[k], m[p]
        m = m.at[k].set(rp).at[p].set(rk)
        factor = jnp.where(rows > k, m[:, k] / m[k, k], 0.0)
        m = m - factor[:, None] * m[k][None, :]
    x = jnp.zeros(n)
    for k in reversed(range(n)):
        x = x.at[k].set((m[k, n] - jnp.dot(m[k, :n], x)) / m[k, k])
    return x


MAX_HOLDS = 3  # kinks met per optimisation before a stall counts as the minimum


def _damped_newton(fun, x0, max_iter: int, gtol: float, forward: bool = False):
    """Minimise ``fun`` by Newton steps damped Levenberg-Marquardt style: a step that does not
    lower ``fun`` (or leaves its domain) is retried shorter and closer to steepest descent.
    With a handful of random effects the exact Hessian is cheap and the steps robust where a
    line search is not (kinks at Tmax, overflow far from the optimum).

    At a kink (Tmax on a sampling day) every step that moves the kinked coordinate fails,
    however short, while the others may still have far to go. On such a stall the coordinate
    with the largest gradient is held where it is and the rest are optimised; once they
    converge every coordinate is freed again (at most MAX_HOLDS times), so a held coordinate
    can still leave a kink that only looked like a minimum from where it was met.
    ``forward``: gradient and Hessian in forward mode only (for ``fun`` that admit no reverse mode).
    Returns (x, fun(x), converged, iterations)."""
    n = x0.size

    def value_twice(x):
        f = fun(x)
        return f, f  # differentiated, and kept as it is

    def gradient(x):
        g, f = jax.jacfwd(value_twice, has_aux=True)(x)
        return g, (f, g)

    def evaluate(x):
        if forward:  # one evaluation of fun carrying n x n tangents: value, gradient and Hessian
            h, (f, g) = jax.jacfwd(gradient, has_aux=True)(x)
            return f, g, h
        f, g = jax.value_and_grad(fun)(x)
        return f, g, jax.hessian(fun)(x)

    def stalled(lam):
        return lam >= 1e12

    def flat(g, free):
        return jnp.max(jnp.abs(g * free)) <= gtol

    def not_done(st):
        x, f, g, h, lam, free, holds, it = st
        all_free = free.sum() == n
        finished = (flat(g, free) & all_free) | (stalled(lam) & (holds >= MAX_HOLDS))
        return (it < max_iter) & ~finished & jnp.isfinite(f)

    def step(st):
        x, f, g, h, lam, free, holds, it = st
        hold = stalled(lam)  # hold the coordinate that pulls hardest (the kink)
        release = flat(g, free) & ~hold  # the others have converged: free every coordinate again
        free = jnp.where(hold, free * (jnp.arange(n) != jnp.argmax(jnp.abs(g * free))), free)
        free = jnp.where(release, jnp.ones(n), free)
        holds = holds + hold
        lam = jnp.where(hold | release, 1e-3, lam)
        hm = h * free[:, None] * free[None, :] + jnp.diag(1.0 - free)
        d = _solve(hm + lam * (jnp.abs(jnp.diag(hm)).max() + 1.0) * jnp.eye(n), -g * free) * free
        f_new, g_new, h_new = evaluate(x + d)
        better = jnp.isfinite(f_new) & jnp.all(jnp.isfinite(g_new)) & (f_new <= f)
        pick = lambda a, b: jnp.where(better, a, b)  # noqa: E731
        return (pick(x + d, x), pick(f_new, f), pick(g_new, g), pick(h_new, h),
                jnp.where(better, lam * 0.1, lam * 10.0), free, holds, it + 1)

    f0, g0, h0 = evaluate(x0)
    x, f, g, _, lam, free, _, it = jax.lax.while_loop(
        not_done, step, (x0, f0, g0, h0, jnp.asarray(1e-3), jnp.ones(n), 0, 0))
    # Converged: the gradient vanishes, or no step, however short, lowers the objective any more
    # (a minimum at a kink, where the gradient need not vanish).
    converged = jnp.isfinite(f) & ((flat(g, free) & (free.sum() == n)) | stalled(lam))
    return x, f, converged, it


def _blocks(solve_one, per_subject: dict, n: int, n_dev: int, progress):
    """Run ``solve_one`` over all ``n`` subjects in fixed-size blocks (one compiled shape),
    each block split over ``n_dev`` devices."""
    per_device = min(BLOCK_PER_DEVICE, 1 << max(0, (-(-n // n_dev) - 1).bit_length()))
    block = per_device * n_dev
    program = over_devices(jax.vmap(solve_one), n_dev, "subjects")
    starts = range(0, n, block)
    if progress is None:
        progress = len(starts) > 4
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="individual estimates", unit="block")
    parts, compiled, compile_s = [], None, 0.0
    for start in starts:
        idx = np.minimum(np.arange(start, start + block), n - 1)  # the last block repeats its last subject
        args = {k: v[idx] for k, v in per_subject.items()}
        if compiled is None:
            t0 = time.perf_counter()
            compiled = program.lower(args).compile()
            compile_s = time.perf_counter() - t0
        out = compiled(args)
        parts.append([np.asarray(o)[: min(block, n - start)] for o in out])
    return [np.concatenate(p) for p in zip(*parts)], compile_s


def _as_dataset(problem: FitProblem, params, z, fun, ok, nit, theta) -> xr.Dataset:
    model = problem.model
    ids = np.array([str(i) for i in problem.design.ids]) if problem.design.ids else np.arange(len(z))
    out = {}
    for r, name in enumerate(problem.random):
        p = model.parameter(name)
        out[eta_variable(name)] = ("subject", float(params[omega_site(name)]) * z[:, r],
                              {"units": "1", "long_name": f"MAP random effect of {name} (omega * z)"})
        j = model.parameter_names.index(name)
        out[individual_variable(name)] = ("subject", theta[:, j],
                                          {"units": p.unit, "long_name": f"individual {p.description} at the MAP"})
    out["objective"] = ("subject", fun, {"units": "1", "long_name": "-log posterior at the MAP (up to a constant)"})
    out["converged"] = ("subject", ok, {"units": "1", "long_name": "optimisation converged"})
    out["iterations"] = ("subject", nit, {"units": "1", "long_name": "Newton iterations, all starts"})
    ds = xr.Dataset(out, coords={"subject": ids})
    for name in problem.random:
        eta = ds[eta_variable(name)].values[ok]
        omega = float(params[omega_site(name)])
        ds.attrs[f"shrinkage_{name}"] = float(1.0 - np.std(eta) / omega) if eta.size > 1 else float("nan")
    failed = ~ok
    if failed.any():
        shown = ", ".join(str(i) for i in ids[failed][:10])
        warnings.warn(f"the individual estimate did not converge for {failed.sum()} of {ok.size} subject(s) ({shown}"
                      f"{', ...' if failed.sum() > 10 else ''}); their values are the last iterate. Check these "
                      "subjects' data, or raise max_iter", PosthocWarning, stacklevel=3)
    return ds
