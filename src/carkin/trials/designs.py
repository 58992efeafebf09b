"""Dose-escalation designs for first-in-human trials: the registry, the designs and their rules.

Doses are indexed 0..K-1, lowest first. Each design owns its per-step rules; running trials and their
operating characteristics are in ``carkin.trials.operating``.

Designs:

- ``ThreePlusThree``: the 3+3 rule, escalation-only or with de-escalation (a failed dose
  sends the trial down one dose, expanded to 6 subjects), optionally preceded by
  accelerated titration (one subject per dose, as in Simon et al. 1997, JNCI 89:1138)
  on the first doses, as used in CAR-NK first-in-human protocols.
- ``BOIN``: Bayesian optimal interval design (Liu & Yuan 2015, JRSS-C 64:507) with the
  usual defaults (p_saf = 0.6 target, p_tox = 1.4 target, elimination at 0.95).
- ``CRM``: one-parameter power-model continual reassessment method
  (O'Quigley, Pepe & Fisher 1990, Biometrics 46:33) with a normal prior on the exponent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from numbers import Integral, Real
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
from scipy.stats import beta as beta_distribution

from carkin.errors import InputError

if TYPE_CHECKING:
    from carkin.trials.operating import _SubjectStream

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
