"""Module paths from before the modules moved into packages (``carkin.inference`` is now
``carkin.fitting.inference``, ...): importing an old path gives the module at its new place, the same
object, so scripts and saved references keep working."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old name -> new place, under carkin
MOVED = {
    "kinetics": "model.kinetics", "library": "model.library", "dosing": "model.dosing",
    "population": "model.population", "observation": "model.observation", "physiology": "model.physiology",
    "solve": "simulation.solve", "simulate": "simulation.simulate", "stream": "simulation.stream",
    "nca": "simulation.nca", "measure": "simulation.measure",
    "data": "fitting.data", "fit_design": "fitting.fit_design", "predictions": "fitting.predictions",
    "fit_problem": "fitting.fit_problem", "inference": "fitting.inference", "samplers": "fitting.samplers",
    "sampling": "fitting.sampling", "fit_results": "fitting.fit_results", "convergence": "fitting.convergence",
    "posthoc": "fitting.posthoc", "batch": "fitting.batch", "diagnostics": "fitting.diagnostics",
    "toxicity": "trials.toxicity", "whatif": "trials.whatif", "protocol": "trials.protocol",
    "evidence": "qualification.evidence", "arms": "qualification.arms", "qualify": "qualification.qualify",
    "calibration": "qualification.calibration", "uncertainty": "qualification.uncertainty",
    "fitplots": "plots.fit",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        module.__spec__ = importlib.util.find_spec(self.target)  # the import system set the alias's spec


class LegacyPaths(importlib.abc.MetaPathFinder):
    """Finds ``carkin.<old name>`` and loads ``carkin.<new place>`` in its stead."""

    def find_spec(self, fullname, path, target=None):
        old = fullname[len("carkin."):] if fullname.startswith("carkin.") else None
        if old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader("carkin." + MOVED[old]))


def install() -> None:
    """Register the finder, and alias at once the moved modules already imported (so that importing
    ``carkin.simulate`` later cannot rebind ``carkin.simulate``, the function, to the module)."""
    if not any(isinstance(f, LegacyPaths) for f in sys.meta_path):
        sys.meta_path.append(LegacyPaths())
    for old, new in MOVED.items():
        module = sys.modules.get("carkin." + new)
        if module is not None:
            sys.modules.setdefault("carkin." + old, module)
