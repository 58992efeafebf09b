"""simulate: the typical subject or a virtual population, one or several regimens -> xarray.Dataset.

Subjects run in fixed-size chunks (the last one padded), so each model compiles
once per (chunk size, number of infusions, time grid length) and memory stays
bounded. On a machine where JAX sees a GPU the same code runs there.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from carkin.config import compute_platform, on_gpu
from carkin.errors import InputError, InputTypeError
from carkin.guards import check_memory, check_seed, check_whole
from carkin.model import dosing, population
from carkin.model.kinetics import Model
from carkin.simulation.ensemble import DEFAULT_LANES as ENSEMBLE_LANES
from carkin.simulation.ensemble import (
    LANE_MULTIPLE,
    compiler_options,
    integrate_ensemble,
    observe_subjects,
    prepare_ensemble,
)
from carkin.simulation.solve import check_tolerances, solve_subject
from carkin.strict import TIME_RANGE, UNIT_RANGES

# Chunks of 256 subjects keep the solver's working set in cache: measured fastest on
# a 2-core Xeon (benchmarks/README.md). Smaller populations round up to a power of
# two so only a handful of shapes is ever compiled.
DEFAULT_CHUNK = 256
# A closed form costs a few operations per output time, so big chunks keep the per-call overhead small.
CLOSED_FORM_CHUNK = 32768
BALANCED_ROUNDING = 1024
# The ensemble solver refills its lanes from the chunk's waiting subjects, so it wants chunks of many lanes' worth.
ENSEMBLE_CHUNK = 8192  # per device; padding subjects are never solved, so a large chunk costs nothing
# A GPU runs one lane per thread: it needs tens of thousands of lanes to fill its cores, and more lanes than
# that leave more of them idle while the last subjects finish (10^6 cd7_cart subjects on an H200: 2^16 lanes
# 0.36 s, 2^18 0.45 s, 2^20 1.39 s; benchmarks/README.md). A chunk there is many lanes' worth of subjects.
GPU_LANES = 1 << 16
GPU_CHUNK = 1 << 20
MAX_CHUNK = 1 << 24  # a chunk_size the user gives: beyond this one call's arrays outgrow any device
# "fused": the ensemble method as one GPU kernel (carkin.simulation.fused); "auto" takes it on a GPU
ENGINES = ("auto", "closed-form", "ensemble", "fused", "diffrax")
LANE_ENGINES = ("ensemble", "fused")  # engines that solve on lanes with refill (chunks of many lanes' worth)
IN_FLIGHT = 4  # chunks dispatched ahead of the one being fetched
# compiled chunk solvers kept (one per model, tolerance and device layout); the oldest is dropped past this
SOLVER_CACHE_SIZE = 16
MIN_PER_DEVICE = 32  # below this many subjects per device, one device is quicker
PROGRESS_MIN_SUBJECTS = 20_000
MAX_TIMES = 100_000  # output times per subject: a century of daily values, or a year hour by hour ten times over


class SimulationWarning(UserWarning):
    """Some subjects' solves failed; they are flagged in the ``failed`` variable."""


