"""stein_2019 solved as an ODE against the paper's closed form (Stein et al. 2019)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import carkin as ck
from carkin.config import on_gpu
from carkin.errors import InputError
from carkin.solve import solve_subject

CLOSED_FORM_RTOL = 1e-6  # acceptance: ODE vs closed form at the named days
GRAD_RTOL = 1e-5  # gradient of the ODE solve vs the closed form's analytic gradient
CHECK_DAYS = [1.0, 7.0, 9.3, 14.0, 28.0, 90.0, 365.0]


@pytest.fixture(scope="module")
def stein():
    return ck.load_model("stein_2019")


def test_typical_values_are_table1(stein):
    assert stein.typical == {
        "fold": 3900.0, "tmax": 9.3, "cmax": 24000.0, "alpha": 0.16, "fb": 0.0079, "beta": 0.0032,
    }


def test_ode_matches_closed_form(stein):
    ds = ck.simulate(stein, ck.single(1e6), times=[0.0] + CHECK_DAYS, engine="diffrax")
    got = ds["car_copies"].values[0]
    want = np.asarray(stein.closed_form(np.array([0.0] + CHECK_DAYS), stein.typical))
    np.testing.assert_allclose(got, want, rtol=CLOSED_FORM_RTOL)
    # The switch is exact: at Tmax the level is Cmax.
    assert got[CHECK_DAYS.index(9.3) + 1] == pytest.approx(24000.0, rel=CLOSED_FORM_RTOL)
    assert ds["car_copies"].attrs["units"] == "copies/µg gDNA"


@pytest.mark.slow  # the default set compares a population with the closed form below (tighter, three regimens)
def test_population_subjects_match_their_closed_form(stein):
    ds = ck.simulate(stein, ck.single(1e6), times=[0.0] + CHECK_DAYS, n_subjects=50, seed=3, engine="diffrax")
    assert not ds["failed"].any()
    for i in range(50):
        p = {k: float(ds[k].values[i]) for k in stein.parameter_names}
        want = np.asarray(stein.closed_form(ds["time"].values, p))
        np.testing.assert_allclose(ds["car_copies"].values[i], want, rtol=CLOSED_FORM_RTOL)


ENGINE_AGREEMENT = 1e-10  # closed form vs the ODE path solved at rtol 1e-13


def test_simulate_uses_the_closed_form_and_it_equals_a_tight_ode_solve(stein):
    regimens = [ck.single(1e6), ck.split(1e6), ck.custom([3.0], [1e6], label="day 3")]
    times = np.arange(-2.0, 120.5, 0.5)  # before the infusion, through Tmax, to day 120
    exact = ck.simulate(stein, regimens, times, n_subjects=40, seed=5)
    ode = ck.simulate(stein, regimens, times, n_subjects=40, seed=5, engine="diffrax", rtol=1e-13, atol=1e-12)
    assert exact.attrs["engine"] == "closed-form" and ode.attrs["engine"] == "diffrax"
    assert int(exact["n_steps"].max()) == 0 and int(ode["n_steps"].min()) > 0
    np.testing.assert_array_equal(exact["tmax"].values, ode["tmax"].values)  # the same virtual subjects
    np.testing.assert_allclose(exact["car_copies"].values, ode["car_copies"].values, rtol=ENGINE_AGREEMENT, atol=0)
    assert not exact["failed"].any()


def test_engine_choice_is_checked(stein):
    states = ck.simulate(stein, ck.single(1e6), [0.0, 14.0], include_states=True)
    # the closed form has no states: the ODE solve runs (on a GPU as the fused kernel)
    assert states.attrs["engine"] == ("fused" if on_gpu() else "ensemble")
    for engine, match in (("closed-form", "no closed form"), ("euler", "not one of")):
        with pytest.raises(InputError, match=match):
            ck.simulate(ck.load_model("cd7_cart"), ck.single(1e6), [0.0, 14.0], engine=engine)
    with pytest.raises(InputError, match="observables only"):
        ck.simulate(stein, ck.single(1e6), [0.0, 14.0], include_states=True, engine="closed-form")


def _log_level(stein, day):
    times = jnp.array([day])

    def f(theta):
        p = dict(zip(stein.parameter_names, theta))
        ys, ok, _ = solve_subject(stein, times, jnp.zeros(1), jnp.zeros(1), p, {"WT": 60.0})
        return jnp.log(stein.observe(ys, p, {})["car_copies"][0])

    def ref(theta):
        p = dict(zip(stein.parameter_names, theta))
        return jnp.log(stein.closed_form(day, p))

    return f, ref


@pytest.mark.parametrize("day", [pytest.param(5.0, marks=pytest.mark.slow), 14.0,
                                 pytest.param(60.0, marks=pytest.mark.slow)])
def test_gradients_match_closed_form_including_tmax(stein, day):
    f, ref = _log_level(stein, day)
    theta = jnp.array(list(stein.typical.values()))
    g = jax.jit(jax.grad(f))(theta)
    g_ref = jax.grad(ref)(theta)
    assert np.all(np.isfinite(g))
    i_tmax = stein.parameter_names.index("tmax")
    assert abs(g_ref[i_tmax]) > 1e-3  # Tmax matters at these days, so the check has teeth
    np.testing.assert_allclose(g, g_ref, rtol=GRAD_RTOL, atol=1e-9)


def test_auc_0_28_matches_analytic(stein):
    p = stein.typical
    times = np.union1d(np.linspace(0, 28, 2801), [p["tmax"]])
    ds = ck.simulate(stein, ck.single(1e6), times=times)
    rho = np.log(p["fold"]) / p["tmax"]
    r0 = p["cmax"] / p["fold"]
    rise = r0 / rho * (np.exp(rho * p["tmax"]) - 1)
    d = 28 - p["tmax"]
    fall = p["cmax"] * ((1 - p["fb"]) / p["alpha"] * (1 - np.exp(-p["alpha"] * d))
                        + p["fb"] / p["beta"] * (1 - np.exp(-p["beta"] * d)))
    res = ck.nca(ds)
    assert float(res["auc_0_28"].values[0]) == pytest.approx(rise + fall, rel=1e-3)
    assert float(res["cmax"].values[0]) == pytest.approx(p["cmax"], rel=CLOSED_FORM_RTOL)
    assert float(res["tmax"].values[0]) == pytest.approx(p["tmax"])
