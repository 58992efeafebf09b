"""Streaming a population to netCDF block by block gives exactly what one simulate call returns."""

import numpy as np
import pytest
import xarray as xr

import carkin as ck
from carkin.stream import simulate_to_netcdf


@pytest.mark.slow
def test_blocks_on_disk_equal_one_simulate_call(tmp_path):
    model = ck.load_model("cd7_cart")
    regimen = ck.split(3e6)
    whole = ck.simulate(model, regimen, times="0:28:7", n_subjects=70, seed=9)
    record = simulate_to_netcdf(model, regimen, tmp_path / "pop.nc", 70, times="0:28:7", seed=9, block_size=32,
                                progress=False)
    assert record["blocks"] == 3 and record["n_subjects"] == 70 and record["failed"] == 0
    with xr.open_dataset(tmp_path / "pop.nc", engine="h5netcdf") as disk:
        assert disk["car_copies"].dims == ("subject", "time")
        assert disk["car_copies"].attrs["units"] == "copies/µg gDNA"
        for name in ("car_copies", "cd7_cells", "blasts", "rho", "WT"):
            np.testing.assert_array_equal(disk[name].values, whole[name].values)
        np.testing.assert_array_equal(disk["time"].values, whole["time"].values)


def test_first_subject_offsets_indices():
    model = ck.load_model("stein_2019")
    a = ck.simulate(model, ck.single(1e6), times=[0, 10], n_subjects=10, seed=1)
    b = ck.simulate(model, ck.single(1e6), times=[0, 10], n_subjects=4, seed=1, first_subject=6)
    np.testing.assert_array_equal(b["tmax"].values, a["tmax"].values[6:])
    assert list(b["subject"].values) == [6, 7, 8, 9]


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_subjects=2.5), "n_subjects=2.5: the population's size must be a whole number"),
    (dict(block_size=0), "block_size=0"),
    (dict(first_subject=-1), "first_subject=-1"),
    (dict(first_subject="a"), "first_subject='a'"),
])
def test_stream_refuses_bad_counts_before_writing(tmp_path, kwargs, words):
    arguments = {"n_subjects": 10, **kwargs}
    with pytest.raises(ck.CarkinError, match=words):
        simulate_to_netcdf(ck.load_model("stein_2019"), ck.single(1e6), tmp_path / "pop.nc", times=[0, 1],
                           progress=False, **arguments)
    assert not (tmp_path / "pop.nc").exists()
