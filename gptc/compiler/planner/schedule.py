"""Schedule and memory: launch order, liveness, buffers and arena offsets.

Arenas:
- "persistent": params and optimizer state. A kernel that computes a new value of a
  param or state writes it in place, so every other reader of the old value is
  scheduled before it (anti-dependency edges in the kernel graph).
- "io": graph inputs (fed each step) and outputs (read back after the step).
- "activations": everything else, with offsets reused between buffers whose lifetimes
  do not overlap (best fit by size, largest first)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx

from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import DTYPE_BYTES, VIEW
from gptc.compiler.planner.attention import AttentionMatch
from gptc.compiler.planner.fusion import COLLECTIVE_FAMILY, Group, compute_users, is_free

ALIGN = 256


@dataclass
class Buffer:
    name: str
    node: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    arena: str           # persistent | io | activations
    offset: int = 0
    role: str = ""       # the param/state/input/output name, if any


@dataclass
class KernelPlan:
    name: str
    family: str
    anchor: int
    nodes: list[int]              # compute nodes, in topological order
    roots: list[int]              # nodes whose values this kernel stores
    reads: list[int]              # buffered nodes it loads (sources and other kernels' roots)
    zero_init: list[int] = field(default_factory=list)  # roots to clear before launch
    attention: AttentionMatch | None = None  # operands and results of the attention families


@dataclass
class Plan:
    graph: Graph
    fused: bool
    kernels: list[KernelPlan]
    buffers: dict[int, Buffer]            # node id -> buffer holding its value
    arena_bytes: dict[str, int]
    aliases: dict[int, int]               # output view node -> node whose buffer it reads
    lifetimes: dict[int, tuple[int, int]]  # activation node -> (first, last) launch index
    launches: list[list[int]]              # kernel indices run by each launch, in order

    @property
    def peak_activation_bytes(self) -> int:
        return self.arena_bytes["activations"]

    def buffer_of(self, nid: int) -> Buffer:
        return self.buffers[self.aliases.get(nid, nid)]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def reads_of(graph: Graph, nodes: set[int], free: dict[int, bool]) -> list[int]:
    """Buffered values a kernel computing `nodes` loads: sources reached through free
    nodes, and compute nodes of other kernels."""
    found: set[int] = set()
    stack = [i for n in nodes for i in graph.inputs_of(n)]
    seen: set[int] = set()
    while stack:
        nid = stack.pop()
        if nid in seen or nid in nodes:
            continue
        seen.add(nid)
        op = graph.op(nid)
        if op in ("input", "param", "state") or not is_free(graph, nid, free):
            found.add(nid)
        else:
            stack.extend(graph.inputs_of(nid))
    return sorted(found)


def _alias_source(graph: Graph, nid: int) -> int | None:
    """For an output that is a chain of reshapes over a computed value, that value."""
    while OPS[graph.op(nid)].kind == VIEW:
        if graph.op(nid) != "reshape":
            return None
        nid = graph.inputs_of(nid)[0]
    return nid


def schedule(graph: Graph, groups: list[Group], fused: bool) -> Plan:
    free: dict[int, bool] = {}
    graph_roots = set(graph.roots())
    aliases: dict[int, int] = {}
    for r in graph_roots:
        if is_free(graph, r, free):
            src = _alias_source(graph, r)
            if src is None or is_free(graph, src, free):
                raise NotImplementedError(f"graph output {graph.describe(r)} is a view that is not a reshape of a computed value")
            aliases[r] = src

    position = {n: i for i, n in enumerate(graph.topo_order())}
    kernels: list[KernelPlan] = []
    for grp in groups:
        nodes = sorted(grp.nodes, key=position.__getitem__)
        roots = [n for n in nodes
                 if n in graph_roots or n in aliases.values()
                 or any(u not in grp.nodes for u, _ in compute_users(graph, n, free))]
        reads = reads_of(graph, grp.nodes, free)
        if grp.family == "kv_write":  # writes rows of the cache in place; never loads it
            reads = [r for r in reads if r != graph.inputs_of(grp.anchor)[0]]
        if grp.attention:
            roots, reads = _attention_io(graph, grp)
        kernels.append(KernelPlan("", grp.family, grp.anchor, nodes, roots, reads,
                                  zero_init=[grp.anchor] if grp.family == "scatter" else [], attention=grp.attention))

    # Launch order: data dependencies plus, for in-place updates, "read the old value
    # before it is overwritten".
    owner = {r: k for k, kern in enumerate(kernels) for r in kern.nodes}
    kg = nx.DiGraph()
    kg.add_nodes_from(range(len(kernels)))
    for k, kern in enumerate(kernels):
        for src in kern.reads:
            if src in owner:
                kg.add_edge(owner[src], k)
    source_of_update = {**graph.params, **graph.states}
    for name, new_value in graph.updates.items():
        old = source_of_update[name]
        writer = owner[new_value]
        _check_in_place(graph, kernels[writer], old, new_value, free)
        for k, kern in enumerate(kernels):
            if k != writer and old in kern.reads:
                kg.add_edge(k, writer)
    if not nx.is_directed_acyclic_graph(kg):
        raise AssertionError("in-place updates conflict with the data dependencies")
    topo = {k: i for i, k in enumerate(nx.lexicographical_topological_sort(kg))}
    level = _latest_levels(kg)
    params = set(graph.params.values()) if graph.updates else set()  # training graphs
    for k, kern in enumerate(kernels):
        # Pointwise work on params alone (the bf16 copies of the weights) runs first, in
        # one launch, instead of one launch before each first use: a training step's
        # copies are live until the backward's matmuls read them anyway.
        if kern.family == "pointwise" and kern.reads and set(kern.reads) <= params and kg.in_degree(k) == 0:
            level[k] = 0
    _early_collectives(graph, kernels, kg, level)
    order = sorted(topo, key=lambda k: (level[k], topo[k]))
    if fused:
        order, launches = _batch(graph, kernels, order, level)
    else:
        launches = [[i] for i in range(len(order))]
    kernels = [kernels[k] for k in order]
    for k, kern in enumerate(kernels):
        kern.name = f"k{k:03d}_{kern.family}"

    buffers, arena_bytes, lifetimes = _allocate(graph, kernels, launches, aliases)
    return Plan(graph, fused, kernels, buffers, arena_bytes, aliases, lifetimes, launches)


BATCHED_FAMILIES = ("pointwise", "reduce", "matmul", "kv_write")
# A matmul joins a batched launch only if its products are small (at most this many
# elements each, e.g. 64 tiles of 64x64): alone it would leave most of the GPU idle (the
# weight gradients dW = X^T dY of a small model, also when split along K), while a large
# one fills the GPU by itself and would only lose its own best configuration (a batched
# launch needs one block size for all its parts).
BATCHED_MATMUL_MAX_OUTPUT = 2**18


def _latest_levels(kg: nx.DiGraph) -> dict[int, int]:
    """Each kernel's latest level: as late as its consumers allow. Kernels on one
    level never depend on each other, so they can share a launch."""
    height: dict[int, int] = {}
    for k in reversed(list(nx.topological_sort(kg))):
        height[k] = 1 + max((height[s] for s in kg.successors(k)), default=0)
    top = max(height.values(), default=0)
    return {k: top - h for k, h in height.items()}


def bucket_of(graph: Graph, kern: KernelPlan) -> int:
    return graph.node(kern.anchor)["attrs"]["bucket"]


def _early_collectives(graph: Graph, kernels: list[KernelPlan], kg: nx.DiGraph, level: dict[int, int]) -> None:
    """Issue gradient buckets as early as the backward produces them: the kernels that
    collectives depend on (the forward and backward passes) move from their latest
    level to their earliest (else the weight gradients, which nothing but the optimizer
    reads, would all wait for the end of the step), and each bucket to the level after
    the last kernel producing one of its operands, so its communication runs on the
    communication stream while the backward goes on. Kernels that read a collective's
    result keep their latest level, so the communication has time to finish. A bucket
    that cannot move as one keeps its latest levels (it then spans several launches)."""
    collectives = [k for k in kg if kernels[k].family == COLLECTIVE_FAMILY]
    if not collectives:
        return
    feeding: set[int] = set()
    for k in collectives:
        feeding |= nx.ancestors(kg, k)
    for k in collectives:  # what reads a collective's result keeps its latest level
        feeding -= nx.descendants(kg, k)
    members: dict[int, list[int]] = {}
    for k in nx.lexicographical_topological_sort(kg):
        if k in feeding:
            level[k] = min(level[k], 1 + max((level[p] for p in kg.predecessors(k)), default=-1))
        elif kernels[k].family == COLLECTIVE_FAMILY:
            members.setdefault(bucket_of(graph, kernels[k]), []).append(k)
    for bucket, ks in members.items():  # in the order their first collective can run
        early = max(1 + max((level[p] for p in kg.predecessors(k)), default=-1) for k in ks)
        if all(early < level[s] for k in ks for s in kg.successors(k)):
            for k in ks:
                level[k] = early


def _batchable(graph: Graph, kern: KernelPlan) -> bool:
    if kern.family == COLLECTIVE_FAMILY:
        return True
    if kern.family == "matmul":
        return math.prod(graph.type(kern.anchor).shape[-2:]) <= BATCHED_MATMUL_MAX_OUTPUT
    return kern.family in BATCHED_FAMILIES


def _batch(graph: Graph, kernels: list[KernelPlan], order: list[int],
           level: dict[int, int]) -> tuple[list[int], list[list[int]]]:
    """(order, launches): independent pointwise, reduce (or small matmul) kernels on one
    level share one launch (horizontal fusion, e.g. the AdamW update of every parameter
    at once, or the weight gradients of every layer). Kernels on one level never depend
    on each other, so within a level the batchable kernels of a family are moved
    together (at the place of the first of them); the rest keep their order."""
    by_level: dict[int, list[int]] = {}
    for k in order:
        by_level.setdefault(level[k], []).append(k)
    launches: list[list[int]] = []
    for lv in sorted(by_level):
        batches: dict[object, list[int]] = {}
        # Collectives first in their level: the library call is queued before the
        # compute kernels that run beside it.
        for k in sorted(by_level[lv], key=lambda k: kernels[k].family != COLLECTIVE_FAMILY):
            family = kernels[k].family
            if family == COLLECTIVE_FAMILY:  # one launch (one library group) per bucket
                family = (family, bucket_of(graph, kernels[k]))
            if _batchable(graph, kernels[k]):
                if family not in batches:
                    batches[family] = []
                    launches.append(batches[family])
                batches[family].append(k)
            else:
                launches.append([k])
    new_order = [k for launch in launches for k in launch]
    position = {k: i for i, k in enumerate(new_order)}
    return new_order, [[position[k] for k in launch] for launch in launches]


def _attention_io(graph: Graph, grp: Group) -> tuple[list[int], list[int]]:
    """The flash kernels store only out (and m, s for the backward pass; its bf16 copy
    where they make it) or the gradients of q, k, v (or their concatenation), and
    recompute everything else from their operands (and q and k from their prologue's
    inputs)."""
    a = grp.attention
    operands = [a.q, a.k_t, a.v] + ([a.out, a.m, a.s, a.d_out] if grp.family == "attention_bwd" else []) \
        + ([a.dropout.step] if a.dropout else [])
    # A prologue's inputs instead of the q or k it computes.
    bases = {graph.view_base(o) for o in operands} - a.prologue
    reads = sorted(bases | set(reads_of(graph, a.prologue, {})))
    if grp.family == "attention":
        roots = [a.out] + ([a.m, a.s] if a.backward else []) + ([a.copy] if a.copy is not None else [])
    else:
        roots = a.stores()
    return roots, reads


def _check_in_place(graph: Graph, kernel: KernelPlan, old: int, new: int, free: dict[int, bool]) -> None:
    """A kernel may overwrite a param/state only if each thread reads the old value at
    exactly the element it writes: pointwise work, same shape, no views between; or
    kv_write, which writes some rows of its cache and reads none."""
    if kernel.family == "kv_write" and kernel.nodes == [new] and graph.inputs_of(new)[0] == old:
        return
    shape = graph.type(old).shape
    ok = kernel.family == "pointwise" and all(graph.type(r).shape == shape for r in kernel.roots)
    ok = ok and not any(user in kernel.nodes and chain for user, chain in compute_users(graph, old, free))
    if not ok:
        raise NotImplementedError(f"cannot update {graph.describe(old)} in place in kernel family {kernel.family}")


def _allocate(graph: Graph, kernels: list[KernelPlan], launches: list[list[int]], aliases: dict[int, int]):
    buffers: dict[int, Buffer] = {}
    offsets = {"persistent": 0, "io": 0}

    def add(nid: int, arena: str, role: str = "") -> Buffer:
        t = graph.type(nid)
        buf = Buffer(f"b{nid}", nid, t.dtype, t.shape, t.size * DTYPE_BYTES[t.dtype], arena, role=role)
        if arena != "activations":
            buf.offset = offsets[arena]
            offsets[arena] += _aligned(buf.nbytes)
        buffers[nid] = buf
        return buf

    for table, arena in ((graph.params, "persistent"), (graph.states, "persistent"), (graph.inputs, "io")):
        for name in sorted(table):
            add(table[name], arena, name)
    # New values of params and states share the buffer of the old value.
    source_of_update = {**graph.params, **graph.states}
    for name, nid in graph.updates.items():
        buffers[nid] = buffers[source_of_update[name]]
    for name, nid in sorted(graph.outputs.items()):
        target = aliases.get(nid, nid)
        if target not in buffers:
            add(target, "io", name)

    # Activations: lifetimes over the launch order (kernels of one launch run at the
    # same time), then best-fit offsets.
    launch_of = {k: i for i, launch in enumerate(launches) for k in launch}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for index, kern in enumerate(kernels):
        k = launch_of[index]
        for r in kern.roots:
            if r not in buffers:
                first[r] = k
                last.setdefault(r, k)
        for src in kern.reads:
            if src in first:
                last[src] = max(last[src], k)
    # A collective runs on the communication stream from its launch until the first
    # kernel that reads its result waits for it: its operands stay alive that long.
    for index, kern in enumerate(kernels):
        if kern.family == COLLECTIVE_FAMILY:
            end = max(last.get(r, launch_of[index]) for r in kern.roots)
            for src in kern.reads:
                if src in last:
                    last[src] = max(last[src], end)
    placed: list[Buffer] = []
    lifetimes = {n: (first[n], last[n]) for n in first}
    for nid in sorted(first, key=lambda n: (-graph.type(n).nbytes, n)):
        buf = add(nid, "activations")
        lo, hi = lifetimes[nid]
        busy = sorted((b.offset, b.offset + _aligned(b.nbytes)) for b in placed
                      if not (lifetimes[b.node][1] < lo or lifetimes[b.node][0] > hi))
        offset = 0
        best = None
        for start, end in busy:  # best fit: the smallest gap that holds the buffer
            gap = start - offset
            if gap >= _aligned(buf.nbytes) and (best is None or gap < best[1]):
                best = (offset, gap)
            offset = max(offset, end)
        buf.offset = best[0] if best else offset
        placed.append(buf)
    offsets["activations"] = max((b.offset + _aligned(b.nbytes) for b in placed), default=0)
    return buffers, offsets, lifetimes