def parse_times(times) -> np.ndarray:
    """Time grid in days from an array, or a 'start:stop:step' / 'a,b,c' string."""
    if isinstance(times, str):
        s = times.strip()
        try:
            if ":" in s:
                start, stop, step = (float(x) for x in s.split(":"))
                if not (step > 0 and stop >= start and np.isfinite([start, stop, step]).all()):
                    raise ValueError
                if (stop - start) / step + 1 > MAX_TIMES:
                    raise OverflowError
                grid = np.arange(start, stop + step / 2, step)
            else:
                grid = np.array([float(x) for x in s.split(",") if x.strip()])
        except OverflowError:
            raise InputError(f"times {times!r} give more than {MAX_TIMES:,} output times per subject; use a "
                             "coarser step or a shorter span") from None
        except ValueError:
            raise InputError(
                f"cannot read times {times!r}: give 'start:stop:step' with start <= stop and step > 0 "
                "(e.g. 0:90:1) or an increasing comma list "
                "(e.g. 0,1,4,7,14,28)"
            ) from None
    else:
        try:
            grid = np.atleast_1d(np.asarray(times, dtype=float))
        except (TypeError, ValueError):
            raise InputError(f"cannot read times {times!r}: give days as numbers (e.g. [0, 1, 4, 7]) or a string "
                             "such as '0:90:1'") from None
        if grid.ndim != 1:
            raise InputError(f"times must be one list of days shared by every subject, got an array of shape "
                             f"{grid.shape}")
    if grid.size == 0 or not np.all(np.isfinite(grid)):
        raise InputError(f"times must be a non-empty list of finite days, got {times!r}")
    if np.any(np.diff(grid) <= 0):
        raise InputError("times must be strictly increasing")
    if grid.size > MAX_TIMES:
        raise InputError(f"{grid.size:,} output times per subject is more than {MAX_TIMES:,}; give fewer")
    lo, hi = TIME_RANGE
    if grid[0] < lo or grid[-1] > hi:
        raise InputError(f"times must lie in [{lo:g}, {hi:g}] days after the first infusion (ten years before to a "
                         f"century after), got {grid[0]:g} to {grid[-1]:g}")
    return grid


def choose_engine(model: Model, engine: str, include_states: bool, gpu: bool | None = None) -> str:
    """The engine that runs a simulation, on a GPU or not (``gpu``; default: where computations go now,
    carkin.config.on_gpu). ``"auto"``: the model's closed form where it has one (exact, and some hundred
    times quicker than integrating); else, on a GPU, the fused kernel (the ensemble's method as one
    kernel: its solve 9-10x the XLA ensemble's on an H200 and an H100), and elsewhere, or for a model the
    kernel cannot run, the ensemble ODE solver (lanes with their own clocks and refill; several times
    quicker than the vmapped diffrax solve). Figures: benchmarks/README.md."""
    if engine not in ENGINES:
        raise InputError(f"engine={engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "closed-form" and not model.has_closed_form:
        raise InputError(f"model {model.name!r} has no closed form; use engine='diffrax' or 'auto'")
    if engine == "closed-form" and include_states:
        raise InputError("the closed form gives observables only; use engine='diffrax' with include_states=True")
    if engine == "auto":
        if model.has_closed_form and not include_states:
            return "closed-form"
        gpu = on_gpu() if gpu is None else gpu
        return "fused" if gpu and _fused_runs(model) is None else "ensemble"
    if engine == "fused" and (why := _fused_runs(model)) is not None:
        raise InputError(f"engine='fused' cannot run model {model.name!r}: {why}; use engine='ensemble'")
    return engine


def _fused_runs(model: Model) -> str | None:
    """None if the fused kernel can run ``model``, else why not (an operation of its functions without a
    row form)."""
    from carkin.simulation.fused import row_functions
    from carkin.simulation.lanewise import NotLanewise

    try:
        row_functions(model)
    except NotLanewise as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=SOLVER_CACHE_SIZE)
