"""Simulated measurements: the model's residual error and LLOQ applied to simulated observables.

A simulation gives the true state of each virtual subject; an observed study gives noisy,
censored samples. To hold simulated NCA against observed NCA, the simulation has to be
measured the same way: ``measure`` draws each sample from the observable's error model
(``Model.assays``) and marks values below the LLOQ as BLQ (NaN in ``<name>_measured``, True
in ``<name>_blq``), exactly as ``carkin.nca`` then treats them.

Noise for a subject depends only on the seed, the regimen and the subject's index, so a
population measured in pieces equals one measured at once.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from carkin.errors import InputError, InputTypeError
from carkin.model import observation
from carkin.model.kinetics import Model
from carkin.model.observation import Assay

MEASUREMENT_STREAM = 0x6D656173  # folded into the seed so measurement noise never reuses the population draws


@partial(jax.jit, static_argnums=3)
def _noise(key, regimen, subjects, n_times):
    return jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, regimen), s),
                                                (n_times,)))(subjects)


def measure(ds: xr.Dataset, model: Model, *, seed: int = 0, observables=None, assays: dict | None = None) -> xr.Dataset:
    """Add ``<name>_measured`` (NaN where BLQ) and ``<name>_blq`` for each measured observable.

    ``observables`` defaults to every observable that has an assay in ``model.assays``;
    ``assays`` overrides those (name -> :class:`carkin.observation.Assay`). The input is
    not modified."""
    table = {**model.assays, **(assays or {})}
    names = list(observables) if observables is not None else [n for n in table if n in ds]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise InputError(f"measure: no assay for {unknown} in model {model.name!r}; give assays={{name: Assay(...)}} "
                         f"(assays known: {sorted(table)})")
    missing = [n for n in names if n not in ds]
    if missing:
        raise InputError(f"measure: the Dataset has no variable {missing}; variables are {list(ds.data_vars)}")
    key = jax.random.PRNGKey(seed)
    key = jax.random.fold_in(key, MEASUREMENT_STREAM)
    out = ds.copy()
    subjects = jnp.asarray(ds["subject"].values)
    for j, name in enumerate(names):
        assay: Assay = table[name]
        if not isinstance(assay, Assay):
            raise InputTypeError(f"measure: the assay of {name!r} must be a carkin.observation.Assay, got {assay!r}")
        true = ds[name]
        lead = [d for d in true.dims if d not in ("subject", "time")]
        arr = true.transpose(*lead, "subject", "time").values
        flat = arr.reshape(-1, *arr.shape[-2:])
        noisy = np.empty_like(flat)
        error = observation.ErrorModel(assay.error)  # the error model owns its scale and its inverse
        for r in range(flat.shape[0]):
            z = np.asarray(_noise(jax.random.fold_in(key, j), r, subjects, flat.shape[-1]))
            f = jnp.maximum(jnp.asarray(flat[r]), observation.PREDICTION_FLOOR)
            centre, sd = error.scale(f, assay.sigma, assay.sigma_add)
            noisy[r] = np.asarray(error.g_inverse(jnp.asarray(centre) + jnp.asarray(sd) * z))
        noisy = noisy.reshape(arr.shape)
        blq = noisy < assay.lloq
        dims = (*lead, "subject", "time")
        attrs = dict(true.attrs)
        attrs.update(long_name=f"{attrs.get('long_name', name)}, measured", error_model=assay.error,
                     sigma=assay.sigma, sigma_add=assay.sigma_add, lloq=assay.lloq, assay_source=assay.source,
                     blq_rule="below the LLOQ: NaN (censored), flagged in the _blq variable")
        out[f"{name}_measured"] = xr.DataArray(np.where(blq, np.nan, noisy), dims=dims,
                                               coords={d: ds[d] for d in dims if d in ds.coords}, attrs=attrs)
        out[f"{name}_blq"] = xr.DataArray(blq, dims=dims, coords={d: ds[d] for d in dims if d in ds.coords},
                                          attrs={"units": "1", "long_name": f"{name} below the LLOQ ({assay.lloq:g})"})
        out[f"{name}_measured"] = out[f"{name}_measured"].transpose(*true.dims)
        out[f"{name}_blq"] = out[f"{name}_blq"].transpose(*true.dims)
    out.attrs["measurement_seed"] = seed
    return out
