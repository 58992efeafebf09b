"""Piecewise ODE solve of one subject: integrate between events, apply jumps at events.

Events are infusions (a jump in the model's dose state) and, for models that
have one, a regime switch at a parameter-valued time (Stein's Tmax). Between
events the vector field is smooth, so the adaptive solver never steps across a
discontinuity and gradients with respect to event times stay exact.

Convention at an event time: the value reported is the one *after* the event
(the post-dose value; for Stein, the value just after the switch, which is
continuous anyway). This is NONMEM's order for a dose record before an
observation at the same time.

Before the first infusion the subject is at baseline (``Model.baseline_state``): output
times before it are reported at that state and never shift the start of integration,
which begins at the first infusion. A parameter-valued switch (Stein's Tmax) counts from
the first infusion.

Everything here is pure JAX for one subject; ``vmap`` it over subjects.
"""

from __future__ import annotations

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np

from carkin.errors import InputError
from carkin.model.kinetics import Model

_SOLVERS = {"Tsit5": dfx.Tsit5, "Dopri5": dfx.Dopri5, "Dopri8": dfx.Dopri8, "Kvaerno5": dfx.Kvaerno5}


# Relative tolerances outside this range are either below float64 resolution or too
# loose for any reported digit to mean something.
RTOL_RANGE = (1e-14, 1e-2)


def check_tolerances(rtol, atol) -> None:
    """Refuse tolerances a solve cannot honour (None means the model's own setting)."""
    if rtol is not None:
        lo, hi = RTOL_RANGE
        if not (isinstance(rtol, (int, float)) and np.isfinite(rtol) and lo <= rtol <= hi):
            raise InputError(f"rtol={rtol!r} is outside [{lo:g}, {hi:g}] (relative tolerance, 1); "
                             "give a value such as 1e-6, or leave it out for the model's setting")
    if atol is not None:
        if not (isinstance(atol, (int, float)) and np.isfinite(atol) and atol > 0):
            raise InputError(f"atol={atol!r} must be a finite number > 0 (absolute tolerance, in each "
                             "state's unit); give a value such as 1e-8, or leave it out for the model's setting")


def solver_for(model: Model, rtol: float | None = None, atol: float | None = None):
    s = model.solver
    return (
        _SOLVERS[s.solver](),
        dfx.PIDController(rtol=s.rtol if rtol is None else rtol, atol=s.atol if atol is None else atol),
    )


def event_table(model: Model, dose_times, dose_cells, p: dict, cov: dict):
    """One subject's events sorted by time, infusions before the switch at equal times: times,
    dose-state increments and kinds (0 infusion, 1 the model's switch, ``switch_time`` after the
    first infusion)."""
    ev_t = dose_times
    ev_amt = dose_cells * (model.cells_to_state(p, cov) if model.dose_index is not None else 0.0)
    ev_kind = jnp.zeros(ev_t.shape, jnp.int32)
    if model.has_switch:
        ev_t = jnp.append(ev_t, jnp.min(dose_times) + jnp.asarray(model.switch_time(p), dose_times.dtype))
        ev_amt = jnp.append(ev_amt, 0.0)
        ev_kind = jnp.append(ev_kind, 1)
    order = jnp.lexsort((ev_kind, ev_t))
    return ev_t[order], ev_amt[order], ev_kind[order]


def solve_subject(
    model: Model,
    times: jnp.ndarray,
    dose_times: jnp.ndarray,
    dose_cells: jnp.ndarray,
    p: dict,
    cov: dict,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    adjoint=None,
):
    """States at ``times`` for one subject.

    Returns ``(ys, ok, n_steps)``: ``ys`` has shape (len(times), n_states); ``ok`` is False
    when any segment's solve failed (its ``ys`` are then unreliable). ``adjoint`` is how
    diffrax differentiates the solve: None for its default (reverse mode, checkpointed),
    ``diffrax.ForwardMode()`` for forward mode.
    """
    solver, controller = solver_for(model, rtol, atol)
    max_steps = max_steps or model.solver.max_steps
    dose_idx = model.dose_index
    n_states = len(model.states)
    dtype = jnp.result_type(times.dtype, jnp.float32)
    times = times.astype(dtype)

    ev_t, ev_amt, ev_kind = event_table(model, dose_times.astype(dtype), dose_cells.astype(dtype), p, cov)
    t_first = jnp.min(dose_times.astype(dtype))

    y0 = model.initial_state(p, cov).astype(dtype)
    term = dfx.ODETerm(lambda t, y, phase: model.vector_field(t, y, p, cov, phase))

    def integrate(t0, t1, y, phase):
        sol = dfx.diffeqsolve(
            term, solver, t0, t1, model.solver.dt0, y, args=phase,
            saveat=dfx.SaveAt(ts=jnp.clip(times, t0, t1), t1=True),
            stepsize_controller=controller, max_steps=max_steps, throw=False,
            **({} if adjoint is None else {"adjoint": adjoint}),
        )
        ok = sol.result == dfx.RESULTS.successful
        return sol.ys[:-1], sol.ys[-1], ok, sol.stats["num_steps"]

    def segment(carry, event):
        t_cur, y, phase, out, ok, steps = carry
        te, amt, kind = event
        ys, y_end, ok_seg, n = integrate(t_cur, te, y, phase)
        inside = (times >= t_cur) & (times < te)
        out = jnp.where(inside[:, None], ys, out)
        if dose_idx is not None:
            y_end = y_end.at[dose_idx].add(jnp.where(kind == 0, amt, 0.0))
        switched = model.on_switch(y_end, p, cov) if model.has_switch else y_end
        y_end = jnp.where(kind == 1, switched, y_end)
        phase = jnp.where(kind == 1, 1, phase)
        return (te, y_end, phase, out, ok & ok_seg, steps + n), None

    pre_dose = (times < t_first)[:, None]
    baseline = model.baseline_state(p, cov).astype(dtype)
    out0 = jnp.where(pre_dose, baseline, jnp.full((times.shape[0], n_states), jnp.nan, dtype))
    carry = (t_first, y0, jnp.asarray(0), out0, jnp.asarray(True), jnp.asarray(0))
    carry, _ = jax.lax.scan(segment, carry, (ev_t, ev_amt, ev_kind))
    t_cur, y, phase, out, ok, steps = carry
    t_end = jnp.maximum(times[-1], t_cur)
    ys, _, ok_seg, n = integrate(t_cur, t_end, y, phase)
    out = jnp.where((times >= t_cur)[:, None], ys, out)
    return out, ok & ok_seg, steps + n
