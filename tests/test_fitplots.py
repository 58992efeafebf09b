"""Diagnostic plots of a population fit: panels, markers and reference lines match the fit's data."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.figure import Figure

import carkin as ck
from carkin import diagnostics as dg
from carkin import fitplots as fp
from carkin.fitting.observations import merge_observables, observation_table, split_observables

SUBJECTS = [1, 2, 3, 4, 5, 6, 7, 8]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fit():
    data = ck.read_dataset("data/stein_sim.csv").subset(SUBJECTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ck.FitWarning)  # a short SVI run is enough for plotting
        tree = ck.fit(ck.load_model("stein_2019"), data, method="svi", svi_steps=300, svi_draws=50, seed=1,
                      progress=False)
    curves = dg.individual_curves(tree, n_draws=20, n_points=60)
    vpc_df = dg.vpc(tree, n_replicates=40)
    return tree, curves, vpc_df


def _observed(tree) -> pd.DataFrame:
    return observation_table(tree)


def _lines_with_marker(ax, marker):
    return [ln for ln in ax.get_lines() if ln.get_marker() == marker]


def _horizontal_at(ax, y) -> bool:
    return any(np.allclose(np.asarray(ln.get_ydata(), float), y) and len(ln.get_ydata()) == 2
               for ln in ax.get_lines())


def _two_observables(tree, curves, vpc_df):
    """The Stein fit relabelled as two observables (every other record a proportional-error
    'car_cells', and in the VPC without an LLOQ), so layouts with several observables are checked
    without an ODE fit."""
    groups = merge_observables(tree).to_dict()
    n = groups["/observed_data"].sizes["obs"]
    names = np.where(np.arange(n) % 2 == 0, "car_copies", "car_cells")
    out = {}
    for path, ds in groups.items():
        if "observable" in ds.coords:
            ds = ds.assign_coords(observable=("obs", names))
        out[path] = ds
    out["/observed_data"]["dv"].attrs["units"] = "car_copies: copies/µg gDNA; car_cells: cells/µL"
    out["/posterior"]["sigma_car_cells"] = out["/posterior"]["sigma_car_copies"]
    flat = xr.DataTree.from_dict(out)
    flat.attrs = {**tree.attrs, "observables": ["car_copies", "car_cells"],
                  "error_models": json.dumps({"car_copies": "log-additive", "car_cells": "proportional"})}
    two = split_observables(flat)
    two_curves = xr.concat([curves, curves.assign_coords(observable=["car_cells"])], dim="observable")
    second = vpc_df.assign(observable="car_cells", lloq=np.nan, units="cells/µL")
    return two, two_curves, pd.concat([vpc_df, second], ignore_index=True)


def _check_subject_panels(axes, obs: pd.DataFrame) -> None:
    """Each panel (titled with its subject) shows exactly that subject's quantified and BLQ records."""
    for ax in axes:
        mine = obs[obs["id"] == ax.get_title().removeprefix("ID ")]
        quantified = mine[~mine["blq"] & np.isfinite(mine["dv"])]
        (seen,) = _lines_with_marker(ax, "o")
        np.testing.assert_allclose(np.sort(np.asarray(seen.get_ydata(), float)), np.sort(quantified["dv"]))
        (blq,) = _lines_with_marker(ax, "v")
        assert len(blq.get_xdata()) == int(mine["blq"].sum())
        np.testing.assert_allclose(np.asarray(blq.get_ydata(), float), mine.loc[mine["blq"], "lloq"])
        assert ax.get_yscale() == "log"
        assert _horizontal_at(ax, mine["lloq"].max())


@pytest.mark.slow
def test_individual_fits_draw_every_observation(fit):
    tree, curves, _ = fit
    fig = fp.plot_individual_fits(tree, curves)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(SUBJECTS)
    obs = _observed(tree)
    assert obs["blq"].any()  # the check means something only when some records are BLQ
    _check_subject_panels(fig.axes, obs)
    bottom, top = fig.axes[0].get_ylim()
    assert 0 < bottom and top / bottom < 10 ** (fp.MAX_DECADES + 1)
    assert len(fig.legends[0].get_texts()) == 6


@pytest.mark.slow
def test_individual_fits_limit_subjects(fit):
    tree, curves, _ = fit
    fig = fp.plot_individual_fits(tree, curves, max_subjects=3)
    assert [ax.get_title() for ax in fig.axes] == ["ID 1", "ID 2", "ID 3"]


