"""The design of a fit: what the likelihood needs from a dataset, as padded per-subject arrays
(time grids, doses, covariates) and per-observation indices into them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from carkin.errors import InputError
from carkin.fitting.data import StudyData
from carkin.model.kinetics import Model


class ModelDataError(InputError):
    """The dataset does not fit the model (unknown observable, missing covariate...)."""


# --- the design: what the likelihood needs from the data, as padded arrays -------------------


@dataclass(frozen=True, kw_only=True)
class FitDesign:
    """Per-subject time grids and doses, and per-observation indices into them."""

    times: np.ndarray  # (S, T) sorted unique observation times, padded with the last one
    dose_times: np.ndarray  # (S, D)
    dose_cells: np.ndarray  # (S, D)
    model_covariates: np.ndarray  # (S, C) values of the model's covariates (WT, BLAST...)
    obs_subject: np.ndarray  # (N,)
    obs_tindex: np.ndarray  # (N,)
    obs_kind: np.ndarray  # (N,) index into ``observables``
    observables: tuple[str, ...]
    y: np.ndarray  # (N,) natural units; NaN where BLQ without value
    blq: np.ndarray  # (N,)
    lloq: np.ndarray  # (N,)
    ids: tuple = ()  # subject IDs as in the data

    @property
    def n_subjects(self) -> int:
        return self.times.shape[0]


def build_design(model: Model, data: StudyData) -> FitDesign:
    """Map the dataset onto the model: observables by name, model covariates by column."""
    names = [o.name for o in model.observables]
    obs_names = np.array([n if n else names[0] for n in data.obs_observable.astype(str)])
    unknown = sorted(str(n) for n in set(obs_names) - set(names))
    if unknown:
        raise ModelDataError(
            f"{data.path}: observable(s) {unknown} are not outputs of model {model.name!r} "
            f"(its observables: {', '.join(names)}); map each DVID to one of them in the sidecar"
        )
    fitted = tuple(n for n in names if n in set(obs_names))
    kind = np.array([fitted.index(n) for n in obs_names], dtype=np.int32)

    S = data.n_subjects
    # each subject's sorted unique observation times, by one sort of (subject, time) rather than a scan per subject
    pairs = np.unique(np.stack([data.obs_subject.astype(float), data.obs_time.astype(float)], axis=1), axis=0)
    per_subject = np.bincount(pairs[:, 0].astype(np.int64), minlength=S)
    T = max(1, int(per_subject.max(initial=0)))
    first = np.concatenate([[0], np.cumsum(per_subject)[:-1]])
    times = np.zeros((S, T))
    slot = np.arange(len(pairs)) - first[pairs[:, 0].astype(np.int64)]
    times[pairs[:, 0].astype(np.int64), slot] = pairs[:, 1]
    last = np.where(per_subject > 0, times[np.arange(S), np.maximum(per_subject - 1, 0)], 0.0)
    times = np.where(np.arange(T)[None, :] < per_subject[:, None], times, last[:, None])  # pad with the last time
    # index of each observation's time in its subject's grid
    row = times[data.obs_subject]
    tindex = np.argmax(row == np.asarray(data.obs_time, float)[:, None], axis=1).astype(np.int32)

    cov = np.zeros((S, len(model.covariates)))
    for j, c in enumerate(model.covariates):
        given = data.covariates.get(c.name)
        values = np.full(S, np.nan) if given is None else np.asarray(given, dtype=float)
        missing = ~(np.isfinite(values) & (values > 0))
        if missing.any():
            ids = [data.ids[i] for i in np.flatnonzero(missing)[:10]]
            warnings.warn(
                f"{data.path}: model covariate {c.name} ({c.description}) is missing for subject(s) {ids}"
                f"{' and more' if missing.sum() > 10 else ''}; the model's typical value {c.typical:g} {c.unit} "
                "is used for them", UserWarning, stacklevel=3)
            values = np.where(missing, c.typical, values)
        cov[:, j] = values

    dose_t, dose_c = data.dose_times, data.dose_cells
    if dose_t.shape[1] == 0:  # no doses anywhere: one empty infusion on day 0 keeps the shapes
        dose_t, dose_c = np.zeros((S, 1)), np.zeros((S, 1))
    return FitDesign(times=times, dose_times=np.asarray(dose_t, float), dose_cells=np.asarray(dose_c, float),
                     model_covariates=cov, obs_subject=np.asarray(data.obs_subject, np.int32), obs_tindex=tindex,
                     obs_kind=kind, observables=fitted, y=np.asarray(data.obs_value, float),
                     blq=np.asarray(data.obs_blq, bool), lloq=np.asarray(data.obs_lloq, float), ids=tuple(data.ids))


Design = FitDesign  # the name it had before; not the trial designs of carkin.trials
