"""A fit's observations in the DataTree: one variable per observable with its own units, read back
in data-file order, and fits saved in the older flat layout (one `dv` over `obs`) still load."""

import numpy as np
import xarray as xr

import carkin as ck
from carkin.fitting.observations import (
    flat_values,
    merge_observables,
    n_observations,
    observable_units,
    observation_table,
    split_observables,
)

KINDS = np.array(["car_copies", "cd7", "car_copies", "car_copies", "cd7"])
ROWS = np.array([3, 4, 7, 9, 10])
JOINED = "car_copies: copies/µg gDNA; cd7: cells/µL"


def _flat_tree() -> xr.DataTree:
    """Two observables interleaved on one `obs` axis, as carkin wrote fits before the split layout."""
    coords = {"obs": np.arange(5), "obs_id": ("obs", np.array(["1", "1", "2", "2", "3"])),
              "obs_time": ("obs", np.array([1.0, 1.0, 2.0, 3.0, 4.0]),
                           {"units": "day", "long_name": "time after first infusion"}),
              "observable": ("obs", KINDS)}
    draws = {"chain": [0], "draw": [0, 1]}
    obs = xr.Dataset({"dv": ("obs", [1.0, 2.0, 3.0, 4.0, 5.0], {"units": JOINED, "long_name": "observed value"}),
                      "blq": ("obs", np.array([0, 0, 1, 0, 0], np.int8), {"units": "1", "long_name": "BLQ"}),
                      "lloq": ("obs", np.full(5, 0.5), {"units": JOINED, "long_name": "LLOQ"}),
                      "row": ("obs", ROWS, {"units": "1", "long_name": "row"})}, coords=coords)
    values = np.arange(10.0).reshape(1, 2, 5)
    post = xr.Dataset({"fold": (("chain", "draw"), np.ones((1, 2)), {"units": "1"}),
                       "ipred": (("chain", "draw", "obs"), values + 100, {"units": JOINED})},
                      coords={**draws, **coords})
    ll = xr.Dataset({"dv": (("chain", "draw", "obs"), values, {"units": "1"})}, coords={**draws, **coords})
    tree = xr.DataTree.from_dict({"posterior": post, "log_likelihood": ll, "observed_data": obs})
    tree.attrs["observables"] = ["car_copies", "cd7"]
    return tree


def test_each_observable_is_its_own_variable_with_its_units():
    tree = split_observables(_flat_tree())
    obs = tree["observed_data"]
    assert obs["car_copies"].dims == ("car_copies_obs",) and obs["cd7"].dims == ("cd7_obs",)
    np.testing.assert_array_equal(obs["car_copies"].values, [1.0, 3.0, 4.0])
    np.testing.assert_array_equal(obs["cd7"].values, [2.0, 5.0])
    np.testing.assert_array_equal(obs["cd7_id"].values, ["1", "3"])
    assert observable_units(tree) == {"car_copies": "copies/µg gDNA", "cd7": "cells/µL"}
    assert obs["cd7_lloq"].attrs["units"] == "cells/µL"
    assert tree["log_likelihood"]["cd7"].dims == ("chain", "draw", "cd7_obs")
    np.testing.assert_array_equal(tree["posterior"]["cd7_ipred"].values[0, 1], [106.0, 109.0])
    assert tree["posterior"]["fold"].dims == ("chain", "draw")
    assert n_observations(tree) == 5


def test_flat_reads_come_back_in_file_order():
    tree = split_observables(_flat_tree())
    table = observation_table(tree)
    np.testing.assert_array_equal(table["row"], ROWS)
    np.testing.assert_array_equal(table["observable"], KINDS)
    np.testing.assert_array_equal(table["dv"], [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(table["blq"], [False, False, True, False, False])
    np.testing.assert_array_equal(flat_values(tree, "log_likelihood", "dv"), np.arange(10.0).reshape(1, 2, 5))


def test_split_and_merge_are_inverse():
    flat = _flat_tree()
    back = merge_observables(split_observables(flat))
    for group in ("posterior", "log_likelihood", "observed_data"):
        xr.testing.assert_identical(back[group].to_dataset(), flat[group].to_dataset())
    assert split_observables(split_observables(flat)).identical(split_observables(flat))


def test_a_fit_saved_in_the_flat_layout_loads_split(tmp_path):
    flat = _flat_tree()
    flat["constant_data"] = xr.DataTree(xr.Dataset({"dose_cells": ("subject", [1e6, 1e6, 1e6])}))
    flat.attrs["model"] = "stein_2019"
    path = tmp_path / "old_fit.nc"
    flat.to_netcdf(path, engine="h5netcdf")
    tree = ck.load_fit(path)
    assert "dv" not in tree["observed_data"].data_vars
    assert observable_units(tree)["cd7"] == "cells/µL"
