"""Body size: blood volume per kg from the evidence table, and what it does to per-kg doses."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import carkin as ck
from carkin.physiology import BLOOD_VOLUME_KNOTS, blood_volume_ml_per_kg


def test_knots_are_the_linderkamp_age_group_means_and_the_adult_range_middle():
    table = pd.read_csv(Path(__file__).resolve().parent.parent / "data" / "evidence" / "physiology.csv")
    table = table.set_index("fact_id")["value"]
    groups = ("2_3y", "4_6y", "7_10y", "11_14y")
    for (_, ml), g in zip(BLOOD_VOLUME_KNOTS, groups):
        assert ml == pytest.approx((table[f"bv_linderkamp_{g}_m"] + table[f"bv_linderkamp_{g}_f"]) / 2, abs=1e-9)
    assert BLOOD_VOLUME_KNOTS[-1][1] == 67.5  # middle of the adult 65-70 mL/kg (bv_iowa_adult)


def test_blood_volume_per_kg_falls_with_size_and_is_flat_outside_the_knots():
    w = np.array([5.0, 13.0, 20.0, 38.0, 70.0, 120.0])
    v = np.asarray(blood_volume_ml_per_kg(w))
    assert np.all(np.diff(v) <= 0)
    assert v[0] == v[1] == BLOOD_VOLUME_KNOTS[0][1] and v[-1] == v[-2] == 67.5


def test_a_child_dosed_per_kg_gets_a_proportionally_lower_blood_level():
    model = ck.load_model("cd19_cart")
    cov = {"BLAST": 50.0, "BCELL": 100.0}
    child, adult = (ck.simulate(model, ck.single(1e6), times=[0.0], covariates={**cov, "WT": w}) for w in (13.0, 70.0))
    ratio = float(child["car_cells"][0, 0] / adult["car_cells"][0, 0])
    assert ratio == pytest.approx(67.5 / BLOOD_VOLUME_KNOTS[0][1], rel=1e-9)
