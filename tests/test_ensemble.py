"""The ensemble ODE solver (lanes with their own clocks and refill) against diffrax at tight tolerance,
on every library model, several regimens and the protocols' dose range, compiled with XLA's defaults
(as in fits) and as simulate compiles it; its results do not depend on which lane a subject runs on,
the chunking or the device count."""

import functools

import jax
import numpy as np
import pytest

import carkin as ck
from carkin.config import on_gpu
from carkin.model import dosing
from carkin.simulation.ensemble import (
    REFILL_BATCH,
    compiler_options,
    integrate_ensemble,
    prepare_ensemble,
    solve_ensemble,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
AGREEMENT = 1e-5  # relative, ensemble vs diffrax, both at TIGHT
FLOOR = 1e-6  # below this (cells/µL, or the state's unit) a value counts as zero for relative errors
TIMES = np.array([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0, 14.0, 21.0, 28.0, 42.0, 60.0, 90.0])
ODE_MODELS = ["cd7_cart", "cd7_carnk", "cd19_cart", "stein_2019"]
REGIMENS = [ck.single(1e5, day=0.0), ck.split(1e7), ck.custom([0.0, 14.0], [5e8, 5e8], label="1e9 two doses")]


@functools.cache
def _reference(name):
    """Tight diffrax solves of six virtual subjects of a library model on every regimen: the reference the
    ensemble must agree with, and (being simulate's own draws) the subjects every other test solves."""
    return ck.simulate(ck.load_model(name), REGIMENS, TIMES, n_subjects=6, seed=7, engine="diffrax",
                       include_states=True, progress=False, **TIGHT)


def _subjects(name, n):
    """Parameters, covariates and weights of n subjects: the reference's six, repeated as often as needed."""
    model, reference = ck.load_model(name), _reference(name)
    pick = np.arange(n) % reference.sizes["subject"]
    theta = np.stack([reference[p].values for p in model.parameter_names], 1)[pick]
    cov = np.stack([reference[c.name].values for c in model.covariates], 1)[pick]
    return theta, cov, reference[model.role("weight")].values[pick]


def _cells(regimen, weight, n_distinct=6):
    """Dose times and CAR cells of ``regimen`` per kg times each subject's weight, halved for each
    repeat of the reference's subjects so that no two subjects of a crowd are the same."""
    dose_t, per_kg = dosing.dose_table(regimen, np.ones(weight.size), 3)
    repeat = np.arange(weight.size) // n_distinct
    return dose_t, per_kg * (weight * 0.5**repeat)[:, None]


def _relative(got, want):
    scale = np.maximum(np.abs(want), FLOOR)
    return np.nanmax(np.abs(got - want) / scale)


def _as_simulate_compiles(model, **options):
    """The ensemble solve as simulate compiles it: each subject's events and initial states with XLA's
    defaults, then the lanes' loop with the ensemble's compiler options (reassociation, fused multiply-adds)."""
    prepare = jax.jit(lambda *a: prepare_ensemble(model, *a))
    loop = jax.jit(lambda p, t, th, cv: integrate_ensemble(model, p, t, th, cv, **options),
                   compiler_options=compiler_options())
    return lambda t, d_t, d_c, th, cv: loop(prepare(t, d_t, d_c, th, cv), t, th, cv)


def _check_against_diffrax(name, n=6, lanes=8):
    model = ck.load_model(name)
    reference = _reference(name)
    theta, cov, weight = _subjects(name, 4 * n)  # the first n are the reference's subjects
    # XLA's default compile (as fits have) on n subjects (a lane each) and on 4n (lanes refill)
    _check_solve(model, reference, theta, cov, weight, n, jax.jit(lambda *a: solve_ensemble(model, *a, lanes=lanes,
                                                                                            **TIGHT)))
    # as simulate compiles it, on the 4n subjects only (that a subject's lane changes nothing is checked above)
    _check_solve(model, reference, theta, cov, weight, n, _as_simulate_compiles(model, lanes=lanes, **TIGHT),
                 alone=False)


def _check_solve(model, reference, theta, cov, weight, n, solve, alone=True):
    name = model.name
    for r, regimen in enumerate(REGIMENS):
        dose_t, cells = _cells(regimen, weight, n)
        want = np.stack([reference[f"state_{s.name}"].values[r] for s in model.states], -1)
        # n subjects on 8 lanes: no refill; 4n subjects on 8 lanes: each lane takes several in turn
        crowd = [np.asarray(x) for x in solve(TIMES, dose_t, cells, theta, cov)]
        runs = [crowd]
        if alone:
            runs.append([np.asarray(x) for x in solve(TIMES, dose_t[:n], cells[:n], theta[:n], cov[:n])])
        for ys, ok, steps in runs:
            assert ok.all() and (steps > 0).all(), (name, regimen.label)
            assert _relative(ys[:n], want) < AGREEMENT, (name, regimen.label)
        if alone:  # which lane a subject runs on, and when, changes nothing
            for a, b in zip(runs[1], crowd):
                np.testing.assert_array_equal(a, b[:n])


def test_cd7_cart_agrees_with_diffrax():
    _check_against_diffrax("cd7_cart")


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in ODE_MODELS if m != "cd7_cart"])
def test_every_library_model_agrees_with_diffrax(name):
    _check_against_diffrax(name)


