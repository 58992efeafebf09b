"""A model function of one subject, evaluated on rows of lanes.

A GPU kernel holds each quantity of its lanes as one row (one value per lane): it has no small vectors
(a state vector of 5 or 6 values is not a tile shape a kernel compiler takes). :func:`lanewise` traces a
model's function (vector field, switch) once for one subject and evaluates the trace with every array of
``k`` values replaced by ``k`` rows, so the model's own code runs inside the kernel unchanged: indexing
``y[0]`` picks a row, ``jnp.stack`` lists rows, and each arithmetic operation runs on whole rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# operations that act value by value: on rows they act row by row
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "clamp",
    "convert_element_type", "copy", "copy_p", "cos", "cosh", "div", "eq", "erf", "erfc", "erf_inv", "exp", "exp2",
    "expm1", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "lgamma", "digamma", "log", "log1p", "logistic",
    "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "reduce_precision", "rem", "round",
    "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor",
})
STRUCTURAL = frozenset({"squeeze", "reshape", "expand_dims", "broadcast_in_dim", "slice", "transpose", "concatenate",
                        "stack", "unstack", "split", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod"})
CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
         "remat": "jaxpr", "checkpoint": "jaxpr"}


class NotLanewise(NotImplementedError):
    """The function uses an operation that has no row-by-row form here."""


class _Value:
    """An array of one subject held as rows: ``rows[i]`` is the element at flat (row-major) index i, a
    lane row or a constant."""

    __slots__ = ("shape", "rows")

    def __init__(self, shape: tuple, rows: list):
        self.shape, self.rows = tuple(shape), list(rows)


def lanewise(fn, *example_args):
    """``fn`` of one subject, as a function of rows.

    ``fn`` is traced once on ``example_args`` (arrays of one subject, each a scalar or a vector; their dtypes
    are those the rows will have). The returned function takes, for each of them, a row (for a scalar) or a
    sequence of rows (for a vector of k values), all rows of one shape, and returns ``fn``'s result the same
    way: a row for a scalar, a list of rows for a vector. Raises :class:`NotLanewise` if ``fn`` uses an
    operation without a row form (a matrix product, a loop, a sort)."""
    closed = jax.make_jaxpr(fn)(*example_args)
    _check(closed.jaxpr)
    shapes = [np.shape(x) for x in example_args]
    out_tree = jax.tree_util.tree_structure(jax.eval_shape(fn, *example_args))

    def rows_fn(*args):
        if len(args) != len(shapes):
            raise ValueError(f"lanewise: {len(args)} arguments for {len(shapes)} traced ones")
        values = []
        for shape, a in zip(shapes, args):
            rows = list(a) if shape else [a]
            if len(rows) != math.prod(shape):
                raise ValueError(f"lanewise: {len(rows)} rows for an argument of shape {shape}")
            values.append(_Value(shape, rows))
        lane_shape = next((np.shape(r) for v in values for r in v.rows if np.ndim(r)), ())
        out = _run(closed.jaxpr, closed.consts, values, lane_shape)
        result = [v.rows[0] if not v.shape else list(v.rows) for v in out]
        return jax.tree_util.tree_unflatten(out_tree, result)

    return rows_fn


def _check(jaxpr) -> None:
    """Raise :class:`NotLanewise` naming the first operation of ``jaxpr`` (or a call in it) without a row form."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in CALLS:
            inner = eqn.params[CALLS[name]]
            _check(inner.jaxpr if hasattr(inner, "consts") else inner)
        elif name not in ELEMENTWISE and (name not in STRUCTURAL or not eqn.invars):
            raise NotLanewise(f"operation {name!r} has no row-by-row form (the model's function uses it)")


def _run(jaxpr, consts, args: list, lane_shape) -> list:
    env: dict = {}

    def read(atom):
        if isinstance(atom, jcore.Literal):
            value = np.asarray(atom.val)
            return _Value(value.shape, list(value.reshape(-1)))
        return env[atom]

    for var, c in zip(jaxpr.constvars, consts):
        value = np.asarray(c)
        env[var] = _Value(value.shape, list(value.reshape(-1)))
    for var, a in zip(jaxpr.invars, args):
        env[var] = a
    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        outs = _apply(eqn, ins, lane_shape)
        for var, v in zip(eqn.outvars, outs):
            env[var] = v
    return [read(a) for a in jaxpr.outvars]


