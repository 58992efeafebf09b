"""Body size: blood volume per kg by body weight, so per-kg doses in children scale as they should.

A dose in cells/kg spread over the blood gives cells/µL = dose x f_blood / (blood volume per kg).
Children have more blood per kg than adults (Linderkamp et al. 1977: about 80 mL/kg at 2-3 years,
71 mL/kg at 11-14 years; adults 65-70 mL/kg), so the same per-kg dose gives a child a lower
blood concentration. The knots below are the age groups' means (boys and girls averaged), placed
at the age-typical weight of each group (carkin.protocol.typical_weight_kg: 2 x age + 8 kg to 12
years); between knots the value is interpolated in log weight, and held flat outside them.
The values and their sources are rows of data/evidence/physiology.csv. Cell-intrinsic rates
(proliferation, death, killing) are not scaled with body size (assumption).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# (typical weight of the age group in kg, blood volume in mL/kg)
BLOOD_VOLUME_KNOTS = (
    (13.0, 79.75),  # 2-3 y: Linderkamp 1977 Table 1, boys 80.5 and girls 79.0 (bv_linderkamp_2_3y_*)
    (18.0, 77.05),  # 4-6 y: 76.7 and 77.4 (bv_linderkamp_4_6y_*)
    (25.0, 76.15),  # 7-10 y: 79.6 and 72.7 (bv_linderkamp_7_10y_*)
    (38.0, 71.35),  # 11-14 y: 74.4 and 68.3 (bv_linderkamp_11_14y_*)
    (70.0, 67.5),  # adult: middle of 65-70 mL/kg (Iowa Protocols, after Roseff 2002; bv_iowa_adult)
)
UL_PER_ML = 1000.0
_LOG_W = np.log([w for w, _ in BLOOD_VOLUME_KNOTS])
_ML_PER_KG = np.array([v for _, v in BLOOD_VOLUME_KNOTS])


def blood_volume_ml_per_kg(weight_kg):
    """Blood volume per kg of body weight (mL/kg) at ``weight_kg`` (JAX and numpy alike)."""
    return jnp.interp(jnp.log(weight_kg), jnp.asarray(_LOG_W), jnp.asarray(_ML_PER_KG))


def blood_volume_ul(weight_kg):
    """Whole blood volume in µL."""
    return blood_volume_ml_per_kg(weight_kg) * weight_kg * UL_PER_ML
