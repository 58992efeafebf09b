"""Dose-escalation trials: the designs and their registry, operating characteristics (``designs``), the
toxicity link, what-if grids and protocol files.

``carkin.trials`` offers the designs module's public names, as the single module of that name did."""

from carkin.trials import designs as _designs

# every name the single module of this name had (its __all__ lists only some), so old imports keep working
globals().update({k: v for k, v in vars(_designs).items() if not k.startswith("__")})