def _chunk_solver(model: Model, variability: bool, rtol, atol, n_devices: int, engine: str = "diffrax",
                  states: bool = True, lanes: int = ENSEMBLE_LANES):
    """Compiled solve of one chunk of subjects, split evenly over ``n_devices``.

    ``model`` here is a template with default values, so changing typical values
    never recompiles. With several devices the chunk is split evenly over them.
    ``engine="closed-form"`` evaluates the model's exact solution instead of integrating
    (no states, no solver steps).
    """
    names = model.parameter_names
    cnames = tuple(c.name for c in model.covariates)
    virtual = population.Population.of(model)
    weight = model.role("weight")

    def draw(key, index, typ, omega, ctab, cov_given, cov_cols, par_given, par_cols):
        # the given values (columns cov_cols, par_cols; usually none) replace the drawn ones
        theta, cov_s = population.draw_subject(key, index, virtual, typ, omega, *ctab, variability)
        return theta.at[par_cols].set(par_given), cov_s.at[cov_cols].set(cov_given)

    def drawn(key, index, typ, omega, ctab, cov_given, cov_cols, par_given, par_cols, dose_t, dose_per_kg, times):
        theta, cov_v = jax.vmap(draw, in_axes=(None, 0, None, None, None, 0, None, 0, None))(
            key, index, typ, omega, ctab, cov_given, cov_cols, par_given, par_cols)
        cells = dose_per_kg[None, :] * cov_v[:, cnames.index(weight)][:, None]
        dose_t = jnp.broadcast_to(dose_t, cells.shape)  # every subject of a call has the regimen's dose table
        return prepare_ensemble(model, times, dose_t, cells, theta, cov_v), theta, cov_v

    def solved(prepared, theta, cov_v, index, times, end):
        # subjects with index >= end pad the last chunk: they come last on each device and are skipped
        solve = integrate_ensemble
        if engine == "fused":
            from carkin.simulation.fused import integrate_fused as solve  # Pallas is imported only when used
        ys, ok, steps = solve(model, prepared, times, theta, cov_v, rtol=rtol, atol=atol, lanes=lanes,
                              n_active=jnp.sum(index < end))
        obs = observe_subjects(model, ys, theta, cov_v)
        ok = ok & jnp.all(jnp.isfinite(ys), axis=(1, 2))
        return obs, ys if states else ys[:, :, :0], ok, steps, theta, cov_v  # states stay on the device unless asked

    def one(key, index, typ, omega, ctab, cov_given, cov_cols, par_given, par_cols,
            dose_t, dose_per_kg, times, end=None):
        theta, cov_v = draw(key, index, typ, omega, ctab, cov_given, cov_cols, par_given, par_cols)
        p = dict(zip(names, theta))
        cov = dict(zip(cnames, cov_v))
        if engine == "closed-form":
            obs = model.closed_form_observables(times, p, cov, dose_t, dose_per_kg * cov[weight])
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in obs.values()]))
            return obs, jnp.zeros((times.shape[0], 0)), finite, jnp.asarray(0), theta, cov_v
        ys, ok, steps = solve_subject(model, times, dose_t, dose_per_kg * cov[weight], p, cov,
                                      rtol=rtol, atol=atol)
        obs = model.observe(ys, p, cov)
        finite = jnp.all(jnp.isfinite(ys))
        return obs, ys if states else ys[:, :0], ok & finite, steps, theta, cov_v

    # per subject (0): its index and given covariates and parameters; shared (None): the rest, the regimen's
    # dose table included (what crosses to an accelerator per call is a few bytes a subject)
    in_axes = (None, 0, None, None, None, 0, None, 0, None, None, None, None, None)
    if engine not in LANE_ENGINES:
        return _compiled(jax.vmap(one, in_axes=in_axes), in_axes, n_devices)
    # Two programs: the draw and each subject's events and initial states compiled as XLA does by default,
    # then the lanes' loop and the observables with the ensemble's compiler options. The loop's compile
    # does not depend on the chunk's size, so a subject's states are the same in any chunk.
    first = _compiled(drawn, in_axes[:-1], n_devices)
    second = _compiled(solved, (0, 0, 0, 0, None, None), n_devices, compiler_options())

    def run(key, index, typ, omega, ctab, cov_given, cov_cols, par_given, par_cols, dose_t, dose_per_kg, times, end):
        return second(*first(key, index, typ, omega, ctab, cov_given, cov_cols, par_given, par_cols, dose_t,
                             dose_per_kg, times), index, times, end)

    return run


def _compiled(fn, in_axes, n_devices: int, options: dict | None = None):
    """``jit(fn)`` on one device, or each device running ``fn`` on its own slice of the arguments whose
    ``in_axes`` is 0 (the others, None, are shared), with the results back in subject order."""
    if n_devices == 1:
        return jax.jit(fn, compiler_options=options)
    # Each device solves its own slice of the chunk with its own solver loops (shard_map), so the
    # devices never wait for each other inside an adaptive solve.
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.local_devices()[:n_devices]), ("subjects",))
    specs = tuple(PartitionSpec() if a is None else PartitionSpec("subjects") for a in in_axes)
    # check_vma=False: equinox error checks inside diffrax carry unannotated cond branches.
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PartitionSpec("subjects"),
                                 check_vma=False), compiler_options=options)


