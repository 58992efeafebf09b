"""cd19_cart: diffrax piecewise solve, dosing and observables against scipy; calibration; properties.

The scipy reference below re-implements the model card's equations and
observables in numpy (it does not call the model's code), doses by adding
f_inf x cells / blood volume to E at each infusion time (blood volume per kg
interpolated here from the Linderkamp rows of data/evidence/physiology.csv), and
integrates piecewise between infusions with LSODA at rtol 1e-10.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy.integrate import solve_ivp

import carkin as ck
from carkin.kinetics import WEIGHT
from carkin.simulate import parse_times
from carkin.solve import solve_subject

REF_RTOL = 1e-10  # scipy reference tolerance (relative)
REF_ATOL = 1e-12  # scipy reference tolerance (absolute, cells/µL)
SIM_RTOL, SIM_ATOL = 1e-10, 1e-12  # carkin at reference settings
AGREE_RTOL = 1e-4  # acceptance: carkin vs scipy, relative, at daily times
FLOORS = {"car_copies": 1e-6, "b_cells": 1e-6, "blasts": 1e-8, "car_cells": 1e-8, "cd19_cells": 1e-6,
          "blasts_cd19neg": 1e-10}
SPLIT_EQ_RTOL = 1e-10  # same infusions expressed two ways
VF_RTOL = 1e-12  # numpy re-implementation vs the model's vector field
TMAX_RANGE = (7.0, 14.0)  # days, typical subject at 2e6 /kg
CMAX_REF, CMAX_FACTOR = 24_000.0, 3.0  # Stein 2019 typical Cmax (copies/µg) and allowed factor
NEG_TOL_ATOLS = 10.0  # states may dip below zero by at most this many solver atols (round-off)
MEAN_STEPS_MAX, MAX_STEPS_MAX = 150, 400  # solver steps per subject, 0-365 d, default tolerances
GRAD_FD_RTOL = 1e-3  # reverse-mode gradient vs central difference
DAYS = "0:120:1"
TYPICAL_COV = {"WT": 60.0, "BLAST": 50.0, "BCELL": 100.0}
DOSE_PER_KG = 2e6


@pytest.fixture(scope="module")
def model():
    return ck.load_model("cd19_cart")


# --- independent numpy reference -------------------------------------------------


def rhs(t, y, p):
    e, m, lk, b, ln = y
    c = e + m
    a = lk + p["w_b"] * b
    window = p["g_inf"] + (1.0 - p["g_inf"]) * np.exp(-p["k_ld"] * t)
    stim = p["rho_e"] * window * a**2 / (a**2 + p["k_a"] ** 2) * (1.0 - c / p["k_car"])
    h = p["k_kill"] * c / (p["k_e"] + c + a / p["eta"])
    room = 1.0 - (lk + ln) / p["l_max"]
    return np.array([
        stim * e - (p["d_e"] + p["k_em"]) * e,
        p["k_em"] * e - p["d_m"] * m,
        p["rho_l"] * lk * room - h * lk,
        p["d_b"] * p["bn_norm"] * room * np.exp(-h * p["tau_pre"]) - p["d_b"] * b - h * b,
        p["rho_l"] * ln * room,
    ])


def observables(y, p):
    e, m, lk, b, ln = y
    car = e + m
    leuk = p["wbc"] + car + p["phi_l"] * (lk + ln)
    return {
        "car_copies": car / leuk * p["vcn"] * 151_500.0,
        "car_cells": car,
        "b_cells": b,
        "blasts": 100.0 * (lk + ln) / p["l_max"],
        "cd19_cells": b + p["phi_l"] * lk,
        "blasts_cd19neg": 100.0 * ln / p["l_max"],
    }


def blood_ml_per_kg(weight):
    """Blood volume per kg from the evidence table: each knot is the age group's mean (boys and girls),
    at the group's age-typical weight, interpolated in log weight (as the model card states)."""
    table = pd.read_csv(Path(__file__).resolve().parent.parent / "data" / "evidence" / "physiology.csv")
    value = dict(zip(table["fact_id"], table["value"]))
    knots = [(13.0, "2_3y"), (18.0, "4_6y"), (25.0, "7_10y"), (38.0, "11_14y")]
    w = [k for k, _ in knots] + [70.0]
    v = [(value[f"bv_linderkamp_{g}_m"] + value[f"bv_linderkamp_{g}_f"]) / 2 for _, g in knots] + [67.5]
    return float(np.interp(np.log(weight), np.log(w), v))


def _integrate(y, t0, t1, times, p):
    """States at ``times`` (all within [t0, t1]) and at t1."""
    ends_on_t1 = times.size > 0 and times[-1] == t1
    t_eval = times if ends_on_t1 else np.append(times, t1)
    sol = solve_ivp(rhs, (t0, t1), y, method="LSODA", args=(p,), t_eval=t_eval, rtol=REF_RTOL, atol=REF_ATOL)
    assert sol.success, sol.message
    return sol.y[:, : times.size].T, sol.y[:, -1]


