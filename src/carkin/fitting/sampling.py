"""NUTS chains as one compiled program, split over every visible device.

A batch of chains (the chains of one fit, or one chain for each of many datasets) is
one ``jit``-compiled program: ``shard_map`` gives each device an equal share of the
chains, and each device runs its share one chain after another (``lax.map``) on CPU,
where batching chains buys nothing and makes every chain wait for the slowest tree, or
all at once (``vmap``) on an accelerator. A chain's draws depend only on its key, its
start and its data, never on how many devices there are or which one ran it, so a run
on several devices gives the same draws as on one.

The transition kernel is NumPyro's NUTS (``numpyro.infer.hmc.hmc``), with its own
step-size and diagonal mass-matrix adaptation during the ``warmup`` iterations.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import jax
import numpy as np

from carkin.compat import closure_checks_ignore_manual_mesh

PROGRESS_UPDATES = 50  # progress callbacks per chain


@dataclass(frozen=True)
class NutsRun:
    """Draws (constrained sites, each (batch, draw, ...)), per-draw sampler statistics
    (each (batch, draw)), the compile and run times of the sampler in seconds, and the
    number of devices the chains were split over."""

    draws: dict
    stats: dict
    compile_s: float
    run_s: float
    devices: int = 1


def run_nuts(potential_fn_gen, postprocess_fn_gen, starts, keys, data, *, warmup: int, samples: int,
             target_accept: float = 0.8, max_tree_depth: int = 10, thin: int = 1, progress: bool = False,
             label: str = "NUTS") -> NutsRun:
    """Run ``len(keys)`` NUTS chains; chain ``b`` starts at ``starts[b]`` (unconstrained, a pytree
    with a leading batch axis) and targets ``potential_fn_gen(data[b])``.

    ``postprocess_fn_gen(data_b)(z)`` maps an unconstrained point to the constrained sites
    that are kept. ``data`` is a pytree with a leading batch axis, or None when every chain
    targets the same data, fixed inside ``potential_fn_gen``. Every ``thin``-th draw is kept.
    """
    from numpyro.infer.hmc import hmc

    n = int(np.shape(keys)[0])
    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_fn_gen, algo="NUTS")
    every = max(1, (warmup + samples) // PROGRESS_UPDATES)
    bar = _Progress(n * (warmup + samples), label) if progress else None

    def record(state):
        return {"diverging": state.diverging, "num_steps": state.num_steps, "energy": state.energy,
                "accept_prob": state.accept_prob, "step_size": state.adapt_state.step_size,
                "potential_energy": state.potential_energy}

    def chain(args):
        start, key, obs = args
        state = init_kernel(start, warmup, model_args=(obs,), rng_key=key, target_accept_prob=target_accept,
                            max_tree_depth=max_tree_depth)

        def step(st, _):
            st = sample_kernel(st, model_args=(obs,))
            if bar is not None:
                jax.lax.cond(st.i % every == 0, lambda: jax.debug.callback(bar.advance, every), lambda: None)
            return st, (st.z, record(st))

        state, _ = jax.lax.scan(step, state, None, length=warmup)
        _, (zs, stats) = jax.lax.scan(step, state, None, length=samples)
        zs, stats = jax.tree.map(lambda a: a[::thin], (zs, stats))
        return jax.vmap(postprocess_fn_gen(obs))(zs), stats

    local = jax.vmap(chain) if jax.default_backend() != "cpu" else (lambda args: jax.lax.map(chain, args))
    n_dev = jax.local_device_count()
    padded = -(-n // n_dev) * n_dev
    args = jax.tree.map(lambda a: _pad(np.asarray(a), padded), (starts, keys, data))
    program = over_devices(local, n_dev, "chains")
    t0 = time.perf_counter()
    compiled = program.lower(args).compile()
    t1 = time.perf_counter()
    draws, stats = jax.block_until_ready(compiled(args))
    t2 = time.perf_counter()
    if bar is not None:
        bar.close()
    draws, stats = jax.tree.map(lambda a: np.asarray(a)[:n], (draws, stats))
    return NutsRun(draws, stats, t1 - t0, t2 - t1, n_dev)


def over_devices(local, n_dev: int, axis: str):
    """``jit(local)``, with ``local``'s leading batch axis split over the first ``n_dev`` devices
    (``shard_map``) when there are several; each device runs its own loops, never waiting for another."""
    if n_dev == 1:
        return jax.jit(local)
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.local_devices()[:n_dev]), (axis,))
    # check_vma=False: while loops (sampler, optimiser) carry values that are not annotated per device.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(axis), out_specs=PartitionSpec(axis),
                            check_vma=False)

    def program(args):
        with closure_checks_ignore_manual_mesh():  # the body, gradients included, is traced here (carkin.compat)
            return sharded(args)

    return jax.jit(program)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last element so the batch divides over the devices (the copies are dropped)."""
    if a.shape[0] == n:
        return a
    return np.concatenate([a, np.repeat(a[-1:], n - a.shape[0], axis=0)])


class _Progress:
    """A progress bar fed from inside the compiled sampler (from several device threads)."""

    def __init__(self, total: int, label: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=label, unit="it")
        self._lock = threading.Lock()

    def advance(self, k):
        with self._lock:
            self._bar.update(int(k))

    def close(self):
        self._bar.close()

