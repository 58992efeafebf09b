"""Evidence tables: well-formed, every row sourced; tolerance rules against scipy and closed forms."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from carkin import evidence

EXACT = 1e-12


@pytest.mark.parametrize("kind", evidence.KINDS)
def test_every_row_has_a_source_a_location_and_a_known_statistic(kind):
    df = evidence.table(kind)
    assert len(df) > 0
    assert df["row_id"].is_unique
    for _, r in df.iterrows():
        assert isinstance(r["source"], str) and r["source"].strip(), r["row_id"]
        assert isinstance(r["location"], str) and r["location"].strip(), r["row_id"]
        assert r["statistic"] in evidence.STATISTICS and r["dispersion_kind"] in evidence.DISPERSIONS
        if r["statistic"] == "proportion":
            assert 0.0 <= float(r["value"]) <= 1.0, r["row_id"]
            if np.isfinite(r["events"]) and np.isfinite(r["n"]):
                assert 0 <= r["events"] <= r["n"], r["row_id"]


def test_row_ids_are_unique_across_tables():
    ids = pd.concat([evidence.table(k)["row_id"] for k in evidence.KINDS])
    assert ids.is_unique


def test_unknown_row_is_named():
    with pytest.raises(evidence.EvidenceError, match="no evidence row 'nope'"):
        evidence.row("nope")


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 11), (1, 20), (7, 60), (19, 20), (5, 5), (30, 63)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert evidence.clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=EXACT)


def test_homogeneity_test_of_two_arms_is_fishers_exact_test():
    for a, b in [((5, 5), (5, 26)), ((0, 12), (5, 26)), ((2, 20), (1, 20)), ((7, 60), (0, 17)), ((30, 63), (4, 15))]:
        table = [[a[0], a[1] - a[0]], [b[0], b[1] - b[0]]]
        assert evidence.homogeneity_p_value([a[0], b[0]], [a[1], b[1]]) == pytest.approx(
            stats.fisher_exact(table).pvalue, rel=1e-9)


def test_homogeneity_test_of_several_arms_matches_brute_force_enumeration():
    import itertools

    events, n = [2, 1, 5, 0], [9, 7, 12, 6]
    total = sum(events)

    def prob(x):  # multivariate hypergeometric probability of a table, given the total
        return math.prod(math.comb(k, j) for k, j in zip(n, x)) / math.comb(sum(n), total)

    tables = [x for x in itertools.product(*(range(k + 1) for k in n)) if sum(x) == total]
    assert sum(prob(x) for x in tables) == pytest.approx(1.0, rel=1e-12)
    observed = prob(events)
    expected = sum(prob(x) for x in tables if prob(x) <= observed * (1 + 1e-7))
    assert evidence.homogeneity_p_value(events, n) == pytest.approx(expected, rel=1e-9)
    assert evidence.homogeneity_p_value([3, 3, 3], [10, 10, 10]) == pytest.approx(1.0)


def test_proportion_tolerance_is_the_exact_interval_of_events_over_n():
    r = evidence.row("lu2022_all_mrd_neg_cr_bm_d28")  # 19/20
    tol = evidence.tolerance(r)
    ci = stats.binomtest(19, 20).proportion_ci(method="exact")
    assert (tol.low, tol.high) == pytest.approx((ci.low, ci.high), abs=EXACT)
    assert tol.contains(0.9) and not tol.contains(0.5)


def test_geometric_mean_tolerance_and_cv_interval_closed_forms():
    r = evidence.row("smpc_resp_cmax")  # GM 32,700, CV 163.4%, n 79
    s = math.sqrt(math.log(1 + 1.634**2))
    tol = evidence.tolerance(r)
    half = stats.norm.ppf(0.975) * s / math.sqrt(79)
    assert (tol.low, tol.high) == pytest.approx((32700 * math.exp(-half), 32700 * math.exp(half)), rel=EXACT)
    cv = evidence.cv_interval(r)
    lo_var = 78 * s**2 / stats.chi2.ppf(0.975, 78)
    hi_var = 78 * s**2 / stats.chi2.ppf(0.025, 78)
    assert cv.low == pytest.approx(100 * math.sqrt(math.exp(lo_var) - 1), rel=EXACT)
    assert cv.high == pytest.approx(100 * math.sqrt(math.exp(hi_var) - 1), rel=EXACT)
    assert cv.contains(163.4)


def test_median_tolerance_uses_the_range_rule_on_the_day_scale_for_times():
    r = evidence.row("smpc_resp_tmax")  # median 9.83 (0.0111-27.8), n 79 > 70: range / 6
    sd = (27.8 - 0.0111) / 6
    half = stats.norm.ppf(0.975) * math.sqrt(math.pi / 2) * sd / math.sqrt(79)
    tol = evidence.tolerance(r)
    assert (tol.low, tol.high) == pytest.approx((9.83 - half, 9.83 + half), rel=EXACT)
    assert tol.scale == "linear"


def test_pooled_label_rows_are_the_exact_pooling_of_responders_and_non_responders():
    """smpc_all_*_pooled are derived here: recompute them from the two groups' rows."""
    for quantity, pooled in (("cmax", "smpc_all_cmax_pooled"), ("auc", "smpc_all_auc_pooled")):
        a, b = evidence.row(f"smpc_resp_{quantity}"), evidence.row(f"smpc_nr_{quantity}")
        m = [math.log(a.value), math.log(b.value)]
        v = [math.log1p((a.dispersion_low / 100) ** 2), math.log1p((b.dispersion_low / 100) ** 2)]
        n1, n2 = a.n, b.n
        mean = (n1 * m[0] + n2 * m[1]) / (n1 + n2)
        var = ((n1 - 1) * v[0] + (n2 - 1) * v[1] + n1 * n2 / (n1 + n2) * (m[0] - m[1]) ** 2) / (n1 + n2 - 1)
        p = evidence.row(pooled)
        assert p.n == n1 + n2
        assert p.value == pytest.approx(math.exp(mean), rel=1e-3)
        assert p.dispersion_low == pytest.approx(100 * math.sqrt(math.expm1(var)), abs=0.05)


def test_a_row_without_a_rule_asks_for_an_explicit_tolerance():
    with pytest.raises(evidence.EvidenceError, match="explicit tolerance"):
        evidence.tolerance(evidence.row("ft596_all_tmax"))
