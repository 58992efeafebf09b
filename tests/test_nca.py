"""NCA: AUC rules against closed-form integrals, terminal phase, BLQ rule, vectorisation, long format."""

import importlib
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from carkin.nca import BLQ_RULE, ENDPOINTS, nca, nca_long

EXACT = 1e-10  # rules that are exact for the data's shape: only rounding error is left
DENSE_GRID = 1e-3  # trapezoid rules on a 0.001-day grid against the analytic integral (0.1%)
SAME = 1e-12  # the same computation arranged differently (batched vs one profile)
UNITS = "copies/µg gDNA"


def profile(times, values, units=UNITS):
    return xr.DataArray(np.asarray(values, float), dims="time", name="car_copies",
                        coords={"time": ("time", np.asarray(times, float), {"units": "day"})},
                        attrs={"units": units})


def scalars(ds):
    return {k: ds[k].item() for k in ds.data_vars}


def test_linear_trapezoid_is_exact_on_piecewise_linear_data():
    # knots at 0, 4, 14, 28 with values 0, 100, 20, 5, sampled at uneven times including the knots
    knots_t, knots_c = [0, 4, 14, 28], [0, 100, 20, 5]
    t = np.array([0, 1, 2.5, 4, 6, 9, 14, 17, 21, 28])
    res = scalars(nca(profile(t, np.interp(t, knots_t, knots_c)), method="linear"))
    exact = 0.5 * 4 * (0 + 100) + 0.5 * 10 * (100 + 20) + 0.5 * 14 * (20 + 5)
    assert res["auc_0_28"] == pytest.approx(exact, rel=EXACT)
    assert res["auclast"] == pytest.approx(exact, rel=EXACT)
    assert (res["cmax"], res["tmax"], res["clast"], res["tlast"]) == (100, 4, 5, 28)


def test_log_down_is_exact_on_monoexponential_decline():
    c0, k = 5000.0, 0.23
    t = np.array([0, 0.7, 2, 3.1, 5, 8.4, 13, 20, 28])
    res = scalars(nca(profile(t, c0 * np.exp(-k * t))))
    assert res["auc_0_28"] == pytest.approx(c0 / k * (1 - np.exp(-k * 28)), rel=EXACT)
    assert res["auclast"] == pytest.approx(res["auc_0_28"], rel=EXACT)
    assert res["lambda_z"] == pytest.approx(k, rel=EXACT)
    assert res["half_life"] == pytest.approx(np.log(2) / k, rel=EXACT)
    assert res["adj_r2"] == pytest.approx(1.0, abs=EXACT)
    assert res["n_terminal"] == len(t) - 1  # every post-Tmax point: all fits tie at adj R² = 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 10), st.floats(1e-3, 1e6)), min_size=2, max_size=30))
def test_auclast_against_numpy_trapezoid(steps):
    t = np.cumsum([dt for dt, _ in steps])
    c = np.array([v for _, v in steps])
    lin = scalars(nca(profile(t, c), method="linear"))
    assert lin["auclast"] == pytest.approx(np.trapezoid(c, t), rel=EXACT)
    assert (lin["cmax"], lin["tmax"]) == (c.max(), t[np.argmax(c)])
    # a log-linear segment lies below the chord of a falling segment, so log-down never exceeds linear
    assert nca(profile(t, c))["auclast"].item() <= lin["auclast"] * (1 + EXACT)


def test_stein_like_profile_auc_matches_analytic_integral():
    tmax, cmax, frac, alpha, beta = 9.3, 24000.0, 0.0079, 0.16, 0.0032
    rho, r0 = np.log(3900) / tmax, cmax / 3900
    t = np.arange(28001) / 1000.0  # 0..28 step 0.001; 9300/1000 rounds to exactly 9.3
    assert tmax in t
    after = cmax * ((1 - frac) * np.exp(-alpha * (t - tmax)) + frac * np.exp(-beta * (t - tmax)))
    c = np.where(t < tmax, r0 * np.exp(rho * t), after)
    d = 28 - tmax
    rise = (cmax - r0) / rho  # integral of r0 exp(rho t) from 0 to tmax
    fall = cmax * ((1 - frac) / alpha * (1 - np.exp(-alpha * d)) + frac / beta * (1 - np.exp(-beta * d)))
    exact = rise + fall
    res = scalars(nca(profile(t, c)))
    assert res["auc_0_28"] == pytest.approx(exact, rel=DENSE_GRID)
    assert res["cmax"] == cmax and res["tmax"] == tmax


