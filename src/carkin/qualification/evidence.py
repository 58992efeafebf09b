"""Published evidence: the tables in ``data/evidence/`` and what each reported value allows.

One CSV per kind (kinetics, response, toxicity, normal cells; physiology holds reference facts
such as blood volume per kg), one row per trial arm (or dose level, or subgroup) and quantity,
every row with its source (DOI, or the label document) and where in it the value stands. The
columns are described in ``data/evidence/README.md``.

``tolerance`` turns a row into the interval a simulated value must fall in to agree with it,
by one rule per kind of statistic (stated in TOLERANCE_RULES); the calibration's aggregate-data
likelihood uses the same distributions, so "agrees" means the same thing in both places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import pandas as pd
from scipy import stats

from carkin.errors import InputError

KINDS = ("kinetics", "response", "toxicity", "normal_cells")
COLUMNS = (
    "row_id", "kind", "product", "target", "cell_type", "product_type", "disease", "population", "age_years",
    "setting", "n", "subgroup", "dose_per_kg", "dose_text", "schedule", "burden_text", "blast_pct",
    "blast_pct_low", "blast_pct_high", "quantity", "statistic", "value", "unit", "dispersion_kind",
    "dispersion_low", "dispersion_high", "events", "timepoint_day", "grading_scale", "source", "doi",
    "location", "seen_at", "evidence_note",
)
STATISTICS = ("geometric_mean", "median", "mean", "proportion", "km_estimate", "typical_value", "lower_bound",
              "max", "other")
DISPERSIONS = ("cv_percent", "range", "iqr", "sd", "sd_log", "ci95", "none")
LEVEL = 0.95
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))  # 1.96
MEDIAN_SE_FACTOR = math.sqrt(math.pi / 2)  # SE(median) = 1.2533 sd / sqrt(n) for a normal sample

TOLERANCE_RULES = {
    "proportion": "events/n: the 95% Clopper-Pearson interval of the reported proportion",
    "km_estimate": "Kaplan-Meier estimate: its reported 95% CI, else the 95% Clopper-Pearson interval at n",
    "geometric_mean": "GM with CV% and n: exp(log GM +/- 1.96 s/sqrt(n)), s = sqrt(log(1 + CV^2)); the CV% itself "
                      "by the chi-square interval of s^2 with n - 1 degrees of freedom",
    "median": "median with a range and n: +/- 1.96 x 1.2533 sd / sqrt(n), sd from the range by Hozo et al. 2005 "
              "(range/4 for n <= 70, range/6 above); on the log scale for levels, on the day scale for times",
    "typical_value": "a population model's typical value (the median subject) with its between-subject log-SD "
                     "omega and n: exp(log value +/- 1.96 x 1.2533 omega / sqrt(n))",
    "lower_bound": "'at least' a value: the simulated median must reach it",
}


class EvidenceError(InputError):
    """An evidence table or row that cannot be used, named with its file and row."""


@dataclass(frozen=True)
class Interval:
    """Where a simulated value agrees with a reported one; ``scale`` 'log' for multiplicative rules."""

    low: float
    high: float
    rule: str
    scale: str = "linear"

    def contains(self, x: float) -> bool:
        return bool(np.isfinite(x) and self.low <= x <= self.high)

    def describe(self, fmt=lambda v: f"{v:.3g}") -> str:
        return f"{fmt(self.low)} to {fmt(self.high)}"


def _table_path(kind: str):
    return resources.files("carkin.evidence_tables").joinpath(f"{kind}.csv")


@cache
def table(kind: str) -> pd.DataFrame:
    """One evidence table, checked: known columns, unique row ids, numbers where numbers belong."""
    if kind not in KINDS + ("physiology",):
        raise EvidenceError(f"unknown evidence table {kind!r}; tables are {', '.join(KINDS + ('physiology',))}")
    path = _table_path(kind)
    df = pd.read_csv(path, dtype={"age_years": str, "product_type": str})
    if kind == "physiology":
        return df
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise EvidenceError(f"{path}: missing column(s) {missing}")
    dup = df["row_id"][df["row_id"].duplicated()]
    if len(dup):
        raise EvidenceError(f"{path}: row_id {dup.iloc[0]!r} appears more than once")
    for i, r in df.iterrows():
        where = f"{path} row {i + 2} ({r['row_id']})"
        if r["statistic"] not in STATISTICS:
            raise EvidenceError(f"{where}: statistic {r['statistic']!r} is not one of {', '.join(STATISTICS)}")
        if r["dispersion_kind"] not in DISPERSIONS:
            raise EvidenceError(f"{where}: dispersion_kind {r['dispersion_kind']!r} is not one of "
                                f"{', '.join(DISPERSIONS)}")
        if not isinstance(r["source"], str) or not r["source"].strip():
            raise EvidenceError(f"{where}: every row needs its source")
    return df


@dataclass(frozen=True)
class Row:
    """One reported value with its design and dispersion (a row of an evidence table)."""

    row_id: str
    kind: str
    quantity: str
    statistic: str
    value: float
    unit: str
    n: float
    events: float
    subgroup: str
    dispersion_kind: str
    dispersion_low: float
    dispersion_high: float
    dose_per_kg: float
    schedule: str
    timepoint_day: float
    blast_pct: float
    blast_pct_low: float
    blast_pct_high: float
    age_years: str
    product: str
    source: str
    doi: str
    location: str
    grading_scale: str

    @property
    def citation(self) -> str:
        doi = f", doi:{self.doi}" if isinstance(self.doi, str) and self.doi else ""
        return f"{self.source}{doi}, {self.location}"


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def row(row_id: str) -> Row:
    """The evidence row called ``row_id``, from whichever table holds it."""
    for kind in KINDS:
        df = table(kind)
        hit = df[df["row_id"] == row_id]
        if len(hit):
            r = hit.iloc[0]
            return Row(
                row_id=row_id, kind=kind, quantity=str(r["quantity"]), statistic=str(r["statistic"]),
                value=_num(r["value"]), unit=str(r["unit"]), n=_num(r["n"]), events=_num(r["events"]),
                subgroup=str(r["subgroup"]), dispersion_kind=str(r["dispersion_kind"]),
                dispersion_low=_num(r["dispersion_low"]), dispersion_high=_num(r["dispersion_high"]),
                dose_per_kg=_num(r["dose_per_kg"]), schedule=str(r["schedule"]),
                timepoint_day=_num(r["timepoint_day"]), blast_pct=_num(r["blast_pct"]),
                blast_pct_low=_num(r["blast_pct_low"]), blast_pct_high=_num(r["blast_pct_high"]),
                age_years=str(r["age_years"]) if isinstance(r["age_years"], str) else "",
                product=str(r["product"]), source=str(r["source"]), doi=r["doi"] if isinstance(r["doi"], str) else "",
                location=str(r["location"]),
                grading_scale=r["grading_scale"] if isinstance(r["grading_scale"], str) else "",
            )
    raise EvidenceError(f"no evidence row {row_id!r} in data/evidence/ ({', '.join(KINDS)})")


def age_range(r: Row) -> tuple[float, float] | None:
    """The arm's age range in years from a row's ``age_years`` ('3-25'), or None."""
    if not r.age_years:
        return None
    lo, _, hi = r.age_years.partition("-")
    try:
        return float(lo), float(hi or lo)
    except ValueError:
        raise EvidenceError(f"evidence row {r.row_id}: age_years must read 'LOW-HIGH', got {r.age_years!r}") from None


def clopper_pearson(events: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Exact binomial interval of events/n."""
    a = (1 - level) / 2
    lo = 0.0 if events <= 0 else float(stats.beta.ppf(a, events, n - events + 1))
    hi = 1.0 if events >= n else float(stats.beta.ppf(1 - a, events + 1, n - events))
    return lo, hi


