"""The per-subject scipy baseline: what a user would otherwise write with solve_ivp.

The right-hand side is the model's own vector field compiled once with XLA and
called per evaluation (a few microseconds a call, on a par with a hand-written
Python function), so the comparison measures the solver loop, not the model.
Doses and Stein's switch are handled by integrating piecewise, as in carkin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp


def compiled_rhs(model, p: dict, cov: dict):
    """f(t, y, phase) -> dy as numpy, from one XLA executable per (model, phase)."""
    names, cnames = list(p), list(cov)

    def f(t, y, theta, c, phase):
        return model.vector_field(t, y, dict(zip(names, theta)), dict(zip(cnames, c)), phase)

    y0 = np.zeros(len(model.states))
    exe = jax.jit(f).lower(0.0, y0, np.zeros(len(names)), np.zeros(len(cnames)), 0).compile()
    theta = np.array([p[k] for k in names], float)
    c = np.array([cov[k] for k in cnames], float)
    return lambda t, y, phase: np.asarray(exe(t, y, theta, c, phase))


def solve_scipy(model, dose_days, dose_cells, times, p, cov, *, method="LSODA", rtol=1e-6, atol=1e-9, rhs=None):
    """States at ``times`` (post-dose values at dose times), piecewise between events."""
    rhs = rhs or compiled_rhs(model, p, cov)
    times = np.asarray(times, float)
    scale = float(model.cells_to_state(p, cov)) if model.dose_index is not None else 0.0
    events = [(float(t), 0, float(a) * scale) for t, a in zip(dose_days, dose_cells)]
    if model.has_switch:
        events.append((float(model.switch_time(p)), 1, 0.0))
    events.sort(key=lambda e: (e[0], e[1]))
    y = np.asarray(model.initial_state(p, cov), float)
    t_cur, phase = min(times[0], events[0][0]), 0
    out = np.full((times.size, y.size), np.nan)

    def run(t0, t1, y, sel):
        """Integrate t0 -> t1 reporting the selected grid times; returns the state at t1."""
        if t1 <= t0:
            return y, np.repeat(y[None], sel.sum(), 0)
        t_eval = np.append(times[sel], t1)
        sol = solve_ivp(lambda t, u: rhs(t, u, phase), (t0, t1), y, method=method, rtol=rtol, atol=atol,
                        t_eval=t_eval)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed: {sol.message}")
        return sol.y[:, -1], sol.y[:, :-1].T

    for te, kind, amt in events:
        sel = (times >= t_cur) & (times < te)
        y, out[sel] = run(t_cur, te, y, sel)
        if kind == 0 and model.dose_index is not None:
            y = y.copy()
            y[model.dose_index] += amt
        elif kind == 1:
            y = np.asarray(model.on_switch(jnp.asarray(y), p, cov), float)
            phase = 1
        t_cur = max(t_cur, te)
    sel = times > t_cur
    out[times == t_cur] = y
    if sel.any():
        last = times[sel][-1]
        sel_inner = sel & (times < last)
        y_end, out[sel_inner] = run(t_cur, last, y, sel_inner)
        out[times == last] = y_end
    return out
