"""Virtual trial arms: a published arm's design simulated with a model, and the statistic it reports.

A :class:`Claim` names an evidence row that a model says it describes, with the design details
the row leaves open (each one an assumption, stated in ``note``). The claim and its row give a
:class:`Design` (product, dose, schedule, population, follow-up); :class:`VirtualArm` turns a
design into a fixed virtual population (covariates and standard-normal random effects drawn
once from a seed derived from the design), so the same trial can be re-simulated at other
population values with common random numbers: qualification runs it at the model's values,
calibration many times. Rows of one design (a label's responders and non-responders) are
statistics of the same virtual patients.

Definitions used for every model (the trials' own, where they state one):
- response (CR/CRi): marrow blasts below CR_BLAST_PCT at an assessment on ASSESSMENT_DAYS up to the
  row's time point (default day 28; "within 3 months" rows use day 90);
- MRD-negative: blasts below MRD_BLAST_PCT at the same assessments;
- relapse: a responder whose blasts are at or above CR_BLAST_PCT at a later time; antigen-negative
  relapse: one whose relapsing blasts are mostly antigen-negative;
- kinetics are NCA of simulated measurements (the model's assay: residual error and LLOQ) on
  SAMPLING_DAYS, as an observed study would see them, unless the claim asks for true values.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from carkin.errors import InputError
from carkin.model import dosing, population
from carkin.model.kinetics import Model
from carkin.qualification import evidence
from carkin.simulation.nca import nca

CR_BLAST_PCT = 5.0  # % marrow blasts: complete remission below this (NCI workshop, Kröger 2010; data/evidence)
MRD_BLAST_PCT = 0.01  # % marrow blasts: flow-cytometry MRD negativity, 1e-4 (ELIANA; data/evidence/physiology.csv)
ASSESSMENT_DAYS = (28.0, 56.0, 90.0)  # marrow assessments for response (assumption: monthly to 3 months)
# qPCR sampling for NCA (assumption: a typical CAR-T kinetic schedule; the labels do not list it)
SAMPLING_DAYS = (0.0, 1.0, 4.0, 7.0, 10.0, 14.0, 21.0, 28.0, 56.0, 90.0, 180.0, 270.0, 365.0)
LATE_DAYS = (120.0, 150.0, 180.0, 270.0, 365.0, 545.0, 730.0, 1095.0, 1825.0)
DEFAULT_N = 400  # virtual patients per design (qualification and calibration alike)
DEFAULT_SEED = 1  # the calibration's virtual patients, so qualification sees the same trials
WEIGHT_LOG_SD = 0.2  # log-SD of weight around the age-typical value (as protocol populations)
WEIGHT_BOUNDS = (10.0, 150.0)
FRACTION_GUARD = 1e-12
DEFAULT_BLAST_LOG_SD = 0.8  # when only a median burden is known (assumption, as the CD7 models' covariate)


@dataclass(frozen=True)
class Claim:
    """A model's claim to describe one evidence row, with the design details the row leaves open."""

    row: str
    role: str = "validation"  # "calibration": informs the model's values; "validation": held out
    quantity: str | None = None  # read the row as another quantity (e.g. no CRS of any grade bounds grade >= 3)
    options: tuple = ()  # model options as (name, value) pairs, e.g. (("product_type", "unedited"),)
    dose_per_kg: float | None = None
    schedule: str | None = None  # "single" or "split 10/30/60"
    age_years: tuple | None = None  # (low, high)
    blast_pct: tuple | None = None  # (median, low, high); low/high as the 2.5th/97.5th percentiles
    covariates: tuple = ()  # ((name, (low, high)), ...): log-uniform over the range
    timepoint_day: float | None = None
    measured: bool = True  # kinetics from simulated measurements (assay noise, LLOQ) on SAMPLING_DAYS
    tolerance: tuple[float, float] | None = None  # (low, high): an explicit tolerance, with its reason in note
    note: str = ""  # the assumptions this claim adds to the row
    known_failure: str = ""  # why the model does not describe the row (the row stays, marked failed)
    known_failure_cv: str = ""  # the same for the between-subject CV% line of a geometric mean

    def __post_init__(self):
        if self.role not in ("calibration", "validation"):
            raise InputError(f"claim {self.row}: role must be 'calibration' or 'validation', got {self.role!r}")
        if self.schedule not in (None, "single", "split 10/30/60"):
            raise InputError(f"claim {self.row}: schedule must be 'single' or 'split 10/30/60', got {self.schedule!r}")


