"""simulate: shapes, labels, reproducibility, chunking, vmap vs a per-subject loop, bad input."""

import numpy as np
import pytest
import xarray as xr

import carkin as ck

LOOP_RTOL = 1e-9  # same solver and tolerances: only summation order may differ


@pytest.fixture(scope="module")
def stein():
    return ck.load_model("stein_2019")


def test_dataset_layout_and_units(stein):
    regs = [ck.single(1e6), ck.split(1e6)]
    ds = ck.simulate(stein, regs, times="0:28:7", n_subjects=5, seed=1)
    assert ds["car_copies"].dims == ("regimen", "subject", "time")
    assert list(ds["time"].values) == [0, 7, 14, 21, 28]
    assert list(ds["regimen"].values) == [r.label for r in regs]
    for name, var in ds.data_vars.items():
        assert "units" in var.attrs and "long_name" in var.attrs, name
    assert ds["tmax"].dims == ("subject",) and ds["tmax"].attrs["units"] == "day"
    assert ds["WT"].attrs["units"] == "kg"
    # dose and schedule are coordinates of the regimen dimension, so selections need no label parsing
    assert list(ds["dose_per_kg"].values) == [1e6, 1e6] and ds["dose_per_kg"].attrs["units"] == "cells/kg"
    assert list(ds["schedule"].values) == ["single", "split 10/30/60% d0/1/2"]
    split_only = ds.where(ds["schedule"] == "split 10/30/60% d0/1/2", drop=True)
    assert list(split_only["regimen"].values) == [regs[1].label]
    assert ds["car_copies"].attrs["role"] == "exposure"


def test_typical_subject_has_typical_values(stein):
    ds = ck.simulate(stein, ck.single(1e6), times=[0, 1], weight_kg=20.0)
    assert ds.sizes["subject"] == 1
    for k, v in stein.typical.items():
        assert float(ds[k].values[0]) == pytest.approx(v)
    assert float(ds["WT"].values[0]) == 20.0


@pytest.mark.slow
def test_population_reproducible_and_chunk_independent(stein):
    a = ck.simulate(stein, ck.single(1e6), times=[0, 10, 50], n_subjects=37, seed=7)
    b = ck.simulate(stein, ck.single(1e6), times=[0, 10, 50], n_subjects=37, seed=7, chunk_size=8)
    c = ck.simulate(stein, ck.single(1e6), times=[0, 10, 50], n_subjects=37, seed=8)
    xr.testing.assert_allclose(a, b, rtol=LOOP_RTOL)
    assert not np.allclose(a["tmax"], c["tmax"])
    # Between-subject variability follows the model's omegas (log-SD of Tmax = sqrt(0.38)).
    big = ck.simulate(stein, ck.single(1e6), times=[0], n_subjects=4000, seed=2, chunk_size=4000)
    assert np.std(np.log(big["tmax"].values)) == pytest.approx(np.sqrt(0.38), rel=0.05)
    assert np.median(big["tmax"].values) == pytest.approx(9.3, rel=0.05)
    assert 12 <= big["WT"].min() and big["WT"].max() <= 150


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "stein_2019" else pytest.mark.slow)
                                  for n in sorted(ck.list_models())])
def test_vmap_equals_per_subject_loop(name):
    model = ck.load_model(name)
    regimen = ck.split(1e7)
    pop = ck.simulate(model, regimen, times="0:60:3", n_subjects=4, seed=11)
    covs = {c.name: pop[c.name].values for c in model.covariates}
    for i in range(4):
        one = ck.simulate(
            model, regimen, times="0:60:3",
            params={k: float(pop[k].values[i]) for k in model.parameter_names},
            covariates={k: float(v[i]) for k, v in covs.items()},
        )
        for o in model.observables:
            np.testing.assert_allclose(one[o.name].values[0], pop[o.name].values[i], rtol=LOOP_RTOL)