def test_partial_end_between_samples_interpolates_by_the_method():
    t, c = [0, 2, 5, 10], [0, 10, 40, 20]
    # linear: C(7) = 40 + (20 - 40) * 2/5 = 32
    lin = nca(profile(t, c), method="linear", partial_end=7)["auc_0_28"].item()
    assert lin == pytest.approx(0.5 * 2 * 10 + 0.5 * 3 * (10 + 40) + 0.5 * 2 * (40 + 32), rel=EXACT)
    # log-down: 40 exp(-lam (t - 5)) with lam = ln2/5 on the falling segment, integrated from 5 to 7
    lam = np.log(2) / 5
    log = nca(profile(t, c), partial_end=7)["auc_0_28"].item()
    assert log == pytest.approx(0.5 * 2 * 10 + 0.5 * 3 * (10 + 40) + 40 / lam * (1 - np.exp(-2 * lam)), rel=EXACT)
    # a monoexponential sampled at 25 and 30: interpolating at 28 stays on the exponential
    c0, k = 800.0, 0.1
    tt = np.array([0, 3, 9, 25, 30])
    auc = nca(profile(tt, c0 * np.exp(-k * tt)))["auc_0_28"].item()
    assert auc == pytest.approx(c0 / k * (1 - np.exp(-k * 28)), rel=EXACT)


def test_auc_to_partial_end_is_nan_when_sampling_stops_before_it():
    ds = nca(profile([0, 7, 14, 21], [1, 50, 20, 10]))
    assert np.isnan(ds["auc_0_28"].item()) and np.isfinite(ds["auclast"].item())
    assert "not estimable" in ds["auc_0_28"].attrs["note"]


def test_blq_rule_leading_zero_embedded_skipped_trailing_excluded():
    t = np.arange(9.0)
    c = [np.nan, 0.5, 10, 50, 0.3, 20, 8, 0.2, np.nan]  # LLOQ 1: t=0,1 leading; t=4 embedded; t=7,8 trailing
    res = scalars(nca(profile(t, c), method="linear", lloq=1.0))
    assert res["auclast"] == pytest.approx(0.5 * (0 + 10) + 0.5 * (10 + 50) + 0.5 * 2 * (50 + 20) + 0.5 * (20 + 8),
                                           rel=EXACT)
    assert (res["cmax"], res["tmax"], res["clast"], res["tlast"]) == (50, 3, 8, 6)
    assert np.isnan(res["auc_0_28"])
    assert res["n_terminal"] == 0 and np.isnan(res["lambda_z"])  # only 2 points after Tmax
    # log-down: 50 exp(-lam (t - 3)) from 3 to 5 across the skipped point (lam = ln(2.5)/2),
    # then 20 exp(-mu (t - 5)) from 5 to 6 (mu = ln 2.5)
    lam, mu = np.log(2.5) / 2, np.log(2.5)
    log = nca(profile(t, c), lloq=1.0)["auclast"].item()
    assert log == pytest.approx(5 + 30 + 50 / lam * (1 - np.exp(-2 * lam)) + 20 / mu * (1 - np.exp(-mu)), rel=EXACT)


def test_all_blq_profile_is_nan_with_zero_terminal_points():
    res = scalars(nca(profile([0, 1, 2, 3], [np.nan, 0.1, 0.2, np.nan]), lloq=0.5))
    assert res.pop("n_terminal") == 0 and res.pop("n_contraction") == 0
    assert all(np.isnan(v) for v in res.values())


def test_lloq_broadcasts_per_subject():
    da = xr.concat([profile([0, 1, 2], [0.5, 3, 2])] * 2, dim=pd.Index(["a", "b"], name="subject"))
    ds = nca(da, lloq=xr.DataArray([0.1, 1.0], dims="subject"), method="linear")
    # subject a: 0.5 counts; subject b: 0.5 is leading BLQ -> 0
    np.testing.assert_allclose(ds["auclast"].values, [0.5 * (0.5 + 3) + 2.5, 0.5 * 3 + 2.5], rtol=EXACT)


