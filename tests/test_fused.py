"""The fused ensemble kernel (one Pallas kernel of the ensemble's lanes) against diffrax at tight tolerance,
run by Pallas's interpreter on the CPU; its lowering to a Triton GPU kernel for every library model; and
the row-by-row evaluation of the models' own functions that the kernel runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_ensemble import (
    AGREEMENT,
    ODE_MODELS,
    REGIMENS,
    TIGHT,
    TIMES,
    _cells,
    _check_solve,
    _reference,
    _relative,
    _subjects,
)

import carkin as ck
from carkin.config import on_gpu
from carkin.simulation.ensemble import prepare_ensemble
from carkin.simulation.fused import integrate_fused
from carkin.simulation.lanewise import NotLanewise, lanewise
from carkin.simulation.simulate import choose_engine

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call XLA runs a Triton kernel through


def _model_functions(model):
    names, cnames = model.parameter_names, [c.name for c in model.covariates]

    def field(t, y, th, cv, phase):
        return model.vector_field(t, y, dict(zip(names, th)), dict(zip(cnames, cv)), phase)

    def switch(y, th, cv):
        return model.on_switch(y, dict(zip(names, th)), dict(zip(cnames, cv)))

    example = (np.float64(0.0), np.zeros(len(model.states)), np.ones(len(names)), np.ones(len(cnames)), np.int32(0))
    return field, switch, example


@pytest.mark.parametrize("name", ODE_MODELS)
def test_a_models_functions_on_rows_of_lanes_equal_the_vmapped_functions(name):
    model = ck.load_model(name)
    rng = np.random.default_rng(3)
    typical = np.array([model.typical[p] for p in model.parameter_names])
    theta = typical * rng.uniform(0.5, 2.0, (12, typical.size))
    cov = np.array([c.typical for c in model.covariates]) * rng.uniform(0.5, 1.5, (12, 1))
    y = rng.uniform(0.0, 1e4, (len(model.states), 12))
    t = rng.uniform(0.0, 60.0, 12)
    phase = np.arange(12, dtype=np.int32) % 2
    field, switch, example = _model_functions(model)
    want = np.asarray(jax.vmap(field, in_axes=(0, 1, 0, 0, 0), out_axes=1)(t, y, theta, cov, phase))
    got = np.stack(lanewise(field, *example)(t, list(y), list(theta.T), list(cov.T), phase))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    if model.has_switch:
        want = np.asarray(jax.vmap(switch, in_axes=(1, 0, 0), out_axes=1)(y, theta, cov))
        got = np.stack(lanewise(switch, *example[1:4])(list(y), list(theta.T), list(cov.T)))
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


def test_rows_follow_reshapes_broadcasts_and_reductions():
    def fn(y, s):
        m = jnp.reshape(y, (2, 3)).T  # (3, 2)
        outer = y[:3, None] * y[None, 3:]  # size-1 dimensions stretched by the multiplication itself
        a, b = jax.lax.unstack(m, axis=1)  # jax 0.11 unpacks ``a, b, ... = y`` with unstack
        head, tail = jax.lax.split(y, (4, 2))
        return (jnp.sum(m * s, axis=1), jnp.max(y[1:5]), jnp.concatenate([y[:2], jnp.broadcast_to(s, (2,))]),
                jnp.sum(outer, axis=0) + outer[2], a - 2.0 * b + tail[1] * head[:3])

    y = np.arange(6.0)[:, None] * np.array([1.0, -2.0, 0.5])  # 6 values on 3 lanes
    s = np.array([2.0, 3.0, -1.0])
    want = jax.vmap(fn, in_axes=(1, 0))(y, s)
    got = lanewise(fn, np.zeros(6), np.float64(1.0))(list(y), s)
    np.testing.assert_allclose(np.stack(got[0], 1), want[0])
    np.testing.assert_allclose(got[1], want[1])
    np.testing.assert_allclose(np.stack(got[2], 1), want[2])
    np.testing.assert_allclose(np.stack(got[3], 1), want[3])
    np.testing.assert_allclose(np.stack(got[4], 1), want[4])


def test_an_operation_without_a_row_form_is_named():
    with pytest.raises(NotLanewise, match="cumsum"):
        lanewise(lambda y: jnp.cumsum(y), np.zeros(3))
    with pytest.raises(NotLanewise, match="iota"):
        lanewise(lambda y: y * jnp.arange(3.0), np.zeros(3))


def test_simulate_names_a_model_the_fused_engine_cannot_run():
    class Sorted(type(ck.load_model("cd7_carnk"))):
        name = "sorted_field"

        def vector_field(self, t, y, p, cov, phase):
            return jnp.sort(super().vector_field(t, y, p, cov, phase))

    with pytest.raises(ck.errors.InputError, match="engine='fused' cannot run model 'sorted_field'.*'sort'"):
        ck.simulate(Sorted(), ck.split(1e7), TIMES, engine="fused")
    assert choose_engine(Sorted(), "auto", False, gpu=True) == "ensemble"  # auto falls back on a GPU


def test_auto_takes_the_fused_kernel_on_a_gpu_only():
    cart, stein = ck.load_model("cd7_cart"), ck.load_model("stein_2019")
    assert choose_engine(cart, "auto", False, gpu=True) == "fused"
    assert choose_engine(cart, "auto", True, gpu=True) == "fused"
    assert choose_engine(cart, "auto", False, gpu=False) == "ensemble"
    assert choose_engine(stein, "auto", False, gpu=True) == "closed-form"
    assert choose_engine(stein, "auto", True, gpu=True) == "fused"
    assert choose_engine(cart, "auto", False) == ("fused" if jax.default_backend() == "gpu" else "ensemble")


def test_where_computations_go_decides_gpu_or_not():
    assert on_gpu() == (jax.default_backend() == "gpu")  # no device named: JAX's default backend
    with jax.default_device("gpu"):  # a platform named for the device (a GPU host's jax.default_device)
        assert on_gpu()
    with jax.default_device(jax.devices("cpu")[0]):
        assert not on_gpu()


def _check_against_diffrax(name, n=6, lanes=8, block=4):
    """The reference's n subjects among 4n (each lane solves several in turn) and alone (a lane each)."""
    model, reference = ck.load_model(name), _reference(name)
    theta, cov, weight = _subjects(name, 4 * n)

    @jax.jit
    def solve(times, d_t, d_c, th, cv):
        prepared = prepare_ensemble(model, times, d_t, d_c, th, cv)
        return integrate_fused(model, prepared, times, th, cv, lanes=lanes, block=block, interpret=True, **TIGHT)

    _check_solve(model, reference, theta, cov, weight, n, solve)


