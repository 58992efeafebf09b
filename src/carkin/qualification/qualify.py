"""Qualification: every evidence row a model claims to describe, simulated under that row's design.

``qualify(model_name)`` returns one line per claim (and a second line for the between-subject
CV% behind a geometric mean): the reported value and its source, carkin's value from a virtual
arm of the row's design, the tolerance (carkin.evidence.TOLERANCE_RULES) and whether it passes.
A claim the model is known not to meet stays in the table, marked with its reason.
"""

from __future__ import annotations

import math

import pandas as pd

from carkin.model.library import load_model
from carkin.qualification import evidence
from carkin.qualification.arms import DEFAULT_N, DEFAULT_SEED, Claim, VirtualArm, design_of, statistic

COLUMNS = ("model", "row_id", "role", "quantity", "statistic", "reported", "unit", "carkin", "tolerance_low",
           "tolerance_high", "passed", "n_virtual", "source", "note")


def model_claims(model_name: str) -> tuple[Claim, ...]:
    """The claims of a library model (its ``claims`` attribute)."""
    return tuple(getattr(load_model(model_name), "claims", ()))


def arm_for(model_name: str, claim: Claim, n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> VirtualArm:
    model = load_model(model_name, **dict(claim.options))
    return VirtualArm(model, design_of(claim, evidence.row(claim.row)), n=n, seed=seed)


def interval(claim: Claim, row: evidence.Row) -> evidence.Interval:
    if claim.tolerance is not None:
        return evidence.Interval(float(claim.tolerance[0]), float(claim.tolerance[1]),
                                 "explicit tolerance of the claim (reason in its note)")
    return evidence.tolerance(row)


def qualify_claim(model_name: str, claim: Claim, *, n: int = DEFAULT_N, seed: int = DEFAULT_SEED, dlt_model=None,
                  values=None, omegas=None) -> list[dict]:
    """The qualification line(s) of one claim."""
    from carkin.trials.toxicity import dlt_model_for

    arm = arm_for(model_name, claim, n, seed)
    row = evidence.row(claim.row)
    ds = arm.simulate(values, omegas)
    out = statistic(arm.model, claim, row, ds, dlt_model or dlt_model_for(arm.model))
    quantity = claim.quantity or row.quantity
    tol = interval(claim, row)
    def note(known: str) -> str:
        return "; ".join(x for x in (claim.note, f"known failure: {known}" if known else "") if x)

    base = {"model": model_name, "row_id": row.row_id, "role": claim.role, "statistic": row.statistic,
            "unit": row.unit, "n_virtual": out.n, "source": row.citation}
    lines = [{**base, "quantity": quantity, "reported": row.value, "carkin": out.value,
              "note": note(claim.known_failure), "tolerance_low": tol.low, "tolerance_high": tol.high,
              "passed": tol.contains(out.value)}]
    cv = evidence.cv_interval(row)
    if cv is not None and claim.tolerance is None:
        lines.append({**base, "quantity": f"{quantity} CV%", "statistic": "cv_percent", "unit": "%",
                      "reported": row.dispersion_low, "carkin": out.cv_percent, "note": note(claim.known_failure_cv),
                      "tolerance_low": cv.low, "tolerance_high": cv.high, "passed": cv.contains(out.cv_percent)})
    return lines


def qualify(model_name: str, *, n: int = DEFAULT_N, seed: int = DEFAULT_SEED, rows=None, dlt_model=None, values=None,
            omegas=None) -> pd.DataFrame:
    """One line per claim of ``model_name`` (``rows`` limits it to some row ids); ``values`` and ``omegas``
    replace the model's typical values and between-subject SDs (e.g. a calibration's mode)."""
    claims = [c for c in model_claims(model_name) if rows is None or c.row in rows]
    if rows is not None:
        unknown = sorted(set(rows) - {c.row for c in claims})
        if unknown:
            raise evidence.EvidenceError(f"model {model_name!r} makes no claim on row(s) {unknown}; its claims are "
                                         f"{[c.row for c in model_claims(model_name)]}")
    lines = [line for c in claims for line in qualify_claim(model_name, c, n=n, seed=seed, dlt_model=dlt_model,
                                                            values=values, omegas=omegas)]
    return pd.DataFrame(lines, columns=list(COLUMNS))


def format_value(x: float) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "inf" if x == math.inf else "n/a"
    if x == 0:
        return "0"
    a = abs(x)
    return f"{x:,.0f}" if a >= 1000 else f"{x:.3g}"


def short_source(citation: str) -> str:
    """'Liu E, 2020, N Engl J Med, ...' -> 'Liu E 2020'; a label keeps its first words."""
    parts = [p.strip() for p in str(citation).split(",")]
    if len(parts) > 1 and parts[1][:4].isdigit():
        return f"{parts[0]} {parts[1][:4]}"
    return " ".join(parts[0].split()[:4])


def summary_lines(table: pd.DataFrame) -> tuple[list[list[str]], int]:
    """Printable lines (row, role, quantity, reported, carkin, tolerance, pass) and the number of lines
    whose outcome contradicts the claim's mark (an unmarked failure, or a known failure that passes)."""
    lines, bad = [], 0
    for _, r in table.iterrows():
        known = "known failure" in (r["note"] or "")
        flag = ("pass" if r["passed"] else "FAIL") + (" (known)" if known and not r["passed"] else "")
        if r["passed"] == known:
            bad += 1
            flag += " !" if r["passed"] else ""
        reported = f"{format_value(r['reported'])} ({short_source(r['source'])})"
        lines.append([r["row_id"], r["role"], r["quantity"], reported, format_value(r["carkin"]),
                      f"{format_value(r['tolerance_low'])} to {format_value(r['tolerance_high'])}", flag])
    return lines, bad
