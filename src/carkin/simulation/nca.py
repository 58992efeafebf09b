"""Non-compartmental analysis (NCA) of cellular kinetics profiles.

``nca`` works on gridded data (an xarray object with a ``time`` dimension, e.g. a
simulation); ``nca_long`` on observed long-format data (one row per sample).
Both return Cmax, Tmax, AUC0-28, AUClast, Clast, Tlast, the terminal phase (lambda_z,
half-life, number of points, adjusted R², span ratio) and the contraction phase.

Terminal phase (the rule, PKNCA-style): log-linear fits on the last k quantifiable points
after Tmax (Tmax itself excluded), inside ``lambda_z_window`` when given, for every k >= 3;
the best adjusted R² wins, fits within ADJ_R2_TOLERANCE of it count as ties and the one
with the most points is taken. The fit must fall (lambda_z > 0) and span at least
``min_span_ratio`` half-lives (span ratio = (last - first time of the fit) / half-life);
otherwise lambda_z and the half-life are NaN. CAR profiles are biphasic (contraction over
weeks, persistence over months): on a sparse or short tail the terminal fit lands on the
slow persistence phase and its half-life is not estimable, which the span rule reports as
NaN instead of a half-life of thousands of days.

Contraction phase: one log-linear fit over every quantifiable point after Tmax up to
``contraction_end`` (default day 28, the window in which CAR levels contract after the
peak); at least 3 points and a falling fit, else NaN.

BLQ rule: a value is BLQ when it is missing (NaN) or below the LLOQ. BLQ values
before the first quantifiable value are set to 0 (pre-expansion); BLQ values after
it are treated as missing: excluded from the AUC (the trapezoid joins the
neighbouring quantifiable points) and from the terminal fit. Clast/Tlast are the
last quantifiable value and its time. A profile with no quantifiable value gets
NaN for every endpoint and n_terminal = 0.

The computation is vectorised over profiles: data are reshaped to
(n_profiles, n_times) and handled with masks, in blocks to bound memory.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import xarray as xr

from carkin.errors import InputError, InputTypeError
from carkin.model.kinetics import variable_with_role

BLQ_RULE = (
    "A value is BLQ when it is missing (NaN) or below the LLOQ. BLQ values before the first "
    "quantifiable value are set to 0 (pre-expansion); BLQ values after it are treated as missing: "
    "excluded from the AUC (the trapezoid joins the neighbouring quantifiable points) and from the "
    "terminal fit. Clast/Tlast are the last quantifiable value and its time. A profile with no "
    "quantifiable value gets NaN for every endpoint and n_terminal = 0."
)
METHODS = ("linear", "linear-up/log-down")
ADJ_R2_TOLERANCE = 1e-4  # fits within this of the best adjusted R² count as ties; more points win
MIN_SPAN_RATIO = 2.0  # a terminal fit must span at least this many half-lives
CONTRACTION_END = 28.0  # day: end of the contraction-phase window after Tmax
BLOCK = 1024  # profiles per block: work arrays stay in cache (fastest of 256..32768 on 100k x 91)

# name -> (long_name, unit kind); unit kinds are resolved by _units
ENDPOINTS = {
    "cmax": ("maximum observed concentration", "conc"),
    "tmax": ("time of Cmax", "time"),
    "auc_0_28": ("AUC from first sample to day {end:g}", "auc"),
    "auclast": ("AUC from first sample to Tlast", "auc"),
    "clast": ("last quantifiable concentration", "conc"),
    "tlast": ("time of Clast", "time"),
    "lambda_z": ("terminal rate constant", "rate"),
    "half_life": ("terminal half-life", "time"),
    "n_terminal": ("number of points in the terminal regression", "1"),
    "adj_r2": ("adjusted R² of the terminal regression", "1"),
    "span_ratio": ("time spanned by the terminal regression over the half-life", "1"),
    "lambda_contraction": ("contraction-phase rate constant (Tmax to day {cend:g})", "rate"),
    "half_life_contraction": ("contraction-phase half-life (Tmax to day {cend:g})", "time"),
    "n_contraction": ("number of points in the contraction regression", "1"),
}


def _units(kind: str, conc: str, time: str) -> str:
    return {"conc": conc, "time": time, "auc": "·".join(u for u in (conc, time) if u),
            "rate": f"1/{time}", "1": "1"}[kind]


def _check_options(method, partial_end, min_terminal_points, lambda_z_window=None, min_span_ratio=None,
                   contraction_end=CONTRACTION_END) -> tuple[float, float]:
    """Validate the options; returns the terminal window as (start, end) with infinite defaults."""
    if method not in METHODS:
        raise InputError(f"nca: unknown method {method!r}; accepted values are {list(METHODS)}")
    if not np.isfinite(partial_end):
        raise InputError(f"nca: partial_end must be a finite time, got {partial_end!r}")
    if int(min_terminal_points) != min_terminal_points or min_terminal_points < 3:
        # adjusted R² divides by n - 2, so a fit needs at least 3 points
        raise InputError(f"nca: min_terminal_points must be an integer >= 3, got {min_terminal_points!r}")
    if min_span_ratio is not None and not (np.isfinite(min_span_ratio) and min_span_ratio >= 0):
        raise InputError(f"nca: min_span_ratio must be a number >= 0 (or None for no rule), got {min_span_ratio!r}")
    if not np.isfinite(contraction_end):
        raise InputError(f"nca: contraction_end must be a finite time, got {contraction_end!r}")
    if lambda_z_window is None:
        return -np.inf, np.inf
    try:
        start, end = lambda_z_window
        lo = -np.inf if start is None else float(start)
        hi = np.inf if end is None else float(end)
    except (TypeError, ValueError):
        raise InputError(f"nca: lambda_z_window must be (start, end) in days (None for open), got "
                         f"{lambda_z_window!r}") from None
    if not lo < hi:
        raise InputError(f"nca: lambda_z_window must have start < end, got {lambda_z_window!r}")
    return lo, hi


def _trapezoid(t0, c0, t1, c1, log_down: bool):
    """Area of each segment; log trapezoid on falling segments with both ends > 0 if log_down."""
    t0, c0, t1, c1 = np.broadcast_arrays(t0, c0, t1, c1)
    area = 0.5 * (t1 - t0) * (c0 + c1)
    if log_down:  # logs only where needed: they dominate the cost on large batches
        log = (c1 < c0) & (c1 > 0)
        area[log] = (t1 - t0)[log] * (c0 - c1)[log] / np.log(c0[log] / c1[log])
    return area


def _core(t, y, q, sampled, method, partial_end, min_pts, window=(-np.inf, np.inf), min_span=MIN_SPAN_RATIO,
          contraction_end=CONTRACTION_END):
    """NCA of profiles y (P, T) at times t (T,); q marks quantifiable values, sampled real samples."""
    n_prof, n_t = y.shape
    idx = np.arange(n_t)
    rows = np.arange(n_prof)
    log_down = method == "linear-up/log-down"
    any_q = q.any(axis=1)
    first = np.where(any_q, q.argmax(axis=1), n_t)
    last = n_t - 1 - q[:, ::-1].argmax(axis=1)
    # points entering the AUC: quantifiable ones plus sampled BLQ before the first quantifiable (as 0)
    used = q | (sampled & (idx < first[:, None]))
    v = np.where(q, y, 0.0)

    # each used point closes a segment from the previous used point (BLQ points in between are skipped)
    prev = np.maximum.accumulate(np.where(used, idx, -1), axis=1)
    prev = np.concatenate([np.full((n_prof, 1), -1), prev[:, :-1]], axis=1)
    seg = used & (prev >= 0)
    p = np.maximum(prev, 0)
    tp, vp = t[p], v[rows[:, None], p]
    area = np.where(seg, _trapezoid(tp, vp, t, v, log_down), 0.0)
    auclast = area.sum(axis=1)

    # AUC to partial_end: whole segments ending by then, plus the one straddling it, cut at partial_end
    # with the end value interpolated by the same rule (log-linear on a falling segment if log_down)
    after = t > partial_end
    auc_end = area[:, ~after].sum(axis=1)
    j = (used & after).argmax(axis=1)  # the first used point after partial_end closes the straddling segment
    t0, c0, t1, c1 = tp[rows, j], vp[rows, j], t[j], v[rows, j]
    cut = seg[rows, j] & after[j] & (t0 < partial_end)
    frac = np.where(cut, (partial_end - t0) / np.where(cut, t1 - t0, 1.0), 0.0)
    c_end = c0 + (c1 - c0) * frac
    if log_down:
        fall = cut & (c1 < c0) & (c1 > 0)
        c_end[fall] = c0[fall] * (c1[fall] / c0[fall]) ** frac[fall]
    auc_end += np.where(cut, _trapezoid(t0, c0, partial_end, c_end, log_down), 0.0)
    start = t[np.minimum(used.argmax(axis=1), n_t - 1)]
    # not estimable when sampling stops (or starts) on the wrong side of partial_end
    auc_end = np.where((t[last] >= partial_end) & (start <= partial_end), auc_end, np.nan)

    imax = np.where(q, y, -np.inf).argmax(axis=1)
    after_peak = q & (y > 0) & (idx > imax[:, None])
    in_window = (t >= window[0]) & (t <= window[1])
    lam, n_term, adj, span = _terminal(t, y, after_peak & in_window, min_pts)
    span_ratio = span * lam / np.log(2.0)  # NaN where no fit
    if min_span is not None:
        short = ~(span_ratio >= min_span)
        lam, adj = np.where(short, np.nan, lam), np.where(short, np.nan, adj)
    lam_c, n_c = _loglinear(t, y, after_peak & (t <= contraction_end))

    out = {
        "cmax": y[rows, imax], "tmax": t[imax],
        "auc_0_28": auc_end, "auclast": auclast,
        "clast": y[rows, last], "tlast": t[last],
        "lambda_z": lam, "half_life": np.log(2.0) / lam, "adj_r2": adj,
        "span_ratio": span_ratio,
        "lambda_contraction": lam_c, "half_life_contraction": np.log(2.0) / lam_c,
    }
    out = {k: np.where(any_q, val, np.nan) for k, val in out.items()}
    out["n_terminal"] = np.where(any_q, n_term, 0)
    out["n_contraction"] = np.where(any_q & np.isfinite(lam_c), n_c, 0)
    return out


def _suffix_fits(t, y, cand):
    """Log-linear fits on the last k candidate points of each row, for every k at once.

    Suffix sums from the end of each row: at candidate j they hold the sums over the
    candidates from j on, i.e. the fit on the last n[j] candidates. Returns (n, slope,
    adjusted R², span) per (row, j)."""
    n_prof, n_t = y.shape
    rows = np.arange(n_prof)
    last = n_t - 1 - cand[:, ::-1].argmax(axis=1)
    ly = np.log(y, out=np.zeros_like(y), where=cand)
    # centre on the last candidate: the sums then cancel far less in the variance terms
    x = np.where(cand, t - t[last][:, None], 0.0)
    ly = np.where(cand, ly - ly[rows, last][:, None], 0.0)
    suffix = lambda a: np.cumsum(a[:, ::-1], axis=1)[:, ::-1]
    n = suffix(cand.astype(float))
    sx, sy, sxx, sxy, syy = (suffix(a) for a in (x, ly, x * x, x * ly, ly * ly))
    with np.errstate(divide="ignore", invalid="ignore"):
        vxx, vxy, vyy = n * sxx - sx * sx, n * sxy - sx * sy, n * syy - sy * sy
        slope = vxy / vxx
        adj = 1.0 - (1.0 - vxy * vxy / (vxx * vyy)) * (n - 1.0) / (n - 2.0)
    return n, slope, adj, t[last][:, None] - t[None, :]


def _terminal(t, y, cand, min_pts):
    """The terminal fit by the module's rule: (lambda_z, points, adjusted R², span), NaN / 0 without one."""
    rows = np.arange(y.shape[0])
    n, slope, adj, span = _suffix_fits(t, y, cand)
    ok = cand & (n >= min_pts) & np.isfinite(adj)
    adj = np.where(ok, adj, -np.inf)
    near = ok & (adj >= adj.max(axis=1, keepdims=True) - ADJ_R2_TOLERANCE)
    j = near.argmax(axis=1)  # the earliest start among the near-best fits: the most points
    fit = near.any(axis=1) & (slope[rows, j] < 0)
    return (np.where(fit, -slope[rows, j], np.nan), np.where(fit, n[rows, j], 0).astype(int),
            np.where(fit, adj[rows, j], np.nan), np.where(fit, span[rows, j], np.nan))


