"""Batch inference: the per-dataset log density, prior-simulated datasets, and SBC (slow)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from numpyro.infer.util import log_density

import carkin as ck
from carkin.batch import fit_many, prior_datasets, rank_uniformity, simulation_based_calibration
from carkin.inference import make_problem

DATA = Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv"
SBC_MIN_P = 0.001  # chi-square p-value below which a parameter's ranks are called non-uniform


@pytest.fixture(scope="module")
def design():
    data = ck.read_dataset(DATA)
    return data.subset(data.ids[:6])


def test_dataset_measurements_enter_through_obs(design):
    """Log density with other measurements passed in equals that of a dataset holding them."""
    stein = ck.load_model("stein_2019")
    problem = make_problem(stein, design)
    truth, y, blq = prior_datasets(problem, 2, seed=3)
    assert np.all(np.isnan(y[blq])) and np.all(np.isfinite(y[~blq]))
    assert np.all(y[~blq] >= problem.design.lloq[np.nonzero(~blq)[1]])
    other = dataclasses.replace(design, obs_value=y[1], obs_blq=blq[1])
    direct = make_problem(stein, other)
    params = {k: np.asarray(v[1]) for k, v in truth.items()}
    params["z"] = np.zeros((design.n_subjects, 6))
    obs = (np.where(blq[1], 1.0, y[1]), blq[1], problem.design.lloq)
    a = log_density(problem.numpyro_model, (obs,), {}, params)[0]
    b = log_density(direct.numpyro_model, (), {}, params)[0]
    assert float(a) == pytest.approx(float(b), rel=1e-12)


@pytest.mark.slow
def test_fit_many_returns_draws_per_dataset(design):
    problem = make_problem(ck.load_model("stein_2019"), design)
    _, y, blq = prior_datasets(problem, 2, seed=1)
    draws = fit_many(problem, y, blq, warmup=5, samples=6, seed=0, thin=2)
    assert draws["tmax"].shape == (2, 3)
    assert draws["diverging"].shape == (2, 3)
    assert np.all(draws["tmax"] > 0)


@pytest.mark.slow
def test_sbc_passes_sampler_options_to_the_fits(design, monkeypatch):
    import carkin.batch as batch

    seen = {}

    def recording_fit_many(*args, **kwargs):
        seen.update(kwargs)
        return fit_many(*args, **kwargs)

    monkeypatch.setattr(batch, "fit_many", recording_fit_many)
    sbc = simulation_based_calibration(ck.load_model("stein_2019"), design, 2, warmup=4, samples=4, thin=2,
                                       seed=5, target_accept=0.95, max_tree_depth=3)
    assert (seen["target_accept"], seen["max_tree_depth"], seen["seed"], seen["thin"]) == (0.95, 3, 6, 2)
    assert (sbc.attrs["target_accept"], sbc.attrs["max_tree_depth"]) == (0.95, 3)
    assert sbc["rank"].shape == (2, 13) and int(sbc["rank"].max()) <= 2


def test_rank_uniformity_is_exact_for_uniform_ranks():
    import xarray as xr

    n_draws = 30  # 31 possible ranks over 10 bins: the bins hold 3 or 4 ranks
    ranks = np.tile(np.arange(n_draws + 1), 4)[:, None]
    sbc = xr.Dataset({"rank": (("dataset", "parameter"), ranks)}, coords={"parameter": ["x"]},
                     attrs={"n_draws": n_draws})
    assert rank_uniformity(sbc, bins=10)["x"] == pytest.approx(1.0)
    skewed = sbc.copy(data={"rank": np.minimum(ranks, 5)})
    assert rank_uniformity(skewed, bins=10)["x"] < 1e-6


@pytest.mark.slow
def test_sbc_ranks_are_uniform_for_a_well_mixing_submodel():
    """Typical Tmax, Cmax and beta, between-subject variability on Cmax, residual error; the rest
    fixed. (The full six-parameter model is not calibrated with chains this short: see
    benchmarks/README.md, so this checks the SBC machinery and the likelihood, not that model.)"""
    data = ck.read_dataset(DATA)
    sbc = simulation_based_calibration(ck.load_model("stein_2019"), data.subset(data.ids[:20]), 100,
                                       warmup=200, samples=300, thin=10, seed=0,
                                       estimate=("tmax", "cmax", "beta"), variability=("cmax",))
    pvalues = rank_uniformity(sbc, bins=10)
    assert min(pvalues.values()) > SBC_MIN_P, pvalues
