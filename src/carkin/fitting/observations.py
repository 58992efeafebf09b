"""How a fit's observations sit in its DataTree: one variable per observable, with its own units.

Each observable ``name`` has its own dimension ``{name}_obs`` with coordinates ``{name}_id`` (subject)
and ``{name}_time`` (day). In ``observed_data`` the measured value is the variable ``name`` (in the
observable's units) beside ``{name}_blq``, ``{name}_lloq`` and ``{name}_row`` (row in the data file);
``log_likelihood`` and ``posterior_predictive`` hold ``name`` (as ArviZ expects, the same name as the
observed variable); ``posterior`` holds ``{name}_ipred`` and ``{name}_pred``.

The fit itself works on one flat array of all observations; :func:`split_observables` turns that flat
layout (a single ``dv`` over ``obs`` with an ``observable`` coordinate, which is also how fits written
by carkin before this layout are stored) into the per-observable one, and :func:`observation_table`
and :func:`flat_values` read it back in data-file order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

FLAT_DIM = "obs"
FLAT_VALUE = "dv"


def observation_dim(name: str) -> str:
    return f"{name}_obs"


def observable_variable(name: str, variable: str) -> str:
    """The per-observable name of a flat variable: the value itself is ``name``, others ``name_variable``."""
    return name if variable == FLAT_VALUE else f"{name}_{variable}"


def observables_of(tree: xr.DataTree) -> list[str]:
    return [str(o) for o in np.atleast_1d(tree.attrs["observables"])]


def is_flat(tree: xr.DataTree) -> bool:
    return "observed_data" in tree.children and FLAT_VALUE in _group(tree, "observed_data").data_vars


def _group(tree: xr.DataTree, name: str) -> xr.Dataset:
    node = tree[name]
    assert isinstance(node, xr.DataTree), name  # a group, not a variable
    return node.to_dataset()


def _split_dataset(ds: xr.Dataset, names: list[str], units: dict[str, str]) -> xr.Dataset:
    if FLAT_DIM not in ds.dims:
        return ds
    kinds = ds["observable"].values.astype(str)
    keep = {k: v for k, v in ds.data_vars.items() if FLAT_DIM not in v.dims}
    out = xr.Dataset(keep, coords={k: v for k, v in ds.coords.items() if FLAT_DIM not in v.dims})
    for name in names:
        sel = np.flatnonzero(kinds == name)
        dim = observation_dim(name)
        part = ds.isel({FLAT_DIM: sel})
        coords = {dim: np.arange(sel.size),
                  observable_variable(name, "id"): (dim, part["obs_id"].values.astype(str), {"long_name": "subject"}),
                  observable_variable(name, "time"): (dim, part["obs_time"].values.astype(float),
                                                      {"units": "day", "long_name": "time after first infusion"})}
        for var, da in part.data_vars.items():
            if FLAT_DIM not in da.dims:
                continue
            attrs = dict(da.attrs)
            if "; " in str(attrs.get("units", "")):  # a joined "a: unit; b: unit" string
                attrs["units"] = units[name]
            new = da.drop_vars([c for c in da.coords if c not in da.dims]).rename({FLAT_DIM: dim})
            out[observable_variable(name, str(var))] = new.assign_coords(coords).assign_attrs(attrs)
    return out


def split_observables(tree: xr.DataTree, units: dict[str, str] | None = None) -> xr.DataTree:
    """The per-observable layout of a tree in the flat layout (unchanged if it is not flat).

    ``units`` maps each observable to its units; without it they are read from the flat ``dv``'s
    joined units string (``"a: unit; b: unit"``) as older carkin fits wrote it.
    """
    if not is_flat(tree):
        return tree
    names = observables_of(tree)
    if units is None:
        units = _joined_units(str(_group(tree, "observed_data")[FLAT_VALUE].attrs.get("units", "")), names)
    out = xr.DataTree.from_dict({path: (ds if path == "/" else _split_dataset(ds, names, units))
                                 for path, ds in tree.to_dict().items()})
    out.attrs.update(tree.attrs)
    return out


def _joined_units(text: str, names: list[str]) -> dict[str, str]:
    if len(names) == 1:
        return {names[0]: text}
    pairs = (part.split(":", 1) for part in text.split(";") if ":" in part)
    found = {k.strip(): v.strip() for k, v in pairs}
    return {n: found.get(n, "") for n in names}


def observable_units(tree: xr.DataTree) -> dict[str, str]:
    """Observable -> units of its measured values."""
    obs = _group(tree, "observed_data")
    return {n: str(obs[n].attrs.get("units", "")) for n in observables_of(tree)}


def _file_order(tree: xr.DataTree) -> np.ndarray:
    """Permutation that puts the observables' records, concatenated, back in data-file order."""
    obs = _group(tree, "observed_data")
    rows = np.concatenate([obs[observable_variable(n, "row")].values for n in observables_of(tree)])
    return np.argsort(rows, kind="stable")