@pytest.mark.slow
def test_failed_solves_are_flagged_and_named(stein):
    from carkin.kinetics import SolverSettings

    class Starved(type(stein)):  # too few steps allowed: every solve fails
        solver = SolverSettings(rtol=1e-12, atol=1e-12, max_steps=8)

    for engine in ("ensemble", "diffrax"):  # the ODE engines (a closed form cannot run out of steps)
        with pytest.warns(ck.SimulationWarning, match=r"3 solve\(s\) .* failed .*\(0,\), \(1,\), \(2,\)"):
            ds = ck.simulate(Starved(), ck.single(1e6), times=[0, 10, 400], n_subjects=3, seed=0, engine=engine)
        assert ds["failed"].values.tolist() == [True, True, True]
        ok = ck.simulate(stein, ck.single(1e6), times=[0, 10, 400], n_subjects=3, seed=0, engine=engine)
        assert not ok["failed"].any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(times="5:1:1"), "start <= stop"),
        (dict(times="a,b"), "cannot read times"),
        (dict(times=[0, 2, 1]), "increasing"),
        (dict(n_subjects=0), "n_subjects"),
        (dict(covariates={"AGE": 3}), "no covariate 'AGE'"),
        (dict(params={"tmx": 3}), "no parameter 'tmx'"),
        (dict(params={"tmax": -3}), "must be > 0"),
        (dict(params={"fb": 1.5}), r"\(0, 1\)"),
        (dict(weight_kg=[60, 70]), "one per subject"),
        (dict(weight_kg=-5), "WT .*> 0"),
    ],
)
def test_bad_arguments(stein, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ck.simulate(stein, ck.single(1e6), **{"times": [0, 1], **kwargs})


def test_invalid_parameter_values_refused_at_construction(stein):
    with pytest.raises(ValueError, match="'alpha' must be > 0"):
        stein.with_values(alpha=-0.1)
    with pytest.raises(ValueError, match="no parameter"):
        ck.load_model("stein_2019", values={"rho": 1.0})
    with pytest.raises(ValueError, match="unknown model 'nope'; available models: .*stein_2019"):
        ck.load_model("nope")


def test_an_accelerator_fetch_goes_through_page_locked_memory(monkeypatch):
    """On an accelerator results are copied to the host through pinned memory (a GPU copies into pageable
    memory at a fraction of the link's speed); the numbers that arrive are the same."""
    import jax
    import jax.numpy as jnp

    from carkin.simulation import simulate as sim

    x = jnp.arange(12.0).reshape(3, 4) ** 0.5
    moved = []
    real_put = jax.device_put
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_put", lambda a, s: moved.append(s.memory_kind) or real_put(a, s))
    got = jax.tree.map(sim._to_host, {"a": x, "b": (x + 1, np.ones(2))})
    assert moved == ["pinned_host", "pinned_host"]  # the two device arrays; the numpy one stays as it is
    np.testing.assert_array_equal(got["a"], np.sqrt(np.arange(12.0)).reshape(3, 4))
    np.testing.assert_array_equal(got["b"][0], np.sqrt(np.arange(12.0)).reshape(3, 4) + 1)
    # a device without page-locked host memory is copied from directly
    monkeypatch.setattr(sim, "_pinned_host_available", lambda a: False)
    moved.clear()
    np.testing.assert_array_equal(sim._to_host(x), np.sqrt(np.arange(12.0)).reshape(3, 4))
    assert moved == []


def test_a_chunk_dealt_to_the_devices_comes_back_in_subject_order_without_its_padding():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from carkin.simulation import simulate as sim

    n_dev = jax.local_device_count()
    chunk, count = 8 * n_dev, 8 * n_dev - 3  # the last three places pad the chunk
    subject = sim._dealt(chunk, n_dev)  # which subject sits at each place of the chunk
    rows = np.stack([subject, -10.0 * subject], axis=1)
    mesh = Mesh(np.array(jax.local_devices()), ("subjects",))
    got = sim._undeal(jax.device_put(rows, NamedSharding(mesh, PartitionSpec("subjects"))), n_dev, count)
    np.testing.assert_array_equal(got, rows[np.argsort(subject)][:count])
    np.testing.assert_array_equal(got[:, 0], np.arange(count))
