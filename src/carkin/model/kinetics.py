"""The model interface: states, parameters with units, dose input, vector field, observables.

A model is an immutable description plus pure JAX functions of
``(t, y, params, covariates)``. ``params`` and ``covariates`` are dicts of JAX
scalars, so ``jit``, ``vmap`` and ``grad`` go straight through every model.

Concrete models live in the top-level ``models/`` folder (imported as
``carkin.models``), one file per model, each with a model card as its docstring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import jax.numpy as jnp

from carkin.errors import InputError, UnknownNameError

Kind = Literal["positive", "fraction", "real"]


@dataclass(frozen=True)
class Parameter:
    """One model parameter: typical value, unit, between-subject variability and source.

    ``omega`` is the standard deviation of the subject-level random effect on the
    log scale (``positive``) or logit scale (``fraction``); 0 means no variability.
    """

    name: str
    value: float
    unit: str
    description: str
    source: str
    omega: float = 0.0
    kind: Kind = "positive"

    def __post_init__(self):
        check_value(self.name, self.value, self.kind)
        if not (math.isfinite(self.omega) and self.omega >= 0):
            raise InputError(
                f"parameter {self.name!r}: omega must be a finite number >= 0, got {self.omega!r}"
            )


def check_value(name: str, value, kind: Kind) -> None:
    """Refuse a value outside the parameter's domain, saying what the domain is."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"parameter {name!r} must be finite, got {value!r}")
    if kind == "positive" and v <= 0:
        raise InputError(f"parameter {name!r} must be > 0, got {value!r}")
    if kind == "fraction" and not 0 < v < 1:
        raise InputError(f"parameter {name!r} is a fraction and must lie in (0, 1), got {value!r}")


@dataclass(frozen=True)
class State:
    name: str
    unit: str
    description: str


@dataclass(frozen=True)
class Observable:
    name: str
    unit: str
    long_name: str


@dataclass(frozen=True)
class Covariate:
    """A subject covariate with its typical value and a default population spread.

    Population values are log-normal around ``typical`` with log-SD ``log_sd``,
    clipped to ``bounds`` (a documented default, overridable in ``simulate``).
    """

    name: str
    unit: str
    description: str
    typical: float
    log_sd: float = 0.0
    bounds: tuple[float, float] = (0.0, math.inf)


@dataclass(frozen=True)
class SolverSettings:
    """Tolerances and solver per model, chosen by measurement (see benchmarks/)."""

    rtol: float = 1e-6
    atol: float = 1e-9
    solver: str = "Tsit5"
    max_steps: int = 4096
    dt0: float = 0.01


WEIGHT = Covariate(
    "WT", "kg", "body weight", typical=60.0, log_sd=0.3, bounds=(12.0, 150.0)
)


# What generic code (NCA defaults, what-if, trials, plots, dosing per kg) needs to know of a model's
# names. A model declares the ones it has in ``roles``; the model-contract test checks each names a
# real observable, state or covariate.
ROLES = {
    "exposure": "the CAR level observable (copies/µg or cells/µL) that NCA and the toxicity link read",
    "exposure_cells": "the CAR cell count observable (cells/µL), plotted beside the exposure",
    "tumour": "the tumour observable (marrow blast %)",
    "escape": "the antigen-negative tumour observable (blast %)",
    "normal": "the antigen-positive normal-cell observable (cells/µL)",
    "normal_state": "the antigen-positive normal-cell state",
    "weight": "the body-weight covariate (kg) per-kg doses are multiplied by",
    "burden": "the baseline tumour-burden covariate (% marrow blasts) the toxicity link reads",
}
CELL_TYPES = ("CAR-T", "CAR-NK")


# Datasets without role attributes (hand-built, or written before roles were recorded) are read with
# the library's convention: its models all call their exposure this.
CONVENTIONAL_NAMES = {"exposure": "car_copies"}


def variable_with_role(ds, role: str) -> str | None:
    """The data variable of a Dataset that plays ``role``: the one whose ``role`` attribute says so (simulate
    sets it), else the library's conventional name for the role if present, else None."""
    marked = next((str(k) for k, v in ds.data_vars.items() if v.attrs.get("role") == role), None)
    if marked is None and CONVENTIONAL_NAMES.get(role) in ds.data_vars:
        return CONVENTIONAL_NAMES[role]
    return marked


