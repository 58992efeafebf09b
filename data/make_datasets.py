"""Write the example datasets in data/: NONMEM-style CSV files with TOML sidecars, simulated with known truth.

    python data/make_datasets.py            # rewrites data/stein_sim.{csv,toml} and data/cd7_sim.{csv,toml}

stein_sim: 40 subjects from stein_2019 at its Table 1 values (typical values, between-subject
    variability, log-scale residual error 0.56), qPCR-like sampling on days 0, 1, 4, 7, 11,
    14, 21, 28, 56, 90 and 180, DV = log10(copies/µg gDNA); the LLOQ is the round value
    that leaves 15-30% of the late samples (days 56-180) below it.
cd7_sim: 30 subjects from cd7_cart (naturally selected product) after a 10/30/60% split
    infusion of 1, 3 or 10 x10^6 cells/kg; CAR transgene levels (DVID 1, log10 copies/µg)
    and CD7+ cells/µL (DVID 2); between-subject variability on rho, k_kill, d_e and f_blood
    only (the others at their typical values), log-scale residual errors 0.4 and 0.3.

Every sidecar records the generating model, the true values, the seed and this script.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

import carkin as ck

HERE = Path(__file__).parent
SCRIPT = "data/make_datasets.py"
STEIN_DAYS = (0, 1, 4, 7, 11, 14, 21, 28, 56, 90, 180)
STEIN_SIGMA = 0.56  # Stein et al. 2019: log-scale residual error
LATE_DAY = 56
LLOQ_CANDIDATES = (5, 10, 20, 25, 50, 100)  # copies/µg gDNA: round values a lab would report
BLQ_TARGET = (0.15, 0.30)
CD7_DAYS = (0, 1, 2, 4, 7, 10, 14, 21, 28, 42, 56, 90)
CD7_DOSES = (1e6, 3e6, 1e7)
CD7_RANDOM = ("rho", "k_kill", "d_e", "f_blood")
CD7_SIGMA = {"car_copies": 0.4, "cd7_cells": 0.3}
CD7_LLOQ = {"car_copies": 10.0, "cd7_cells": 5.0}  # flow cytometry: ~5 cells/µL


def _fmt(x: float) -> str:
    return "." if not np.isfinite(x) else f"{x:.6g}"


def _toml_value(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(float(v)) if isinstance(v, float) else str(v)


def write_toml(path: Path, tables: dict) -> None:
    lines = []
    for table, content in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in content.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def stein_dataset(seed: int = 20191) -> None:
    model = ck.load_model("stein_2019")
    rng = np.random.default_rng(seed)
    n = 40
    weight = np.clip(np.exp(rng.normal(np.log(40.0), 0.5, n)), 14.0, 140.0)
    age = np.clip(np.round(np.exp(rng.normal(np.log(12.0), 0.5, n))), 3, 25)
    dose_per_kg = np.where(weight <= 50, 3.1e6, 1.0e8 / weight)  # ELIANA: 0.2-5e6/kg (<=50 kg) or 0.1-2.5e8 cells
    sim = ck.simulate(model, ck.single(1.0), times=list(STEIN_DAYS), n_subjects=n, seed=seed,
                      covariates={"WT": weight})
    f = sim["car_copies"].values
    y = f * np.exp(STEIN_SIGMA * rng.standard_normal(f.shape))
    late = np.array(STEIN_DAYS) >= LATE_DAY
    fractions = {q: float((y[:, late] < q).mean()) for q in LLOQ_CANDIDATES}
    inside = [q for q, fr in fractions.items() if BLQ_TARGET[0] <= fr <= BLQ_TARGET[1]]
    lloq = min(inside, key=lambda q: abs(fractions[q] - 0.22))
    rows = []
    for i in range(n):
        common = {"ID": i + 1, "WT": round(float(weight[i]), 1), "AGE": int(age[i])}
        rows.append({**common, "TIME": 0.0, "EVID": 1, "AMT": float(f"{dose_per_kg[i]:.4g}"), "CMT": 1,
                     "DV": ".", "MDV": 1, "DVID": 1, "BLQ": 0, "LLOQ": "."})
        for j, t in enumerate(STEIN_DAYS):
            blq = y[i, j] < lloq
            rows.append({**common, "TIME": float(t), "EVID": 0, "AMT": ".", "CMT": 1,
                         "DV": "." if blq else _fmt(math.log10(y[i, j])), "MDV": 0, "DVID": 1,
                         "BLQ": int(blq), "LLOQ": _fmt(math.log10(lloq))})
    cols = ["ID", "TIME", "EVID", "AMT", "CMT", "DV", "MDV", "DVID", "BLQ", "LLOQ", "WT", "AGE"]
    pd.DataFrame(rows)[cols].to_csv(HERE / "stein_sim.csv", index=False)
    truth = {p.name: v for p, (_, v) in zip(model.parameters, model.values)}
    truth.update({f"omega_{p.name}": round(p.omega, 6) for p in model.parameters})
    truth["sigma_car_copies"] = STEIN_SIGMA
    write_toml(HERE / "stein_sim.toml", {
        "dataset": {"description": "40 simulated tisagenlecleucel-like subjects (stein_2019, Table 1 values)",
                    "amt_unit": "cells/kg", "time_unit": "day"},
        "dvid.1": {"observable": "car_copies", "unit": "copies/µg gDNA", "transform": "log10", "scale": "log",
                   "lloq": float(lloq)},
        "covariates": {"WT": "kg", "AGE": "year"},
        "generation": {"model": "stein_2019", "seed": seed, "script": SCRIPT, "n_subjects": n,
                       "residual_error": "log-additive", "blq_late_fraction": round(fractions[lloq], 3)},
        "generation.true_values": truth,
    })
    print(f"stein_sim: LLOQ {lloq} copies/µg; BLQ fraction of samples on days >= {LATE_DAY}: "
          f"{fractions[lloq]:.2f}; overall {float((y < lloq).mean()):.2f}")


def cd7_dataset(seed: int = 7) -> None:
    model = ck.load_model("cd7_cart")
    rng = np.random.default_rng(seed)
    n = 30
    dose = np.array(CD7_DOSES)[np.arange(n) % len(CD7_DOSES)]
    weight = np.clip(np.exp(rng.normal(np.log(55.0), 0.3, n)), 30.0, 120.0)
    age = np.clip(np.round(rng.uniform(14, 65, n)), 14, 65)
    blast = np.clip(np.exp(rng.normal(np.log(30.0), 0.8, n)), 0.5, 95.0)
    cd7n0 = np.clip(np.exp(rng.normal(np.log(600.0), 0.4, n)), 100.0, 2000.0)
    typ = model.typical
    theta = {k: np.full(n, v) for k, v in typ.items()}
    for name in CD7_RANDOM:
        p = model.parameter(name)
        z = p.omega * rng.standard_normal(n)
        if p.kind == "fraction":
            logit = math.log(typ[name]) - math.log1p(-typ[name])
            theta[name] = 1.0 / (1.0 + np.exp(-(logit + z)))
        else:
            theta[name] = typ[name] * np.exp(z)
    f = {o: np.zeros((n, len(CD7_DAYS))) for o in CD7_SIGMA}
    for d in CD7_DOSES:
        sel = np.flatnonzero(dose == d)
        sim = ck.simulate(model, ck.split(d), times=list(CD7_DAYS), n_subjects=len(sel), seed=seed,
                          params={k: v[sel] for k, v in theta.items()},
                          covariates={"WT": weight[sel], "BLAST": blast[sel], "CD7N0": cd7n0[sel]})
        for o in f:
            f[o][sel] = sim[o].values
    rows = []
    for i in range(n):
        common = {"ID": 101 + i, "WT": round(float(weight[i]), 1), "AGE": int(age[i]),
                  "BLAST": round(float(blast[i]), 2), "CD7N0": round(float(cd7n0[i]), 1),
                  "PRODUCT": "naturally_selected"}
        for day, frac in zip((0.0, 1.0, 2.0), (0.1, 0.3, 0.6)):
            rows.append({**common, "TIME": day, "EVID": 1, "AMT": float(f"{frac * dose[i]:.4g}"), "CMT": 1,
                         "DV": ".", "MDV": 1, "DVID": ".", "BLQ": 0, "LLOQ": "."})
        for j, t in enumerate(CD7_DAYS):
            for dvid, name in ((1, "car_copies"), (2, "cd7_cells")):
                y = f[name][i, j] * math.exp(CD7_SIGMA[name] * rng.standard_normal())
                blq = y < CD7_LLOQ[name]
                value = math.log10(y) if name == "car_copies" else y
                lloq = math.log10(CD7_LLOQ[name]) if name == "car_copies" else CD7_LLOQ[name]
                rows.append({**common, "TIME": float(t), "EVID": 0, "AMT": ".", "CMT": dvid + 1,
                             "DV": "." if blq else _fmt(value), "MDV": 0, "DVID": dvid, "BLQ": int(blq),
                             "LLOQ": _fmt(lloq)})
    df = pd.DataFrame(rows)
    df = df.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    cols = ["ID", "TIME", "EVID", "AMT", "CMT", "DV", "MDV", "DVID", "BLQ", "LLOQ", "WT", "AGE", "BLAST",
            "CD7N0", "PRODUCT"]
    df[cols].to_csv(HERE / "cd7_sim.csv", index=False)
    truth = {k: float(v) for k, v in typ.items()}
    truth.update({f"omega_{k}": model.parameter(k).omega for k in CD7_RANDOM})
    truth.update({f"sigma_{k}": v for k, v in CD7_SIGMA.items()})
    obs = df[df["EVID"] == 0]
    write_toml(HERE / "cd7_sim.toml", {
        "dataset": {"description": "30 simulated r/r CD7+ T-ALL subjects after split CD7 CAR-T infusion "
                                   "(cd7_cart, naturally selected product)",
                    "amt_unit": "cells/kg", "time_unit": "day"},
        "dvid.1": {"observable": "car_copies", "unit": "copies/µg gDNA", "transform": "log10", "scale": "log"},
        "dvid.2": {"observable": "cd7_cells", "unit": "cells/µL", "transform": "none", "scale": "log"},
        "covariates": {"WT": "kg", "AGE": "year", "BLAST": "%", "CD7N0": "cells/µL", "PRODUCT": ""},
        "generation": {"model": "cd7_cart", "product_type": "naturally_selected", "seed": seed, "script": SCRIPT,
                       "n_subjects": n, "random_effects": list(CD7_RANDOM), "residual_error": "log-additive",
                       "doses_per_kg": list(CD7_DOSES), "schedule": "split 10/30/60% on days 0/1/2"},
        "generation.true_values": truth,
    })
    print(f"cd7_sim: BLQ fraction car_copies {obs[obs.DVID == 1].BLQ.mean():.2f}, "
          f"cd7_cells {obs[obs.DVID == 2].BLQ.mean():.2f}")


if __name__ == "__main__":
    stein_dataset()
    cd7_dataset()