def _loglinear(t, y, cand, min_pts=3):
    """One log-linear fit over every candidate point of each row: (rate, points), NaN / 0 without one."""
    rows = np.arange(y.shape[0])
    n, slope, _, _ = _suffix_fits(t, y, cand)
    j = cand.argmax(axis=1)  # the first candidate: the fit over all of them
    with np.errstate(invalid="ignore"):
        fit = cand.any(axis=1) & (n[rows, j] >= min_pts) & (slope[rows, j] < 0)
    return np.where(fit, -slope[rows, j], np.nan), np.where(fit, n[rows, j], 0).astype(int)


def _run_blocks(t, y, q, sampled, method, partial_end, min_pts, **rules):
    parts = [_core(t, y[i:i + BLOCK], q[i:i + BLOCK], sampled[i:i + BLOCK], method, partial_end, min_pts, **rules)
             for i in range(0, max(len(y), 1), BLOCK)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _as_days(time) -> np.ndarray:
    t = np.asarray(time)
    if np.issubdtype(t.dtype, np.timedelta64):
        t = t / np.timedelta64(1, "D")
    t = t.astype(float)
    if not (t.size and np.all(np.isfinite(t)) and np.all(np.diff(t) > 0)):
        raise InputError("nca: the time coordinate must be non-empty, finite and strictly increasing")
    return t


def nca(obj, *, variable=None, method="linear-up/log-down", lloq=None, partial_end=28.0,
        min_terminal_points=3, lambda_z_window=None, min_span_ratio=MIN_SPAN_RATIO,
        contraction_end=CONTRACTION_END) -> xr.Dataset:
    """NCA of every profile along ``time`` in a DataArray (or ``variable`` of a Dataset).

    Returns a Dataset over the remaining dims with cmax, tmax, auc_0_28 (first time to
    ``partial_end``), auclast, clast, tlast, the terminal phase (lambda_z, half_life,
    n_terminal, adj_r2, span_ratio) and the contraction phase (lambda_contraction,
    half_life_contraction, n_contraction). ``lloq`` is a scalar or anything broadcastable
    to the data (an xarray object is aligned by dimension name). ``lambda_z_window``
    (start, end) in days restricts the terminal fit's points (None: no bound);
    ``min_span_ratio`` (None: no rule) and ``contraction_end`` as in the module docstring,
    which also states the BLQ rule.
    """
    rules = _rules(method, partial_end, min_terminal_points, lambda_z_window, min_span_ratio, contraction_end)
    failed = None
    if isinstance(obj, xr.Dataset):
        failed = obj.get("failed")
        if variable is None:
            variable = variable_with_role(obj, "exposure")
        if variable is None or variable not in obj.data_vars:
            what = ("no variable given and none marked as the model's exposure (attribute role='exposure')"
                    if variable is None else f"no variable {variable!r}")
            raise InputError(f"nca: {what} in the Dataset; available variables: {list(obj.data_vars)}")
        obj = obj[variable]
    if not isinstance(obj, xr.DataArray):
        raise InputTypeError(f"nca: expected an xarray DataArray or Dataset, got {type(obj).__name__}")
    if "time" not in obj.dims:
        raise InputError(f"nca: the data need a 'time' dimension; dims are {obj.dims}")
    t = _as_days(obj["time"].values)
    other = [d for d in obj.dims if d != "time"]
    da = obj.transpose(*other, "time")
    y = da.values.astype(float).reshape(-1, t.size)

    q = np.isfinite(y)
    if lloq is not None:
        if isinstance(lloq, xr.DataArray):
            limit = lloq.broadcast_like(obj).transpose(*da.dims).values
        else:  # numpy broadcasting against the data as given, then the same transpose
            limit_da = xr.DataArray(np.broadcast_to(np.asarray(lloq, float), obj.shape), dims=obj.dims)
            limit = limit_da.transpose(*da.dims).values
        q &= ~(y < limit.reshape(y.shape))
    res = _run_blocks(t, y, q, np.ones_like(q), method, float(partial_end), int(min_terminal_points), **rules)

    conc_u, time_u = obj.attrs.get("units", ""), obj["time"].attrs.get("units", "day")
    template = da.isel(time=0, drop=True)
    skipped = _failed_mask(failed, template)
    if skipped.any():
        for name in res:
            res[name] = np.where(skipped.reshape(-1), np.nan, res[name])
        warnings.warn(f"nca: {int(skipped.sum())} profile(s) whose solve failed (the Dataset's 'failed' variable) "
                      "were skipped; their endpoints are NaN", NCAWarning, stacklevel=2)
    data = {}
    for name, (long_name, kind) in ENDPOINTS.items():
        attrs: dict[str, str | float] = {"units": _units(kind, conc_u, time_u),
                                         "long_name": long_name.format(end=partial_end, cend=contraction_end)}
        if name == "auc_0_28":
            attrs["partial_end"] = float(partial_end)
            attrs["note"] = (f"NaN where the last quantifiable time is before day {partial_end:g}: "
                             "AUC to that day is then not estimable")
        data[name] = xr.DataArray(res[name].reshape(template.shape), dims=template.dims,
                                  coords=template.coords, attrs=attrs)
    return xr.Dataset(data, attrs={
        "auc_method": method, "blq_rule": BLQ_RULE, "lloq": _describe_lloq(lloq),
        "partial_end": float(partial_end), "min_terminal_points": int(min_terminal_points),
        "variable": str(obj.name) if obj.name is not None else "", **_rule_attrs(rules),
    })


class NCAWarning(UserWarning):
    """Some profiles were left out of the NCA."""


def _failed_mask(failed, template: xr.DataArray) -> np.ndarray:
    """Profiles whose solve failed, on the template's dims (all False when there is no flag)."""
    if failed is None:
        return np.zeros(template.shape, bool)
    return failed.astype(bool).broadcast_like(template).transpose(*template.dims).values


def _rules(method, partial_end, min_terminal_points, lambda_z_window, min_span_ratio, contraction_end) -> dict:
    """Checked options as the keyword arguments of the computation."""
    window = _check_options(method, partial_end, min_terminal_points, lambda_z_window, min_span_ratio,
                            contraction_end)
    return {"window": window, "min_span": None if min_span_ratio is None else float(min_span_ratio),
            "contraction_end": float(contraction_end)}


def _rule_attrs(rules: dict) -> dict:
    """The terminal and contraction rules as result attributes (netCDF takes strings and numbers)."""
    lo, hi = rules["window"]
    return {"lambda_z_window": f"{lo:g} to {hi:g} day" if np.isfinite([lo, hi]).any() else "after Tmax to Tlast",
            "min_span_ratio": "none" if rules["min_span"] is None else rules["min_span"],
            "adj_r2_rule": f"best adjusted R²; fits within {ADJ_R2_TOLERANCE:g} of it tie and the most points win",
            "contraction_end": rules["contraction_end"]}


def _describe_lloq(lloq):
    if lloq is None:
        return "none"
    a = np.asarray(lloq, float)
    return float(a.flat[0]) if a.size and np.all(a == a.flat[0]) else f"varies ({np.nanmin(a):g} to {np.nanmax(a):g})"


def nca_long(df: pd.DataFrame, *, id_col="ID", time_col="TIME", dv_col="DV", blq_col=None, lloq_col=None,
             lloq=None, method="linear-up/log-down", partial_end=28.0, group_cols=(),
             min_terminal_points=3, lambda_z_window=None, min_span_ratio=MIN_SPAN_RATIO,
             contraction_end=CONTRACTION_END) -> pd.DataFrame:
    """NCA of observed long-format data: one row per sample (observation rows only).

    A sample is BLQ when DV is missing, its ``blq_col`` flag is non-zero, or DV is below
    its LLOQ (``lloq_col`` where given and not NaN, else ``lloq``). Times at which a
    subject has no row are not samples: they are ignored, never set to 0. Returns one
    row per (group_cols..., id) with the endpoint columns; units and rules in ``.attrs``.
    """
    rules = _rules(method, partial_end, min_terminal_points, lambda_z_window, min_span_ratio, contraction_end)
    keys = [*([group_cols] if isinstance(group_cols, str) else group_cols), id_col]
    needed = [*keys, time_col, dv_col] + [c for c in (blq_col, lloq_col) if c is not None]
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise InputError(f"nca_long: missing column(s) {missing}; columns are {list(df.columns)}")
    if df[[*keys, time_col]].isna().any().any():
        raise InputError(f"nca_long: {keys + [time_col]} must not contain missing values")
    dup = df.duplicated([*keys, time_col])
    if dup.any():
        raise InputError(f"nca_long: {int(dup.sum())} duplicate sample(s) for the same {keys} and {time_col}")

    dv = df[dv_col].to_numpy(float)
    quant = np.isfinite(dv)
    if blq_col is not None:
        quant &= df[blq_col].fillna(0).to_numpy(float) == 0
    limit = np.full(len(df), np.nan if lloq is None else float(lloq))
    if lloq_col is not None:
        row_limit = df[lloq_col].to_numpy(float)
        limit = np.where(np.isnan(row_limit), limit, row_limit)
    quant &= ~(dv < limit)  # NaN limit: no LLOQ for that row

    long = df[[*keys, time_col]].assign(_y=dv, _q=quant.astype(float), _s=1.0)
    wide = long.pivot(index=keys, columns=time_col, values=["_y", "_q", "_s"]).sort_index(axis=1)
    t = _as_days(wide["_y"].columns.to_numpy())
    res = _run_blocks(t, wide["_y"].to_numpy(float), wide["_q"].to_numpy(float) == 1,
                      wide["_s"].notna().to_numpy(), method, float(partial_end), int(min_terminal_points), **rules)

    out = wide.index.to_frame(index=False)
    for name in ENDPOINTS:
        out[name] = res[name]
    # DV units are unknown here; times are taken to be days
    out.attrs = {"units": {n: "" if k in ("conc", "auc") else _units(k, "", "day") for n, (_, k) in ENDPOINTS.items()},
                 "auc_method": method, "blq_rule": BLQ_RULE, "partial_end": float(partial_end),
                 "lloq": _describe_lloq(lloq) if lloq_col is None else f"per sample from column {lloq_col!r}",
                 **_rule_attrs(rules)}
    return out
