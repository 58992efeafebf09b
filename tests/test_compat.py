"""carkin.compat's workaround is still needed, and still works.

Reverse-mode gradients of a diffrax solve inside ``shard_map`` over two devices: without the
workaround upstream raises; with it the gradient equals the one-device gradient. When the first
test fails, upstream has fixed the bug: delete carkin.compat and its call in carkin.sampling."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import contextlib, sys
    import jax, jax.numpy as jnp, numpy as np
    import diffrax as dfx
    from jax.sharding import Mesh, PartitionSpec
    jax.config.update("jax_enable_x64", True)
    from carkin.compat import closure_checks_ignore_manual_mesh

    def solve(a):
        sol = dfx.diffeqsolve(dfx.ODETerm(lambda t, y, a: -a * y), dfx.Tsit5(), 0.0, 1.0, 0.1, jnp.array([1.0]),
                              args=a, saveat=dfx.SaveAt(t1=True), adjoint=dfx.RecursiveCheckpointAdjoint())
        return sol.ys[0, 0]

    grad = jax.vmap(jax.grad(solve))
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    sharded = jax.shard_map(grad, mesh=mesh, in_specs=PartitionSpec("x"), out_specs=PartitionSpec("x"),
                            check_vma=False)
    a = jnp.array([0.5, 1.5])
    context = closure_checks_ignore_manual_mesh() if sys.argv[1] == "with" else contextlib.nullcontext()
    try:
        with context:
            g = jax.jit(sharded)(a)
    except Exception as e:
        print("FAILED", type(e).__name__)
        sys.exit(0)
    np.testing.assert_allclose(np.asarray(g), np.asarray(-np.exp(-a)), rtol=1e-6)  # d/da exp(-a)
    print("OK")
""")


def run(mode: str) -> str:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_upstream_still_fails_without_the_workaround():
    assert run("without").startswith("FAILED"), (
        "a gradient through diffrax inside shard_map now works without carkin.compat: upstream fixed it; "
        "delete carkin.compat and its use in carkin.sampling")


@pytest.mark.slow
def test_the_workaround_gives_the_one_device_gradient():
    assert run("with") == "OK"
