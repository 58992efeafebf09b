"""Forward-mode derivatives through the ensemble solver: a population log density's gradient with the
ensemble engine against the same gradient with diffrax's forward mode."""

import dataclasses
import warnings

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.infer import init_to_median
from numpyro.infer.util import initialize_model

import carkin as ck
from carkin.fitting.fit_problem import make_problem

# both engines solve at the model's rtol 1e-6: their gradients differ by the solvers' errors
GRADIENT_AGREEMENT = 1e-3


@pytest.mark.slow
def test_log_density_gradient_agrees_with_diffrax_forward_mode():
    model = ck.load_model("cd7_cart")
    data = ck.read_dataset("data/cd7_sim.csv")
    data = data.subset(data.ids[:6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = make_problem(model, data, estimate=("rho", "k_kill", "d_e", "f_blood"),
                            variability=("rho", "k_kill"))
    grads, values = {}, {}
    for engine in ("diffrax", "ensemble"):
        problem = dataclasses.replace(base, engine=engine)
        assert problem.forward_mode_parameters is not None
        info = initialize_model(jax.random.PRNGKey(0), problem.numpyro_model, model_args=(None,),
                                dynamic_args=True, init_strategy=init_to_median(num_samples=15))
        potential = info.potential_fn(None)
        flat, unravel = ravel_pytree(info.param_info.z)
        value, grad = jax.jit(jax.value_and_grad(lambda v, f=potential, u=unravel: f(u(v))))(flat)
        values[engine], grads[engine] = float(value), np.asarray(grad)
    assert np.isfinite(grads["ensemble"]).all()
    assert values["ensemble"] == pytest.approx(values["diffrax"], rel=1e-5)
    scale = np.abs(grads["diffrax"]).max()
    assert np.abs(grads["ensemble"] - grads["diffrax"]).max() / scale < GRADIENT_AGREEMENT
