"""Index arithmetic: views folded into C index expressions, and strided layouts.

An index is a tuple of C expressions, one per axis of a tensor. A view maps the index
of its output to the index of its input; loads linearise the index of a buffer."""
from __future__ import annotations

from typing import Sequence

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


def _reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of one size into runs of axes with equal products."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        ps = pd = 1
        while True:
            if ps == pd and gi and gj:
                break
            if (ps <= pd and i < len(src)) or j >= len(dst):
                gi.append(i); ps *= src[i]; i += 1
            else:
                gj.append(j); pd *= dst[j]; j += 1
        # absorb trailing size-1 axes into this group
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            gi.append(i); i += 1
        while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


def view_index(op: str, attrs: dict, in_shape: Sequence[int], out_shape: Sequence[int], index: Index) -> Index:
    """Map an index of a view's output to the index of its input (pad is handled by
    the emitter, since it needs a condition)."""
    if op == "reshape":
        if not in_shape:
            return ()
        if not out_shape:
            return ("0",) * len(in_shape)
        result = ["0"] * len(in_shape)
        for gi, gj in _reshape_groups(in_shape, out_shape):
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


# ----- strided layouts (matmul operands) -------------------------------------------
def strided(op_chain: list[tuple[str, dict, tuple[int, ...], tuple[int, ...]]], base_shape: Sequence[int]):
    """(offset, strides) of a chain of views over a contiguous buffer of `base_shape`,
    or None if the chain is not an affine (strided) view. `op_chain` lists
    (op, attrs, in_shape, out_shape) from the buffer towards the reader."""
    strides = []
    s = 1
    for d in reversed(base_shape):
        strides.append(s)
        s *= d
    strides = strides[::-1]
    offset = 0
    for op, attrs, in_shape, out_shape in op_chain:
        if op == "permute":
            strides = [strides[p] for p in attrs["perm"]]
        elif op == "slice":
            offset += attrs["start"] * strides[attrs["axis"]]
        elif op == "broadcast":
            lead = len(out_shape) - len(in_shape)
            strides = [0] * lead + [0 if d == 1 and out_shape[lead + i] != 1 else strides[i] for i, d in enumerate(in_shape)]
        elif op == "reshape":
            new = []
            for gi, gj in _reshape_groups(in_shape, out_shape):
                dims = [(in_shape[i], strides[i]) for i in gi if in_shape[i] != 1]
                # the group must be one contiguous run in the strided layout
                for (d0, s0), (d1, s1) in zip(dims, dims[1:]):
                    if s0 != d1 * s1:
                        return None
                inner = dims[-1][1] if dims else 1
                sub, acc = [], inner
                for j in reversed(gj):
                    sub.append(acc)
                    acc *= out_shape[j]
                new += sub[::-1]
            strides = new
        else:
            return None
    return offset, strides


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
