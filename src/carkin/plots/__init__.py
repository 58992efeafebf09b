"""Figures: of simulations (``simulation``), of what-if grids and trials (``trials``), and of fits
(``fit``).

``carkin.plots`` offers the public names of ``simulation`` and ``trials``, as the single module of
that name did."""

from carkin.plots import simulation as _simulation
from carkin.plots import trials as _trials

# every name the single module of this name had (its __all__ lists only some), so old imports keep working
for _module in (_simulation, _trials):
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
