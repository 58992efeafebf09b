"""Figures: of simulations, what-if grids and trials (``simulation``), and of fits (``fit``).

``carkin.plots`` offers the simulation plots' public names, as the single module of that name did."""

from carkin.plots import simulation as _simulation

# every name the single module of this name had (its __all__ lists only some), so old imports keep working
globals().update({k: v for k, v in vars(_simulation).items() if not k.startswith("__")})
