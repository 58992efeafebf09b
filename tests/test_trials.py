"""Dose-escalation designs: closed forms, exact vs Monte Carlo, subject pools, BOIN and CRM references, validation."""

import json
import math
import time

import numpy as np
import pytest
from scipy import integrate, stats

from carkin.trials import (
    BOIN,
    CRM,
    OperatingCharacteristics,
    ThreePlusThree,
    TrialPath,
    exact_operating_characteristics,
    run_trial,
    simulate_trials,
)

CLOSED_FORM_TOL = 1e-12  # exact enumeration vs closed forms: rounding only
MC_TRIALS = 100_000  # Monte Carlo trials when comparing with exact results
MC_Z = 3.0  # Monte Carlo and exact must agree within this many standard errors
MAX_SECONDS_100K = 30.0  # 100,000 trials of a 5-dose 3+3
CRM_QUAD_RTOL = 1e-7  # grid posterior mean vs adaptive quadrature
SANITY_TRIALS = 2_000
SANITY_MIN_P = 0.95  # obvious scenarios must be decided this way in at least this fraction of trials
BOUNDARY_TOL = 1e-3  # published boundaries are given to 3 decimals (some rounded, some truncated)

ESCALATION_ONLY = ThreePlusThree("escalation-only")
DE_ESCALATION = ThreePlusThree("de-escalation")
PROBABILITIES = [0.0, 0.05, 0.1, 0.2, 0.33, 0.5, 0.8, 1.0]


def clear_3plus3(p):
    """P(a 3+3 dose clears): 0/3, or 1/3 then 0/3."""
    return (1 - p) ** 3 + 3 * p * (1 - p) ** 5


def clear_accelerated(p):
    """P(an accelerated-titration dose clears): no DLT in 1, or a DLT then none in 2 more."""
    return (1 - p) + p * (1 - p) ** 2


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("design", [ESCALATION_ONLY, DE_ESCALATION])
@pytest.mark.parametrize("p", PROBABILITIES)
def test_single_3plus3_dose_matches_closed_forms(design, p):
    oc = exact_operating_characteristics(design, [p])
    c = clear_3plus3(p)
    np.testing.assert_allclose(oc.p_select, [1 - c, c], atol=CLOSED_FORM_TOL)
    assert oc.p_mtd_not_reached == pytest.approx(c, abs=CLOSED_FORM_TOL)
    expected_n = 3 + 3 * 3 * p * (1 - p) ** 2
    assert oc.expected_n == pytest.approx(expected_n, abs=CLOSED_FORM_TOL)
    assert oc.expected_dlt == pytest.approx(p * expected_n, abs=CLOSED_FORM_TOL)
    assert oc.method == "exact" and oc.n_trials is None


@pytest.mark.parametrize("variant", ["escalation-only", "de-escalation"])
@pytest.mark.parametrize("p", PROBABILITIES)
def test_single_accelerated_dose_matches_closed_forms(variant, p):
    oc = exact_operating_characteristics(ThreePlusThree(variant, accelerated_doses=1), [p])
    c = clear_accelerated(p)
    np.testing.assert_allclose(oc.p_select, [1 - c, c], atol=CLOSED_FORM_TOL)
    assert oc.expected_n == pytest.approx(1 + 2 * p, abs=CLOSED_FORM_TOL)


def test_escalation_only_selection_is_a_product_of_clearing_probabilities():
    p = np.array([0.02, 0.1, 0.22, 0.4, 0.6])
    for accelerated in (0, 2):
        oc = exact_operating_characteristics(ThreePlusThree("escalation-only", accelerated_doses=accelerated), p)
        clears = [clear_accelerated(q) if k < accelerated else clear_3plus3(q) for k, q in enumerate(p)]
        reached = np.cumprod([1.0, *clears])  # P(dose k is reached), then P(top clears)
        expected = [reached[k] * (1 - clears[k]) for k in range(len(p))] + [reached[-1]]
        # failing at dose k selects dose k (1-based index k): none when k == 0
        np.testing.assert_allclose(oc.p_select, expected, atol=CLOSED_FORM_TOL)
        assert oc.p_mtd_not_reached == pytest.approx(np.prod(clears), abs=CLOSED_FORM_TOL)


