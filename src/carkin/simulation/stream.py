"""Simulate populations too large for memory, writing them to a netCDF file block by block.

Each block of subjects is simulated by ``carkin.simulate`` with the subjects' global
indices, so the file holds exactly what one giant ``simulate`` call would return (a
subject's parameters depend only on the seed and its index), while at most one block
is in memory at a time.

The file is built under ``NAME.partial`` beside the final path, each finished block marked
in its ``block_done`` variable, and renamed to ``NAME`` with ``complete = 1`` only when every
block is in. An interrupted run leaves the previous ``NAME`` untouched; calling
``simulate_to_netcdf`` again with the same arguments resumes from the first unfinished block.
:func:`open_stream` refuses a file that lacks the completion mark.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from carkin.errors import InputError
from carkin.guards import check_whole
from carkin.model.kinetics import Model
from carkin.outputs import Outputs
from carkin.simulation.simulate import parse_times, simulate

DEFAULT_BLOCK = 50_000  # subjects per block: ~180 MB of outputs for 91 times x 5 observables


def partial_path(path) -> Path:
    """Where an unfinished stream of ``path`` is built."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def simulate_to_netcdf(model: Model, regimen, path, n_subjects: int, *, times="0:90:1", seed: int = 0,
                       block_size: int = DEFAULT_BLOCK, first_subject: int = 0, progress: bool = True,
                       overwrite: bool = False, **simulate_options) -> dict:
    """Simulate ``n_subjects`` under one regimen into ``path`` (netCDF4/HDF5), one block at a time.

    Variables: every observable (subject, time), per-subject parameters, covariates and the
    ``failed`` flag, with units and long names, and each subject's global index. ``first_subject``
    is the global index of the first subject (one part of a larger population, e.g. one host's
    share). An existing ``path`` is replaced only with ``overwrite=True``. A run interrupted
    earlier with the same arguments is resumed. Returns a small record: subjects, seconds,
    subjects/s, failed solves, blocks, blocks resumed.
    """
    import h5netcdf

    n_subjects = check_whole("n_subjects", n_subjects, 1, 2**32, "the population's size")
    block_size = check_whole("block_size", block_size, 1, 2**32, "subjects per block written")
    # a subject's draws come from its index folded into the key as a 32-bit integer
    first_subject = check_whole("first_subject", first_subject, 0, 2**32 - n_subjects,
                                f"the first of {n_subjects:,} subjects' index")
    for group in ("covariates", "params"):
        for name, value in (simulate_options.get(group) or {}).items():
            if np.ndim(value):
                raise InputError(f"{group}[{name!r}]: only one value for all subjects is supported when streaming")
    if np.ndim(simulate_options.get("weight_kg")):  # type: ignore[arg-type]  # np.ndim(None) is 0
        raise InputError("weight_kg: only one value for all subjects is supported when streaming")
    grid = parse_times(times)
    path = Path(path)
    outputs = Outputs([path], overwrite=overwrite, what="stream file")  # checked before any work
    partial = partial_path(path)
    n_blocks = -(-n_subjects // block_size)
    # What must match for a partial file to be continued rather than started afresh.
    signature = json.dumps({"model": model.name, "values": [list(v) for v in model.values], "regimen": regimen.label,
                            "seed": int(seed), "n_subjects": n_subjects, "first_subject": int(first_subject),
                            "block_size": block_size, "times": grid.tolist(),
                            "options": {k: repr(v) for k, v in sorted(simulate_options.items())}})
    done = _resumable(partial, signature, n_blocks)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_subjects, desc=f"simulate {model.name} to {path.name}", unit="subject",
                   initial=min(n_subjects, int(done.sum()) * block_size))
    t0 = time.perf_counter()
    failed = 0
    with h5netcdf.File(partial, "a" if done.any() else "w") as f:
        if not done.any():
            f.dimensions = {"subject": None, "time": grid.size, "block": n_blocks}
            tvar = f.create_variable("time", ("time",), float, data=grid)
            tvar.attrs.update(units="day", long_name="time after first infusion")
            marks = f.create_variable("block_done", ("block",), np.int8, data=np.zeros(n_blocks, np.int8))
            marks.attrs.update(units="1", long_name=f"1 when the block of {block_size} subjects is written")
            f.attrs.update(model=model.name, regimen=regimen.label, seed=seed, n_subjects=n_subjects,
                           first_subject=first_subject, block_size=block_size, complete=0, signature=signature,
                           dose_time_convention="at an infusion time the post-infusion value is reported")
        else:
            failed = int(f.variables["failed"][...][np.repeat(done, block_size)[:n_subjects].astype(bool)].sum())
        for b in range(n_blocks):
            if done[b]:
                continue
            start = b * block_size
            n = min(block_size, n_subjects - start)
            ds = simulate(model, regimen, times=grid, n_subjects=n, seed=seed, first_subject=first_subject + start,
                          progress=False, **simulate_options)
            if "subject" not in f.variables:
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
            f.flush()  # the block's data reach the file before it is marked done
            f.variables["block_done"][b] = 1
            f.flush()
            failed += int(ds["failed"].values.sum())
            if bar is not None:
                bar.update(n)
        f.attrs["complete"] = 1
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    with outputs:  # the finished file takes the final name in one rename
        os.replace(partial, outputs.temp(path))
    return {"path": str(path), "n_subjects": n_subjects, "seconds": elapsed, "subjects_per_s": n_subjects / elapsed,
            "failed": failed, "blocks": n_blocks, "blocks_resumed": int(done.sum())}


def _resumable(partial: Path, signature: str, n_blocks: int) -> np.ndarray:
    """The finished blocks of an earlier interrupted run with the same arguments (none when there is none)."""
    none = np.zeros(n_blocks, bool)
    if not partial.exists():
        return none
    try:
        with xr.open_dataset(partial, engine="h5netcdf") as ds:
            same = ds.attrs.get("signature") == signature
            done = ds["block_done"].values.astype(bool) if same else none
    except Exception:  # a file cut mid-write by a kill: start afresh
        warnings.warn(f"{partial}: an earlier interrupted run left an unreadable file; starting afresh",
                      UserWarning, stacklevel=3)
        partial.unlink()
        return none
    if not same:
        warnings.warn(f"{partial}: left by an interrupted run with other arguments; starting afresh",
                      UserWarning, stacklevel=3)
        partial.unlink()
        return none
    return done


def open_stream(path) -> xr.Dataset:
    """Open a file written by :func:`simulate_to_netcdf`, refusing one that is not complete."""
    path = Path(path)
    if not path.exists():
        hint = f"; an unfinished run is at {partial_path(path)}" if partial_path(path).exists() else ""
        raise FileNotFoundError(f"no stream file {path}{hint}")
    ds = xr.open_dataset(path, engine="h5netcdf")
    if int(ds.attrs.get("complete", 0)) != 1:
        n_done = int(ds["block_done"].sum()) if "block_done" in ds else 0
        n_blocks = ds.sizes.get("block", 0)
        ds.close()
        raise InputError(f"{path} is incomplete ({n_done} of {n_blocks} blocks written, no completion mark); "
                         "run the same simulate_to_netcdf call again to resume it")
    return ds
