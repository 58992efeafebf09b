"""cd7_cart and cd7_carnk: an independent scipy reference for the piecewise solve, dosing and
observables; the clinical behaviour the cards promise; product types; properties (zero dose,
non-negative states, finite gradients).

The scipy reference integrates the model's own vector field (pure jnp, called through numpy)
with ``solve_ivp`` between infusions and adds each dose to the dose state itself, so what is
checked is carkin's diffrax solve, event handling, cell-to-state conversion and observables.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import carkin as ck
from carkin.solve import solve_subject

SCIPY_METHOD = "LSODA"
SCIPY_RTOL, SCIPY_ATOL = 1e-10, 1e-12  # the reference solve
TIGHT_RTOL, TIGHT_ATOL = 1e-10, 1e-12  # carkin at reference settings
REF_RTOL = 1e-4  # acceptance: carkin vs scipy, relative, at daily times
REF_FLOOR = 1e-6  # ... where the reference observable exceeds this (in its own units)
ZERO_DOSE_RTOL = 1e-4  # untreated tumour / normal-cell course vs scipy at the model's default tolerances
SPLIT_EQ_RTOL = 1e-10  # a one-fraction split is the same regimen as a single infusion
GRAD_FD_RTOL = 1e-3  # reverse-mode gradient vs central finite differences (both at reference tolerance)
FD_REL_STEP = 1e-4
NEG_TOL = 1e-5  # states may undershoot zero by O(atol = 1e-6) where the exact solution is ~0
UNEDITED_MAX_CMAX_RATIO = 0.5  # unedited CD7 CAR-T must peak at most half as high as knockout
NK_CONTRACTED_FRACTION = 0.25  # CAR-NK contracted below a quarter of the peak by day 60 ...
NK_PERSIST_FRACTION = 0.01  # ... while the persistent pool keeps more than 1% of it to day 90 (Liu 2020)

DAYS = np.arange(0.0, 91.0)
COMPARED = ("car_copies", "cd7_cells", "blasts")
CART_DOSES = (1e6, 3e6, 1e7, 3e7, 1e8)
CARNK_DOSES = (1e7, 2e7, 5e7)
REFERENCE_REGIMENS = {"cd7_cart": (ck.split(1e7), ck.single(1e7)), "cd7_carnk": (ck.split(2e7), ck.single(2e7))}


# --- the scipy reference ------------------------------------------------------------------------

def typical_covariates(model):
    return {c.name: c.typical for c in model.covariates}


def numpy_rhs(model, p, cov):
    """The model's vector field as f(t, y) -> ndarray, compiled once (phase 0: no switch here)."""
    names, cnames = list(p), list(cov)
    fn = jax.jit(lambda t, y, theta, c: model.vector_field(t, y, dict(zip(names, theta)), dict(zip(cnames, c)), 0))
    theta = np.array([p[k] for k in names], float)
    c = np.array([cov[k] for k in cnames], float)
    return lambda t, y: np.asarray(fn(t, y, theta, c))


def scipy_states(model, regimen, times, p, cov):
    """States at ``times`` by solve_ivp between infusions; at an infusion time the post-dose value."""
    rhs = numpy_rhs(model, p, cov)
    scale = float(model.cells_to_state(p, cov))
    i_dose = model.state_names.index(model.dose_state)
    doses = [(float(d), a * cov["WT"] * scale) for d, a in zip(regimen.days, regimen.amounts_per_kg)]
    y = np.asarray(model.initial_state(p, cov), float)
    out = np.full((times.size, y.size), np.nan)
    t_cur = min(float(times[0]), doses[0][0])

    def run(t0, t1, y, sel):
        t_eval = np.append(times[sel], t1)
        sol = solve_ivp(rhs, (t0, t1), y, method=SCIPY_METHOD, rtol=SCIPY_RTOL, atol=SCIPY_ATOL, t_eval=t_eval)
        assert sol.success, sol.message
        out[sel] = sol.y[:, :-1].T
        return sol.y[:, -1]

    for te, amt in doses:
        if te > t_cur:
            y = run(t_cur, te, y, (times >= t_cur) & (times < te))
        y = y.copy()
        y[i_dose] += amt
        t_cur = te
    out[times == t_cur] = y
    if times[-1] > t_cur:
        out[-1] = run(t_cur, float(times[-1]), y, (times > t_cur) & (times < times[-1]))
    return out


def observe_np(model, states, p, cov):
    return {k: np.asarray(v) for k, v in model.observe(states, p, cov).items()}


def tmax(values, times=DAYS):
    return times[np.argmax(values, axis=-1)]


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cart():
    return ck.load_model("cd7_cart")


@pytest.fixture(scope="module")
def carnk():
    return ck.load_model("cd7_carnk")


@pytest.fixture(scope="module", params=["cd7_cart", "cd7_carnk"])
def model(request):
    return ck.load_model(request.param)


@pytest.fixture(scope="module")
def tight(model):
    """carkin at reference tolerances for the model's reference regimens (one compile)."""
    regs = list(REFERENCE_REGIMENS[model.name])
    return ck.simulate(model, regs, times=DAYS, rtol=TIGHT_RTOL, atol=TIGHT_ATOL)