def reference_terminal(t, c, min_points=3, tol=1e-4, min_span_ratio=2.0):
    """Loop over k with np.polyfit: the automatic rule written out plainly."""
    i = int(np.argmax(c))
    tt, lc = t[i + 1:], np.log(c[i + 1:])
    fits = []
    for k in range(min_points, len(tt) + 1):
        x, y = tt[-k:], lc[-k:]
        slope, icpt = np.polyfit(x, y, 1)
        r2 = 1 - np.sum((y - slope * x - icpt) ** 2) / np.sum((y - y.mean()) ** 2)
        fits.append((1 - (1 - r2) * (k - 1) / (k - 2), k, slope))
    best = max(f[0] for f in fits)
    adj, k, slope = max((f for f in fits if f[0] >= best - tol), key=lambda f: f[1])
    if slope >= 0:
        return np.nan, 0, np.nan
    span = tt[-1] - tt[-k]
    if span * -slope / np.log(2) < min_span_ratio:  # spans too few half-lives: not estimable
        return np.nan, k, np.nan
    return -slope, k, adj


def test_terminal_phase_matches_a_looped_polyfit_reference():
    rng = np.random.default_rng(7)
    t = np.array([0, 1, 2, 4, 7, 10, 14, 21, 28, 42, 56, 90], float)
    for _ in range(40):
        c = 1e4 * np.exp(-0.05 * t) * rng.lognormal(0, 0.3, t.size) + 1e3 * np.exp(-0.5 * t)
        lam, k, adj = reference_terminal(t, c)
        res = scalars(nca(profile(t, c)))
        assert res["n_terminal"] == k
        np.testing.assert_allclose([res["lambda_z"], res["adj_r2"]], [lam, adj], rtol=1e-9)
    # the same profiles with slow tails (half-life 140 days on a 90-day record): the span rule refuses them
    refused = 0
    for _ in range(40):
        c = 1e4 * np.exp(-0.005 * t) * rng.lognormal(0, 0.05, t.size) + 1e3 * np.exp(-0.5 * t)
        lam, k, adj = reference_terminal(t, c)
        res = scalars(nca(profile(t, c)))
        assert res["n_terminal"] == k
        np.testing.assert_allclose([res["lambda_z"], res["adj_r2"]], [lam, adj], rtol=1e-9)
        refused += np.isnan(lam)
    assert refused > 20


def biphasic(t, peak_day=10.0, contraction=0.16, switch_day=28.0, persistence=0.0032):
    """Exponential rise to a peak of 1e4, contraction to ``switch_day``, then slow persistence: exact pieces."""
    up = 1e4 * np.exp(0.8 * (t - peak_day))
    down = 1e4 * np.exp(-contraction * (np.minimum(t, switch_day) - peak_day))
    return np.where(t <= peak_day, up, down * np.exp(-persistence * np.maximum(t - switch_day, 0.0)))


def test_contraction_half_life_is_exact_on_its_phase_and_reported_beside_the_terminal_one():
    t = np.array([0, 1, 4, 7, 10, 14, 17, 21, 28, 56, 90, 180, 270, 365], float)
    res = scalars(nca(profile(t, biphasic(t))))
    assert res["lambda_contraction"] == pytest.approx(0.16, rel=EXACT)
    assert res["half_life_contraction"] == pytest.approx(np.log(2) / 0.16, rel=EXACT)
    assert res["n_contraction"] == 4  # days 14, 17, 21, 28: after Tmax (day 10), up to day 28
    # the terminal fit finds the persistence phase (days 28-365 are exact: the most points win) and
    # spans 337 days = 1.56 half-lives of 216.6 days: below the default span ratio of 2, so not estimable
    assert res["n_terminal"] == 6 and res["span_ratio"] == pytest.approx(337 * 0.0032 / np.log(2), rel=EXACT)
    assert np.isnan(res["half_life"]) and np.isnan(res["lambda_z"])
    kept = scalars(nca(profile(t, biphasic(t)), min_span_ratio=None))
    assert kept["lambda_z"] == pytest.approx(0.0032, rel=EXACT)
    # a window on the contraction phase gives the contraction rate as the terminal one
    window = scalars(nca(profile(t, biphasic(t)), lambda_z_window=(10, 28)))
    assert window["lambda_z"] == pytest.approx(0.16, rel=EXACT) and window["n_terminal"] == 4
    later = scalars(nca(profile(t, biphasic(t)), contraction_end=21))
    assert later["n_contraction"] == 3 and later["lambda_contraction"] == pytest.approx(0.16, rel=EXACT)


