"""Find models in the model library (the top-level ``models/`` folder, imported as ``carkin.models``)."""

from __future__ import annotations

import importlib
import pkgutil

from carkin.errors import InputError
from carkin.model.kinetics import Model


def _module_names() -> list[str]:
    import carkin.models as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def list_models() -> dict[str, str]:
    """Model name -> one-line description, for every model in the library."""
    return {name: load_model(name).title for name in _module_names()}


def load_model(name: str, **options) -> Model:
    """The model called ``name`` at its typical values; ``options`` go to its constructor
    (parameter values as ``values={...}``, or model settings such as ``product_type``)."""
    names = _module_names()
    if name not in names:
        raise InputError(f"unknown model {name!r}; available models: {', '.join(names)}")
    cls = importlib.import_module(f"carkin.models.{name}").MODEL
    values = options.pop("values", {})
    model = cls(**options)
    return model.with_values(**values) if values else model