def test_simulate_defaults_to_the_ensemble_and_is_reproducible_across_chunks_and_devices():
    model = ck.load_model("cd7_cart")
    kw = dict(times=TIMES, n_subjects=80, seed=7, include_states=True, progress=False)
    whole = ck.simulate(model, ck.split(1e7), **kw)  # 1 chunk on 2 devices
    assert whole.attrs["engine"] == ("fused" if on_gpu() else "ensemble") and not whole["failed"].any()
    # The solve itself is bit-identical whatever the chunking and device count (every subject goes
    # through the same fixed-width lanes); observables computed from the states over a chunk may round
    # the last bit differently, as the README says of the default layout.
    pieces = ck.simulate(model, ck.split(1e7), chunk_size=16, **kw)  # 5 chunks, 1 device
    for s in model.states:
        np.testing.assert_array_equal(whole[f"state_{s.name}"].values, pieces[f"state_{s.name}"].values)
    np.testing.assert_array_equal(whole["n_steps"].values, pieces["n_steps"].values)
    for name in [o.name for o in model.observables]:
        np.testing.assert_allclose(whole[name].values, pieces[name].values, rtol=1e-12, atol=0, err_msg=name)
    # a population in two calls (the second from subject 30 on, chunked as above) is the same population
    first = ck.simulate(model, ck.split(1e7), chunk_size=16, **{**kw, "n_subjects": 30})
    rest = ck.simulate(model, ck.split(1e7), chunk_size=16, first_subject=30, **{**kw, "n_subjects": 50})
    np.testing.assert_array_equal(np.concatenate([first["state_B"].values, rest["state_B"].values]),
                                  whole["state_B"].values)
    # the first subjects are the diffrax reference's (the engine does not change who is drawn), and at the
    # model's own tolerances their observables are close to that tight solve
    reference = _reference("cd7_cart")
    first_six = slice(0, reference.sizes["subject"])
    assert REGIMENS[1].label == ck.split(1e7).label
    for p in model.parameter_names:
        np.testing.assert_array_equal(whole[p].values[first_six], reference[p].values, err_msg=p)
    for name in ("car_copies", "cd7_cells", "blasts"):
        assert _relative(whole[name].values[first_six], reference[name].values[1]) < 1e-2, name


def test_a_failed_subject_is_flagged_not_returned_as_numbers():
    model = ck.load_model("cd7_cart")
    theta, cov, weight = _subjects("cd7_cart", 4)
    ys, ok, _ = jax.jit(lambda *a: solve_ensemble(model, *a, max_steps=5, lanes=2))(
        TIMES, *_cells(ck.single(1e7), weight), theta, cov)
    assert not np.asarray(ok).any()  # five steps per segment cannot reach day 90


def test_derivatives_are_carried_for_the_free_parameters_alone():
    """free=...: the same values, the same derivative for a free parameter as when every parameter carries
    one (and as a central difference of tight solves), and none for a held one."""
    model = ck.load_model("cd7_cart")
    theta, cov, weight = _subjects("cd7_cart", 4)
    dose_t, cells = _cells(ck.split(1e7), weight)
    names = model.parameter_names
    rho, k_kill, d_m = names.index("rho"), names.index("k_kill"), names.index("d_m")

    def states(th, free):
        return solve_ensemble(model, TIMES, dose_t, cells, th, cov, lanes=8, free=free, **TIGHT)[0]

    @functools.partial(jax.jit, static_argnums=2)
    def jvp(th, tangent, free):
        return jax.jvp(lambda x: states(x, free), (th,), (tangent,))

    def derivative(k, free):
        tangent = np.zeros_like(theta)
        tangent[:, k] = theta[:, k]  # d/d log(parameter)
        return jvp(theta, tangent, free)

    value_free, d_free = (np.asarray(a) for a in derivative(rho, (rho, k_kill)))
    value_all, d_all = (np.asarray(a) for a in derivative(rho, None))
    np.testing.assert_array_equal(value_free, value_all)
    np.testing.assert_allclose(d_free, d_all, rtol=1e-12, atol=1e-12 * np.abs(d_all).max())
    step = 1e-5
    up, down = theta.copy(), theta.copy()
    up[:, rho] *= np.exp(step)
    down[:, rho] *= np.exp(-step)
    central = (np.asarray(states(up, None)) - np.asarray(states(down, None))) / (2 * step)
    scale = np.abs(central).max(axis=(0, 1), keepdims=True)  # per state
    assert np.max(np.abs(d_free - central) / scale) < 1e-5
    _, d_held = derivative(d_m, (rho, k_kill))
    assert np.all(np.asarray(d_held) == 0.0)  # d_m is held: no derivative flows to it


