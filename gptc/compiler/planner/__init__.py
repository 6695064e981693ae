"""The planner: fusion groups, launch order and memory plan for a graph."""
from __future__ import annotations

import math
from collections import Counter

from gptc.compiler.strides import strided
from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import COLLECTIVE, SOURCE, VIEW
from gptc.compiler.planner.fusion import clone_gated_operands, fuse_graph, is_free, recompute_in_backward
from gptc.compiler.planner.schedule import Buffer, KernelPlan, Plan, schedule

__all__ = ["Buffer", "KernelPlan", "Plan", "make_plan", "fusion_report"]


def make_plan(graph: Graph, fuse: bool = True) -> Plan:
    """Fused (fuse=True) or unfused (one kernel per compute node) plan of `graph`.
    `graph` is left as it is: the plan holds its own copy (plan.graph), pruned and laid
    out, with the same node ids plus the nodes planning adds."""
    graph = graph.copy()
    for nid in [n for n in graph.nx.nodes if graph.op(n) == "stop_gradient"]:
        graph.bypass(nid)  # an identity once autodiff has run: no kernel computes it
    transpose_products(graph)
    graph.prune()  # values nothing reads are not computed
    if fuse:
        clone_gated_operands(graph)
        recompute_in_backward(graph)
    lay_out(graph)
    return schedule(graph, fuse_graph(graph, fuse), fuse)


def transpose_products(graph: Graph) -> None:
    """A matrix product read only transposed (AB)ᵀ is computed as BᵀAᵀ (the transposes
    are views of the operands), so it is stored the way it is read: attention's key
    gradient, which autodiff gives as dkᵀ = qᵀ dS and the QKV projection's backward reads
    as dk, is then stored (S, D) by the flash backward, and read row by row."""
    for nid in [n for n in graph.nx.nodes if graph.op(n) == "matmul"]:
        users = graph.users(nid)
        rank = len(graph.type(nid).shape)
        swap = tuple(range(rank - 2)) + (rank - 1, rank - 2)
        if not users or any(graph.op(u) != "permute" or graph.node(u)["attrs"]["perm"] != swap for u in users):
            continue
        a, b = graph.inputs_of(nid)
        with graph.replace_scope(graph.node(nid)["scope"]):
            product = graph.add("matmul", [graph.add("permute", [b], perm=swap), graph.add("permute", [a], perm=swap)])
        for u in users:
            graph.replace(u, product)


SPLIT_REDUCTION_SIZE = 1 << 16
# Ops whose kernels read their operands as strided views of buffers.
MATMUL_LIKE = ("matmul", "group_rank", "group_offsets", "grouped_matmul", "grouped_weight_grad",
               "kv_write", "decode_attention", "decode_combine", "sample_tokens")


# A reduction over leading axes (a bias's gradient: the sum over the batch's rows) runs
# one thread per output, each looping over the rows: with few outputs, too few threads
# to keep memory busy. Split it when it gives fewer than this many threads...
SPLIT_COLUMNS_THREADS = 1 << 16
SPLIT_COLUMNS_MIN_ROWS = 16  # ...into chunks of at least this many rows.


# A matrix product with few output tiles and a long sum (a small weight's gradient
# dW = X^T dY over every token of the batch) keeps only a few compute units busy, each
# walking the whole sum. Split the sum into parts (split-K) when its output has fewer
# than this many elements...
SPLIT_K_OUTPUTS = 1 << 20
SPLIT_K_MIN_CHUNK = 1024  # ...into parts of at least this many products each,
SPLIT_K_MIN_SIDE = 64  # if it is at least one tile wide both ways (not a matrix-vector product).


