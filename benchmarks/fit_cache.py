"""The persistent compilation cache: the same ``carkin fit`` run twice, in two fresh processes.

    python benchmarks/fit_cache.py          # writes benchmarks/results/fit_cache.json

Both runs use one empty cache folder (``CARKIN_CACHE_DIR``): the first compiles and fills it,
the second finds the sampler program there. Recorded per run: wall time of the command, and the
fit's own record of compiling its sampler (``compile_s`` in fit.nc's settings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from simulate_throughput import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "stein_2019", "--chains", "4", "--warmup", "500", "--samples", "500", "--seed", "1", "--quiet"]


def one_run(cache: Path, out: Path) -> dict:
    env = {**os.environ, "CARKIN_CACHE_DIR": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the folder under test, not a caller's
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "carkin.cli", "fit", str(ROOT / "data" / "stein_sim.csv"), "--out",
                           str(out), *ARGS], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"carkin fit failed:\n{done.stderr[-3000:]}")
    import xarray as xr

    with xr.open_datatree(out / "fit.nc") as tree:
        settings = json.loads(tree.attrs["settings"])
    return {"wall_s": round(wall, 2), "sampler_compile_s": settings.get("compile_s"),
            "sampler_run_s": settings.get("sampling_s"), "fit_time_s": settings.get("fit_time_s")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_cache.json"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        first = one_run(cache, Path(tmp) / "first")
        second = one_run(cache, Path(tmp) / "second")
        entries = sum(1 for _ in cache.rglob("*") if _.is_file())
    record = {"command": "carkin fit data/stein_sim.csv " + " ".join(ARGS), "first_run": first,
              "second_run": second, "cache_entries": entries, "machine": machine()}
    print(json.dumps(record, indent=1))
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
