"""Reading NONMEM-style CAR-T datasets: a CSV of dose and observation records plus an optional TOML sidecar.

The CSV has one record per row: ID, TIME in days and DV, with EVID 1 for a dose
(AMT) and EVID 0 for an observation. NONMEM's data items are recognised in any
letter case (``id``, ``Time``); other upper-case columns are subject covariates
(WT, AGE, PRODUCT, ...), one baseline value per subject (a covariate that changes
within a subject is refused); other columns are ignored. A ``C`` column drops the
records it flags, as NONMEM's IGNORE=C does. Missing values are empty, ``.`` or ``NA``.
The sidecar (``<stem>.toml`` beside the CSV) says what each DVID measures, how
DV is written (as is, log10 or ln), the default LLOQ and the dose unit.

Every problem in a dataset is collected and reported at once, each with its row
as a spreadsheet numbers it (header = row 1), the subject and the column, so a
dataset can be fixed in one pass. The files are only ever read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from carkin.errors import InputError
from carkin.strict import DOSE_PER_KG_RANGE, TIME_RANGE, TOTAL_CELLS_RANGE, UNIT_RANGES, unknown_keys

MISSING = frozenset({"", ".", "NA"})  # an empty cell, NONMEM's dot or R's NA
REQUIRED = ("ID", "TIME", "DV")
DATA_ITEMS = ("EVID", "AMT", "CMT", "MDV", "DVID", "BLQ", "LLOQ", "RATE")
UNSUPPORTED_DOSING = ("ADDL", "II", "SS")  # implied repeated doses: refused rather than silently dropped
# CMT is read as text: carkin's models take doses into their own dose state, so a number or a
# compartment name (as NONMEM's $MODEL COMP names it) are both accepted and not used.
NUMERIC = ("TIME", "DV", "AMT", "EVID", "MDV", "BLQ", "LLOQ", "WT", "RATE", *UNSUPPORTED_DOSING)
KNOWN = (*REQUIRED, *DATA_ITEMS, *UNSUPPORTED_DOSING, "WT", "C")
SIDECAR_KEYS = {  # table -> its keys; [covariates] names columns, [generation] is free-form provenance
    "": ("dataset", "dvid", "covariates", "generation"),
    "dataset": ("description", "amt_unit", "time_unit"),
    "dvid": ("observable", "unit", "transform", "scale", "lloq"),
}
# Plausible ranges (low, high, unit): values outside are refused as typing or unit errors.
AMT_RANGES = {"cells": (*TOTAL_CELLS_RANGE, "cells"), "cells/kg": (*DOSE_PER_KG_RANGE, "cells/kg")}

TRANSFORMS = ("none", "log10", "ln")
SCALES = ("log", "linear")
AMT_UNITS = ("cells", "cells/kg")
TIME_UNITS = ("day", "days")
BLQ_TOLERANCE = 1e-6  # DV and LLOQ rounded on a log scale may differ by this much at the limit

_FLAG_VALUES = {"EVID": (0.0, 1.0), "MDV": (0.0, 1.0), "BLQ": (0.0, 1.0)}
_FLAG_MESSAGES = {
    "EVID": "EVID {} is not supported: only EVID 0 (observation) and 1 (dose) are; "
    "remove the record or recode it as an observation or a dose",
    "MDV": "MDV {} is not valid: MDV is 0 (DV is an observation) or 1 (no observation on this record)",
    "BLQ": "BLQ {} is not valid: BLQ is 1 (below the limit of quantification) or 0 (quantified)",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, where it is and how to fix it."""

    file: str
    row: int | None  # spreadsheet row: header = 1, first record = 2; None for the whole file
    id: object | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [self.file if self.row is None else f"{self.file} row {self.row}"]
        if self.id is not None:
            where.append(f"ID {self.id}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{', '.join(where)}: {self.message}"


class DatasetError(InputError):
    """Every problem found in a dataset, one per line."""

    def __init__(self, path, problems):
        self.path = os.fspath(path)
        # whole-file problems first, then in row order, so the message reads like the file
        self.problems = tuple(sorted(problems, key=lambda p: (p.row is not None, p.row or 0)))
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s) in the dataset:\n{lines}")

    def __reduce__(self):
        return type(self), (self.path, self.problems)


class DatasetWarning(UserWarning):
    """Something in a dataset that is allowed but probably not intended."""


@dataclass(frozen=True)
class ObservableSpec:
    """What a DVID measures and how its DV is written."""

    name: str
    unit: str
    transform: str  # how DV is written: "none" | "log10" | "ln"
    scale: str  # "log": values must be > 0 unless BLQ | "linear"
    lloq: float | None  # default LLOQ in natural units


UNNAMED = ObservableSpec("", "", "none", "log", None)  # no DVID, no sidecar: the model's first observable


