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
            raise ValueError(
                f"parameter {self.name!r}: omega must be a finite number >= 0, got {self.omega!r}"
            )


def check_value(name: str, value, kind: Kind) -> None:
    """Refuse a value outside the parameter's domain, saying what the domain is."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"parameter {name!r} must be finite, got {value!r}")
    if kind == "positive" and v <= 0:
        raise ValueError(f"parameter {name!r} must be > 0, got {value!r}")
    if kind == "fraction" and not 0 < v < 1:
        raise ValueError(f"parameter {name!r} is a fraction and must lie in (0, 1), got {value!r}")


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
    # what generic code needs to know of the model's names (any may be absent):
    # exposure (CAR level), tumour (marrow blast %), escape (antigen-negative blast %),
    # normal (antigen-positive normal cells), weight (the body-weight covariate)
    roles: ClassVar[dict] = {}

    values: tuple[tuple[str, float], ...] = field(default=())

    def __post_init__(self):
        known = {p.name: p for p in self.parameters}
        given = dict(self.values)
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(
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

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(f"model {self.name!r} has no parameter {name!r}")

    def covariate(self, name: str) -> Covariate:
        for c in self.covariates:
            if c.name == name:
                return c
        raise KeyError(f"model {self.name!r} has no covariate {name!r}")

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
