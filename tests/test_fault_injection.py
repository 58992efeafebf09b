"""Runs killed at random points (SIGINT and SIGKILL) leave either the old outputs intact or a complete
new set: never a partial file at a final path, never a destroyed earlier output.

simulate, fit and what-if: the command runs once to completion (the "old" outputs), then runs
again with other arguments; when it reaches its write phase, the process forks 50 times and each
child writes the new outputs and is killed (SIGKILL or SIGINT, alternately) at a random time
within the write phase, measured beforehand (a fifth of the kills slightly after it). Stream: the
write phase is the whole run, so 50 fresh processes are killed at random times over it. After each
kill every final file is either byte-identical to the old one or a complete, readable new one; a
set that is part old and part new is allowed only while the commit journal is there, and
``recover`` (what the next carkin run does first) then completes it.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr

from carkin import outputs as outputs_module
from carkin.cli import main
from carkin.outputs import PART, journals, recover

pytestmark = [
    pytest.mark.slow,
    # these tests fork on purpose, in the write phase after all JAX work: JAX's warning that a fork of a
    # multithreaded process may deadlock is expected here (a stuck child is killed after 60 s)
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]

KILLS = 50  # per command
ROOT = Path(__file__).resolve().parents[1]
RUN_CLI = "import sys; from carkin.cli import main; sys.exit(main(sys.argv[1:]))"
RUN_STREAM = (
    "import sys, carkin as ck; from carkin.stream import simulate_to_netcdf; "
    "simulate_to_netcdf(ck.load_model('stein_2019'), ck.split(float(sys.argv[2])), sys.argv[1], 2000, "
    "times='0:60:1', block_size=250, progress=False, overwrite=True)"
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
    for p in finals:
        assert p.exists(), f"{p.name}: an earlier output was destroyed"
        assert p.read_bytes() == old[p.name] or readable(p), f"{p.name}: partial file at the final path"
    changed = {p.name for p in finals if p.read_bytes() != old[p.name]}
    if changed and changed != set(old) and not journals(finals[0].parent):
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
        seen["journal"] += bool(journals(finals[0].parent))
        check_after_kill(finals, old)
        seen["replaced" if any(p.read_bytes() != old[p.name] for p in finals) else "kept"] += 1
    return seen


def fork_and_kill(monkeypatch, finals: list[Path]) -> dict:
    """Make the next command's write phase fork KILLS children that are killed while writing."""
    real_enter = outputs_module.Outputs.__enter__
    parent = os.getpid()
    seen = {"replaced": 0, "kept": 0, "journal": 0, "kills": 0}
    rng = random.Random(7)

    def child_writes(self, kill_after: float | None, sig):
        if kill_after is not None:
            threading.Timer(kill_after, os.kill, (os.getpid(), sig)).start()
        return real_enter(self)

    def enter(self):
        if os.getpid() != parent:
            return real_enter(self)
        original = {p.name: p.read_bytes() for p in finals}
        # the write phase's length, from one child that is not killed
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            return child_writes(self, None, None)
        os.waitpid(pid, 0)
        t_write = time.monotonic() - t0
        for k in range(KILLS):
            for p in finals:  # every kill starts from the old set
                p.write_bytes(original[p.name])
            delay = rng.uniform(0, t_write) if k % 5 else rng.uniform(t_write, 1.2 * t_write)
            sig = signal.SIGKILL if k % 2 else signal.SIGINT
            pid = os.fork()
            if pid == 0:
                return child_writes(self, delay, sig)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.01)
            else:  # a child stuck after the fork: kill it, the check below still holds
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            seen["kills"] += 1
            seen["journal"] += bool(journals(finals[0].parent))
            check_after_kill(finals, original)
            seen["replaced" if any(p.read_bytes() != original[p.name] for p in finals) else "kept"] += 1
        for p in finals:
            p.write_bytes(original[p.name])
        return real_enter(self)  # the parent finishes the run normally

    monkeypatch.setattr(outputs_module.Outputs, "__enter__", enter)
    return seen


def run_forking(argv: list[str]) -> int:
    """main(argv); a forked child that returns (or raises) here exits at once instead of going on."""
    parent = os.getpid()
    code = 1
    try:
        code = main(argv)
    finally:
        if os.getpid() != parent:
            os._exit(code if isinstance(code, int) else 1)
    return code


@pytest.fixture(autouse=True)
def quiet_plots(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")


def test_killed_simulate(tmp_path, monkeypatch):
    out = tmp_path / "pop.nc"
    base = ["simulate", "--model", "cd7_cart", "--n-subjects", "64", "--times", "0:60:1", "--out", str(out)]
    finals = [out, tmp_path / "pop_nca.csv", tmp_path / "pop.png"]
    assert main([*base, "--dose", "1e6"]) == 0
    seen = fork_and_kill(monkeypatch, finals)
    assert run_forking([*base, "--dose", "3e6", "--overwrite"]) == 0
    assert seen["kills"] == KILLS and seen["kept"] > 0 and seen["replaced"] > 0, seen


def test_killed_fit(tmp_path, monkeypatch):
    src = pd.read_csv(ROOT / "data" / "stein_sim.csv")
    src[src["ID"] <= 6].to_csv(tmp_path / "small.csv", index=False)
    (tmp_path / "small.toml").write_text((ROOT / "data" / "stein_sim.toml").read_text(encoding="utf-8"),
                                         encoding="utf-8")
    folder = tmp_path / "fit"
    base = ["fit", str(tmp_path / "small.csv"), "--model", "stein_2019", "--out", str(folder), "--method", "svi",
            "--svi-steps", "100", "--quiet"]
    finals = [folder / n for n in ("fit.nc", "parameters.csv", "individual_fits.png", "gof.png", "vpc.png")]
    assert main([*base, "--seed", "0"]) == 0
    seen = fork_and_kill(monkeypatch, finals)
    assert run_forking([*base, "--seed", "1", "--overwrite"]) == 0
    assert seen["kills"] == KILLS and seen["kept"] > 0 and seen["replaced"] > 0, seen


def test_killed_whatif(tmp_path, monkeypatch):
    protocol = ROOT / "examples" / "protocols" / "cd7_carnk_accelerated_titration.toml"
    folder = tmp_path / "whatif"
    base = ["whatif", str(protocol), "--out", str(folder), "--n-subjects", "8"]
    finals = [folder / n for n in ("whatif.nc", "whatif_summary.csv", "dose_exposure.png", "dose_response.png")]
    assert main([*base, "--seed", "0"]) == 0
    seen = fork_and_kill(monkeypatch, finals)
    assert run_forking([*base, "--seed", "1", "--overwrite"]) == 0
    assert seen["kills"] == KILLS and seen["kept"] > 0 and seen["replaced"] > 0, seen


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, MPLBACKEND="Agg", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))


def test_killed_stream(tmp_path, env):
    out = tmp_path / "big.nc"
    seen = hammer(RUN_STREAM, [str(out), "1e6"], lambda k: [str(out), f"{2e6 + k * 1e5:g}"], [out], env,
                  marker=lambda name: name.endswith(".partial") or writing(name))
    assert seen["kept"] > 0, seen