@dataclass(frozen=True, eq=False)
class StudyData:
    """A dataset's doses, observations and covariates as arrays, subjects in order of first appearance."""

    path: str
    ids: tuple
    dose_times: np.ndarray
    dose_cells: np.ndarray
    n_doses: np.ndarray
    obs_subject: np.ndarray
    obs_time: np.ndarray
    obs_observable: np.ndarray
    obs_value: np.ndarray
    obs_blq: np.ndarray
    obs_lloq: np.ndarray
    obs_row: np.ndarray
    covariates: dict
    observables: dict
    amt_unit: str
    meta: dict

    def __post_init__(self):
        # own read-only copies: the dataclass is frozen, its arrays should be too
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                object.__setattr__(self, f.name, _read_only(value))
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "covariates", {k: _read_only(v) for k, v in self.covariates.items()})

    @property
    def n_subjects(self) -> int:
        return len(self.ids)

    @property
    def n_obs(self) -> int:
        return len(self.obs_time)

    def observations(self) -> pd.DataFrame:
        """Observations in long format: ID, TIME, observable, value, BLQ, LLOQ, row."""
        return pd.DataFrame(
            {
                "ID": [self.ids[i] for i in self.obs_subject],
                "TIME": self.obs_time,
                "observable": self.obs_observable,
                "value": self.obs_value,
                "BLQ": self.obs_blq,
                "LLOQ": self.obs_lloq,
                "row": self.obs_row,
            }
        )

    def subset(self, ids) -> StudyData:
        """The same data for the subjects ``ids`` (kept in the dataset's order)."""
        wanted = [ids] if isinstance(ids, str | int | np.integer) else list(ids)
        index = {sid: i for i, sid in enumerate(self.ids)}
        unknown = [sid for sid in wanted if sid not in index]
        if unknown:
            raise InputError(f"{self.path}: no subject with ID {', '.join(map(str, unknown))}; IDs are {self.ids}")
        keep = np.array(sorted({index[sid] for sid in wanted}), dtype=int)
        new_index = np.full(self.n_subjects, -1)
        new_index[keep] = np.arange(len(keep))
        in_subset = np.isin(self.obs_subject, keep)
        n_doses = self.n_doses[keep]
        width = max(1, int(n_doses.max(initial=0)))
        observed = set(self.obs_observable[in_subset].tolist())
        return dataclasses.replace(
            self,
            ids=tuple(self.ids[i] for i in keep),
            dose_times=self.dose_times[keep, :width],
            dose_cells=self.dose_cells[keep, :width],
            n_doses=n_doses,
            obs_subject=new_index[self.obs_subject[in_subset]],
            obs_time=self.obs_time[in_subset],
            obs_observable=self.obs_observable[in_subset],
            obs_value=self.obs_value[in_subset],
            obs_blq=self.obs_blq[in_subset],
            obs_lloq=self.obs_lloq[in_subset],
            obs_row=self.obs_row[in_subset],
            covariates={name: values[keep] for name, values in self.covariates.items()},
            observables={name: spec for name, spec in self.observables.items() if name in observed},
        )


def _read_only(array) -> np.ndarray:
    array = np.array(array)
    array.flags.writeable = False
    return array


# --- internal records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    amt_unit: str | None  # None: the sidecar does not say
    specs: dict  # DVID key as written in the sidecar (normalised) -> ObservableSpec
    covariate_units: dict  # column -> unit, from the sidecar's [covariates]


@dataclass(frozen=True)
class _Row:
    row: int
    id: object
    text: dict  # column -> cell text (stripped)
    num: dict  # numeric column -> float; absent when missing, unreadable or the column is absent
    bad: frozenset  # columns with a value already reported as a problem


@dataclass(frozen=True)
class _Obs:
    row: int
    id: object
    time: float | None
    spec: ObservableSpec
    value: float
    blq: bool
    lloq: float


# --- reading the files -------------------------------------------------------------------------------------------


