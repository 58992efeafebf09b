"""Runs killed at random points (SIGINT and SIGKILL) leave either the old outputs intact or a complete
new set: never a partial file at a final path, never a destroyed earlier output.

Each command first runs to completion (the "old" outputs), then is started again many times with
other arguments and killed: a third of the kills at a uniform time over the whole run, the rest
aimed at the write phase (after the first temporary output file appears). After each kill every
final file is either byte-identical to the old one or a complete, readable new one; a set that is
part old and part new is allowed only while the commit journal is there, and ``recover`` (what
the next carkin run does first) then completes it.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr

from carkin.outputs import JOURNAL, PART, recover

pytestmark = pytest.mark.slow

KILLS = 50  # per command
ROOT = Path(__file__).resolve().parents[1]
RUN_CLI = "import sys; from carkin.cli import main; sys.exit(main(sys.argv[1:]))"
RUN_STREAM = (
    "import sys, carkin as ck; from carkin.stream import simulate_to_netcdf; "
    "simulate_to_netcdf(ck.load_model('cd7_cart'), ck.split(float(sys.argv[2])), sys.argv[1], 3000, "
    "times='0:60:1', block_size=500, progress=False, overwrite=True)"
)


def readable(path: Path) -> bool:
    """A complete file of its kind (a cut file fails to parse)."""
    try:
        if path.suffix == ".nc":
            with xr.open_dataset(path, engine="h5netcdf") as ds:
                ds.load()
        elif path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            data = path.read_bytes()
            return data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
        return True
    except Exception:
        return False


def start(code: str, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def writing(name: str) -> bool:
    """A temporary output file: the write phase has begun."""
    return PART in name and not name.startswith(".probe")


def wait_for(folder: Path, proc: subprocess.Popen, limit: float, marker=writing) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and proc.poll() is None:
        if folder.exists() and any(marker(p.name) for p in folder.iterdir()):
            return True
        time.sleep(0.002)
    return False


def check_after_kill(finals: list[Path], old: dict) -> None:
    journal = finals[0].parent / JOURNAL
    for p in finals:
        assert p.exists(), f"{p.name}: an earlier output was destroyed"
        assert p.read_bytes() == old[p.name] or readable(p), f"{p.name}: partial file at the final path"
    changed = {p.name for p in finals if p.read_bytes() != old[p.name]}
    if changed and changed != set(old) and not journal.exists():
        raise AssertionError(f"mixed outputs without a journal: new {sorted(changed)}, old "
                             f"{sorted(set(old) - changed)}")
    recover(finals[0].parent)
    changed = {p.name for p in finals if p.read_bytes() != old[p.name]}
    assert not changed or changed == set(old), f"mixed outputs after recovery: {sorted(changed)}"
    assert all(readable(p) for p in finals)


def hammer(code: str, first: list[str], again, finals: list[Path], env: dict, marker=writing) -> dict:
    """Run once to completion, then KILLS times killed; returns counts of what the kills met."""
    proc = subprocess.run([sys.executable, "-c", code, *first], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    t0 = time.monotonic()
    full = start(code, again(0), env)
    assert wait_for(finals[0].parent, full, 900, marker)
    t_write = time.monotonic() - t0
    assert full.wait(900) == 0
    t_total = time.monotonic() - t0
    rng = random.Random(13)
    seen = {"replaced": 0, "kept": 0, "journal": 0}
    for k in range(KILLS):
        old = {p.name: p.read_bytes() for p in finals}
        proc = start(code, again(k + 1), env)
        if k % 3 == 0:
            time.sleep(rng.uniform(0, t_total))
        elif wait_for(finals[0].parent, proc, 900, marker):
            time.sleep(rng.uniform(0, max(0.05, t_total - t_write)))
        sig = signal.SIGKILL if k % 2 else signal.SIGINT
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:  # a SIGINT held up in native code: finish it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seen["journal"] += (finals[0].parent / JOURNAL).exists()
        check_after_kill(finals, old)
        seen["replaced" if any(p.read_bytes() != old[p.name] for p in finals) else "kept"] += 1
    return seen


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, MPLBACKEND="Agg",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))
    return e


def test_killed_simulate(tmp_path, env):
    out = tmp_path / "pop.nc"
    base = ["simulate", "--model", "cd7_cart", "--n-subjects", "64", "--times", "0:60:1", "--out", str(out)]
    seen = hammer(RUN_CLI, [*base, "--dose", "1e6"], lambda k: [*base, "--dose", f"{2e6 + k * 1e5:g}", "--overwrite"],
                  [out, tmp_path / "pop_nca.csv", tmp_path / "pop.png"], env)
    assert seen["kept"] > 0 and seen["replaced"] > 0, seen


def test_killed_stream(tmp_path, env):
    out = tmp_path / "big.nc"
    seen = hammer(RUN_STREAM, [str(out), "1e6"], lambda k: [str(out), f"{2e6 + k * 1e5:g}"], [out], env,
                  marker=lambda name: name.endswith(".partial") or writing(name))
    assert seen["kept"] > 0, seen


def test_killed_fit(tmp_path, env):
    src = pd.read_csv(ROOT / "data" / "stein_sim.csv")
    src[src["ID"] <= 6].to_csv(tmp_path / "small.csv", index=False)
    (tmp_path / "small.toml").write_text((ROOT / "data" / "stein_sim.toml").read_text(encoding="utf-8"),
                                         encoding="utf-8")
    folder = tmp_path / "fit"
    base = ["fit", str(tmp_path / "small.csv"), "--model", "stein_2019", "--out", str(folder), "--method", "svi",
            "--svi-steps", "100", "--quiet"]
    seen = hammer(RUN_CLI, [*base, "--seed", "0"], lambda k: [*base, "--seed", str(k + 1), "--overwrite"],
                  [folder / n for n in ("fit.nc", "parameters.csv", "individual_fits.png", "gof.png", "vpc.png")],
                  env)
    assert seen["kept"] > 0 and seen["replaced"] > 0, seen


def test_killed_whatif(tmp_path, env):
    protocol = ROOT / "examples" / "protocols" / "cd7_carnk_accelerated_titration.toml"
    folder = tmp_path / "whatif"
    base = ["whatif", str(protocol), "--out", str(folder), "--n-subjects", "8"]
    seen = hammer(RUN_CLI, [*base, "--seed", "0"], lambda k: [*base, "--seed", str(k + 1), "--overwrite"],
                  [folder / n for n in ("whatif.nc", "whatif_summary.csv", "dose_exposure.png", "dose_response.png")],
                  env)
    assert seen["kept"] > 0 and seen["replaced"] > 0, seen
