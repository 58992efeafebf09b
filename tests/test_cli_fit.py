"""carkin fit and carkin vpc: outputs written, bad data listed in one message with exit status 2."""

from pathlib import Path

import pandas as pd
import pytest

import carkin as ck
from carkin.cli import main

DATA = Path(__file__).resolve().parents[1] / "data"


def small_copy(tmp_path, n_subjects: int) -> Path:
    """The first subjects of the shipped Stein dataset, with its sidecar: short runs."""
    src = pd.read_csv(DATA / "stein_sim.csv")
    src[src["ID"] <= n_subjects].to_csv(tmp_path / "small.csv", index=False)
    (tmp_path / "small.toml").write_text((DATA / "stein_sim.toml").read_text(encoding="utf-8"), encoding="utf-8")
    return tmp_path / "small.csv"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_fit_then_vpc_write_their_files(tmp_path, capsys):
    small = small_copy(tmp_path, 6)
    out = tmp_path / "fit"
    code, stdout, err = run(capsys, "fit", str(small), "--model", "stein_2019", "--out", str(out),
                            "--method", "svi", "--svi-steps", "200", "--quiet")
    assert code == 0, err
    for name in ("fit.nc", "parameters.csv", "individual_fits.png", "gof.png", "vpc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "parameters.csv")
    assert {"tmax", "omega_tmax", "sigma_car_copies"} <= set(table["parameter"])
    assert "tmax" in stdout and "r_hat" in stdout  # the table is printed too
    tree = ck.load_fit(out / "fit.nc")
    assert tree.attrs["history"].startswith("carkin fit")

    code, _, err = run(capsys, "vpc", str(out), "--n-replicates", "1000000000000")  # refused before any work
    assert code == 2 and "GB of memory" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run(capsys, "vpc", str(out), "--n-replicates", "20")  # the fit wrote vpc.png: refused ...
    assert code == 2 and "--overwrite" in err and "vpc.png" in err, err
    code, stdout, err = run(capsys, "vpc", str(out), "--n-replicates", "20", "--overwrite")  # ... unless asked
    assert code == 0, err
    assert (out / "vpc.png").stat().st_size > 0
    vpc = pd.read_csv(out / "vpc.csv")
    assert set(vpc["statistic"]) == {"p05", "p50", "p95", "frac_blq"}

    # A new fit over the folder replaces the whole set: no plot or VPC of the earlier fit stays beside it.
    code, _, err = run(capsys, "fit", str(small), "--model", "stein_2019", "--out", str(out),
                       "--method", "svi", "--svi-steps", "50", "--quiet", "--no-plots", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["fit.nc", "parameters.csv"]


def test_bad_data_lists_every_problem_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,TIME,EVID,AMT,DV\n1,0,1,1e6,.\n1,5,0,.,.\n1,3,0,.,100\n2,0,4,1e6,.\n")
    before = bad.read_bytes()
    code, _, err = run(capsys, "fit", str(bad), "--model", "stein_2019", "--out", str(tmp_path / "o"))
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("carkin: error: ")
    assert "row 3, ID 1, column DV" in err  # DV missing on an observation
    assert "row 4, ID 1, column TIME" in err  # time goes backwards
    assert "row 5, ID 2, column EVID" in err  # unsupported event code
    assert bad.read_bytes() == before
    assert not (tmp_path / "o").exists()


def test_fit_argument_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "fit", str(DATA / "stein_sim.csv"), "--model", "stein_2019", "--out",
                       str(tmp_path / "o"), "--estimate", "tmax,nope")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no parameter(s) ['nope']" in err
    code, _, err = run(capsys, "fit", str(DATA / "stein_sim.csv"), "--model", "stein_2019", "--out",
                       str(tmp_path / "o"), "--centred", "sigma")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "only parameters with variability" in err
    code, _, err = run(capsys, "fit", str(DATA / "stein_sim.csv"), "--model", "stein_2019", "--out",
                       str(tmp_path / "o"), "--centred", "auto", "--method", "svi")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "centred='auto'" in err
    code, _, err = run(capsys, "vpc", str(tmp_path / "missing"))
    assert code == 2 and "no fit found" in err


@pytest.mark.slow
def test_fit_method_laplace_prints_estimates_ofv_and_writes_plots(tmp_path, capsys):
    out = tmp_path / "lap"
    code, stdout, err = run(capsys, "fit", str(small_copy(tmp_path, 12)), "--model", "stein_2019", "--out", str(out),
                            "--method", "laplace", "--estimate", "cmax,alpha", "--variability", "cmax",
                            "--starts", "2", "--quiet")
    assert code == 0, err
    assert "rse_percent" in stdout and "shrinkage" in stdout and "OFV " in stdout and "converged:" in stdout
    table = pd.read_csv(out / "parameters.csv")
    assert list(table["parameter"]) == ["cmax", "alpha", "omega_cmax", "sigma_car_copies"]
    assert (table["se"] > 0).all()
    for name in ("fit.nc", "individual_fits.png", "gof.png", "vpc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_laplace_without_random_effects_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "fit", str(DATA / "stein_sim.csv"), "--model", "stein_2019", "--out",
                       str(tmp_path / "o"), "--method", "laplace", "--estimate", "cmax", "--variability", "")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no parameter has variability" in err, err
    code, _, err = run(capsys, "fit", str(DATA / "stein_sim.csv"), "--model", "stein_2019", "--out",
                       str(tmp_path / "o"), "--method", "laplace", "--starts", "0")
    assert code == 2 and "--starts must be >= 1" in err, err
