"""What-if grids: endpoints against direct simulations, the hold rule, the toxicity link, posterior draws."""

import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import carkin as ck
from carkin.toxicity import DLTModel, default_dlt_model
from carkin.whatif import SINGLE, SPLIT, HoldRule, Schedule, summarize, whatif

DATA = Path(__file__).resolve().parents[1] / "data"
SAME_SOLVE_RTOL = 1e-9  # the same solve reached by two routes
N = 6
DOSES = (1e6, 1e7)


@pytest.fixture(scope="module")
def cd7():
    return ck.load_model("cd7_cart")


@pytest.fixture(scope="module")
def grid(cd7):
    return whatif(cd7, DOSES, (SINGLE, SPLIT), n_subjects=N, seed=3, visit_days=(7, 14), marrow_days=(28,))


def test_layout_units_and_paired_subjects(grid):
    assert grid["cmax"].dims == ("dose", "schedule", "subject")
    assert list(grid["schedule"].values) == ["single", "split 10/30/60"]
    assert grid["car_copies_at_visit"].dims == ("dose", "schedule", "subject", "visit")
    assert grid["blasts_at_marrow_visit"].sizes["marrow_visit"] == 1
    for name, var in grid.data_vars.items():
        assert "units" in var.attrs, name
    assert grid["WT"].dims == ("subject",)  # one population receives every dose and schedule


def test_endpoints_match_a_direct_simulation(grid, cd7):
    i = 2
    params = {k: float(grid[f"param_{k}"].values[i]) for k in cd7.parameter_names}
    covs = {c.name: float(grid[c.name].values[i]) for c in cd7.covariates}
    sim = ck.simulate(cd7, ck.split(1e7), times="0:90:1", params=params, covariates=covs)
    car = sim["car_copies"].values[0]
    cell = grid.sel(dose=1e7, schedule="split 10/30/60").isel(subject=i)
    assert float(cell["cmax"]) == pytest.approx(car.max(), rel=SAME_SOLVE_RTOL)
    assert float(cell["tmax"]) == float(sim["time"].values[np.argmax(car)])
    cd7_cells = sim["cd7_cells"].values[0]
    assert float(cell["nadir"]) == pytest.approx(cd7_cells.min(), rel=SAME_SOLVE_RTOL)
    after = np.flatnonzero((np.arange(91) > np.argmin(cd7_cells)) & (cd7_cells >= 0.5 * cd7_cells[0]))
    expected = float(after[0]) if after.size else np.nan
    assert float(cell["recovery_day"]) == pytest.approx(expected, nan_ok=True)
    blasts = sim["blasts"].values[0]
    assert bool(cell["mrd_negative"]) == (blasts[28] < 0.01)
    assert float(cell["tumour_reduction"]) == pytest.approx(100 * (1 - blasts[28] / blasts[0]), rel=1e-9)
    assert float(cell["cd7_cells_at_visit"].sel(visit=14)) == pytest.approx(cd7_cells[14], rel=SAME_SOLVE_RTOL)
    link = DLTModel()
    early = car[: int(link.window_end_day) + 1].max()  # daily grid: days 0 .. the CRS window's end
    assert float(cell["dlt_exposure"]) == pytest.approx(early, rel=SAME_SOLVE_RTOL)
    logit = (link.intercept + link.slope_peak * math.log10(early / 1e4)
             + link.slope_burden * math.log10(covs["BLAST"] / 10))
    assert float(cell["p_dlt"]) == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-9)


@pytest.mark.slow
def test_hold_rule_withholds_later_fractions(cd7):
    never = Schedule("split never held", (0.1, 0.3, 0.6), (0, 1, 2), HoldRule(1e12))
    always = Schedule("split always held", (0.1, 0.3, 0.6), (0, 1, 2), HoldRule(1e-12))
    ds = whatif(cd7, (1e7,), (SPLIT, never, always), n_subjects=3, seed=1)
    assert (ds["fractions_given"].sel(schedule="split never held") == 3).all()
    assert (ds["fractions_given"].sel(schedule="split always held") == 1).all()
    np.testing.assert_allclose(ds["dose_received"].sel(schedule="split always held"), 1e6)
    np.testing.assert_allclose(ds["cmax"].sel(schedule="split never held"), ds["cmax"].sel(schedule="split 10/30/60"))
    # Held after the first fraction is the same as one infusion of 10% of the dose.
    single = whatif(cd7, (1e6,), (SINGLE,), n_subjects=3, seed=1)
    np.testing.assert_allclose(ds["cmax"].sel(schedule="split always held").values,
                               single["cmax"].sel(schedule="single").values, rtol=SAME_SOLVE_RTOL)


