"""Error models are an extension point: one final subclass of ErrorModel with a name is usable in a fit
(its likelihood, censored where BLQ, checked against scipy here), with nothing else edited. The
library's three models are held to scipy's densities and to their IWRES formulas."""

import numpy as np
import pytest
from scipy import stats

import carkin as ck
from carkin.inference import make_problem
from carkin.observation import ERROR_MODELS, Combined, ErrorModel, LogAdditive, Proportional

RTOL = 1e-10
F = np.array([3.0, 40.0, 900.0])
Y = np.array([2.5, 55.0, 700.0])
LLOQ = np.array([5.0, 50.0, 1000.0])


def test_registry_and_construction_by_name():
    assert ERROR_MODELS == {"log-additive": LogAdditive, "proportional": Proportional, "combined": Combined}
    assert ErrorModel("proportional") == Proportional() and ErrorModel() == LogAdditive()
    assert ErrorModel(Combined()) == Combined() and ErrorModel("combined").has_additive
    with pytest.raises(ValueError, match="error model must be one of"):
        ErrorModel("quadratic")


@pytest.mark.parametrize("model, density, cdf_of_lloq, iwres", [
    (LogAdditive(), lambda s, a: stats.lognorm.logpdf(Y, s, scale=F),
     lambda s, a: stats.lognorm.logcdf(LLOQ, s, scale=F), lambda s, a: np.log(Y / F) / s),
    (Proportional(), lambda s, a: stats.norm.logpdf(Y, F, s * F), lambda s, a: stats.norm.logcdf(LLOQ, F, s * F),
     lambda s, a: (Y - F) / (s * F)),
    (Combined(), lambda s, a: stats.norm.logpdf(Y, F, np.hypot(a, s * F)),
     lambda s, a: stats.norm.logcdf(LLOQ, F, np.hypot(a, s * F)), lambda s, a: (Y - F) / np.hypot(a, s * F)),
], ids=["log-additive", "proportional", "combined"])
def test_densities_censoring_and_residuals_match_scipy(model, density, cdf_of_lloq, iwres):
    sigma, add = 0.4, 2.0
    np.testing.assert_allclose(np.asarray(model.log_density(Y, F, sigma, add)), density(sigma, add), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(model.log_censored(LLOQ, F, sigma, add)), cdf_of_lloq(sigma, add), rtol=RTOL)
    np.testing.assert_allclose(model.residual(Y, F, sigma, add), iwres(sigma, add), rtol=RTOL)


def test_a_new_error_model_is_one_class(tmp_path):
    class AdditiveOnly(ErrorModel):
        """y ~ Normal(f, sigma): constant SD (a test-only model)."""

        name = "additive-test"
        sigma_meaning = "additive residual SD"

        def scale(self, f, sigma, sigma_add):
            return f, sigma + 0.0 * f

    try:
        path = tmp_path / "d.csv"
        path.write_text("ID,TIME,EVID,AMT,DV,MDV,BLQ,LLOQ,WT\n1,0,1,1e8,.,1,0,.,60\n1,7,0,.,9000,0,0,50,60\n"
                        "1,14,0,.,4000,0,0,50,60\n1,90,0,.,.,0,1,50,60\n")
        path.with_suffix(".toml").write_text('[dataset]\namt_unit = "cells"\n')
        stein = ck.load_model("stein_2019")
        problem = make_problem(stein, ck.read_dataset(path), estimate=("cmax",), variability=(),
                               error="additive-test")
        params = {"cmax": 24000.0, "sigma_car_copies": 3000.0}
        theta = problem.individual(params)
        total, ok = problem.log_likelihood(params, theta)
        f = np.asarray(stein.closed_form(np.array([7.0, 14.0, 90.0]), stein.typical))
        expected = stats.norm.logpdf([9000, 4000], f[:2], 3000.0).sum() + stats.norm.logcdf(50, f[2], 3000.0)
        assert bool(ok) and float(total) == pytest.approx(expected, rel=1e-9)
        assert problem.site_meta["sigma_car_copies"][1] == "additive residual SD of car_copies"
    finally:
        ERROR_MODELS.pop("additive-test", None)
