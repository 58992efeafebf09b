"""Running dose-escalation trials and their operating characteristics.

The DLT information is either ``p_dlt`` (K,), one DLT probability per dose, or ``pools`` (K, M),
a virtual population simulated at each dose: every subject enrolled at dose k is a random draw
(with replacement) from row k and then has a DLT with that subject's probability. Subjects are
independent, so a pool behaves exactly like its row mean; pools matter when one wants to follow
identifiable virtual subjects through a simulated trial (``run_trial``).

``exact_operating_characteristics`` enumerates every 3+3 trial path (no sampling);
``simulate_trials`` runs any registered design by Monte Carlo and reports standard errors. Both use
the designs' own per-step rules (``carkin.trials.designs``), so exact and simulated results can be
compared directly. ``run_trial`` returns one simulated trial with its cohorts and subjects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from carkin.errors import InputError
from carkin.trials.designs import (
    BOIN,
    CRM,
    DESIGNS,
    Design,
    ThreePlusThree,
    _check_int,
    _three_plus_three_step,
)

SIMULATION_CHUNK = 10_000  # trials whose random numbers are drawn in one block

# ---------------------------------------------------------------------------------------------
# DLT information
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DltSource:
    """Validated DLT information: per-dose probabilities, or per-subject pools (then p_dlt holds row means)."""

    p_dlt: np.ndarray  # (K,)
    pools: np.ndarray | None  # (K, M)

    @property
    def n_doses(self) -> int:
        return len(self.p_dlt)


def _as_probabilities(name: str, values, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as error:
        raise InputError(f"{name} must be an array of probabilities, got {values!r}") from error
    if array.ndim != ndim:
        shape = "(K,): one probability per dose" if ndim == 1 else "(K, M): M subjects per dose"
        raise InputError(f"{name} must have shape {shape}; got shape {array.shape}")
    if array.shape[0] < 1:
        raise InputError(f"{name} must describe at least one dose")
    if ndim == 2 and array.shape[1] < 1:
        raise InputError(f"{name} must hold at least one subject per dose (M >= 1), got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array > 1):
        raise InputError(f"{name} must hold probabilities in [0, 1]")
    return array


def _dlt_source(p_dlt, pools) -> _DltSource:
    if (p_dlt is None) == (pools is None):
        raise InputError("give exactly one of p_dlt (one DLT probability per dose) or pools (subjects per dose)")
    if pools is not None:
        pools = _as_probabilities("pools", pools, 2)
        return _DltSource(pools.mean(axis=1), pools)
    return _DltSource(_as_probabilities("p_dlt", p_dlt, 1), None)


class _SubjectStream:
    """Subjects in enrolment order: subject i draws pool row ``pool_index[i]`` and has a DLT if ``uniforms[i]`` is
    below that subject's probability. Drawing every number up front keeps the per-trial loop in plain Python."""

    __slots__ = ("_uniforms", "_pool_index", "_p_dlt", "_pools", "enrolled")

    def __init__(self, uniforms: list, pool_index: list | None, p_dlt: list, pools: list | None):
        self._uniforms = uniforms
        self._pool_index = pool_index
        self._p_dlt = p_dlt
        self._pools = pools
        self.enrolled = 0

    def probability(self, dose: int, subject: int) -> float:
        if self._pools is None:
            return self._p_dlt[dose]
        assert self._pool_index is not None  # given together with pools
        return self._pools[dose][self._pool_index[subject]]

    def pool_row(self, subject: int) -> int:
        return -1 if self._pool_index is None else self._pool_index[subject]

    def has_dlt(self, dose: int, subject: int) -> bool:
        return self._uniforms[subject] < self.probability(dose, subject)

    def treat(self, dose: int, m: int) -> tuple[int, int]:
        """Enrol the next m subjects at dose; return the first one's index and the number of DLTs."""
        first = self.enrolled
        last = first + m
        self.enrolled = last
        u = self._uniforms
        if self._pools is None:
            p = self._p_dlt[dose]
            return first, sum(1 for j in range(first, last) if u[j] < p)
        row, index = self._pools[dose], self._pool_index
        assert index is not None  # given together with pools
        return first, sum(1 for j in range(first, last) if u[j] < row[index[j]])


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


