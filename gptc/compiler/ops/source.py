"""Sources: graph inputs, parameters, persistent state, scalar constants, iota."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.numeric import numpy_dtype
from gptc.compiler.ops.registry import DTYPES, SOURCE, OpDef, ShapeError, TensorType, register


def _infer_named(ts, attrs):
    if attrs["dtype"] not in DTYPES:
        raise ShapeError(f"unknown dtype {attrs['dtype']}")
    if any(d <= 0 for d in attrs["shape"]):
        raise ShapeError(f"'{attrs['name']}': every dimension must be positive, got {attrs['shape']}")
    return TensorType(tuple(attrs["shape"]), attrs["dtype"])


def _no_reference(xs, attrs, t, fd):
    raise RuntimeError(f"no value was given for '{attrs['name']}'")


for _op in ("input", "param", "state"):
    register(OpDef(_op, SOURCE, infer=_infer_named, reference=_no_reference, vjp=None))

register(OpDef("const", SOURCE, infer=lambda ts, a: TensorType((), a["dtype"]),
               reference=lambda xs, a, t, fd: np.array(a["value"], dtype=numpy_dtype(t.dtype, fd)),
               vjp=None))


def _iota_reference(xs, attrs, t, fd):
    shape, axis = attrs["shape"], attrs["axis"]
    line = np.arange(shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return np.broadcast_to(line, shape).astype(numpy_dtype(t.dtype, fd))


def _infer_iota(ts, attrs):
    if not 0 <= attrs["axis"] < len(attrs["shape"]):
        raise ShapeError(f"iota: axis {attrs['axis']} out of range for shape {attrs['shape']}")
    return TensorType(tuple(attrs["shape"]), attrs["dtype"])


register(OpDef("iota", SOURCE, infer=_infer_iota, reference=_iota_reference, vjp=None))
