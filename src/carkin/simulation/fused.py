"""The ensemble solve as one GPU kernel: every lane's whole solve in registers.

:func:`carkin.simulation.ensemble.integrate_ensemble` is a loop of XLA operations over arrays of lanes:
on a GPU each iteration is some thirty kernels, each a launch and a pass through memory, and they, not
the arithmetic, set its speed (benchmarks/README.md, GPU section). Here the same method (Dormand-Prince
5(4), the same step-size control, dense output, events and budgets) runs as one Pallas kernel written
for Triton: each program holds a block of lanes, keeps their states, stages and parameters in
registers, and loops until its lanes have solved all their subjects. A lane solves subjects ``lane``,
``lane + lanes``, ``lane + 2 lanes``, ... one after another (it takes the next as soon as one is done),
reading a subject's events, parameters and output times from memory and writing its states at the
output times straight to the result.

The model's own vector field and switch run inside the kernel through :mod:`carkin.simulation.lanewise`
(each state, parameter and covariate one row of lanes). Forward only: fits use the XLA ensemble, whose
derivatives pass through the solve. On a CPU the kernel runs in Pallas's interpreter (correct, slow:
for checking it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from carkin.config import on_gpu
from carkin.model.kinetics import Model
from carkin.simulation.ensemble import _A, _C, _D, _E, SAVES_PER_STEP, control, dense_value, step_limit
from carkin.simulation.lanewise import lanewise

# Lanes of one kernel program, and the warps that run them: one lane per thread of one warp. A program runs
# until the slowest of its lanes is done, so small programs idle least; not yet measured against others.
BLOCK = 32
WARPS = 1
INDEX_LIMIT = 2**31 - 1  # flat offsets beyond this need 64-bit index arithmetic


def integrate_fused(model: Model, prepared: dict, times, theta, cov_values, *, rtol=None, atol=None,
                    max_steps=None, lanes: int = 1 << 16, n_active=None, saves_per_step: int = SAVES_PER_STEP,
                    block: int = BLOCK, warps: int = WARPS, hold_parameters: bool = False,
                    interpret: bool | None = None):
    """States at ``times`` for N prepared subjects (:func:`carkin.simulation.ensemble.prepare_ensemble`),
    solved by one kernel on ``lanes`` lanes in programs of ``block`` lanes. Arguments and result as
    :func:`carkin.simulation.ensemble.integrate_ensemble`'s: ``(ys, ok, n_steps)``, ``ys`` (N, T,
    n_states); subjects from ``n_active`` on are left unsolved (``ok`` False). ``interpret`` (default: when
    computations do not go to a GPU, :func:`on_gpu`) runs the kernel in Pallas's interpreter. ``block``
    must be a power of two.
    ``hold_parameters``: a lane keeps its subject's parameters and covariates in registers (True) or reads
    them from memory at each step (False: fewer registers held through the loop; the same numbers)."""
    s = model.solver
    rtol = float(s.rtol if rtol is None else rtol)
    atol = float(s.atol if atol is None else atol)
    max_steps = int(s.max_steps if max_steps is None else max_steps)
    interpret = not on_gpu() if interpret is None else interpret
    theta, cov_values = jnp.asarray(theta, float), jnp.asarray(cov_values, float)
    n, n_par = theta.shape
    n_cov = cov_values.shape[1]
    n_states = len(model.states)
    if block < 1 or block & (block - 1):
        raise ValueError(f"integrate_fused: block must be a power of two (a kernel's tile), got {block}")
    times = jnp.asarray(times, float)
    shared = times.ndim == 1
    if not shared:  # one grid per subject (a (1, T) grid is every subject's)
        times = jnp.broadcast_to(times, (n, times.shape[-1]))
    n_times = times.shape[-1]
    ev_t, ev_amt, ev_kind = prepared["ev_t"], prepared["ev_amt"], prepared["ev_kind"].astype(jnp.int32)
    n_events = ev_t.shape[1]
    last_time = times[-1] if shared else times[:, -1]
    t_end = jnp.maximum(last_time, ev_t[:, -1])
    budget = step_limit(max_steps, n_events, n_times, saves_per_step)
    lanes = max(block, min(-(-lanes // block), -(-n // block)) * block)
    # Writes a lane does not make go to its own spare slots past the results (dropped after): on a GPU a
    # masked store writes nothing, but Pallas's interpreter writes every lane, and two lanes must not share one.
    n_out = n * n_times * n_states
    index_dtype = jnp.int32 if n_out + lanes * saves_per_step * n_states <= INDEX_LIMIT else jnp.int64
    field, switch = row_functions(model)
    dose_row = model.dose_index
    steps_rk = tuple(zip(_C, _A))

    def kernel(times_ref, ev_t_ref, ev_amt_ref, ev_kind_ref, y0_ref, first_ref, theta_ref, cov_ref, end_ref,
               n_ref, out_in, ok_in, steps_in, out_ref, ok_ref, steps_ref):
        del out_in, ok_in, steps_in  # the same buffers as the outputs (aliased)
        lane = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
        n_act = _gather(n_ref, jnp.zeros(block, jnp.int32))

        def at(ref, subject, width, col, mask=None):
            return _gather(ref, subject.astype(index_dtype) * width + col, mask)

        def time_at(subject, col):
            return _gather(times_ref, col) if shared else at(times_ref, subject, n_times, col)

        def subject_values(c, mask=None):
            """A subject's parameters and covariates, one row each."""
            return dict(th=[at(theta_ref, c, n_par, q, mask) for q in range(n_par)],
                        cv=[at(cov_ref, c, n_cov, q, mask) for q in range(n_cov)])

        def start(subject, mask):
            """A lane's values for ``subject`` at its first infusion (before the infusion); -1: idle."""
            valid = mask & (subject < n_act)
            c = jnp.where(valid, subject, 0)
            return dict(
                subject=jnp.where(valid, subject, -1), t=at(ev_t_ref, c, n_events, 0, valid),
                y=[at(y0_ref, c, n_states, q, valid) for q in range(n_states)],
                h=jnp.full(block, s.dt0, float), k=jnp.zeros(block, jnp.int32),
                j=at(first_ref, c, 1, 0, valid), phase=jnp.zeros(block, jnp.int32),
                steps=jnp.zeros(block, jnp.int32), end=at(end_ref, c, 1, 0, valid),
                **(subject_values(c, valid) if hold_parameters else {}),
            )

        def body(lane_):
            subj, t, y, h, k, j = (lane_[key] for key in ("subject", "t", "y", "h", "k", "j"))
            phase = lane_["phase"]
            active = subj >= 0
            c = jnp.where(active, subj, 0)
            th, cv = (lane_["th"], lane_["cv"]) if hold_parameters else subject_values(c).values()
            k_c = jnp.minimum(k, n_events - 1)
            has_event = k < n_events
            next_ev = jnp.where(has_event, at(ev_t_ref, c, n_events, k_c), jnp.inf)
            at_event = active & has_event & (t >= next_ev)
            finished = active & ~has_event & (t >= lane_["end"])

            # one Dormand-Prince step (used where the lane is neither at an event nor done)
            t_stop = jnp.minimum(next_ev, lane_["end"])
            j_lim = jnp.minimum(j + saves_per_step, n_times - 1)
            t_lim = jnp.where(j + saves_per_step < n_times, time_at(c, j_lim), jnp.inf)
            h_eff = jnp.maximum(jnp.minimum(jnp.minimum(h, t_stop - t), t_lim - t), 0.0)
            lands = h_eff >= t_stop - t
            stages = []
            for c_i, a_i in steps_rk:
                y_i = [y[q] + sum((a * h_eff) * kk[q] for a, kk in zip(a_i, stages)) for q in range(n_states)] \
                    if a_i else y
                stages.append(field(t + c_i * h_eff, y_i, th, cv, phase))
            y_new = [y[q] + h_eff * sum(b * kk[q] for b, kk in zip(_A[6], stages[:6]) if b) for q in range(n_states)]
            sq = 0.0
            finite = jnp.ones(block, bool)
            for q in range(n_states):
                y_err = h_eff * sum(e * kk[q] for e, kk in zip(_E, stages) if e)
                scale = atol + rtol * jnp.maximum(jnp.abs(y[q]), jnp.abs(y_new[q]))
                sq = sq + (y_err / scale) ** 2
                finite = finite & (jnp.abs(y_new[q]) < jnp.inf)
            err = jnp.sqrt(sq / n_states)
            finite = finite & (err < jnp.inf)
            accept, factor = control(err, finite)
            t_new = jnp.where(lands, t_stop, t + h_eff)
            stepping = active & ~at_event & ~finished
            took = stepping & accept

            # dense output at the output times in [t, t_new) of an accepted step; a finished lane writes its
            # state at the output times left at its end
            y_diff = [y_new[q] - y[q] for q in range(n_states)]
            b_spl = [h_eff * stages[0][q] - y_diff[q] for q in range(n_states)]
            r4 = [y_diff[q] - h_eff * stages[6][q] - b_spl[q] for q in range(n_states)]
            r5 = [h_eff * sum(d * kk[q] for d, kk in zip(_D, stages) if d) for q in range(n_states)]
            inv_h = 1.0 / jnp.where(h_eff > 0, h_eff, 1.0)
            written = jnp.zeros(block, jnp.int32)
            for m in range(saves_per_step):
                idx = j + m
                col = jnp.minimum(idx, n_times - 1)
                t_m = time_at(c, col)
                write_step = took & (idx < n_times) & ((t_m < t_new) | (t_m <= t))
                write_end = finished & (idx < n_times)
                u = (t_m - t) * inv_h
                write = write_step | write_end
                base = jnp.where(write, (c.astype(index_dtype) * n_times + col) * n_states,
                                 n_out + (lane.astype(index_dtype) * saves_per_step + m) * n_states)
                for q in range(n_states):
                    val = dense_value(u, y[q], y_diff[q], b_spl[q], r4[q], r5[q])
                    plt.store(out_ref.at[base + q], jnp.where(write_end, y[q], val), mask=write)
                written = written + write_step.astype(jnp.int32)

            # events: an infusion adds to the dose state; the switch applies the model's jump
            kind = at(ev_kind_ref, c, n_events, k_c)
            y_ev = list(y)
            if dose_row is not None:
                amount = at(ev_amt_ref, c, n_events, k_c)
                y_ev[dose_row] = y_ev[dose_row] + jnp.where(kind == 0, amount, 0.0)
            if switch is not None:
                switched = switch(y_ev, th, cv)
                y_ev = [jnp.where(kind == 1, a, b) for a, b in zip(switched, y_ev)]

            # a step cut short by an event or the output times says nothing against the proposed h
            h_next = jnp.where(took & (h_eff < h), jnp.maximum(h, h_eff * factor), h_eff * factor)
            h_next = jnp.where(stepping, h_next, h)
            steps = lane_["steps"] + stepping.astype(jnp.int32)
            too_small = h_next < 1e-14 * (1.0 + jnp.abs(t))
            failed = stepping & (~finite | (steps > budget) | too_small)
            y_next = [jnp.where(at_event, a, jnp.where(took, b, o)) for a, b, o in zip(y_ev, y_new, y)]
            leaving = (finished & (j + saves_per_step >= n_times)) | failed
            slot = jnp.where(leaving, c, n + lane)
            plt.store(ok_ref.at[slot], finished.astype(jnp.int32), mask=leaving)
            plt.store(steps_ref.at[slot], steps, mask=leaving)
            stay = dict(subject=subj, t=jnp.where(took, t_new, t), y=y_next, h=h_next, k=k + at_event.astype(jnp.int32),
                        j=j + written + jnp.where(finished, saves_per_step, 0),
                        phase=jnp.where(at_event & (kind == 1), 1, phase), steps=steps, end=lane_["end"],
                        **({"th": th, "cv": cv} if hold_parameters else {}))
            # a lane that is done takes its next subject (``lanes`` on), or goes idle
            fresh = start(subj + lanes, leaving)
            return jax.tree_util.tree_map(lambda new, old: jnp.where(leaving, new, old), fresh, stay)

        def cond(lane_):
            return jnp.max(jnp.where(lane_["subject"] >= 0, 1, 0)) > 0

        jax.lax.while_loop(cond, body, start(lane, jnp.ones(block, bool)))

    pre = (times[None, :] if shared else times) < ev_t[:, :1]
    out0 = jnp.where(pre[..., None], prepared["base"][:, None, :], jnp.nan)
    out0 = jnp.concatenate([jnp.broadcast_to(out0, (n, n_times, n_states)).reshape(-1),
                            jnp.zeros(lanes * saves_per_step * n_states)])
    n_act = jnp.asarray([n if n_active is None else jnp.minimum(n_active, n)], jnp.int32)
    args = (times.reshape(-1), ev_t.reshape(-1), ev_amt.reshape(-1), ev_kind.reshape(-1),
            prepared["y0"].astype(float).reshape(-1), prepared["first_save"].astype(jnp.int32), theta.reshape(-1),
            cov_values.reshape(-1), t_end, n_act, out0, *(jnp.zeros(n + lanes, jnp.int32) for _ in range(2)))
    whole = [pl.BlockSpec(memory_space=pl.ANY) for _ in args]
    out, ok, steps = pl.pallas_call(
        kernel, grid=(lanes // block,), in_specs=whole, out_specs=whole[-3:],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args[-3:]],
        input_output_aliases={len(args) - 3: 0, len(args) - 2: 1, len(args) - 1: 2},
        compiler_params=None if interpret else plt.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret, name=f"ensemble_{model.name}",
    )(*args)
    return out[:n_out].reshape(n, n_times, n_states), ok[:n].astype(bool), steps[:n]


def _gather(ref, index, mask=None):
    """Values of a flat array in memory at ``index`` (a row), 0 where ``mask`` is False."""
    return plt.load(ref.at[index], mask=mask, other=None if mask is None else 0)


@functools.lru_cache(maxsize=16)
def row_functions(model: Model):
    """The model's vector field and switch as functions of rows (:func:`lanewise`): field(t, y, th, cv,
    phase) and switch(y, th, cv) (None for a model without a switch)."""
    names = model.parameter_names
    cnames = tuple(c.name for c in model.covariates)
    example = (np.float64(0.0), np.zeros(len(model.states)), np.ones(len(names)), np.ones(len(cnames)), np.int32(0))

    def field(t, y, th, cv, phase):
        return model.vector_field(t, y, dict(zip(names, th)), dict(zip(cnames, cv)), phase)

    def switch(y, th, cv):
        return model.on_switch(y, dict(zip(names, th)), dict(zip(cnames, cv)))

    return lanewise(field, *example), lanewise(switch, *example[1:4]) if model.has_switch else None
