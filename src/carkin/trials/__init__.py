"""Dose-escalation trials: the designs and their registry, operating characteristics (``designs``), the
toxicity link, what-if grids and protocol files.

``carkin.trials`` offers the designs module's public names, as the single module of that name did."""

from carkin.trials.designs import *  # noqa: F403
from carkin.trials.designs import __doc__ as _designs_doc  # noqa: F401
