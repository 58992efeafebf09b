"""Outputs are written as a set, completely or not at all; existing files are replaced only when asked."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import carkin as ck
from carkin.cli import main
from carkin.outputs import HOST, JOURNAL_PREFIX, MANIFEST, PART, OutputError, Outputs, journals, owner, recover
from carkin.stream import open_stream, partial_path, simulate_to_netcdf

SIM = ["simulate", "--model", "stein_2019", "--dose", "1e6", "--times", "0:28:7"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if PART in p.name or p.name.startswith(JOURNAL_PREFIX))


def test_existing_outputs_are_refused_unless_overwrite(tmp_path):
    (tmp_path / "a.csv").write_text("old")
    with pytest.raises(OutputError, match=r"1 output file\(s\) exist: .*a.csv; pass --overwrite"):
        Outputs([tmp_path / "a.csv", tmp_path / "b.csv"])
    with Outputs([tmp_path / "a.csv", tmp_path / "b.csv"], overwrite=True) as o:
        o.temp(tmp_path / "a.csv").write_text("new a")
        o.temp(tmp_path / "b.csv").write_text("new b")
        assert (tmp_path / "a.csv").read_text() == "old"  # nothing at a final path until the commit
    assert (tmp_path / "a.csv").read_text() == "new a" and (tmp_path / "b.csv").read_text() == "new b"
    assert leftovers(tmp_path) == []


def test_a_failed_run_keeps_the_old_set_and_leaves_no_temporary_files(tmp_path):
    (tmp_path / "a.csv").write_text("old a")
    with pytest.raises(RuntimeError), Outputs([tmp_path / "a.csv", tmp_path / "b.png"], overwrite=True) as o:
        o.temp(tmp_path / "a.csv").write_text("half")
        raise RuntimeError("the plot failed")
    assert (tmp_path / "a.csv").read_text() == "old a" and not (tmp_path / "b.png").exists()
    assert leftovers(tmp_path) == []


def test_symbolic_link_at_an_output_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "unrelated.txt"
    victim.write_text("precious")
    (tmp_path / "x.csv").symlink_to(victim)
    with pytest.raises(OutputError, match="exist"):
        Outputs([tmp_path / "x.csv"])  # a link there counts as an existing output
    with Outputs([tmp_path / "x.csv"], overwrite=True) as o:
        o.temp(tmp_path / "x.csv").write_text("result")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "x.csv").is_symlink() and (tmp_path / "x.csv").read_text() == "result"


def test_an_interrupted_commit_is_rolled_forward(tmp_path):
    """Killed among the renames: the journal lists them and every temporary file is complete, so
    the next run (or recover) finishes the set instead of leaving old and new mixed."""
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("old")
    temps = {}
    for name in ("a.csv", "b.csv"):
        temps[name] = tmp_path / f".{name}{PART}{HOST}~999999999-0000.csv"
        temps[name].write_text("new")
    os.replace(temps["a.csv"], tmp_path / "a.csv")  # the kill came after the first rename
    plan = {"renames": [[str(temps[n]), str(tmp_path / n)] for n in temps], "remove": []}
    (tmp_path / f"{JOURNAL_PREFIX}{HOST}~999999999.json").write_text(json.dumps(plan))
    assert recover(tmp_path) == [str(tmp_path / "b.csv")]
    assert (tmp_path / "a.csv").read_text() == "new" and (tmp_path / "b.csv").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_temporary_files_of_dead_runs_are_cleaned(tmp_path):
    stale = tmp_path / f".x{PART}{HOST}~999999999-abcd.nc"
    stale.write_text("partial")
    mine = tmp_path / f".y{PART}{owner()}-abcd.nc"
    mine.write_text("in progress")
    elsewhere = tmp_path / f".z{PART}otherhost~999999999-abcd.nc"  # another host's run: its own business
    elsewhere.write_text("in progress there")
    (tmp_path / f"{JOURNAL_PREFIX}otherhost~999999999.json").write_text('{"renames": [], "remove": []}')
    recover(tmp_path)
    assert not stale.exists() and mine.exists() and elsewhere.exists()
    assert [j.name for j in journals(tmp_path)] == [f"{JOURNAL_PREFIX}otherhost~999999999.json"]


def test_manifest_removes_an_earlier_runs_files(tmp_path):
    folder = tmp_path / "fit"
    with Outputs([folder / "fit.nc", folder / "gof.png"], manifest=True) as o:
        for f in ("fit.nc", "gof.png"):
            o.temp(folder / f).write_text("run 1")
    with pytest.raises(OutputError, match="gof.png"):
        Outputs([folder / "fit.nc"], manifest=True)  # the earlier plot counts as an existing output
    with Outputs([folder / "fit.nc"], manifest=True, overwrite=True) as o:
        o.temp(folder / "fit.nc").write_text("run 2")
    assert not (folder / "gof.png").exists()  # no stale plot beside the new fit
    assert json.loads((folder / MANIFEST).read_text()) == {"files": ["fit.nc"]}


def test_folder_is_not_created_for_a_refused_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        Outputs([blocker / "sub" / "a.csv"])
    Outputs([tmp_path / "new" / "a.csv"])
    assert not (tmp_path / "new").exists()


# --- the command line ----------------------------------------------------------------------------

def test_simulate_refuses_to_overwrite_before_computing(tmp_path, capsys, monkeypatch):
    target = tmp_path / "pop.nc"
    assert main([*SIM, "--out", str(target)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"pop.nc", "pop_nca.csv", "pop.png"}
    capsys.readouterr()

    def boom(*a, **k):
        raise AssertionError("simulated although the outputs exist")

    monkeypatch.setattr(ck, "simulate", boom)
    code = main([*SIM, "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "pass --overwrite" in err and "pop.png" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_interrupted_simulate_keeps_the_previous_outputs(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the plot is being written: the old .nc, .csv and .png stay, no partial file, exit 130."""
    target = tmp_path / "pop.nc"
    assert main([*SIM, "--out", str(target)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import carkin.plots.simulation

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(carkin.plots.simulation, "plot_panel", interrupted)
    code = main([*SIM, "--dose", "1e7", "--out", str(target), "--overwrite"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_unwritable_output_is_refused_before_the_fit(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    data = Path(__file__).resolve().parents[1] / "data" / "stein_sim.csv"
    code = main(["fit", str(data), "--model", "stein_2019", "--out", str(blocker / "fit")])
    err = capsys.readouterr().err
    assert code == 2 and "not a folder" in err


# --- streams -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stream_is_complete_resumable_and_marked(tmp_path, monkeypatch):
    model = ck.load_model("stein_2019")
    path = tmp_path / "pop.nc"
    kwargs = dict(times="0:28:7", seed=5, block_size=16, progress=False)
    whole = simulate_to_netcdf(model, ck.single(1e6), tmp_path / "ref.nc", 40, **kwargs)
    assert whole["blocks"] == 3

    import carkin.stream as stream

    real, calls = stream.simulate, []

    def dies_on_third_block(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stream, "simulate", dies_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        simulate_to_netcdf(model, ck.single(1e6), path, 40, **kwargs)
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(ValueError, match="incomplete .*2 of 3 blocks"):
        open_stream(partial_path(path))
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        open_stream(path)

    monkeypatch.setattr(stream, "simulate", real)
    record = simulate_to_netcdf(model, ck.single(1e6), path, 40, **kwargs)
    assert record["blocks_resumed"] == 2 and not partial_path(path).exists()
    with open_stream(path) as a, open_stream(tmp_path / "ref.nc") as b:
        assert int(a.attrs["complete"]) == 1
        np.testing.assert_array_equal(a["car_copies"].values, b["car_copies"].values)
        np.testing.assert_array_equal(a["subject"].values, np.arange(40))
    with pytest.raises(OutputError, match="exist"):
        simulate_to_netcdf(model, ck.single(1e6), path, 40, **kwargs)


@pytest.mark.slow
def test_stream_started_afresh_when_the_partial_file_differs(tmp_path):
    model = ck.load_model("stein_2019")
    path = tmp_path / "pop.nc"
    xr.Dataset({"x": ("a", [1.0])}).to_netcdf(partial_path(path), engine="h5netcdf")  # another run's leftovers
    with pytest.warns(UserWarning, match="starting afresh"):
        rec = simulate_to_netcdf(model, ck.single(1e6), path, 8, times="0:7:7", block_size=4, progress=False)
    assert rec["blocks_resumed"] == 0
    with open_stream(path) as ds:
        assert ds.sizes["subject"] == 8