def scipy_course(p, cov, regimen, times):
    """Piecewise LSODA solve from day 0: integrate to each infusion, add it to E, go on.
    Infusion times report the post-infusion value."""
    jump_per_cell = p["f_inf"] / (blood_ml_per_kg(cov["WT"]) * cov["WT"] * 1000.0)  # 1000 µL/mL
    tumour = p["l_max"] * cov["BLAST"] / 100.0
    y = np.array([0.0, 0.0, tumour * (1.0 - p["f_neg"]), cov["BCELL"], tumour * p["f_neg"]])
    out = np.full((len(times), 5), np.nan)
    t_cur = 0.0
    for day, per_kg in zip(regimen.days, regimen.amounts_per_kg):
        if day > t_cur:
            sel = (times >= t_cur) & (times < day)
            out[sel], y = _integrate(y, t_cur, day, times[sel], p)
            t_cur = day
        y = y + np.array([per_kg * cov["WT"] * jump_per_cell, 0.0, 0.0, 0.0, 0.0])
    sel = times >= t_cur
    out[sel], _ = _integrate(y, t_cur, float(times[-1]), times[sel], p)
    return observables(out.T, p)


def assert_agree(got, want, names):
    for name in names:
        g, w = np.asarray(got[name]), np.asarray(want[name])
        keep = np.abs(w) > FLOORS[name]
        assert keep.sum() > 10, name
        np.testing.assert_allclose(g[keep], w[keep], rtol=AGREE_RTOL, err_msg=name)


# --- tests -------------------------------------------------------------------------


def test_numpy_reference_is_the_models_vector_field(model):
    """Guard that the reference encodes the same equations (at positive states)."""
    rng = np.random.default_rng(0)
    p = model.typical
    for t in np.linspace(0.0, 60.0, 20):
        y = rng.uniform(0.0, 1.0, 5) * np.array([500.0, 20.0, 2e5, 300.0, 1e3])
        got = np.asarray(model.vector_field(t, jnp.asarray(y), p, TYPICAL_COV, 0))
        np.testing.assert_allclose(got, rhs(t, y, p), rtol=VF_RTOL, atol=1e-12)


@pytest.mark.parametrize("regimen", [ck.single(DOSE_PER_KG), ck.split(DOSE_PER_KG)], ids=["single", "split"])
def test_matches_scipy_reference(model, regimen):
    times = parse_times(DAYS)
    ds = ck.simulate(model, regimen, times=DAYS, rtol=SIM_RTOL, atol=SIM_ATOL)
    assert not ds["failed"].any()
    want = scipy_course(model.typical, TYPICAL_COV, regimen, times)
    got = {k: ds[k].values[0] for k in FLOORS}
    assert_agree(got, want, ["car_copies", "b_cells", "blasts", "car_cells", "cd19_cells", "blasts_cd19neg"])
    # the post-infusion value is reported at an infusion time: day 0 already holds the first dose
    assert got["car_cells"][0] > 0


def test_typical_tmax_and_cmax_are_tisagenlecleucel_like(model):
    ds = ck.simulate(model, ck.single(DOSE_PER_KG), times=DAYS)  # daily, as sampled in trials
    c = ds["car_copies"].values[0]
    tmax, cmax = float(ds["time"].values[c.argmax()]), float(c.max())
    assert TMAX_RANGE[0] <= tmax <= TMAX_RANGE[1], tmax
    assert CMAX_REF / CMAX_FACTOR <= cmax <= CMAX_REF * CMAX_FACTOR, cmax
    # expansion clears blasts and empties blood of normal B cells (aplasia) by day 28
    assert ds["blasts"].values[0, 28] < 5.0
    assert ds["b_cells"].values[0, 28] < 20.0


def test_zero_dose_gives_zero_car_and_the_untreated_course(model):
    times = np.arange(0.0, 121.0)
    ds = ck.simulate(model, ck.single(0.0), times=times, rtol=SIM_RTOL, atol=SIM_ATOL)
    for name in ("car_copies", "car_cells"):
        assert np.all(ds[name].values == 0.0), name
    p = model.typical
    # leukaemia alone (CD19+ and CD19-negative together) grows logistically: closed form
    l0 = p["l_max"] * TYPICAL_COV["BLAST"] / 100.0
    logistic = p["l_max"] / (1.0 + (p["l_max"] / l0 - 1.0) * np.exp(-p["rho_l"] * times))
    np.testing.assert_allclose(ds["blasts"].values[0], 100.0 * logistic / p["l_max"], rtol=AGREE_RTOL)
    want = scipy_course(p, TYPICAL_COV, ck.single(0.0), times)
    assert_agree({k: ds[k].values[0] for k in FLOORS}, want, ["b_cells", "blasts", "cd19_cells"])