def _apply(eqn, ins: list, lane_shape) -> list:
    name, params = eqn.primitive.name, eqn.params
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name in CALLS:
        inner = params[CALLS[name]]
        closed = inner if hasattr(inner, "consts") else None
        jaxpr = closed.jaxpr if closed is not None else inner
        return _run(jaxpr, closed.consts if closed is not None else (), ins, lane_shape)
    if name in ELEMENTWISE:
        # an operand's size-1 dimensions stretch to the result's (numpy's broadcasting, as the operation's)
        where = [np.broadcast_to(np.arange(len(v.rows)).reshape(v.shape), out_shape).reshape(-1) for v in ins]
        dtypes = [a.aval.dtype for a in eqn.invars]
        rows = [_bind(eqn.primitive, [v.rows[w[i]] for v, w in zip(ins, where)], dtypes, params, lane_shape)
                for i in range(math.prod(out_shape))]
        return [_Value(out_shape, rows)]
    v = ins[0]  # structural operations (checked at the trace to have operands)
    if name in ("squeeze", "reshape", "expand_dims"):
        return [_Value(out_shape, v.rows)]
    if name == "broadcast_in_dim":
        idx = np.arange(max(len(v.rows), 1)).reshape(v.shape)
        full = np.broadcast_to(np.expand_dims(idx, tuple(d for d in range(len(out_shape))
                                                         if d not in params["broadcast_dimensions"])), out_shape)
        return [_Value(out_shape, [v.rows[i] for i in full.reshape(-1)])]
    if name == "slice":
        idx = np.arange(len(v.rows)).reshape(v.shape)
        sl = tuple(slice(s, e, st) for s, e, st in zip(params["start_indices"], params["limit_indices"],
                                                        params["strides"] or (1,) * len(v.shape)))
        return [_Value(out_shape, [v.rows[i] for i in idx[sl].reshape(-1)])]
    if name == "transpose":
        idx = np.arange(len(v.rows)).reshape(v.shape).transpose(params["permutation"])
        return [_Value(out_shape, [v.rows[i] for i in idx.reshape(-1)])]
    if name in ("concatenate", "stack"):
        axis = params.get("dimension", params.get("axis"))
        parts = [np.arange(len(u.rows)).reshape(u.shape) + off
                 for u, off in zip(ins, np.cumsum([0] + [len(u.rows) for u in ins[:-1]]))]
        joined = np.concatenate(parts, axis) if name == "concatenate" else np.stack(parts, axis)
        pool = [r for u in ins for r in u.rows]
        return [_Value(out_shape, [pool[i] for i in joined.reshape(-1)])]
    if name in ("unstack", "split"):  # several results (jax 0.11 unpacks ``a, b = y`` with unstack)
        idx = np.arange(len(v.rows)).reshape(v.shape)
        axis = params["axis"]
        parts = ([np.take(idx, i, axis) for i in range(v.shape[axis])] if name == "unstack"
                 else np.split(idx, np.cumsum(params["sizes"])[:-1], axis))
        return [_Value(part.shape, [v.rows[i] for i in part.reshape(-1)]) for part in parts]
    if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"):
        op = {"reduce_sum": jax.lax.add, "reduce_max": jax.lax.max, "reduce_min": jax.lax.min,
              "reduce_prod": jax.lax.mul}[name]
        axes = tuple(params["axes"])
        kept = tuple(d for d in range(len(v.shape)) if d not in axes)
        idx = np.arange(len(v.rows)).reshape(v.shape).transpose(axes + kept)
        idx = idx.reshape(math.prod(v.shape[d] for d in axes), -1)
        rows = []
        for column in idx.T:
            acc = _as_row(v.rows[column[0]], eqn.invars[0].aval.dtype, lane_shape)
            for i in column[1:]:
                acc = op(acc, _as_row(v.rows[i], eqn.invars[0].aval.dtype, lane_shape))
            rows.append(acc)
        return [_Value(out_shape, rows)]
    raise NotLanewise(f"operation {name!r} has no row-by-row form (the model's function uses it)")


def _as_row(value, dtype, lane_shape):
    """A constant as a full row (a kernel's operations take operands of one shape); a row unchanged."""
    if np.ndim(value) == len(lane_shape) and np.shape(value) == tuple(lane_shape):
        return value
    return jnp.full(lane_shape, value, dtype)


def _bind(primitive, operands: list, dtypes: list, params, lane_shape):
    if all(np.ndim(x) == 0 and not isinstance(x, jax.core.Tracer) for x in operands):
        return primitive.bind(*(np.asarray(x, dt) for x, dt in zip(operands, dtypes)), **params)
    return primitive.bind(*(_as_row(x, dt, lane_shape) for x, dt in zip(operands, dtypes)), **params)
