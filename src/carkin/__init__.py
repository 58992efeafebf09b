"""carkin: CAR-T and CAR-NK cellular kinetics — models, dosing, simulation, NCA.

Importing carkin switches JAX to 64-bit floats: cellular kinetics span eight
orders of magnitude and the reference tests hold to 1e-6.
"""

import jax

jax.config.update("jax_enable_x64", True)

from carkin.dosing import Regimen, custom, single, split  # noqa: E402
from carkin.kinetics import Covariate, Model, Observable, Parameter, State  # noqa: E402
from carkin.library import list_models, load_model  # noqa: E402

# NCA-PENDING from carkin.nca import nca, nca_long  # noqa: E402
from carkin.simulate import SimulationWarning, simulate  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Covariate", "Model", "Observable", "Parameter", "Regimen", "SimulationWarning", "State",
    "custom", "list_models", "load_model", "nca", "nca_long", "simulate", "single", "split",
]
