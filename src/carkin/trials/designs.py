"""Dose-escalation designs for first-in-human trials and their operating characteristics.

Doses are indexed 0..K-1, lowest first. The dose-limiting toxicity (DLT) information is
either ``p_dlt`` (K,), one DLT probability per dose, or ``pools`` (K, M), a virtual
population simulated at each dose: every subject enrolled at dose k is a random draw
(with replacement) from row k and then has a DLT with that subject's probability. This
is how subject-to-subject variability of the kinetic model enters a trial. Subjects are
independent, so a pool behaves exactly like its row mean; pools matter when one wants
to follow identifiable virtual subjects through a simulated trial (``run_trial``).

Designs:

- ``ThreePlusThree``: the 3+3 rule, escalation-only or with de-escalation (a failed dose
  sends the trial down one dose, expanded to 6 subjects), optionally preceded by
  accelerated titration (one subject per dose, as in Simon et al. 1997, JNCI 89:1138)
  on the first doses, as used in CAR-NK first-in-human protocols.
- ``BOIN``: Bayesian optimal interval design (Liu & Yuan 2015, JRSS-C 64:507) with the
  usual defaults (p_saf = 0.6 target, p_tox = 1.4 target, elimination at 0.95).
- ``CRM``: one-parameter power-model continual reassessment method
  (O'Quigley, Pepe & Fisher 1990, Biometrics 46:33) with a normal prior on the exponent.

``exact_operating_characteristics`` enumerates every 3+3 trial path (no sampling);
``simulate_trials`` runs any design by Monte Carlo and reports standard errors. Both
share the per-step rules of the designs, so exact and simulated results can be compared
directly. ``run_trial`` returns one simulated trial with its cohorts and subjects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from numbers import Integral, Real
from typing import ClassVar, Protocol

import numpy as np
import pandas as pd
from scipy.stats import beta as beta_distribution

from carkin.errors import InputError

THREE_PLUS_THREE_VARIANTS = ("escalation-only", "de-escalation")
THREE_PLUS_THREE_EXPANSION = 6  # a dose is judged on 6 subjects before it can be declared the MTD
BOIN_SAFE_FRACTION = 0.6  # default p_saf = 0.6 * target (Liu & Yuan 2015)
BOIN_TOXIC_FRACTION = 1.4  # default p_tox = 1.4 * target
BOIN_MIN_N_TO_ELIMINATE = 3  # no dose is eliminated on fewer subjects
BOIN_ESTIMATE_PSEUDO_DLT = 0.05  # MTD selection estimates (y + 0.05) / (n + 0.1): defined when y = 0
BOIN_ESTIMATE_PSEUDO_N = 0.1
CRM_PRIOR_VARIANCE = 1.34  # prior variance of the power-model exponent often used with CRM
CRM_GRID_POINTS = 2001  # odd, for Simpson's rule
CRM_GRID_HALF_WIDTH_SD = 10.0  # posterior mass lies well inside +-10 prior SDs even for extreme data
TIE_TOLERANCE = 1e-10  # estimates this close to equally far from the target count as tied
SIMULATION_CHUNK = 10_000  # trials whose random numbers are drawn in one block


# ---------------------------------------------------------------------------------------------
# Designs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DesignOption:
    """One setting of a design as protocol files and the command line give it.

    ``kind``: "int", "float", "str" or "floats" (a list); ``high`` "doses" means the number of
    dose levels. ``default`` None with ``required`` means it must be given."""

    name: str
    kind: str
    default: object
    help: str
    low: float | None = None
    high: float | str | None = None
    choices: tuple = ()
    required: bool = False

    def __post_init__(self):
        if self.kind not in ("int", "float", "str", "floats"):
            raise InputError(f"design option {self.name}: kind must be int, float, str or floats, got {self.kind!r}")
        if self.kind == "int" and (self.low is None or self.high is None):
            raise InputError(f"design option {self.name}: a whole-number option needs low and high")

    def bounds(self, n_doses: int) -> tuple[int, int]:
        """(low, high) of a whole-number option, with ``high="doses"`` read as the number of doses."""
        low, high = self.low, self.high
        assert low is not None and high is not None  # checked at construction for int options
        return int(low), n_doses if high == "doses" else int(high)


class EscalationDesign(Protocol):
    """What a registered design provides (ThreePlusThree, BOIN and CRM are the built-in ones)."""

    key: ClassVar[str]  # its name in protocol files and on the command line
    exact: ClassVar[bool]  # exact_operating_characteristics applies
    options: ClassVar[tuple[DesignOption, ...]]

    @property
    def name(self) -> str: ...

    def runner(self, n_doses: int): ...

    def max_subjects(self, n_doses: int) -> int: ...

    def check_n_doses(self, n_doses: int) -> None: ...


# key -> design class: the names a protocol's [design] table and the CLI's --design accept. A design
# class registers itself with @register_design; nothing else lists the designs.
DESIGNS: dict[str, type[EscalationDesign]] = {}


def register_design(cls):
    """Class decorator: add a design to DESIGNS under its ``key``."""
    if cls.key in DESIGNS:
        raise InputError(f"a design named {cls.key!r} is registered already ({DESIGNS[cls.key].__name__})")
    DESIGNS[cls.key] = cls
    return cls


def design_from_options(key: str, options: Mapping):
    """The design registered as ``key`` with ``options`` (name -> value; missing: the option's default)."""
    if key not in DESIGNS:
        raise InputError(f"design must be one of {', '.join(DESIGNS)}, got {key!r}")
    cls = DESIGNS[key]
    known = {o.name: o for o in cls.options}
    stray = sorted(set(options) - set(known))
    if stray:
        raise InputError(f"design {key!r} takes no option(s) {stray}; its options are {sorted(known)}")
    values = {}
    for o in cls.options:
        if o.name in options and options[o.name] is not None:
            values[o.name] = tuple(options[o.name]) if o.kind == "floats" else options[o.name]
        elif o.required:
            raise InputError(f"design {key!r} needs {o.name} ({o.help})")
        else:
            values[o.name] = o.default
    return cls(**values)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_probability(name: str, value, *, open_interval: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    low_ok = value > 0 if open_interval else value >= 0  # type: ignore[operator]  # Real ABC lacks __gt__/__ge__
    high_ok = value < 1 if open_interval else value <= 1
    if not (low_ok and high_ok):
        interval = "(0, 1)" if open_interval else "[0, 1]"
        raise InputError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


@register_design
@dataclass(frozen=True)
class ThreePlusThree:
    """3+3 design, optionally preceded by accelerated titration on the first ``accelerated_doses`` doses.

    At a 3+3 dose: treat 3; 0/3 DLT escalates, 1/3 adds 3 (<= 1/6 escalates), otherwise the
    dose fails. At an accelerated dose: treat 1; no DLT escalates, a DLT adds 2 and the dose
    clears only if neither has a DLT. When a dose fails, ``escalation-only`` stops and takes
    the dose below as MTD; ``de-escalation`` goes down one dose, expands it to 6 subjects and
    takes it as MTD if <= 1/6 had a DLT, otherwise keeps going down. A top dose that clears is
    selected with the flag "MTD not reached".
    """

    variant: str = "escalation-only"
    accelerated_doses: int = 0

    key: ClassVar[str] = "3+3"
    exact: ClassVar[bool] = True  # exact operating characteristics by enumerating every path
    flags_mtd_not_reached: ClassVar[bool] = True  # a top dose that clears is selected with this flag
    options: ClassVar[tuple[DesignOption, ...]] = (
        DesignOption("variant", "str", "escalation-only", "3+3 variant", choices=THREE_PLUS_THREE_VARIANTS),
        DesignOption("accelerated_doses", "int", 0, "accelerated titration (1 patient per cohort) for the first "
                     "K doses", low=0, high="doses"),
    )

    def __post_init__(self):
        if self.variant not in THREE_PLUS_THREE_VARIANTS:
            raise InputError(f"variant must be one of {list(THREE_PLUS_THREE_VARIANTS)}, got {self.variant!r}")
        object.__setattr__(self, "accelerated_doses", _check_int("accelerated_doses", self.accelerated_doses, 0))

    @property
    def name(self) -> str:
        return "accelerated titration + 3+3" if self.accelerated_doses > 0 else "3+3"

    def runner(self, n_doses: int):
        """Function of a subject stream returning (cohorts, selected, mtd_not_reached)."""
        return partial(_run_three_plus_three, self, n_doses)

    def max_subjects(self, n_doses: int) -> int:
        """No dose ever receives more than 6 subjects, so a trial enrols at most 6 K."""
        return THREE_PLUS_THREE_EXPANSION * n_doses

    def check_n_doses(self, n_doses: int) -> None:
        if self.accelerated_doses > n_doses:
            raise InputError(
                f"accelerated_doses ({self.accelerated_doses}) cannot exceed the number of doses ({n_doses})"
            )


@register_design
@dataclass(frozen=True)
class BOIN:
    """Bayesian optimal interval design (Liu & Yuan 2015, JRSS-C 64:507).

    After each cohort the observed DLT rate at the current dose is compared with
    ``lambda_e`` (escalate at or below) and ``lambda_d`` (de-escalate at or above). A dose
    with >= 3 subjects and P(p > target | data) > ``elimination_cutoff`` under a Beta(1, 1)
    prior is eliminated with all higher doses; eliminating the lowest dose stops the trial
    with no MTD. The trial also stops once the current dose has ``n_earlystop`` subjects.
    The MTD is chosen by isotonic regression (weighted by n) of the observed rates.
    """

    target: float
    cohort_size: int = 3
    n_cohorts: int = 10
    p_saf: float | None = None
    p_tox: float | None = None
    elimination_cutoff: float = 0.95
    n_earlystop: int = 100

    key: ClassVar[str] = "boin"
    exact: ClassVar[bool] = False
    options: ClassVar[tuple[DesignOption, ...]] = (
        DesignOption("target", "float", 0.3, "target DLT rate", low=0.0, high=1.0),
        DesignOption("cohort_size", "int", 3, "subjects per cohort", low=1, high=100),
        DesignOption("n_cohorts", "int", 10, "cohorts per trial", low=1, high=1000),
    )

    def __post_init__(self):
        target = _check_probability("target", self.target)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "cohort_size", _check_int("cohort_size", self.cohort_size, 1))
        object.__setattr__(self, "n_cohorts", _check_int("n_cohorts", self.n_cohorts, 1))
        object.__setattr__(self, "n_earlystop", _check_int("n_earlystop", self.n_earlystop, 1))
        p_saf = BOIN_SAFE_FRACTION * target if self.p_saf is None else _check_probability("p_saf", self.p_saf)
        p_tox = BOIN_TOXIC_FRACTION * target if self.p_tox is None else _check_probability("p_tox", self.p_tox)
        if not p_saf < target:
            raise InputError(f"p_saf must be below target ({target}), got {p_saf}")
        if not target < p_tox < 1:
            raise InputError(f"p_tox must lie between target ({target}) and 1, got {p_tox}")
        object.__setattr__(self, "p_saf", float(p_saf))
        object.__setattr__(self, "p_tox", float(p_tox))
        object.__setattr__(
            self, "elimination_cutoff", _check_probability("elimination_cutoff", self.elimination_cutoff)
        )

    @property
    def name(self) -> str:
        return "BOIN"

    def runner(self, n_doses: int):
        return partial(_run_boin, self, n_doses, _boin_rules(self))

    @property
    def lambda_e(self) -> float:
        """Escalation boundary: the rate at which 'p = p_saf' and 'p = target' are equally likely."""
        t, s = self.target, self.p_saf
        assert s is not None  # set by __post_init__
        return math.log((1 - s) / (1 - t)) / math.log(t * (1 - s) / (s * (1 - t)))

    @property
    def lambda_d(self) -> float:
        """De-escalation boundary: the rate at which 'p = target' and 'p = p_tox' are equally likely."""
        t, x = self.target, self.p_tox
        assert x is not None  # set by __post_init__
        return math.log((1 - t) / (1 - x)) / math.log(x * (1 - t) / (t * (1 - x)))

    @property
    def max_subjects_total(self) -> int:
        return self.cohort_size * self.n_cohorts

    def max_subjects(self, n_doses: int) -> int:
        return self.max_subjects_total

    def check_n_doses(self, n_doses: int) -> None:
        pass

    def boundaries(self) -> dict:
        """Boundaries and the integer decision table for n = 1..cohort_size * n_cohorts treated at a dose.

        ``escalate_if_at_most[i]``, ``deescalate_if_at_least[i]`` and ``eliminate_if_at_least[i]``
        are DLT counts for ``n[i]`` subjects; elimination entries are None where no count
        eliminates (fewer than 3 subjects, or too few subjects to reach the cutoff).
        """
        rules = _boin_rules(self)
        n = list(range(1, self.max_subjects_total + 1))
        return {
            "lambda_e": self.lambda_e,
            "lambda_d": self.lambda_d,
            "n": n,
            "escalate_if_at_most": [rules.escalate[i] for i in n],
            "deescalate_if_at_least": [rules.deescalate[i] for i in n],
            "eliminate_if_at_least": [rules.eliminate[i] if rules.eliminate[i] <= i else None for i in n],
        }

    def select_mtd(self, n_per_dose, dlt_per_dose) -> int:
        """MTD index (-1: none) from the subjects and DLTs observed at each dose."""
        n, y = np.asarray(n_per_dose), np.asarray(dlt_per_dose)
        if n.ndim != 1 or n.shape != y.shape or n.size == 0:
            raise InputError("n_per_dose and dlt_per_dose must be non-empty 1-D arrays of equal length")
        if np.any(n != np.round(n)) or np.any(y != np.round(y)) or np.any(y < 0) or np.any(y > n):
            raise InputError("n_per_dose and dlt_per_dose must be counts with 0 <= dlt_per_dose <= n_per_dose")
        n_counts, y_counts = [int(v) for v in n], [int(v) for v in y]
        most = max(n_counts)
        design = self if most <= self.max_subjects_total else _replace_n_cohorts(self, most)
        return _boin_select(design.target, n_counts, y_counts, _boin_rules(design))


def _replace_n_cohorts(design: BOIN, n_subjects: int) -> BOIN:
    """Same design with enough cohorts for the rule tables to cover ``n_subjects`` at one dose."""
    n_cohorts = -(-n_subjects // design.cohort_size)
    return replace(design, n_cohorts=n_cohorts)


@register_design
@dataclass(frozen=True)
class CRM:
    """Continual reassessment method with the power model p_k = skeleton_k ** exp(a), a ~ N(0, prior_sd²).

    Each cohort goes to the dose whose posterior mean DLT probability is closest to
    ``target``, never more than one level above the highest dose tried so far. The trial
    starts at the lowest dose and runs all cohorts; the MTD is the dose recommended after
    the last one.
    """

    skeleton: tuple[float, ...]
    target: float
    cohort_size: int = 3
    n_cohorts: int = 10
    prior_sd: float = math.sqrt(CRM_PRIOR_VARIANCE)

    key: ClassVar[str] = "crm"
    exact: ClassVar[bool] = False
    options: ClassVar[tuple[DesignOption, ...]] = (
        DesignOption("skeleton", "floats", None, "prior DLT probabilities per dose", required=True),
        DesignOption("target", "float", 0.3, "target DLT rate", low=0.0, high=1.0),
        DesignOption("cohort_size", "int", 3, "subjects per cohort", low=1, high=100),
        DesignOption("n_cohorts", "int", 10, "cohorts per trial", low=1, high=1000),
    )

    def __post_init__(self):
        try:
            skeleton = tuple(float(s) for s in np.atleast_1d(np.asarray(self.skeleton, dtype=float)))
        except (TypeError, ValueError) as error:
            raise InputError(f"skeleton must be a sequence of probabilities, got {self.skeleton!r}") from error
        if not skeleton:
            raise InputError("skeleton must give one prior DLT probability per dose, got none")
        if not all(0 < s < 1 for s in skeleton):
            raise InputError(f"skeleton probabilities must lie in (0, 1), got {list(skeleton)}")
        if any(b <= a for a, b in zip(skeleton, skeleton[1:])):
            raise InputError(f"skeleton must be strictly increasing, got {list(skeleton)}")
        object.__setattr__(self, "skeleton", skeleton)
        object.__setattr__(self, "target", _check_probability("target", self.target))
        object.__setattr__(self, "cohort_size", _check_int("cohort_size", self.cohort_size, 1))
        object.__setattr__(self, "n_cohorts", _check_int("n_cohorts", self.n_cohorts, 1))
        if (
            isinstance(self.prior_sd, bool)
            or not isinstance(self.prior_sd, Real)
            or not (math.isfinite(self.prior_sd) and self.prior_sd > 0)
        ):
            raise InputError(f"prior_sd must be a finite number > 0, got {self.prior_sd!r}")
        object.__setattr__(self, "prior_sd", float(self.prior_sd))

    @property
    def name(self) -> str:
        return "CRM"

    def runner(self, n_doses: int):
        return partial(_run_crm, self, n_doses, _CrmPosterior(self))

    def max_subjects(self, n_doses: int) -> int:
        return self.cohort_size * self.n_cohorts

    def check_n_doses(self, n_doses: int) -> None:
        if len(self.skeleton) != n_doses:
            raise InputError(f"skeleton has {len(self.skeleton)} probabilities but the trial has {n_doses} doses")

    def posterior_mean_dlt(self, n_per_dose, dlt_per_dose) -> np.ndarray:
        """Posterior mean DLT probability at each dose given the subjects and DLTs observed there."""
        n = np.asarray(n_per_dose, dtype=float)
        y = np.asarray(dlt_per_dose, dtype=float)
        if n.shape != (len(self.skeleton),) or y.shape != n.shape:
            raise InputError(f"n_per_dose and dlt_per_dose must each have one entry per dose ({len(self.skeleton)})")
        if np.any(n < 0) or np.any(y < 0) or np.any(y > n):
            raise InputError("need 0 <= dlt_per_dose <= n_per_dose at every dose")
        return _CrmPosterior(self).mean_dlt(n, y)


Design = ThreePlusThree | BOIN | CRM


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
# 3+3 rules (shared by the exact calculator and the simulator)
# ---------------------------------------------------------------------------------------------

_CLEARED, _FAILED = 0, -1


def _escalation_verdict(accelerated: bool, n: int, y: int) -> int:
    """Subjects to add at a dose being escalated through (> 0), or _CLEARED / _FAILED, from its n treated, y DLTs."""
    if accelerated:
        if n == 0:
            return 1
        if n == 1:
            return _CLEARED if y == 0 else 2
        return _CLEARED if y <= 1 else _FAILED  # n == 3: clears only if the 2 added had no DLT
    if n == 0:
        return 3
    if n == 3:
        if y == 0:
            return _CLEARED
        return 3 if y == 1 else _FAILED
    return _CLEARED if y <= 1 else _FAILED  # n == 6


def _after_failure(design: ThreePlusThree, dose: int) -> tuple:
    if design.variant == "escalation-only" or dose == 0:
        return ("stop", dose - 1, False)
    return ("move", dose - 1, True)


def _three_plus_three_step(design: ThreePlusThree, n_doses: int, dose: int, descending: bool, n: int, y: int):
    """Next move given n treated and y DLTs at the current dose.

    Returns ("treat", m), ("move", new dose, descending) or ("stop", selected dose or -1, MTD not reached).
    """
    if descending:
        if n < THREE_PLUS_THREE_EXPANSION:
            return ("treat", THREE_PLUS_THREE_EXPANSION - n)
        if y <= 1:
            return ("stop", dose, False)
        return _after_failure(design, dose)
    verdict = _escalation_verdict(dose < design.accelerated_doses, n, y)
    if verdict > 0:
        return ("treat", verdict)
    if verdict == _CLEARED:
        if dose == n_doses - 1:
            return ("stop", dose, True)
        return ("move", dose + 1, False)
    return _after_failure(design, dose)


def _run_three_plus_three(design: ThreePlusThree, n_doses: int, stream: _SubjectStream):
    n = [0] * n_doses
    y = [0] * n_doses
    cohorts = []
    dose, descending = 0, False
    while True:
        action = _three_plus_three_step(design, n_doses, dose, descending, n[dose], y[dose])
        if action[0] == "treat":
            m = action[1]
            first, dlt = stream.treat(dose, m)
            n[dose] += m
            y[dose] += dlt
            cohorts.append((dose, m, dlt, first))
        elif action[0] == "move":
            dose, descending = action[1], action[2]
        else:
            return cohorts, action[1], action[2]


# ---------------------------------------------------------------------------------------------
# BOIN rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BoinRules:
    """Decision counts indexed by n treated at a dose (index 0 unused); elimination n + 1 means never."""

    escalate: tuple[int, ...]
    deescalate: tuple[int, ...]
    eliminate: tuple[int, ...]


def _posterior_prob_above(target: float, n: int, y: int) -> float:
    """P(p > target | y DLTs of n) under a Beta(1, 1) prior."""
    return float(beta_distribution.sf(target, y + 1, n - y + 1))


def _boin_rules(design: BOIN) -> _BoinRules:
    lam_e, lam_d = design.lambda_e, design.lambda_d
    escalate, deescalate, eliminate = [0], [0], [1]
    for n in range(1, design.max_subjects_total + 1):
        # the tiny offsets keep exact multiples (n * lambda an integer) on the right side of floor/ceil
        escalate.append(math.floor(n * lam_e + 1e-12))
        limit = n + 1
        if n >= BOIN_MIN_N_TO_ELIMINATE:
            limit = next(
                (y for y in range(n + 1) if _posterior_prob_above(design.target, n, y) > design.elimination_cutoff),
                n + 1,
            )
        eliminate.append(limit)
        # a count that eliminates the dose must also move the trial down
        deescalate.append(min(math.ceil(n * lam_d - 1e-12), limit))
    return _BoinRules(tuple(escalate), tuple(deescalate), tuple(eliminate))


def _isotonic_increasing(values: list[float], weights: list[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    fitted = []
    for v, _, c in blocks:
        fitted.extend([v] * int(c))
    return fitted


def _boin_select(target: float, n: list[int], y: list[int], rules: _BoinRules) -> int:
    """MTD from final data: lowest eliminated dose caps the admissible set; isotonic estimate closest to target."""
    admissible_end = len(n)
    for k, (nk, yk) in enumerate(zip(n, y)):
        if nk >= BOIN_MIN_N_TO_ELIMINATE and yk >= rules.eliminate[nk]:
            admissible_end = k
            break
    tried = [k for k in range(admissible_end) if n[k] > 0]
    if not tried:
        return -1
    raw = [(y[k] + BOIN_ESTIMATE_PSEUDO_DLT) / (n[k] + BOIN_ESTIMATE_PSEUDO_N) for k in tried]
    fitted = _isotonic_increasing(raw, [float(n[k]) for k in tried])
    distance = [abs(f - target) for f in fitted]
    best = min(distance)
    tied = [i for i, d in enumerate(distance) if d <= best + TIE_TOLERANCE]
    # equal estimates below target: the higher dose is as close and more useful; otherwise prefer safety
    pick = tied[-1] if all(fitted[i] < target for i in tied) else tied[0]
    return tried[pick]


def _run_boin(design: BOIN, n_doses: int, rules: _BoinRules, stream: _SubjectStream):
    n = [0] * n_doses
    y = [0] * n_doses
    cohorts = []
    eliminated_from = n_doses  # doses at or above this index are eliminated
    dose = 0
    size = design.cohort_size
    for _ in range(design.n_cohorts):
        first, dlt = stream.treat(dose, size)
        n[dose] += size
        y[dose] += dlt
        cohorts.append((dose, size, dlt, first))
        nd, yd = n[dose], y[dose]
        if nd >= design.n_earlystop:
            break
        if yd >= rules.eliminate[nd]:
            eliminated_from = min(eliminated_from, dose)
            if dose == 0:
                return cohorts, -1, False
        if yd <= rules.escalate[nd]:
            if dose + 1 < eliminated_from:
                dose += 1
        elif yd >= rules.deescalate[nd] and dose > 0:
            dose -= 1
    return cohorts, _boin_select(design.target, n, y, rules), False


# ---------------------------------------------------------------------------------------------
# CRM posterior
# ---------------------------------------------------------------------------------------------


class _CrmPosterior:
    """Posterior of the power-model exponent on a fixed grid (Simpson's rule), set up once per design."""

    def __init__(self, design: CRM):
        sd = design.prior_sd
        a = np.linspace(-CRM_GRID_HALF_WIDTH_SD * sd, CRM_GRID_HALF_WIDTH_SD * sd, CRM_GRID_POINTS)
        simpson = np.ones(CRM_GRID_POINTS)
        simpson[1:-1:2] = 4.0
        simpson[2:-1:2] = 2.0
        self._log_prior = -0.5 * (a / sd) ** 2 + np.log(simpson)  # constants cancel on normalising
        log_p = np.exp(a)[:, None] * np.log(np.asarray(design.skeleton))[None, :]  # (grid, K)
        self._log_p = log_p
        self._log_q = np.log(-np.expm1(log_p))  # log(1 - p) without cancellation when p is near 1
        self._p = np.exp(log_p)

    def mean_dlt(self, n: np.ndarray, y: np.ndarray) -> np.ndarray:
        log_post = self._log_prior + self._log_p @ y + self._log_q @ (n - y)
        weights = np.exp(log_post - log_post.max())
        return weights @ self._p / weights.sum()


def _crm_recommend(means: np.ndarray, target: float, highest_tried: int) -> int:
    """Dose closest to target among those at most one level above the highest tried."""
    allowed = means[: highest_tried + 2]
    return int(np.argmin(np.abs(allowed - target)))


def _run_crm(design: CRM, n_doses: int, posterior: _CrmPosterior, stream: _SubjectStream):
    n = np.zeros(n_doses)
    y = np.zeros(n_doses)
    cohorts = []
    dose = highest = 0
    size = design.cohort_size
    for _ in range(design.n_cohorts):
        first, dlt = stream.treat(dose, size)
        n[dose] += size
        y[dose] += dlt
        cohorts.append((dose, size, dlt, first))
        highest = max(highest, dose)
        dose = _crm_recommend(posterior.mean_dlt(n, y), design.target, highest)
    return cohorts, dose, False


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
