"""Calibration: the aggregate-data likelihood against scipy, the sampler on a known target, the shipped
results against the model files, and (slow) the calibration script reproducing the shipped values."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from carkin import calibration, evidence
from carkin.arms import Claim, Outcome
from carkin.library import load_model
from carkin.toxicity import DLTModel, default_dlt_model
from carkin.uncertainty import draws, result

ROOT = Path(__file__).resolve().parent.parent
EXACT = 1e-10
MODE_RTOL = 1e-3  # model files carry the modes to 4 significant figures


def test_binomial_term_is_the_log_likelihood_ratio_against_the_saturated_model():
    row = evidence.row("lu2022_all_mrd_neg_cr_bm_d28")  # 19/20
    for p in (0.5, 0.9, 0.95, 0.99):
        want = stats.binom.logpmf(19, 20, p) - stats.binom.logpmf(19, 20, 19 / 20)
        got = calibration.log_likelihood(row, Claim(row.row_id), Outcome(p, 400))
        assert got == pytest.approx(want, abs=EXACT)


def test_geometric_mean_term_is_normal_on_log_gm_plus_chi_square_on_log_variance():
    row = evidence.row("smpc_resp_cmax")
    s2 = math.log1p(1.634**2)
    o = Outcome(30000.0, 400, 150.0)
    var_sim = math.log1p(1.5**2)
    want = stats.norm.logpdf(math.log(32700), math.log(30000), math.sqrt(s2 / 79))
    want += stats.chi2.logpdf(78 * s2 / var_sim, 78) + math.log(78 / var_sim)  # density of s^2 given sigma^2
    assert calibration.log_likelihood(row, Claim(row.row_id), o) == pytest.approx(want, rel=EXACT)


def test_km_estimate_with_a_ci_uses_its_effective_n():
    row = evidence.row("tan2023_all_pfs_24m")  # 0.368, 95% CI 0.138-0.598
    se = (0.598 - 0.138) / (2 * stats.norm.ppf(0.975))
    n = 0.368 * 0.632 / se**2
    want = 0.368 * n * math.log(0.5 / 0.368) + (n - 0.368 * n) * math.log(0.5 / 0.632)
    assert calibration.log_likelihood(row, Claim(row.row_id), Outcome(0.5, 400)) == pytest.approx(want, rel=1e-9)


def test_laplace_covariance_of_a_gaussian_is_its_covariance():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 5))
    cov = a @ a.T + 0.5 * np.eye(5)
    prec = np.linalg.inv(cov)
    logp = lambda x: -0.5 * (x - 0.3) @ prec @ (x - 0.3)  # noqa: E731  # central differences are exact here
    np.testing.assert_allclose(calibration.laplace_covariance(logp, np.full(5, 0.3), np.full(5, 0.1)), cov,
                               rtol=1e-8, atol=1e-8)
    assert calibration.laplace_covariance(lambda x: float(x @ x), np.zeros(2), [0.1, 0.1]) is None  # a minimum


def test_metropolis_started_from_the_laplace_covariance_mixes_a_correlated_posterior():
    # ten correlated dimensions, warm-up and chain as long as the calibration's (1000 + 3000)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((10, 10))
    cov = a @ a.T + 0.05 * np.eye(10)
    prec = np.linalg.inv(cov)
    logp = lambda x: -0.5 * x @ prec @ x  # noqa: E731
    laplace = calibration.laplace_covariance(logp, np.zeros(10), np.full(10, 0.1))
    ess = [min(calibration._ess(calibration.metropolis(logp, np.zeros(10), np.full(10, 0.05), 1000, 3000,
                                                       np.random.default_rng(1), cov0=c)[0]))
           for c in (None, laplace)]
    assert ess[1] > 3 * ess[0]  # about 30 against 7


def test_metropolis_recovers_a_correlated_gaussian():
    cov = np.array([[1.0, 0.8], [0.8, 2.0]])
    prec = np.linalg.inv(cov)
    logp = lambda x: -0.5 * (x - 1.0) @ prec @ (x - 1.0)  # noqa: E731
    chain, _, acceptance = calibration.metropolis(logp, np.zeros(2), [0.1, 0.1], 2000, 20000,
                                                  np.random.default_rng(0))
    assert 0.15 < acceptance < 0.6
    np.testing.assert_allclose(chain.mean(0), [1.0, 1.0], atol=0.15)
    np.testing.assert_allclose(np.cov(chain.T), cov, atol=0.25)
    ess = calibration._ess(chain)
    assert all(200 < e < 20000 for e in ess)


@pytest.mark.parametrize("name", ["cd19_cart", "cd7_cart"])
def test_model_files_carry_the_calibrated_modes(name):
    res = result(name)
    model = load_model(name)
    for k, v in res["mode"].items():
        if k.startswith("omega_"):
            assert model.parameter(k[len("omega_"):]).omega == pytest.approx(v, rel=MODE_RTOL), k
        else:
            assert model.typical[k] == pytest.approx(v, rel=MODE_RTOL), k


def test_toxicity_link_defaults_are_the_calibrated_mode():
    res = result("toxicity")
    link = DLTModel()
    for k in ("intercept", "slope_peak", "slope_burden"):
        assert getattr(link, k) == pytest.approx(res["mode"][k], rel=MODE_RTOL), k
    for name in ("cd7_carnk", "cd19_cart"):
        assert default_dlt_model(name).offset == pytest.approx(res["mode"][f"offset.{name}"], rel=MODE_RTOL), name
    assert default_dlt_model("cd7_cart").offset == 0.0  # the reference class: no offset


def test_draws_pair_population_values_with_a_link():
    model = load_model("cd7_cart")
    d = draws(model, 5)
    assert len(d) == 5
    assert {"k_kill", "f_r"} <= set(d[0].values) and "k_kill" in d[0].omegas
    assert len({x.dlt.intercept for x in d}) > 1  # the link varies over draws
    with pytest.raises(ValueError, match=">= 1"):
        draws(model, 0)


@pytest.mark.slow
def test_calibration_script_reproduces_the_shipped_values():
    out = subprocess.run([sys.executable, str(ROOT / "calibration" / "calibrate.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reproduces the shipped modes" in out.stdout
