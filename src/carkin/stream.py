"""Simulate populations too large for memory, writing them to a netCDF file block by block.

Each block of subjects is simulated by ``carkin.simulate`` with the subjects' global
indices, so the file holds exactly what one giant ``simulate`` call would return (a
subject's parameters depend only on the seed and its index), while at most one block
is in memory at a time.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from carkin.kinetics import Model
from carkin.simulate import parse_times, simulate

DEFAULT_BLOCK = 50_000  # subjects per block: ~180 MB of outputs for 91 times x 5 observables


def simulate_to_netcdf(model: Model, regimen, path, n_subjects: int, *, times="0:90:1", seed: int = 0,
                       block_size: int = DEFAULT_BLOCK, first_subject: int = 0, progress: bool = True,
                       **simulate_options) -> dict:
    """Simulate ``n_subjects`` under one regimen into ``path`` (netCDF4/HDF5), one block at a time.

    Variables: every observable (subject, time), per-subject parameters, covariates and the
    ``failed`` flag, with units and long names, and each subject's global index. ``first_subject``
    is the global index of the first subject (one part of a larger population, e.g. one host's
    share). Returns a small record: subjects, seconds, subjects/s, failed solves, blocks.
    """
    import h5netcdf

    n_subjects, block_size = int(n_subjects), int(block_size)
    if n_subjects < 1 or block_size < 1 or first_subject < 0:
        raise ValueError(f"n_subjects and block_size must be >= 1 and first_subject >= 0, got {n_subjects}, "
                         f"{block_size} and {first_subject}")
    for group in ("covariates", "params"):
        for name, value in (simulate_options.get(group) or {}).items():
            if np.ndim(value):
                raise ValueError(f"{group}[{name!r}]: only one value for all subjects is supported when streaming")
    if np.ndim(simulate_options.get("weight_kg")):
        raise ValueError("weight_kg: only one value for all subjects is supported when streaming")
    grid = parse_times(times)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_subjects, desc=f"simulate {model.name} to {path.name}", unit="subject")
    t0 = time.perf_counter()
    failed = 0
    with h5netcdf.File(path, "w") as f:
        f.dimensions = {"subject": None, "time": grid.size}
        tvar = f.create_variable("time", ("time",), float, data=grid)
        tvar.attrs.update(units="day", long_name="time after first infusion")
        f.attrs.update(model=model.name, regimen=regimen.label, seed=seed, n_subjects=n_subjects,
                       first_subject=first_subject,
                       dose_time_convention="at an infusion time the post-infusion value is reported")
        for start in range(0, n_subjects, block_size):
            n = min(block_size, n_subjects - start)
            ds = simulate(model, regimen, times=grid, n_subjects=n, seed=seed, first_subject=first_subject + start,
                          progress=False, **simulate_options)
            if start == 0:
                index = f.create_variable("subject", ("subject",), np.int64, chunks=(min(n, 4096),))
                index.attrs.update(long_name="subject index in the whole population")
                for name, var in ds.data_vars.items():
                    if "subject" in var.dims:
                        dtype = np.int8 if var.dtype == bool else var.dtype
                        v = f.create_variable(name, var.dims, dtype, chunks=(min(n, 4096),) + var.shape[1:])
                        v.attrs.update({k: str(a) for k, a in var.attrs.items()})
                f.resize_dimension("subject", n_subjects)
            f.variables["subject"][start:start + n] = ds["subject"].values
            for name, var in ds.data_vars.items():
                if "subject" in var.dims:
                    f.variables[name][start:start + n, ...] = var.values.astype(f.variables[name].dtype)
            failed += int(ds["failed"].values.sum())
            if bar is not None:
                bar.update(n)
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return {"path": str(path), "n_subjects": n_subjects, "seconds": elapsed, "subjects_per_s": n_subjects / elapsed,
            "failed": failed, "blocks": -(-n_subjects // block_size)}
