"""Reading NONMEM-style datasets: every field of a valid dataset, and a problem report for each malformed one."""

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from carkin.data import DatasetError, DatasetWarning, ObservableSpec, Problem, StudyData, read_dataset

SIDECAR = """
[dataset]
description = "two subjects, two observables"
amt_unit = "cells/kg"
time_unit = "day"

[dvid.1]
observable = "car_copies"
unit = "copies/µg gDNA"
transform = "log10"
lloq = 20.0

[dvid.2]
observable = "cd7_cells"
unit = "cells/µL"
scale = "linear"

[covariates]
WT = "kg"

[generation]
model = "stein_2019"
seed = 1
script = "data/make_datasets.py"
[generation.true_values]
tmax = 9.3
"""

# Row numbers as a spreadsheet shows them: the header is row 1.
CSV = """\
ID,TIME,EVID,AMT,DV,DVID,MDV,LLOQ,WT,AGE,PRODUCT
1,-3,0,.,3.5,1,0,.,70,45,tisa-cel
1,0,1,2e6,.,.,1,.,.,.,
1,7,0,.,5,1,0,1.5,,,
1,7,0,.,120,2,0,.,,,
1,28,0,.,.,1,0,1.5,,,
1,29,0,.,1.2,1,0,1.5,,,
2,0,0,.,.,.,1,.,.,60,.
2,0,1,5e5,.,.,1,.,80,.,axi-cel
2,1,1,1.5e6,.,.,1,.,.,.,.
2,1,0,.,4,1,0,.,,,
2,14,0,.,0,2,0,.,,,
"""


def write(tmp_path: Path, csv_text: str, sidecar: str | None = None, name: str = "study") -> Path:
    path = tmp_path / f"{name}.csv"
    path.write_text(csv_text, encoding="utf-8")
    if sidecar is not None:
        (tmp_path / f"{name}.toml").write_text(sidecar, encoding="utf-8")
    return path


def read_quietly(path, **kwargs) -> StudyData:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # a valid test dataset must not warn
        return read_dataset(path, **kwargs)


