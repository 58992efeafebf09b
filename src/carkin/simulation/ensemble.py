"""Ensemble ODE solve: many subjects on a fixed number of lanes, each lane with its own clock.

``vmap`` of an adaptive solve runs every subject of a batch in lock step until the slowest one is
done. Here each lane carries its own time, step size, error control, event pointer and save
pointer, and when its subject is finished it takes the next waiting subject (lane refill; idle lanes
wait until ``REFILL_BATCH`` of them can refill together), so no lane idles for long while a slow
subject finishes. One loop iteration advances every lane by one attempted step (or applies the
lane's next event).

The method is Dormand-Prince 5(4) with an I-controller on the RMS error norm (as diffrax's
``PIDController`` with its default coefficients) and the pair's 4th-order continuous extension
for the output times, so steps are never clipped to save times (at most ``SAVES_PER_STEP`` output
times fall inside one step). Events are the model's infusions (a jump in its dose state) and its
parameter-valued switch (Stein's Tmax): a step never crosses one, and at an event time the
post-event value is reported, as in :mod:`carkin.simulation.solve`, which stays the reference.

Everything is pure JAX: forward-mode derivatives (``jax.jvp``) pass through the solve.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from carkin.config import compute_platform
from carkin.model.kinetics import Model
from carkin.simulation.solve import event_table

# output times one step may cover (a longer step is cut at the next): on cd7_cart's daily grid 4 cost no
# extra steps and write less per iteration than 8
SAVES_PER_STEP = 4
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0  # step-size controller (diffrax's defaults)
# A CPU's lanes: rows of a power-of-two lane count land on the same cache sets, and 128 or 256 lanes ran
# 1.4x slower than 96-200 on a 2-core AMD EPYC (benchmarks/README.md, lane counts); 136 is in that band.
DEFAULT_LANES = 136
LANE_MULTIPLE = 8  # lane counts in multiples of the vector width keep every lane on the same code path
# Idle lanes take waiting subjects once this many are idle (or all are): the refill, a branch of gathers,
# then runs about every eighth iteration instead of nearly every one (cd7_cart's solve 1.08x quicker on
# one core; a subject's result is the same whenever it starts).
REFILL_BATCH = 8
# How XLA compiles an ensemble solve for a CPU: the lanes' arithmetic may be reassociated and contracted into
# fused multiply-adds, in vectors as wide as the CPU has, while NaN, infinity, division and library functions
# (exp, log) keep their IEEE meaning, so the failure checks and the rates stay exact. cd7_cart's solve ran
# 1.27x quicker on one core of the AMD machine, with the same steps and states within 1.2e-10 relative of
# the default compile (benchmarks/README.md, "Engines").
CPU_COMPILER_OPTIONS = (
    ("xla_cpu_enable_fast_math", True),
    ("xla_cpu_fast_math_honor_nans", True),
    ("xla_cpu_fast_math_honor_infs", True),
    ("xla_cpu_fast_math_honor_division", True),
    ("xla_cpu_fast_math_honor_functions", True),
    ("xla_cpu_prefer_vector_width", 512),
)

# Dormand & Prince (1980) 5(4) tableau; error weights are b - b_hat.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
# Coefficients of the 4th-order continuous extension (Hairer, Norsett & Wanner, Solving ODEs I, II.6).
_D = (-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799, -10690763975 / 1880347072,
      701980252875 / 199316789632, -1453857185 / 822651844, 69997945 / 29380423)


def solve_ensemble(model: Model, times, dose_times, dose_cells, theta, cov_values, *, rtol=None, atol=None,
                   max_steps=None, lanes: int = DEFAULT_LANES, n_active=None, free=None,
                   saves_per_step: int = SAVES_PER_STEP, refill: bool = True):
    """States at ``times`` for N subjects, solved on ``lanes`` lanes with refill.

    ``times`` is (T,) shared by every subject or (N, T) one grid per subject (non-decreasing; a
    repeated time gets the same value, as a padded fit design has). ``dose_times`` and
    ``dose_cells`` are (N, D) (padding slots repeat the last time with zero cells); ``theta`` is
    (N, P) in ``model.parameter_names`` order and ``cov_values`` (N, C) in ``model.covariates``
    order. Returns ``(ys, ok, n_steps)`` with ``ys`` (N, T, n_states); ``ok`` is False where a
    subject exceeded its step budget (``max_steps`` per segment between events, as diffrax
    counts, plus the steps its output times force: T / ``saves_per_step``) or its state stopped
    being finite. ``n_active`` (may be traced): only the first
    ``n_active`` subjects are solved (the rest are padding, returned unsolved with ``ok`` False).
    ``free`` (indices into ``theta``'s columns, None for all): the only parameters derivatives are
    taken with respect to; the others are held constant (no derivative flows to them), so forward
    mode carries tangents for these alone through the vector field instead of for every parameter.
    ``saves_per_step``: the most output times one step may cover (a longer step is cut at the next);
    each iteration interpolates and writes this many, so a sparse grid wants fewer.
    ``refill=False`` (needs ``lanes >= N``: a lane per subject, as in a fit): a finished lane goes idle
    instead of taking a waiting subject, so the loop has no branch (the fit's gradient about 5%
    quicker). Its results may differ from the refilling loop's in the last bits (XLA fuses the two
    loops differently), so ``simulate`` always refills: a subject's numbers do not depend on its chunk.
    """
    prepared = prepare_ensemble(model, times, dose_times, dose_cells, theta, cov_values)
    return integrate_ensemble(model, prepared, times, theta, cov_values, rtol=rtol, atol=atol, max_steps=max_steps,
                              lanes=lanes, n_active=n_active, free=free, saves_per_step=saves_per_step, refill=refill)


def prepare_ensemble(model: Model, times, dose_times, dose_cells, theta, cov_values) -> dict:
    """What :func:`integrate_ensemble` needs of each subject besides its parameters and output times:
    its events in time order (N, E: times, amounts, kinds), its states at its first infusion and before
    it (N, n_states), and the index of its first output time at or after that infusion (N,). Arguments
    as :func:`solve_ensemble`'s."""
    names = model.parameter_names
    cnames = tuple(c.name for c in model.covariates)
    theta = jnp.asarray(theta)
    n = theta.shape[0]
    times = jnp.broadcast_to(jnp.asarray(times, float), (n, jnp.shape(times)[-1]))

    def prepare(th, cv, d_t, d_c):
        p, c = dict(zip(names, th)), dict(zip(cnames, cv))
        ev_t, ev_amt, ev_kind = event_table(model, d_t, d_c, p, c)
        y0 = model.initial_state(p, c).astype(float)
        base = model.baseline_state(p, c).astype(float)
        return ev_t, ev_amt, ev_kind, y0, base

    ev_t, ev_amt, ev_kind, y0, base = jax.vmap(prepare)(theta, jnp.asarray(cov_values), dose_times, dose_cells)
    first_save = jnp.sum(times < ev_t[:, :1], axis=1).astype(jnp.int32)
    return dict(ev_t=ev_t, ev_amt=ev_amt, ev_kind=ev_kind, y0=y0, base=base, first_save=first_save)