@pytest.mark.parametrize("p1, p2", [(0.05, 0.5), (0.2, 0.3), (0.4, 0.9)])
def test_de_escalation_to_a_dose_expanded_to_six(p1, p2):
    oc = exact_operating_characteristics(DE_ESCALATION, [p1, p2])
    q1 = 1 - p1
    # dose 1 cleared 0/3 and then <= 1 DLT in 3 more, or cleared 1/6 already (MTD at once)
    holds = q1**3 * (q1**3 + 3 * p1 * q1**2) + 3 * p1 * q1**5
    select_dose_1 = (1 - clear_3plus3(p2)) * holds
    assert oc.p_select[1] == pytest.approx(select_dose_1, abs=CLOSED_FORM_TOL)
    assert oc.p_select[2] == pytest.approx(clear_3plus3(p1) * clear_3plus3(p2), abs=CLOSED_FORM_TOL)
    assert oc.p_select.sum() == pytest.approx(1.0, abs=CLOSED_FORM_TOL)


@pytest.mark.parametrize(
    "design, selected, n_per_dose",
    [
        (ESCALATION_ONLY, 1, [3, 3, 3]),
        (DE_ESCALATION, 1, [3, 6, 3]),  # dose 2 expanded to 6, no DLT: MTD
        (ThreePlusThree("escalation-only", accelerated_doses=2), 1, [1, 1, 3]),
        (ThreePlusThree("de-escalation", accelerated_doses=2), 1, [1, 6, 3]),  # 1 subject expanded to 6
        (ThreePlusThree("de-escalation", accelerated_doses=3), 1, [1, 6, 3]),  # accelerated dose fails on 3
    ],
)
def test_deterministic_paths(design, selected, n_per_dose):
    p = [0.0, 0.0, 1.0]
    path = run_trial(design, p, rng=0)
    assert path.selected == selected and not path.mtd_not_reached
    np.testing.assert_array_equal(path.n_per_dose, n_per_dose)
    oc = exact_operating_characteristics(design, p)
    assert oc.p_select[selected + 1] == 1.0
    np.testing.assert_allclose(oc.expected_n_per_dose, n_per_dose)


def test_de_escalation_when_every_dose_is_toxic_selects_none():
    path = run_trial(DE_ESCALATION, [1.0, 1.0, 1.0], rng=0)
    assert path.selected == -1
    np.testing.assert_array_equal(path.n_per_dose, [3, 0, 0])
    path = run_trial(DE_ESCALATION, [0.0, 1.0, 1.0], rng=0)
    assert path.selected == 0 and path.n_per_dose.tolist() == [6, 3, 0]


# ---------------------------------------------------------------------------------------------
# Exact vs Monte Carlo
# ---------------------------------------------------------------------------------------------


def assert_agree_within_standard_errors(mc: OperatingCharacteristics, exact: OperatingCharacteristics):
    n = mc.n_trials
    # binomial SE from the exact probability: defined even where the simulation saw no event
    se_select = np.sqrt(exact.p_select * (1 - exact.p_select) / n)
    np.testing.assert_array_less(np.abs(mc.p_select - exact.p_select), MC_Z * se_select + 1e-15)
    p_top = exact.p_mtd_not_reached
    assert abs(mc.p_mtd_not_reached - p_top) <= MC_Z * math.sqrt(p_top * (1 - p_top) / n) + 1e-15
    assert abs(mc.expected_n - exact.expected_n) <= MC_Z * mc.se_expected_n
    assert abs(mc.expected_dlt - exact.expected_dlt) <= MC_Z * mc.se_expected_dlt


EXACT_SCENARIOS = {
    "escalation-only, 5 doses": (ESCALATION_ONLY, [0.05, 0.10, 0.20, 0.35, 0.50]),
    "de-escalation, 4 doses": (DE_ESCALATION, [0.03, 0.08, 0.15, 0.30]),
    "CAR-NK accelerated + 3+3, escalation-only": (ThreePlusThree(accelerated_doses=1), [0.02, 0.08, 0.25]),
    "CAR-NK accelerated + 3+3, de-escalation": (ThreePlusThree("de-escalation", 1), [0.02, 0.08, 0.25]),
    "de-escalation, toxic top dose": (DE_ESCALATION, [0.05, 0.10, 0.20, 0.70]),
}


