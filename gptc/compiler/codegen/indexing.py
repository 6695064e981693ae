"""Index arithmetic: views folded into index expressions, and strided layouts.

An index is a tuple of expressions (gptc/compiler/codegen/symbolic.py), one per axis
of a tensor. A view maps the index of its output to the index of its input; loads
linearise the index of a buffer. The expressions simplify as they are built, so an
index unravelled by one view and linearised by the next comes back as it was."""
from __future__ import annotations

from typing import Sequence

from gptc.compiler.codegen.symbolic import ZERO, Expr, add, div, mod, mul
from gptc.compiler.strides import reshape_groups

Index = tuple[Expr, ...]


def linearize(index: Index, shape: Sequence[int]) -> Expr:
    """Row-major offset of `index` in a contiguous tensor of `shape`."""
    terms, stride = [], 1
    for e, d in reversed(list(zip(index, shape))):
        terms.append(mul(e, stride))
        stride *= d
    return add(*terms)


def unravel(linear: Expr, shape: Sequence[int]) -> Index:
    """The index of row-major offset `linear` in `shape` (the outermost axis's remainder
    drops out when the bounds of `linear` say it is in range)."""
    out, stride = [], 1
    for d in reversed(shape):
        out.append(mod(div(linear, stride), d))
        stride *= d
    return tuple(out[::-1])


def view_index(op: str, attrs: dict, in_shape: Sequence[int], out_shape: Sequence[int], index: Index) -> Index:
    """Map an index of a view's output to the index of its input (pad is handled by
    the emitter, since it needs a condition)."""
    if op == "reshape":
        if not in_shape:
            return ()
        if not out_shape:
            return (ZERO,) * len(in_shape)
        result = [ZERO] * len(in_shape)
        for gi, gj in reshape_groups(in_shape, out_shape):
            lin = linearize(tuple(index[j] for j in gj), [out_shape[j] for j in gj])
            for i, e in zip(gi, unravel(lin, [in_shape[i] for i in gi])):
                result[i] = e
        return tuple(result)
    if op == "permute":
        result = [ZERO] * len(in_shape)
        for k, p in enumerate(attrs["perm"]):
            result[p] = index[k]
        return tuple(result)
    if op == "broadcast":
        lead = len(out_shape) - len(in_shape)
        return tuple(ZERO if d == 1 else index[lead + i] for i, d in enumerate(in_shape))
    if op == "slice":
        ax = attrs["axis"]
        return index[:ax] + (add(index[ax], attrs["start"]),) + index[ax + 1:]
    raise ValueError(f"not an index-mapping view: {op}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