@pytest.fixture(scope="module")
def cart_typical(cart):
    """Typical subject, default tolerances: every dose single and split, plus zero dose."""
    regs = [ck.single(0.0)] + [r for d in CART_DOSES for r in (ck.single(d), ck.split(d))]
    return regs, ck.simulate(cart, regs, times=DAYS, include_states=True)


@pytest.fixture(scope="module")
def carnk_typical(carnk):
    regs = [ck.single(0.0)] + [r for d in CARNK_DOSES for r in (ck.single(d), ck.split(d))]
    return regs, ck.simulate(carnk, regs, times=DAYS, include_states=True)


# --- reference agreement ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", [0, 1], ids=["split", "single"])
def test_matches_scipy_reference(model, tight, which):
    regimen = REFERENCE_REGIMENS[model.name][which]
    assert not tight["failed"].any()
    p, cov = model.typical, typical_covariates(model)
    ref = observe_np(model, scipy_states(model, regimen, DAYS, p, cov), p, cov)
    for name in COMPARED:
        got = tight[name].values[which, 0]
        mask = ref[name] > REF_FLOOR
        assert mask.sum() > 30, name
        np.testing.assert_allclose(got[mask], ref[name][mask], rtol=REF_RTOL, err_msg=f"{model.name} {name}")


@pytest.mark.slow
def test_zero_dose_is_the_untreated_course(model, cart_typical, carnk_typical):
    regs, ds = cart_typical if model.name == "cd7_cart" else carnk_typical
    assert regs[0].total_per_kg == 0.0
    zero = ds.isel(regimen=0, subject=0)
    for name in ("car_copies", "car_cells"):
        assert np.all(zero[name].values == 0.0), name
    car_states = [s for s in model.state_names if s not in ("B", "R", "N")]
    for s in car_states:
        assert np.all(zero[f"state_{s}"].values == 0.0), s
    cov = typical_covariates(model)
    np.testing.assert_allclose(zero["state_N"].values, cov["CD7N0"], rtol=1e-12)  # normal cells stay at baseline
    p = model.typical
    ref = scipy_states(model, regs[0], DAYS, p, cov)
    for j, s in enumerate(model.state_names):
        if s in ("B", "R", "N"):
            np.testing.assert_allclose(zero[f"state_{s}"].values, ref[:, j], rtol=ZERO_DOSE_RTOL, err_msg=s)
    blasts = zero["blasts"].values
    assert np.all(np.diff(blasts) > 0) and blasts[-1] > 90.0  # untreated leukaemia progresses


@pytest.mark.slow
@pytest.mark.parametrize("dose", [2e6, 5e7])
def test_one_fraction_split_equals_single(model, dose):
    # Pad both to three infusion slots with a second regimen so one compiled solve serves both.
    other = ck.split(1e7)
    a = ck.simulate(model, [ck.split(dose, fractions=(1.0,), days=(0,)), other], times=DAYS)
    b = ck.simulate(model, [ck.single(dose), other], times=DAYS)
    for name in model.observables:
        np.testing.assert_allclose(a[name.name].values[0], b[name.name].values[0], rtol=SPLIT_EQ_RTOL, atol=0)


# --- cd7_cart clinical behaviour ---------------------------------------------------------------------

def test_cart_tmax_cmax_and_cd7_course(cart_typical):
    regs, ds = cart_typical
    for i, reg in enumerate(regs[1:], start=1):
        copies = ds["car_copies"].values[i, 0]
        t_peak = tmax(copies)
        assert 5 <= t_peak <= 14, (reg.label, t_peak)  # GC027 at 1e7/kg peaked on days 5-10 (gc027_li2023_tmax)
        assert 1e4 <= copies.max() <= 1e5, (reg.label, copies.max())
        cd7 = ds["cd7_cells"].values[i, 0]
        i_nadir = int(np.argmin(cd7))
        # CD7+ T cells gone from blood by about day 11 (scrna2023_all_cd7pos_t_elimination): nadir in weeks 1-4
        assert 7 <= DAYS[i_nadir] <= 28, (reg.label, DAYS[i_nadir])
        assert cd7[i_nadir] < 0.05 * cd7[0], reg.label  # deep depletion
        assert cd7[-1] > 10 * cd7[i_nadir], reg.label  # then recovery
    cmax = ds["car_copies"].values[1:, 0].max(axis=1)
    assert cmax.max() / cmax.min() < 2.0  # the peak is antigen-limited: nearly flat over 100-fold doses ...
    early = ds["car_copies"].values[1:, 0, :4].max(axis=1)  # ... while days 0-3 scale with dose
    single = [i for i, r in enumerate(regs[1:]) if "single" in r.label]
    assert early[single[-1]] / early[single[0]] > 10.0


