"""Collectives across the ranks of a data-parallel world: sums over every rank's value.

- all_reduce(x): every rank gets the sum of all ranks' x (same shape).
- reduce_scatter(x): x is 1-D of world*k elements; rank r gets elements [r*k, (r+1)*k)
  of the sum.
- all_gather(x): x is 1-D of k elements; every rank gets the concatenation of all
  ranks' x, rank 0 first (world*k elements).

Attributes: `world` (the number of ranks) and `bucket` (collectives of one bucket are
issued together, in one library group: see planner/schedule.py). On the GPU each is a
call into NCCL/RCCL (gptc/runtime/comm.py). The reference exchanges values through the
world that `use_world` installs for the calling thread: a simulated world runs each
rank's reference executor in a thread of its own. Without one, the world is one rank.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import numpy as np

from gptc.compiler.ops.registry import COLLECTIVE, FLOAT_DTYPES, OpDef, ShapeError, TensorType, register

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


class SimulatedWorld:
    """`size` ranks in threads of one process that exchange arrays (for the reference)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots: list[np.ndarray | None] = [None] * size

    def exchange(self, rank: int, value: np.ndarray) -> list[np.ndarray]:
        """Every rank's value, rank 0 first (each rank calls it once per collective)."""
        self._slots[rank] = value
        self._barrier.wait()
        values = [np.asarray(v) for v in self._slots]
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values

    def abort(self) -> None:
        """Release the other ranks (with BrokenBarrierError) when one rank fails."""
        self._barrier.abort()


_local = threading.local()


@contextlib.contextmanager
def use_world(world: SimulatedWorld, rank: int) -> Iterator[None]:
    """Reference collectives run in this thread exchange through `world` as `rank`."""
    saved = getattr(_local, "member", None)
    _local.member = (world, rank)
    try:
        yield
    finally:
        _local.member = saved


def _values(x: np.ndarray, attrs: dict) -> tuple[list[np.ndarray], int]:
    member = getattr(_local, "member", None)
    if member is None:
        if attrs["world"] != 1:
            raise RuntimeError(f"a collective of a world of {attrs['world']} ranks run outside a world "
                               "(the reference runs it in gptc.compiler.ops.collective.use_world)")
        return [x], 0
    world, rank = member
    if world.size != attrs["world"]:
        raise RuntimeError(f"a collective of {attrs['world']} ranks run in a world of {world.size}")
    return world.exchange(rank, x), rank


def _sum(values: Sequence[np.ndarray]) -> np.ndarray:
    total = values[0].copy()
    for v in values[1:]:  # in rank order, in the values' own precision
        total = total + v
    return total


def _all_reduce(xs, attrs, t, fd):
    values, _ = _values(xs[0], attrs)
    return _sum(values)


def _reduce_scatter(xs, attrs, t, fd):
    values, rank = _values(xs[0], attrs)
    k = t.shape[0]
    return _sum(values)[rank * k:(rank + 1) * k]


def _all_gather(xs, attrs, t, fd):
    values, _ = _values(xs[0], attrs)
    return np.concatenate(values)


def _infer(name: str):
    def infer(ts: list[TensorType], attrs: dict) -> TensorType:
        (x,) = ts
        world = attrs["world"]
        if x.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{name}: needs a float tensor, got {x}")
        if not isinstance(world, int) or world < 1:
            raise ShapeError(f"{name}: world must be a positive rank count, got {world!r}")
        if name == "all_reduce":
            return x
        if len(x.shape) != 1:
            raise ShapeError(f"{name}: needs a 1-D tensor, got {x}")
        if name == "all_gather":
            return TensorType((x.shape[0] * world,), x.dtype)
        if x.shape[0] % world:
            raise ShapeError(f"reduce_scatter: {x} does not split into {world} equal parts")
        return TensorType((x.shape[0] // world,), x.dtype)
    return infer


def _collective(op: str, g, attrs: dict):
    """The collective `op` of the tensor handle g (built through g's own class: the ops
    sit below the IR and do not import it)."""
    return type(g)(g.graph, g.graph.add(op, [g.id], **attrs))


# The gradient of a sum over ranks is every rank's gradient summed: each collective's
# VJP is its transpose (all_reduce its own, reduce_scatter and all_gather each other's).
register(OpDef("all_reduce", COLLECTIVE, infer=_infer("all_reduce"), reference=_all_reduce,
               vjp=lambda a, y, g, x: [_collective("all_reduce", g, a)]))
register(OpDef("reduce_scatter", COLLECTIVE, infer=_infer("reduce_scatter"), reference=_reduce_scatter,
               vjp=lambda a, y, g, x: [_collective("all_gather", g, a)]))
register(OpDef("all_gather", COLLECTIVE, infer=_infer("all_gather"), reference=_all_gather,
               vjp=lambda a, y, g, x: [_collective("reduce_scatter", g, a)]))