def _runner(design: Design, n_doses: int):
    """Function of a subject stream returning (cohorts, selected, mtd_not_reached) for this design."""
    _check_registered(design)
    return design.runner(n_doses)


def _check_registered(design) -> None:
    if not isinstance(design, tuple(DESIGNS.values())):
        names = ", ".join(c.__name__ for c in DESIGNS.values())
        raise InputError(f"design must be one of the registered designs ({names}), got {type(design).__name__}")


def _check_design(design, n_doses: int) -> None:
    _check_registered(design)
    design.check_n_doses(n_doses)


@dataclass(frozen=True)
class Cohort:
    """Subjects treated together at one dose: ``subjects`` are pool row indices (-1 without a pool)."""

    dose: int
    n: int
    n_dlt: int
    subjects: tuple[int, ...]
    subject_dlt: tuple[bool, ...]


@dataclass(frozen=True)
class TrialPath:
    """One simulated trial: its cohorts in order, the selected dose (-1: none) and the 'MTD not reached' flag."""

    cohorts: tuple[Cohort, ...]
    selected: int
    mtd_not_reached: bool
    n_doses: int

    @property
    def n_treated(self) -> int:
        return sum(c.n for c in self.cohorts)

    @property
    def n_dlt(self) -> int:
        return sum(c.n_dlt for c in self.cohorts)

    @property
    def n_per_dose(self) -> np.ndarray:
        counts = np.zeros(self.n_doses, dtype=int)
        for c in self.cohorts:
            counts[c.dose] += c.n
        return counts

    @property
    def dlt_per_dose(self) -> np.ndarray:
        counts = np.zeros(self.n_doses, dtype=int)
        for c in self.cohorts:
            counts[c.dose] += c.n_dlt
        return counts


def _random_numbers(rng: np.random.Generator, source: _DltSource, n_trials: int, n_subjects: int):
    uniforms = rng.random((n_trials, n_subjects)).tolist()
    if source.pools is None:
        return uniforms, [None] * n_trials
    return uniforms, rng.integers(source.pools.shape[1], size=(n_trials, n_subjects)).tolist()


def run_trial(design: Design, p_dlt=None, pools=None, rng=None) -> TrialPath:
    """Simulate one trial end to end; ``rng`` is a numpy Generator or a seed.

    With ``pools`` each subject is identifiable: ``Cohort.subjects`` holds the pool row index
    (the virtual subject at that dose) of everyone treated.
    """
    source = _dlt_source(p_dlt, pools)
    _check_design(design, source.n_doses)
    run = _runner(design, source.n_doses)
    rng = np.random.default_rng(rng)
    uniforms, pool_index = _random_numbers(rng, source, 1, design.max_subjects(source.n_doses))
    pool_lists = None if source.pools is None else source.pools.tolist()
    stream = _SubjectStream(uniforms[0], pool_index[0], source.p_dlt.tolist(), pool_lists)
    raw_cohorts, selected, not_reached = run(stream)
    cohorts = tuple(
        Cohort(
            dose=dose,
            n=m,
            n_dlt=dlt,
            subjects=tuple(stream.pool_row(j) for j in range(first, first + m)),
            subject_dlt=tuple(stream.has_dlt(dose, j) for j in range(first, first + m)),
        )
        for dose, m, dlt, first in raw_cohorts
    )
    return TrialPath(cohorts, int(selected), bool(not_reached), source.n_doses)


# ---------------------------------------------------------------------------------------------
# Operating characteristics
# ---------------------------------------------------------------------------------------------


def _frozen_array(values, dtype=float) -> np.ndarray:
    array = np.array(values, dtype=dtype)
    array.setflags(write=False)
    return array