def split_matmuls(graph: Graph) -> None:
    """A (M, K) @ (K, N) product with M*N < SPLIT_K_OUTPUTS and a long K runs as P
    products over the K/P-long parts of the sum, one batched matmul (P, M, N) of f32
    partial sums (each part's tiles are blocks of their own), then their sum over P:
    P times the blocks for the same arithmetic, plus P*M*N partials written and read."""
    for nid in [n for n in graph.nx.nodes if graph.op(n) == "matmul"]:
        a, b = graph.inputs_of(nid)
        if len(graph.type(a).shape) != 2:  # a batched product (attention's) has tiles enough
            continue
        (m, k), n = graph.type(a).shape, graph.type(b).shape[1]
        if m * n >= SPLIT_K_OUTPUTS or min(m, n) < SPLIT_K_MIN_SIDE:
            continue
        want = min(k // SPLIT_K_MIN_CHUNK, -(-SPLIT_K_OUTPUTS // (m * n)))
        parts = max((p for p in range(2, want + 1) if k % p == 0), default=1)
        if parts == 1:
            continue
        chunk = k // parts
        with graph.replace_scope(graph.node(nid)["scope"]):
            rows = graph.add("permute", [graph.add("reshape", [a], shape=(m, parts, chunk))], perm=(1, 0, 2))
            cols = graph.add("reshape", [b], shape=(parts, chunk, n))
            partial = graph.add("matmul", [rows, cols])
            total = graph.add("sum", [partial], axes=(0,), keepdims=False)
        graph.replace(nid, total)


def split_reductions(graph: Graph) -> None:
    """Two reductions that would starve the GPU run as two steps.
    - Over several axes including the last one (a sum of squares of a weight gradient,
      for the gradient norm): a single block. Reduce the last axis first (a row kernel,
      one row per warp), then the rest.
    - Over leading axes of a contiguous value, with few outputs (a bias's gradient):
      one thread per output. Sum P interleaved sets of rows first (P x outputs
      threads), then the P partial sums."""
    for nid in list(graph.nx.nodes):
        node = graph.node(nid)
        if node["op"] not in ("sum", "max"):
            continue
        (src,) = node["inputs"]
        shape = graph.type(src).shape
        axes = node["attrs"]["axes"]
        if len(axes) >= 2 and axes[-1] == len(shape) - 1 and graph.type(src).size >= SPLIT_REDUCTION_SIZE:
            with graph.replace_scope(node["scope"]):
                rows = graph.add(node["op"], [src], axes=(len(shape) - 1,), keepdims=True)
            graph.rewire(src, rows, nid)
        elif axes == tuple(range(len(axes))) and len(axes) < len(shape) and _contiguous(graph, src):
            _split_columns(graph, nid, src, shape, len(axes))


def _contiguous(graph: Graph, nid: int) -> bool:
    """A computed value, or reshapes of one, or of its rows sliced (a bf16 copy stored
    with padded rows, precision.py): rows of it can be reshaped again."""
    while graph.op(nid) == "reshape" or (graph.op(nid) == "slice"
                                          and graph.node(nid)["attrs"]["axis"] == len(graph.type(nid).shape) - 1):
        nid = graph.inputs_of(nid)[0]
    return OPS[graph.op(nid)].kind != VIEW


def _split_columns(graph: Graph, nid: int, src: int, shape: tuple[int, ...], lead: int) -> None:
    rows, rest = math.prod(shape[:lead]), shape[lead:]
    outputs = math.prod(rest)
    if outputs >= SPLIT_COLUMNS_THREADS:
        return
    parts = min(rows // SPLIT_COLUMNS_MIN_ROWS, -(-SPLIT_COLUMNS_THREADS // outputs))
    chunk = next((c for c in range(-(-rows // max(parts, 1)), rows) if rows % c == 0), rows)
    if chunk == rows:  # no divisor of the rows gives two parts or more
        return
    op = graph.op(nid)
    with graph.replace_scope(graph.node(nid)["scope"]):
        # part p sums rows p, p + parts, p + 2 parts, ...: a leading axis again, so each of
        # the parts x outputs threads walks it (codegen's thread per output), coalesced
        chunks = graph.add("reshape", [src], shape=(chunk, rows // chunk, *rest))
        if graph.type(chunks).dtype != graph.type(nid).dtype:  # a bf16 operand summed in f32 (precision.py)
            chunks = graph.add("cast", [chunks], dtype=graph.type(nid).dtype)
        partial = graph.add(op, [chunks], axes=(0,), keepdims=False)
        if lead > 1:  # the rank of src, so that nid reduces the same axes
            partial = graph.add("reshape", [partial], shape=(rows // chunk,) + (1,) * (lead - 1) + tuple(rest))
    graph.rewire(src, partial, nid)


def lay_out(graph: Graph) -> None:
    """Insert `copy` nodes where a value must be laid out in memory: a graph output
    that is a view other than a reshape (outputs are stored contiguously), a collective's
    operand that is not a computed value's buffer, and a matmul
    operand whose views are not strided (a permute followed by a reshape that merges
    the permuted axes), since matmul kernels read strided views of buffers (so do the
    grouped ops of a mixture of experts and the decode ops)."""
    for name, nid in list(graph.outputs.items()):
        base = nid
        while OPS[graph.op(base)].kind == VIEW and graph.op(base) == "reshape":
            base = graph.inputs_of(base)[0]
        if OPS[graph.op(base)].kind == VIEW:
            with graph.replace_scope(f"output {name}"):
                graph.outputs[name] = graph.add("copy", [nid])
    split_matmuls(graph)
    split_reductions(graph)
    for nid in list(graph.nx.nodes):
        if OPS[graph.op(nid)].kind == COLLECTIVE:
            # The library reads its operand from one contiguous buffer: a computed value
            # or a reshape of one; anything else (a padded gradient) is copied first.
            (operand,) = graph.inputs_of(nid)
            base = operand
            while graph.op(base) == "reshape":
                base = graph.inputs_of(base)[0]
            if OPS[graph.op(base)].kind in (VIEW, SOURCE) or is_free(graph, base, {}):
                graph.insert_between(operand, nid, "copy")
    for nid in list(graph.nx.nodes):
        if graph.op(nid) not in MATMUL_LIKE:
            continue
        for operand in set(graph.inputs_of(nid)):
            chain, base = [], operand
            while OPS[graph.op(base)].kind == VIEW:
                (src,) = graph.inputs_of(base)
                chain.append((graph.op(base), graph.node(base)["attrs"], graph.type(src).shape, graph.type(base).shape))
                base = src
            if chain and strided(chain[::-1], graph.type(base).shape) is None:
                graph.insert_between(operand, nid, "copy")


def fusion_report(fused: Plan, unfused: Plan) -> str:
    def families(p: Plan) -> str:
        return ", ".join(f"{n} {f}" for f, n in sorted(Counter(k.family for k in p.kernels).items()))
    lines = [
        f"launches per step: fused {len(fused.launches)}, unfused {len(unfused.launches)} "
        f"({len(unfused.launches) / max(1, len(fused.launches)):.1f}x fewer); "
        f"fused kernels {len(fused.kernels)}, batched into {len(fused.launches)} launches",
        f"  fused:   {families(fused)}",
        f"  unfused: {families(unfused)}",
        f"activation bytes (arena peak): fused {fused.peak_activation_bytes:,}, unfused {unfused.peak_activation_bytes:,}",
        f"persistent bytes (params + optimizer state): {fused.arena_bytes['persistent']:,}",
        "fused launches (kernels batched into one launch are listed together):",
    ]
    g = fused.graph
    for launch in fused.launches:
        parts = [fused.kernels[i] for i in launch]
        nodes = [n for k in parts for n in k.nodes]
        scopes = sorted({g.node(n)["scope"] or "-" for n in nodes})
        name = parts[0].name + (f" +{len(parts) - 1}" if len(parts) > 1 else "")
        lines.append(f"  {name:<18} {len(nodes):>4} nodes  stores {sum(len(k.roots) for k in parts):>2}  {', '.join(scopes)[:80]}")
    return "\n".join(lines)
