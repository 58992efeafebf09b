"""Strict test configuration: explicit setup, every unexpected warning an error (pyproject.toml's
filterwarnings names the expected ones), and one persistent compilation cache for the whole run."""

import os
from pathlib import Path

# Plots in tests (and in the example scripts they start) must not need a display.
os.environ.setdefault("MPLBACKEND", "Agg")
# Compiled programs are cached in the checkout (git ignores .cache/): the two xdist workers, the
# subprocesses the tests start (CLI, examples) and the next run all reuse them. A clean clone starts empty.
CACHE = Path(os.environ.get("CARKIN_TEST_CACHE") or Path(__file__).resolve().parents[1] / ".cache" / "jax-tests")
os.environ["CARKIN_CACHE_DIR"] = str(CACHE)

import jax  # noqa: E402

import carkin  # noqa: E402

carkin.configure(compilation_cache=CACHE)
assert jax.config.jax_enable_x64, "carkin's tests hold results to float64 tolerances"