def read_dataset(path, sidecar=None, *, amt_unit: str | None = None) -> StudyData:
    """Read a NONMEM-style CSV (and its TOML sidecar) into arrays, or raise DatasetError listing every problem.

    ``sidecar`` defaults to ``<stem>.toml`` beside the CSV when that file exists. ``amt_unit``
    ("cells" or "cells/kg") states the dose unit for a file whose sidecar does not.
    Warns (DatasetWarning) about subjects without observations or without doses.
    """
    file = os.fspath(path)
    records, unreadable = _read_records(file)
    if unreadable:
        raise DatasetError(file, [Problem(file, None, None, None, unreadable)])
    meta, side_file, problems = _load_sidecar(file, sidecar)
    settings, found = _settings(meta, side_file)
    problems += found
    if amt_unit is not None:
        if amt_unit not in AMT_UNITS or settings.amt_unit not in (None, amt_unit):
            raise InputError(f"amt_unit={amt_unit!r}: give \"cells\" or \"cells/kg\", and only for a file whose "
                             f"sidecar does not state it (it says {settings.amt_unit!r})")
        settings = dataclasses.replace(settings, amt_unit=amt_unit)

    content = [(n, cells) for n, cells in records if any(cells)]  # blank lines still count as rows
    if not content:
        message = "the file is empty; it needs a header row (ID,TIME,DV,...) and one row per dose or observation"
        raise DatasetError(file, [*problems, Problem(file, None, None, None, message)])
    header_row, names, data = _split_header(content)
    names = [_canonical(name) for name in names]
    problems += _header_problems(file, header_row, names, data)
    if not data:
        problems.append(Problem(file, None, None, None, "the file has a header but no records; add one row per dose "
                                "or observation"))
    columns = _columns(names)
    default_spec = _default_spec(settings.specs)
    if "DVID" not in columns and default_spec is None:
        keys = ", ".join(settings.specs)
        problems.append(Problem(file, None, None, "DVID", f"the sidecar maps {len(settings.specs)} DVIDs ({keys}) "
                                "but the file has no DVID column; add DVID saying what each observation measures"))
    if problems:  # later checks would depend on the columns and on the sidecar's settings
        raise DatasetError(file, problems)

    data, excluded = _drop_commented(names, columns, data)
    rows, problems = _parse_rows(file, names, columns, data)
    dose_rows, observations = [], []
    for r in rows:
        kind = _kind(r)
        if kind == "dose":
            problems += _dose_problems(file, r, settings.amt_unit or "cells or cells/kg")
            dose_rows.append(r)
        elif kind == "obs":
            obs, found = _observation(file, r, settings.specs, default_spec if "DVID" not in columns else None)
            problems += found
            if obs is not None:
                observations.append(obs)
        problems += _amt_on_observation(file, r)
    problems += _order_problems(file, rows)
    problems += _duplicate_problems(file, dose_rows, observations)
    covariate_names = [c for c in columns if c.isupper() and c not in KNOWN or c == "WT"]
    settings, found = _infer_amt_unit(file, side_file, settings, dose_rows, "WT" in columns)
    problems += found
    problems += _range_problems(file, rows, dose_rows, covariate_names, settings)
    problems += _time_varying_problems(file, rows, covariate_names)
    subjects = tuple(dict.fromkeys(r.id for r in rows))
    weights = _first_values(rows, "WT")
    cells, found = _dose_cells(file, dose_rows, weights, "WT" in columns, settings.amt_unit)
    problems += found
    if problems:
        raise DatasetError(file, problems)

    _warn_about_subjects(file, subjects, dose_rows, observations)
    if excluded:
        warnings.warn(f"{file}: {excluded} record(s) flagged in column C were left out (NONMEM's IGNORE=C)",
                      DatasetWarning, stacklevel=2)
    return _assemble(
        file, subjects, dose_rows, cells, observations,
        {name: _covariate(rows, name, subjects) for name in covariate_names}, settings.amt_unit or "cells", meta,
    )


def _read_records(file: str) -> tuple[list, str | None]:
    """The CSV's records as (spreadsheet row, stripped cells), or the reason it cannot be read."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets often write a BOM
            return [(n, [cell.strip() for cell in cells]) for n, cells in enumerate(csv.reader(f), start=1)], None
    except FileNotFoundError:
        return [], "file not found; check the path"
    except IsADirectoryError:
        return [], "is a directory, not a CSV file"
    except PermissionError:
        return [], "cannot be read (permission denied)"
    except UnicodeDecodeError:
        return [], "is not UTF-8 text; save it as CSV (UTF-8) (a spreadsheet file must be exported as CSV first)"
    except csv.Error as e:
        return [], f"is not a readable CSV ({e}); save it as comma-separated text"


def _load_sidecar(file: str, sidecar) -> tuple[dict, str, list[Problem]]:
    """The parsed sidecar ({} when there is none), its path and any problem reading it."""
    if sidecar is None:
        candidate = Path(file).with_suffix(".toml")
        if not candidate.is_file():
            return {}, "", []
        side_file = str(candidate)
    else:
        side_file = os.fspath(sidecar)
    try:
        with open(side_file, "rb") as f:
            return tomllib.load(f), side_file, []
    except FileNotFoundError:
        message = "sidecar file not found; check the path, or leave sidecar out to use the defaults"
    except IsADirectoryError:
        message = "sidecar is a directory, not a TOML file"
    except PermissionError:
        message = "sidecar cannot be read (permission denied)"
    except UnicodeDecodeError:
        message = "sidecar is not UTF-8 text; save it as UTF-8"
    except tomllib.TOMLDecodeError as e:
        message = f"sidecar is not valid TOML ({e}); fix the syntax"
    return {}, side_file, [Problem(side_file, None, None, None, message)]


def _settings(meta: dict, side_file: str) -> tuple[_Settings, list[Problem]]:
    """The sidecar's dose unit and DVID mapping; invalid values are problems naming the key."""
    messages = unknown_keys(meta, SIDECAR_KEYS[""], "the sidecar's top level")
    dataset = _table(meta, "dataset", "[dataset]", messages)
    messages += unknown_keys(dataset, SIDECAR_KEYS["dataset"], "[dataset]")
    amt_unit = dataset.get("amt_unit")
    if amt_unit is not None and amt_unit not in AMT_UNITS:
        messages.append(f"[dataset] amt_unit = {_show(amt_unit)} is not valid; use \"cells\" (total cells infused) "
                        "or \"cells/kg\" (per kg of the subject's WT)")
        amt_unit = "cells"
    time_unit = dataset.get("time_unit", "day")
    if time_unit not in TIME_UNITS:
        messages.append(f"[dataset] time_unit = {_show(time_unit)} is not supported: TIME must be in days; "
                        "convert TIME to days and set time_unit = \"day\"")
    specs = {}
    for key, table in _table(meta, "dvid", "[dvid.<DVID>] tables", messages).items():
        spec, found = _observable_spec(key, table)
        messages += found
        if spec is not None:
            specs[_dvid_key(key)] = spec
    messages += _conflicting_specs(specs)
    units = {}
    for name, unit in _table(meta, "covariates", "[covariates]", messages).items():
        if not isinstance(unit, str):
            messages.append(f"[covariates] {name} = {_show(unit)} is not valid; give the unit as text, e.g. "
                            f"{name} = \"kg\"")
        else:
            units[name.upper()] = unit
    return _Settings(amt_unit, specs, units), [Problem(side_file, None, None, None, m) for m in messages]


