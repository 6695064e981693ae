"""Index arithmetic: views folded into C index expressions, and strided layouts.

An index is a tuple of C expressions, one per axis of a tensor. A view maps the index
of its output to the index of its input; loads linearise the index of a buffer."""
from __future__ import annotations

from typing import Sequence

from gptc.compiler.strides import reshape_groups

Index = tuple[str, ...]


def _is_int(e: str) -> bool:
    return e.lstrip("-").isdigit()


def mul(e: str, k: int) -> str:
    if k == 0 or e == "0":
        return "0"
    if k == 1:
        return e
    if _is_int(e):
        return str(int(e) * k)
    return f"{e} * {k}"


def add(terms: Sequence[str]) -> str:
    consts = sum(int(t) for t in terms if _is_int(t))
    rest = [t for t in terms if not _is_int(t)]
    if consts:
        rest.append(str(consts))
    return " + ".join(rest) if rest else "0"


def paren(e: str) -> str:
    return e if _is_int(e) or e.replace("_", "").isalnum() else f"({e})"


def linearize(index: Index, shape: Sequence[int]) -> str:
    """Row-major offset of `index` in a contiguous tensor of `shape`."""
    terms, stride = [], 1
    for e, d in reversed(list(zip(index, shape))):
        if d != 1:
            terms.append(mul(paren(e), stride))
        stride *= d
    return add(terms[::-1])


def unravel(linear: str, shape: Sequence[int]) -> Index:
    """The index of row-major offset `linear` in `shape`."""
    out, stride = [], 1
    strides = []
    for d in reversed(shape):
        strides.append(stride)
        stride *= d
    strides = strides[::-1]
    for d, s in zip(shape, strides):
        if d == 1:
            out.append("0")
            continue
        e = paren(linear) if s == 1 else f"{paren(linear)} / {s}"
        # The outermost axis needs no modulo when the offset is in range.
        out.append(e if s * d >= stride else f"({e}) % {d}")
    return tuple(out)


def view_index(op: str, attrs: dict, in_shape: Sequence[int], out_shape: Sequence[int], index: Index) -> Index:
    """Map an index of a view's output to the index of its input (pad is handled by
    the emitter, since it needs a condition)."""
    if op == "reshape":
        if not in_shape:
            return ()
        if not out_shape:
            return ("0",) * len(in_shape)
        result = ["0"] * len(in_shape)
        for gi, gj in reshape_groups(in_shape, out_shape):
            lin = linearize(tuple(index[j] for j in gj), [out_shape[j] for j in gj])
            sub = unravel(lin, [in_shape[i] for i in gi])
            for i, e in zip(gi, sub):
                result[i] = e
        return tuple(result)
    if op == "permute":
        result = [""] * len(in_shape)
        for k, p in enumerate(attrs["perm"]):
            result[p] = index[k]
        return tuple(result)
    if op == "broadcast":
        lead = len(out_shape) - len(in_shape)
        return tuple("0" if d == 1 else index[lead + i] for i, d in enumerate(in_shape))
    if op == "slice":
        ax = attrs["axis"]
        return index[:ax] + (add([paren(index[ax]), str(attrs["start"])]),) + index[ax + 1:]
    raise ValueError(f"not an index-mapping view: {op}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
