"""Trial protocols as TOML files: product, model, doses and schedule, population, sampling, design.

A protocol file is read into a :class:`Protocol`; ``population`` samples virtual
patients from its eligibility ranges; ``run_whatif`` and ``run_trial`` simulate it.
See ``examples/protocols/`` for the five seed protocols.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import xarray as xr

from carkin.errors import InputError
from carkin.strict import DOSE_PER_KG_RANGE, TIME_RANGE, UNIT_RANGES, interval_problem, range_problem, unknown_keys
from carkin.trials.designs import DESIGNS as ESCALATION_DESIGNS
from carkin.trials.designs import design_from_options
from carkin.trials.operating import MAX_TRIALS
from carkin.trials.toxicity import DLTModel, default_dlt_model
from carkin.trials.whatif import HoldRule, Schedule

WEIGHT_CV = 0.2  # log-SD of weight around the age-typical value
WEIGHT_BOUNDS = (10.0, 150.0)
SINGLE_ARM = "single-arm"  # one dose, no escalation: not a design of carkin.trials
SINGLE_ARM_KEYS = ("n_patients",)
KEYS = {  # every table a protocol may have and its keys; [model] takes the model's own options too
    "": ("protocol", "model", "dosing", "population", "sampling", "design", "toxicity", "evidence", "notes"),
    "protocol": ("id", "title", "product", "target", "indication", "setting"),
    "dosing": ("levels", "schedule", "fractions", "days", "hold_threshold", "compare_schedules"),
    "population": ("n_subjects", "age_years", "blast_percent", "cd7n0_cells_per_ul", "bcell_cells_per_ul",
                   "weight_kg"),
    "sampling": ("days", "bone_marrow_days", "endpoints"),
    "evidence": ("toxicity",),
}
COMMON_DESIGN_KEYS = ("name", "n_trials", "dlt_window_days")
# Plausible ranges (low, high, unit) for the numbers a protocol gives.
DOSE_RANGE = (*DOSE_PER_KG_RANGE, "cells/kg")
AGE_RANGE = (*UNIT_RANGES["year"], "years")
WEIGHT_RANGE = (*UNIT_RANGES["kg"], "kg")
BLAST_RANGE = (*UNIT_RANGES["%"], "%")
COUNT_RANGE = (*UNIT_RANGES["cells/µL"], "cells/µL")
DAY_RANGE = (*TIME_RANGE, "days after the first infusion")
MAX_SUBJECTS = 1_000_000  # per dose and schedule; larger populations belong to carkin.stream


class ProtocolError(InputError):
    """A protocol file that cannot be used, with the file and key named."""


@dataclass(frozen=True)
class ComparableArms:
    """Published arms (evidence rows on grade >= 3 CRS) comparable to one dose level and schedule."""

    dose_per_kg: float
    schedule: str
    rows: tuple
    note: str = ""
    known_failure: str = ""  # why the calibrated link does not reach these arms (the check stays, marked)

    def counts(self) -> list[tuple[float, float]]:
        """(events, n) of each row."""
        from carkin.qualification import evidence

        out = []
        for r in self.rows:
            row = evidence.row(r)
            out.append((row.events if math.isfinite(row.events) else round(row.value * row.n), row.n))
        return out

    def pooled(self) -> tuple[float, float]:
        """(events, n) over the rows."""
        counts = self.counts()
        return sum(e for e, _ in counts), sum(n for _, n in counts)

    def homogeneity(self) -> float:
        """Exact p-value that the rows share one event rate (1.0 for a single row): a small value says the
        arms disagree with each other, and their pooled interval averages over that disagreement."""
        from carkin.qualification.evidence import homogeneity_p_value

        counts = self.counts()
        return 1.0 if len(counts) < 2 else homogeneity_p_value(*zip(*counts))

    def interval(self) -> tuple[float, float]:
        from carkin.qualification.evidence import clopper_pearson

        return clopper_pearson(*self.pooled())


def typical_weight_kg(age_years):
    """Age-typical body weight: 2 x age + 8 kg up to 12 years (the paediatric life-support rule of
    thumb), rising linearly to 65 kg at 18, 70 kg for adults."""
    age = np.asarray(age_years, float)
    child = 2.0 * age + 8.0
    teen = 32.0 + (age - 12.0) * (65.0 - 32.0) / 6.0
    return np.where(age <= 12, child, np.where(age < 18, teen, 70.0))


@dataclass(frozen=True)
class Protocol:
    path: str
    id: str
    title: str
    product: str
    target: str
    indication: str
    setting: str
    model: str
    model_options: dict
    doses: tuple[float, ...]
    schedule: Schedule
    compare: tuple[Schedule, ...]  # schedules set side by side in what-if runs
    n_subjects: int
    age_years: tuple[float, float]
    ranges: dict  # covariate -> (low, high), sampled log-uniform
    weight_kg: tuple[float, float]
    sampling_days: tuple[float, ...]
    marrow_days: tuple[float, ...]
    endpoints: tuple[str, ...]
    design: dict
    dlt: DLTModel
    notes: dict = field(default_factory=dict)
    comparable: tuple = ()  # ComparableArms: published toxicity arms comparable to a dose and schedule

    def load_model(self):
        from carkin.model.library import load_model

        return load_model(self.model, **self.model_options)

    def population(self, n: int | None = None, seed: int = 0) -> dict:
        """Covariates of ``n`` virtual patients (default the protocol's n_subjects): age uniform over the
        eligible range, weight from age, other covariates log-uniform over their ranges."""
        n = n or self.n_subjects
        rng = np.random.default_rng(seed)
        age = rng.uniform(*self.age_years, n)
        weight = typical_weight_kg(age) * np.exp(WEIGHT_CV * rng.standard_normal(n))
        out = {"AGE": age, self.load_model().role("weight"): np.clip(weight, *self.weight_kg)}
        for name, (lo, hi) in self.ranges.items():
            out[name] = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
        return out


def _get(table: dict, key: str, path: str, kind, default=None, required=False):
    if key not in table:
        if required:
            raise ProtocolError(f"{path}: missing key {key!r}")
        return default
    value = table[key]
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if not ok:
        raise ProtocolError(f"{path}: {key} = {value!r} should be a {getattr(kind, '__name__', kind)}")
    return value


def _numbers(table, key, path, default=None, required=False, length=None):
    values = _get(table, key, path, list, default, required)
    if values is None:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ProtocolError(f"{path}: {key} must be a list of numbers, got {values!r}")
    if length is not None and len(values) != length:
        raise ProtocolError(f"{path}: {key} must have {length} numbers, got {values!r}")
    return tuple(float(v) for v in values)


def read_protocol(path) -> Protocol:
    """Read and check a protocol TOML file; every problem names the file and the key."""
    path = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProtocolError(f"no such protocol file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{path}: not valid TOML: {e}") from None
    sections = {k: raw.get(k, {}) for k in ("protocol", "model", "dosing", "population", "sampling", "design",
                                             "toxicity", "evidence")}
    for name in ("protocol", "model", "dosing", "population", "design"):
        if name not in raw:
            raise ProtocolError(f"{path}: missing table [{name}]")
    _check_keys(raw, path)
    p, m, d, pop, s, des = (sections[k] for k in ("protocol", "model", "dosing", "population", "sampling", "design"))
    model_name = _get(m, "name", f"{path} [model]", str, required=True)
    options = {k: v for k, v in m.items() if k != "name"}
    model = _check_model(model_name, options, path)
    where = f"{path} [dosing]"
    doses = _numbers(d, "levels", where, required=True)
    if not doses or any(x <= 0 for x in doses) or list(doses) != sorted(set(doses)):
        raise ProtocolError(f"{where}: levels must be increasing positive doses in cells/kg, got {list(doses)}")
    for x in doses:
        _in_range(f"{where}: levels", x, DOSE_RANGE, "doses are total cells per kg, e.g. 1e6")
    kind = _get(d, "schedule", where, str, "single")
    if kind not in ("single", "split"):
        raise ProtocolError(f"{where}: schedule must be \"single\" or \"split\", got {kind!r}")
    hold = _get(d, "hold_threshold", where, (int, float))
    if hold is not None:
        _in_range(f"{where}: hold_threshold", hold, (1e-300, 1e12, "copies/µg gDNA"), "a CAR level above 0")
    fractions = _numbers(d, "fractions", where, (0.1, 0.3, 0.6) if kind == "split" else (1.0,))
    days = _numbers(d, "days", where, (0.0, 1.0, 2.0) if kind == "split" else (0.0,))
    try:
        schedule = Schedule(kind if kind == "single" else "split " + "/".join(f"{100 * f:g}" for f in fractions),
                            fractions, days, HoldRule(float(hold)) if hold is not None else None)
    except ValueError as e:
        raise ProtocolError(f"{where}: {e}") from None
    compare = [schedule]
    other = Schedule("single") if kind == "split" else Schedule("split 10/30/60", (0.1, 0.3, 0.6), (0.0, 1.0, 2.0))
    if _get(d, "compare_schedules", where, bool, True):
        compare.append(other)
    where = f"{path} [population]"
    age = _numbers(pop, "age_years", where, required=True, length=2)
    _interval(where, "age_years", age, AGE_RANGE)
    ranges = {}
    for key, cov, bounds in (("blast_percent", "BLAST", BLAST_RANGE), ("cd7n0_cells_per_ul", "CD7N0", COUNT_RANGE),
                             ("bcell_cells_per_ul", "BCELL", COUNT_RANGE)):
        r = _numbers(pop, key, where, length=2)
        if r is not None:
            if not 0 < r[0] <= r[1]:
                raise ProtocolError(f"{where}: {key} must be [low, high] with 0 < low <= high, got {list(r)}")
            _interval(where, key, r, bounds)
            ranges[cov] = r
    weight = _numbers(pop, "weight_kg", where, WEIGHT_BOUNDS, length=2)
    _interval(where, "weight_kg", weight, WEIGHT_RANGE)
    n_subjects = _get(pop, "n_subjects", where, int, 200)
    _in_range(f"{where}: n_subjects", n_subjects, (1, MAX_SUBJECTS, "subjects"), "a whole number of patients")
    sampling_days = _numbers(s, "days", f"{path} [sampling]", (0.0, 7.0, 14.0, 28.0))
    marrow_days = _numbers(s, "bone_marrow_days", f"{path} [sampling]", ())
    for key, days_ in (("days", sampling_days), ("bone_marrow_days", marrow_days)):
        for x in days_:
            _in_range(f"{path} [sampling]: {key}", x, DAY_RANGE, "visit days")
    endpoints = _get(s, "endpoints", f"{path} [sampling]", list, [])
    design = dict(des)
    name = str(design.get("name", ""))
    if name not in design_keys():
        raise ProtocolError(f"{path} [design]: name must be one of {', '.join(design_keys())}, got {name!r}")
    tox = sections["toxicity"]
    dlt = DLTModel(offset=default_dlt_model(model).offset)
    known = {f for f in DLTModel.__dataclass_fields__}
    bad = sorted(set(tox) - known)
    if bad:
        raise ProtocolError(f"{path} [toxicity]: unknown key(s) {bad}; known: {sorted(known)}")
    try:
        dlt = replace(dlt, **tox).for_model(model)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{path} [toxicity]: {e}") from None
    observables = [o.name for o in model.observables]
    if dlt.peak_observable not in observables:
        raise ProtocolError(f"{path} [toxicity]: peak_observable = {dlt.peak_observable!r} is not an observable of "
                            f"model {model_name!r}; its observables are {observables}")
    covariates = [c.name for c in model.covariates]
    if "burden_covariate" in tox and dlt.burden_covariate not in covariates:
        raise ProtocolError(f"{path} [toxicity]: burden_covariate = {dlt.burden_covariate!r} is not a covariate of "
                            f"model {model_name!r}; its covariates are {covariates}")
    comparable = _comparable(sections["evidence"], path)
    protocol = Protocol(
        path=path, id=str(p.get("id", Path(path).stem)), title=str(p.get("title", "")),
        product=str(p.get("product", "")), target=str(p.get("target", "")), indication=str(p.get("indication", "")),
        setting=str(p.get("setting", "")), model=model_name, model_options=options, doses=doses,
        schedule=schedule, compare=tuple(compare), n_subjects=n_subjects,
        age_years=age, ranges=ranges, weight_kg=weight, sampling_days=sampling_days, marrow_days=marrow_days,
        endpoints=tuple(str(e) for e in endpoints), design=design, dlt=dlt, notes=dict(raw.get("notes", {})),
        comparable=comparable,
    )
    design_of(protocol)  # every design value checked now, before anything is simulated
    return protocol


def _check_keys(raw: dict, path: str) -> None:
    """Refuse unknown tables and keys (a misspelt key would otherwise run another protocol without a word)."""
    problems = unknown_keys(raw, KEYS[""], f"{path} (top level)")
    for table, keys in KEYS.items():
        if table and isinstance(raw.get(table), dict):
            problems += unknown_keys(raw[table], keys, f"{path} [{table}]")
    design = raw.get("design")
    by_design = design_keys()
    if isinstance(design, dict) and isinstance(design.get("name"), str) and design["name"] in by_design:
        problems += unknown_keys(design, COMMON_DESIGN_KEYS + by_design[design["name"]],
                                 f"{path} [design] (name = \"{design['name']}\")")
    for name in ("protocol", "model", "dosing", "population", "sampling", "design", "toxicity", "evidence", "notes"):
        if name in raw and not isinstance(raw[name], dict):
            problems.append(f"{path}: {name} must be a table [{name}], got {raw[name]!r}")
    if problems:
        raise ProtocolError("\n".join(problems))


def _check_model(name: str, options: dict, path: str):
    """The model exists and takes these options (checked when the file is read, not after a simulation)."""
    from carkin.model.library import load_model

    try:
        return load_model(name, **options)
    except TypeError as e:
        raise ProtocolError(f"{path} [model]: model {name!r} does not take these options {sorted(options)} "
                            f"({e}); remove or correct them") from None
    except ValueError as e:
        raise ProtocolError(f"{path} [model]: {e}") from None


def _in_range(where: str, value, bounds: tuple[float, float, str], why: str = "") -> None:
    message = range_problem(where, value, *bounds, why)
    if message:
        raise ProtocolError(message)


def _interval(where: str, key: str, pair, bounds) -> None:
    message = interval_problem(f"{where}: {key}", pair, *bounds)
    if message:
        raise ProtocolError(message)


def _comparable(table: dict, path: str) -> tuple:
    """[[evidence.toxicity]] entries: dose, schedule, rows (evidence row ids), note."""
    from carkin.qualification import evidence

    out = []
    entries = table.get("toxicity", [])
    if not isinstance(entries, list):
        raise ProtocolError(f"{path} [evidence]: toxicity must be a list of [[evidence.toxicity]] tables, "
                            f"got {entries!r}")
    for i, entry in enumerate(entries):
        where = f"{path} [[evidence.toxicity]] entry {i + 1}"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where}: must be a table with dose, schedule and rows")
        dose = _get(entry, "dose", where, (int, float), required=True)
        sched = _get(entry, "schedule", where, str, required=True)
        rows = _get(entry, "rows", where, list, required=True)
        for r in rows:
            try:
                evidence.row(str(r))
            except evidence.EvidenceError as e:
                raise ProtocolError(f"{where}: {e}") from None
        unknown = sorted(set(entry) - {"dose", "schedule", "rows", "note", "known_failure"})
        if unknown:
            raise ProtocolError(f"{where}: unknown key(s) {unknown}; known: dose, schedule, rows, note, known_failure")
        out.append(ComparableArms(float(dose), sched, tuple(str(r) for r in rows), str(entry.get("note", "")),
                                  str(entry.get("known_failure", ""))))
    return tuple(out)


def comparable_check(protocol: Protocol, whatif: xr.Dataset) -> list[dict]:
    """For every dose and schedule with comparable published arms: the what-if population's P(DLT)
    (mean over draws where there are draws) against the pooled arms' 95% binomial interval, with each
    arm's own interval and the exact test of whether the arms agree with each other."""
    from carkin.qualification.evidence import clopper_pearson

    out = []
    for c in protocol.comparable:
        cell = whatif["p_dlt"].sel(dose=c.dose_per_kg)
        names = [str(s) for s in whatif["schedule"].values]
        match = [s for s in names if s == c.schedule or (c.schedule == "split" and s.startswith("split"))]
        if not match:
            raise ProtocolError(f"{protocol.path}: no what-if schedule {c.schedule!r} (schedules: {names})")
        p = cell.sel(schedule=match[0])
        per_draw = p.mean("subject").values
        lo, hi = c.interval()
        events, n = c.pooled()
        p_dlt = float(np.mean(per_draw))
        arms = []
        for row, (e, m) in zip(c.rows, c.counts()):
            a_lo, a_hi = clopper_pearson(e, m)
            arms.append({"row": row, "events": e, "n": m, "interval_low": a_lo, "interval_high": a_hi,
                         "inside": bool(a_lo <= p_dlt <= a_hi)})
        out.append({"dose_per_kg": c.dose_per_kg, "schedule": match[0], "p_dlt": p_dlt,
                    "p_dlt_p05": float(np.percentile(per_draw, 5)), "p_dlt_p95": float(np.percentile(per_draw, 95)),
                    "published_events": events, "published_n": n, "interval_low": lo, "interval_high": hi,
                    "passed": bool(lo <= p_dlt <= hi), "rows": list(c.rows), "arms": arms,
                    "homogeneity_p": c.homogeneity(), "note": c.note, "known_failure": c.known_failure})
    return out


HETEROGENEITY_ALPHA = 0.05  # below this, comparable arms are reported as disagreeing with each other


def arms_agreement(check: dict) -> str:
    """One line on a comparable check with several arms: whether they agree with each other (exact test),
    and which arms' own intervals miss carkin's P(DLT); empty for a single arm."""
    if len(check["arms"]) < 2:
        return ""
    p = check["homogeneity_p"]
    agree = ("the arms agree" if p >= HETEROGENEITY_ALPHA else
             "the arms DISAGREE with each other, so the pooled interval averages over that disagreement")
    missed = [f"{a['row']} {int(a['events'])}/{int(a['n'])} ({100 * a['interval_low']:.1f}-"
              f"{100 * a['interval_high']:.1f}%)" for a in check["arms"] if not a["inside"]]
    where = f"outside its own arm's interval: {', '.join(missed)}" if missed else "inside every arm's own interval"
    return f"exact test of one common rate p = {p:.2g} ({agree}); {where}"


def _visits(ds: xr.Dataset, variable: str, days) -> xr.DataArray:
    return ds[variable].sel(time=list(days))


def simulate_protocol(protocol: Protocol, schedules=None, n_subjects=None, seed=0, posterior=None,
                      n_draws: int = 20, calibration: bool = False) -> xr.Dataset:
    """The what-if grid of a protocol: its doses x schedules for its population, with the values at
    the protocol's sampling visits (blood) and bone-marrow visits added. With ``posterior`` (a fit of
    the protocol's model) parameters come from ``n_draws`` posterior draws, each with its own subjects;
    with ``calibration=True`` from ``n_draws`` calibration draws (carkin.uncertainty), each with the same
    virtual patients and its own DLT link."""
    from carkin.trials.whatif import whatif

    model = protocol.load_model()
    n = n_subjects or protocol.n_subjects
    copies = n_draws if (posterior is not None or calibration) else 1  # draws share the sampled covariates
    covs = protocol.population(n, seed)
    covs = {k: np.tile(v, copies) for k, v in covs.items() if k in {c.name for c in model.covariates}}
    visits = tuple(protocol.sampling_days) + tuple(protocol.marrow_days)
    horizon = max(90.0, *visits)
    return whatif(model, protocol.doses, schedules or protocol.compare, n_subjects=n, covariates=covs,
                  times=f"0:{horizon:g}:1", seed=seed, dlt_model=protocol.dlt, posterior=posterior, n_draws=n_draws,
                  visit_days=protocol.sampling_days, marrow_days=protocol.marrow_days, calibration=calibration)


def design_keys() -> dict[str, tuple[str, ...]]:
    """Every design a protocol may name (the registered escalation designs and single-arm) and its keys."""
    keys = {name: tuple(o.name for o in cls.options) for name, cls in ESCALATION_DESIGNS.items()}
    return {**keys, SINGLE_ARM: SINGLE_ARM_KEYS}


DESIGN_KEYS = design_keys()  # the built-in designs' keys (design_keys() also sees designs registered later)


def design_of(protocol: Protocol):
    """The escalation design object named in the protocol's [design] table (None: single-arm)."""
    d, where = protocol.design, f"{protocol.path} [design]"
    n_trials = _get(d, "n_trials", where, int, 1000)
    _in_range(f"{where}: n_trials", n_trials, (1, MAX_TRIALS, "trials"), "a whole number of simulated trials")
    _get(d, "dlt_window_days", where, (int, float))
    if d["name"] == SINGLE_ARM:
        _counted(d, "n_patients", where, 20, 1, 100_000)
        return None
    options: dict[str, object] = {}
    for o in ESCALATION_DESIGNS[d["name"]].options:  # each read with its declared type and range
        if o.kind == "int":
            options[o.name] = _counted(d, o.name, where, o.default, *o.bounds(len(protocol.doses)))
        elif o.kind == "float":
            value = _get(d, o.name, where, (int, float), o.default)
            options[o.name] = None if value is None else float(value)
        elif o.kind == "floats":
            options[o.name] = _numbers(d, o.name, where, required=o.required)
        else:
            options[o.name] = _get(d, o.name, where, str, o.default)
    try:
        return design_from_options(d["name"], options)
    except (TypeError, ValueError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"{where}: {e}") from None


def _counted(d: dict, key: str, where: str, default, low: int, high: int) -> int:
    value = _get(d, key, where, int, default)
    _in_range(f"{where}: {key}", value, (low, high, ""), "a whole number")
    return value


def _single_arm(pool: np.ndarray, n_patients: int, n_trials: int, rng) -> dict:
    """A one-dose study: DLT counts over simulated trials of n_patients drawn from the pool."""
    p = pool[rng.integers(pool.size, size=(n_trials, n_patients))]
    dlts = (rng.random(p.shape) < p).sum(axis=1)
    return {"design": "single-arm", "method": "monte-carlo", "n_trials": n_trials, "n_patients": n_patients,
            "expected_dlt": float(dlts.mean()), "se_expected_dlt": float(dlts.std(ddof=1) / math.sqrt(n_trials)),
            "p_any_dlt": float((dlts >= 1).mean()), "p_dlt_rate_above_one_third": float((dlts > n_patients / 3).mean()),
            "p_dlt_population": float(pool.mean())}


def run_protocol_trial(protocol: Protocol, n_trials: int | None = None, n_subjects: int | None = None,
                       seed: int = 0, calibration_draws: int = 0) -> tuple[xr.Dataset, dict]:
    """Simulate a protocol's trial end to end.

    Each dose level's virtual patients are simulated with the kinetic model (the protocol's
    schedule); their DLT probabilities from the toxicity link form the pool each enrolled
    patient is drawn from. The design then runs ``n_trials`` times for its operating
    characteristics, and once more as an example trial whose patients keep their kinetics,
    visit values and DLT outcome. With ``calibration_draws`` = D > 0 the population and the
    link come from D calibration draws (carkin.uncertainty): every simulated trial lives in one
    draw (n_trials / D trials per draw), the operating characteristics are averaged over draws,
    and each selection probability and each dose's population P(DLT) get their 5th-95th
    percentiles over draws (which include the Monte Carlo error of the per-draw trials).
    Returns (Dataset of the example trial's patients and the per-dose populations, operating
    characteristics as a JSON-ready dict).
    """
    from carkin.trials.operating import run_trial

    n_trials = int(n_trials or protocol.design.get("n_trials", 1000))
    if n_trials < 1:
        raise ProtocolError(f"n_trials must be >= 1, got {n_trials}")
    draws = int(calibration_draws)
    pop = simulate_protocol(protocol, schedules=(protocol.schedule,), n_subjects=n_subjects, seed=seed,
                            calibration=draws > 0, n_draws=max(draws, 1))
    pop = pop.isel(schedule=0, drop=True)
    p = pop["p_dlt"].where(~pop["failed"].astype(bool))
    pools = np.where(np.isfinite(p.values), p.values, np.nanmean(p.values, axis=-1, keepdims=True))
    if draws == 0:
        pools = pools[:, None, :]  # (dose, draw, subject) with one draw
    rng = np.random.default_rng(seed)
    design = design_of(protocol)
    per_draw = -(-n_trials // pools.shape[1])
    results = [_operating(design, protocol, pools[:, d, :], per_draw, rng) for d in range(pools.shape[1])]
    oc = _merge(results) if draws > 0 else results[0]
    example = pools[:, 0, :]
    if design is None:
        n_patients = int(protocol.design.get("n_patients", 20))
        idx = rng.integers(example.shape[1], size=n_patients)
        enrolled = [(0, int(i), bool(rng.random() < example[0, i])) for i in idx]
    else:
        path = run_trial(design, pools=example, rng=rng)
        enrolled = [(c.dose, s, bool(d)) for c in path.cohorts for s, d in zip(c.subjects, c.subject_dlt)]
        oc["example_trial_selected_dose"] = None if path.selected < 0 else float(protocol.doses[path.selected])
        oc["example_trial_mtd_not_reached"] = path.mtd_not_reached
    mean_p = np.nanmean(pools, axis=-1)  # (dose, draw)
    oc["p_dlt_per_dose"] = [float(v) for v in mean_p.mean(axis=1)]
    if draws > 0:
        oc["p_dlt_per_dose_p05"] = [float(v) for v in np.percentile(mean_p, 5, axis=1)]
        oc["p_dlt_per_dose_p95"] = [float(v) for v in np.percentile(mean_p, 95, axis=1)]
        oc["calibration_draws"] = draws
    oc.update(protocol=protocol.id, doses_per_kg=list(protocol.doses), schedule=protocol.schedule.name,
              dlt_model=protocol.dlt.describe())
    ds = _patients(pop.isel(draw=0, drop=True) if "draw" in pop.dims else pop, enrolled)
    ds.attrs.update(protocol=protocol.id, title=protocol.title, design=str(oc["design"]),
                    operating_characteristics=json.dumps(oc))
    return ds, oc


def _operating(design, protocol: Protocol, pools: np.ndarray, n_trials: int, rng) -> dict:
    """Operating characteristics of one pool table (dose, subject)."""
    from carkin.trials.operating import simulate_trials

    if design is None:
        return _single_arm(pools[0], int(protocol.design.get("n_patients", 20)), n_trials, rng)
    return simulate_trials(design, pools=pools, n_trials=n_trials, seed=rng).to_dict()


def _merge(results: list[dict]) -> dict:
    """Operating characteristics over calibration draws: means, and 5th-95th percentiles over draws."""
    out = dict(results[0])
    out["n_trials"] = sum(int(r.get("n_trials") or 0) for r in results)
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("se_") \
                and key != "n_trials" and all(r.get(key) is not None for r in results):
            v = np.array([r[key] for r in results], float)
            out[key] = float(v.mean())
            out[f"{key}_p05"], out[f"{key}_p95"] = float(np.percentile(v, 5)), float(np.percentile(v, 95))
        elif isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value) \
                and not key.startswith("se_"):
            v = np.array([r[key] for r in results], float)
            out[key] = [float(x) for x in v.mean(axis=0)]
            out[f"{key}_p05"] = [float(x) for x in np.percentile(v, 5, axis=0)]
            out[f"{key}_p95"] = [float(x) for x in np.percentile(v, 95, axis=0)]
    for key in [k for k in out if k.startswith("se_")]:
        del out[key]  # per-draw Monte Carlo errors do not combine into one meaningful number here
    return out


def _patients(pop: xr.Dataset, enrolled) -> xr.Dataset:
    """The example trial's patients (in enrolment order) with their endpoints, next to the per-dose
    virtual populations they were drawn from."""
    dose_i = np.array([e[0] for e in enrolled], int)
    subj = np.array([e[1] for e in enrolled], int)
    data: dict[str, tuple] = {
        "patient_dose": ("patient", pop["dose"].values[dose_i], {"units": "cells/kg", "long_name": "dose level"}),
        "patient_dlt": ("patient", np.array([e[2] for e in enrolled]), {"units": "1", "long_name": "DLT observed"}),
        "patient_pool_index": ("patient", subj, {"units": "1", "long_name": "virtual subject in the dose pool"}),
    }
    for name, var in pop.data_vars.items():
        if var.dims[:2] == ("dose", "subject"):
            picked = var.values[dose_i, subj]
            data[f"patient_{name}"] = (("patient",) + var.dims[2:], picked, dict(var.attrs))
        elif var.dims == ("subject",) and not name.startswith("param_"):  # type: ignore[attr-defined]  # names are str
            data[f"patient_{name}"] = ("patient", var.values[subj], dict(var.attrs))
    for name in ("cmax", "tmax", "auc_0_28", "p_dlt", "nadir", "mrd_negative"):
        if name in pop:
            data[f"population_{name}"] = (("dose", "subject"), pop[name].values, dict(pop[name].attrs))
    coords: dict[str, xr.DataArray | np.ndarray] = {
        k: pop.coords[k] for k in ("dose", "visit", "marrow_visit") if k in pop.coords}
    coords["patient"] = np.arange(1, len(enrolled) + 1)
    return xr.Dataset(data, coords=coords)
