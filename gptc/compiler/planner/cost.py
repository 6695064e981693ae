"""The cost model of a plan: for every kernel, the fewest bytes it must move through
device memory and the floating-point operations it must do, and the roofline floor
these give on a device with a measured copy bandwidth and matrix-product rate.

Conventions (the numbers are lower bounds, not counts of what a kernel does):

bytes
    Each distinct buffer a kernel reads counts once, and each distinct buffer it
    writes counts once, however often the kernel touches it (a buffer read and
    written in place, like a parameter under AdamW, counts twice). A read counts
    only the elements the kernel can reach:
    - through a gather (an embedding lookup), the rows it looks up: the gather's
      output size (B*S*E), not the table (capped at the table's size);
    - through a slice, the slice (the first S rows of the position table);
    - through broadcasts, the un-broadcast value (a bias is read once, not B*S times).
    A buffer written counts whole (a scatter-add's output counts whole too: with
    the clear before it, every element of it is written), except a KV cache that
    kv_write updates in place: only the new rows. The decode attention's reads of the
    cache count whole (as at the last position: it reads keys 0..pos only).
FLOPs
    A matrix product (..., M, K) @ (..., K, N) counts 2*M*N*K per batch element; a
    grouped one (mixture of experts) 2*R*K*N for its R rows, however they are grouped.
    Every other arithmetic op counts one per element: an elementwise op one per
    output element (exp, tanh, rsqrt, a compare or a select count one each, like an
    add), a reduction one per input element, a scatter-add one per added element.
    Pure data movement counts none: views, gather, copy, cast. Constant-only
    values that kernels recompute inline (causal masks, positions) are not counted.

floor
    max(bytes / bandwidth, FLOPs / rate): no implementation of the kernel can run
    faster on that device than this (up to caches: a kernel whose inputs sit in L2
    can beat the DRAM floor, which shows as more than 100%).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import DTYPE_BYTES, ELEMENTWISE, GATHER, MATMUL, REDUCE, SCATTER
from gptc.compiler.planner.fusion import compute_users
from gptc.compiler.planner.schedule import Buffer, KernelPlan, Plan

DATA_MOVEMENT_OPS = ("copy", "cast")


@dataclass(frozen=True)
class KernelCost:
    name: str
    family: str
    bytes_read: int
    bytes_written: int
    flops: int
    nodes: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def node_flops(graph, nid: int) -> int:
    """FLOPs of one compute node, by the conventions of this module."""
    op = graph.op(nid)
    kind = OPS[op].kind
    out = graph.type(nid)
    if kind == MATMUL:
        k = graph.type(graph.inputs_of(nid)[0]).shape[-1]
        return 2 * out.size * k
    if kind == ELEMENTWISE:
        return 0 if op in DATA_MOVEMENT_OPS else out.size
    if kind == REDUCE:
        return graph.type(graph.inputs_of(nid)[0]).size
    if kind == SCATTER:
        return graph.type(graph.inputs_of(nid)[1]).size
    if op == "decode_attention":  # q·k and p·v over every key (at the last position)
        k = graph.type(graph.inputs_of(nid)[1]).shape
        return 4 * out.shape[0] * out.shape[1] * k[2] * k[3]
    if op in ("grouped_matmul", "grouped_weight_grad"):
        # Each of the R rows meets one group's matrix: 2*R*K*N, whatever the split.
        x, other = (graph.type(i).shape for i in graph.inputs_of(nid)[:2])
        return 2 * x[0] * x[1] * other[-1]
    return 0  # views, sources, gather


def _buffer_key(buf: Buffer) -> tuple[str, int]:
    return buf.arena, buf.offset


Users = Callable[[int], list[tuple[int, list[int]]]]


def read_footprint(plan: Plan, kernel: KernelPlan, nid: int, users: Users | None = None) -> int:
    """The fewest bytes `kernel` must load from the buffer of `nid` (see the module
    docstring): the largest element count any path from the buffer to a node of the
    kernel can reach, capped at the buffer's size. `users`: compute_users of the plan's
    graph, memoised by the caller (a scalar read by 150 kernels has 150 users)."""
    graph = plan.graph
    buf = plan.buffer_of(nid)
    itemsize = DTYPE_BYTES[buf.dtype]
    inside = set(kernel.nodes)
    reach = 0
    found = False
    for user, chain in (users(nid) if users else compute_users(graph, nid, {})):
        if user not in inside:
            continue
        found = True
        operand = chain[-1] if chain else nid
        if OPS[graph.op(user)].kind == GATHER and graph.inputs_of(user)[0] == operand:
            elements = graph.type(user).size  # the rows looked up
        else:
            elements = min([graph.type(nid).size] + [graph.type(v).size for v in chain])
        reach = max(reach, elements)
    if not found:  # no path found: count the whole buffer
        return buf.nbytes
    return min(buf.nbytes, reach * itemsize)


def _merge(plan: Plan, kernels: Sequence[KernelPlan], users: Users) -> KernelCost:
    """The cost of kernels run together in one launch: buffers shared between them
    count once."""
    graph = plan.graph
    reads: dict[tuple[str, int], int] = {}
    writes: dict[tuple[str, int], int] = {}
    flops = nodes = 0
    for kernel in kernels:
        for nid in kernel.reads:
            key = _buffer_key(plan.buffer_of(nid))
            reads[key] = max(reads.get(key, 0), read_footprint(plan, kernel, nid, users))
        for nid in kernel.roots:
            buf = plan.buffer_of(nid)
            written = buf.nbytes
            if kernel.family == "kv_write":  # the new rows only
                written = graph.type(graph.inputs_of(nid)[1]).size * DTYPE_BYTES[buf.dtype]
            writes[_buffer_key(buf)] = written
        flops += sum(node_flops(graph, n) for n in kernel.nodes)
        nodes += len(kernel.nodes)
    name = kernels[0].name + (f"+{len(kernels) - 1}" if len(kernels) > 1 else "")
    return KernelCost(name, kernels[0].family, sum(reads.values()), sum(writes.values()), flops, nodes)


def plan_costs(plan: Plan) -> list[KernelCost]:
    """The cost of every launch of `plan`, in launch order (one kernel each, except
    where the planner batched independent kernels into one launch: their costs add,
    buffers they share counting once; the name is the first kernel's, '+N' more)."""
    free: dict[int, bool] = {}
    users = functools.lru_cache(maxsize=None)(lambda nid: compute_users(plan.graph, nid, free))
    return [_merge(plan, [plan.kernels[i] for i in launch], users) for launch in plan.launches]


def floor_seconds(nbytes: float, flops: float, bandwidth: float, rate: float) -> float:
    """Roofline floor: the larger of bytes/bandwidth (bytes/s) and FLOPs/rate (FLOP/s)."""
    return max(nbytes / bandwidth if bandwidth > 0 else 0.0, flops / rate if rate > 0 else 0.0)


def bound(nbytes: float, flops: float, bandwidth: float, rate: float) -> str:
    """'memory' or 'compute': which term sets the floor."""
    return "compute" if flops / rate > nbytes / bandwidth else "memory"
