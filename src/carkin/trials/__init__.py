"""Dose-escalation trials: the designs and their registry (``designs``), running trials and their
operating characteristics (``operating``), the toxicity link, what-if grids and protocol files.

``carkin.trials`` offers the public names of ``designs`` and ``operating``, as the single module of
that name did."""

from carkin.trials import designs as _designs
from carkin.trials import operating as _operating

# every name the single module of this name had (its __all__ lists only some), so old imports keep working
for _module in (_designs, _operating):
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