SCHEDULES = {
    "single": lambda d: dosing.single(d),
    "split 10/30/60": lambda d: dosing.split(d, fractions=(0.1, 0.3, 0.6), days=(0.0, 1.0, 2.0)),
}


def _schedule_of(claim: Claim, row: evidence.Row) -> str:
    if claim.schedule:
        return claim.schedule
    text = row.schedule.lower()
    if "10/30/60" in text:
        return "split 10/30/60"
    if text.startswith("single"):
        return "single"
    raise evidence.EvidenceError(f"claim {claim.row}: the row's schedule {row.schedule!r} is neither single nor "
                                 "10/30/60%; give the claim a schedule")


def _seed(key: str, seed: int) -> int:
    return (zlib.crc32(key.encode()) + 7919 * seed) % (2**31)


@dataclass(frozen=True)
class Design:
    """What a virtual trial needs: product options, dose, schedule, population, follow-up.

    Rows with the same design are statistics of the same virtual trial (the label's responders and
    non-responders come from one population), so their virtual patients are shared."""

    options: tuple
    dose_per_kg: float
    schedule: str
    age_years: tuple | None
    blast_pct: tuple | None
    covariates: tuple
    measured: bool
    horizon: float

    @property
    def key(self) -> str:
        return repr((self.options, self.dose_per_kg, self.schedule, self.age_years, self.blast_pct,
                     self.covariates, self.measured))


def timepoint(claim: Claim, row: evidence.Row) -> float:
    """The day a row's quantity refers to (default: day 28 for response, 365 for persistence)."""
    t = claim.timepoint_day or row.timepoint_day
    if isinstance(t, float) and math.isfinite(t):
        return t
    return 365.0 if (claim.quantity or row.quantity) == "persistence" else 28.0


def design_of(claim: Claim, row: evidence.Row) -> Design:
    dose = claim.dose_per_kg or row.dose_per_kg
    if not (isinstance(dose, float) and math.isfinite(dose) and dose > 0):
        raise evidence.EvidenceError(f"claim {claim.row}: the row gives no dose per kg; give the claim dose_per_kg "
                                     "(and say why in its note)")
    blast = claim.blast_pct
    if blast is None and math.isfinite(row.blast_pct):
        blast = (row.blast_pct, row.blast_pct_low, row.blast_pct_high)
    if blast is not None:
        blast = tuple(float(x) for x in blast)
    return Design(options=tuple(claim.options), dose_per_kg=float(dose), schedule=_schedule_of(claim, row),
                  age_years=claim.age_years or evidence.age_range(row), blast_pct=blast,
                  covariates=tuple(claim.covariates), measured=claim.measured,
                  horizon=max(90.0, timepoint(claim, row)))