def _table(meta: dict, key: str, what: str, messages: list) -> dict:
    value = meta.get(key, {})
    if isinstance(value, dict):
        return value
    messages.append(f"{key} = {_show(value)} is not valid; {what} must be a TOML table")
    return {}


def _observable_spec(key: str, table) -> tuple[ObservableSpec | None, list[str]]:
    where = f"[dvid.{key}]"
    if not isinstance(table, dict):
        return None, [f"dvid.{key} = {_show(table)} is not valid; write a table {where} with observable = \"...\""]
    messages = unknown_keys(table, SIDECAR_KEYS["dvid"], where)
    name = table.get("observable")
    if not isinstance(name, str) or not name.strip():
        messages.append(f"{where} needs observable = \"<model observable>\", e.g. observable = \"car_copies\"")
    unit = table.get("unit", "")
    if not isinstance(unit, str):
        messages.append(f"{where} unit = {_show(unit)} is not valid; give the unit as text, e.g. unit = \"cells/µL\"")
    transform = table.get("transform", "none")
    if transform not in TRANSFORMS:
        messages.append(f"{where} transform = {_show(transform)} is not valid; use \"none\" (DV as measured), "
                        "\"log10\" (DV = log10 of the value) or \"ln\" (DV = natural log of the value)")
    scale = table.get("scale", "log")
    if scale not in SCALES:
        messages.append(f"{where} scale = {_show(scale)} is not valid; use \"log\" (values > 0) or \"linear\"")
    lloq = table.get("lloq")
    if lloq is not None and not (_is_real(lloq) and math.isfinite(lloq) and lloq > 0):
        messages.append(f"{where} lloq = {_show(lloq)} is not valid; give the limit of quantification as a number "
                        "> 0 in natural units (not log), or leave it out")
    if messages:
        return None, messages
    assert isinstance(name, str)  # else a message was added above
    return ObservableSpec(name.strip(), unit, transform, scale, None if lloq is None else float(lloq)), []


def _conflicting_specs(specs: dict) -> list[str]:
    """Two DVIDs may name one observable only if they describe it alike: the dataset keeps one spec per name."""
    first: dict[str, tuple] = {}
    messages: list[str] = []
    for key, spec in specs.items():
        other = first.setdefault(spec.name, (key, spec))
        if other[1] != spec:
            messages.append(f"[dvid.{other[0]}] and [dvid.{key}] both map to observable \"{spec.name}\" but differ "
                            "in unit, transform, scale or lloq; make them agree, or map them to different observables")
    return messages


def _default_spec(specs: dict) -> ObservableSpec | None:
    """The observable of every observation when the file has no DVID column; None when that is ambiguous."""
    if len(specs) > 1:
        return None
    return next(iter(specs.values()), UNNAMED)


