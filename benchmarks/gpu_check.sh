#!/usr/bin/env bash
# One-shot GPU check (issues 15 and 16): run every GPU step of benchmarks/gpu_check.py in this machine's
# own Python (which has jax with CUDA), writing one JSON record to $OUT (or benchmarks/results).
# `gpu_check.sh --loop [ARGS]` runs benchmarks/gpu_loop_check.py instead (the solve on the device by lane count,
# the copy to the host, simulate end to end); `gpu_check.sh --fused [ARGS]` runs benchmarks/gpu_fused_check.py
# (the fused kernel's rate on several lane layouts against the XLA ensemble, and simulate with each).
#
# carkin runs from a copy of src/ laid out as installed (no build). The pure-Python packages it needs at the versions it is tested
# with travel as wheels in .whl/ (or benchmarks/wheels/) and go into /tmp/site, ahead of the machine's
# own; fetch them beforehand, from the repository root, with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     numpyro==0.22.0 diffrax==0.7.2 equinox==0.13.8 lineax==0.1.1 optimistix==0.1.0 arviz-base==0.8.2 \
#     arviz-stats==0.8.0 xarray-einstats==0.9.1 h5netcdf==1.8.2 xarray==2026.9.0 pandas==3.1.1
# If carkin does not import or solve with the carried diffrax stack under the machine's jax, the
# machine's own diffrax, equinox, lineax and optimistix are used instead (the JSON says which).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS-$(ls -d .whl benchmarks/wheels 2>/dev/null | head -1)}"  # WHEELS= (empty): use what is installed
SITE=/tmp/carkin-site
# carkin as its install lays it out (models/ and data tables inside the package), without building it
PKG=/tmp/carkin-pkg
rm -rf "$PKG" && mkdir -p "$PKG" && cp -r src/carkin "$PKG/carkin" && cp -r models "$PKG/carkin/models" \
    && cp -r data/evidence "$PKG/carkin/evidence_tables" && cp -r data/calibration "$PKG/carkin/calibrations"
smoke() {
    PYTHONPATH="$SITE:$PKG" "$PY" - <<'PY'
import jax, numpy as np, carkin as ck
ck.configure()
ds = ck.simulate(ck.load_model("cd7_cart"), ck.split(1e7), np.arange(0.0, 29.0, 7.0), n_subjects=8, seed=1,
                 progress=False)
assert np.all(np.isfinite(ds["car_copies"].values)) and not ds["failed"].any()
import diffrax, equinox, numpyro
print("smoke ok: jax", jax.__version__, jax.devices(), "diffrax", diffrax.__version__, "equinox",
      equinox.__version__, "numpyro", numpyro.__version__)
PY
}
install() {  # $@: wheel name patterns to leave out
    rm -rf "$SITE"
    [ -n "$WHEELS" ] || return 0
    local keep=()
    for w in "$WHEELS"/*.whl; do
        local skip=0
        for pat in "$@"; do case "$(basename "$w")" in $pat) skip=1 ;; esac; done
        [ $skip = 1 ] || keep+=("$w")
    done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${keep[@]}"
}
STACK="carried wheels"
install && smoke || {
    STACK="machine's diffrax, equinox, lineax, optimistix"
    echo "retrying with the $STACK"
    install 'diffrax-*' 'equinox-*' 'lineax-*' 'optimistix-*' && smoke
} || { echo "carkin does not run in this Python"; exit 1; }
echo "package stack: $STACK"
if [ "${1:-}" = "--loop" ]; then  # benchmarks/gpu_loop_check.py alone
    shift
    PYTHONPATH="$SITE:$PKG" timeout "${CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_loop_check.py --out "$OUT/gpu_loop.json" "$@"
    exit
fi
if [ "${1:-}" = "--fused" ]; then  # benchmarks/gpu_fused_check.py alone (the fused kernel against the XLA ensemble)
    shift
    PYTHONPATH="$SITE:$PKG" timeout "${CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_fused_check.py --out "$OUT/gpu_fused.json" "$@"
    exit
fi
PYTHONPATH="$SITE:$PKG" timeout "${CHECK_TIMEOUT:-420}" "$PY" benchmarks/gpu_check.py --out "$OUT/gpu_check.json" \
    --stack "$STACK" "$@"
