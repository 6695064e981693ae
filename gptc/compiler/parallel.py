"""Data parallelism as graph ops: every rank runs the same step on its own batch, and
collectives (ops/collective.py) make the step's results global.

Plain data parallelism: each gradient is all-reduced and divided by the world size
(every rank's loss is a mean over as many tokens, so the global gradient is the mean
of the ranks' gradients); the gradient norm, clipping and AdamW then run on global
gradients on every rank, exactly as on one GPU at world x the batch.

ZeRO-1: each gradient, flattened and padded to a multiple of the world size, is
reduce-scattered instead: rank r gets the global gradient of its 1/world slice, keeps
AdamW moments for that slice only, updates that slice of the parameter, and the
slices are all-gathered back into the whole parameter. The gradient norm sums the
squares of each rank's slices, all-reduced.

Gradients are grouped into buckets of about `bucket_bytes`, in the order the backward
produces them; the collectives of a bucket are issued together as soon as the last of
its gradients exists (planner/schedule.py), on the communication stream, so they run
while the backward goes on."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gptc.compiler.ir import Graph, Tensor

DEFAULT_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket size


@dataclass(frozen=True)
class Parallel:
    """Where a training graph runs: rank `rank` of `world` ranks; `zero1` shards the
    optimizer state."""
    world: int = 1
    rank: int = 0
    zero1: bool = False
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of a world of {self.world}")


SINGLE = Parallel()


def collective(op: str, x: Tensor, world: int, bucket: int) -> Tensor:
    return Tensor(x.graph, x.graph.add(op, [x.id], world=world, bucket=bucket))


def global_mean(x: Tensor, par: Parallel, bucket: int) -> Tensor:
    """The mean over ranks of a value every rank computes (the loss)."""
    if par.world == 1:
        return x
    return collective("all_reduce", x, par.world, bucket) * (1.0 / par.world)


def buckets(graph: Graph, grads: Sequence[Tensor], bucket_bytes: int) -> list[int]:
    """The bucket of each gradient: consecutive in the order the backward builds them
    (node ids grow as autodiff walks from the loss back to the embeddings), at most
    `bucket_bytes` each (a larger gradient has a bucket of its own)."""
    order = sorted(range(len(grads)), key=lambda i: grads[i].id)
    result = [0] * len(grads)
    bucket, filled = 0, 0
    for i in order:
        size = grads[i].type.nbytes
        if filled and filled + size > bucket_bytes:
            bucket, filled = bucket + 1, 0
        result[i] = bucket
        filled += size
    return result


def shard_size(n: int, world: int) -> int:
    """Elements of each rank's slice of a tensor of n elements (the last may hold padding)."""
    return math.ceil(n / world)


def flat_padded(x: Tensor, world: int) -> Tensor:
    n = x.type.size
    flat = x.reshape(n)
    pad = shard_size(n, world) * world - n
    return flat.pad(0, 0, pad) if pad else flat


def shard_of(x: Tensor, par: Parallel) -> Tensor:
    """This rank's slice of x, flattened (padded with zeros at the end)."""
    s = shard_size(x.type.size, par.world)
    return flat_padded(x, par.world).slice(0, par.rank * s, (par.rank + 1) * s)


def shard_array(value: np.ndarray, par: Parallel) -> np.ndarray:
    """This rank's slice of a host array, as shard_of slices a tensor."""
    flat = np.asarray(value).reshape(-1)
    s = shard_size(flat.size, par.world)
    return np.pad(flat, (0, s * par.world - flat.size))[par.rank * s:(par.rank + 1) * s]


def unshard(slices: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The whole host array of `shape` from every rank's slice, rank 0 first."""
    return np.concatenate([np.asarray(s).reshape(-1) for s in slices])[:int(np.prod(shape))].reshape(shape)


def reduce_gradients(graph: Graph, grads: Sequence[Tensor], par: Parallel) -> tuple[list[Tensor], int]:
    """The global mean of each gradient (ZeRO-1: of this rank's slice of it) and the
    next free bucket number."""
    bucket_of = buckets(graph, grads, par.bucket_bytes)
    op = "reduce_scatter" if par.zero1 else "all_reduce"
    reduced = []
    for g, b in zip(grads, bucket_of):
        operand = flat_padded(g, par.world) if par.zero1 else g
        reduced.append(collective(op, operand, par.world, b) * (1.0 / par.world))
    return reduced, max(bucket_of, default=-1) + 1


def gather_shard(shard: Tensor, like: Tensor, par: Parallel, bucket: int) -> Tensor:
    """The whole tensor (shape of `like`) from every rank's updated slice."""
    n = like.type.size
    whole = collective("all_gather", shard, par.world, bucket).slice(0, 0, n).reshape(like.shape)
    return Tensor(graph := like.graph, graph.add("copy", [whole.id]))  # written into the param in place
