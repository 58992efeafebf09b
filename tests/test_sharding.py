"""Simulated populations are the same whether split over several devices or run on one.

Each case runs in a fresh Python process, since the number of JAX devices is fixed when JAX
starts: once with 4 CPU devices forced by XLA_FLAGS, once with a single device.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    import carkin as ck
    out = sys.argv[1]
    model = ck.load_model("cd7_cart")
    regs = [ck.single(1e7), ck.split(1e7)]
    ds = ck.simulate(model, regs, times="0:60:3", n_subjects=300, seed=4, chunk_size=128)
    np.savez(out, devices=jax.local_device_count(), car=ds["car_copies"].values, cd7=ds["cd7_cells"].values,
             rho=ds["rho"].values, steps=ds["n_steps"].values)
""")


def run(tmp_path, name, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CARKIN_CPU_DEVICES")}
    env.update(env_extra)
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    many = run(tmp, "four", {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    one = run(tmp, "one", {"CARKIN_CPU_DEVICES": "1"})
    return many, one


def test_devices_were_forced(results):
    many, one = results
    assert int(many["devices"]) == 4 and int(one["devices"]) == 1


def test_sharded_population_equals_single_device(results):
    many, one = results
    for key in ("car", "cd7", "rho", "steps"):
        np.testing.assert_array_equal(many[key], one[key])
