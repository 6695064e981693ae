"""Ops of mixture-of-experts dispatch: rows that belong to groups (experts) sorted by
group, then one matrix product per group over its contiguous rows.

- group_rank(ids (R,) i32, num_groups): the slot of each element in the stable
  counting sort of `ids` (ties kept in index order). A permutation of 0..R-1: rows are
  moved into group order with scatter_add(rank) and back with gather(rank).
- group_offsets(ids (R,) i32, num_groups): (G+1,) i32, where group g's rows start in
  that order (offsets[0] = 0, offsets[G] = R).
- grouped_matmul(x (R, K), w (G, K, N), offsets): out[r] = x[r] @ w[g] for the rows r
  of group g (offsets[g] <= r < offsets[g+1]).
- grouped_weight_grad(x (R, K), y (R, N), offsets): (G, K, N), out[g] = x[rows of g]ᵀ
  @ y[rows of g] (zeros for an empty group): the weight gradient of grouped_matmul.
The row count R is static; only the split between the groups is known at run time."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.registry import FLOAT_DTYPES, GROUPED, OpDef, ShapeError, TensorType, register


def _check_ids(name: str, ids: TensorType, attrs: dict) -> None:
    if ids.dtype != "i32" or len(ids.shape) != 1:
        raise ShapeError(f"{name}: ids must be a 1-D i32 tensor, got {ids}")
    if attrs["num_groups"] < 1:
        raise ShapeError(f"{name}: num_groups must be positive, got {attrs['num_groups']}")


def _counts(ids: np.ndarray, num_groups: int) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() >= num_groups):
        raise ValueError(f"group ids must lie in [0, {num_groups}), got {ids.min()}..{ids.max()}")
    return np.bincount(ids, minlength=num_groups)


def _rank_reference(xs, attrs, t, fd):
    (ids,) = xs
    _counts(ids, attrs["num_groups"])
    rank = np.empty(ids.shape, dtype=np.int32)
    rank[np.argsort(ids, kind="stable")] = np.arange(ids.size, dtype=np.int32)
    return rank


def _offsets_reference(xs, attrs, t, fd):
    counts = _counts(xs[0], attrs["num_groups"])
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def _infer_rank(ts, attrs):
    _check_ids("group_rank", ts[0], attrs)
    return TensorType(ts[0].shape, "i32")


def _infer_offsets(ts, attrs):
    _check_ids("group_offsets", ts[0], attrs)
    return TensorType((attrs["num_groups"] + 1,), "i32")


def _check_offsets(name: str, offsets: TensorType, groups: int) -> None:
    if offsets.dtype != "i32" or offsets.shape != (groups + 1,):
        raise ShapeError(f"{name}: offsets must be i32 ({groups + 1},), got {offsets}")


def _infer_grouped_matmul(ts, attrs):
    x, w, offsets = ts
    if x.dtype != w.dtype or x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"grouped_matmul: x and w must share a float dtype, got {x.dtype} and {w.dtype}")
    if len(x.shape) != 2 or len(w.shape) != 3 or x.shape[1] != w.shape[1]:
        raise ShapeError(f"grouped_matmul: shapes {x.shape} and {w.shape} do not fit (R, K) and (G, K, N)")
    _check_offsets("grouped_matmul", offsets, w.shape[0])
    return TensorType((x.shape[0], w.shape[2]), x.dtype)


def _infer_weight_grad(ts, attrs):
    x, y, offsets = ts
    if x.dtype != y.dtype or x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"grouped_weight_grad: x and y must share a float dtype, got {x.dtype} and {y.dtype}")
    if len(x.shape) != 2 or len(y.shape) != 2 or x.shape[0] != y.shape[0]:
        raise ShapeError(f"grouped_weight_grad: shapes {x.shape} and {y.shape} do not fit (R, K) and (R, N)")
    groups = offsets.shape[0] - 1 if len(offsets.shape) == 1 else 0
    if groups < 1:
        raise ShapeError(f"grouped_weight_grad: offsets must be i32 (G+1,), got {offsets}")
    _check_offsets("grouped_weight_grad", offsets, groups)
    return TensorType((groups, x.shape[1], y.shape[1]), x.dtype)


def _segments(offsets: np.ndarray):
    for g in range(offsets.shape[0] - 1):
        yield g, slice(int(offsets[g]), int(offsets[g + 1]))


def _grouped_matmul_reference(xs, attrs, t, fd):
    x, w, offsets = xs
    out = np.zeros((x.shape[0], w.shape[2]), dtype=np.result_type(x, w))
    for g, rows in _segments(offsets):
        out[rows] = x[rows] @ w[g]
    return out


def _weight_grad_reference(xs, attrs, t, fd):
    x, y, offsets = xs
    out = np.zeros((offsets.shape[0] - 1, x.shape[1], y.shape[1]), dtype=np.result_type(x, y))
    for g, rows in _segments(offsets):
        out[g] = x[rows].T @ y[rows]
    return out


def _grouped_matmul_vjp(attrs, out, g, x, w, offsets):
    return [g._new("grouped_matmul", [g, w.T, offsets]), g._new("grouped_weight_grad", [x, g, offsets]), None]


def _weight_grad_vjp(attrs, out, g, x, y, offsets):
    # out[e] = x_eᵀ y_e: dx_e = y_e g[e]ᵀ, dy_e = x_e g[e].
    return [y._new("grouped_matmul", [y, g.T, offsets]), x._new("grouped_matmul", [x, g, offsets]), None]


register(OpDef("group_rank", GROUPED, infer=_infer_rank, reference=_rank_reference,
               vjp=lambda a, y, g, ids: [None]))
register(OpDef("group_offsets", GROUPED, infer=_infer_offsets, reference=_offsets_reference,
               vjp=lambda a, y, g, ids: [None]))
register(OpDef("grouped_matmul", GROUPED, infer=_infer_grouped_matmul, reference=_grouped_matmul_reference,
               vjp=_grouped_matmul_vjp))
register(OpDef("grouped_weight_grad", GROUPED, infer=_infer_weight_grad, reference=_weight_grad_reference,
               vjp=_weight_grad_vjp))
