"""Batched matrix product: (..., M, K) @ (..., K, N) with equal batch dimensions.
Transposes are permute views of the operands, which the planner folds into the kernel.
bf16 operands are multiplied exactly and summed in float32 (as the matrix units do), so
their product is f32; a following cast stores it in bf16 where the precision pass wants."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.registry import FLOAT_DTYPES, MATMUL, OpDef, ShapeError, TensorType, register


def _infer(ts: list[TensorType], attrs: dict) -> TensorType:
    a, b = ts
    if a.dtype != b.dtype or a.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"matmul: operands must share a float dtype, got {a.dtype} and {b.dtype}")
    if len(a.shape) < 2 or len(a.shape) != len(b.shape):
        raise ShapeError(f"matmul: operands need the same rank >= 2, got {a.shape} and {b.shape}")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: shapes {a.shape} and {b.shape} do not fit (..., M, K) @ (..., K, N)")
    return TensorType(a.shape[:-1] + b.shape[-1:], "f32" if a.dtype == "bf16" else a.dtype)


register(OpDef("matmul", MATMUL, infer=_infer,
               reference=lambda xs, a, t, fd: np.matmul(xs[0], xs[1]),
               vjp=lambda attrs, y, g, a, b: [g @ b.T, a.T @ g]))
