"""Reductions (sum, max) over a set of axes."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.registry import FLOAT_DTYPES, REDUCE, OpDef, ShapeError, TensorType, register


def _infer(name: str):
    def infer(ts: list[TensorType], attrs: dict) -> TensorType:
        (x,) = ts
        if x.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{name}: needs a float tensor, got {x.dtype}")
        axes = attrs["axes"]
        if any(not 0 <= a < len(x.shape) for a in axes) or len(set(axes)) != len(axes):
            raise ShapeError(f"{name}: bad axes {axes} for {x}")
        if attrs["keepdims"]:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return TensorType(shape, x.dtype)
    return infer


def _kept_shape(x, attrs) -> tuple[int, ...]:
    return tuple(1 if i in attrs["axes"] else d for i, d in enumerate(x.shape))


def _sum_vjp(attrs, y, g, x):
    return [g.reshape(_kept_shape(x, attrs)).broadcast_to(x.shape)]


def _max_vjp(attrs, y, g, x):
    # Ties share the gradient equally, as PyTorch's amax does.
    kept = _kept_shape(x, attrs)
    hit = x.eq(y.reshape(kept).broadcast_to(x.shape)).cast(x.dtype)
    count = hit.sum(attrs["axes"], keepdims=True)
    return [hit * (g.reshape(kept) / count).broadcast_to(x.shape)]


register(OpDef("sum", REDUCE, infer=_infer("sum"),
               reference=lambda xs, a, t, fd: np.sum(xs[0], axis=a["axes"], keepdims=a["keepdims"]),
               vjp=_sum_vjp))
register(OpDef("max", REDUCE, infer=_infer("max"),
               reference=lambda xs, a, t, fd: np.max(xs[0], axis=a["axes"], keepdims=a["keepdims"]),
               vjp=_max_vjp))
