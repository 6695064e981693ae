"""Elementwise ops. Operands have one shape (Tensor inserts explicit broadcasts)."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.numeric import numpy_dtype, round_to_bf16
from gptc.compiler.ops.registry import ELEMENTWISE, FLOAT_DTYPES, OpDef, ShapeError, TensorType, register


def _same(name: str, types: list[TensorType], result_dtype: str | None = None, floats_only: bool = False) -> TensorType:
    shapes = {t.shape for t in types}
    dtypes = {t.dtype for t in types}
    if len(shapes) != 1:
        raise ShapeError(f"{name}: operand shapes differ: {[t.shape for t in types]}")
    if len(dtypes) != 1:
        raise ShapeError(f"{name}: operand dtypes differ: {[t.dtype for t in types]} (cast one explicitly)")
    dtype = dtypes.pop()
    if floats_only and dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{name}: needs float operands, got {dtype}")
    if dtype == "bool":
        raise ShapeError(f"{name}: bool operands are only for where()")
    return TensorType(types[0].shape, result_dtype or dtype)


def _unary(name: str, fn, vjp, c_expr: str) -> None:
    register(OpDef(name, ELEMENTWISE,
                   infer=lambda ts, a: _same(name, ts, floats_only=True),
                   reference=lambda xs, a, t, fd: fn(xs[0]),
                   vjp=vjp, c_expr=c_expr))


def _binary(name: str, fn, vjp, c_expr: str, result_dtype: str | None = None) -> None:
    register(OpDef(name, ELEMENTWISE,
                   infer=lambda ts, a: _same(name, ts, result_dtype),
                   reference=lambda xs, a, t, fd: fn(xs[0], xs[1]),
                   vjp=vjp, c_expr=c_expr))


# vjp(attrs, out, g, *inputs) -> [grad per input]
_unary("neg", np.negative, lambda a, y, g, x: [-g], "(-{0})")
_unary("exp", np.exp, lambda a, y, g, x: [g * y], "expf({0})")
_unary("log", np.log, lambda a, y, g, x: [g / x], "logf({0})")
_unary("tanh", np.tanh, lambda a, y, g, x: [g * (1.0 - y * y)], "tanhf({0})")
_unary("sqrt", np.sqrt, lambda a, y, g, x: [g * 0.5 / y], "sqrtf({0})")
_unary("rsqrt", lambda x: 1.0 / np.sqrt(x), lambda a, y, g, x: [g * -0.5 * y * y * y], "rsqrtf({0})")
_unary("sin", np.sin, lambda a, y, g, x: [g * x.cos()], "sinf({0})")
_unary("cos", np.cos, lambda a, y, g, x: [-(g * x.sin())], "cosf({0})")

# Identity: the planner inserts it where a view must be laid out in memory (a matmul
# operand that is not a strided view of a buffer).
register(OpDef("copy", ELEMENTWISE, infer=lambda ts, a: ts[0], reference=lambda xs, a, t, fd: xs[0].copy(),
               vjp=lambda a, y, g, x: [g], c_expr="{0}"))

# Identity that no gradient flows through: autodiff treats its value as a constant (the
# max that keeps softmax and log-sum-exp stable, whose gradient is zero in exact
# arithmetic). The planner reads through it, so it never costs a kernel.
register(OpDef("stop_gradient", ELEMENTWISE, infer=lambda ts, a: ts[0], reference=lambda xs, a, t, fd: xs[0],
               vjp=lambda a, y, g, x: [None], c_expr="{0}"))

_binary("add", np.add, lambda a, y, g, x0, x1: [g, g], "({0} + {1})")
_binary("sub", np.subtract, lambda a, y, g, x0, x1: [g, -g], "({0} - {1})")
_binary("mul", np.multiply, lambda a, y, g, x0, x1: [g * x1, g * x0], "({0} * {1})")
_binary("div", np.divide, lambda a, y, g, x0, x1: [g / x1, -(g * y) / x1], "({0} / {1})")
# The gradient of maximum goes to the first operand on ties, as x0 >= x1 selects it.
_binary("maximum", np.maximum,
        lambda a, y, g, x0, x1: [(x0 >= x1).where(g, 0.0), (x0 >= x1).where(0.0, g)],
        "fmaxf({0}, {1})")
_binary("less", np.less, lambda a, y, g, x0, x1: [None, None], "({0} < {1})", result_dtype="bool")
_binary("greater_equal", np.greater_equal, lambda a, y, g, x0, x1: [None, None], "({0} >= {1})", result_dtype="bool")
_binary("equal", np.equal, lambda a, y, g, x0, x1: [None, None], "({0} == {1})", result_dtype="bool")


def _infer_logical_and(ts: list[TensorType], attrs: dict) -> TensorType:
    a, b = ts
    if a.dtype != "bool" or b.dtype != "bool" or a.shape != b.shape:
        raise ShapeError(f"logical_and: needs two bool operands of one shape, got {a} and {b}")
    return a


# Both conditions (a local attention mask: causal and within the window); no gradient.
register(OpDef("logical_and", ELEMENTWISE, infer=_infer_logical_and,
               reference=lambda xs, a, t, fd: np.logical_and(xs[0], xs[1]),
               vjp=lambda a, y, g, x0, x1: [None, None], c_expr="({0} && {1})"))


def _infer_where(ts: list[TensorType], attrs: dict) -> TensorType:
    cond, a, b = ts
    if cond.dtype != "bool":
        raise ShapeError(f"where: condition must be bool, got {cond.dtype}")
    if not cond.shape == a.shape == b.shape:
        raise ShapeError(f"where: operand shapes differ: {cond.shape}, {a.shape}, {b.shape}")
    return _same("where", [a, b])


register(OpDef(
    "where", ELEMENTWISE, infer=_infer_where,
    reference=lambda xs, a, t, fd: np.where(xs[0], xs[1], xs[2]),
    vjp=lambda a, y, g, c, x0, x1: [None, c.where(g, 0.0), c.where(0.0, g)],
    c_expr="({0} ? {1} : {2})"))


def _infer_cast(ts: list[TensorType], attrs: dict) -> TensorType:
    if attrs["dtype"] not in ("f32", "f64", "bf16", "i32"):
        raise ShapeError(f"cast: unknown dtype {attrs['dtype']}")
    return TensorType(ts[0].shape, attrs["dtype"])


def _cast_reference(xs, attrs, out_type, float_dtype):
    x = xs[0]
    if out_type.dtype == "bf16":
        return round_to_bf16(x).astype(float_dtype)
    return x.astype(numpy_dtype(out_type.dtype, float_dtype))


def _cast_vjp(attrs, y, g, x):
    return [g.cast(x.dtype) if x.is_float() and y.is_float() else None]


register(OpDef("cast", ELEMENTWISE, infer=_infer_cast, reference=_cast_reference, vjp=_cast_vjp,
               c_expr="(({dtype}){0})"))