MAX_TABLES = 2_000_000  # enumeration limit of the exact homogeneity test


def homogeneity_p_value(events, n) -> float:
    """Exact test that k arms (events_i of n_i) share one event probability (Freeman-Halton, the
    k x 2 extension of Fisher's exact test): given the total, tables are multivariate hypergeometric,
    and the p-value sums the probabilities of the tables no more probable than the observed one.
    Beyond MAX_TABLES tables, the chi-square test of homogeneity instead."""
    x = [int(round(e)) for e in events]
    m = [int(round(k)) for k in n]
    total = sum(x)
    log_c = [[math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1) for j in range(k + 1)] for k in m]
    observed = sum(log_c[i][x[i]] for i in range(len(m)))
    room = np.cumsum(m[::-1])[::-1].tolist() + [0]  # events the arms from i on can still hold
    ways = [1] + [0] * total  # tables of the arms so far, by the events they hold
    for k in m:
        ways = [sum(ways[t - j] for j in range(min(k, t) + 1)) for t in range(total + 1)]
    count = ways[total]
    if count > MAX_TABLES:
        return float(stats.chi2_contingency(np.array([x, [k - e for k, e in zip(m, x)]]).T)[1])
    parts = []

    def walk(i, left, logp):
        if i == len(m) - 1:
            if left <= m[i]:
                parts.append(logp + log_c[i][left])
            return
        for j in range(max(0, left - room[i + 1]), min(m[i], left) + 1):
            walk(i + 1, left - j, logp + log_c[i][j])

    walk(0, total, 0.0)
    logs = np.array(parts)
    keep = logs <= observed + 1e-7 * max(1.0, abs(observed))  # ties within round-off count as "as extreme"
    return float(min(1.0, np.exp(logs[keep] - logs.max()).sum() / np.exp(logs - logs.max()).sum()))