def integrate_ensemble(model: Model, prepared: dict, times, theta, cov_values, *, rtol=None, atol=None, max_steps=None,
                       lanes: int = DEFAULT_LANES, n_active=None, free=None, saves_per_step: int = SAVES_PER_STEP,
                       refill: bool = True):
    """The lanes' loop of :func:`solve_ensemble` on subjects already prepared (:func:`prepare_ensemble`);
    arguments and result as :func:`solve_ensemble`'s. ``simulate`` compiles it as a program of its own with
    :func:`compiler_options`: its arithmetic is the lanes', whose compiled code did not change with the
    number of subjects (states bit-identical for chunks of 16 to 300 subjects), so a subject's states are
    the same in any chunk; the preparation's, compiled with the options, did change (by an ulp)."""
    s = model.solver
    rtol = s.rtol if rtol is None else rtol
    atol = s.atol if atol is None else atol
    max_steps = s.max_steps if max_steps is None else max_steps
    names = model.parameter_names
    cnames = tuple(c.name for c in model.covariates)
    dose_idx = model.dose_index
    theta, cov_values = jnp.asarray(theta), jnp.asarray(cov_values)
    n, n_par = theta.shape
    if not refill and lanes < n:
        raise ValueError(f"solve_ensemble(refill=False) needs a lane per subject: {lanes} lanes for {n} subjects")
    free = tuple(range(n_par)) if free is None else tuple(int(k) for k in free)
    held = tuple(k for k in range(n_par) if k not in free)
    theta_free = theta[:, list(free)]
    theta_held = jax.lax.stop_gradient(theta[:, list(held)])

    def parameters(th_free, th_held) -> dict:
        """The parameter dict of one lane (rows) from its free and held values."""
        p = dict(zip((names[k] for k in free), th_free))
        p.update(zip((names[k] for k in held), th_held))
        return p
    ev_t, ev_amt, ev_kind = prepared["ev_t"], prepared["ev_amt"], prepared["ev_kind"]
    y0, base, first_save = prepared["y0"], prepared["base"], prepared["first_save"]
    times = jnp.broadcast_to(jnp.asarray(times, float), (n, jnp.shape(times)[-1]))
    n_times = times.shape[1]
    n_events = ev_t.shape[1]
    t_first = ev_t[:, 0]
    t_end = jnp.maximum(times[:, -1], ev_t[:, -1])
    step_budget = step_limit(max_steps, n_events, n_times, saves_per_step)
    pre = times < t_first[:, None]
    out0 = jnp.where(pre[..., None], base[:, None, :], jnp.nan)

    def field(t, y, th_free, th_held, cv, phase):
        return model.vector_field(t, y, parameters(th_free, th_held), dict(zip(cnames, cv)), phase)

    # Lane arrays are (quantity, lane): each state, parameter or covariate is one contiguous row across
    # the lanes, so the vector field runs on whole rows (measured quicker than lanes-first rows).
    field_lanes = jax.vmap(field, in_axes=(0, 1, 1, 1, 1, 0), out_axes=1)

    def start(subject):
        """Lane state for a subject at its first infusion (before the infusion is applied)."""
        i = jnp.clip(subject, 0, n - 1)
        t0 = t_first[i]
        return dict(subject=subject, t=t0, y=y0[i].T, h=jnp.full(subject.shape, s.dt0), k=jnp.zeros_like(subject),
                    j=first_save[i].astype(subject.dtype), phase=jnp.zeros_like(subject),
                    steps=jnp.zeros_like(subject), th=theta_free[i].T, th_held=theta_held[i].T, cv=cov_values[i].T)

    # Output slots an iteration does not write go to distinct rows past the end (dropped): no two updates
    # share an index, and the scatter says so, so its derivative is a scatter of the tangents (with repeated
    # indices JAX masks the whole output's tangent on every iteration: the fit's gradient took 10-15% longer).
    spare = n + jnp.arange(lanes * saves_per_step, dtype=jnp.int32).reshape(lanes, saves_per_step)

    def body(carry):
        lane, out, ok_all, steps_all, queue = carry
        subj = lane["subject"]
        active = subj >= 0
        i = jnp.clip(subj, 0, n - 1)
        t, y, h, k, j = lane["t"], lane["y"], lane["h"], lane["k"], lane["j"]
        k_c = jnp.minimum(k, n_events - 1)
        next_ev = jnp.where(k < n_events, ev_t[i, k_c], jnp.inf)
        at_event = active & (k < n_events) & (t >= next_ev)
        finished = active & (k >= n_events) & (t >= t_end[i])

        # --- one Dormand-Prince step for every lane (used where the lane is neither at an event nor done)
        t_stop = jnp.minimum(next_ev, t_end[i])
        j_lim = jnp.minimum(j + saves_per_step, n_times - 1)
        t_lim = jnp.where(j + saves_per_step < n_times, times[i, j_lim], jnp.inf)
        h_eff = jnp.maximum(jnp.minimum(jnp.minimum(h, t_stop - t), t_lim - t), 0.0)
        lands = h_eff >= t_stop - t
        stages = []
        for c_i, a_i in zip(_C, _A):
            y_i = y + sum((a * h_eff) * kk for a, kk in zip(a_i, stages)) if a_i else y
            stages.append(field_lanes(t + c_i * h_eff, y_i, lane["th"], lane["th_held"], lane["cv"], lane["phase"]))
        y_new = y + h_eff * sum(b * kk for b, kk in zip(_A[6], stages[:6]) if b)
        y_err = h_eff * sum(e * kk for e, kk in zip(_E, stages) if e)
        scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
        # Step sizes are not differentiated: a derivative is that of the solution on the steps taken.
        err = jax.lax.stop_gradient(jnp.sqrt(jnp.mean((y_err / scale) ** 2, axis=0)))
        finite = jnp.all(jnp.isfinite(y_new), axis=0) & jnp.isfinite(err)
        accept, factor = control(err, finite)
        t_new = jnp.where(lands, t_stop, t + h_eff)
        stepping = active & ~at_event & ~finished
        took = stepping & accept

        # dense output at the output times in [t, t_new) of accepted steps
        y_diff = y_new - y
        b_spl = h_eff * stages[0] - y_diff
        r4 = y_diff - h_eff * stages[6] - b_spl
        r5 = h_eff * sum(d * kk for d, kk in zip(_D, stages) if d)
        # (one scatter per iteration: a finished lane writes its state at the output times left at its end)
        idx = j[:, None] + jnp.arange(saves_per_step, dtype=j.dtype)[None, :]  # (lanes, saves_per_step)
        col = jnp.minimum(idx, n_times - 1)
        t_m = times[i[:, None], col]
        # an output time equal to t is written too: when several equal ones lie ahead (a padded grid's last
        # time before a later dose), the step is cut at them and the next, of zero length, writes them
        write_step = took[:, None] & (idx < n_times) & ((t_m < t_new[:, None]) | (t_m <= t[:, None]))
        write_end = finished[:, None] & (idx < n_times)
        th_ = (t_m - t[:, None]) / jnp.where(h_eff > 0, h_eff, 1.0)[:, None]  # (lanes, saves_per_step)
        y3, d3, b3, r43, r53 = (a[:, :, None] for a in (y, y_diff, b_spl, r4, r5))  # (state, lane, 1)
        val = dense_value(th_, y3, d3, b3, r43, r53)  # (state, lane, save)
        val = jnp.where(write_end, y3, val)
        row = jnp.where(write_step | write_end, subj[:, None], spare)
        out = out.at[row, col].set(jnp.moveaxis(val, 0, -1), mode="drop", unique_indices=True)
        written = jnp.sum(write_step, axis=1).astype(j.dtype)

        # --- events: an infusion adds to the dose state; the switch applies the model's jump
        y_ev = y
        if dose_idx is not None:
            y_ev = y_ev.at[dose_idx].add(jnp.where(ev_kind[i, k_c] == 0, ev_amt[i, k_c], 0.0))
        if model.has_switch:
            switched = jax.vmap(lambda yy, th, th_h, cv: model.on_switch(yy, parameters(th, th_h),
                                                                         dict(zip(cnames, cv))),
                                in_axes=1, out_axes=1)(y_ev, lane["th"], lane["th_held"], lane["cv"])
            y_ev = jnp.where(ev_kind[i, k_c] == 1, switched, y_ev)
        phase_ev = jnp.where(ev_kind[i, k_c] == 1, 1, lane["phase"])

        # a step cut short by an event or the output times says nothing against the proposed h
        h_next = jnp.where(took & (h_eff < h), jnp.maximum(h, h_eff * factor), h_eff * factor)
        h_next = jax.lax.stop_gradient(jnp.where(stepping, h_next, h))
        steps = lane["steps"] + stepping.astype(lane["steps"].dtype)
        too_small = h_next < 1e-14 * (1.0 + jnp.abs(t))
        failed = stepping & (~finite | (steps > step_budget) | too_small)
        y_next = jnp.where(at_event, y_ev, jnp.where(took, y_new, y))
        # --- finished lanes have written their output times at the end time (a few per iteration: a padded
        # grid repeats its last time); they leave with failed ones, and the next waiting subject takes the lane
        leaving = (finished & (j + saves_per_step >= n_times)) | failed
        ok_all = ok_all.at[jnp.where(leaving, subj, n)].set(finished, mode="drop")
        steps_all = steps_all.at[jnp.where(leaving, subj, n)].set(steps, mode="drop")
        stay = {
            "subject": subj, "t": jnp.where(took, t_new, t), "y": y_next,
            "h": h_next,
            "k": k + at_event.astype(k.dtype), "j": j + written + jnp.where(finished, saves_per_step, 0),
            "phase": jnp.where(at_event, phase_ev, lane["phase"]), "steps": steps, "th": lane["th"],
            "th_held": lane["th_held"], "cv": lane["cv"],
        }

        lane = dict(stay, subject=jnp.where(leaving, -1, subj))  # a lane that is done goes idle
        if refill:
            idle = lane["subject"] < 0
            n_idle = jnp.sum(idle).astype(queue.dtype)

            def take_waiting(current):
                rank = (jnp.cumsum(idle) - 1).astype(subj.dtype)
                fresh = start(jnp.where(queue + rank < limit, queue + rank, -1).astype(subj.dtype))
                return {key: jnp.where(idle, fresh[key], v) for key, v in current.items()}  # lanes are the last axis

            # idle lanes wait until there are a few of them (or all are idle), so the refill runs seldom
            batch = (queue < limit) & (n_idle >= min(REFILL_BATCH, lanes))
            lane = jax.lax.cond(batch, take_waiting, lambda current: current, lane)
            queue = jnp.where(batch, queue + n_idle, queue)
        return lane, out, ok_all, steps_all, queue

    def cond(carry):
        return jnp.any(carry[0]["subject"] >= 0)

    # Always `lanes` lanes (idle ones when there are fewer subjects): every subject then goes through the
    # same vectorised arithmetic, so its result does not depend on the population, chunk or device count.
    limit = jnp.asarray(n if n_active is None else jnp.minimum(n_active, n), jnp.int32)
    first = jnp.arange(lanes, dtype=jnp.int32)
    lane0 = start(jnp.where(first < limit, first, -1))
    carry = (lane0, out0, jnp.zeros(n, bool), jnp.zeros(n, jnp.int32), jnp.minimum(lanes, limit))
    _, out, ok, n_steps, _ = jax.lax.while_loop(cond, body, carry)
    return out, ok, n_steps


