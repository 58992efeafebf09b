"""Predictions of a fit: each subject's observables at its observation times, batched over subjects,
with an ODE solve's gradient in forward mode when few parameters are estimated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from carkin.model.kinetics import Model
from carkin.simulation.ensemble import LANE_MULTIPLE, observe_subjects, solve_ensemble
from carkin.simulation.solve import solve_subject

FIT_ENGINES = ("auto", "ensemble", "diffrax")
# Samples lie days apart, so a step seldom spans two: the solver interpolates one output time per
# iteration instead of four (cd7_cart's gradient on data/cd7_sim.csv 25% quicker, the same steps)
FIT_SAVES_PER_STEP = 1

# --- predictions -------------------------------------------------------------------------------


def subject_observables(model: Model, names, times, dose_t, dose_c, theta, cov, adjoint=None):
    """Observables ``names`` of one subject at ``times``: (len(names), len(times)), and an ok flag.
    ``adjoint``: how an ODE solve is differentiated (carkin.solve.solve_subject)."""
    p = dict(zip(model.parameter_names, theta))
    c = dict(zip((cv.name for cv in model.covariates), cov))
    if model.has_closed_form:
        out, ok = model.closed_form_observables(times, p, c, dose_t, dose_c), True
    else:
        ys, ok, _ = solve_subject(model, times, dose_t, dose_c, p, c, adjoint=adjoint)
        out = model.observe(ys, p, c)
    f = jnp.stack([out[n] for n in names])
    return f, ok & jnp.all(jnp.isfinite(f))


def predict_grid(model: Model, names, times, dose_t, dose_c, theta, cov, free=None, engine: str = "auto"):
    """Batched :func:`subject_observables`: leading subject axis on every argument but ``names``.

    ``free`` (indices into the model's parameters) are the only parameters gradients are taken
    with respect to; ODE solves are then differentiated in forward mode over them. None: reverse
    mode through the solve (diffrax's adjoint). ``engine``: with ``free`` given, ``"auto"`` and
    ``"ensemble"`` solve all subjects at once with the ensemble solver (:func:`_ensemble_observables`;
    the cd7_cart log density's value with gradient measured 3.5x quicker than with diffrax,
    benchmarks/README.md), ``"diffrax"`` solves each subject with diffrax
    (:func:`_forward_mode_observables`). Reverse mode (``free`` None) always uses diffrax."""
    if engine not in FIT_ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {', '.join(FIT_ENGINES)}")
    args = jax.tree.map(jnp.asarray, (times, dose_t, dose_c, theta, cov))  # custom_vjp takes JAX arrays only
    if free is not None and not model.has_closed_form and engine != "diffrax":
        return _ensemble_observables(model, names, tuple(int(i) for i in free))(*args)
    one = lambda *a: subject_observables(model, names, *a)  # noqa: E731
    if free is not None and not model.has_closed_form:
        one = _forward_mode_observables(model, names, tuple(int(i) for i in free))
    return jax.vmap(one)(*args)


def _ensemble_observables(model: Model, names, free: tuple):
    """Every subject's observables from one ensemble solve (a lane per subject), with a custom VJP
    computed in forward mode: one tangent per parameter in ``free``, moving that parameter of every
    subject at once (subjects are independent, so each subject's tangent is its own derivative)."""
    idx = np.asarray(free, int)

    def solve(times, dose_t, dose_c, theta, cov):
        f, ok = ensemble_observables(model, names, times, dose_t, dose_c, theta, cov, free=free)
        return f, ok.astype(theta.dtype)

    return _forward_mode_vjp(solve, idx)


def ensemble_observables(model: Model, names, times, dose_t, dose_c, theta, cov, free=None):
    """Observables ``names`` of every subject (S, O, T) from one ensemble solve (a lane per subject),
    and each subject's ok flag (S,). Pure JAX: forward-mode derivatives of any order pass through the
    solve, with respect to the parameters ``free`` (indices; None: all) only (solve_ensemble)."""
    lanes = -(-theta.shape[0] // LANE_MULTIPLE) * LANE_MULTIPLE
    ys, ok, _ = solve_ensemble(model, times, dose_t, dose_c, theta, cov, lanes=lanes, free=free,
                               saves_per_step=FIT_SAVES_PER_STEP, refill=False)
    obs = observe_subjects(model, ys, theta, cov)
    f = jnp.stack([obs[n] for n in names], axis=1)
    return f, ok & jnp.all(jnp.isfinite(f), axis=(1, 2))


def _forward_mode_observables(model: Model, names, free: tuple):
    """:func:`subject_observables` whose reverse-mode gradient is computed in forward mode: the
    solve carries one tangent per parameter in ``free`` (a few, in a population fit), and the
    gradient is the Jacobian's product with the cotangent. With few parameters this costs no more
    than reverse mode's checkpointed sweep back through the solver, and it compiles in about half
    the time (benchmarks/README.md)."""
    import diffrax as dfx

    idx = np.asarray(free, int)

    def solve(times, dose_t, dose_c, theta, cov):
        f, ok = subject_observables(model, names, times, dose_t, dose_c, theta, cov, adjoint=dfx.ForwardMode())
        return f, ok.astype(theta.dtype)  # a float flag: custom_vjp outputs need cotangents

    return _forward_mode_vjp(solve, idx)


def _forward_mode_vjp(solve, idx: np.ndarray):
    """``solve(times, dose_t, dose_c, theta, cov) -> (f, ok as a float)`` with a custom VJP computed in
    forward mode: one tangent per parameter index in ``idx``, added to that parameter of every subject
    ``theta`` holds (one subject (P,), or several (S, P), which are independent, so each subject's
    tangent is its own derivative); the gradient is the Jacobian's product with the cotangent."""

    @jax.custom_vjp
    def observables(times, dose_t, dose_c, theta, cov):
        return solve(times, dose_t, dose_c, theta, cov)

    def forward(times, dose_t, dose_c, theta, cov):
        def at(shift):
            out = solve(times, dose_t, dose_c, theta.at[..., idx].add(shift), cov)
            return out[0], out

        jac, out = jax.jacfwd(at, has_aux=True)(jnp.zeros(idx.size, theta.dtype))  # (..., O, T, K)
        return out, (jac, theta, times, dose_t, dose_c, cov)

    def backward(res, ct):
        jac, theta, times, dose_t, dose_c, cov = res
        g = jnp.zeros_like(theta).at[..., idx].set(jnp.einsum("...ot,...otk->...k", ct[0], jac))
        # the design (times, doses, covariates) is data: no gradient flows to it
        return (jnp.zeros_like(times), jnp.zeros_like(dose_t), jnp.zeros_like(dose_c), g, jnp.zeros_like(cov))

    observables.defvjp(forward, backward)

    def run(times, dose_t, dose_c, theta, cov):
        f, ok = observables(times, dose_t, dose_c, theta, cov)
        return f, ok > 0.5

    return run
