"""Figures: of simulations, what-if grids and trials (``simulation``), and of fits (``fit``).

``carkin.plots`` offers the simulation plots' public names, as the single module of that name did."""

from carkin.plots.simulation import *  # noqa: F403