def test_valid_dataset_per_kg_every_field(tmp_path):
    path = write(tmp_path, CSV, SIDECAR)
    data = read_quietly(path)

    assert data.path == str(path)
    assert data.ids == (1, 2) and all(type(i) is int for i in data.ids)
    assert data.n_subjects == 2 and data.n_obs == 7
    assert data.amt_unit == "cells/kg"
    # per-kg AMT times WT: ID 1 weighs 70 kg (row 2); ID 2 gives WT 80 on its first dose, reused for the second
    np.testing.assert_array_equal(data.n_doses, [1, 2])
    np.testing.assert_allclose(data.dose_cells, [[2e6 * 70, 0.0], [5e5 * 80, 1.5e6 * 80]])
    np.testing.assert_allclose(data.dose_times, [[0.0, 0.0], [0.0, 1.0]])  # padding repeats the last dose time

    np.testing.assert_array_equal(data.obs_row, [2, 4, 5, 6, 7, 11, 12])  # row 8 has MDV=1
    np.testing.assert_array_equal(data.obs_subject, [0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(data.obs_time, [-3, 7, 7, 28, 29, 1, 14])
    assert data.obs_observable.tolist() == ["car_copies", "car_copies", "cd7_cells", "car_copies", "car_copies",
                                            "car_copies", "cd7_cells"]
    # log10 DV back-transformed; a BLQ record without DV has no value
    np.testing.assert_allclose(data.obs_value, [10**3.5, 1e5, 120, np.nan, 10**1.2, 1e4, 0.0])
    # no BLQ column: BLQ where DV is missing or below LLOQ (the column's, else the sidecar's 20)
    np.testing.assert_array_equal(data.obs_blq, [False, False, False, True, True, False, False])
    np.testing.assert_allclose(data.obs_lloq, [20, 10**1.5, np.nan, 10**1.5, 10**1.5, 20, np.nan])

    assert set(data.covariates) == {"WT", "AGE", "PRODUCT"}
    np.testing.assert_array_equal(data.covariates["WT"], [70.0, 80.0])
    np.testing.assert_array_equal(data.covariates["AGE"], [45.0, 60.0])  # ID 2's AGE is on its MDV=1 row
    assert data.covariates["WT"].dtype == float
    assert data.covariates["PRODUCT"].dtype == object
    assert data.covariates["PRODUCT"].tolist() == ["tisa-cel", "axi-cel"]

    assert data.observables == {
        "car_copies": ObservableSpec("car_copies", "copies/µg gDNA", "log10", "log", 20.0),
        "cd7_cells": ObservableSpec("cd7_cells", "cells/µL", "none", "linear", None),
    }
    assert data.meta["generation"]["model"] == "stein_2019"
    assert data.meta["generation"]["true_values"] == {"tmax": 9.3}
    assert data.meta["covariates"] == {"WT": "kg"}


def test_valid_dataset_in_total_cells(tmp_path):
    path = write(tmp_path, CSV, SIDECAR.replace('amt_unit = "cells/kg"', 'amt_unit = "cells"'))
    data = read_quietly(path)
    assert data.amt_unit == "cells"
    np.testing.assert_allclose(data.dose_cells, [[2e6, 0.0], [5e5, 1.5e6]])


def test_arrays_are_read_only(tmp_path):
    data = read_quietly(write(tmp_path, CSV, SIDECAR))
    with pytest.raises(ValueError):
        data.obs_value[0] = 1.0
    with pytest.raises(ValueError):
        data.covariates["WT"][0] = 1.0


def test_observations_frame(tmp_path):
    frame = read_quietly(write(tmp_path, CSV, SIDECAR)).observations()
    assert list(frame.columns) == ["ID", "TIME", "observable", "value", "BLQ", "LLOQ", "row"]
    assert frame["ID"].tolist() == [1, 1, 1, 1, 1, 2, 2]
    assert frame["row"].tolist() == [2, 4, 5, 6, 7, 11, 12]
    assert frame["BLQ"].sum() == 2


def test_subset_keeps_dataset_order_and_trims_padding(tmp_path):
    data = read_quietly(write(tmp_path, CSV, SIDECAR))
    one = data.subset([1])
    assert one.ids == (1,) and one.dose_cells.shape == (1, 1)
    np.testing.assert_array_equal(one.obs_row, [2, 4, 5, 6, 7])
    two = data.subset(2)
    assert two.ids == (2,)
    np.testing.assert_array_equal(two.obs_subject, [0, 0])
    np.testing.assert_allclose(two.dose_times, [[0.0, 1.0]])
    assert two.covariates["PRODUCT"].tolist() == ["axi-cel"]
    both = data.subset([2, 1])
    assert both.ids == (1, 2)
    with pytest.raises(ValueError, match="no subject with ID 9"):
        data.subset([9])


def test_explicit_blq_column_ln_transform_and_text_ids(tmp_path):
    sidecar = '[dvid.1]\nobservable = "car_copies"\ntransform = "ln"\n'
    csv_text = """\
ID,TIME,AMT,DV,DVID,BLQ,LLOQ
P01,0,1e8,.,.,.,.
P01,1,0,2,1,0,1
P01,2,0,0.5,1,1,1
P01,3,.,.,1,1,1
P01,4,.,0.5,1,0,1
"""
    data = read_quietly(amt_unit="cells", path=write(tmp_path, csv_text, sidecar))
    assert data.ids == ("P01",)
    np.testing.assert_allclose(data.dose_cells, [[1e8]])  # no EVID column: a record with AMT > 0 is a dose
    np.testing.assert_array_equal(data.obs_blq, [False, True, True, False])  # an explicit BLQ=0 is kept
    np.testing.assert_allclose(data.obs_value, np.exp([2, 0.5, np.nan, 0.5]))
    np.testing.assert_allclose(data.obs_lloq, [math.e] * 4)


def test_without_dvid_or_sidecar_the_observable_is_left_to_the_model(tmp_path):
    csv_text = "ID,TIME,EVID,AMT,DV\n1,0,1,1e8,.\n1,1,0,.,50\n1,2,0,.,70\n"
    data = read_quietly(amt_unit="cells", path=write(tmp_path, csv_text))
    assert data.obs_observable.tolist() == ["", ""]
    assert data.observables == {"": ObservableSpec("", "", "none", "log", None)}
    assert data.meta == {} and data.covariates == {}


def test_single_sidecar_mapping_applies_without_dvid_column(tmp_path):
    sidecar = '[dvid.1]\nobservable = "car_copies"\ntransform = "log10"\n'
    path = write(tmp_path, "ID,TIME,EVID,AMT,DV\n1,0,1,1e8,.\n1,1,0,.,2\n", sidecar)
    data = read_quietly(path, amt_unit="cells")
    assert data.obs_observable.tolist() == ["car_copies"]
    np.testing.assert_allclose(data.obs_value, [100.0])


def test_text_dvid_is_the_observable_name(tmp_path):
    csv_text = "ID,TIME,EVID,AMT,DV,DVID\n1,0,1,1e8,.,.\n1,1,0,.,50,car_copies\n1,1,0,.,3,cd7_cells\n"
    data = read_quietly(amt_unit="cells", path=write(tmp_path, csv_text))
    assert data.obs_observable.tolist() == ["car_copies", "cd7_cells"]
    assert set(data.observables) == {"car_copies", "cd7_cells"}


def test_explicit_sidecar_path(tmp_path):
    path = write(tmp_path, "ID,TIME,EVID,AMT,DV\n1,0,1,1e8,.\n1,1,0,.,2\n")
    other = tmp_path / "elsewhere.toml"
    other.write_text('[dvid.7]\nobservable = "car_copies"\ntransform = "log10"\n', encoding="utf-8")
    np.testing.assert_allclose(read_quietly(path, sidecar=other, amt_unit="cells").obs_value, [100.0])


def test_blank_lines_and_comments_keep_row_numbers(tmp_path):
    csv_text = "ID,TIME,EVID,AMT,DV\n1,0,1,1e8,.\n\n# a note\n1,1,0,.,50\n"
    np.testing.assert_array_equal(read_quietly(amt_unit="cells", path=write(tmp_path, csv_text)).obs_row, [5])


def test_commented_header_and_leading_comments(tmp_path):
    csv_text = "# simulated, seed 1\n#ID,TIME,EVID,AMT,DV\n1,0,1,1e8,.\n1,1,0,.,50\n"
    data = read_quietly(amt_unit="cells", path=write(tmp_path, csv_text))
    assert data.ids == (1,)
    np.testing.assert_array_equal(data.obs_row, [4])


def test_covariate_type_is_the_columns(tmp_path):
    csv_text = "ID,TIME,EVID,AMT,DV,SEX\n1,0,1,1e8,.,1\n1,1,0,.,50,.\n2,0,1,1e8,.,F\n2,1,0,.,50,.\n"
    data = read_quietly(amt_unit="cells", path=write(tmp_path, csv_text))
    assert data.covariates["SEX"].tolist() == ["1", "F"]


def test_dataset_error_pickles():
    err = DatasetError("d.csv", [Problem("d.csv", 3, 1, "DV", "DV is missing")])
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == str(err)


def snapshot(directory: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_files_are_never_modified(tmp_path):
    valid = write(tmp_path, CSV, SIDECAR, name="valid")
    invalid = write(tmp_path, CSV.replace("1,7,0,.,5,1", "1,7,2,.,5,1"), SIDECAR, name="invalid")
    before = snapshot(tmp_path)
    read_quietly(valid)
    with pytest.raises(DatasetError):
        read_dataset(invalid)
    assert snapshot(tmp_path) == before  # same bytes and times, and no new files


def test_subject_without_observations_warns(tmp_path):
    csv_text = "ID,TIME,EVID,AMT,DV\n1,0,1,1e8,.\n1,1,0,.,50\n3,0,1,1e8,.\n"
    with pytest.warns(DatasetWarning, match="ID 3 has no observations"):
        data = read_dataset(write(tmp_path, csv_text))
    assert data.ids == (1, 3)
    np.testing.assert_array_equal(data.n_doses, [1, 1])


def test_subject_without_doses_warns(tmp_path):
    csv_text = "ID,TIME,EVID,AMT,DV\n1,0,1,1e8,.\n1,1,0,.,50\n2,1,0,.,50\n"
    with pytest.warns(DatasetWarning, match="ID 2 has no dose"):
        data = read_dataset(write(tmp_path, csv_text))
    np.testing.assert_array_equal(data.n_doses, [1, 0])
    np.testing.assert_allclose(data.dose_times[1], [0.0])


# --- malformed datasets ------------------------------------------------------------------------------------------
# Each case: the CSV, its sidecar (or None), and the problem expected: row, ID, column, part of the message and the
# file it is reported against ("csv" or "toml").

HEAD = "ID,TIME,EVID,AMT,DV\n"
DOSE = "1,0,1,1e8,.\n"
SIDE_KG = '[dataset]\namt_unit = "cells/kg"\n'
SIDE_DVID = '[dvid.1]\nobservable = "car_copies"\n'

CORPUS = {
    "unsupported EVID": (HEAD + DOSE + "1,1,0,.,50\n1,2,2,.,.\n", None,
                         (4, 1, "EVID", "only EVID 0 (observation) and 1 (dose)")),
    "TIME unsorted": (HEAD + DOSE + "1,7,0,.,50\n1,3,0,.,60\n", None, (4, 1, "TIME", "TIME unsorted")),
    "per-kg dose without WT": ("ID,TIME,EVID,AMT,DV,WT\n1,0,1,1e6,.,70\n1,1,0,.,5,.\n2,0,1,1e6,.,.\n2,1,0,.,5,.\n",
                               SIDE_KG, (4, 2, "WT", "per-kg dose without weight")),
    "per-kg dose with WT 0": ("ID,TIME,EVID,AMT,DV,WT\n1,0,1,1e6,.,0\n1,1,0,.,5,.\n", SIDE_KG,
                              (2, 1, "WT", "WT is 0")),
    "per-kg dose, no WT column": (HEAD + DOSE + "1,1,0,.,50\n", SIDE_KG, (None, None, "WT", "no WT column")),
    "DV missing": (HEAD + DOSE + "1,1,0,.,50\n1,2,0,.,.\n", None, (4, 1, "DV", "DV is missing")),
    "DV <= 0 on a log scale": (HEAD + DOSE + "1,1,0,.,0\n", None, (3, 1, "DV", "scale = \"linear\"")),
    "DV as text <LLOQ": (HEAD + DOSE + "1,1,0,.,<20\n", None, (3, 1, "DV", "set BLQ=1")),
    "BLQ without LLOQ": ("ID,TIME,EVID,AMT,DV,BLQ\n1,0,1,1e8,.,.\n1,1,0,.,.,1\n", None,
                         (3, 1, "LLOQ", "BLQ without LLOQ")),
    "unknown DVID": ("ID,TIME,EVID,AMT,DV,DVID\n1,0,1,1e8,.,.\n1,1,0,.,50,1\n1,2,0,.,50,3\n", SIDE_DVID,
                     (4, 1, "DVID", '[dvid.3] observable = "..."')),
    "DVID missing": ("ID,TIME,EVID,AMT,DV,DVID\n1,0,1,1e8,.,.\n1,1,0,.,50,.\n", SIDE_DVID,
                     (3, 1, "DVID", "DVID is missing")),
    "duplicate observation": (HEAD + DOSE + "1,1,0,.,50\n1,1,0,.,60\n", None, (4, 1, "TIME", "as row 3")),
    "duplicate dose": (HEAD + DOSE + DOSE + "1,1,0,.,60\n", None, (3, 1, "TIME", "(row 2)")),
    "missing required column": ("ID,TIME,EVID,AMT\n1,0,1,1e8\n", None, (1, None, "DV", "no DV column")),
    "same column in two cases": ("ID,TIME,time,EVID,AMT,DV\n1,0,0,1,1e8,.\n", None, (1, None, "TIME", "appears twice")),
    "duplicated column": ("ID,TIME,DV,EVID,AMT,DV\n1,0,.,1,1e8,.\n", None, (1, None, "DV", "appears twice")),
    "unnamed column with values": (",ID,TIME,EVID,AMT,DV\n0,1,0,1,1e8,.\n", None,
                                   (1, None, None, "column 1 has no name")),
    "non-numeric TIME": (HEAD + DOSE + "1,day 3,0,.,50\n", None, (3, 1, "TIME", "'day 3' is not a number")),
    "non-finite DV": (HEAD + DOSE + "1,1,0,.,inf\n", None, (3, 1, "DV", "not a finite number")),
    "TIME missing": (HEAD + DOSE + "1,.,0,.,50\n", None, (3, 1, "TIME", "TIME is missing")),
    "AMT missing on dose": (HEAD + "1,0,1,.,.\n1,1,0,.,50\n", None, (2, 1, "AMT", "AMT is missing")),
    "negative AMT": (HEAD + "1,0,1,-1e6,.\n1,1,0,.,50\n", None, (2, 1, "AMT", "must be > 0")),
    "AMT on observation": (HEAD + DOSE + "1,1,0,5e6,50\n", None, (3, 1, "AMT", "on an observation record")),
    "RATE non-zero": ("ID,TIME,EVID,AMT,RATE,DV\n1,0,1,1e8,10,.\n1,1,0,.,.,50\n", None,
                      (2, 1, "RATE", "bolus doses")),
    "ADDL non-zero": ("ID,TIME,EVID,AMT,ADDL,II,DV\n1,0,1,1e8,2,7,.\n1,1,0,.,.,.,50\n", None,
                      (2, 1, "ADDL", "own dose record")),
    "BLQ flag 2": ("ID,TIME,EVID,AMT,DV,BLQ,LLOQ\n1,0,1,1e8,.,.,.\n1,1,0,.,5,2,20\n", None,
                   (3, 1, "BLQ", "BLQ 2 is not valid")),
    "MDV 5": ("ID,TIME,EVID,AMT,DV,MDV\n1,0,1,1e8,.,1\n1,1,0,.,50,5\n", None, (3, 1, "MDV", "MDV 5 is not valid")),
    "BLQ with DV above LLOQ": ("ID,TIME,EVID,AMT,DV,BLQ,LLOQ\n1,0,1,1e8,.,.,.\n1,1,0,.,50,1,20\n", None,
                               (3, 1, "DV", "above its LLOQ 20")),
    "LLOQ <= 0": ("ID,TIME,EVID,AMT,DV,LLOQ\n1,0,1,1e8,.,.\n1,1,0,.,50,0\n", None, (3, 1, "LLOQ", "must be > 0")),
    "missing ID": (HEAD + DOSE + ".,1,0,.,50\n1,2,0,.,50\n", None, (3, None, "ID", "ID is missing")),
    "ID not contiguous": (HEAD + DOSE + "1,1,0,.,50\n2,0,1,1e8,.\n2,1,0,.,50\n1,2,0,.,50\n", None,
                          (6, 1, "ID", "appears again")),
    "row too short": (HEAD + DOSE + "1,1,0\n", None, (3, 1, None, "3 fields but the header has 5")),
    "bad sidecar transform": (HEAD + DOSE + "1,1,0,.,2\n", SIDE_DVID + 'transform = "log2"\n',
                              (None, None, None, '[dvid.1] transform = "log2" is not valid', "toml")),
    "bad amt_unit": (HEAD + DOSE + "1,1,0,.,2\n", '[dataset]\namt_unit = "mg"\n',
                     (None, None, None, '[dataset] amt_unit = "mg"', "toml")),
    "time_unit in hours": (HEAD + DOSE + "1,1,0,.,2\n", '[dataset]\ntime_unit = "hour"\n',
                           (None, None, None, "TIME must be in days", "toml")),
    "sidecar lloq <= 0": (HEAD + DOSE + "1,1,0,.,2\n", SIDE_DVID + "lloq = -1\n",
                          (None, None, None, "[dvid.1] lloq = -1", "toml")),
    "sidecar without observable": (HEAD + DOSE + "1,1,0,.,2\n", '[dvid.1]\nunit = "cells/µL"\n',
                                   (None, None, None, "[dvid.1] needs observable", "toml")),
    "sidecar not TOML": (HEAD + DOSE + "1,1,0,.,2\n", "[dvid.1\n", (None, None, None, "not valid TOML", "toml")),
    "several DVIDs but no DVID column": (HEAD + DOSE + "1,1,0,.,2\n",
                                         SIDE_DVID + '[dvid.2]\nobservable = "cd7_cells"\n',
                                         (None, None, "DVID", "no DVID column")),
    "empty file": ("", None, (None, None, None, "the file is empty")),
    "header only": (HEAD, None, (None, None, None, "no records")),
}


@pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
def test_malformed_dataset_is_reported(tmp_path, case):
    csv_text, sidecar, (row, sid, column, fragment, *where) = CORPUS[case]
    path = write(tmp_path, csv_text, sidecar)
    reported = path.with_suffix(".toml") if where == ["toml"] else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        with pytest.raises(DatasetError) as caught:
            read_dataset(path)
    err = caught.value
    matching = [p for p in err.problems if fragment in p.message]
    assert matching, f"no problem mentions {fragment!r}:\n{err}"
    problem = matching[0]
    assert (problem.file, problem.row, problem.id, problem.column) == (str(reported), row, sid, column)
    text = str(err)
    assert text.startswith(f"{path}: {len(err.problems)} problem(s) in the dataset:\n")
    assert reported.name in text and fragment in text
    if row is not None:
        assert f"row {row}," in text or f"row {row}:" in text
    if sid is not None:
        assert f"ID {sid}" in text
    if column is not None:
        assert f"column {column}" in text
    assert isinstance(err, ValueError)


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 18


def test_problem_str_format():
    problem = Problem("data.csv", 7, 3, "DV", "DV is missing")
    assert str(problem) == "data.csv row 7, ID 3, column DV: DV is missing"
    assert str(Problem("data.csv", None, None, None, "the file is empty")) == "data.csv: the file is empty"


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda tmp: tmp / "absent.csv", "file not found"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: (tmp / "binary.csv").write_bytes(b"\xff\xfe\x00\x81ID") and tmp / "binary.csv", "not UTF-8"),
    ],
    ids=["missing", "directory", "binary"],
)
def test_unreadable_file_is_one_whole_file_problem(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    (problem,) = caught.value.problems
    assert problem.row is None and problem.file == str(path) and fragment in problem.message


def test_given_sidecar_that_does_not_exist(tmp_path):
    path = write(tmp_path, HEAD + DOSE + "1,1,0,.,50\n")
    with pytest.raises(DatasetError, match="sidecar file not found"):
        read_dataset(path, sidecar=tmp_path / "nope.toml")


def test_every_problem_is_reported_at_once(tmp_path):
    csv_text = """\
ID,TIME,EVID,AMT,DV,BLQ,LLOQ
1,0,1,1e8,.,.,.
1,1,3,.,50,.,.
1,1.5,0,.,50,.,.
1,2,0,.,.,.,.
2,0,1,-5,.,.,.
2,1,0,.,40,1,20
"""
    path = write(tmp_path, csv_text)
    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    err = caught.value
    found = [(p.row, p.id, p.column) for p in err.problems]
    assert found == [(3, 1, "EVID"), (5, 1, "DV"), (6, 2, "AMT"), (7, 2, "DV")]
    lines = str(err).splitlines()
    assert lines[0] == f"{path}: 4 problem(s) in the dataset:"
    assert [f"row {r}," in line for r, line in zip((3, 5, 6, 7), lines[1:])] == [True] * 4