def _none_if_nan(x: float):
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True, eq=False)
class OperatingCharacteristics:
    """Selection probabilities and expected enrolment/DLTs of a design in one scenario.

    ``p_select[0]`` is the probability that no dose is selected, ``p_select[k]`` that dose k
    (1-based) is. ``n_trials`` is None for exact results, whose standard errors are zero.
    ``p_mtd_not_reached`` (3+3 only, else NaN) is the probability that the top dose cleared.
    """

    design: str
    variant: str | None
    n_trials: int | None
    p_select: np.ndarray
    expected_n: float
    expected_dlt: float
    expected_n_per_dose: np.ndarray
    expected_dlt_per_dose: np.ndarray
    p_mtd_not_reached: float
    se_p_select: np.ndarray
    se_expected_n: float
    se_expected_dlt: float
    se_expected_n_per_dose: np.ndarray
    se_expected_dlt_per_dose: np.ndarray
    se_p_mtd_not_reached: float

    @property
    def method(self) -> str:
        return "exact" if self.n_trials is None else "monte-carlo"

    @property
    def n_doses(self) -> int:
        return len(self.expected_n_per_dose)

    def to_dict(self) -> dict:
        """JSON-ready dictionary (lists and floats; NaN becomes None)."""
        return {
            "design": self.design,
            "variant": self.variant,
            "method": self.method,
            "n_trials": self.n_trials,
            "p_select": [float(v) for v in self.p_select],
            "expected_n": float(self.expected_n),
            "expected_dlt": float(self.expected_dlt),
            "expected_n_per_dose": [float(v) for v in self.expected_n_per_dose],
            "expected_dlt_per_dose": [float(v) for v in self.expected_dlt_per_dose],
            "p_mtd_not_reached": _none_if_nan(self.p_mtd_not_reached),
            "se_p_select": [float(v) for v in self.se_p_select],
            "se_expected_n": float(self.se_expected_n),
            "se_expected_dlt": float(self.se_expected_dlt),
            "se_expected_n_per_dose": [float(v) for v in self.se_expected_n_per_dose],
            "se_expected_dlt_per_dose": [float(v) for v in self.se_expected_dlt_per_dose],
            "se_p_mtd_not_reached": _none_if_nan(self.se_p_mtd_not_reached),
        }


def _variant(design: Design) -> str | None:
    return getattr(design, "variant", None)


MAX_TRIALS = 1_000_000  # Monte Carlo trials per run
MAX_EXACT_DEESCALATION_DOSES = 16  # exact enumeration with de-escalation: seconds at 16 doses, minutes at 20


