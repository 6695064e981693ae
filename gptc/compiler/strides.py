"""Strided layouts of views: which chains of views over a contiguous buffer are affine
(an offset and one stride per axis), as matmul kernels read their operands. Used by the
planner (to insert copies where a view is not strided) and by codegen (to address it)."""
from __future__ import annotations

from typing import Sequence


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
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


def contiguous(shape: Sequence[int]) -> list[int]:
    """The strides of a contiguous (row-major) buffer of `shape`."""
    strides, s = [], 1
    for d in reversed(shape):
        strides.append(s)
        s *= d
    return strides[::-1]


def strided(op_chain: list[tuple[str, dict, tuple[int, ...], tuple[int, ...]]], base_shape: Sequence[int]):
    """(offset, strides) of a chain of views over a contiguous buffer of `base_shape`,
    or None if the chain is not an affine (strided) view. `op_chain` lists
    (op, attrs, in_shape, out_shape) from the buffer towards the reader."""
    strides = contiguous(base_shape)
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
            for gi, gj in reshape_groups(in_shape, out_shape):
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
