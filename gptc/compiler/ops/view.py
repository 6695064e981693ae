"""Views: reshape, permute, broadcast, slice and pad. They move no data of their own:
the planner folds them into the index arithmetic of the kernel that reads them."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.registry import VIEW, OpDef, ShapeError, TensorType, register


def _infer_reshape(ts, attrs):
    (x,) = ts
    shape = tuple(attrs["shape"])
    if int(np.prod(shape, dtype=np.int64)) != x.size or any(d < 0 for d in shape):
        raise ShapeError(f"reshape: cannot view {x} as shape {shape}")
    return TensorType(shape, x.dtype)


def _infer_permute(ts, attrs):
    (x,) = ts
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(len(x.shape))):
        raise ShapeError(f"permute: {perm} is not a permutation of the axes of {x}")
    return TensorType(tuple(x.shape[p] for p in perm), x.dtype)


def broadcast_axes(in_shape, out_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(axes prepended, axes stretched from 1) when broadcasting in_shape to out_shape."""
    lead = len(out_shape) - len(in_shape)
    stretched = tuple(lead + i for i, d in enumerate(in_shape) if d == 1 and out_shape[lead + i] != 1)
    return tuple(range(lead)), stretched


def _infer_broadcast(ts, attrs):
    (x,) = ts
    shape = tuple(attrs["shape"])
    lead = len(shape) - len(x.shape)
    if lead < 0 or any(d != 1 and d != shape[lead + i] for i, d in enumerate(x.shape)):
        raise ShapeError(f"broadcast: cannot broadcast {x} to {shape}")
    return TensorType(shape, x.dtype)


def _broadcast_vjp(attrs, y, g, x):
    lead, stretched = broadcast_axes(x.shape, y.shape)
    if stretched:
        g = g.sum(stretched, keepdims=True)
    if lead:
        g = g.sum(lead)
    return [g.reshape(x.shape)]


def _infer_slice(ts, attrs):
    (x,) = ts
    ax, start, stop = attrs["axis"], attrs["start"], attrs["stop"]
    if not (0 <= ax < len(x.shape) and 0 <= start < stop <= x.shape[ax]):
        raise ShapeError(f"slice: [{start}:{stop}] on axis {ax} is out of range for {x}")
    return TensorType(x.shape[:ax] + (stop - start,) + x.shape[ax + 1:], x.dtype)


def _slice_reference(xs, attrs, t, fd):
    index = [slice(None)] * xs[0].ndim
    index[attrs["axis"]] = slice(attrs["start"], attrs["stop"])
    return xs[0][tuple(index)]


def _infer_pad(ts, attrs):
    (x,) = ts
    ax = attrs["axis"]
    if not 0 <= ax < len(x.shape) or attrs["before"] < 0 or attrs["after"] < 0:
        raise ShapeError(f"pad: bad axis or widths {attrs} for {x}")
    return TensorType(x.shape[:ax] + (x.shape[ax] + attrs["before"] + attrs["after"],) + x.shape[ax + 1:], x.dtype)


def _pad_reference(xs, attrs, t, fd):
    widths = [(0, 0)] * xs[0].ndim
    widths[attrs["axis"]] = (attrs["before"], attrs["after"])
    return np.pad(xs[0], widths)


register(OpDef("reshape", VIEW, infer=_infer_reshape,
               reference=lambda xs, a, t, fd: xs[0].reshape(a["shape"]),
               vjp=lambda a, y, g, x: [g.reshape(x.shape)]))
register(OpDef("permute", VIEW, infer=_infer_permute,
               reference=lambda xs, a, t, fd: np.transpose(xs[0], a["perm"]),
               vjp=lambda a, y, g, x: [g.permute(tuple(int(i) for i in np.argsort(a["perm"])))]))
register(OpDef("broadcast", VIEW, infer=_infer_broadcast,
               reference=lambda xs, a, t, fd: np.broadcast_to(xs[0], a["shape"]),
               vjp=_broadcast_vjp))
register(OpDef("slice", VIEW, infer=_infer_slice, reference=_slice_reference,
               vjp=lambda a, y, g, x: [g.pad(a["axis"], a["start"], x.shape[a["axis"]] - a["stop"])]))
register(OpDef("pad", VIEW, infer=_infer_pad, reference=_pad_reference,
               vjp=lambda a, y, g, x: [g.slice(a["axis"], a["before"], a["before"] + x.shape[a["axis"]])]))
