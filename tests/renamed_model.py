"""A model whose every name differs from the library's: the model-contract test runs it through
simulate, NCA, plots, what-if and fit, which must find its variables through its declared roles.

One state, ``level`` (CAR cells/µL): an infusion adds ``f_blood * cells / (70 mL/kg * BW)``; the
cells expand at ``r * exp(-t / tau)`` and die at ``k``, so

    level(t) = level(0+) * exp(r * tau * (1 - exp(-t / tau)) - k * t)

for one infusion at t = 0 (the contract test holds the solve to this). The values are
illustrative, not taken from any paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from carkin.kinetics import Covariate, Model, Observable, Parameter, State
from carkin.observation import Assay

BLOOD_UL_PER_KG = 70_000.0  # illustrative: 70 mL/kg


@dataclass(frozen=True)
class RenamedModel(Model):
    name = "renamed_test_model"
    title = "Test model with non-library names (contract test only)"
    states = (State("L", "cells/µL", "CAR cells in blood"),)
    parameters = (
        Parameter("r", 1.2, "1/day", "initial expansion rate", "illustrative", 0.3),
        Parameter("tau", 4.0, "day", "decay time of the expansion drive", "illustrative", 0.2),
        Parameter("k", 0.15, "1/day", "death rate", "illustrative", 0.3),
        Parameter("f_blood", 0.05, "1", "fraction of infused cells in blood", "illustrative", 0.3, kind="fraction"),
    )
    observables = (Observable("level", "cells/µL", "CAR cells in blood"),)
    covariates = (Covariate("BW", "kg", "body mass", typical=50.0, log_sd=0.2, bounds=(10.0, 150.0)),)
    assays = {"level": Assay("proportional", 0.2, lloq=0.01, source="illustrative")}
    roles = {"exposure": "level", "weight": "BW"}
    dose_state = "L"

    def initial_state(self, p, cov):
        return jnp.zeros(1) * p["r"]

    def vector_field(self, t, y, p, cov, phase):
        return (p["r"] * jnp.exp(-t / p["tau"]) - p["k"]) * y

    def observe(self, y, p, cov):
        return {"level": y[..., 0]}

    def cells_to_state(self, p, cov):
        return p["f_blood"] / (BLOOD_UL_PER_KG * cov["BW"])

    @staticmethod
    def exact(t, dose_per_kg, p):
        """The single-infusion solution at days ``t`` >= 0 (dose in cells/kg, so BW cancels)."""
        level0 = p["f_blood"] * dose_per_kg / BLOOD_UL_PER_KG
        return level0 * jnp.exp(p["r"] * p["tau"] * (1 - jnp.exp(-t / p["tau"])) - p["k"] * t)


MODEL = RenamedModel