@pytest.mark.parametrize("name", list(EXACT_SCENARIOS))
def test_monte_carlo_agrees_with_exact(name):
    design, p = EXACT_SCENARIOS[name]
    exact = exact_operating_characteristics(design, p)
    mc = simulate_trials(design, p, n_trials=MC_TRIALS, seed=20240611)
    assert mc.method == "monte-carlo" and mc.n_trials == MC_TRIALS
    assert_agree_within_standard_errors(mc, exact)


def test_subject_pools_match_exact_on_their_means():
    """Independent subjects drawn from a pool behave like the pool mean: a mixture of Bernoullis is Bernoulli."""
    rng = np.random.default_rng(7)
    means, concentration = np.array([0.03, 0.10, 0.22, 0.40]), 2.0  # low concentration: very heterogeneous
    pools = rng.beta(means[:, None] * concentration, (1 - means[:, None]) * concentration, size=(4, 2000))
    design = ThreePlusThree("de-escalation", accelerated_doses=1)
    exact = exact_operating_characteristics(design, pools.mean(axis=1))
    mc = simulate_trials(design, pools=pools, n_trials=MC_TRIALS, seed=11)
    assert_agree_within_standard_errors(mc, exact)


def test_100k_trials_are_fast():
    start = time.perf_counter()
    simulate_trials(ESCALATION_ONLY, [0.05, 0.10, 0.20, 0.35, 0.50], n_trials=MC_TRIALS, seed=3)
    assert time.perf_counter() - start < MAX_SECONDS_100K


# ---------------------------------------------------------------------------------------------
# Simulator plumbing: reproducibility, per-trial records, identifiable subjects
# ---------------------------------------------------------------------------------------------


def test_simulation_is_reproducible_from_the_seed():
    p = [0.1, 0.2, 0.3]
    first = simulate_trials(DE_ESCALATION, p, n_trials=500, seed=5).to_dict()
    assert first == simulate_trials(DE_ESCALATION, p, n_trials=500, seed=5).to_dict()
    assert first != simulate_trials(DE_ESCALATION, p, n_trials=500, seed=6).to_dict()
    assert run_trial(BOIN(0.3), p, rng=9) == run_trial(BOIN(0.3), p, rng=np.random.default_rng(9))


def test_per_trial_records_add_up_to_the_operating_characteristics():
    p = [0.05, 0.15, 0.3, 0.5]
    oc, trials = simulate_trials(DE_ESCALATION, p, n_trials=3000, seed=2, return_trials=True)
    assert len(trials) == 3000
    assert {"trial", "selected_dose", "n_treated", "n_dlt", "mtd_not_reached", "n_dose_4", "dlt_dose_4"} <= set(
        trials.columns
    )
    counts = np.bincount(trials["selected_dose"], minlength=len(p) + 1) / len(trials)
    np.testing.assert_allclose(counts, oc.p_select)
    assert trials["n_treated"].mean() == pytest.approx(oc.expected_n)
    assert trials["n_dlt"].mean() == pytest.approx(oc.expected_dlt)
    per_dose = trials[[f"n_dose_{k}" for k in range(1, 5)]].to_numpy()
    np.testing.assert_array_equal(per_dose.sum(axis=1), trials["n_treated"])
    np.testing.assert_allclose(per_dose.mean(axis=0), oc.expected_n_per_dose)
    assert trials["mtd_not_reached"].mean() == pytest.approx(oc.p_mtd_not_reached)


def test_pool_subjects_are_identifiable():
    m = 50
    pools = np.zeros((3, m))
    pools[:, ::2] = 1.0  # even rows always have a DLT, odd rows never
    for seed in range(20):
        path = run_trial(ThreePlusThree("de-escalation", 1), pools=pools, rng=seed)
        assert isinstance(path, TrialPath)
        for cohort in path.cohorts:
            assert len(cohort.subjects) == cohort.n == len(cohort.subject_dlt)
            assert all(0 <= s < m for s in cohort.subjects)
            assert cohort.subject_dlt == tuple(pools[cohort.dose, s] == 1.0 for s in cohort.subjects)
            assert cohort.n_dlt == sum(cohort.subject_dlt)
        assert path.n_treated == path.n_per_dose.sum() and path.n_dlt == path.dlt_per_dose.sum()
    path = run_trial(ESCALATION_ONLY, [0.1, 0.2], rng=0)
    assert all(s == -1 for c in path.cohorts for s in c.subjects)


