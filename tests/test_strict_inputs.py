"""Strict inputs: unknown keys refused with the closest valid key, implausible values refused with
their unit, NONMEM habits accepted, and failures reported instead of returned as numbers."""

import warnings
from pathlib import Path

import numpy as np
import pytest

import carkin as ck
from carkin.cli import main
from carkin.data import DatasetError, DatasetWarning, read_dataset
from carkin.protocol import ProtocolError, read_protocol

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "examples" / "protocols" / "cd7_cart_split_escalation.toml"
THREE = ROOT / "examples" / "protocols" / "cd7_cart_unedited_3plus3.toml"
SIDE = '[dataset]\namt_unit = "cells/kg"\n[dvid.1]\nobservable = "car_copies"\ntransform = "log10"\n'
CSV = "ID,TIME,EVID,AMT,DV,DVID,WT\n1,0,1,1e6,.,.,70\n1,7,0,.,4,1,70\n1,14,0,.,3,1,70\n"


def write(tmp_path, csv_text, sidecar=SIDE):
    path = tmp_path / "d.csv"
    path.write_text(csv_text)
    if sidecar is not None:
        (tmp_path / "d.toml").write_text(sidecar)
    return path


def problems(path, **kw):
    with pytest.raises(DatasetError) as e:
        read_dataset(path, **kw)
    return str(e.value)


# --- dataset sidecar and rows ------------------------------------------------------------------

def test_misspelt_sidecar_key_is_refused_with_the_right_one(tmp_path):
    text = problems(write(tmp_path, CSV, SIDE.replace("transform", "transfrom")))
    assert "unknown key 'transfrom'" in text and "did you mean 'transform'" in text
    text = problems(write(tmp_path, CSV, SIDE + "lloq = 50\n[datset]\n"))
    assert "unknown key 'datset'" in text and "did you mean 'dataset'" in text


def test_shipped_sidecars_have_no_dead_keys():
    data = read_dataset(ROOT / "data" / "stein_sim.csv")
    assert data.observables["car_copies"].lloq == 50.0  # the LLOQ now sits where it is read


def test_c_column_drops_flagged_records_and_is_no_covariate(tmp_path):
    csv = "C,ID,TIME,EVID,AMT,DV,DVID,WT\n.,1,0,1,1e6,.,.,70\nC,1,7,0,.,9,1,70\n.,1,14,0,.,3,1,70\n"
    with pytest.warns(DatasetWarning, match="1 record.*flagged in column C"):
        data = read_dataset(write(tmp_path, csv))
    assert data.obs_time.tolist() == [14.0] and "C" not in data.covariates


def test_time_varying_covariate_is_refused_naming_row_and_column(tmp_path):
    text = problems(write(tmp_path, CSV.replace("1,14,0,.,3,1,70", "1,14,0,.,3,1,75")))
    assert "row 4, ID 1, column WT" in text and "time-varying covariates are not supported" in text


def test_dose_unit_must_be_stated_when_amt_could_be_either(tmp_path):
    text = problems(write(tmp_path, CSV, SIDE.replace('amt_unit = "cells/kg"\n', "")))
    assert "could be total cells or cells/kg" in text
    no_wt = "ID,TIME,EVID,AMT,DV,DVID\n1,0,1,1e8,.,.\n1,7,0,.,4,1\n"
    with pytest.warns(DatasetWarning, match="AMT taken as total cells"):
        assert read_dataset(write(tmp_path, no_wt, SIDE.replace('amt_unit = "cells/kg"\n', ""))).amt_unit == "cells"
    data = read_dataset(write(tmp_path, CSV.replace("1e6", "7e10"), SIDE.replace('amt_unit = "cells/kg"\n', "")))
    assert data.amt_unit == "cells"  # above any per-kg dose: only total cells make sense


@pytest.mark.parametrize("csv, column, words", [
    (CSV.replace("1,14,0", "1,1e308,0"), "TIME", "plausible range"),
    (CSV.replace(",70\n1,7", ",1e9\n1,7").replace("4,1,70", "4,1,1e9").replace("3,1,70", "3,1,1e9"), "WT", "kg"),
    (CSV.replace("1e6", "1e12"), "AMT", "cells/kg"),
])
def test_implausible_values_are_refused_with_their_unit(tmp_path, csv, column, words):
    text = problems(write(tmp_path, csv))
    assert f"column {column}" in text and words in text