def _show(value) -> str:
    """A sidecar value as TOML would write it, for messages."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- the header --------------------------------------------------------------------------------------------------


def _split_header(content: list) -> tuple[int, list[str], list]:
    """The header (the first record that is not a comment) and the records after it, comments left out.

    NONMEM files often comment out their header ("#ID,TIME,...") so NONMEM skips it: that is still the header."""
    comment = lambda cells: cells[0].startswith("#")
    start = next((i for i, (_, cells) in enumerate(content) if not comment(cells) or _commented_header(cells)), 0)
    header_row, names = content[start]
    if _commented_header(names):
        names = [names[0].lstrip("#").strip(), *names[1:]]
    return header_row, names, [(n, cells) for n, cells in content[start + 1 :] if not comment(cells)]


def _commented_header(cells: list[str]) -> bool:
    return cells[0].startswith("#") and cells[0].lstrip("#").strip() in KNOWN


def _canonical(name: str) -> str:
    """NONMEM reads data items in any letter case: ``time`` is TIME. Other names keep their case."""
    return name.upper() if name.upper() in KNOWN else name


def _drop_commented(names: list[str], columns: dict, data: list) -> tuple[list, int]:
    """The records not flagged in a C column (any value but empty, '.', NA or 0 flags), and how many were."""
    if "C" not in columns:
        return data, 0
    at = columns["C"]
    keep = [(n, cells) for n, cells in data if at >= len(cells) or cells[at] in MISSING or cells[at] == "0"]
    return keep, len(data) - len(keep)


def _columns(names: list[str]) -> dict[str, int]:
    """Column name -> field index (first of duplicates; unnamed columns left out)."""
    columns: dict[str, int] = {}
    for i, name in enumerate(names):
        if name:
            columns.setdefault(name, i)
    return columns


def _header_problems(file: str, header_row: int, names: list[str], data: list) -> list[Problem]:
    problems = []
    problem = lambda column, message: problems.append(Problem(file, header_row, None, column, message))
    seen = set()
    for i, name in enumerate(names):
        if name and name in seen:
            problem(name, f"column {name} appears twice in the header; remove or rename one")
        seen.add(name)
        if not name:
            used = next((n for n, cells in data if i < len(cells) and cells[i]), None)
            if used is not None:  # an empty trailing column is harmless; one holding values is not
                problem(None, f"column {i + 1} has no name but holds values (e.g. row {used}); name it in the "
                        "header or remove it (a saved table index?)")
    lowered = {n.upper() for n in names if n}
    for name in REQUIRED:
        if name not in names and name not in lowered:
            hint = ""
            if len(names) == 1 and any(sep in names[0] for sep in (";", "\t", " ")):
                hint = " (the header is one field: the file seems not to be comma-separated; save it as CSV)"
            problem(name, f"the header has no {name} column; a dataset needs ID, TIME (days) and DV{hint}")
    return problems


# --- the records -------------------------------------------------------------------------------------------------


def _parse_rows(file: str, names: list[str], columns: dict, data: list) -> tuple[list[_Row], list[Problem]]:
    """Each record's cells by column, its subject and its numeric values; unreadable values are problems."""
    problems, raw = [], []
    width, at = len(names), columns["ID"]
    id_texts = [cells[at] for _, cells in data if at < len(cells) and cells[at] not in MISSING]
    integer_ids = all(_is_integer(text) for text in id_texts)
    subject = lambda text: None if text in MISSING else int(float(text)) if integer_ids else text
    for n, cells in data:
        if len(cells) < width or any(cells[width:]):
            problems.append(Problem(file, n, subject(cells[at] if at < len(cells) else ""), None, f"the row has "
                                    f"{len(cells)} fields but the header has {width}; give every row one field per "
                                    "column"))
            continue
        raw.append((n, {name: cells[i] for name, i in columns.items()}))
    rows = []
    for n, cells in raw:
        if cells["ID"] in MISSING:
            problems.append(Problem(file, n, None, "ID", "ID is missing; give the subject's ID on every record"))
            continue
        row, found = _parse_row(file, n, subject(cells["ID"]), cells)
        rows.append(row)
        problems += found
    return rows, problems


def _parse_row(file: str, n: int, sid, cells: dict) -> tuple[_Row, list[Problem]]:
    num, bad, problems = {}, set(), []
    for column in NUMERIC:
        if column not in cells:
            continue
        text = cells[column]
        try:
            value = _number(text)
        except ValueError as e:
            problems.append(Problem(file, n, sid, column, _not_a_number(column, text, str(e))))
            bad.add(column)
            continue
        if value is not None and value not in _FLAG_VALUES.get(column, (value,)):
            problems.append(Problem(file, n, sid, column, _FLAG_MESSAGES[column].format(text)))
            bad.add(column)
            continue
        if value is not None:
            num[column] = value
    return _Row(n, sid, cells, num, frozenset(bad)), problems


def _number(text: str) -> float | None:
    """The cell's number, None when missing; ValueError when it is text or not finite."""
    if text in MISSING:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError("is not a number") from None
    if not math.isfinite(value):
        raise InputError("is not a finite number")
    return value


def _not_a_number(column: str, text: str, why: str) -> str:
    hint = "write a number, or leave the cell empty (or '.') when the value is missing"
    if column == "DV" and text.startswith("<"):
        hint = "for a value below the limit of quantification set BLQ=1 and give its LLOQ, leaving DV empty"
    return f"{column} {text!r} {why}; {hint}"


