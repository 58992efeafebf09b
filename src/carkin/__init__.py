"""carkin: CAR-T and CAR-NK cellular kinetics — models, dosing, simulation, NCA.

Importing carkin switches JAX to 64-bit floats and changes nothing else; call
``carkin.configure()`` first to use every CPU core and the compilation cache
(carkin.config says why the one and not the others).
"""

from carkin import _legacy
from carkin.config import configure  # importing carkin.config switches JAX to 64-bit floats
from carkin.errors import CarkinError
from carkin.fitting.data import DatasetError, DatasetWarning, StudyData, read_dataset
from carkin.fitting.inference import FitWarning, ModelDataError, fit, load_fit, save_fit
from carkin.fitting.samplers import NUTS, SVI, Laplace
from carkin.model.dosing import Regimen, custom, single, split
from carkin.model.kinetics import Covariate, Model, Observable, Parameter, State
from carkin.model.library import list_models, load_model
from carkin.model.observation import ErrorModel
from carkin.model.population import CovariateEffect
from carkin.simulation.nca import nca, nca_long
from carkin.simulation.simulate import SimulationWarning, simulate

_legacy.install()  # old module paths (carkin.inference, carkin.kinetics, ...) still import

__version__ = "0.1.0"

__all__ = [
    "CarkinError", "Covariate", "CovariateEffect", "DatasetError", "DatasetWarning", "ErrorModel", "FitWarning",
    "Laplace", "Model", "ModelDataError", "NUTS", "Observable", "Parameter", "Regimen", "SVI", "SimulationWarning",
    "State",
    "StudyData",
    "configure",
    "custom", "fit", "list_models", "load_fit", "load_model", "nca", "nca_long", "read_dataset", "save_fit",
    "simulate", "single", "split",
]
