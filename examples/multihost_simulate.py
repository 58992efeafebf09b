"""Simulate one large virtual population across several hosts with JAX's distributed runtime.

Every process (one per host) joins the job with ``jax.distributed.initialize``, takes the
block of subjects given by its process index, simulates it on its own devices (carkin splits
each chunk over all local devices) and writes its own netCDF file. A subject's parameters
depend only on the seed and its global index, so the files together hold exactly the
population one process would have simulated; no data crosses hosts.

On a cluster (2 hosts, the first one's address as coordinator), run on each host:

    python examples/multihost_simulate.py --coordinator 10.0.0.1:1234 --num-processes 2 \\
        --process-id 0 --n-subjects 10000000 --out /shared/pop      # --process-id 1 on the other

Under SLURM or on Cloud TPU the three options can be left out: ``jax.distributed.initialize()``
reads them from the environment (pass --auto). Without any of them the script runs as a single
process, which is how the test suite runs it.

Read the parts back with ``xarray.concat([xarray.open_dataset(p, engine="h5netcdf") for p in
sorted(Path(out).glob("part-*.nc"))], dim="subject")``. Checked here with two processes on one
machine (coordinator 127.0.0.1): the two parts equal a single-process simulation exactly.
"""

# test-args: --n-subjects 64 --block-size 32 --out {out}
# test-outputs: part-00000.nc

from __future__ import annotations

import argparse
from pathlib import Path

import jax

import carkin as ck
from carkin.simulation.stream import simulate_to_netcdf

ck.configure()  # every CPU core a JAX device; compiled programs cached on disk


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coordinator", help="host:port of process 0")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--auto", action="store_true", help="let jax.distributed read the cluster from the environment")
    ap.add_argument("--model", default="cd7_cart")
    ap.add_argument("--dose", type=float, default=1e7, help="total dose, cells/kg, split 10/30/60 over days 0-2")
    ap.add_argument("--n-subjects", type=int, default=1_000_000)
    ap.add_argument("--block-size", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/population")
    ap.add_argument("--overwrite", action="store_true", help="replace existing part files")
    a = ap.parse_args(argv)

    if a.auto:
        jax.distributed.initialize()
    elif a.coordinator:
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                   process_id=a.process_id)
    rank, size = jax.process_index(), jax.process_count()
    per_process = -(-a.n_subjects // size)
    first = rank * per_process
    n = max(0, min(per_process, a.n_subjects - first))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"part-{rank:05d}.nc"
    model = ck.load_model(a.model)
    record = simulate_to_netcdf(model, ck.split(a.dose), path, n, first_subject=first, seed=a.seed,
                                block_size=a.block_size, progress=rank == 0, overwrite=a.overwrite)
    print(f"process {rank}/{size} on {jax.local_device_count()} local device(s): subjects {first}-{first + n - 1} "
          f"in {record['seconds']:.1f} s ({record['subjects_per_s']:.0f}/s) -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
