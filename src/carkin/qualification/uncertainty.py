"""The calibration's uncertainty, carried into virtual populations: one draw = population values + a DLT link.

``calibration/calibrate.py`` writes each calibrated model's draws (typical values and between-subject
SDs) and the toxicity link's draws (its coefficients, and cd7_cart's density limit estimated with
it) to data/calibration/ (installed as carkin.calibrations). A what-if run or a trial simulation
over ``draws(model, n)`` gives every result an interval that reflects what the evidence leaves open.
Model draws and link draws are paired by index (both from their own Metropolis chains).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import numpy as np

from carkin.errors import InputError
from carkin.model import population
from carkin.model.kinetics import Model
from carkin.trials.toxicity import DLTModel, dlt_model_for

LINK = "toxicity"


@dataclass(frozen=True)
class Draw:
    """One joint draw: typical values and between-subject SDs replacing the model's, and a DLT link."""

    values: dict
    omegas: dict
    dlt: DLTModel


@cache
def result(name: str) -> dict | None:
    """A shipped calibration result (``name`` a model, or 'toxicity'), or None where there is none."""
    path = resources.files("carkin.calibrations").joinpath(f"{name}.json")
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _natural(name: str, scale: str, x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if scale == "logit" else (math.exp(x) if scale == "log" else x)


def draws(model: Model, n: int) -> list[Draw]:
    """``n`` joint draws for ``model`` (cycling through the stored draws when n exceeds them)."""
    if int(n) < 1:
        raise InputError(f"the number of calibration draws must be >= 1, got {n!r}")
    kinetic = result(model.name)
    link = result(LINK)
    base = dlt_model_for(model)
    out = []
    for i in range(int(n)):
        values, omegas = {}, {}
        if kinetic is not None:
            d = kinetic["draws_unconstrained"][i % len(kinetic["draws_unconstrained"])]
            for name, scale, x in zip(kinetic["parameters"], kinetic["scale"], d):
                v = _natural(name, scale, x)
                if population.parameter_of_omega(name):
                    omegas[population.parameter_of_omega(name)] = v
                else:
                    values[name] = v
        dlt = base
        if link is not None:
            d = link["draws_unconstrained"][i % len(link["draws_unconstrained"])]
            coef = dict(zip(link["parameters"], d))
            dlt = replace(base, intercept=coef["intercept"], slope_peak=coef["slope_peak"],
                          slope_burden=coef["slope_burden"], offset=coef.get(f"offset.{model.name}", 0.0),
                          source=base.source + "; a calibration draw")
            for key, scale, x in zip(link["parameters"], link["scale"], d):
                owner, _, parameter = key.partition(".")
                if parameter and owner == model.name and not key.startswith("offset."):
                    values[parameter] = _natural(parameter, scale, x)
        out.append(Draw(values, omegas, dlt))
    return out


def population_over_draws(model: Model, chosen: list[Draw], n_subjects: int, seed: int) -> dict:
    """Per-subject parameters for every draw (draw-major: draw d holds subjects d*n ... d*n + n - 1).

    The same standard-normal random effects are used under every draw, so differences between
    draws are the parameters' uncertainty, not new virtual patients."""
    rng = np.random.default_rng(seed)
    eta = rng.standard_normal((int(n_subjects), len(model.parameters)))
    names = model.parameter_names
    virtual = population.Population.of(model)
    blocks = []
    for d in chosen:
        sites = {**virtual.model_sites(), **d.values}
        sites.update({population.omega_site(k): v for k, v in d.omegas.items()})
        theta = np.asarray(virtual.individual(sites, eta))
        blocks.append(np.where(virtual.fraction_mask(), np.clip(theta, 1e-12, 1 - 1e-12), theta))
    theta = np.concatenate(blocks)
    return dict(zip(names, theta.T))