@dataclass
class VirtualArm:
    """A design's virtual patients, fixed once (covariates and standard-normal random effects from a
    seed), re-simulated at any population values: common random numbers for calibration."""

    model: Model
    design: Design
    n: int = DEFAULT_N
    seed: int = 0
    covariates: dict = field(init=False)
    eta: np.ndarray = field(init=False)  # (n, n_parameters) standard normal
    regimen: dosing.Regimen = field(init=False)
    times: np.ndarray = field(init=False)

    def __post_init__(self):
        rng = np.random.default_rng(_seed(self.design.key, self.seed))
        self.eta = rng.standard_normal((self.n, len(self.model.parameters)))
        self.covariates = self._population(rng)
        self.regimen = SCHEDULES[self.design.schedule](self.design.dose_per_kg)
        horizon = self.design.horizon
        late = [d for d in LATE_DAYS if d <= horizon] + ([horizon] if horizon > 90 else [])
        self.times = np.union1d(np.arange(0.0, 91.0), np.array(late + [d for d in SAMPLING_DAYS if d <= horizon]))

    def _population(self, rng) -> dict:
        """Covariates of the arm's virtual patients: age-typical weights, burden, the rest as claimed."""
        from carkin.trials.protocol import typical_weight_kg

        names = {c.name: c for c in self.model.covariates}
        out = {}
        ages = self.design.age_years
        weight, burden = self.model.role("weight", required=False), self.model.role("burden", required=False)
        if weight in names:
            if ages is None:
                c = names[weight]
                out[weight] = np.clip(c.typical * np.exp(c.log_sd * rng.standard_normal(self.n)), *c.bounds)
            else:
                age = rng.uniform(*ages, self.n)
                w = typical_weight_kg(age) * np.exp(WEIGHT_LOG_SD * rng.standard_normal(self.n))
                out[weight] = np.clip(w, *WEIGHT_BOUNDS)
        if burden in names:
            c = names[burden]
            if self.design.blast_pct is not None:
                med, lo, hi = self.design.blast_pct
                known = math.isfinite(lo) and math.isfinite(hi)
                sd = (math.log(hi) - math.log(lo)) / (2 * evidence.Z) if known else DEFAULT_BLAST_LOG_SD
                out[burden] = np.clip(med * np.exp(sd * rng.standard_normal(self.n)), *((lo, hi) if known else
                                                                                         c.bounds))
            else:
                out[burden] = np.clip(c.typical * np.exp(c.log_sd * rng.standard_normal(self.n)), *c.bounds)
        ranges = dict(self.design.covariates)
        for name, c in names.items():
            if name in out:
                continue
            if name in ranges:
                lo, hi = ranges[name]
                out[name] = np.exp(rng.uniform(math.log(lo), math.log(hi), self.n))
            else:
                out[name] = np.clip(c.typical * np.exp(c.log_sd * rng.standard_normal(self.n)), *c.bounds)
        return out

    def individual(self, values: dict | None = None, omegas: dict | None = None) -> dict:
        """Per-subject parameters at typical ``values`` and between-subject SDs ``omegas`` (defaults: the model's)."""
        virtual = population.Population.of(self.model)
        sites = {**virtual.model_sites(), **(values or {})}
        sites.update({population.omega_site(k): v for k, v in (omegas or {}).items()})
        theta = np.asarray(virtual.individual(sites, self.eta))
        # a logistic of a large random effect rounds to exactly 0 or 1: keep fractions inside (0, 1)
        theta = np.where(virtual.fraction_mask(), np.clip(theta, FRACTION_GUARD, 1.0 - FRACTION_GUARD), theta)
        return dict(zip(self.model.parameter_names, theta.T))

    def simulate(self, values: dict | None = None, omegas: dict | None = None) -> xr.Dataset:
        """The arm's virtual patients at the given population values (measurements added where claimed)."""
        from carkin.simulation.simulate import SimulationWarning, simulate

        model = self.model.with_values(**(values or {}))
        with warnings.catch_warnings():
            # a failed solve is flagged in 'failed' and left out of every statistic (its weight is 0)
            warnings.simplefilter("ignore", SimulationWarning)
            ds = simulate(model, self.regimen, times=self.times, n_subjects=self.n,
                          params=self.individual(values, omegas), covariates=self.covariates, seed=self.seed,
                          progress=False)
        if self.design.measured and self.model.assays:
            from carkin.simulation.measure import measure

            ds = measure(ds, self.model, seed=_seed(self.design.key, self.seed))
        return ds