@pytest.mark.slow
@pytest.mark.parametrize("name", ODE_MODELS)
def test_the_fused_kernel_agrees_with_diffrax_on_every_library_model(name):
    _check_against_diffrax(name)


@pytest.mark.parametrize("name", ODE_MODELS)
def test_the_kernel_lowers_to_triton_for_a_gpu(name):
    """No GPU here: the program is exported for CUDA, which builds the kernel's Triton code (an operation
    Triton lacks fails here, as it would on the GPU)."""
    model = ck.load_model(name)
    n, n_par, n_cov = 1000, len(model.parameter_names), len(model.covariates)

    def run(theta, cov, dose_t, cells):
        prepared = prepare_ensemble(model, TIMES, dose_t, cells, theta, cov)
        return integrate_fused(model, prepared, TIMES, theta, cov, lanes=256, interpret=False)

    shapes = [jax.ShapeDtypeStruct(s, jnp.float64) for s in ((n, n_par), (n, n_cov), (n, 3), (n, 3))]
    exported = export.export(jax.jit(run), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
    assert exported.mlir_module().count(TRITON_CALL) == 1


@pytest.mark.slow
def test_a_subject_past_its_step_budget_is_flagged_and_left_unsolved():
    model = ck.load_model("cd7_cart")
    theta, cov, weight = _subjects("cd7_cart", 6)
    dose_t, cells = _cells(REGIMENS[1], weight)
    prepared = prepare_ensemble(model, TIMES, dose_t, cells, theta, cov)
    ys, ok, steps = integrate_fused(model, prepared, TIMES, theta, cov, lanes=8, block=4, max_steps=2)
    assert not np.asarray(ok).any()
    assert np.isnan(np.asarray(ys)[:, -1]).all()  # nothing written past the point of failure
    ys, ok, _ = integrate_fused(model, prepared, TIMES, theta, cov, lanes=8, block=4, n_active=4)
    assert np.asarray(ok).tolist() == [True] * 4 + [False] * 2  # subjects from n_active on are padding
    # a (1, T) grid is every subject's grid
    ys_1t, ok, _ = integrate_fused(model, prepared, TIMES[None, :], theta, cov, lanes=8, block=4, n_active=4)
    np.testing.assert_array_equal(np.asarray(ys_1t)[:4], np.asarray(ys)[:4])
    with pytest.raises(ValueError, match="power of two"):
        integrate_fused(model, prepared, TIMES, theta, cov, lanes=8, block=6)


def test_simulate_with_the_fused_engine_agrees_with_the_exact_solution():
    """stein_2019 (its infusions and the switch at its Tmax) through simulate, at the reference's tolerances,
    against the model's closed form; the kernel against diffrax on every model is in the slow set."""
    model = ck.load_model("stein_2019")
    kw = dict(times=TIMES, n_subjects=6, seed=7, progress=False)
    fused = ck.simulate(model, REGIMENS, engine="fused", **kw, **TIGHT)
    exact = ck.simulate(model, REGIMENS, engine="closed-form", **kw)
    assert fused.attrs["engine"] == "fused" and not fused["failed"].any()
    for p in model.parameter_names:
        np.testing.assert_array_equal(fused[p].values, exact[p].values, err_msg=p)
    for o in model.observables:
        assert _relative(fused[o.name].values, exact[o.name].values) < AGREEMENT, o.name


@pytest.mark.slow
def test_simulate_with_the_fused_engine_matches_the_ensemble_whatever_the_chunking():
    model = ck.load_model("cd7_cart")
    kw = dict(times=TIMES, n_subjects=40, seed=7, include_states=True, progress=False)
    fused = ck.simulate(model, ck.split(1e7), engine="fused", **kw)
    assert fused.attrs["engine"] == "fused" and not fused["failed"].any()
    ensemble = ck.simulate(model, ck.split(1e7), engine="ensemble", **kw)
    np.testing.assert_array_equal(fused["n_steps"].values, ensemble["n_steps"].values)
    for s in model.states:  # the same method and steps: equal to rounding
        np.testing.assert_allclose(fused[f"state_{s.name}"].values, ensemble[f"state_{s.name}"].values,
                                   rtol=1e-11, atol=1e-12 * float(np.abs(ensemble[f"state_{s.name}"]).max()))
    pieces = ck.simulate(model, ck.split(1e7), engine="fused", chunk_size=16, **kw)
    for s in model.states:
        np.testing.assert_array_equal(fused[f"state_{s.name}"].values, pieces[f"state_{s.name}"].values)


@pytest.mark.slow
def test_parameters_read_at_each_step_give_the_same_numbers_as_held_ones():
    model = ck.load_model("stein_2019")  # a switch, whose jump reads the parameters too
    theta, cov, weight = _subjects("stein_2019", 12)
    dose_t, cells = _cells(REGIMENS[2], weight)
    prepared = prepare_ensemble(model, TIMES, dose_t, cells, theta, cov)
    held, read = (integrate_fused(model, prepared, TIMES, theta, cov, lanes=8, block=4, hold_parameters=hold)
                  for hold in (True, False))
    for a, b in zip(held, read):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