def step_limit(max_steps: int, n_events: int, n_times: int, saves_per_step: int) -> int:
    """A subject's step budget: ``max_steps`` per segment between events (as diffrax counts), plus the steps
    its output times force (a step covers at most ``saves_per_step`` of them)."""
    return max_steps * (n_events + 1) + -(-n_times // saves_per_step)


def control(err, finite):
    """``(accept, factor)`` of steps with RMS error norms ``err`` (finite where the new state is): a step is
    taken where ``err <= 1``, and the next step size is the step's times ``factor`` (an I-controller, clipped
    to [MIN_FACTOR, MAX_FACTOR], and not above 1 after a rejected step)."""
    accept = (err <= 1.0) & finite
    factor = jnp.where(err == 0.0, MAX_FACTOR, SAFETY * err ** (-1 / 5))
    factor = jnp.clip(jnp.where(finite, factor, MIN_FACTOR), MIN_FACTOR, jnp.where(accept, MAX_FACTOR, 1.0))
    return accept, factor


def dense_value(u, y, y_diff, b, r4, r5):
    """The step's continuous extension at fraction ``u`` of it, from the start ``y``, the change ``y_diff``
    and the extension's coefficients ``b``, ``r4``, ``r5`` (any shapes that broadcast)."""
    return y + u * (y_diff + (1 - u) * (b + u * (r4 + (1 - u) * r5)))


def compiler_options() -> dict | None:
    """Options for ``jax.jit`` of a program built around :func:`solve_ensemble` where computations go
    (carkin.config.compute_platform): CPU_COMPILER_OPTIONS on a CPU whose XLA knows them; None, XLA's
    defaults, elsewhere."""
    if compute_platform() != "cpu" or not _cpu_options_known(CPU_COMPILER_OPTIONS):
        return None
    return dict(CPU_COMPILER_OPTIONS)


@functools.lru_cache(maxsize=4)
def _cpu_options_known(options: tuple) -> bool:
    """Whether this XLA compiles with ``options`` (another jax release may have renamed one): a tiny
    program compiled once per process."""
    try:
        jax.jit(lambda x: x + 1.0, compiler_options=dict(options)).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


def observe_subjects(model: Model, ys, theta, cov_values) -> dict:
    """The model's observables of solved states ``ys`` (N, T, n_states), each (N, T)."""
    cnames = tuple(c.name for c in model.covariates)
    return jax.vmap(lambda y, th, cv: model.observe(y, dict(zip(model.parameter_names, th)),
                                                    dict(zip(cnames, cv))))(ys, theta, cov_values)
