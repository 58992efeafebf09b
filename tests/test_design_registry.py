"""Trial designs are an extension point: a design class registered in carkin.trials.DESIGNS runs in
simulate_trials, the CLI's design-only mode and protocol files, with nothing else edited.

The design here, "treat every dose": ``cohort_size`` subjects at each dose from the lowest; the
trial stops at the first dose with more than ``max_dlts`` DLTs and selects the dose below. Its
selection probabilities have a closed form (products of binomial tails), the reference."""

import json
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import numpy as np
import pytest
from scipy.stats import binom

from carkin.cli import main
from carkin.trials import DESIGNS, DesignOption, design_from_options, simulate_trials

N_TRIALS = 20_000
SE_MULTIPLE = 4.0  # Monte Carlo estimates within 4 standard errors of the closed form


def _run(design, n_doses, stream):
    cohorts = []
    for dose in range(n_doses):
        first, dlt = stream.treat(dose, design.cohort_size)
        cohorts.append((dose, design.cohort_size, dlt, first))
        if dlt > design.max_dlts:
            return cohorts, dose - 1, False
    return cohorts, n_doses - 1, True


@dataclass(frozen=True)
class TreatEveryDose:
    cohort_size: int = 3
    max_dlts: int = 1

    key: ClassVar[str] = "treat-every-dose"
    exact: ClassVar[bool] = False
    options: ClassVar[tuple] = (
        DesignOption("cohort_size", "int", 3, "subjects per dose", low=1, high=100),
        DesignOption("max_dlts", "int", 1, "most DLTs a dose may have and pass", low=0, high=100),
    )

    @property
    def name(self) -> str:
        return "treat every dose"

    def runner(self, n_doses):
        return partial(_run, self, n_doses)

    def max_subjects(self, n_doses):
        return self.cohort_size * n_doses

    def check_n_doses(self, n_doses):
        pass


def closed_form(p_dlt, m, max_dlts):
    """P(selected = k) for k = -1 .. K-1: pass every dose below k+1, fail dose k+1 (or pass all)."""
    passes = [binom.cdf(max_dlts, m, p) for p in p_dlt]
    out = []
    for k in range(-1, len(p_dlt)):
        reached = np.prod(passes[: k + 1])
        out.append(reached * (1 - passes[k + 1]) if k + 1 < len(p_dlt) else reached)
    return np.array(out)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(DESIGNS, TreatEveryDose.key, TreatEveryDose)
    return TreatEveryDose


P_DLT = (0.05, 0.15, 0.3, 0.5)


def test_a_registered_design_runs_in_simulate_trials(registered):
    design = design_from_options("treat-every-dose", {"cohort_size": 4})
    assert design == TreatEveryDose(cohort_size=4, max_dlts=1)
    oc = simulate_trials(design, p_dlt=P_DLT, n_trials=N_TRIALS, seed=3).to_dict()
    expected = closed_form(P_DLT, 4, 1)
    got = np.array(oc["p_select"])  # [no dose, dose 1, ..., dose K]
    se = np.sqrt(expected * (1 - expected) / N_TRIALS)
    assert np.all(np.abs(got - expected) <= SE_MULTIPLE * se + 1e-12), (got, expected)


def test_a_registered_design_is_offered_by_the_cli(registered, capsys):
    code = main(["trial", "--design", "treat-every-dose", "--max-dlts", "0", "--p-dlt", ",".join(map(str, P_DLT)),
                 "--n-trials", "2000", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["design"] == "treat every dose"
    code = main(["trial", "--design", "boin", "--max-dlts", "0", "--p-dlt", "0.1,0.2", "--n-trials", "10"])
    assert code == 2 and "--max-dlts applies to --design treat-every-dose only" in capsys.readouterr().err


def test_a_registered_design_is_read_from_a_protocol(registered, tmp_path):
    from carkin.protocol import design_keys

    assert design_keys()["treat-every-dose"] == ("cohort_size", "max_dlts")