@pytest.mark.parametrize("saves_per_step", [pytest.param(1, marks=pytest.mark.slow), 4])  # 1: the fit's layout
def test_repeated_output_times_before_a_later_dose_are_written(saves_per_step):
    """A padded grid repeats a subject's last sample time; when a dose comes after it, the repeats lie
    inside the solve. They get the state at that time (not a stalled solve that runs out of steps),
    equal to the solve on the grid without repeats."""
    model = ck.load_model("cd7_cart")
    theta, cov, weight = _subjects("cd7_cart", 2)
    dose_t = np.array([[0.0, 5.0], [0.0, 5.0]])
    cells = np.array([[1e7, 1e7], [1e7, 1e7]]) * weight[:, None]
    repeated = np.array([0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    solve = jax.jit(lambda *a: solve_ensemble(model, *a, lanes=8, saves_per_step=saves_per_step, **TIGHT))
    ys, ok, _ = (np.asarray(x) for x in solve(repeated, dose_t, cells, theta, cov))
    plain, ok_plain, _ = (np.asarray(x) for x in solve(repeated[:3], dose_t, cells, theta, cov))
    assert ok.all() and ok_plain.all()
    for k in range(3, 8):
        np.testing.assert_array_equal(ys[:, k], ys[:, 2])
    assert _relative(ys[:, :3], plain) < 1e-8


def test_a_lane_per_subject_without_refill_agrees_with_the_refilling_loop():
    """refill=False (the fit's loop: a lane per subject, idle when done, no branch) solves on the same steps:
    the same step counts and the same states to rounding; it refuses fewer lanes than subjects. (The
    refilling solve here is the one test_cd7_cart_agrees_with_diffrax compiles: the cache serves it.)"""
    n = 6
    model = ck.load_model("cd7_cart")
    theta, cov, weight = _subjects("cd7_cart", n)
    args = (TIMES, *_cells(REGIMENS[1], weight), theta, cov)
    plain, ok, steps = (np.asarray(x) for x in jax.jit(
        lambda *a: solve_ensemble(model, *a, lanes=8, **TIGHT))(*args))
    idle, ok_idle, steps_idle = (np.asarray(x) for x in jax.jit(
        lambda *a: solve_ensemble(model, *a, lanes=8, refill=False, **TIGHT))(*args))
    assert ok.all() and ok_idle.all()
    np.testing.assert_array_equal(steps_idle, steps)
    assert _relative(idle, plain) < 1e-12
    with pytest.raises(ValueError, match="a lane per subject: 4 lanes for 6 subjects"):
        solve_ensemble(model, *args, lanes=4, refill=False)


def test_idle_lanes_take_waiting_subjects_in_batches_and_change_nothing():
    """A lane whose subject is done waits until REFILL_BATCH lanes are idle (or all are) before taking a
    waiting subject: 24 subjects on 16 lanes go through in batches of 8, and each comes out bit-identical
    to a solve that gives every subject a lane at once (XLA's default compile, as a fit has)."""
    n = 24
    model = ck.load_model("cd7_cart")
    theta, cov, weight = _subjects("cd7_cart", n)
    args = (TIMES, *_cells(REGIMENS[1], weight), theta, cov)
    assert REFILL_BATCH == 8
    batched = [np.asarray(x) for x in jax.jit(lambda *a: solve_ensemble(model, *a, lanes=16))(*args)]
    at_once = [np.asarray(x) for x in jax.jit(lambda *a: solve_ensemble(model, *a, lanes=32))(*args)]
    assert batched[1].all() and (batched[2] > 0).all()
    for a, b in zip(batched, at_once):
        np.testing.assert_array_equal(a, b)


def test_an_xla_without_the_compiler_options_compiles_with_its_defaults(monkeypatch):
    from carkin.simulation import ensemble

    assert ensemble.compiler_options() == dict(ensemble.CPU_COMPILER_OPTIONS)  # this XLA knows them
    unknown = ensemble.CPU_COMPILER_OPTIONS + (("xla_cpu_no_such_option_in_any_release", True),)
    monkeypatch.setattr(ensemble, "CPU_COMPILER_OPTIONS", unknown)
    assert ensemble.compiler_options() is None


def test_a_dense_output_grid_does_not_exhaust_the_step_budget():
    """A step covers at most SAVES_PER_STEP output times, so a dense grid forces steps of its own; they
    count on top of max_steps per segment. 4,500 times over 90 days force some 1,125 steps, more than
    the 4 x 250 of the segments: the solve still succeeds and equals the reference at its times."""
    model = ck.load_model("cd7_cart")
    theta, cov, weight = _subjects("cd7_cart", 2)
    dense = np.union1d(TIMES, np.linspace(0.0, 90.0, 4501))
    on_reference = np.flatnonzero(np.isin(dense, TIMES))
    assert on_reference.size == TIMES.size
    ys, ok, steps = (np.asarray(x) for x in jax.jit(lambda *a: solve_ensemble(model, *a, max_steps=250, lanes=8,
                                                                              **TIGHT))(
        dense, *_cells(REGIMENS[0], weight), theta, cov))
    assert ok.all() and (steps > 4 * 250).all()
    want = np.stack([_reference("cd7_cart")[f"state_{s.name}"].values[0, :2] for s in model.states], -1)
    assert _relative(ys[:, on_reference], want) < AGREEMENT
