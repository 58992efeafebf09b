"""Peak resident memory when simulating a large population streamed to disk (CPU).

    python benchmarks/memory_stream.py                      # 10^6 subjects of cd7_cart
    python benchmarks/memory_stream.py --n 100000 --out /tmp/pop.nc

Same set-up as simulate_throughput.py: split dosing 10/30/60% of 1e7 cells/kg on days 0/1/2,
91 daily save points, the model's tolerances. Peak RSS is the process's maximum resident set
size (getrusage), which includes the Python interpreter, JAX and its compiled code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from simulate_throughput import machine  # noqa: E402

import carkin as ck  # noqa: E402
from carkin.stream import simulate_to_netcdf  # noqa: E402

ck.configure(compilation_cache=False)  # every CPU core a device; no disk cache: compile times are measured


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cd7_cart")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--block-size", type=int, default=50_000)
    ap.add_argument("--out", default=None, help="netCDF file (default: a temporary file, deleted afterwards)")
    ap.add_argument("--record", default=str(Path(__file__).parent / "results" / "memory_stream_cpu.json"))
    a = ap.parse_args(argv)
    model = ck.load_model(a.model)
    path = Path(a.out) if a.out else Path(tempfile.mkdtemp()) / "population.nc"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    rec = simulate_to_netcdf(model, ck.split(1e7), path, a.n, times="0:90:1", seed=0, block_size=a.block_size)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = path.stat().st_size / 2**20
    if a.out is None:
        path.unlink()
    record = {**rec, "wall_s": wall, "peak_rss_mb": peak, "rss_after_import_mb": rss0, "file_mb": size,
              "block_size": a.block_size, "machine": machine(),
              "command": "python benchmarks/memory_stream.py " + " ".join(argv or sys.argv[1:])}
    print(f"{a.n} subjects in {wall:.1f} s ({a.n / wall:.0f}/s), peak RSS {peak:.0f} MB "
          f"(after import {rss0:.0f} MB), file {size:.0f} MB, failed {rec['failed']}")
    Path(a.record).parent.mkdir(parents=True, exist_ok=True)
    Path(a.record).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    raise SystemExit(main())
