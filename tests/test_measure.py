"""Simulated measurements: the assay's error distribution, censoring below the LLOQ, reproducibility."""

import math

import numpy as np
import pytest
from scipy import stats

import carkin as ck
from carkin.measure import measure
from carkin.observation import Assay

N = 2000  # virtual subjects: enough for 1% accuracy on the residual SD


@pytest.fixture(scope="module")
def stein():
    return ck.load_model("stein_2019")


@pytest.fixture(scope="module")
def population(stein):
    return ck.simulate(stein, ck.single(1e6), times=[1.0, 7.0, 14.0, 28.0, 90.0], n_subjects=N, seed=3)


def test_log_additive_residuals_are_normal_with_the_assays_sd(stein, population):
    ds = measure(population, stein, seed=5, assays={"car_copies": Assay("log-additive", 0.56, lloq=0.0)})
    r = np.log(ds["car_copies_measured"].values) - np.log(population["car_copies"].values)
    assert r.std() == pytest.approx(0.56, rel=0.02)
    assert abs(r.mean()) < 3 * 0.56 / math.sqrt(r.size)
    assert stats.kstest(r.ravel() / 0.56, "norm").pvalue > 1e-3
    assert not ds["car_copies_blq"].any()


def test_values_below_the_lloq_are_censored_not_dropped(stein, population):
    ds = measure(population, stein, seed=5)
    lloq = stein.assays["car_copies"].lloq
    blq = ds["car_copies_blq"].values
    measured = ds["car_copies_measured"].values
    assert blq.any() and (~blq).any()
    assert np.all(np.isnan(measured[blq])) and np.all(measured[~blq] >= lloq)
    assert ds["car_copies_measured"].attrs["lloq"] == lloq
    # the fraction censored matches P(true x noise < LLOQ) computed from the true values
    p = stats.norm.cdf((np.log(lloq) - np.log(population["car_copies"].values)) / 0.56)
    assert blq.mean() == pytest.approx(p.mean(), abs=4 * math.sqrt(p.mean() / blq.size))
    assert "car_copies_measured" not in population  # the input is not modified


@pytest.mark.slow
def test_noise_depends_only_on_seed_and_subject_index(stein):
    whole = ck.simulate(stein, ck.single(1e6), times="0:28:7", n_subjects=40, seed=1, measurements=True)
    parts = [ck.simulate(stein, ck.single(1e6), times="0:28:7", n_subjects=20, seed=1, first_subject=k,
                         measurements=True) for k in (0, 20)]
    stacked = np.concatenate([p["car_copies_measured"].values for p in parts])
    np.testing.assert_array_equal(stacked, whole["car_copies_measured"].values)


def test_unknown_observable_is_named(stein, population):
    with pytest.raises(ValueError, match="no assay for"):
        measure(population, stein, observables=["blasts"])