@pytest.mark.slow
def test_cart_product_types(cart):
    with pytest.raises(ValueError, match="product_type must be one of"):
        ck.load_model("cd7_cart", product_type="crispr")
    assert ck.load_model("cd7_cart", product_type="unedited").with_values(rho=1.5).product_type == "unedited"
    regs = [ck.split(1e7), ck.single(1e7)]
    cmax = {}
    for product in ("knockout", "unedited"):
        m = ck.load_model("cd7_cart", product_type=product)
        cmax[product] = ck.simulate(m, regs, times=DAYS)["car_copies"].values.max(axis=-1)
    assert np.all(cmax["unedited"] < UNEDITED_MAX_CMAX_RATIO * cmax["knockout"])


# --- cd7_carnk clinical behaviour ------------------------------------------------------------------------

@pytest.mark.slow
def test_carnk_early_peak_contraction_and_low_level_persistence(carnk, carnk_typical):
    regs, ds = carnk_typical
    cov = typical_covariates(carnk)
    per_kg_to_state = float(carnk.cells_to_state(carnk.typical, cov)) * cov["WT"]
    for i, reg in enumerate(regs[1:], start=1):
        cells = ds["car_cells"].values[i, 0]
        assert tmax(cells) < 10, reg.label
        assert cells[DAYS == 60][0] < NK_CONTRACTED_FRACTION * cells.max(), reg.label
        assert cells[DAYS == 90][0] > NK_PERSIST_FRACTION * cells.max(), reg.label
        # what persists is the quiescent pool, not active cells
        assert ds["state_P"].values[i, 0, -1] > 10 * ds["state_E"].values[i, 0, -1], reg.label
        fold = cells.max() / (reg.total_per_kg * per_kg_to_state)  # peak over the whole dose's blood level
        assert 1.5 < fold < 10, (reg.label, fold)  # limited expansion: a few-fold


# --- properties --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_states_non_negative_in_a_population(model):
    regimen = ck.split(1e7 if model.name == "cd7_cart" else 5e7)
    ds = ck.simulate(model, regimen, times=DAYS, n_subjects=200, seed=4, include_states=True)
    assert not ds["failed"].any()
    for s in model.state_names:
        assert float(ds[f"state_{s}"].min()) >= -NEG_TOL, s


def _log_copies_day14(model, regimen, rtol=None, atol=None):
    names = model.parameter_names
    cov = typical_covariates(model)
    times = jnp.array([14.0])
    dose_t = jnp.array(regimen.days)
    dose_c = jnp.array(regimen.amounts_per_kg) * cov["WT"]

    def f(theta):
        p = dict(zip(names, theta))
        ys, _, _ = solve_subject(model, times, dose_t, dose_c, p, cov, rtol=rtol, atol=atol)
        return jnp.log(model.observe(ys, p, cov)["car_copies"][0])

    return f


@pytest.mark.slow
def test_gradient_finite_and_matches_finite_differences(model, tight):
    regimen = REFERENCE_REGIMENS[model.name][0]
    theta = jnp.array([v for _, v in model.values])
    f = _log_copies_day14(model, regimen, rtol=TIGHT_RTOL, atol=TIGHT_ATOL)
    g = np.asarray(jax.jit(jax.grad(f))(theta))
    assert np.all(np.isfinite(g)), dict(zip(model.parameter_names, g))
    # d log(copies) / d log(vcn) is exactly 1: copies are proportional to the vector copy number.
    i_vcn = model.parameter_names.index("vcn")
    assert g[i_vcn] * theta[i_vcn] == pytest.approx(1.0, rel=1e-8)
    # A few mechanistic parameters against central differences of the same tight solve.
    i14 = int(np.flatnonzero(DAYS == 14.0)[0])
    for name in ("rho", "k_kill", "f_blood", "d_e"):
        v = model.typical[name]
        h = FD_REL_STEP * v
        up = ck.simulate(model, list(REFERENCE_REGIMENS[model.name]), times=DAYS, params={name: v + h},
                         rtol=TIGHT_RTOL, atol=TIGHT_ATOL)["car_copies"].values[0, 0, i14]
        down = ck.simulate(model, list(REFERENCE_REGIMENS[model.name]), times=DAYS, params={name: v - h},
                           rtol=TIGHT_RTOL, atol=TIGHT_ATOL)["car_copies"].values[0, 0, i14]
        fd = (np.log(up) - np.log(down)) / (2 * h)
        assert g[model.parameter_names.index(name)] == pytest.approx(fd, rel=GRAD_FD_RTOL), name


def test_cards_and_metadata(model):
    assert model.__class__.__module__.endswith(model.name)
    doc = model.__class__.__module__
    card = __import__(doc, fromlist=["x"]).__doc__
    assert "not" in card and "fitted" in card
    if model.name == "cd7_carnk":
        assert "first" in card and "no kinetic model of CAR-NK" in card
    assert "WT" in [c.name for c in model.covariates]
    assert {"car_copies", "car_cells", "cd7_cells", "blasts"} <= {o.name for o in model.observables}
    for prm in model.parameters:
        assert prm.source.strip() and prm.unit.strip() and prm.description.strip(), prm.name
        assert 0.0 <= prm.omega <= 1.5, prm.name
    assert model.dose_state == "E"
    assert model.solver.rtol == 1e-6 and model.solver.solver == "Tsit5"