def test_percent_covariate_is_held_to_0_100(tmp_path):
    csv = "ID,TIME,EVID,AMT,DV,DVID,WT,BLAST\n1,0,1,1e6,.,.,70,1e9\n1,7,0,.,4,1,70,1e9\n"
    text = problems(write(tmp_path, csv, SIDE + '[covariates]\nBLAST = "%"\n'))
    assert "column BLAST" in text and "[0, 100] %" in text


def test_nonmem_habits_are_accepted(tmp_path):
    csv = "id,time,evid,amt,dv,dvid,cmt,wt\n1,0,1,1e6,NA,NA,CENTRAL,70\n1,7,0,NA,4,1,CENTRAL,70\n"
    data = read_dataset(write(tmp_path, csv))
    assert data.ids == (1,) and data.obs_time.tolist() == [7.0]
    np.testing.assert_allclose(data.dose_cells, [[70e6]])


def test_nca_command_accepts_the_dot_and_nonmem_rows(tmp_path, capsys):
    path = tmp_path / "pk.csv"
    path.write_text("ID,TIME,EVID,AMT,DV\n1,0,1,1e6,.\n1,1,0,.,10\n1,3,0,.,100\n1,7,0,.,50\n1,14,0,.,5\n"
                    "1,21,0,.,.\n")
    assert main(["nca", str(path), "--id", "id", "--time", "TIME", "--dv", "DV"]) == 0
    assert "1 profile(s)" in capsys.readouterr().out


# --- protocols -----------------------------------------------------------------------------------

def edited(tmp_path, source, old, new):
    text = source.read_text()
    assert old in text, old
    path = tmp_path / source.name
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("source, old, new, words", [
    (PROTOCOL, "hold_threshold = 1000.0", "hold_treshold = 1000.0", "did you mean 'hold_threshold'"),
    (THREE, 'variant = "', 'varaint = "', "did you mean 'variant'"),
    (PROTOCOL, "age_years = [14, 65]", "age_years = [-20, -5]", "age_years"),
    (PROTOCOL, "age_years = [14, 65]", "age_years = [14, 65]\nweight_kg = [150, 10]", "weight_kg"),
    (PROTOCOL, "[design]", "[toxicity]\npeak_observable = \"il6\"\n[design]",
     "peak_observable = 'il6' is not an observable"),
    (PROTOCOL, "n_cohorts = 10", 'n_cohorts = "ten"', "n_cohorts = 'ten' should be a int"),
    (PROTOCOL, "n_trials = 2000", "n_trials = 1000000000000", "n_trials"),
    (PROTOCOL, "levels = [1e6,", "levels = [1e-3,", "plausible range"),
    (PROTOCOL, 'product_type = "naturally_selected"', 'product_typ = "naturally_selected"', "does not take"),
    (PROTOCOL, "n_subjects = 200", "n_subjects = -5", "n_subjects"),
])
def test_protocol_mistakes_are_refused_when_read(tmp_path, source, old, new, words):
    with pytest.raises(ProtocolError, match=None) as e:
        read_protocol(edited(tmp_path, source, old, new))
    assert words in str(e.value), str(e.value)


# --- the Python API ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(rtol=-1.0), "rtol=-1.0 is outside"),
    (dict(rtol=0.5), "rtol=0.5 is outside"),
    (dict(atol=0.0), "atol=0.0 must be"),
    (dict(weight_kg=1e9), "plausible range"),
    (dict(seed=2**70), "seed="),
    (dict(times="0:1e9:0.001"), "output times"),
    (dict(times=[0, 1e308]), "times must lie in"),
    (dict(n_subjects=10**12), "GB of memory"),
    (dict(n_subjects=2.5), "whole number"),
    (dict(times=[[0, 1], [2, 3]]), "one list of days"),
    (dict(times=["a"]), "give days as numbers"),
    (dict(chunk_size=0), "chunk_size=0: subjects per compiled call"),
    (dict(chunk_size=2.5), "chunk_size=2.5"),
    (dict(chunk_size="4"), "chunk_size='4'"),
    (dict(chunk_size=True), "chunk_size=True"),
    (dict(n_subjects=4, first_subject=-3), "first_subject=-3"),
    (dict(n_subjects=4, first_subject=1.5), "first_subject=1.5"),
    (dict(n_subjects=4, first_subject=None), "first_subject=None"),
    # subjects' indices are folded into the key as 32-bit integers: beyond that they would repeat others
    (dict(n_subjects=4, first_subject=2**32 - 3), "whole number in [0, 4,294,967,292]"),
])
def test_simulate_refuses_before_any_work(kwargs, words):
    model = ck.load_model("stein_2019")
    with pytest.raises(ValueError) as e:
        ck.simulate(model, ck.single(1e6), **{"times": [0, 1], **kwargs})
    assert words in str(e.value), str(e.value)