def test_operating_characteristics_are_json_ready():
    p = [0.1, 0.2, 0.4]
    for oc in (
        exact_operating_characteristics(DE_ESCALATION, p),
        simulate_trials(DE_ESCALATION, p, n_trials=200),
        simulate_trials(BOIN(0.3), p, n_trials=200),
    ):
        d = json.loads(json.dumps(oc.to_dict(), allow_nan=False))
        assert len(d["p_select"]) == len(p) + 1 and len(d["se_expected_n_per_dose"]) == len(p)
        assert d["method"] in ("exact", "monte-carlo")
    assert d["design"] == "BOIN" and d["variant"] is None and d["p_mtd_not_reached"] is None
    assert ThreePlusThree(accelerated_doses=1).name == "accelerated titration + 3+3"


# ---------------------------------------------------------------------------------------------
# BOIN
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, lambda_e, lambda_d", [(0.30, 0.236, 0.358), (0.25, 0.197, 0.298)])
def test_boin_boundaries_match_published_values(target, lambda_e, lambda_d):
    bounds = BOIN(target).boundaries()
    assert bounds["lambda_e"] == pytest.approx(lambda_e, abs=BOUNDARY_TOL)
    assert bounds["lambda_d"] == pytest.approx(lambda_d, abs=BOUNDARY_TOL)


def test_boin_decision_table_for_target_030_cohorts_of_3():
    bounds = BOIN(0.3, cohort_size=3, n_cohorts=10).boundaries()
    assert bounds["n"] == list(range(1, 31))
    at = {n: i for i, n in enumerate(bounds["n"])}
    every_cohort = list(range(3, 31, 3))
    # Liu & Yuan 2015 boundary table (target 0.3, default p_saf / p_tox)
    assert [bounds["escalate_if_at_most"][at[n]] for n in every_cohort] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 7]
    assert [bounds["deescalate_if_at_least"][at[n]] for n in every_cohort] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    eliminate = bounds["eliminate_if_at_least"]
    assert [eliminate[at[n]] for n in (3, 6, 9, 12)] == [3, 4, 5, 7]
    assert eliminate[at[1]] is None and eliminate[at[2]] is None  # never on fewer than 3
    # and every threshold is the smallest count with P(p > 0.3 | data) > 0.95 under Beta(1, 1)
    for n in range(3, 31):
        posterior_above = [stats.beta(y + 1, n - y + 1).sf(0.3) for y in range(n + 1)]
        smallest = next((y for y, prob in enumerate(posterior_above) if prob > 0.95), None)
        assert eliminate[at[n]] == smallest


def test_boin_mtd_selection_isotonic_and_ties():
    design = BOIN(0.3)
    assert design.select_mtd([3, 6, 3], [0, 1, 2]) == 1
    assert design.select_mtd([3, 3], [1, 0]) == 1  # pooled estimate below target: the higher dose
    assert design.select_mtd([3, 3], [2, 1]) == 0  # pooled estimate above target: the lower dose
    assert design.select_mtd([3, 0], [3, 0]) == -1  # lowest dose eliminated
    assert design.select_mtd([6, 3, 3], [0, 3, 0]) == 0  # dose 2 eliminated: dose 3 is no longer admissible


def test_boin_sanity():
    design = BOIN(0.3)
    safe = simulate_trials(design, [0.01] * 5, n_trials=SANITY_TRIALS, seed=1)
    assert safe.p_select[-1] >= SANITY_MIN_P
    toxic = simulate_trials(design, [0.8, 0.85, 0.9, 0.95, 0.99], n_trials=SANITY_TRIALS, seed=1)
    assert toxic.p_select[0] >= SANITY_MIN_P
    assert np.isnan(toxic.p_mtd_not_reached)
    pooled = simulate_trials(design, pools=np.full((3, 10), 0.01), n_trials=200, seed=1)
    assert pooled.p_select[-1] >= SANITY_MIN_P


# ---------------------------------------------------------------------------------------------
# CRM
# ---------------------------------------------------------------------------------------------

SKELETON = (0.05, 0.12, 0.25, 0.40, 0.55)


