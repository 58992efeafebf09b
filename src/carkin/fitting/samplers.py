"""Sampler settings as small immutable objects: ``fit(model, data, sampler=NUTS(chains=4))``.

``NUTS`` samples the posterior; ``SVI`` fits a normal approximation by stochastic variational
inference and draws from it (a quick look, with less honest uncertainty); ``Laplace`` maximises the
likelihood with the random effects integrated out (FOCE-I; carkin.fitting.laplace)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from carkin.errors import InputError


def _whole(owner: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{owner}: {name} must be a whole number >= {minimum}, got {value!r}")


NUTS_STARTS = ("median", "svi", "laplace")


@dataclass(frozen=True)
class NUTS:
    """NumPyro's NUTS: ``chains`` chains of ``warmup`` adaptation and ``samples`` kept draws each,
    started at the prior medians (``init="median"``), at a Laplace fit's estimates and modes
    (``init="laplace"``) or at an SVI fit's medians (``init="svi"``, after ``svi_steps`` steps)."""

    chains: int = 4
    warmup: int = 500
    samples: int = 500
    target_accept: float = 0.8
    max_tree_depth: int = 10
    init: str = "median"
    svi_steps: int = 3000

    def __post_init__(self):
        for name in ("chains", "warmup", "samples", "max_tree_depth", "svi_steps"):
            _whole("NUTS", name, getattr(self, name))
        if not (isinstance(self.target_accept, (int, float)) and 0 < self.target_accept < 1
                and math.isfinite(self.target_accept)):
            raise InputError(f"NUTS: target_accept must lie in (0, 1), got {self.target_accept!r}")
        if self.init not in NUTS_STARTS:
            raise InputError(f"init must be one of {', '.join(NUTS_STARTS)}, got {self.init!r}")

    @property
    def n_draws(self) -> int:
        return self.chains * self.samples


@dataclass(frozen=True)
class SVI:
    """A normal approximation of the posterior after ``steps`` optimiser steps; ``draws`` draws from it."""

    steps: int = 3000
    draws: int = 1000

    def __post_init__(self):
        for name in ("steps", "draws"):
            _whole("SVI", name, getattr(self, name))

    @property
    def n_draws(self) -> int:
        return self.draws


@dataclass(frozen=True)
class Laplace:
    """Settings of ``fit(..., method="laplace")``: ``starts`` outer optimisations (the first from
    the model's values, the others perturbed by seed), ``priors`` to add the log prior (a MAP
    estimate on the constrained scale), ``covariance`` to compute standard errors."""

    starts: int = 3
    priors: bool = False
    covariance: bool = True
    max_iter: int = 500

    def __post_init__(self):
        for name in ("starts", "max_iter"):
            _whole("Laplace", name, getattr(self, name))

    @property
    def n_draws(self) -> int:
        return 1


def from_arguments(method: str, chains, warmup, samples, target_accept, max_tree_depth, init, svi_steps,
                   svi_draws) -> NUTS | SVI | Laplace:
    """The sampler the older keyword arguments of ``fit`` describe."""
    if method not in ("nuts", "svi", "laplace"):
        raise InputError(f"method must be 'nuts', 'svi' or 'laplace', got {method!r}")
    for name, v in (("chains", chains), ("warmup", warmup), ("samples", samples), ("svi_steps", svi_steps),
                    ("svi_draws", svi_draws)):
        if int(v) < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    if method == "laplace":
        return Laplace()
    if method == "svi":
        if init not in NUTS_STARTS:
            raise InputError(f"init must be one of {', '.join(NUTS_STARTS)}, got {init!r}")
        return SVI(int(svi_steps), int(svi_draws))
    return NUTS(int(chains), int(warmup), int(samples), target_accept, int(max_tree_depth), init, int(svi_steps))
