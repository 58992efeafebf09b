"""carkin: CAR-T and CAR-NK cellular kinetics — models, dosing, simulation, NCA.

Importing carkin switches JAX to 64-bit floats: cellular kinetics span eight
orders of magnitude and the reference tests hold to 1e-6.
"""

import os

import jax

jax.config.update("jax_enable_x64", True)


def _use_all_cpu_cores() -> None:
    """Expose each CPU core as a JAX device so simulate can split populations over them.

    Only possible before JAX has started its backends; set CARKIN_CPU_DEVICES to
    choose the number (1 turns this off)."""
    n = int(os.environ.get("CARKIN_CPU_DEVICES", os.cpu_count() or 1))
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised by the caller: keep theirs
        pass


_use_all_cpu_cores()

from carkin.data import DatasetError, DatasetWarning, StudyData, read_dataset  # noqa: E402
from carkin.dosing import Regimen, custom, single, split  # noqa: E402
from carkin.inference import FitWarning, ModelDataError, fit, load_fit, save_fit  # noqa: E402
from carkin.kinetics import Covariate, Model, Observable, Parameter, State  # noqa: E402
from carkin.library import list_models, load_model  # noqa: E402
from carkin.nca import nca, nca_long  # noqa: E402
from carkin.observation import ErrorModel  # noqa: E402
from carkin.population import CovariateEffect  # noqa: E402
from carkin.simulate import SimulationWarning, simulate  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Covariate", "CovariateEffect", "DatasetError", "DatasetWarning", "ErrorModel", "FitWarning", "Model",
    "ModelDataError", "Observable", "Parameter", "Regimen", "SimulationWarning", "State", "StudyData",
    "custom", "fit", "list_models", "load_fit", "load_model", "nca", "nca_long", "read_dataset", "save_fit",
    "simulate", "single", "split",
]