def test_crm_posterior_mean_matches_quadrature():
    design = CRM(SKELETON, target=0.25)
    n, y = np.array([3, 6, 3, 0, 0]), np.array([0, 1, 2, 0, 0])
    log_s = np.log(SKELETON)

    def likelihood_times_prior(a):
        with np.errstate(over="ignore"):  # far right tail: exp(a) = inf gives p = 0, as it should
            p = np.exp(np.exp(a) * log_s)
        return np.prod(p**y * (1 - p) ** (n - y)) * stats.norm.pdf(a, scale=design.prior_sd)

    normaliser = integrate.quad(likelihood_times_prior, -np.inf, np.inf)[0]
    with np.errstate(over="ignore"):
        expected = [
            integrate.quad(lambda a, s=s: s ** np.exp(a) * likelihood_times_prior(a), -np.inf, np.inf)[0] / normaliser
            for s in SKELETON
        ]
    np.testing.assert_allclose(design.posterior_mean_dlt(n, y), expected, rtol=CRM_QUAD_RTOL)


def test_crm_sanity_and_no_skipping():
    design = CRM(SKELETON, target=0.25)
    safe = simulate_trials(design, [0.01] * 5, n_trials=SANITY_TRIALS, seed=1)
    assert safe.p_select[-1] >= SANITY_MIN_P
    toxic = simulate_trials(design, [0.8, 0.85, 0.9, 0.95, 0.99], n_trials=SANITY_TRIALS, seed=1)
    assert toxic.p_select[1] >= SANITY_MIN_P  # no stopping rule: the lowest dose is the best it can do
    path = run_trial(design, [0.0] * 5, rng=0)
    doses = [c.dose for c in path.cohorts]
    assert doses[:5] == [0, 1, 2, 3, 4]  # one level at a time even though every dose looks safe
    assert path.selected == 4 and path.n_treated == design.cohort_size * design.n_cohorts


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ThreePlusThree("rolling-six"), "variant"),
        (lambda: ThreePlusThree(accelerated_doses=-1), "accelerated_doses"),
        (lambda: ThreePlusThree(accelerated_doses=1.5), "accelerated_doses"),
        (lambda: BOIN(1.2), "target"),
        (lambda: BOIN(0.3, p_saf=0.35), "p_saf"),
        (lambda: BOIN(0.3, p_tox=0.25), "p_tox"),
        (lambda: BOIN(0.3, cohort_size=0), "cohort_size"),
        (lambda: BOIN(0.3, elimination_cutoff=1.0), "elimination_cutoff"),
        (lambda: CRM([0.1, 0.1, 0.3], 0.25), "skeleton"),
        (lambda: CRM([0.0, 0.1, 0.3], 0.25), "skeleton"),
        (lambda: CRM([0.1, 0.2], 0.25, prior_sd=0.0), "prior_sd"),
        (lambda: exact_operating_characteristics(DE_ESCALATION, [0.1, 1.2]), "p_dlt"),
        (lambda: exact_operating_characteristics(DE_ESCALATION, []), "p_dlt"),
        (lambda: exact_operating_characteristics(DE_ESCALATION, [[0.1, 0.2]]), "p_dlt"),
        (lambda: exact_operating_characteristics(ThreePlusThree(accelerated_doses=3), [0.1, 0.2]), "accelerated_doses"),
        (lambda: exact_operating_characteristics(BOIN(0.3), [0.1, 0.2]), "only available for 3\\+3"),
        (lambda: exact_operating_characteristics(CRM([0.1, 0.2], 0.25), [0.1, 0.2]), "only available for 3\\+3"),
        (lambda: simulate_trials(DE_ESCALATION, [0.1, float("nan")]), "p_dlt"),
        (lambda: simulate_trials(DE_ESCALATION), "p_dlt"),
        (lambda: simulate_trials(DE_ESCALATION, [0.1], pools=[[0.1]]), "pools"),
        (lambda: simulate_trials(DE_ESCALATION, pools=[0.1, 0.2]), "pools"),
        (lambda: simulate_trials(DE_ESCALATION, pools=np.zeros((2, 0))), "pools"),
        (lambda: simulate_trials(DE_ESCALATION, pools=[[0.1, -0.1]]), "pools"),
        (lambda: simulate_trials(DE_ESCALATION, [0.1], n_trials=0), "n_trials"),
        (lambda: simulate_trials(CRM([0.1, 0.2], 0.25), [0.1, 0.2, 0.3]), "skeleton"),
        (lambda: simulate_trials("3+3", [0.1]), "design"),
        (lambda: run_trial(ESCALATION_ONLY, pools=[[2.0]]), "pools"),
    ],
)
def test_bad_inputs_are_refused_with_a_message_naming_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()