def ensemble_sizes() -> tuple[int, int]:
    """(lanes, subjects per call per device) of the ensemble engine where computations go
    (carkin.config.compute_platform): a CPU keeps a few vector widths of lanes busy; a GPU needs a lane
    for each of its threads."""
    if compute_platform() == "cpu":
        return ENSEMBLE_LANES, ENSEMBLE_CHUNK
    return GPU_LANES, GPU_CHUNK


def _layout(n: int, chunk_size: int | None, per_call: int = DEFAULT_CHUNK, balanced: bool = False) -> tuple[int, int]:
    """(chunk, devices): at most ``per_call`` subjects per device per call, rounded up
    to a power of two for small populations so only a few shapes are compiled. ``balanced``: above
    BALANCED_ROUNDING subjects per device the calls share the population evenly instead, rounded up to
    a multiple of it, so little is computed for padding (a few more shapes to compile: 10,000 subjects
    on 2 devices take 10,240 places instead of 16,384)."""
    n_dev = jax.local_device_count()
    if chunk_size:
        return chunk_size, n_dev if chunk_size % n_dev == 0 and chunk_size >= MIN_PER_DEVICE * n_dev else 1
    if n < MIN_PER_DEVICE * n_dev:
        n_dev = 1
    per_device = min(per_call, 1 << (-(-n // n_dev) - 1).bit_length())
    if balanced and per_device > BALANCED_ROUNDING:
        calls = -(-n // (per_call * n_dev))
        per_device = min(per_call, -(-n // (calls * n_dev * BALANCED_ROUNDING)) * BALANCED_ROUNDING)
    return per_device * n_dev, n_dev


def _dealt(chunk: int, n_devices: int) -> np.ndarray:
    """For each position of a chunk, the subject (offset in the chunk) placed there so that device d
    (positions d*per..(d+1)*per-1) holds subjects d, d + n_devices, d + 2 n_devices, ..."""
    per = chunk // n_devices
    position = np.arange(chunk)
    return (position % per) * n_devices + position // per


# An accelerator's results go to the host through page-locked memory first: a copy into ordinary (pageable)
# host memory runs at a fraction of the link's speed (benchmarks/README.md, GPU section).
PINNED_FETCH = True


def _pinned_host_available(x: jax.Array) -> bool:
    """Whether every device holding ``x`` offers page-locked host memory (GPUs and TPUs do)."""
    return all("pinned_host" in {m.kind for m in d.addressable_memories()}  # type: ignore[attr-defined]
               for d in x.sharding.device_set)


def _to_host(x) -> np.ndarray:
    if PINNED_FETCH and isinstance(x, jax.Array) and jax.default_backend() != "cpu" \
            and x.sharding.memory_kind not in (None, "pinned_host") and _pinned_host_available(x):
        x = jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
    return np.asarray(x)


def _undeal(x: jax.Array, n_devices: int, count: int) -> np.ndarray:
    """The first ``count`` subjects of a chunk dealt out to ``n_devices`` devices (:func:`_dealt`), in
    subject order: device d's row r is subject r * n_devices + d, so each device's real rows are copied
    once, straight into place, and its padding rows not at all."""
    pieces = sorted(x.addressable_shards, key=lambda piece: piece.index[0].start or 0)
    host = [_to_host(piece.data) for piece in pieces]
    out = np.empty((count,) + host[0].shape[1:], host[0].dtype)
    for d, rows in enumerate(host):
        out[d::n_devices] = rows[: len(range(d, count, n_devices))]
    return out


def _per_subject(name, value, n) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise InputError(f"{name}: expected a scalar or {n} values (one per subject), got shape {arr.shape}")
    return arr


def _check_domain(prm, values: np.ndarray) -> None:
    """Refuse per-subject values outside the parameter's domain, as Model.with_values does for one value."""
    ok = np.isfinite(values)
    if prm.kind == "positive":
        ok &= values > 0
    elif prm.kind == "fraction":
        ok &= (values > 0) & (values < 1)
    if not ok.all():
        from carkin.model.kinetics import check_value

        check_value(prm.name, values[~ok][0], prm.kind)  # raises with the model's message


def simulate(
    model: Model,
    regimen_or_list,
    times="0:90:1",
    n_subjects: int | None = None,
    weight_kg=None,
    *,
    covariates: dict | None = None,
    params: dict | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    first_subject: int = 0,
    include_states: bool = False,
    progress: bool | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    measurements: bool = False,
    engine: str = "auto",
) -> xr.Dataset:
    """Simulate ``model`` under one regimen or a list of regimens.

    ``n_subjects=None`` gives the typical subject (a ``subject`` dim of length 1);
    an integer gives a virtual population with the model's between-subject
    variability, reproducible from ``seed``. ``weight_kg`` (scalar or one per
    subject) defaults to the model's weight covariate: typical 60 kg, or for a
    population log-normal with 30% CV clipped to 12-150 kg. ``covariates`` and
    ``params`` fix covariate or parameter values (scalar or one per subject).
    Every subject receives every regimen (a paired comparison). ``first_subject`` offsets
    the subjects' indices (a subject's draws depend only on the seed and its index), so a
    population can be simulated in pieces that together equal one call. ``measurements=True``
    adds simulated measurements of every observable with an assay (``<name>_measured`` with
    the model's residual error, NaN below the LLOQ, and ``<name>_blq``; see carkin.measure).
    ``engine``: ``"auto"`` evaluates the model's closed form where it has one (stein_2019) and
    integrates otherwise, on a GPU with the fused kernel, elsewhere with the ensemble solver
    (carkin.simulation.ensemble); ``"closed-form"``,
    ``"ensemble"``, ``"fused"`` (the ensemble's method as one GPU kernel, carkin.simulation.fused; on a
    CPU it runs interpreted, for checking only) or ``"diffrax"`` (the vmapped diffrax solve, the
    reference) choose (the closed form gives no states). The Dataset's ``engine`` attribute says which ran.
    """
    if not isinstance(model, Model):
        raise InputTypeError(f"model must be a carkin model (see carkin.load_model), got {type(model).__name__}")
    regimens, several = dosing.as_regimens(regimen_or_list)
    check_tolerances(rtol, atol)
    engine = choose_engine(model, engine, include_states)
    grid = parse_times(times)
    variability = n_subjects is not None
    if n_subjects is not None and (isinstance(n_subjects, bool) or not float(n_subjects).is_integer()):
        raise InputError(f"n_subjects must be a whole number >= 1 (or None for the typical subject), "
                         f"got {n_subjects!r}")
    n = 1 if n_subjects is None else int(n_subjects)
    if n < 1:
        raise InputError(f"n_subjects must be >= 1 (or None for the typical subject), got {n_subjects!r}")
    seed = check_seed(seed)
    check_memory(8.0 * n * len(regimens) * grid.size * (len(model.observables) + (len(model.states) if include_states
                                                                                     else 0) + 1),
                 f"simulating {n:,} subjects x {len(regimens)} regimen(s) x {grid.size:,} times",
                 "simulate fewer subjects or times, or stream the population to disk with "
                 "carkin.stream.simulate_to_netcdf")
    if chunk_size is not None:
        chunk_size = check_whole("chunk_size", chunk_size, 1, MAX_CHUNK, "subjects per compiled call (None: chosen "
                                 "for the machine)")
    # a subject's draws come from its index folded into the key as a 32-bit integer
    first_subject = check_whole("first_subject", first_subject, 0, 2**32 - n, f"the first of {n:,} subjects' index")

    covariates = dict(covariates or {})
    if weight_kg is not None:
        covariates[model.role("weight")] = weight_kg
    cnames = [c.name for c in model.covariates]
    pnames = list(model.parameter_names)
    for k in covariates:
        if k not in cnames:
            raise InputError(f"model {model.name!r} has no covariate {k!r}; its covariates are {cnames}")
    for k in params or {}:
        if k not in pnames:
            raise InputError(f"model {model.name!r} has no parameter {k!r}; its parameters are {pnames}")
    # the values a user fixed, column by column (only these travel to the device; usually none)
    cov_cols: list[int] = []
    par_cols: list[int] = []
    cov_values, par_values = [], []
    for j, c in enumerate(model.covariates):
        if c.name in covariates:
            v = _per_subject(c.name, covariates[c.name], n)
            if not np.all(np.isfinite(v) & (v > 0)):
                raise InputError(
                    f"covariate {c.name} ({c.description}, {c.unit}): values must be finite and > 0, "
                    f"got {v[~(np.isfinite(v) & (v > 0))][:5]}"
                )
            lo, hi = UNIT_RANGES.get(c.unit, (0.0, np.inf))
            if not np.all((v >= lo) & (v <= hi)):
                raise InputError(f"covariate {c.name} ({c.description}): {v[(v < lo) | (v > hi)][:5]} {c.unit} is "
                                 f"outside the plausible range [{lo:g}, {hi:g}] {c.unit}; check the value and its unit")
            cov_cols.append(j)
            cov_values.append(v)
    for j, prm in enumerate(model.parameters):
        if prm.name in (params or {}):
            assert params is not None  # holds prm.name
            v = _per_subject(prm.name, params[prm.name], n)
            _check_domain(prm, v)
            par_cols.append(j)
            par_values.append(v)

    lanes, ensemble_chunk = ensemble_sizes()
    per_call = {"closed-form": CLOSED_FORM_CHUNK, **dict.fromkeys(LANE_ENGINES, ensemble_chunk)}.get(
        engine, DEFAULT_CHUNK)
    # the closed form and the ensemble (which skips padding subjects in its loop) pay little for a shape
    # more, and drawing, preparing and observing padding cost the ensemble a fifth of a call (benchmarks/README.md)
    chunk, n_dev = _layout(n, chunk_size, per_call, balanced=engine in ("closed-form", *LANE_ENGINES))
    if lanes > ENSEMBLE_LANES:  # a GPU's lanes: no more than the chunk has subjects (idle lanes still step)
        lanes = min(lanes, max(ENSEMBLE_LANES, -(-(chunk // n_dev) // LANE_MULTIPLE) * LANE_MULTIPLE))
    n_chunks = -(-n // chunk)
    n_pad = n_chunks * chunk
    slots = max(r.n_infusions for r in regimens)
    typ, omega = population.site_arrays(model)
    ctab = population.covariate_table(model)
    solver = _chunk_solver(replace(model, values=()), variability, rtol, atol, n_dev, engine, include_states,
                           lanes)
    key = jax.random.PRNGKey(seed)
    index = int(first_subject) + np.arange(n_pad)
    end = int(first_subject) + n  # subjects from here on only pad the last chunk

    def pad(a):
        return np.concatenate([a, np.repeat(a[-1:], n_pad - n, axis=0)]) if n_pad > n else a

    def given(values):
        return pad(np.stack(values, 1) if values else np.zeros((n, 0)))

    cov_given, par_given = given(cov_values), given(par_values)
    cov_idx, par_idx = np.asarray(cov_cols, int), np.asarray(par_cols, int)  # as the solver takes them
    show = progress if progress is not None else n * len(regimens) >= PROGRESS_MIN_SUBJECTS
    bar = _progress(n_chunks * len(regimens), show, model.name)

    # The ensemble skips the padding subjects of a last, partial chunk: deal the chunk's subjects out to
    # the devices in turn so each gets its share of the real ones (first on each device, as it needs).
    dealt = engine in LANE_ENGINES and n_dev > 1
    perm = _dealt(chunk, n_dev) if dealt else np.arange(chunk)

    def in_order(out, i):
        """Chunk i's results on the host in subject order, without the padding of a last chunk."""
        count = min(chunk, n - i * chunk)
        if dealt:
            return jax.tree.map(lambda x: _undeal(x, n_dev, count), out)
        return jax.tree.map(lambda x: _to_host(x)[:count], out)

    results = []
    for reg in regimens:
        (dose_t,), (per_kg,) = dosing.dose_table(reg, np.ones(1), slots)  # the same for every subject
        parts, pending = [], []
        for i in range(n_chunks):
            sl = i * chunk + perm if dealt else slice(i * chunk, (i + 1) * chunk)
            # Dispatch is asynchronous: keep a few chunks in flight so devices overlap,
            # and fetch the oldest so host memory stays bounded.
            pending.append((i, solver(key, index[sl], typ, omega, ctab, cov_given[sl], cov_idx,
                                      par_given[sl], par_idx, dose_t, per_kg, grid, end)))
            if len(pending) > IN_FLIGHT:
                oldest, out = pending.pop(0)
                parts.append(in_order(out, oldest))
                bar.update(1)
        for i, out in pending:
            parts.append(in_order(out, i))
            bar.update(1)
        # one chunk needs no copy (measured: the copy was a quarter of a GPU call's time at 2^15 subjects)
        results.append(jax.tree.map(lambda *xs: xs[0] if len(xs) == 1 else np.concatenate(xs), *parts))
    bar.close()
    ds = _to_dataset(model, regimens, several, grid, results, n_subjects, seed, include_states, first_subject)
    ds.attrs["engine"] = engine
    if measurements:
        from carkin.simulation.measure import measure

        ds = measure(ds, model, seed=seed)
    return ds


class _NoBar:
    def update(self, _):
        pass

    def close(self):
        pass


def _progress(total, show, name):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"simulate {name}", unit="chunk")


def _to_dataset(model, regimens, several, grid, results, n_subjects, seed, include_states, first_subject=0):
    obs_meta = {o.name: o for o in model.observables}
    role_of = {name: role for role, name in model.roles.items()}
    stack = (lambda xs: np.stack(xs)) if several else (lambda xs: xs[0])
    lead = ("regimen", "subject") if several else ("subject",)
    data = {}
    for name, o in obs_meta.items():
        data[name] = (lead + ("time",), stack([r[0][name] for r in results]),
                      {"units": o.unit, "long_name": o.long_name, **({"role": role_of[name]} if name in role_of
                                                                      else {})})
    if include_states:
        for j, s in enumerate(model.states):
            data[f"state_{s.name}"] = (lead + ("time",), stack([r[1][..., j] for r in results]),
                                       {"units": s.unit, "long_name": s.description})
    failed = stack([~r[2] for r in results])
    data["failed"] = (lead, failed, {"units": "1", "long_name": "solve failed for this subject"})
    data["n_steps"] = (lead, stack([r[3] for r in results]),
                       {"units": "1", "long_name": "solver steps taken, accepted and rejected (0 for a closed form)"})
    theta, cov = results[0][4], results[0][5]
    for j, prm in enumerate(model.parameters):
        data[prm.name] = (("subject",), theta[:, j], {"units": prm.unit, "long_name": prm.description})
    for j, c in enumerate(model.covariates):
        data[c.name] = (("subject",), cov[:, j], {"units": c.unit, "long_name": c.description})
    coords = {
        "time": ("time", grid, {"units": "day", "long_name": "time after first infusion"}),
        "subject": ("subject", first_subject + np.arange(failed.shape[-1])),
    }
    # each regimen's dose and schedule are coordinates: selections and tables need no label parsing
    lead_regimen = ("regimen",) if several else ()
    pick = (lambda xs: xs) if several else (lambda xs: xs[0])
    if several:
        coords["regimen"] = ("regimen", [r.label for r in regimens])
    coords["dose_per_kg"] = (lead_regimen, pick([r.total_per_kg for r in regimens]),
                             {"units": "cells/kg", "long_name": "total dose"})
    coords["schedule"] = (lead_regimen, pick([r.schedule for r in regimens]),
                          {"long_name": "how the dose is given (fractions and days)"})
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(
        model=model.name,
        population="typical subject" if n_subjects is None else f"{n_subjects} virtual subjects",
        seed=seed,
        regimens="; ".join(r.label for r in regimens),
        dose_time_convention="at an infusion time the post-infusion value is reported",
    )
    if failed.any():
        bad = np.argwhere(failed)
        bad[:, -1] += first_subject
        shown = ", ".join(str(tuple(int(i) for i in b)) for b in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        warnings.warn(
            f"{len(bad)} solve(s) of model {model.name!r} failed ({'(regimen, subject)' if several else '(subject,)'} "
            f"{shown}{more}); they are flagged in the 'failed' variable. Try tighter tolerances or a stiff solver.",
            SimulationWarning, stacklevel=3,
        )
    return ds
