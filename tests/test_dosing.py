"""Regimens: construction, validation messages, per-subject dose tables."""

import numpy as np
import pytest

import carkin as ck
from carkin.dosing import dose_table


def test_single_and_split_amounts():
    assert ck.single(2e6).amounts_per_kg == (2e6,)
    r = ck.split(1e7)
    assert r.days == (0.0, 1.0, 2.0)
    np.testing.assert_allclose(r.amounts_per_kg, (1e6, 3e6, 6e6))
    assert r.total_per_kg == pytest.approx(1e7)
    assert "split" in r.label and "10/30/60" in r.label


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ck.split(1e7, fractions=(0.5, 0.6), days=(0, 1)), "sum to 1"),
        (lambda: ck.split(1e7, fractions=(0.5, 0.5), days=(1, 0)), "sorted"),
        (lambda: ck.split(1e7, fractions=(0.5, 0.5), days=(-1, 0)), ">= 0"),
        (lambda: ck.split(1e7, fractions=(0.5, 0.5), days=(0, 1, 2)), "one fraction per day"),
        (lambda: ck.split(1e7, fractions=(1.2, -0.2), days=(0, 1)), ">= 0"),
        (lambda: ck.single(-1.0), ">= 0 cells/kg"),
        (lambda: ck.single(float("nan")), "finite"),
        (lambda: ck.custom([0, 1], [1e6]), "one amount per day"),
        (lambda: ck.custom([], []), "at least one"),
    ],
)
def test_bad_regimens_are_refused_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_dose_table_pads_and_scales_by_weight():
    times, cells = dose_table(ck.split(1e6, fractions=(0.4, 0.6), days=(0, 3)), np.array([10.0, 70.0]), 4)
    np.testing.assert_allclose(times, [[0, 3, 3, 3]] * 2)
    np.testing.assert_allclose(cells, [[4e6, 6e6, 0, 0], [2.8e7, 4.2e7, 0, 0]])


def test_regimen_list_needs_unique_labels():
    with pytest.raises(ValueError, match="unique"):
        ck.simulate(ck.load_model("stein_2019"), [ck.single(1e6), ck.single(1e6)], times=[0, 1])
