"""Predictions of a fit: each subject's observables at its observation times, batched over subjects,
with an ODE solve's gradient in forward mode when few parameters are estimated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from carkin.model.kinetics import Model
from carkin.simulation.solve import solve_subject

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


def predict_grid(model: Model, names, times, dose_t, dose_c, theta, cov, free=None):
    """Batched :func:`subject_observables`: leading subject axis on every argument but ``names``.

    ``free`` (indices into the model's parameters) are the only parameters gradients are taken
    with respect to; ODE solves are then differentiated in forward mode over them (see
    :func:`_forward_mode_observables`). None: reverse mode through the solve."""
    one = lambda *a: subject_observables(model, names, *a)  # noqa: E731
    if free is not None and not model.has_closed_form:
        one = _forward_mode_observables(model, names, tuple(int(i) for i in free))
    args = jax.tree.map(jnp.asarray, (times, dose_t, dose_c, theta, cov))  # custom_vjp takes JAX arrays only
    return jax.vmap(one)(*args)


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

    @jax.custom_vjp
    def observables(times, dose_t, dose_c, theta, cov):
        return solve(times, dose_t, dose_c, theta, cov)

    def forward(times, dose_t, dose_c, theta, cov):
        def at(sub):
            out = solve(times, dose_t, dose_c, theta.at[idx].set(sub), cov)
            return out[0], out

        jac, out = jax.jacfwd(at, has_aux=True)(theta[idx])  # jac: (K, T, len(free))
        return out, (jac, theta, times, dose_t, dose_c, cov)

    def backward(res, ct):
        jac, theta, times, dose_t, dose_c, cov = res
        g = jnp.zeros_like(theta).at[idx].set(jnp.einsum("kt,ktf->f", ct[0], jac))
        # the design (times, doses, covariates) is data: no gradient flows to it
        return (jnp.zeros_like(times), jnp.zeros_like(dose_t), jnp.zeros_like(dose_c), g, jnp.zeros_like(cov))

    observables.defvjp(forward, backward)

    def one(times, dose_t, dose_c, theta, cov):
        f, ok = observables(times, dose_t, dose_c, theta, cov)
        return f, ok > 0.5

    return one