@dataclass(frozen=True)
class Model:
    """Base class of every carkin model. Subclasses are frozen dataclasses.

    Subclasses set the class attributes below and implement ``initial_state``,
    ``vector_field`` and ``observe``; models with a dose input implement
    ``cells_to_state``; models with a regime switch at a parameter-valued time
    (Stein's Tmax) implement ``switch_time`` and ``on_switch``.
    """

    name: ClassVar[str]
    title: ClassVar[str]  # one line, shown by ``carkin models``
    states: ClassVar[tuple[State, ...]]
    parameters: ClassVar[tuple[Parameter, ...]]
    observables: ClassVar[tuple[Observable, ...]]
    covariates: ClassVar[tuple[Covariate, ...]] = (WEIGHT,)
    dose_state: ClassVar[str | None] = None
    has_switch: ClassVar[bool] = False
    has_closed_form: ClassVar[bool] = False
    solver: ClassVar[SolverSettings] = SolverSettings()
    # how each observable is measured (residual error, LLOQ): carkin.observation.Assay per name
    assays: ClassVar[dict] = {}
    # what generic code needs to know of the model's names (ROLES; any but weight may be absent):
    # generic code asks ``model.role(...)`` and never names a model's variables
    roles: ClassVar[dict] = {"weight": WEIGHT.name}
    cell_type: ClassVar[str] = "CAR-T"  # one of CELL_TYPES: selects the toxicity link's calibrated offset

    values: tuple[tuple[str, float], ...] = field(default=())

    def __post_init__(self):
        known = {p.name: p for p in self.parameters}
        given = dict(self.values)
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InputError(
                f"model {self.name!r} has no parameter(s) {unknown}; "
                f"its parameters are {sorted(known)}"
            )
        for k, v in given.items():
            check_value(k, v, known[k].kind)
        full = tuple((p.name, float(given.get(p.name, p.value))) for p in self.parameters)
        object.__setattr__(self, "values", full)

    # --- metadata helpers -------------------------------------------------
    def with_values(self, **values: float) -> Model:
        """A copy with some typical values replaced (validated)."""
        return dataclasses.replace(self, values=tuple({**dict(self.values), **values}.items()))

    @property
    def typical(self) -> dict[str, float]:
        return dict(self.values)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def role(self, role: str, required: bool = True) -> str | None:
        """The name of the variable that plays ``role`` (one of ROLES) in this model.

        Missing and ``required``: a ValueError naming the model's roles; else None."""
        if role not in ROLES:
            raise InputError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        name = self.roles.get(role)
        if name is None and required:
            raise InputError(f"model {self.name!r} declares no {role!r} role ({ROLES[role]}); its roles: "
                             f"{self.roles}. Declare it in the model's roles, or choose a variable explicitly")
        return name

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise UnknownNameError(f"model {self.name!r} has no parameter {name!r}")

    def covariate(self, name: str) -> Covariate:
        for c in self.covariates:
            if c.name == name:
                return c
        raise UnknownNameError(f"model {self.name!r} has no covariate {name!r}")

    @property
    def dose_index(self) -> int | None:
        return None if self.dose_state is None else self.state_names.index(self.dose_state)

    # --- the dynamics: pure JAX functions ----------------------------------
    def initial_state(self, p: dict, cov: dict) -> jnp.ndarray:
        """State at the first infusion, before that infusion's cells are added."""
        raise NotImplementedError

    def baseline_state(self, p: dict, cov: dict) -> jnp.ndarray:
        """State reported at times before the first infusion (default: the initial state)."""
        return self.initial_state(p, cov)

    def vector_field(self, t, y, p: dict, cov: dict, phase) -> jnp.ndarray:
        """dy/dt. ``phase`` is 0 before the switch time and 1 after (models without one: 0)."""
        raise NotImplementedError

    def observe(self, y, p: dict, cov: dict) -> dict[str, jnp.ndarray]:
        """Observables from a state vector ``y`` (last axis = states)."""
        raise NotImplementedError

    def cells_to_state(self, p: dict, cov: dict):
        """Factor converting infused CAR cells (total) into the dose state's unit."""
        raise NotImplementedError(f"model {self.name!r} takes no dose")

    def switch_time(self, p: dict):
        """Time of the regime switch, in days after the first infusion."""
        raise NotImplementedError

    def on_switch(self, y, p: dict, cov: dict):
        return y

    def closed_form_observables(self, t, p: dict, cov: dict, dose_times, dose_cells) -> dict:
        """Observables at times ``t`` from an exact solution (models with ``has_closed_form``).

        Fitting uses it instead of the ODE solve where it exists, as an analytic
        ADVAN would; tests hold the two to agree."""
        raise NotImplementedError(f"model {self.name!r} has no closed-form solution")
