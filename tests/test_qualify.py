"""Qualification: every evidence row a model claims is a test. A row passes its tolerance, or the model
marks it as a known failure with the reason (and then it must fail: a stale mark is an error too)."""

import pytest

from carkin.library import list_models
from carkin.qualify import model_claims, qualify

MODELS = [m for m in list_models() if model_claims(m)]
CLAIMS = [(m, c.row) for m in MODELS for c in model_claims(m)]
# the mechanistic models' virtual trials take minutes to compile and run: in the slow suite
FAST_MODELS = ("stein_2019",)


@pytest.fixture(scope="module")
def tables():
    return {}


def table_of(tables, model):
    if model not in tables:
        tables[model] = qualify(model)
    return tables[model]


def test_every_library_model_with_tumour_or_kinetics_makes_claims():
    assert set(MODELS) == {"cd19_cart", "cd7_cart", "cd7_carnk", "stein_2019"}


@pytest.mark.parametrize("model, row", [pytest.param(m, r, id=f"{m}:{r}", marks=() if m in FAST_MODELS else
                                                      pytest.mark.slow) for m, r in CLAIMS])
def test_claimed_row(tables, model, row):
    lines = table_of(tables, model)
    lines = lines[lines["row_id"] == row]
    assert len(lines) >= 1
    for _, line in lines.iterrows():
        known = "known failure" in (line["note"] or "")
        detail = (f"{model} {row} {line['quantity']}: carkin {line['carkin']:.4g}, reported {line['reported']:.4g}, "
                  f"tolerance {line['tolerance_low']:.4g}-{line['tolerance_high']:.4g}")
        if known:
            assert not line["passed"], "marked as a known failure but passes: remove the mark. " + detail
        else:
            assert line["passed"], detail