def test_terminal_phase_prefers_more_points_and_rejects_rising_tails():
    # exp(-0.05 t) with t = 2, 4 raised (Tmax moves to 2, t = 4 sits above the terminal line)
    t = np.array([0, 2, 4, 7, 14, 21, 28, 42])
    c = 1e3 * np.exp(-0.05 * t)
    c[1:3] *= [3.0, 2.0]
    res = scalars(nca(profile(t, c)))
    assert res["n_terminal"] == 5  # k = 3, 4, 5 (t >= 7) are all exact, so the most points win
    assert res["lambda_z"] == pytest.approx(0.05, rel=EXACT)
    rising = scalars(nca(profile([0, 1, 2, 3, 4], [100, 10, 20, 30, 40])))
    assert rising["n_terminal"] == 0 and np.isnan(rising["lambda_z"]) and np.isnan(rising["half_life"])


def random_profiles(rng, shape, t):
    peak = rng.uniform(5, 15, shape + (1,))
    c = 1e4 * np.exp(-0.5 * (np.log(t[1:] / peak) / 0.6) ** 2) * rng.lognormal(0, 0.2, shape + (t.size - 1,))
    c = np.concatenate([np.full(shape + (1,), 0.0), c], axis=-1)
    c[rng.random(c.shape) < 0.1] = np.nan  # scattered missing values
    return c


def test_batched_result_equals_one_profile_at_a_time(monkeypatch):
    # carkin.nca the attribute is the function; the module is reached through importlib
    monkeypatch.setattr(importlib.import_module("carkin.nca"), "BLOCK", 4)  # several blocks, last one short
    rng = np.random.default_rng(3)
    t = np.array([0, 1, 2, 4, 7, 9, 11, 14, 21, 28, 35, 60, 90], float)
    da = xr.DataArray(random_profiles(rng, (3, 5), t), dims=("regimen", "subject", "time"),
                      coords={"regimen": ["a", "b", "c"], "subject": np.arange(5), "time": t},
                      attrs={"units": UNITS})
    ds = nca(da.transpose("time", "subject", "regimen"), lloq=5.0)  # time first: must not matter
    assert all(ds[v].dims == ("subject", "regimen") for v in ds.data_vars)
    ds = nca(da, lloq=5.0)
    assert all(ds[v].dims == ("regimen", "subject") for v in ds.data_vars)
    assert list(ds["regimen"].values) == ["a", "b", "c"]
    for r in range(3):
        for s in range(5):
            one = nca(da.isel(regimen=r, subject=s), lloq=5.0)
            for v in ds.data_vars:
                np.testing.assert_allclose(ds[v].values[r, s], one[v].values, rtol=SAME, equal_nan=True)
    assert ds["n_terminal"].dtype.kind == "i"


def test_metadata_units_and_dataset_input():
    t = np.array([0, 7, 14, 28])
    ds = nca(xr.Dataset({"car_copies": profile(t, [0, 90, 30, 10]), "other": profile(t, [1, 2, 3, 4])}), lloq=2.0)
    units = {k: ds[k].attrs["units"] for k in ds.data_vars}
    assert units["auc_0_28"] == units["auclast"] == "copies/µg gDNA·day"
    assert units["cmax"] == UNITS and units["tmax"] == "day" and units["lambda_z"] == "1/day"
    assert all(ds[k].attrs["long_name"] for k in ds.data_vars)
    assert set(ds.data_vars) == set(ENDPOINTS)
    assert ds.attrs["blq_rule"] == BLQ_RULE and ds.attrs["auc_method"] == "linear-up/log-down"
    assert ds.attrs["lloq"] == 2.0
    assert nca(xr.Dataset({"x": profile(t, [0, 9, 3, 1])}), variable="x")["cmax"].item() == 9


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda da: nca(da, method="log-up"), "'log-up'"),
        (lambda da: nca(xr.Dataset({"conc": da})), "['conc']"),
        (lambda da: nca(xr.Dataset({"conc": da}), variable="nope"), "'nope'"),
        (lambda da: nca(da.rename(time="t")), "'time'"),
        (lambda da: nca(da, min_terminal_points=2), "min_terminal_points"),
        (lambda da: nca(da, lambda_z_window=(28, 7)), "start < end"),
        (lambda da: nca(da, lambda_z_window=28), "lambda_z_window"),
        (lambda da: nca(da, min_span_ratio=-1), "min_span_ratio"),
        (lambda da: nca(da, contraction_end=np.nan), "contraction_end"),
        (lambda da: nca_long(pd.DataFrame({"ID": [1], "TIME": [0.0]})), "['DV']"),
        (lambda da: nca_long(pd.DataFrame({"id": [1], "DV": [0.0]})), "['ID', 'TIME']"),
        (lambda da: nca_long(pd.DataFrame({"ID": [1], "TIME": [0.0], "DV": [1.0]}), blq_col="BLQ"), "['BLQ']"),
        (lambda da: nca_long(pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 0.0], "DV": [1.0, 2.0]})), "duplicate"),
    ],
)
def test_bad_input_is_named_in_the_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(profile([0, 1, 2], [0, 2, 1]))


