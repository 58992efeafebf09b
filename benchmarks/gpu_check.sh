#!/usr/bin/env bash
# One-shot GPU check (issue 15): install carkin into this machine's own Python (which has jax with
# CUDA, numpyro, diffrax, equinox and xarray), then run every GPU step of benchmarks/gpu_check.py
# within about 8 minutes, writing one JSON record to $OUT (or benchmarks/results).
#
# The few pure-Python packages such a machine may lack (arviz-base, arviz-stats, h5netcdf,
# xarray-einstats) are installed from benchmarks/wheels when present; fetch them beforehand with
#   .venv/bin/pip download --no-deps -d benchmarks/wheels arviz-base arviz-stats h5netcdf xarray-einstats
# and carry that folder to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d benchmarks/wheels ]; then
    "$PY" -m pip install -q --no-deps --no-index --find-links benchmarks/wheels \
        arviz-base arviz-stats h5netcdf xarray-einstats || echo "some carried wheels did not install"
fi
# --no-deps: keep the machine's own jax (CUDA build), numpyro and diffrax
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || "$PY" -m pip install -q --no-deps -e .
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 480 "$PY" benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@"
