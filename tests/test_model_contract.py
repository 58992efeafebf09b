"""The model contract: every model declares roles that name its own variables, and generic code
(simulate, NCA, plots, what-if, the toxicity link, fit) finds a model's variables only through them.

``renamed_model.py`` names nothing as the library does (observable ``level``, weight ``BW``); it
runs through every generic path here. The library models run the same paths in the slow suite."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import carkin as ck
from carkin.kinetics import ROLES
from carkin.plots import plot_panel
from carkin.whatif import SINGLE, HoldRule, Schedule, whatif

sys.path.insert(0, str(Path(__file__).resolve().parent))
from renamed_model import RenamedModel  # noqa: E402

EXACT_RTOL = 1e-5  # the solver's rtol is 1e-6
OBSERVABLE_ROLES = ("exposure", "exposure_cells", "tumour", "escape", "normal", "normal_state")
COVARIATE_ROLES = ("weight", "burden")


def all_models():
    return [ck.load_model(name) for name in ck.list_models()] + [RenamedModel()]


@pytest.mark.parametrize("model", all_models(), ids=lambda m: m.name)
def test_roles_name_the_models_own_variables(model):
    assert set(model.roles) <= set(ROLES), model.roles
    observables = {o.name for o in model.observables}
    covariates = {c.name for c in model.covariates}
    for role, name in model.roles.items():
        assert name in (observables if role in OBSERVABLE_ROLES else covariates), (role, name)
    assert model.role("exposure") in observables and model.role("weight") in covariates


def test_a_missing_role_is_named_with_the_models_roles():
    with pytest.raises(ValueError, match="declares no 'tumour' role"):
        RenamedModel().role("tumour")
    assert RenamedModel().role("tumour", required=False) is None


@pytest.fixture(scope="module")
def renamed():
    return RenamedModel()


def test_renamed_model_simulates_per_kg_through_its_weight_role(renamed):
    times = np.array([0.0, 1.0, 5.0, 14.0])
    ds = ck.simulate(renamed, ck.single(2e6), times=times, weight_kg=30.0)
    expected = np.asarray(RenamedModel.exact(times, 2e6, renamed.typical))
    np.testing.assert_allclose(ds["level"].values[0], expected, rtol=EXACT_RTOL)
    assert ds["level"].attrs["role"] == "exposure" and float(ds["BW"].values[0]) == 30.0


def test_renamed_model_nca_plots_and_whatif_find_the_exposure(renamed, tmp_path):
    ds = ck.simulate(renamed, [ck.single(1e6), ck.single(1e7)], times="0:28:1", n_subjects=5, seed=2)
    res = ck.nca(ds)  # no variable named: the exposure role
    np.testing.assert_allclose(res["cmax"].values, ds["level"].max("time").values)
    fig = plot_panel(ds)
    assert [ax.get_title() for ax in fig.axes] == ["CAR cells in blood"]  # the exposure row, found by its role

    held = Schedule("split, held", (0.5, 0.5), (0.0, 1.0), hold=HoldRule(threshold=1e-12))  # always held
    grid = whatif(renamed, (1e6,), (SINGLE, held), n_subjects=4, seed=1, times="0:28:1", visit_days=(7,))
    assert {"cmax", "p_dlt", "dlt_exposure", "level_at_visit"} <= set(grid.data_vars)
    assert "nadir" not in grid and "mrd_negative" not in grid  # no normal-cell or tumour role
    assert (grid["fractions_given"].sel(schedule="split, held").values == 1).all()
    level = ck.simulate(renamed, ck.single(1e6), times="0:28:1", n_subjects=4, seed=1)["level"]
    early = level.sel(time=level["time"] <= 3).max("time").values
    np.testing.assert_allclose(grid["dlt_exposure"].sel(schedule="single", dose=1e6).values, early, rtol=1e-9)


@pytest.mark.slow
def test_renamed_model_fits_through_its_own_names(renamed, tmp_path):
    # a small dataset in total cells (no per-kg conversion), weights in the model's own BW column
    times = np.array([1.0, 4.0, 7.0, 14.0, 21.0])
    sim = ck.simulate(renamed, ck.single(1e6), times=times, n_subjects=6, seed=5)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        bw = float(sim["BW"].values[i])
        rows.append(dict(ID=i + 1, TIME=0.0, EVID=1, AMT=1e6 * bw, DV=".", MDV=1, BW=bw))
        for t, f in zip(times, sim["level"].values[i]):
            rows.append(dict(ID=i + 1, TIME=t, EVID=0, AMT=".", DV=f * (1 + 0.2 * rng.standard_normal()), MDV=0, BW=bw))
    pd.DataFrame(rows).to_csv(tmp_path / "renamed.csv", index=False)
    (tmp_path / "renamed.toml").write_text('[dataset]\namt_unit = "cells"\n[covariates]\nBW = "kg"\n', encoding="utf-8")
    with pytest.warns(ck.FitWarning, match="still improving"):  # 50 steps: a smoke run, not a converged fit
        tree = ck.fit(renamed, tmp_path / "renamed.csv", estimate=("r", "k"), error="proportional", method="svi",
                      svi_steps=50, svi_draws=20, progress=False)
    post = tree["posterior"]
    assert {"r", "k", "omega_r", "omega_k", "sigma_level", "ind_r", "eta_k"} <= set(post.data_vars)
    assert post["sigma_level"].attrs["long_name"] == "proportional residual SD (CV) of level"
