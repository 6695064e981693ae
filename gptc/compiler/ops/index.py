"""Gather (embedding lookup) and its gradient, scatter-add."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.registry import FLOAT_DTYPES, GATHER, SCATTER, OpDef, ShapeError, TensorType, register


def _infer_gather(ts, attrs):
    table, idx = ts
    if len(table.shape) != 2 or table.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"gather: the table must be a 2-D float tensor, got {table}")
    if idx.dtype != "i32":
        raise ShapeError(f"gather: indices must be i32, got {idx.dtype}")
    return TensorType(idx.shape + table.shape[1:], table.dtype)


def _infer_scatter_add(ts, attrs):
    idx, upd = ts
    if idx.dtype != "i32" or upd.shape[:-1] != idx.shape or len(upd.shape) != len(idx.shape) + 1:
        raise ShapeError(f"scatter_add: updates {upd} do not fit indices {idx}")
    return TensorType((attrs["num_rows"], upd.shape[-1]), upd.dtype)


def _scatter_add_reference(xs, attrs, t, fd):
    idx, upd = xs
    out = np.zeros((attrs["num_rows"], upd.shape[-1]), dtype=upd.dtype)
    np.add.at(out, idx.reshape(-1), upd.reshape(-1, upd.shape[-1]))
    return out


register(OpDef("gather", GATHER, infer=_infer_gather,
               reference=lambda xs, a, t, fd: xs[0][xs[1]],
               vjp=lambda a, y, g, table, idx: [g.scatter_add(idx, table.shape[0]), None]))
register(OpDef("scatter_add", SCATTER, infer=_infer_scatter_add, reference=_scatter_add_reference,
               vjp=lambda a, y, g, idx, upd: [None, g.gather(idx)]))
