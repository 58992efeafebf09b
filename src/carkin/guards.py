"""Size guards: work that cannot fit in memory is refused before it starts, with the way out."""

from __future__ import annotations

import os

from carkin.errors import InputError

MEMORY_FRACTION = 0.5  # of the memory available now: the rest is for the solver, Python and the system
MAX_SEED = 2**63 - 1  # seeds go to JAX's PRNGKey and NumPy's generator as signed 64-bit integers


def available_memory() -> float:
    """Bytes of memory available now (Linux /proc/meminfo; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def check_memory(n_bytes: float, what: str, fix: str) -> None:
    """Refuse ``what`` when its arrays need more than MEMORY_FRACTION of the available memory."""
    limit = MEMORY_FRACTION * available_memory()
    if n_bytes > limit:
        raise InputError(f"{what} would need about {n_bytes / 1e9:,.1f} GB of memory for its results, more than the "
                         f"{limit / 1e9:,.1f} GB this machine can give it now; {fix}")


def check_seed(seed) -> int:
    """A seed the random generators take: a whole number in [0, 2^63 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int) and not (hasattr(seed, "__index__")):
        raise InputError(f"seed={seed!r} must be a whole number in [0, {MAX_SEED}]")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed={seed} is outside [0, {MAX_SEED}] (a signed 64-bit integer, what the random "
                         "generators take); give a smaller non-negative seed")
    return seed


def check_whole(name: str, value, lowest: int, highest: int, meaning: str) -> int:
    """``value`` as an int when it is a whole number in [lowest, highest] (not a bool); ``meaning`` says
    what the argument is for, in the message."""
    whole = not isinstance(value, bool | str) and (
        hasattr(value, "__index__") or isinstance(value, float) and value.is_integer())
    if not whole or not lowest <= int(value) <= highest:
        raise InputError(f"{name}={value!r}: {meaning} must be a whole number in [{lowest:,}, {highest:,}]")
    return int(value)