def sd_log_from_cv(cv_percent: float) -> float:
    """Log-scale SD of a log-normal quantity from its geometric CV%."""
    return math.sqrt(math.log1p((cv_percent / 100.0) ** 2))


def sd_from_range(low: float, high: float, n: float) -> float:
    """Hozo et al. 2005 (BMC Med Res Methodol 5:13): range/4 for n <= 70, range/6 above."""
    return (high - low) / (4.0 if n <= 70 else 6.0)


def tolerance(r: Row) -> Interval:
    """The interval a simulated value must fall in to agree with row ``r`` (TOLERANCE_RULES)."""
    s = r.statistic
    if s == "proportion" or (s == "km_estimate" and r.dispersion_kind != "ci95"):
        if not np.isfinite(r.n):
            raise EvidenceError(f"evidence row {r.row_id}: a proportion needs n")
        events = r.events if np.isfinite(r.events) else round(r.value * r.n)
        lo, hi = clopper_pearson(events, r.n)
        return Interval(lo, hi, TOLERANCE_RULES["proportion"])
    if s == "km_estimate":
        return Interval(r.dispersion_low, r.dispersion_high, TOLERANCE_RULES["km_estimate"])
    if s == "geometric_mean" and r.dispersion_kind == "cv_percent" and np.isfinite(r.n):
        half = Z * sd_log_from_cv(r.dispersion_low) / math.sqrt(r.n)
        return Interval(r.value * math.exp(-half), r.value * math.exp(half), TOLERANCE_RULES["geometric_mean"], "log")
    if s == "typical_value" and r.dispersion_kind == "sd_log" and np.isfinite(r.n):
        half = Z * MEDIAN_SE_FACTOR * r.dispersion_low / math.sqrt(r.n)
        return Interval(r.value * math.exp(-half), r.value * math.exp(half), TOLERANCE_RULES["typical_value"], "log")
    if s == "median" and r.dispersion_kind == "range" and np.isfinite(r.n):
        if r.dispersion_low > 0 and r.unit != "day":  # levels are log-normal; times are not
            sd = sd_from_range(math.log(r.dispersion_low), math.log(r.dispersion_high), r.n)
            half = Z * MEDIAN_SE_FACTOR * sd / math.sqrt(r.n)
            return Interval(r.value * math.exp(-half), r.value * math.exp(half), TOLERANCE_RULES["median"], "log")
        sd = sd_from_range(r.dispersion_low, r.dispersion_high, r.n)
        half = Z * MEDIAN_SE_FACTOR * sd / math.sqrt(r.n)
        return Interval(max(r.value - half, 0.0), r.value + half, TOLERANCE_RULES["median"])
    if s == "lower_bound":
        return Interval(r.value, math.inf, TOLERANCE_RULES["lower_bound"])
    raise EvidenceError(
        f"evidence row {r.row_id}: no tolerance rule for statistic {s!r} with dispersion {r.dispersion_kind!r} "
        f"and n={r.n:g}; give the claim an explicit tolerance"
    )


def cv_interval(r: Row) -> Interval | None:
    """The interval for the between-subject CV% behind a geometric mean (chi-square on log variance)."""
    if r.statistic != "geometric_mean" or r.dispersion_kind != "cv_percent" or not np.isfinite(r.n) or r.n < 3:
        return None
    s2 = sd_log_from_cv(r.dispersion_low) ** 2
    df = r.n - 1
    lo = df * s2 / stats.chi2.ppf(0.5 + LEVEL / 2, df)
    hi = df * s2 / stats.chi2.ppf(0.5 - LEVEL / 2, df)
    to_cv = lambda v: 100.0 * math.sqrt(math.expm1(v))  # noqa: E731
    return Interval(to_cv(lo), to_cv(hi), TOLERANCE_RULES["geometric_mean"])