def _is_integer(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


def _kind(r: _Row) -> str | None:
    """'dose', 'obs' or 'skip' (no observation); None when the deciding values were already reported."""
    if {"EVID", "MDV"} & r.bad:
        return None
    evid = r.num.get("EVID")
    if evid is None:  # no EVID: NONMEM's convention, an amount makes a dose
        if "AMT" in r.bad:
            return None
        evid = 0.0 if r.num.get("AMT", 0.0) == 0.0 else 1.0
    if evid == 1.0:
        return "dose"
    return "skip" if r.num.get("MDV") == 1.0 else "obs"


def _infer_amt_unit(file: str, side_file: str, settings: _Settings, dose_rows: list[_Row], has_wt: bool):
    """The dose unit when the sidecar does not state it: total cells when AMT cannot be per kg (no WT
    column: warned; an amount above any per-kg dose: certain), otherwise a problem, as the two readings
    of one file differ by the subject's weight."""
    if settings.amt_unit is not None or not dose_rows:
        return settings, []
    amounts = [r.num["AMT"] for r in dose_rows if "AMT" in r.num]
    if any(a > AMT_RANGES["cells/kg"][1] for a in amounts):
        return dataclasses.replace(settings, amt_unit="cells"), []
    if not has_wt:
        warnings.warn(f"{side_file or file}: amt_unit not stated; AMT taken as total cells, as the file has no WT "
                      "column for per-kg doses; set amt_unit = \"cells\" (or \"cells/kg\" and add WT) in the "
                      "sidecar's [dataset] table", DatasetWarning, stacklevel=3)
        return dataclasses.replace(settings, amt_unit="cells"), []
    return settings, [Problem(side_file or file, None, None, "AMT", "the dose unit is not stated and AMT could be "
                              "total cells or cells/kg (a factor of the subject's weight apart); set amt_unit = "
                              "\"cells\" or amt_unit = \"cells/kg\" in the sidecar's [dataset] table")]


def _dose_problems(file: str, r: _Row, amt_unit: str) -> list[Problem]:
    problems = []
    problem = lambda column, message: problems.append(Problem(file, r.row, r.id, column, message))
    amt = r.num.get("AMT")
    if "AMT" not in r.bad and amt is None:
        problem("AMT", f"AMT is missing on a dose record (EVID 1); give the infused amount in {amt_unit}")
    elif amt is not None and amt <= 0:
        problem("AMT", f"AMT {r.text['AMT']} on a dose record must be > 0; give the infused amount in {amt_unit}")
    if r.num.get("RATE", 0.0) != 0.0:
        problem("RATE", f"RATE {r.text['RATE']} on a dose record: CAR cell infusions are bolus doses; set RATE to 0 "
                "or remove the column")
    for column in UNSUPPORTED_DOSING:
        if r.num.get(column, 0.0) != 0.0:
            problem(column, f"{column} {r.text[column]} is not supported: write each infusion as its own dose record "
                    f"(EVID 1) and set {column} to 0 or remove the column")
    return problems


def _amt_on_observation(file: str, r: _Row) -> list[Problem]:
    """An amount on an explicit EVID 0 record is either a mislabelled dose or a stray value."""
    if r.num.get("EVID") == 0.0 and r.num.get("AMT", 0.0) != 0.0:
        return [Problem(file, r.row, r.id, "AMT", f"AMT {r.text['AMT']} on an observation record (EVID 0); set "
                        "EVID 1 if it is a dose, or clear AMT")]
    return []


def _observation(file: str, r: _Row, specs: dict, default_spec) -> tuple[_Obs | None, list[Problem]]:
    """One observation in natural units, with its BLQ flag and LLOQ; None when it has problems."""
    problems = []
    problem = lambda column, message: problems.append(Problem(file, r.row, r.id, column, message))
    spec = default_spec
    if spec is None:
        spec, message = _resolve_dvid(r.text["DVID"], specs)
        if message:
            problem("DVID", message)
    if spec is None or {"DV", "LLOQ", "BLQ"} & r.bad:
        return None, problems

    dv = r.num.get("DV")
    lloq, lloq_text = spec.lloq, None
    if "LLOQ" in r.num:
        lloq_text = r.text["LLOQ"]
        if spec.transform == "none" and r.num["LLOQ"] <= 0:
            problem("LLOQ", f"LLOQ {lloq_text} must be > 0: it is the lower limit of quantification, written on "
                    "the same scale as DV")
            return None, problems
        lloq = _natural(r.num["LLOQ"], spec.transform)
    value = math.nan if dv is None else _natural(dv, spec.transform)
    if not math.isfinite(value) and dv is not None:
        problem("DV", f"DV {r.text['DV']} is too large for a {spec.transform} value; check the sidecar's transform")
        return None, problems

    if "BLQ" in r.num:
        blq = r.num["BLQ"] == 1.0
    else:  # no flag: censored when there is a limit and the value is missing or below it
        blq = lloq is not None and (dv is None or value < lloq)
    if blq and lloq is None:
        problem("LLOQ", f"BLQ without LLOQ: the record is flagged below the limit of quantification but has no LLOQ; "
                f"add an LLOQ column (same scale as DV) or set lloq in the sidecar's table for {_label(spec)}")
    elif blq and dv is not None and value > lloq * (1 + BLQ_TOLERANCE):
        limit = lloq_text if lloq_text is not None else f"{lloq:g} (sidecar)"
        problem("DV", f"the record is flagged BLQ but DV {r.text['DV']} is above its LLOQ {limit}; correct DV or "
                "LLOQ, or set BLQ=0")
    elif not blq and dv is None:
        problem("DV", "DV is missing on an observation record (EVID 0, MDV 0); give the measured value, or flag "
                "it BLQ=1 with an LLOQ")
    elif not blq and spec.scale == "log" and spec.transform == "none" and dv is not None and dv <= 0:
        problem("DV", f"DV {r.text['DV']} is not > 0 but {_label(spec)} is on a log scale; flag the record BLQ=1 "
                "with an LLOQ, or declare scale = \"linear\" for it in the sidecar")
    if problems:
        return None, problems
    time = r.num.get("TIME")
    return _Obs(r.row, r.id, time, spec, value, blq, math.nan if lloq is None else lloq), []


def _resolve_dvid(text: str, specs: dict) -> tuple[ObservableSpec | None, str]:
    """The observable a DVID stands for: a sidecar key, else an observable's name; a bare name is taken as is."""
    if text in MISSING:
        return None, "DVID is missing on an observation record; give the DVID of what was measured"
    key = _dvid_key(text)
    if key in specs:
        return specs[key], ""
    named = next((spec for spec in specs.values() if spec.name == key), None)
    if named is not None:
        return named, ""
    try:
        float(key)
    except ValueError:
        return ObservableSpec(key, "", "none", "log", None), ""
    return None, f"unknown DVID {key}; map it in the sidecar [dvid.{key}] observable = \"...\""


def _dvid_key(text: str) -> str:
    """DVIDs 1, 1.0 and 01 are one key, as TOML table names are text."""
    try:
        value = float(text)
    except ValueError:
        return text.strip()
    return str(int(value)) if value.is_integer() else text.strip()


def _natural(x: float, transform: str) -> float:
    try:
        if transform == "log10":
            return 10.0**x
        if transform == "ln":
            return math.exp(x)
    except OverflowError:
        return math.inf
    return x


def _label(spec: ObservableSpec) -> str:
    return f"observable {spec.name}" if spec.name else "the observable"


# --- subjects ----------------------------------------------------------------------------------------------------


def _order_problems(file: str, rows: list[_Row]) -> list[Problem]:
    """Each subject's records together, each with a TIME, in time order."""
    problems: list[Problem] = []
    last_row: dict[object, int] = {}
    previous: dict[object, _Row] = {}
    prev_id = object()
    for r in rows:
        if r.id != prev_id and r.id in last_row:
            problems.append(Problem(file, r.row, r.id, "ID", f"ID {r.id} appears again after other subjects' records "
                                    f"(its earlier records end at row {last_row[r.id]}); keep each subject's records "
                                    "together, sorted by TIME"))
        prev_id, last_row[r.id] = r.id, r.row
        if "TIME" in r.bad:
            continue
        if "TIME" not in r.num:
            problems.append(Problem(file, r.row, r.id, "TIME", "TIME is missing; give the record's time in days"))
            continue
        if r.id in previous and r.num["TIME"] < previous[r.id].num["TIME"]:
            before = previous[r.id]
            problems.append(Problem(file, r.row, r.id, "TIME", f"TIME unsorted: TIME {r.text['TIME']} is earlier "
                                    f"than TIME {before.text['TIME']} at row {before.row}; sort each subject's records "
                                    "by TIME"))
        previous[r.id] = r
    return problems


def _duplicate_problems(file: str, dose_rows: list[_Row], observations: list[_Obs]) -> list[Problem]:
    problems: list[Problem] = []
    first: dict[tuple, int] = {}
    for r in dose_rows:
        if "TIME" in r.num:
            key: tuple = ("dose", r.id, r.num["TIME"])
            if key in first:
                problems.append(Problem(file, r.row, r.id, "TIME", f"duplicate dose: ID {r.id} already has a dose at "
                                        f"TIME {r.text['TIME']} (row {first[key]}); give one dose record per "
                                        "infusion, with the total amount"))
            first.setdefault(key, r.row)
    for o in observations:
        if o.time is not None:
            key = ("obs", o.id, o.time, o.spec.name)
            if key in first:
                problems.append(Problem(file, o.row, o.id, "TIME", f"duplicate observation: same ID, TIME and DVID as "
                                        f"row {first[key]}; remove one, or correct its TIME or DVID"))
            first.setdefault(key, o.row)
    return problems


def _range_problems(file: str, rows: list[_Row], dose_rows: list[_Row], covariates: list[str],
                    settings: _Settings) -> list[Problem]:
    """Values outside their plausible range (see TIME_RANGE, AMT_RANGES, UNIT_RANGES): unit or typing errors."""
    problems = []
    (lo, hi), unit = TIME_RANGE, "day"
    for r in rows:
        t = r.num.get("TIME")
        if t is not None and not lo <= t <= hi:
            problems.append(Problem(file, r.row, r.id, "TIME", f"TIME {r.text['TIME']} is outside the plausible range "
                                    f"[{lo:g}, {hi:g}] {unit}; TIME is in days after the first dose"))
    if settings.amt_unit is not None:
        lo, hi, unit = AMT_RANGES[settings.amt_unit]
        for r in dose_rows:
            amt = r.num.get("AMT")
            if amt is not None and amt > 0 and not lo <= amt <= hi:
                problems.append(Problem(file, r.row, r.id, "AMT", f"AMT {r.text['AMT']} is outside the plausible "
                                        f"range [{lo:g}, {hi:g}] {unit} (amt_unit = \"{settings.amt_unit}\"); check "
                                        "the dose and the sidecar's amt_unit"))
    units = {"WT": "kg", **settings.covariate_units}
    for name in covariates:
        bounds = UNIT_RANGES.get(units.get(name, ""))
        if bounds is None:
            continue
        lo, hi = bounds
        for r in rows:
            value = _number_or_none(r.text.get(name))
            if value is not None and not lo <= value <= hi:
                problems.append(Problem(file, r.row, r.id, name, f"{name} {r.text[name]} is outside the plausible "
                                        f"range [{lo:g}, {hi:g}] {units[name]}; check the value and its unit"))
    return problems


def _time_varying_problems(file: str, rows: list[_Row], covariates: list[str]) -> list[Problem]:
    """Covariates are one baseline value per subject: a value that changes within a subject is refused
    rather than silently replaced by the first one."""
    problems = []
    for name in covariates:
        first = {}
        for r in rows:
            text = r.text.get(name, "")
            if text in MISSING:
                continue
            value = _number_or_none(text)
            key = value if value is not None else text
            if r.id not in first:
                first[r.id] = (key, text, r.row)
            elif first[r.id][0] != key:
                problems.append(Problem(file, r.row, r.id, name, f"{name} changes within the subject ({first[r.id][1]} "
                                        f"at row {first[r.id][2]}, {text} here): time-varying covariates are not "
                                        "supported; give the baseline value on every record (or only the first)"))
                first[r.id] = (key, text, r.row)
    return problems


def _first_values(rows: list[_Row], column: str) -> dict:
    """Each subject's first non-missing text in ``column``."""
    first: dict[object, str] = {}
    for r in rows:
        text = r.text.get(column, "")
        if text not in MISSING:
            first.setdefault(r.id, text)
    return first


def _dose_cells(file: str, dose_rows: list[_Row], weights: dict, has_wt: bool, amt_unit: str):
    """Total cells per dose record: AMT, or AMT times the weight (the record's WT, else the subject's first)."""
    amounts = [r.num.get("AMT", 0.0) for r in dose_rows]
    if amt_unit != "cells/kg" or not dose_rows:
        return amounts, []
    if not has_wt:
        return amounts, [Problem(file, None, None, "WT", "per-kg dose without weight: amt_unit is \"cells/kg\" but "
                                 "the file has no WT column; add WT in kg, or give AMT in total cells with "
                                 "amt_unit = \"cells\" in the sidecar")]
    problems, cells = [], []
    for r, amt in zip(dose_rows, amounts):
        text = r.text["WT"] if "WT" in r.num else weights.get(r.id)
        weight = _number_or_none(text)
        if "WT" in r.bad or (text is not None and weight is None):  # unreadable: reported already
            cells.append(amt)
        elif weight is None or weight <= 0:
            got = "" if text is None else f" (WT is {text})"
            problems.append(Problem(file, r.row, r.id, "WT", f"per-kg dose without weight: AMT is in cells/kg but "
                                    f"ID {r.id} has no WT > 0{got}; add WT in kg, or give AMT in total cells with "
                                    "amt_unit = \"cells\" in the sidecar"))
            cells.append(amt)
        else:
            cells.append(amt * weight)
    return cells, problems


def _number_or_none(text):
    try:
        return None if text is None else _number(text)
    except ValueError:
        return None


def _covariate(rows: list[_Row], column: str, subjects: tuple) -> np.ndarray:
    """Each subject's first value: floats (NaN when never given) if the column is numeric, else text."""
    first = _first_values(rows, column)
    given = [r.text[column] for r in rows if r.text[column] not in MISSING]
    if all(_number_or_none(text) is not None for text in given):  # the column's type, not only the first values
        return np.array([float(first[sid]) if sid in first else math.nan for sid in subjects])
    return np.array([first.get(sid, "") for sid in subjects], dtype=object)


def _warn_about_subjects(file: str, subjects: tuple, dose_rows: list[_Row], observations: list[_Obs]) -> None:
    observed = {o.id for o in observations}
    dosed = {r.id for r in dose_rows}
    unobserved = [sid for sid in subjects if sid not in observed]
    if unobserved:
        warnings.warn(f"{file}: {_ids(unobserved)} no observations; kept, but there is nothing to fit for them",
                      DatasetWarning, stacklevel=3)
    undosed = [sid for sid in subjects if sid not in dosed]
    if undosed:
        warnings.warn(f"{file}: {_ids(undosed)} no dose record (EVID 1); their CAR cells stay at the model's "
                      "initial state", DatasetWarning, stacklevel=3)


def _ids(ids: list) -> str:
    return f"ID {ids[0]} has" if len(ids) == 1 else f"IDs {', '.join(map(str, ids))} have"


def _assemble(file, subjects, dose_rows, cells, observations, covariates, amt_unit, meta) -> StudyData:
    index = {sid: i for i, sid in enumerate(subjects)}
    doses: list[list[tuple]] = [[] for _ in subjects]
    for r, c in zip(dose_rows, cells):
        doses[index[r.id]].append((r.num["TIME"], c))
    n_doses = np.array([len(d) for d in doses], dtype=int)
    width = max(1, int(n_doses.max(initial=0)))
    dose_times = np.zeros((len(subjects), width))
    dose_cells = np.zeros((len(subjects), width))
    for i, d in enumerate(doses):
        if d:  # padding repeats the last dose time with no cells: an empty segment for the solver
            dose_times[i] = [t for t, _ in d] + [d[-1][0]] * (width - len(d))
            dose_cells[i, : len(d)] = [c for _, c in d]
    return StudyData(
        path=file,
        ids=subjects,
        dose_times=dose_times,
        dose_cells=dose_cells,
        n_doses=n_doses,
        obs_subject=np.array([index[o.id] for o in observations], dtype=int),
        obs_time=np.array([o.time for o in observations], dtype=float),
        obs_observable=np.array([o.spec.name for o in observations], dtype=str),
        obs_value=np.array([o.value for o in observations], dtype=float),
        obs_blq=np.array([o.blq for o in observations], dtype=bool),
        obs_lloq=np.array([o.lloq for o in observations], dtype=float),
        obs_row=np.array([o.row for o in observations], dtype=int),
        covariates=covariates,
        observables={o.spec.name: o.spec for o in observations},
        amt_unit=amt_unit,
        meta=meta,
    )
