"""Workarounds for upstream bugs, each with the versions it is known to be needed for.

One today: reverse-mode gradients through a diffrax solve inside ``shard_map`` (diffrax issue
765, open). diffrax's checkpointed adjoint calls an equinox closure-converted loop body, and
equinox checks that the body is called with the shapes, dtypes and shardings it was converted
with. Inside ``shard_map`` some of those arrays carry the per-device (manual) mesh and some do
not, so the check fails although nothing differs. Every array inside ``shard_map`` is one
device's own, so that tag carries no information: while a sharded program is traced, the check
leaves it out.

``tests/test_compat.py`` runs the failing case without the workaround: when upstream fixes it,
that test fails and says to delete this module.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
from jax.sharding import AxisType

# equinox releases the workaround was written and tested against (the private hook it replaces)
EQUINOX_TESTED = ((0, 13),)


def _equinox_version() -> tuple[int, ...]:
    import equinox

    return tuple(int(x) for x in equinox.__version__.split(".")[:2] if x.isdigit())


@contextlib.contextmanager
def closure_checks_ignore_manual_mesh():
    """While active, equinox's closure-conversion check ignores manual-mesh shardings (see module).

    Outside the tested equinox releases, or where equinox lacks the private hook, nothing is
    changed (a warning says so once): gradients inside ``shard_map`` may then fail as upstream does."""
    from equinox import _ad

    strip = getattr(_ad, "_strip_weak_dtype", None)
    if strip is None or _equinox_version() not in EQUINOX_TESTED:
        warnings.warn(f"carkin.compat: equinox {'.'.join(map(str, _equinox_version()))} is not one the shard_map "
                      "gradient workaround was tested with; it is not applied", RuntimeWarning, stacklevel=3)
        yield
        return

    def local(s):
        axis_types = tuple(getattr(getattr(s.sharding, "mesh", None), "axis_types", ()))
        manual = bool(axis_types) and all(t == AxisType.Manual for t in axis_types)
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=None if manual else s.sharding)

    _ad._strip_weak_dtype = lambda tree: jax.tree.map(local, strip(tree))
    try:
        yield
    finally:
        _ad._strip_weak_dtype = strip
