"""Where a GPU simulation's time goes: one cd7_cart simulate call under JAX's profiler, then a
table of the device kernels and the host's own spans (fetching results, assembling arrays).

    python benchmarks/gpu_profile.py --out DIR            # 2^15 subjects on 8,192 lanes (GPU)
    python benchmarks/gpu_profile.py --out DIR --small    # 4,096 subjects on 1,024 lanes (CPU test)
    python benchmarks/gpu_profile.py --summarise TRACE.xplane.pb

Writes DIR/trace.tgz (the raw trace) and prints the summary; --summarise re-reads a trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import subprocess
import time
from pathlib import Path

import numpy as np


def summarise(xplane: str, top: int = 25) -> str:
    from jax.profiler import ProfileData

    rows = []
    for plane in ProfileData.from_file(xplane).planes:
        total, count = collections.Counter(), collections.Counter()
        for line in plane.lines:
            for ev in line.events:
                total[(line.name, ev.name)] += ev.duration_ns
                count[(line.name, ev.name)] += 1
        if total:
            rows.append(f"{plane.name}: {sum(count.values())} events, {sum(total.values()) / 1e6:.1f} ms in all")
            rows += [f"  {d / 1e6:9.2f} ms {count[k]:6d}  {k[0][:24]:24s} {k[1][:90]}"
                     for k, d in total.most_common(top)]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--summarise")
    a = ap.parse_args(argv)
    if a.summarise:
        print(summarise(a.summarise))
        return 0
    import jax

    import carkin as ck
    from carkin.simulation import simulate as sim

    ck.configure()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, regimen, times = ck.load_model("cd7_cart"), ck.split(1e7), np.arange(0.0, 91.0)
    sim.GPU_LANES = 1024 if a.small else 8192
    n = 4096 if a.small else 1 << 15
    t0 = time.perf_counter()
    ck.simulate(model, regimen, times, n_subjects=n, seed=1, progress=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck.simulate(model, regimen, times, n_subjects=n, seed=2, progress=False)
    print(f"{n} subjects, lanes {sim.GPU_LANES}: compile and run {first:.2f} s, run {time.perf_counter() - t0:.3f} s")
    jax.profiler.start_trace(str(out / "trace"))
    ck.simulate(model, regimen, times, n_subjects=n, seed=3, progress=False)
    jax.profiler.stop_trace()
    print(summarise(glob.glob(str(out / "trace" / "**" / "*.xplane.pb"), recursive=True)[0]))
    subprocess.run(["tar", "czf", str(out / "trace.tgz"), "-C", str(out), "trace"], check=True)
    subprocess.run(["rm", "-rf", str(out / "trace")], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
