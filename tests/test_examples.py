"""Every script under examples/ runs end to end with tiny settings.

Defaults: ``--n-subjects 20 --out <tmp dir>``. A script can override them with
a comment line ``# test-args: ...`` (``{out}`` is the output folder; ``--out``
is appended when absent) and list the files it must write with
``# test-outputs: a.nc b.png`` lines; otherwise it must write at least one file.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.rglob("*.py"))
DEFAULT_ARGS = "--n-subjects 20 --out {out}"


def directives(script: Path, key: str) -> list[str]:
    prefix = f"# {key}:"
    return [line[len(prefix):].strip() for line in script.read_text().splitlines() if line.startswith(prefix)]


def test_examples_found():
    assert any(s.name == "cd7_escalation.py" for s in SCRIPTS)


# scripts that fit (compiling a sampler) or compile the mechanistic models run in the slow suite;
# quickstart's and the main job's steps are tested piece by piece in the default run
SLOW = ("fit_cd7.py", "fit_stein.py", "sbc_stein.py", "cd7_escalation.py", "quickstart.py", "multihost_simulate.py")


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow if s.name in SLOW else ())
                                    for s in SCRIPTS], ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_runs(script, tmp_path):
    out = tmp_path / "out"
    args = " ".join(directives(script, "test-args")) or DEFAULT_ARGS
    if "{out}" not in args:
        args += " --out {out}"
    argv = [a.replace("{out}", str(out)) for a in shlex.split(args)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    expected = [f for line in directives(script, "test-outputs") for f in line.split()]
    if expected:
        missing = [f for f in expected if not (out / f).is_file() or (out / f).stat().st_size == 0]
        assert not missing, f"{script.name} did not write {missing}"
    else:
        assert out.exists() and any(p.is_file() for p in out.rglob("*")), f"{script.name} wrote nothing to --out"