def flat_values(tree: xr.DataTree, group: str, variable: str) -> np.ndarray:
    """One flat variable (e.g. ``"ipred"`` of ``posterior``, ``"dv"`` of ``log_likelihood``) with all
    observables' records on its last axis, in data-file order (the order of :func:`observation_table`)."""
    ds = _group(tree, group)
    parts = [np.asarray(ds[observable_variable(n, variable)].values) for n in observables_of(tree)]
    return np.concatenate(parts, axis=-1)[..., _file_order(tree)]


def n_observations(tree: xr.DataTree) -> int:
    obs = _group(tree, "observed_data")
    return int(sum(obs.sizes[observation_dim(n)] for n in observables_of(tree)))


def observation_table(tree: xr.DataTree) -> pd.DataFrame:
    """One row per record in data-file order: id, time (day), observable, dv, blq, lloq, row."""
    obs = _group(tree, "observed_data")
    names = observables_of(tree)

    def column(variable: str, dtype) -> np.ndarray:
        return np.concatenate([obs[observable_variable(n, variable)].values.astype(dtype) for n in names])

    frame = pd.DataFrame({
        "id": column("id", str), "time": column("time", float),
        "observable": np.concatenate([np.full(obs.sizes[observation_dim(n)], n) for n in names]),
        "dv": column(FLAT_VALUE, float), "blq": column("blq", bool), "lloq": column("lloq", float),
        "row": column("row", np.int64),
    })
    return frame.iloc[_file_order(tree)].reset_index(drop=True)


def merge_observables(tree: xr.DataTree) -> xr.DataTree:
    """The flat layout of a tree in the per-observable one (all records on one ``obs`` axis, in data-file
    order, joined units): the inverse of :func:`split_observables`."""
    if is_flat(tree):
        return tree
    names = observables_of(tree)
    units = observable_units(tree)
    table = observation_table(tree)
    coords = {FLAT_DIM: np.arange(len(table)), "obs_id": (FLAT_DIM, table["id"].to_numpy(str)),
              "obs_time": (FLAT_DIM, table["time"].to_numpy(float),
                           {"units": "day", "long_name": "time after first infusion"}),
              "observable": (FLAT_DIM, table["observable"].to_numpy(str))}
    joined = units[names[0]] if len(names) == 1 else "; ".join(f"{n}: {units[n]}" for n in names)
    first = observation_dim(names[0])

    def merged(path: str, ds: xr.Dataset) -> xr.Dataset:
        if path == "/" or first not in ds.dims:
            return ds
        flat = [v for v in ds.data_vars if first in ds[v].dims]
        keep = ds.drop_vars(flat).drop_dims([observation_dim(n) for n in names])
        out = keep.assign_coords(coords)
        for var in flat:
            base = FLAT_VALUE if var == names[0] else str(var).removeprefix(f"{names[0]}_")
            values = flat_values(tree, path, base)
            dims = ds[var].dims[:-1] + (FLAT_DIM,)
            attrs = dict(ds[var].attrs)
            if attrs.get("units") == units[names[0]]:
                attrs["units"] = joined
            out[base] = xr.DataArray(values, dims=dims, attrs=attrs)
        return out

    out = xr.DataTree.from_dict({path: merged(path, ds) for path, ds in tree.to_dict().items()})
    out.attrs.update(tree.attrs)
    return out