def test_split_on_day_zero_equals_single(model):
    single = ck.simulate(model, ck.single(DOSE_PER_KG), times=DAYS)
    one = ck.simulate(model, ck.split(DOSE_PER_KG, fractions=(1.0,), days=(0.0,)), times=DAYS)
    three = ck.simulate(model, ck.split(DOSE_PER_KG, days=(0.0, 0.0, 0.0)), times=DAYS)
    for name in FLOORS:
        np.testing.assert_allclose(one[name].values, single[name].values, rtol=SPLIT_EQ_RTOL, err_msg=name)
        np.testing.assert_allclose(three[name].values, single[name].values, rtol=SPLIT_EQ_RTOL,
                                   atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_population_states_stay_non_negative_and_steps_are_few(model):
    from carkin.simulation.ensemble import SAVES_PER_STEP

    steps = {}
    for engine in ("diffrax", "ensemble"):
        ds = ck.simulate(model, ck.single(1e7), times="0:365:1", n_subjects=200, seed=4, include_states=True,
                         engine=engine)
        assert not ds["failed"].any()
        neg_tol = NEG_TOL_ATOLS * model.solver.atol
        for s in model.state_names:
            v = ds[f"state_{s}"].values
            assert np.all(np.isfinite(v)), s
            assert v.min() >= -neg_tol, (s, v.min())
        for o in model.observables:
            assert ds[o.name].values.min() >= 0.0, o.name
        steps[engine] = ds["n_steps"].values
    # the adaptive solve needs few steps (diffrax: steps are never cut at output times) ...
    assert steps["diffrax"].mean() < MEAN_STEPS_MAX
    assert steps["diffrax"].max() < MAX_STEPS_MAX
    # ... and the ensemble, which ends a step after at most SAVES_PER_STEP output times, no more than that
    # cut adds on the 366 daily output times
    assert steps["ensemble"].mean() < MEAN_STEPS_MAX + 366 / SAVES_PER_STEP


def test_vector_field_keeps_the_non_negative_orthant_invariant(model):
    """Quasi-positivity: on the face y_i = 0 (others >= 0) dy_i/dt >= 0, and a state
    pushed slightly below zero is driven back up; so the exact flow stays non-negative."""
    rng = np.random.default_rng(1)
    names = model.parameter_names
    typ = np.array([model.typical[n] for n in names])
    for _ in range(50):
        p = dict(zip(names, typ * np.exp(0.5 * rng.standard_normal(typ.size))))
        p["f_inf"], p["phi_l"] = min(p["f_inf"], 0.5), min(p["phi_l"], 0.5)
        p["f_neg"], p["g_inf"] = min(p["f_neg"], 0.5), min(p["g_inf"], 0.9)
        y = rng.uniform(0.0, 1.0, 5) * np.array([2000.0, 50.0, 2e5, 500.0, 1e3])
        for i in range(5):
            for value in (0.0, -1e-6):
                z = y.copy()
                z[i] = value
                d = float(model.vector_field(0.0, jnp.asarray(z), p, TYPICAL_COV, 0)[i])
                assert d >= 0.0, (model.state_names[i], value, d)


@pytest.mark.slow
def test_gradient_of_log_copies_at_day_14_is_finite(model):
    names = model.parameter_names
    times = jnp.array([14.0])
    cov = {k: jnp.asarray(v) for k, v in TYPICAL_COV.items()}

    def log_copies(theta):
        p = dict(zip(names, theta))
        ys, ok, _ = solve_subject(model, times, jnp.zeros(1), jnp.array([DOSE_PER_KG * TYPICAL_COV["WT"]]), p, cov,
                                  rtol=SIM_RTOL, atol=SIM_ATOL)
        return jnp.log(model.observe(ys, p, cov)["car_copies"][0])

    value_and_grad = jax.jit(jax.value_and_grad(log_copies))  # one compile serves value and gradient
    theta = jnp.array([model.typical[n] for n in names])
    _, g = value_and_grad(theta)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), dict(zip(names, g))
    # spot-check against central differences on parameters that matter at day 14
    for name in ("rho_e", "d_e", "eta", "wbc"):
        i = names.index(name)
        step = 1e-4 * float(theta[i])
        up, _ = value_and_grad(theta.at[i].add(step))
        down, _ = value_and_grad(theta.at[i].add(-step))
        assert g[i] == pytest.approx((float(up) - float(down)) / (2 * step), rel=GRAD_FD_RTOL), name
    # log copies is linear in log VCN: d/dVCN = 1/VCN exactly
    assert g[names.index("vcn")] == pytest.approx(1.0 / model.typical["vcn"], rel=1e-9)


def test_every_parameter_is_documented(model):
    for prm in model.parameters:
        assert prm.unit and prm.description and prm.source, prm.name
        # log-scale SDs stay below 1.5; the logit-scale SD of the rare CD19-negative fraction is wider
        assert 0.0 <= prm.omega <= (2.5 if prm.kind == "fraction" else 1.5), prm.name
    assert model.dose_state == "E"
    assert {c.name for c in model.covariates} >= {"WT", "BLAST", "BCELL"}
    assert model.covariate("WT") == WEIGHT
