"""carkin's one configuration step, ``carkin.configure()``: CPU devices and the compilation cache.

Importing carkin changes one JAX setting and nothing else: 64-bit floats. Every number carkin
computes assumes them (levels span eight orders of magnitude; solver tolerances reach 1e-10), and
a float32 run would return wrong numbers without any error, so this cannot be left to the caller.

Everything else is explicit. ``configure()``, which the ``carkin`` command and the example
scripts call first, exposes each CPU core as a JAX device (so populations and chains split over
them) and turns on JAX's persistent compilation cache (so a second run of the same shapes does not
compile again). A script that never calls it gets one CPU device and no cache: correct, slower.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

from carkin.errors import InputError

# Compilations faster than this are not worth a disk entry (JAX's default is 1 s; carkin's solver
# programs take 2-60 s on a 2-core machine, its small helpers well under a second).
CACHE_MIN_COMPILE_S = 0.5


def compute_platform() -> str:
    """The platform computations go to now: that of the device ``jax.default_device`` names (a context or
    the config), else JAX's default backend. (Under ``jax.default_device(cpu)`` on a GPU host: ``"cpu"``.)"""
    device = getattr(jax.config, "jax_default_device", None)  # not declared in the config's typed interface
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def on_gpu() -> bool:
    """Whether computations go to a GPU now (:func:`compute_platform`)."""
    return compute_platform() in ("gpu", "cuda", "rocm")


def enable_x64() -> None:
    """Switch JAX to 64-bit floats (done on import; see the module docstring for why)."""
    jax.config.update("jax_enable_x64", True)


enable_x64()  # on import: before any carkin module creates an array


def default_cache_dir() -> Path:
    """``$CARKIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/carkin/jax``, else ``~/.cache/carkin/jax``."""
    if os.environ.get("CARKIN_CACHE_DIR"):
        return Path(os.environ["CARKIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "carkin" / "jax"


def configure(*, cpu_devices: int | None = None, compilation_cache: bool | str | os.PathLike = True) -> dict:
    """Set up JAX for carkin; call it before any other JAX work. Returns the settings in effect.

    ``cpu_devices``: CPU cores exposed as JAX devices (default ``$CARKIN_CPU_DEVICES``, else every
    core; 1 turns the split off). It only takes effect before JAX starts its backends; called later,
    the devices JAX already has are kept and a warning says so. An ``XLA_FLAGS`` device count wins.

    ``compilation_cache``: True for :func:`default_cache_dir`, a folder, or False for none
    (``$CARKIN_NO_CACHE=1`` also turns it off)."""
    if cpu_devices is None:
        text = os.environ.get("CARKIN_CPU_DEVICES", "")
        try:
            cpu_devices = int(text) if text else (os.cpu_count() or 1)
        except ValueError:
            raise InputError(f"CARKIN_CPU_DEVICES must be a whole number of devices, got {text!r}") from None
    if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 1:
        raise InputError(f"cpu_devices must be a whole number >= 1, got {cpu_devices!r}")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        except RuntimeError:
            if jax.local_device_count() != cpu_devices and jax.default_backend() == "cpu":
                warnings.warn(f"carkin.configure: JAX had already started with {jax.local_device_count()} CPU "
                              f"device(s), so {cpu_devices} could not be set; call configure() before any JAX work",
                              RuntimeWarning, stacklevel=2)
    cache = None
    # the attr-defined ignores: JAX config flags are runtime attributes
    if compilation_cache is True and jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        # set already (JAX_COMPILATION_CACHE_DIR, or a caller)
        cache = Path(jax.config.jax_compilation_cache_dir)  # type: ignore[attr-defined]
    elif compilation_cache and not os.environ.get("CARKIN_NO_CACHE"):
        cache = default_cache_dir() if compilation_cache is True else Path(compilation_cache)
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    return {"x64": bool(jax.config.jax_enable_x64), "cpu_devices": cpu_devices,  # type: ignore[attr-defined]
            "compilation_cache": None if cache is None else str(cache)}