def test_summary_rows_and_probabilities(grid):
    table = summarize(grid)
    assert len(table) == len(DOSES) * 2
    row = table[(table.dose_per_kg == 1e7) & (table.schedule == "single")].iloc[0]
    cell = grid.sel(dose=1e7, schedule="single")
    assert row["p_dlt"] == pytest.approx(float(cell["p_dlt"].mean()))
    assert row["cmax_median"] == pytest.approx(float(np.median(cell["cmax"])))


def test_toxicity_link():
    m = DLTModel()
    # the logistic written out: intercept + slopes on log10 exposure and burden
    eta = m.intercept + m.slope_peak * np.log10(3e4 / 1e4) + m.slope_burden * np.log10(50.0 / 10.0)
    assert float(m.probability(3e4, 50.0)) == pytest.approx(1 / (1 + np.exp(-eta)), rel=1e-12)
    assert float(m.probability(1e5, 10.0)) > float(m.probability(1e4, 10.0))
    assert float(m.probability(1e4, 50.0)) > float(m.probability(1e4, 10.0))
    nk = default_dlt_model("cd7_carnk")
    assert nk.offset < 0 and float(nk.probability(1e4, 10.0)) < float(m.probability(1e4, 10.0))
    # the exposure is the highest level up to the CRS window's end, later levels do not count
    level = xr.DataArray([[1.0, 5.0, 3.0, 9.0, 100.0]], dims=("subject", "time"),
                         coords={"time": [0.0, 1.0, 2.0, 3.0, 4.0]})
    assert float(DLTModel(window_end_day=3.0).exposure(level)[0]) == 9.0
    assert float(DLTModel(window_end_day=2.5).exposure(level)[0]) == 5.0
    with pytest.raises(ValueError, match="peak_reference must be > 0"):
        DLTModel(peak_reference=0.0)
    with pytest.raises(ValueError, match="window_end_day must be > 0"):
        DLTModel(window_end_day=0.0)


@pytest.mark.slow
def test_posterior_draws_propagate(tmp_path):
    stein = ck.load_model("stein_2019")
    data = ck.read_dataset(DATA / "stein_sim.csv").subset([1, 2, 3, 4, 5, 6, 7, 8])
    fit = ck.fit(stein, data, method="svi", svi_steps=300, svi_draws=30, seed=0, progress=False)
    ds = whatif(stein, (1e6, 1e7), (SINGLE,), n_subjects=5, posterior=fit, n_draws=4, seed=2)
    assert ds["cmax"].dims == ("dose", "schedule", "draw", "subject")
    assert ds.sizes["draw"] == 4
    table = summarize(ds)
    assert {"p_dlt_p5", "p_dlt_p95"} <= set(table.columns)
    # each draw has its own population typical Tmax: subject medians differ between draws
    med = ds["tmax"].sel(dose=1e6, schedule="single").median("subject").values
    assert np.unique(med).size > 1


def test_bad_grids_are_refused(cd7):
    with pytest.raises(ValueError, match="distinct positive"):
        whatif(cd7, (1e6, -1.0), n_subjects=2)
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        Schedule("bad", (0.5, 0.6), (0, 1))
    with pytest.raises(ValueError, match="hold rule needs at least two fractions"):
        Schedule("bad", (1.0,), (0,), HoldRule(10.0))


def test_calibration_draws_propagate_with_their_own_links(cd7):
    from carkin.uncertainty import draws

    ds = whatif(cd7, (1e6,), (SINGLE,), n_subjects=6, calibration=True, n_draws=3, seed=2)
    assert ds["cmax"].dims == ("dose", "schedule", "draw", "subject") and ds.sizes["draw"] == 3
    assert ds.attrs["population"] == "calibration draws"
    chosen = draws(cd7, 3)
    for d in range(3):
        exposure = ds["dlt_exposure"].isel(draw=d).values
        want = chosen[d].dlt.probability(exposure, ds["BLAST"].isel(draw=d).values[None, None, :])
        np.testing.assert_allclose(ds["p_dlt"].isel(draw=d).values, want, rtol=1e-12)
        # the draw's typical values reach its virtual patients (same random effects under every draw)
        got = ds["param_k_kill"].isel(draw=d).values
        assert np.median(got) == pytest.approx(chosen[d].values["k_kill"], rel=0.6)
    assert np.unique(ds["param_k_kill"].median("subject").values).size == 3
    with pytest.raises(ValueError, match="not both"):
        whatif(cd7, (1e6,), (SINGLE,), n_subjects=2, calibration=True, posterior=object())
