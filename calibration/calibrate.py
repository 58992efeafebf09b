"""Calibrate the mechanistic models and the toxicity link against data/evidence, writing data/calibration/.

    python calibration/calibrate.py            # all stages, writes data/calibration/*.json (about 20 min, 2 cores)
    python calibration/calibrate.py --check    # rerun to the modes (about 4 min) and compare with the shipped files

Stage 1, per model with a calibration spec (the model file's ``calibration``): typical values
and between-subject SDs against the model's calibration claims (carkin.calibration.calibrate).
Stage 2: the toxicity link (carkin.toxicity) against every model's calibration claims on
grade >= 3 CRS, at the stage-1 kinetics (carkin.calibration.LinkSpec can also estimate a kinetic
parameter with the link; none is, at present).
The model files carry the modes (a test holds them to data/calibration/); the draws are what
what-if runs and trial simulations use to carry the uncertainty (carkin.uncertainty).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import carkin as ck
from carkin import calibration
from carkin.model.library import load_model
from carkin.qualification.calibration import LinkSpec, Prior

ck.configure()  # every CPU core a JAX device; compiled programs cached on disk

OUT = Path(__file__).resolve().parent.parent / "data" / "calibration"
KINETIC_MODELS = ("cd19_cart", "cd7_cart")
LINK_MODELS = ("cd19_cart", "cd7_cart", "cd7_carnk")
LINK = LinkSpec(
    intercept=Prior(-2.2, 1.5, "logit(0.1): the assumption link's 10% at a 1e4 copies/ug peak and 10% blasts"),
    slope_peak=Prior(1.0, 1.0, "assumption link's slope: odds x2.7 per ten-fold peak"),
    slope_burden=Prior(0.7, 1.0, "assumption link's slope: odds x2 per ten-fold burden"),
    offsets=(("cd7_carnk", Prior(0.0, 2.0, "no prior preference: CAR-NK cells may differ from CAR-T in CRS risk at "
                                           "equal exposure either way")),
             ("cd19_cart", Prior(0.0, 1.0, "no prior preference: CD19 and CD7 CAR-T may differ in severe CRS at equal "
                                           "early exposure and burden (target, products; the CD19 arms' Penn scale "
                                           "counts more grade >= 3 than ASTCT, JULIET regrading)"))),
)
CHECK_RTOL = 0.25  # --check: modes agree within 25% (log/logit scale differences below log 1.25)


def fitted_values(result: dict) -> tuple[dict, dict]:
    values = {k: v for k, v in result["mode"].items() if not k.startswith("omega_")}
    omegas = {k[len("omega_"):]: v for k, v in result["mode"].items() if k.startswith("omega_")}
    return values, omegas


def run(out: Path | None, stages=("kinetic", "link"), shipped: Path = OUT, models=KINETIC_MODELS,
        draws: bool = True) -> dict:
    """Run the stages; each result is written to ``out`` as soon as it is done (None: write nothing).
    The link stage reads the kinetic results from this run, or from ``out``/``shipped`` when skipped.
    ``draws=False`` stops each stage at its mode (the reproducibility check)."""
    results = {}
    say = lambda text: print(text, flush=True)  # noqa: E731
    for name in models:
        if "kinetic" in stages:
            results[name] = calibration.calibrate(name, load_model(name).calibration, progress=say, draws=draws)
            if out is not None:
                calibration.save(results[name], out / f"{name}.json")
    if "link" in stages:
        fitted = {}
        for name in KINETIC_MODELS:
            res = results.get(name)
            if res is None:
                folder = out if out is not None and (out / f"{name}.json").is_file() else shipped
                res = json.loads((folder / f"{name}.json").read_text())
            fitted[name] = fitted_values(res)
        results["toxicity"] = calibration.calibrate_link(LINK, calibration.toxicity_claims(LINK_MODELS), fitted,
                                                         progress=say, draws=draws)
        if out is not None:
            calibration.save(results["toxicity"], out / "toxicity.json")
    return results


def compare(new: dict, old: dict) -> list[str]:
    bad = []
    for key, res in new.items():
        for k, v in res["mode"].items():
            o = old.get(key, {}).get("mode", {}).get(k)
            if o is None:
                bad.append(f"{key}.{k}: not in the shipped file")
            elif (v > 0 and o > 0 and abs(math.log(v / o)) > math.log1p(CHECK_RTOL)) or (v * o <= 0 and v != o):
                bad.append(f"{key}.{k}: {v:.4g} now, {o:.4g} shipped")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="rerun to the modes (no Metropolis draws) and compare with --out, write nothing")
    ap.add_argument("--out", default=str(OUT), help="folder for the JSON results (default %(default)s)")
    ap.add_argument("--models", default=",".join(KINETIC_MODELS),
                    help="models of the kinetic stage (default %(default)s); the others' results are read from --out")
    ap.add_argument("--stages", default="kinetic,link",
                    help="kinetic, link or both (default %(default)s); the link stage alone reads the kinetic "
                         "results from --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    stages = tuple(s.strip() for s in args.stages.split(","))
    models = tuple(m.strip() for m in args.models.split(","))
    if set(models) - set(KINETIC_MODELS):
        ap.error(f"--models takes {', '.join(KINETIC_MODELS)}, got {args.models!r}")
    if not stages or set(stages) - {"kinetic", "link"}:
        ap.error(f"--stages takes kinetic and/or link, got {args.stages!r}")
    t0 = time.perf_counter()
    if args.check:
        results = run(None, stages, models=models, draws=False)
        old = {k: json.loads((out / f"{k}.json").read_text()) for k in results}
        bad = compare(results, old)
        print(f"calibration rerun in {time.perf_counter() - t0:.0f} s: "
              + ("reproduces the shipped modes" if not bad else "differs: " + "; ".join(bad)))
        return 1 if bad else 0
    out.mkdir(parents=True, exist_ok=True)
    results = run(out, stages, models=models)
    for key, res in results.items():
        print(f"{key}: {json.dumps({k: float(f'{v:.4g}') for k, v in res['mode'].items()})}")
    print(f"wrote {out}/ in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
