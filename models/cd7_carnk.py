"""cd7_carnk — CD7 CAR-NK cells with CD7+ and CD7-negative blasts and normal CD7+ T/NK cells.

What this is
    To our knowledge no kinetic model of CAR-NK cells has been published: this is the
    first. It is a carkin model assembled from the cd7_cart structure (tumour, normal
    CD7+ cells, qPCR conversion, shared code imported from ``carkin.models.cd7_cart``) and from
    qualitative features of CAR-NK clinical reports; it is NOT fitted to data. Every
    CAR-NK-specific value is an assumption, labelled with its rationale.

References (qualitative anchors)
    Liu E et al. N Engl J Med 2020;382:545 (cord-blood CD19 CAR-NK, 1e5-1e7 cells/kg,
      11 patients): the infused CAR-NK cells expanded and persisted at low levels for
      at least 12 months; no CRS, neurotoxicity or GvHD.
    Marin D et al. Nat Med 2024 (CD19 CAR-NK phase 1/2, 37 patients): no CRS,
      neurotoxicity or GvHD.
    Miller JS et al. Blood 2005;105:3051 (haploidentical NK cells after
      cyclophosphamide/fludarabine expand in vivo with the endogenous IL-15 surge).
    Gomes-Silva D et al. Blood 2017;130:285: normal CD7 expression is largely confined
      to T and NK cells, so a CD7 CAR-NK product must avoid fratricide, e.g. by CD7
      knockout or a protein expression blocker (PEBL; Png YT et al. Blood Adv
      2017;1:2348, shown in T cells). Assumed fully avoided here: no fratricide term.
    Seed protocol (CD7 CAR-NK, accelerated titration then 3+3): single infusions of
      1, 2 and 5 x10^7 CAR-NK cells/kg in r/r CD7+ AML / T-ALL / T-LBL (CD7 >= 70%).

Population, covariates, units
    As cd7_cart: WT (kg), BLAST (marrow blast %, typical 40), CD7N0 (normal CD7+
    T/NK cells/µL, typical 600); time in days from the infusion (day 0 = end of
    lymphodepletion); states in blood-equivalent cells/µL.

Structure
    A  = B + N                                      CD7 antigen (CAR-NK are CD7-negative)
    S  = A / (k_a + A)
    W  = exp(-k_ld t)                               post-lymphodepletion cytokine window
    K  = k_kill E / (km_kill + B + N)
    G  = r_t (1 - (B + R) / k_t)
    dE/dt = (rho W S - d_e - k_p) E                 active CAR-NK cells: no fratricide
    dP/dt = k_p E - d_p P                           persistent, quiescent CAR-NK cells
    dB/dt = (G - K) B;  dR/dt = G R;  dN/dt = (s_n CD7N0 + r_n N)(1 - N/CD7N0) - K N
    Doses jump E by cells * f_blood / blood volume (carkin.physiology). Observables as
    cd7_cart with the CAR level from E + P (car_copies, car_cells, cd7_cells = N + f_pb B,
    blasts, blasts_cd7neg, cd7_normal_cells); car_copies measured as cd7_cart's.

Evidence and calibration (``carkin qualify cd7_carnk``)
    No CD7 CAR-NK result was found (data/evidence/README.md): CD19 CAR-NK arms stand in.
    * Persistence: Liu 2020 ("persisted at low levels for at least 12 months", 11 patients,
      1e5-1e7/kg) is a lower bound: the persistent pool (k_p, d_p) is set so the median
      patient at 1e7/kg stays above the qPCR LLOQ to day 365, which it does; a bound cannot
      identify the rates, so they stay assumptions.
    * CRS: no CRS of any grade in Liu 2020 (0/11) and no grade >= 3 CRS with FT596 (0/86) enter
      the toxicity link's calibration, which gives CAR-NK cells their own log-odds offset
      (-3.5; carkin.trials.toxicity.MODEL_OFFSETS): P(grade >= 3 CRS) of about 1% at 1e7/kg and
      3% at 5e7/kg in the accelerated-titration protocol (means over 20 calibration draws).
    * Tumour and normal-cell parameters are cd7_cart's (shared code), including its calibrated
      f_r and r_t; killing and expansion values are assumptions, so this model's response and
      relapse figures are not evidence-based (no CD7 CAR-NK efficacy data exist).

How the values were chosen (all assumptions)
    * Expansion limited to a few-fold above the infused level, peaking within the first
      week (assumption; Liu 2020 reports expansion, then low-level persistence, and NK
      cells lack the memory-driven expansion of T cells): the cytokine window closes fast
      (k_ld 0.25/day, half-life ~3 days) and rho = 0.8/day, so the level peaks on
      day ~5 at ~3-fold the post-infusion level after a single infusion (~1.7-fold for
      a 10/30/60% split, whose later fractions meet a closing window).
    * Half-life of a few days after the peak (d_e 0.2/day, t1/2 3.5 days): NK cells
      without cytokine support persist days to weeks (non-CAR NK: median 10 days, Rubnitz
      2010, kinetics.csv). A small persistent pool (k_p, d_p above) carries the low level seen
      to 12 months with an IL-15-armed product (Liu 2020); an unarmed product may lack it.
    * f_blood 0.02: NK products are infused without the large in-vivo expansion of
      CAR-T, so the blood level is set by the infused dose; chosen so that 1e7 cells/kg
      gives ~3 CAR-NK/µL (~430 copies/µg at VCN 2).
    * Killing: same saturating form and km_kill as cd7_cart; k_kill 20/day (lumped per
      blood CAR-NK cell) chosen to give a dose-response across the protocol's doses
      at typical values: marrow blasts at day 28 ~50%, ~25% and <1% (from 40%) after
      1, 2 and 5 x10^7 cells/kg, with relapse once the CAR-NK cells are gone; normal
      CD7+ T/NK cells fall transiently (blood CD7+ cells at nadir ~75%, 40% and 2% of
      baseline on days 13-16) and recover within ~3 months. No CD7 CAR-NK efficacy
      data were used.
    * Tumour, normal-cell and measurement parameters are shared with cd7_cart.

Solver
    Tsit5, rtol 1e-6, atol 1e-6 cells/µL, dt0 0.05 day: mean 39-54 and max 99-120
    steps over 91 days in 1000-subject populations at 1-5e7 cells/kg; agreement with
    a tight scipy reference is checked in tests/test_cd7_models.py. E may undershoot
    zero by O(atol) once it has decayed to ~1e-6 cells/µL.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from carkin.model.kinetics import Model, Parameter, SolverSettings, State
from carkin.model.physiology import blood_volume_ul
from carkin.qualification.arms import Claim

from .cd7_cart import (
    ASSAYS,
    COVARIATES,
    OBSERVABLES,
    ROLES,
    TUMOUR_NORMAL_PARAMETERS,
    cd7_observables,
    kill_rate,
    tumour_normal_initial,
    tumour_normal_rates,
)

CAR_NK_NOTE = ("a CD19 CAR-NK product (IL-15-armed cord blood) stands in for CAR-NK cells in general: no CD7 CAR-NK "
               "result was found; CD7 antigen and burden as the model's defaults (assumption)")
CLAIMS = (
    Claim("liu2020_all_persistence", dose_per_kg=1e7, age_years=(18.0, 70.0),
          note=CAR_NK_NOTE + "; taken at the top dose level 1e7/kg; the median patient stays above the qPCR LLOQ "
                             "(50 copies/µg, assumption) to day 365"),
    Claim("liu2020_all_crs_any", "calibration", quantity="crs_grade3plus", age_years=(18.0, 70.0),
          note=CAR_NK_NOTE + "; no CRS of any grade in 11 patients bounds grade >= 3; dose 1e6/kg, the middle of "
                             "the three levels"),
    Claim("ft596_all_crs_g3plus", "calibration", dose_per_kg=1e7, age_years=(18.0, 80.0),
          note="iPSC-derived CD19 CAR-NK (FT596) stands in for CAR-NK cells; flat doses up to 9e8 cells (about "
               "1.3e7/kg at 70 kg): taken at 1e7/kg (assumption)"),
)


@dataclass(frozen=True)
class CD7CARNK(Model):
    name = "cd7_carnk"
    title = ("CD7 CAR-NK: short-lived, modestly expanding CAR-NK cells, CD7+/CD7- blasts, normal CD7+ T/NK "
             "(first CAR-NK kinetic model; assembled, not fitted)")
    states = (
        State("E", "cells/µL", "CAR-NK cells"),
        State("B", "cells/µL", "CD7+ leukaemic blasts (blood-equivalent)"),
        State("R", "cells/µL", "CD7-negative leukaemic blasts (blood-equivalent), not killed"),
        State("N", "cells/µL", "normal CD7+ T and NK cells"),
        State("P", "cells/µL", "persistent (long-lived, quiescent) CAR-NK cells"),
    )
    parameters = (
        Parameter("rho", 0.8, "1/day", "maximal CAR-NK expansion rate (full stimulus, open window)",
                  "assumption: with k_ld, a ~3-fold expansion peaking by day ~5 (limited expansion; Liu et al. "
                  "2020, NEJM 382:545: expansion, then low-level persistence)", 0.3),
        Parameter("k_a", 200.0, "cells/µL", "antigen half-saturation of stimulation",
                  "assumption: as cd7_cart", 0.5),
        Parameter("k_ld", 0.25, "1/day", "decay rate of the post-lymphodepletion cytokine window",
                  "assumption: NK expansion after lymphodepletion follows the transient IL-15 surge (Miller et al. "
                  "2005, Blood 105:3051); window half-life ~3 days", 0.3),
        Parameter("d_e", 0.2, "1/day", "CAR-NK death rate",
                  "assumption: half-life ~3.5 days; CAR-NK persist days to weeks", 0.3),
        Parameter("k_kill", 20.0, "cells/(cell·day)", "maximal CD7+ targets killed per CAR-NK cell per day",
                  "assumption: lumped per blood CAR-NK cell; gives a dose-response over 1-5e7 cells/kg (day-28 "
                  "blasts ~50%, ~25%, <1% from 40%)", 0.4),
        Parameter("km_kill", 1000.0, "cells/µL", "target half-saturation of killing", "assumption: as cd7_cart", 0.3),
        Parameter("k_p", 0.02, "1/day", "conversion of active CAR-NK cells to a long-lived quiescent pool",
                  "assumption: with d_p, chosen so that the median subject stays above the qPCR LLOQ for at least "
                  "12 months at 1e7 cells/kg (Liu et al. 2020, NEJM 382:545: 'persisted at low levels for at least "
                  "12 months', a lower bound that cannot identify a rate)", 0.5),
        Parameter("d_p", 0.002, "1/day", "loss rate of persistent CAR-NK cells",
                  "assumption: half-life about a year, in line with low-level detection to 12 months (Liu 2020); "
                  "not identified by any evidence row", 0.5),
        Parameter("f_blood", 0.02, "1", "fraction of infused CAR-NK cells found in blood after distribution",
                  "assumption: 1e7 cells/kg gives ~3 CAR-NK cells/µL", 0.5, kind="fraction"),
        *TUMOUR_NORMAL_PARAMETERS,
    )
    observables = OBSERVABLES
    covariates = COVARIATES
    assays = ASSAYS
    roles = ROLES
    cell_type = "CAR-NK"
    claims = CLAIMS
    dose_state = "E"
    solver = SolverSettings(rtol=1e-6, atol=1e-6, solver="Tsit5", max_steps=4096, dt0=0.05)

    def initial_state(self, p, cov):
        b0, r0, n0 = tumour_normal_initial(p, cov)
        zero = 0.0 * b0
        return jnp.stack([zero, b0, r0, n0, zero])

    def vector_field(self, t, y, p, cov, phase):
        e, b, r, n, q = y[0], y[1], y[2], y[3], y[4]
        antigen = b + n
        stim = antigen * (1.0 / (p["k_a"] + antigen))  # a reciprocal: derivatives multiply (cd7_cart.py)
        window = jnp.exp(-p["k_ld"] * t)
        de = (p["rho"] * window * stim - p["d_e"] - p["k_p"]) * e
        dq = p["k_p"] * e - p["d_p"] * q
        db, dr, dn = tumour_normal_rates(kill_rate(e, b, n, p), b, r, n, p, cov)
        return jnp.stack([de, db, dr, dn, dq])

    def observe(self, y, p, cov):
        car = y[..., 0] + y[..., 4]
        return cd7_observables(car, 0.0 * car, y[..., 1], y[..., 2], y[..., 3], p)

    def cells_to_state(self, p, cov):
        return p["f_blood"] / blood_volume_ul(cov["WT"])


MODEL = CD7CARNK