def exact_operating_characteristics(design: ThreePlusThree, p_dlt) -> OperatingCharacteristics:
    """Exact operating characteristics of a 3+3 (with or without accelerated titration) by enumerating every path.

    Each cohort's DLT count branches binomially; futures are memoised on the state they
    depend on. With de-escalation that state includes the counts at all lower doses, so
    the work grows geometrically with K (about 0.1 s for 12 doses, seconds for 16); escalation-only stays linear.
    """
    if isinstance(design, BOIN | CRM):
        raise InputError(
            f"exact operating characteristics are only available for 3+3 and accelerated titration designs, "
            f"not {design.name}; use simulate_trials"
        )
    if not isinstance(design, ThreePlusThree):
        raise InputError(f"design must be a ThreePlusThree design, got {type(design).__name__}")
    p = _as_probabilities("p_dlt", p_dlt, 1)
    n_doses = len(p)
    design.check_n_doses(n_doses)
    if design.variant == "de-escalation" and n_doses > MAX_EXACT_DEESCALATION_DOSES:
        raise InputError(f"exact operating characteristics of the de-escalation 3+3 grow about 2.2-fold per dose "
                         f"(6 s for 16 doses on a 2-core machine): {n_doses} doses is above the limit of "
                         f"{MAX_EXACT_DEESCALATION_DOSES}; use Monte Carlo (simulate_trials, or --n-trials) instead")
    p_list = p.tolist()
    # packed result: [p_select (K+1) | E n per dose (K) | E DLT per dose (K) | P(MTD not reached)]
    size = 3 * n_doses + 2
    n_at, dlt_at = n_doses + 1, 2 * n_doses + 1
    memo: dict = {}
    keep_lower_doses = design.variant == "de-escalation"

    def future(dose: int, descending: bool, n: tuple, y: tuple) -> np.ndarray:
        # higher doses are never revisited; lower ones matter only when the trial can come back down
        key = (dose, descending, n[: dose + 1], y[: dose + 1]) if keep_lower_doses else (dose, n[dose], y[dose])
        if key in memo:
            return memo[key]
        action = _three_plus_three_step(design, n_doses, dose, descending, n[dose], y[dose])
        if action[0] == "stop":
            out = np.zeros(size)
            out[action[1] + 1] = 1.0
            out[-1] = float(action[2])
        elif action[0] == "move":
            out = future(action[1], action[2], n, y)
        else:
            m, q = action[1], p_list[dose]
            out = np.zeros(size)
            n_next = n[:dose] + (n[dose] + m,) + n[dose + 1 :]
            for k in range(m + 1):
                weight = math.comb(m, k) * q**k * (1 - q) ** (m - k)
                if weight == 0.0:
                    continue
                y_next = y[:dose] + (y[dose] + k,) + y[dose + 1 :]
                out += weight * future(dose, descending, n_next, y_next)
            out[n_at + dose] += m
            out[dlt_at + dose] += m * q
        memo[key] = out
        return out

    zeros = (0,) * n_doses
    packed = future(0, False, zeros, zeros)
    n_per_dose, dlt_per_dose = packed[n_at:dlt_at], packed[dlt_at:-1]
    zero_k = np.zeros(n_doses)
    return OperatingCharacteristics(
        design=design.name,
        variant=design.variant,
        n_trials=None,
        p_select=_frozen_array(packed[:n_at]),
        expected_n=float(n_per_dose.sum()),
        expected_dlt=float(dlt_per_dose.sum()),
        expected_n_per_dose=_frozen_array(n_per_dose),
        expected_dlt_per_dose=_frozen_array(dlt_per_dose),
        p_mtd_not_reached=float(packed[-1]),
        se_p_select=_frozen_array(np.zeros(n_doses + 1)),
        se_expected_n=0.0,
        se_expected_dlt=0.0,
        se_expected_n_per_dose=_frozen_array(zero_k),
        se_expected_dlt_per_dose=_frozen_array(zero_k),
        se_p_mtd_not_reached=0.0,
    )


def _mean_and_se(values: np.ndarray):
    """Mean over trials (axis 0) and its Monte Carlo standard error."""
    values = np.asarray(values, dtype=float)
    mean = values.mean(axis=0)
    if len(values) < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, values.std(axis=0, ddof=1) / math.sqrt(len(values))


def _summarise(design: Design, selected, not_reached, n_per_dose, dlt_per_dose) -> OperatingCharacteristics:
    n_trials, n_doses = n_per_dose.shape
    chosen = np.zeros((n_trials, n_doses + 1))
    chosen[np.arange(n_trials), selected + 1] = 1.0
    p_select, se_p_select = _mean_and_se(chosen)
    n_mean, n_se = _mean_and_se(n_per_dose)
    dlt_mean, dlt_se = _mean_and_se(dlt_per_dose)
    total_n, total_n_se = _mean_and_se(n_per_dose.sum(axis=1))
    total_dlt, total_dlt_se = _mean_and_se(dlt_per_dose.sum(axis=1))
    if getattr(design, "flags_mtd_not_reached", False):
        p_not_reached, se_not_reached = _mean_and_se(not_reached)
    else:
        p_not_reached, se_not_reached = np.nan, np.nan
    return OperatingCharacteristics(
        design=design.name,
        variant=_variant(design),
        n_trials=int(n_trials),
        p_select=_frozen_array(p_select),
        expected_n=float(total_n),
        expected_dlt=float(total_dlt),
        expected_n_per_dose=_frozen_array(n_mean),
        expected_dlt_per_dose=_frozen_array(dlt_mean),
        p_mtd_not_reached=float(p_not_reached),
        se_p_select=_frozen_array(se_p_select),
        se_expected_n=float(total_n_se),
        se_expected_dlt=float(total_dlt_se),
        se_expected_n_per_dose=_frozen_array(n_se),
        se_expected_dlt_per_dose=_frozen_array(dlt_se),
        se_p_mtd_not_reached=float(se_not_reached),
    )


