"""carkin: CAR-T and CAR-NK cellular kinetics — models, dosing, simulation, NCA.

Importing carkin switches JAX to 64-bit floats and changes nothing else; call
``carkin.configure()`` first to use every CPU core and the compilation cache
(carkin.config says why the one and not the others).
"""

from carkin.config import configure  # importing carkin.config switches JAX to 64-bit floats
from carkin.data import DatasetError, DatasetWarning, StudyData, read_dataset
from carkin.dosing import Regimen, custom, single, split
from carkin.errors import CarkinError
from carkin.inference import FitWarning, ModelDataError, fit, load_fit, save_fit
from carkin.kinetics import Covariate, Model, Observable, Parameter, State
from carkin.library import list_models, load_model
from carkin.nca import nca, nca_long
from carkin.observation import ErrorModel
from carkin.population import CovariateEffect
from carkin.samplers import NUTS, SVI
from carkin.simulate import SimulationWarning, simulate

__version__ = "0.1.0"

__all__ = [
    "CarkinError", "Covariate", "CovariateEffect", "DatasetError", "DatasetWarning", "ErrorModel", "FitWarning",
    "Model", "ModelDataError", "NUTS", "Observable", "Parameter", "Regimen", "SVI", "SimulationWarning", "State",
    "StudyData",
    "configure",
    "custom", "fit", "list_models", "load_fit", "load_model", "nca", "nca_long", "read_dataset", "save_fit",
    "simulate", "single", "split",
]