def long_table():
    rows = [  # ID, TIME, DV, BLQ flag, LLOQ; subjects sampled at different times
        *[(1, t, c, 0, 1.0) for t, c in [(0, 0.2), (1, 5), (3, 80), (7, 400), (14, 90), (21, 30), (28, 12)]],
        *[(2, t, c, 0, 1.0) for t, c in [(0.5, 3), (2, 40), (4, 150), (9, 60), (20, 15), (30, 4), (60, 0.5)]],
        *[(3, t, c, f, 10.0) for t, c, f in [(1, 0, 1), (5, 200, 0), (8, 5, 0), (10, 100, 0), (16, 50, 0),
                                             (26, 20, 0), (33, 8, 1), (40, 12, 0)]],
    ]
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "BLQ", "LLOQ"])


def test_nca_long_matches_nca_on_each_subjects_own_profile():
    df = long_table()
    out = nca_long(df, blq_col="BLQ", lloq_col="LLOQ")
    assert list(out["ID"]) == [1, 2, 3] and set(ENDPOINTS) <= set(out.columns)
    assert out.attrs["units"]["tmax"] == "day" and out.attrs["blq_rule"] == BLQ_RULE
    for _, sub in df.groupby("ID"):
        own = sub["DV"].where(sub["BLQ"] == 0)  # flagged rows -> BLQ, whatever DV says
        ref = nca(profile(sub["TIME"], own), lloq=sub["LLOQ"].iloc[0])
        row = out[out["ID"] == sub["ID"].iloc[0]].iloc[0]
        for v in ENDPOINTS:
            np.testing.assert_allclose(row[v], ref[v].item(), rtol=SAME, equal_nan=True, err_msg=v)
    # subject 2 starts at 0.5: the grid's time 0 (from subject 1) is not one of its samples
    assert out.loc[out["ID"] == 2, "auclast"].item() > 0
    np.testing.assert_allclose(out.loc[out["ID"] == 2, "auc_0_28"].item(),
                               nca(profile([0.5, 2, 4, 9, 20, 30], [3, 40, 150, 60, 15, 4]))["auc_0_28"].item(),
                               rtol=SAME)
    # subject 3: the flagged first sample is a leading BLQ (0), the flagged one at 33 is skipped
    assert out.loc[out["ID"] == 3, "tlast"].item() == 40


def test_nca_long_groups_keep_equal_ids_apart():
    df = long_table()
    both = pd.concat([df.assign(ARM="A"), df.assign(ARM="B", DV=df["DV"] * 2)])
    out = nca_long(both, group_cols=("ARM",), blq_col="BLQ", lloq_col="LLOQ")
    assert list(zip(out["ARM"], out["ID"])) == [(a, i) for a in "AB" for i in (1, 2, 3)]
    np.testing.assert_allclose(out["cmax"].values[3:], 2 * out["cmax"].values[:3], rtol=SAME)


def test_hundred_thousand_profiles_in_one_call():
    # Speed is measured in benchmarks/, not asserted here; this checks the batched path at scale.
    rng = np.random.default_rng(0)
    t = np.arange(91.0)
    da = xr.DataArray(random_profiles(rng, (100_000,), t), dims=("subject", "time"), coords={"time": t})
    ds = nca(da, lloq=1.0)
    assert ds["n_terminal"].sizes["subject"] == 100_000 and np.isfinite(ds["auc_0_28"]).mean() > 0.9