def _trials_frame(selected, not_reached, n_per_dose, dlt_per_dose) -> pd.DataFrame:
    columns = {
        "trial": np.arange(len(selected)),
        "selected_dose": selected + 1,  # 1-based, 0 = none, like p_select
        "n_treated": n_per_dose.sum(axis=1),
        "n_dlt": dlt_per_dose.sum(axis=1),
        "mtd_not_reached": not_reached,
    }
    for k in range(n_per_dose.shape[1]):
        columns[f"n_dose_{k + 1}"] = n_per_dose[:, k]
    for k in range(n_per_dose.shape[1]):
        columns[f"dlt_dose_{k + 1}"] = dlt_per_dose[:, k]
    return pd.DataFrame(columns)


def simulate_trials(design: Design, p_dlt=None, pools=None, n_trials: int = 10000, seed=0, return_trials: bool = False):
    """Monte Carlo operating characteristics of any design, reproducible from ``seed`` (int or numpy Generator).

    Returns an ``OperatingCharacteristics``; with ``return_trials=True`` also a DataFrame with
    one row per trial: ``selected_dose`` (1-based, 0 = none), ``n_treated``, ``n_dlt``,
    ``mtd_not_reached`` and per dose ``n_dose_k`` / ``dlt_dose_k``.
    """
    source = _dlt_source(p_dlt, pools)
    n_trials = _check_int("n_trials", n_trials, 1)
    if n_trials > MAX_TRIALS:
        raise InputError(f"n_trials = {n_trials:,} is above the limit of {MAX_TRIALS:,} simulated trials (their Monte "
                         "Carlo error is then below 0.1 percentage point, and the per-trial records would not fit "
                         "in memory); give fewer")
    n_doses = source.n_doses
    _check_design(design, n_doses)
    run = _runner(design, n_doses)
    rng = np.random.default_rng(seed)
    n_subjects = design.max_subjects(n_doses)
    p_list = source.p_dlt.tolist()
    pool_lists = None if source.pools is None else source.pools.tolist()

    selected = np.empty(n_trials, dtype=int)
    not_reached = np.zeros(n_trials, dtype=bool)
    n_rows, dlt_rows = [], []
    for start in range(0, n_trials, SIMULATION_CHUNK):
        chunk = min(SIMULATION_CHUNK, n_trials - start)
        uniforms, pool_index = _random_numbers(rng, source, chunk, n_subjects)
        for i in range(chunk):
            cohorts, chosen, flag = run(_SubjectStream(uniforms[i], pool_index[i], p_list, pool_lists))
            n_row = [0] * n_doses
            dlt_row = [0] * n_doses
            for dose, m, dlt, _ in cohorts:
                n_row[dose] += m
                dlt_row[dose] += dlt
            n_rows.append(n_row)
            dlt_rows.append(dlt_row)
            selected[start + i] = chosen
            not_reached[start + i] = flag
    n_per_dose = np.array(n_rows, dtype=int).reshape(n_trials, n_doses)
    dlt_per_dose = np.array(dlt_rows, dtype=int).reshape(n_trials, n_doses)
    oc = _summarise(design, selected, not_reached, n_per_dose, dlt_per_dose)
    if return_trials:
        return oc, _trials_frame(selected, not_reached, n_per_dose, dlt_per_dose)
    return oc
