"""Fuzzing the dataset and protocol readers (hypothesis): whatever the file holds, the reader returns
checked data or raises its own error naming the problem; never a traceback, never a silent default."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carkin.data import DatasetError, read_dataset
from carkin.protocol import COMMON_DESIGN_KEYS, DESIGN_KEYS, KEYS, ProtocolError, read_protocol
from carkin.toxicity import DLTModel

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = sorted((ROOT / "examples" / "protocols").glob("*.toml"))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CELLS = st.sampled_from(["", ".", "NA", "0", "1", "-1", "7", "2.5", "1e6", "1e308", "inf", "nan", "-0", "abc",
                         "1,5", "C", "70", "3e12", "  4 ", "1e-300", "#", "\"x\""])
HEADERS = ["ID", "TIME", "EVID", "AMT", "DV", "DVID", "MDV", "BLQ", "LLOQ", "WT", "CMT", "C", "BLAST", "id", "time",
           "Dv", "AGE", "RATE", "II", "", "PRODUCT"]
SIDECAR_LINES = st.lists(st.sampled_from([
    '[dataset]', 'amt_unit = "cells/kg"', 'amt_unit = "cells"', 'amt_unit = "mg"', 'time_unit = "hour"',
    '[dvid.1]', 'observable = "car_copies"', 'transform = "log10"', 'transfrom = "log10"', 'lloq = 10',
    'lloq = -1', 'scale = "linear"', '[covariates]', 'WT = "kg"', 'BLAST = "%"', '[generaton]', 'x = 1',
]), max_size=8)


def all_protocol_keys() -> set:
    keys = {k for ks in KEYS.values() for k in ks} | set(COMMON_DESIGN_KEYS)
    keys |= {k for ks in DESIGN_KEYS.values() for k in ks} | set(DLTModel.__dataclass_fields__)
    keys |= {"name", "product_type", "dose", "schedule", "rows", "note", "known_failure"}
    return keys


@FUZZ
@given(header=st.lists(st.sampled_from(HEADERS), min_size=1, max_size=9),
       rows=st.lists(st.lists(CELLS, min_size=0, max_size=10), max_size=8), side=SIDECAR_LINES)
def test_dataset_reader_returns_checked_data_or_names_the_problem(tmp_path, header, rows, side):
    path = tmp_path / "fuzz.csv"
    path.write_text("\n".join([",".join(header), *(",".join(r) for r in rows)]) + "\n")
    (tmp_path / "fuzz.toml").write_text("\n".join(side) + "\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = read_dataset(path)
    except DatasetError as e:
        assert str(path) in str(e) or "fuzz.toml" in str(e)
        return
    # Accepted: everything in it is finite and in range, and nothing was silently defaulted.
    assert np.all(np.isfinite(data.obs_time)) and np.all(np.abs(data.obs_time) <= 36525)
    assert np.all(np.isfinite(data.dose_cells)) and np.all(data.dose_cells >= 0)
    assert "transfrom" not in side and "[generaton]" not in side and "x = 1" not in side
    ids = [h.upper() for h in header]
    if data.n_doses.sum() and "WT" in ids:
        assert any(line.startswith("amt_unit") for line in side)  # the dose unit was stated, not assumed


def key_lines(lines: list[str]) -> list[int]:
    """Indices of the lines that assign a key: not comments, not inside a multi-line string (a note's
    text may hold an '=' of its own)."""
    found, in_string = [], False
    for i, ln in enumerate(lines):
        if not in_string and "=" in ln and not ln.lstrip().startswith("#"):
            found.append(i)
        in_string ^= ln.count('"""') % 2 == 1
    return found


def mutate(text: str, line_no: int, action: str, value: str, rename: str) -> tuple[str, str | None]:
    lines = text.splitlines()
    candidates = key_lines(lines)
    i = candidates[line_no % len(candidates)]
    key, _, rest = lines[i].partition("=")
    if action == "value":
        lines[i] = f"{key}= {value}"
        return "\n".join(lines) + "\n", None
    new_key = rename.format(k=key.strip())
    lines[i] = f"{new_key} ={rest}"
    return "\n".join(lines) + "\n", new_key


@FUZZ
@given(which=st.integers(0, len(PROTOCOLS) - 1), line_no=st.integers(0, 200),
       action=st.sampled_from(["value", "key"]),
       value=st.sampled_from(['"x"', "-1", "0", "1e308", "[]", "[1, 2]", "true", "3.5", '"split"', "[-20, -5]",
                              "[150, 10]", "1000000000000", '"il6"', "[1e-3]", '["a"]', "{a = 1}", "nan", "inf",
                              "2", '"3+3"', '"crm"', "[0.1, 0.2, 0.3, 0.4, 0.5]"]),
       rename=st.sampled_from(["{k}s", "x{k}", "{k}_", "Unknown"]))
def test_protocol_reader_refuses_or_accepts_but_never_crashes(tmp_path, which, line_no, action, value, rename):
    text, new_key = mutate(PROTOCOLS[which].read_text(), line_no, action, value, rename)
    path = tmp_path / "p.toml"
    path.write_text(text)
    try:
        protocol = read_protocol(path)
    except ProtocolError as e:
        assert str(path) in str(e) or "p.toml" in str(e)
        return
    if new_key is not None:  # a renamed key survives only if it happens to be another valid key
        assert new_key in all_protocol_keys(), new_key
    assert all(math.isfinite(d) and d > 0 for d in protocol.doses)
    assert 0 <= protocol.age_years[0] <= protocol.age_years[1] <= 120


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.stem)
def test_every_shipped_protocol_reads(path):
    read_protocol(path)


VALUES = st.sampled_from(["0", "-1", "1e12", "abc", "", "nan", "inf", "0.5", "3", "1e-9", "0.1,0.2", "1,,2",
                          "-0.1,0.5", "2", "1e308", str(2**70), "3+3", "boin"])


@FUZZ
@given(opts=st.lists(st.tuples(st.sampled_from(["--design", "--p-dlt", "--n-trials", "--seed", "--target",
                                                "--cohort-size", "--n-cohorts", "--skeleton", "--accelerated-doses",
                                                "--variant"]), VALUES), max_size=6),
       exact=st.booleans())
def test_trial_design_command_never_gives_a_traceback(capsys, opts, exact):
    from carkin.cli import main

    argv = ["trial", *[x for pair in opts for x in pair], *(["--exact"] if exact else [])]
    code = main(argv)  # any exception other than a reported user error fails the test
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    if code == 2:
        assert err.startswith("carkin: error: ") and len(err.strip().splitlines()) == 1, err
