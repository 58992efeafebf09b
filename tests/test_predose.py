"""Output times before the first infusion: the subject is at baseline there, and asking for them
never changes the course after the infusion (references: Stein's closed form, scipy's solve_ivp)."""

import jax
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import carkin as ck

CLOSED_FORM_RTOL = 1e-8  # stein_2019 solves at rtol 1e-10
SCIPY_RTOL, SCIPY_ATOL = 1e-4, 1e-6  # cd7_cart at its own tolerances against solve_ivp at 1e-10
PRE_DOSE = [-5.0, -1.0]


def test_stein_pre_dose_times_are_zero_and_post_dose_values_match_the_closed_form():
    model = ck.load_model("stein_2019")
    after = np.array([0.0, 1.0, 7.0, 10.0, 14.0, 28.0])
    with_pre = ck.simulate(model, ck.single(1e6), times=[*PRE_DOSE, *after])["car_copies"].values[0]
    without = ck.simulate(model, ck.single(1e6), times=after)["car_copies"].values[0]
    exact = np.asarray(model.closed_form(after, model.typical))
    np.testing.assert_array_equal(with_pre[:2], 0.0)  # no CAR cells before the infusion
    np.testing.assert_allclose(with_pre[2:], exact, rtol=CLOSED_FORM_RTOL)
    np.testing.assert_allclose(with_pre[2:], without, rtol=1e-12)
    # day 10 of the issue: 21,477 copies/µg with or without the day -5 sample (not 1.83 million)
    assert with_pre[len(PRE_DOSE) + 3] == pytest.approx(exact[3], rel=CLOSED_FORM_RTOL)
    assert 2e4 < exact[3] < 2.3e4


def test_stein_closed_form_observables_are_zero_before_the_infusion():
    model = ck.load_model("stein_2019")
    t = np.array([-3.0, 0.0, 5.0])
    out = model.closed_form_observables(t, model.typical, {}, np.array([0.0]), np.array([1e8]))
    assert float(out["car_copies"][0]) == 0.0
    np.testing.assert_allclose(out["car_copies"][1:], model.closed_form(t[1:], model.typical), rtol=1e-14)


def _scipy_cd7(model, regimen, times, p, cov):
    """solve_ivp from the first infusion; the baseline state reported before it."""
    fn = jax.jit(lambda t, y: model.vector_field(t, y, p, cov, 0))
    rhs = lambda t, y: np.asarray(fn(t, y))  # noqa: E731
    scale = float(model.cells_to_state(p, cov))
    i_dose = model.state_names.index(model.dose_state)
    y = np.asarray(model.initial_state(p, cov), float)
    out = np.full((times.size, y.size), np.nan)
    out[times < regimen.days[0]] = np.asarray(model.baseline_state(p, cov), float)
    doses = list(zip(regimen.days, regimen.amounts_per_kg)) + [(float(times[-1]) + 1.0, 0.0)]
    t_cur = regimen.days[0]
    for (td, amt), (t_next, _) in zip(doses, doses[1:]):
        y = y.copy()
        y[i_dose] += amt * cov["WT"] * scale
        sel = (times >= td) & (times < t_next)
        sol = solve_ivp(rhs, (t_cur, t_next), y, method="LSODA", rtol=1e-10, atol=1e-12,
                        t_eval=np.append(times[sel], t_next))
        assert sol.success, sol.message
        out[sel] = sol.y[:, :-1].T
        y, t_cur = sol.y[:, -1], t_next
    return out


@pytest.mark.slow
def test_cd7_cart_pre_dose_times_against_scipy_and_without_them():
    model = ck.load_model("cd7_cart")
    regimen = ck.split(1e7)
    times = np.array([-7.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 7.0, 10.0, 14.0, 21.0, 28.0])
    ds = ck.simulate(model, regimen, times=times, include_states=True)
    p, cov = model.typical, {c.name: c.typical for c in model.covariates}
    ref = _scipy_cd7(model, regimen, times, p, cov)
    states = np.stack([ds[f"state_{s}"].values[0] for s in model.state_names], axis=-1)
    np.testing.assert_allclose(states, ref, rtol=SCIPY_RTOL, atol=SCIPY_ATOL)
    np.testing.assert_allclose(states[:2], np.asarray(model.baseline_state(p, cov))[None, :].repeat(2, 0),
                               rtol=1e-14)
    post = ck.simulate(model, regimen, times=times[2:])
    for name in ("car_copies", "cd7_cells", "blasts"):
        np.testing.assert_allclose(ds[name].values[0, 2:], post[name].values[0], rtol=1e-12)


@pytest.mark.slow
def test_pre_dose_sampling_does_not_change_population_cmax():
    """The what-if symptom: sampling days [-7, 0, 7, ...] raised the median Cmax."""
    model = ck.load_model("cd7_cart")
    a = ck.simulate(model, ck.split(1e7), times="-7:28:1", n_subjects=16, seed=3)
    b = ck.simulate(model, ck.split(1e7), times="0:28:1", n_subjects=16, seed=3)
    np.testing.assert_allclose(a["car_copies"].sel(time=slice(0, None)).values, b["car_copies"].values, rtol=1e-12)
    np.testing.assert_allclose(ck.nca(a)["cmax"].values, ck.nca(b)["cmax"].values, rtol=1e-12)