# --- the statistic an arm reports ------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A simulated arm's value of the row's statistic (``cv_percent`` beside a geometric mean),
    with the (effective) number of virtual patients it rests on."""

    value: float
    n: float
    cv_percent: float = math.nan


NCA_NAMES = {"terminal_half_life": "half_life", "contraction_half_life": "half_life_contraction"}
KINETIC = ("cmax", "tmax", "auc_0_28", "terminal_half_life", "contraction_half_life", "tlast", "fold_expansion")
NORMAL_DETECTION_LIMIT = 1.0  # cells/µL: normal T/NK cells "not detected" by flow (assumption)
# cells/µL: B-cell aplasia below this (assumption: 1% CD19+ of about 1,000 lymphocytes/µL after
# lymphodepletion; one tisagenlecleucel report calls aplasia lost above 1% CD19+ or 100 CD19+ cells/µL:
# a preprint, flamechallenge.authorea.com/users/453372/articles/614197, Methods)
B_CELL_APLASIA_PER_UL = 10.0


def _role(model: Model, role: str) -> str:
    name = model.role(role, required=False)  # the lookup (and the check of the role name) is the model's
    if name is None:
        raise evidence.EvidenceError(f"model {model.name!r} declares no {role!r} role; it cannot be held against "
                                     f"rows that need one (roles: {model.roles})")
    return name


def _below(x, limit, smooth: float):
    """Indicator x < limit, or with ``smooth`` > 0 a logistic step of that width on the log scale."""
    x = np.nan_to_num(np.asarray(x, float), nan=np.inf)  # a failed solve (NaN) is never "below"
    if smooth <= 0:
        return (x < limit).astype(float)
    z = (np.log(limit) - np.log(np.maximum(x, 1e-300))) / smooth
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def response(model: Model, ds: xr.Dataset, by_day: float, limit: float = CR_BLAST_PCT, smooth: float = 0.0):
    """Probability (0/1 when not smoothed) of blasts below ``limit`` at an assessment up to ``by_day``."""
    days = [d for d in ASSESSMENT_DAYS if d <= by_day] or [ASSESSMENT_DAYS[0]]
    b = ds[_role(model, "tumour")].sel(time=days).values
    return 1.0 - np.prod(1.0 - _below(b, limit, smooth), axis=1)


def relapse(model: Model, ds: xr.Dataset, until: float, smooth: float = 0.0):
    """Probability of relapsing by ``until`` (0 for non-responders): blasts back at or above
    CR_BLAST_PCT after the first assessment in remission (by day 90)."""
    b = ds[_role(model, "tumour")]
    t = b["time"].values
    y = b.values
    days = [d for d in ASSESSMENT_DAYS if d <= 90.0]
    free = np.ones(y.shape[0])  # P(no response at the earlier assessments)
    out = np.zeros(y.shape[0])
    for a in days:
        r = _below(b.sel(time=a).values, CR_BLAST_PCT, smooth)
        later = (t > a) & (t <= until)
        peak = y[:, later].max(axis=1) if later.any() else np.zeros(y.shape[0])
        out += free * r * (1.0 - _below(peak, CR_BLAST_PCT, smooth))
        free *= 1.0 - r
    return out


def _nca(model: Model, ds: xr.Dataset, measured: bool) -> xr.Dataset:
    name = _role(model, "exposure")
    if measured and f"{name}_measured" in ds:
        return nca(ds[f"{name}_measured"].sel(time=[d for d in SAMPLING_DAYS if d <= float(ds["time"][-1])]))
    return nca(ds[name])


def _weighted(values: np.ndarray, w: np.ndarray, statistic_name: str) -> Outcome:
    ok = np.isfinite(values) & (w > 0)
    if statistic_name == "geometric_mean":
        ok &= values > 0
    v, w = values[ok], w[ok]
    n = float(w.sum())
    if n <= 0:
        return Outcome(math.nan, 0.0)
    if statistic_name == "geometric_mean":
        lv = np.log(v)
        m = float(np.sum(w * lv) / n)
        # reliability weights: unbiased, and the plain sample variance when the weights are 0/1
        denom = n - float(np.sum(w * w)) / n
        var = float(np.sum(w * (lv - m) ** 2) / denom) if denom > 0 else math.nan
        cv = 100.0 * math.sqrt(math.expm1(min(var, 700.0))) if math.isfinite(var) else math.nan
        return Outcome(math.exp(m), n, cv)
    if statistic_name == "mean":
        return Outcome(float(np.sum(w * v) / n), n)
    order = np.argsort(v)
    cum = np.cumsum(w[order])
    return Outcome(float(v[order][np.searchsorted(cum, 0.5 * cum[-1])]), n)  # weighted median


def statistic(model: Model, claim: Claim, row: evidence.Row, ds: xr.Dataset, dlt_model=None,
              smooth: float = 0.0) -> Outcome:
    """The virtual arm's value of a claimed row's quantity and statistic (module docstring).

    ``smooth`` > 0 replaces the thresholds (response, MRD, relapse) by logistic steps of that
    width on the log scale, so the value moves smoothly with the parameters (calibration)."""
    q, t = claim.quantity or row.quantity, timepoint(claim, row)
    w = (~ds["failed"].values).astype(float)
    if row.subgroup in ("responders", "non_responders", "cr_no_transplant"):
        resp = response(model, ds, 90.0, smooth=smooth)
        w = w * (1.0 - resp if row.subgroup == "non_responders" else resp)
    elif row.subgroup == "relapsed":
        w = w * relapse(model, ds, t, smooth)

    if q in KINETIC:
        res = _nca(model, ds, claim.measured)
        if q == "fold_expansion":
            v = res["cmax"].values / ds[_role(model, "exposure")].isel(time=0).values
        else:
            v = res[NCA_NAMES.get(q, q)].values
        return _weighted(v, w, row.statistic)
    if q in ("cr_rate", "mrd_negative_cr"):
        hit = response(model, ds, t, CR_BLAST_PCT if q == "cr_rate" else MRD_BLAST_PCT, smooth)
        return _weighted(hit, w, "mean")
    if q == "relapse":
        return _weighted(relapse(model, ds, t, smooth), w, "mean")
    if q in ("rfs", "pfs", "efs"):
        ok = (~ds["failed"].values).astype(float)  # failed solves have inf blasts: never respond, weight 0
        resp = response(model, ds, 90.0, smooth=smooth)
        free = resp - relapse(model, ds, t, smooth)
        if row.subgroup in ("responders", "cr_no_transplant"):  # among responders: P(no relapse | response)
            return Outcome(float(np.sum(ok * free) / max(np.sum(ok * resp), 1e-12)), float(np.sum(ok * resp)))
        return _weighted(free, ok, "mean")
    if q == "b_cell_aplasia_relapse_free":  # in remission, not relapsed, and B cells aplastic at t (of all)
        ok = (~ds["failed"].values).astype(float)
        free = response(model, ds, 90.0, smooth=smooth) - relapse(model, ds, t, smooth)
        aplastic = _below(ds[_role(model, "normal")].sel(time=t).values, B_CELL_APLASIA_PER_UL, smooth)
        return _weighted(free * aplastic, ok, "mean")
    if q == "cd_negative_relapse":
        escape, tumour = ds[_role(model, "escape")].sel(time=t).values, ds[_role(model, "tumour")].sel(time=t).values
        with np.errstate(invalid="ignore"):  # failed solves (NaN) carry no weight
            share = escape / np.maximum(tumour, 1e-300)
        return _weighted(1.0 - _below(share, 0.5, smooth * 0.2 if smooth else 0.0), w, "mean")
    if q == "crs_grade3plus":
        if dlt_model is None:
            raise evidence.EvidenceError(f"claim {row.row_id}: a toxicity row needs a DLT model")
        dlt_model = dlt_model.for_model(model)
        peak = dlt_model.exposure(ds[dlt_model.peak_observable]).values
        burden = ds[dlt_model.burden_covariate].values if dlt_model.burden_covariate in ds else None
        return _weighted(dlt_model.probability(peak, burden), w, "mean")
    if q == "persistence":
        name = _role(model, "exposure")
        y = ds[name]
        above = (y >= max(model.assays[name].lloq if name in model.assays else 0.0, 1e-300)).values
        tt = y["time"].values
        last = np.where(above.any(1), tt[y.sizes["time"] - 1 - np.argmax(above[:, ::-1], axis=1)], 0.0)
        return _weighted(last, w, "median")
    if q == "cd7_t_nk_depletion":
        n = ds[_role(model, "normal_state")].values
        tt = ds["time"].values
        gone = n < NORMAL_DETECTION_LIMIT
        return _weighted(np.where(gone.any(1), tt[np.argmax(gone, axis=1)], np.inf), w, "median")
    raise evidence.EvidenceError(f"claim {row.row_id}: no simulation rule for quantity {q!r}")