def test_a_regimen_must_be_made_with_the_regimen_functions():
    with pytest.raises(TypeError, match=r"carkin.single\(1e7\) for 1e7 cells/kg\), got 10000000.0"):
        ck.simulate(ck.load_model("stein_2019"), 1e7, [0, 1])


def test_implausible_doses_are_refused():
    with pytest.raises(ValueError, match="not in millions"):
        ck.single(5.0)
    with pytest.raises(ValueError, match="plausible range"):
        ck.split(1e12)


def test_nca_skips_failed_solves_and_says_so():
    from carkin.kinetics import SolverSettings
    from carkin.nca import NCAWarning

    stein = ck.load_model("stein_2019")

    class Starved(type(stein)):  # too few steps allowed: every solve fails
        solver = SolverSettings(rtol=1e-12, atol=1e-12, max_steps=8)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ck.SimulationWarning)
        ds = ck.simulate(Starved(), ck.single(1e6), times=[0, 10, 400], n_subjects=3, seed=0,
                         engine="ensemble")  # an ODE solve: the closed form cannot run short of steps
    with pytest.warns(NCAWarning, match="3 profile"):
        res = ck.nca(ds)
    assert np.isnan(res["cmax"].values).all() and np.isnan(res["tmax"].values).all()


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["simulate", "--model", "stein_2019", "--dose", "1e6", "--n-subjects", "1000000000000"], "GB of memory"),
    (["simulate", "--model", "stein_2019", "--dose", "1e6", "--times", "0:1e9:0.001"], "output times"),
    (["simulate", "--model", "stein_2019", "--dose", "1e6", "--seed", str(2**70)], "seed="),
    (["simulate", "--model", "stein_2019", "--dose", "1e6", "--weight", "1e9"], "plausible range"),
    (["trial", str(PROTOCOL), "--out", "{tmp}/t", "--n-trials", "1000000000000"], "limit"),
])
def test_cli_refusals_are_one_line_with_exit_2(tmp_path, capsys, argv, words):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_cli_seed_beyond_64_bits_is_an_argument_error(capsys):
    code = main(["trial", "--design", "3+3", "--p-dlt", "0.1,0.2", "--exact", "--seed", str(2**64)])
    err = capsys.readouterr().err
    assert code == 2 and "--seed" in err


def _stuck_tree():
    import json

    import xarray as xr

    rng = np.random.default_rng(0)
    post = xr.Dataset({"tmax": (("chain", "draw"), np.vstack([np.full(50, 9.3), rng.normal(9.3, 0.1, 50)]))})
    stats = xr.Dataset({"diverging": (("chain", "draw"), np.zeros((2, 50), bool)),
                        "tree_depth": (("chain", "draw"), np.ones((2, 50), int))})
    tree = xr.DataTree.from_dict({"posterior": post, "sample_stats": stats})
    tree.attrs["settings"] = json.dumps({"method": "nuts", "max_tree_depth": 10})
    return tree


def test_a_stuck_chain_is_reported_as_such():
    from carkin.inference import convergence_report, stuck_chains

    tree = _stuck_tree()
    assert stuck_chains(tree) == [0]
    message = convergence_report(tree)[0]  # the stuck chain first; the moving one is judged on its own
    assert "chain(s) [0] never moved" in message and "stuck" in message


def test_cli_fit_with_a_stuck_chain_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ck, "fit", lambda *a, **k: _stuck_tree())
    folder = tmp_path / "fit"
    code = main(["fit", str(ROOT / "data" / "stein_sim.csv"), "--model", "stein_2019", "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "did not move" in err and "Try --method svi" in err
    assert not folder.exists()


def test_fit_too_large_for_memory_is_refused_before_it_runs(monkeypatch):
    from carkin import guards

    monkeypatch.setattr(guards, "available_memory", lambda: 1e6)  # a machine with 1 MB free
    with pytest.raises(ValueError, match="GB of memory"):
        ck.fit(ck.load_model("stein_2019"), ROOT / "data" / "stein_sim.csv", method="svi", svi_steps=10)


def test_exact_de_escalation_with_many_doses_is_refused_at_once():
    from carkin.trials import ThreePlusThree, exact_operating_characteristics

    with pytest.raises(ValueError, match="above the limit of 16"):
        exact_operating_characteristics(ThreePlusThree(variant="de-escalation"), [0.01 * (i + 1) for i in range(30)])