@pytest.mark.slow
def test_gof_panels_and_reference_lines(fit):
    tree, _, _ = fit
    fig = fp.plot_gof(tree)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    obs = _observed(tree)
    n_quantified = int((~obs["blq"] & np.isfinite(obs["dv"])).sum())
    for ax in fig.axes[:2]:  # observed vs PRED and vs IPRED: log-log with the identity line
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert any(np.allclose(ln.get_xdata(), ln.get_ydata()) and ln.get_marker() in ("None", "")
                   for ln in ax.get_lines())
        (points,) = _lines_with_marker(ax, "o")
        assert len(points.get_xdata()) == n_quantified
    for ax in fig.axes[2:]:  # IWRES vs time and vs IPRED
        for y in (0.0, -fp.Z_REF, fp.Z_REF):
            assert _horizontal_at(ax, y)
    note = fig.subfigs[0].get_suptitle()
    assert f"{int(obs['blq'].sum())} of {len(obs)} records BLQ" in note


def test_iwres_follows_the_error_model():
    dv, f = np.array([2.0, 5.0]), np.array([1.0, 4.0])
    np.testing.assert_allclose(fp._iwres("log-additive", dv, f, 0.5), np.log(dv / f) / 0.5)
    np.testing.assert_allclose(fp._iwres("proportional", dv, f, 0.2), (dv - f) / (0.2 * f))
    np.testing.assert_allclose(fp._iwres("combined", dv, f, 0.2, 1.0), (dv - f) / np.sqrt(1.0 + (0.2 * f) ** 2))
    with pytest.raises(ValueError, match="error model"):
        fp._iwres("additive", dv, f, 1.0)


@pytest.mark.slow
def test_vpc_panels(fit):
    _, _, vpc_df = fit
    fig = fp.plot_vpc(vpc_df)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # the observable has an LLOQ: percentiles and fraction BLQ
    top, bottom = fig.axes
    assert top.get_yscale() == "log"
    assert _horizontal_at(top, vpc_df["lloq"].max())
    assert bottom.get_ylim()[0] <= 0 and bottom.get_ylim()[1] >= 1
    assert fig.get_suptitle() == "Visual predictive check"
    p05 = vpc_df[vpc_df["statistic"] == "p05"]["observed"].to_numpy()
    drawn = [ln for ln in top.get_lines() if len(ln.get_ydata()) == len(p05)]
    assert any(np.array_equal(np.isnan(np.asarray(ln.get_ydata(), float)), np.isnan(p05)) for ln in drawn)


@pytest.mark.slow
def test_several_observables_get_their_own_rows_and_columns(fit):
    two, two_curves, two_vpc = _two_observables(*fit)
    panels = fp.plot_individual_fits(two, two_curves, max_subjects=5).axes
    assert len(panels) == 2 * 5  # a block of panels per observable
    obs = _observed(two)
    _check_subject_panels(panels[:5], obs[obs["observable"] == "car_copies"])
    _check_subject_panels(panels[5:], obs[obs["observable"] == "car_cells"])
    gof = fp.plot_gof(two)
    assert len(gof.axes) == 2 * 4
    assert ["proportional" in sf.get_suptitle() for sf in gof.subfigs] == [False, True]
    # car_cells has no LLOQ here: no fraction-BLQ panel under it
    assert len(fp.plot_vpc(two_vpc).axes) == 3


@pytest.mark.slow
def test_save_fit_plots_writes_pngs(fit, tmp_path):
    tree, curves, vpc_df = fit
    paths = fp.save_fit_plots(tree, tmp_path / "plots", curves=curves, vpc_df=vpc_df)
    assert [p.split("/")[-1] for p in paths] == ["individual_fits.png", "gof.png", "vpc.png"]
    for p in paths:
        content = Path(p).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000


@pytest.mark.slow
def test_save_fit_plots_computes_what_is_missing(fit, tmp_path):
    tree, _, _ = fit
    paths = fp.save_fit_plots(tree, tmp_path, max_subjects=2)
    assert all(Path(p).read_bytes().startswith(PNG_MAGIC) for p in paths)


@pytest.mark.slow  # compiling the ODE model's fit takes over a minute
def test_two_observable_ode_fit():
    data = ck.read_dataset("data/cd7_sim.csv").subset([101, 102])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ck.FitWarning)
        tree = ck.fit(ck.load_model("cd7_cart"), data, estimate=("rho", "k_kill", "d_e", "f_blood"), method="svi",
                      svi_steps=20, svi_draws=8, seed=1, progress=False)
    assert list(tree.attrs["observables"]) == ["car_copies", "cd7_cells"]
    assert len(fp.plot_gof(tree).axes) == 2 * 4
    vpc_df = dg.vpc(tree, n_replicates=8)
    assert len(fp.plot_vpc(vpc_df).axes) == 2 * 2  # both have an LLOQ
