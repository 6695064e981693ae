"""Fusion: assign every compute node of a graph to exactly one kernel.

Node classes:
- free: sources, constants, iota, views, and anything computed only from constants,
  iota and random_uniform (a causal mask, a dropout mask): never a kernel of its own;
  inlined wherever it is read (views become index arithmetic, sources become loads;
  a dropout mask is recomputed by the backward kernels from its Philox counters).
- compute: elementwise, gather, reduce, matmul, scatter_add.

Kernel families: pointwise, row (reductions over the last axis with the pointwise
work before and after, the reduced values broadcast back over the row), reduce
(column/total reductions with a pointwise prologue), matmul (with a pointwise
epilogue, and a pointwise prologue on an operand: see `gated_operand`), scatter, and
attention and attention_bwd (the causal attention pattern that
planner/attention.py matches, lowered to flash-style kernels; README.md, "How it works").

Fusion walks the graph from consumers to producers. A node joins the kernel of its
users when all of them are in one kernel and the family accepts it there (below);
otherwise it starts a kernel of its own and its value is stored in a buffer. Joining
only a kernel that holds all of a node's users can never create a cycle between
kernels; `check_acyclic` verifies it anyway by contracting the groups in networkx.
The unfused plan puts every compute node in its own kernel."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from gptc.compiler.ir import Graph
from gptc.compiler.planner.attention import AttentionMatch, find_attention
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import (COLLECTIVE, DEDICATED, ELEMENTWISE, GATHER, GROUPED, MATMUL, REDUCE,
                                          SCATTER, SOURCE, VIEW)

POINTWISE, ROW, REDUCTION, MATMUL_FAMILY, SCATTER_FAMILY = "pointwise", "row", "reduce", "matmul", "scatter"
ATTENTION, ATTENTION_BWD = "attention", "attention_bwd"
# Mixture-of-experts dispatch (ops/grouped.py): each op is a kernel of its own, reading
# its operands from buffers and fusing nothing.
GROUP_SORT, GROUPED_MATMUL = "group_sort", "grouped_matmul"
GROUPED_FAMILIES = {"group_rank": GROUP_SORT, "group_offsets": GROUP_SORT,
                    "grouped_matmul": GROUPED_MATMUL, "grouped_weight_grad": GROUPED_MATMUL}
# The ops of kind DEDICATED (KV-cache decode, ops/decode.py; next-token sampling,
# ops/sample.py): a kernel per op, its family the op's name.
DEDICATED_FAMILIES = tuple(name for name, op in OPS.items() if op.kind == DEDICATED)
# Collectives (ops/collective.py): a launch boundary that calls NCCL/RCCL, reading its
# operand from a buffer and writing its result to another; it fuses nothing.
COLLECTIVE_FAMILY = "collective"


# A matmul operand computed in the matmul's loads is at most this many nodes.
PROLOGUE_MAX_NODES = 12


def gated_operand(graph: Graph, nid: int, free: dict[int, bool]) -> set[int] | None:
    """The nodes computing `nid` when it is a matmul operand to compute while loading it
    (a prologue), else None: elementwise nodes (at most PROLOGUE_MAX_NODES) that read
    stored values only through slices, pads and reshapes (at least one slice or pad),
    whose value matmuls read (and column reductions, whose prologue computes it too).
    This is a gated activation, SwiGLU's silu(gate) * up over slices of one gate/up
    projection, and its gradient, the gate's and the up's gradients padded and added
    into the projection's: no producer's epilogue can compute them (an element needs
    two columns of the projection, in different tiles), and computing them in the
    consumers' loads spares a kernel and a buffer."""
    users = compute_users(graph, nid, free)
    if not any(OPS[graph.op(u)].kind == MATMUL for u, _ in users) or any(
            OPS[graph.op(u)].kind not in (MATMUL, REDUCE) for u, _ in users):
        return None
    if any(_in_flash(graph, u) for u, _ in users):
        return None  # attention's matmuls: the flash kernels compute their own prologue (RoPE)
    cone: set[int] = set()
    sliced = False
    stack = [nid]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        if OPS[graph.op(n)].kind != ELEMENTWISE or is_free(graph, n, free) or graph.type(n).dtype != "f32":
            return None
        cone.add(n)
        for src in graph.inputs_of(n):
            chain = []
            while OPS[graph.op(src)].kind == VIEW:
                chain.append(graph.op(src))
                (src,) = graph.inputs_of(src)
            if is_free(graph, src, free):
                continue  # sources and constants: loaded or inlined through any views
            if not chain and OPS[graph.op(src)].kind == ELEMENTWISE:
                stack.append(src)
            elif set(chain) <= {"reshape", "slice", "pad"}:
                sliced |= bool({"slice", "pad"} & set(chain))
            else:
                return None
    return cone if sliced and len(cone) <= PROLOGUE_MAX_NODES else None


def clone_gated_operands(graph: Graph) -> None:
    """Give every matmul reading a gated operand (see `gated_operand`) its own copy of
    the nodes computing it (and of the views between), so that each matmul computes it
    in its loads: the forward projection and the weight gradient's matmul both
    recompute SwiGLU's product, which no kernel stores. Originals that something else
    still reads (the backward's silu(gate)) stay for those readers."""
    free: dict[int, bool] = {}
    for nid in graph.topo_order():
        if nid not in graph.nx or OPS[graph.op(nid)].kind != ELEMENTWISE:
            continue
        cone = gated_operand(graph, nid, free)
        if cone is None:
            continue
        order = [n for n in graph.topo_order() if n in cone]
        _copy_for_readers(graph, nid, order, [(u, tuple(c)) for u, c in compute_users(graph, nid, free)],
                          lambda user, node: node["scope"])
        free.clear()
    graph.prune()


def _copy_for_readers(graph: Graph, nid: int, order: list[int], readers: list[tuple[int, tuple[int, ...]]],
                      scope) -> None:
    """Give each (reader, view chain between) of `nid` its own copy of the nodes `order`
    (those computing nid, in topological order) and of the views, each copy in the scope
    `scope(reader, original node)`."""
    for user, chain in dict.fromkeys(readers):
        last = chain[-1] if chain else nid
        if not graph.nx.has_edge(last, user):
            continue  # the same view chain read twice by one node: already rewired
        copies: dict[int, int] = {}
        for n in [*order, *chain]:
            node = graph.node(n)
            with graph.replace_scope(scope(user, node)):
                copies[n] = graph.add(node["op"], [copies.get(i, i) for i in node["inputs"]], **node["attrs"])
        graph.rewire(last, copies[last], user)


# A forward value the backward recomputes instead of reading is at most this many nodes.
RECOMPUTE_MAX_NODES = 12


def _backward(graph: Graph, nid: int) -> bool:
    return "#bwd" in graph.node(nid)["scope"]


def _in_flash(graph: Graph, nid: int) -> bool:
    """Inside causal attention, whose values the flash kernels compute themselves."""
    return "causal_attention" in graph.node(nid)["scope"]


def recompute_cone(graph: Graph, nid: int, free: dict[int, bool]) -> set[int] | None:
    """The forward nodes computing `nid` when the backward should recompute it rather
    than read it, else None: f32 elementwise nodes (at most RECOMPUTE_MAX_NODES) whose
    stored inputs the backward reads anyway (directly, not through this value). GELU's
    x², x/2, tanh(...) and 1 + tanh(...) are such (its backward reads x itself), and
    LayerNorm's normalised x (from x, the mean and 1/std): the forward kernel stores x
    alone, not five tensors of the MLP's width, and the backward's kernels recompute
    the rest from it. Per-row values (a last axis of 1: norm statistics) are read, not
    recomputed: they are small, and their backward readers are reductions' kernels."""
    if (graph.type(nid).shape or (1,))[-1] == 1:
        return None
    cone: set[int] = set()
    stack = [nid]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        if OPS[graph.op(n)].kind != ELEMENTWISE or is_free(graph, n, free) or graph.type(n).dtype != "f32" \
                or _backward(graph, n):
            return None
        cone.add(n)
        if len(cone) > RECOMPUTE_MAX_NODES:
            return None
        for src in graph.inputs_of(n):
            while OPS[graph.op(src)].kind == VIEW:
                (src,) = graph.inputs_of(src)
            if is_free(graph, src, free):
                continue
            if any(_backward(graph, u) and OPS[graph.op(u)].kind == ELEMENTWISE for u, _ in compute_users(graph, src, free)):
                continue  # a value the backward reads anyway: the frontier
            stack.append(src)
    return cone


def recompute_in_backward(graph: Graph) -> None:
    """Give each backward elementwise node reading a forward value that `recompute_cone`
    accepts its own copy of the nodes computing it (and of the views between): the
    backward kernel recomputes it from values it loads anyway, and the forward kernel
    need not store it (rematerialization; the originals stay for their forward
    readers)."""
    free: dict[int, bool] = {}
    topo = graph.topo_order()
    position = {n: i for i, n in enumerate(topo)}  # the clones are added later and never cloned
    for nid in topo:
        if nid not in graph.nx or OPS[graph.op(nid)].kind != ELEMENTWISE or _backward(graph, nid) \
                or _in_flash(graph, nid):
            continue
        readers = [(u, tuple(c)) for u, c in compute_users(graph, nid, free)
                   if _backward(graph, u) and OPS[graph.op(u)].kind == ELEMENTWISE and not _in_flash(graph, u)]
        if not readers:
            continue
        cone = recompute_cone(graph, nid, free)
        if cone is None:
            continue
        _copy_for_readers(graph, nid, sorted(cone, key=position.__getitem__), readers,
                          lambda user, node: graph.node(user)["scope"])
    graph.prune()


@dataclass
class Group:
    """One kernel: the compute nodes it evaluates, the nodes whose values it stores
    (roots), and its family. `anchor` is the node that fixes the iteration space: the
    matmul, the scatter, the (first) reduction, or the pointwise root."""
    family: str
    anchor: int
    nodes: set[int] = field(default_factory=set)
    attention: AttentionMatch | None = None   # for the attention families


def is_free(graph: Graph, nid: int, cache: dict[int, bool]) -> bool:
    """Views, sources and constant-only subgraphs: inlined, never stored by a kernel."""
    if nid in cache:
        return cache[nid]
    op = graph.op(nid)
    kind = OPS[op].kind
    if kind in (SOURCE, VIEW):
        result = True
    elif kind == ELEMENTWISE:
        # A value computed only from constants and iota (a mask) is recomputed inline.
        result = all(_const_only(graph, i, cache) for i in graph.inputs_of(nid))
    else:
        result = False
    cache[nid] = result
    return result


def _const_only(graph: Graph, nid: int, cache: dict[int, bool]) -> bool:
    op = graph.op(nid)
    if op in ("const", "iota", "random_uniform"):   # random_uniform only loads a scalar step
        return True
    if op in ("input", "param", "state"):
        return False
    kind = OPS[op].kind
    if kind == ELEMENTWISE:  # the same question as is_free's, whose answers are cached
        return is_free(graph, nid, cache)  # (a walk up each chain of adds is quadratic)
    return kind == VIEW and all(_const_only(graph, i, cache) for i in graph.inputs_of(nid))


def compute_users(graph: Graph, nid: int, free: dict[int, bool]) -> list[tuple[int, list[int]]]:
    """The compute nodes that read `nid`, each with the chain of view nodes between
    (looking through views; a free elementwise node is not a user)."""
    found: list[tuple[int, list[int]]] = []
    stack: list[tuple[int, list[int]]] = [(u, []) for u in graph.users(nid)]
    while stack:
        user, chain = stack.pop()
        if OPS[graph.op(user)].kind == VIEW:
            stack.extend((u, chain + [user]) for u in graph.users(user))
        elif not is_free(graph, user, free):
            found.append((user, chain))
    return sorted(found, key=lambda t: (t[0], t[1]))


def row_space(graph: Graph, nid: int) -> tuple[int, ...] | None:
    """For a reduction over the last axis with keepdims, the shape it reduces."""
    node = graph.node(nid)
    shape = graph.type(node["inputs"][0]).shape
    if node["attrs"]["axes"] == (len(shape) - 1,) and node["attrs"]["keepdims"] and len(shape) >= 1:
        return shape
    return None


def _size(graph: Graph, nid: int) -> int:
    return graph.type(nid).size


class Fuser:
    def __init__(self, graph: Graph, fuse: bool) -> None:
        self.graph = graph
        self.fuse = fuse
        self.free: dict[int, bool] = {}
        self.group_of: dict[int, int] = {}
        self.groups: list[Group] = []
        self.roots: set[int] = set(graph.roots())
        # New values of params and states are written in place, which only pointwise
        # kernels do safely (schedule._check_in_place), so row kernels and matmul
        # epilogues never compute one: without gradient clipping, AdamW would otherwise
        # join the epilogue of the weight-gradient matmul.
        self.in_place: set[int] = set(graph.updates.values())
        # Nodes computed in a matmul's operand loads (gated_operand), not at its output.
        self.prologue: set[int] = set()
        # compute_users by node: the graph does not change while it is fused, and the
        # merge pass asks again for every node of every candidate union.
        self._users: dict[int, list[tuple[int, list[int]]]] = {}

    def users(self, nid: int) -> list[tuple[int, list[int]]]:
        if nid not in self._users:
            self._users[nid] = compute_users(self.graph, nid, self.free)
        return self._users[nid]

    def run(self) -> list[Group]:
        g = self.graph
        if self.fuse:
            for match in find_attention(g, lambda n: is_free(g, n, self.free)):
                copy = {match.copy} if match.copy is not None else set()
                self._claim(Group(ATTENTION, match.out, match.forward | match.prologue | copy, match))
                if match.backward:
                    self._claim(Group(ATTENTION_BWD, match.stores()[-1], match.backward | match.concat_nodes, match))
        for nid in reversed(g.topo_order()):
            if is_free(g, nid, self.free) or nid in self.group_of:
                continue
            target = self._join_target(nid) if self.fuse else None
            if target is None:
                self._new_group(nid)
            else:
                self.groups[target].nodes.add(nid)
                self.group_of[nid] = target
        # Groups were created consumers-first; number them producers-first.
        groups = list(reversed(self.groups))
        return self._merge_producers(groups) if self.fuse else groups

    def _claim(self, group: Group) -> None:
        for n in group.nodes:
            self.group_of[n] = len(self.groups)
        self.groups.append(group)

    def _merge_producers(self, groups: list[Group]) -> list[Group]:
        """Second pass: merge a kernel into the kernel that produces its inputs when the
        union is still one legal kernel (it then stores several values: multi-output
        fusion, e.g. a layernorm that keeps its statistics for the backward pass) and
        the kernel graph stays acyclic."""
        kg = kernel_graph(self.graph, groups)
        members = {i: grp for i, grp in enumerate(groups)}
        changed = True
        while changed:
            changed = False
            for q in list(nx.topological_sort(kg)):
                if q not in kg:
                    continue
                for p in sorted(kg.successors(q)):
                    if members[q].attention or members[p].attention:
                        continue
                    family = self._classify(members[q].nodes | members[p].nodes)
                    if family is None:
                        continue
                    # Merging q and p makes a cycle iff another path leads from q to p.
                    if any(x != p and nx.has_path(kg, x, p) for x in kg.successors(q)):
                        continue
                    members[q].nodes |= members[p].nodes
                    members[q].family, members[q].anchor = family
                    nx.contracted_nodes(kg, q, p, self_loops=False, copy=False)
                    del members[p]
                    changed = True
        order = list(nx.lexicographical_topological_sort(kg, key=lambda i: min(members[i].nodes)))
        return [members[i] for i in order]

    def _classify(self, nodes: set[int]) -> tuple[str, int] | None:
        """(family, anchor) if `nodes` can be one kernel, else None."""
        g = self.graph
        kinds = {n: OPS[g.op(n)].kind for n in nodes}
        matmuls = [n for n, k in kinds.items() if k == MATMUL]
        reduces = [n for n, k in kinds.items() if k == REDUCE]
        if any(k in (SCATTER, GROUPED, DEDICATED, COLLECTIVE) for k in kinds.values()):
            return None
        # A kernel cannot read a buffer it writes: matmul operands and gather tables
        # must come from other kernels (through a prologue: what the prologue reads).
        prologue = nodes & self.prologue
        for n in nodes:
            if kinds[n] in (MATMUL, GATHER) or n in prologue:
                operands = g.inputs_of(n) if kinds[n] == MATMUL or n in prologue else g.inputs_of(n)[:1]
                if any(p in nodes - prologue for o in operands for p in _producers(g, o, self.free)):
                    return None
        if matmuls:
            if len(matmuls) == 1 and not reduces and self._epilogue_legal(nodes, matmuls[0]):
                return MATMUL_FAMILY, matmuls[0]
            return None
        if reduces:
            space = row_space(g, reduces[0])
            if space is not None and self._row_legal(nodes, space):
                return ROW, min(reduces)
            return None
        roots = [n for n in nodes if n in self.roots or any(u not in nodes for u, _ in self.users(n))]
        if len({g.type(n).shape for n in roots}) != 1:
            return None
        for n, _, chain in self._internal_chains(nodes):
            if self._repeats(n, chain) and not self._cheap_scalar(n):
                return None
        return POINTWISE, max(roots)

    def _new_group(self, nid: int) -> None:
        kind = OPS[self.graph.op(nid)].kind
        if kind == MATMUL:
            family = MATMUL_FAMILY
        elif kind == SCATTER:
            family = SCATTER_FAMILY
        elif kind == GROUPED:
            family = GROUPED_FAMILIES[self.graph.op(nid)]
        elif kind == DEDICATED:
            family = self.graph.op(nid)
        elif kind == COLLECTIVE:
            family = COLLECTIVE_FAMILY
        elif kind == REDUCE:
            family = ROW if row_space(self.graph, nid) else REDUCTION
        else:
            family = POINTWISE
        self.group_of[nid] = len(self.groups)
        self.groups.append(Group(family, nid, {nid}))

    def _join_target(self, nid: int) -> int | None:
        """The group `nid` may join, or None if it must be stored by a kernel of its own."""
        g = self.graph
        if nid in self.roots:
            return None
        users = self.users(nid)
        targets = {self.group_of[u] for u, _ in users}
        if len(targets) != 1:
            return None
        target = targets.pop()
        group = self.groups[target]
        if group.attention or group.family in (GROUP_SORT, GROUPED_MATMUL, *DEDICATED_FAMILIES, COLLECTIVE_FAMILY):
            return None
        if group.family == MATMUL_FAMILY and all(u == group.anchor for u, _ in users):
            cone = gated_operand(g, nid, self.free)
            if cone is not None and all(u in cone or u == group.anchor for c in cone for u, _ in self.users(c)):
                for n in cone - {nid}:  # the rest of the cone joins with nid (run adds nid)
                    group.nodes.add(n)
                    self.group_of[n] = target
                self.prologue |= cone
                return target
        for user, chain in users:
            read = chain[-1] if chain else nid
            user_kind = OPS[g.op(user)].kind
            # Matmul operands, gather tables and the decode ops' operands are read from buffers.
            if user_kind in (MATMUL, DEDICATED) or (user_kind == GATHER and g.inputs_of(user)[0] == read):
                return None
        kind = OPS[g.op(nid)].kind
        if g.op(nid) == "cast" and g.type(nid).dtype == "bf16":
            # A bf16 copy (compiler/precision.py) is stored, at half the bytes, by the kernel
            # that computes its source (merged there after); a consumer computing it from the
            # f32 value would have that value stored instead (the logits cross-entropy reads).
            return None
        if kind == REDUCE:
            space = row_space(g, nid)
            if space is None or group.family not in (ROW, POINTWISE):
                return None
            if not self._row_legal(group.nodes | {nid}, space):
                return None
            if group.family == POINTWISE:
                group.family, group.anchor = ROW, nid
            return target
        if kind == MATMUL:
            # A matmul takes over a pointwise kernel as its epilogue when the epilogue
            # reads every value at the matmul's own element.
            if group.family != POINTWISE or not self._epilogue_legal(group.nodes | {nid}, nid):
                return None
            group.family, group.anchor = MATMUL_FAMILY, nid
            return target
        if kind not in (ELEMENTWISE, GATHER):
            return None
        if group.family == ROW:
            return target if self._row_legal(group.nodes | {nid}, row_space(g, group.anchor)) else None
        if group.family == MATMUL_FAMILY:
            return target if self._epilogue_legal(group.nodes | {nid}, group.anchor) else None
        # Pointwise, reduce and scatter kernels inline a producer where each element is
        # read once (views that do not broadcast it), so nothing is computed twice,
        # except cheap scalars (a learning-rate factor), recomputed per element.
        if any(self._repeats(nid, chain) for _, chain in users) and not self._cheap_scalar(nid):
            return None
        return target

    def _repeats(self, nid: int, chain: list[int]) -> bool:
        """Whether a consumer reading `nid` through `chain` reads its elements more than
        once: the views grow it, by a broadcast (a pad only adds zeros: rope's halves and
        the VJP of a slice read each element once)."""
        g = self.graph
        return bool(chain) and _size(g, chain[-1]) > _size(g, nid) and any(g.op(v) == "broadcast" for v in chain)

    def _cheap_scalar(self, nid: int, depth: int = 4) -> bool:
        """A scalar computed in a few ops from sources and constants only."""
        g = self.graph
        if g.op(nid) in ("input", "param", "state", "const", "iota"):
            return True
        if depth == 0 or _size(g, nid) != 1 or OPS[g.op(nid)].kind not in (ELEMENTWISE, VIEW):
            return False
        return all(self._cheap_scalar(i, depth - 1) for i in g.inputs_of(nid))

    def _internal_chains(self, nodes: set[int]):
        """(producer, consumer, chain of views) for every edge inside a group."""
        for n in nodes:
            for consumer, chain in self.users(n):
                if consumer in nodes:
                    yield n, consumer, chain

    def _row_legal(self, nodes: set[int], space: tuple[int, ...]) -> bool:
        """Row kernels hold nodes shaped like the row space (lead..., N) or its reduced
        form (lead..., 1), joined directly or by broadcasting (lead..., 1) over the row;
        and elementwise nodes over padded rows (lead..., N + k) that read row values
        through a pad of the row's end (`padded_row`: the bf16 copy of the logits'
        gradient, its rows padded to 16 bytes, is cast where the gradient is computed)."""
        g = self.graph
        if nodes & self.in_place:
            return False
        reduced = space[:-1] + (1,)
        for n in nodes:
            kind = OPS[g.op(n)].kind
            if kind == REDUCE and row_space(g, n) != space:
                return False
            if kind not in (REDUCE, ELEMENTWISE, GATHER) or (g.type(n).shape not in (space, reduced) and not (
                    kind == ELEMENTWISE and padded_row(g.type(n).shape, space))):
                return False
        for n, consumer, chain in self._internal_chains(nodes):
            if all(g.op(v) == "reshape" and g.type(v).shape == g.type(n).shape for v in chain):
                continue  # no view at all (a reshape to the same shape: cross-entropy's rows of 2-D logits)
            view = chain[0]
            if len(chain) == 1 and g.op(view) == "broadcast" and g.type(n).shape == reduced and g.type(view).shape == space:
                continue
            attrs = g.node(view)["attrs"]
            if len(chain) == 1 and g.op(view) == "pad" and attrs["axis"] == len(space) - 1 and attrs["before"] == 0 \
                    and g.type(n).shape == space and padded_row(g.type(consumer).shape, space):
                continue
            return False
        return True

    def _epilogue_legal(self, nodes: set[int], matmul: int) -> bool:
        """Elementwise nodes of C's size joined by reshapes; and elementwise nodes over C's
        rows padded at their end (`padded_row`) reading C's values through that pad, whose
        readers all slice the padding off again (precision.py stores a bf16 copy so, rows
        16-byte aligned, gpt2's logits): the epilogue computes C's elements only, so the
        padding, never read, is never written either."""
        g = self.graph
        nodes = nodes - self.prologue  # computed at the operand's elements, not C's
        if nodes & self.in_place:
            return False
        size, space = _size(g, matmul), g.type(matmul).shape
        if any(n != matmul and OPS[g.op(n)].kind not in (ELEMENTWISE, GATHER) for n in nodes):
            return False
        padded = {n for n in nodes if _size(g, n) != size}
        if any(not padded_row(g.type(n).shape, space) or not self._padding_unread(n, space[-1], nodes) for n in padded):
            return False
        for n, consumer, chain in self._internal_chains(nodes):
            if all(g.op(v) == "reshape" for v in chain):
                continue
            attrs = g.node(chain[0])["attrs"]
            if not (len(chain) == 1 and g.op(chain[0]) == "pad" and attrs["axis"] == len(space) - 1
                    and attrs["before"] == 0 and g.type(n).shape == space and consumer in padded):
                return False
        return True

    def _padding_unread(self, nid: int, width: int, group: set[int]) -> bool:
        """Every reader of `nid` (rows padded past `width`) outside `group` reads a slice of
        the rows' first `width` elements."""
        g = self.graph
        for user in g.users(nid):
            attrs = g.node(user)["attrs"]
            if user in group:
                continue
            if g.op(user) != "slice" or attrs["axis"] != len(g.type(nid).shape) - 1 or attrs["stop"] > width:
                return False
        return True


def padded_row(shape: tuple[int, ...], space: tuple[int, ...]) -> bool:
    """`shape` is the row space `space` with longer rows (a pad of the rows' end)."""
    return len(shape) == len(space) and shape[:-1] == space[:-1] and shape[-1] > space[-1]


def fuse_graph(graph: Graph, fuse: bool = True) -> list[Group]:
    groups = Fuser(graph, fuse).run()
    check_acyclic(graph, groups)
    return groups


def kernel_graph(graph: Graph, groups: list[Group]) -> nx.DiGraph:
    """Groups as nodes, an edge where one group reads a value another computes."""
    owner = {n: i for i, grp in enumerate(groups) for n in grp.nodes}
    kg = nx.DiGraph()
    kg.add_nodes_from(range(len(groups)))
    free: dict[int, bool] = {}
    for i, grp in enumerate(groups):
        for n in grp.nodes:
            for src in graph.inputs_of(n):
                for producer in _producers(graph, src, free):
                    j = owner[producer]
                    if j != i:
                        kg.add_edge(j, i)
    return kg


def _producers(graph: Graph, nid: int, free: dict[int, bool]) -> list[int]:
    """The compute nodes whose values `nid` reads, through views and free nodes."""
    if not is_free(graph, nid, free):
        return [nid]
    out: list[int] = []
    for src in graph.inputs_of(nid):
        out += _producers(graph, src, free)
    return out


def check_acyclic(graph: Graph, groups: list[Group]) -> None:
    seen: dict[int, int] = {}
    for i, grp in enumerate(groups):
        for n in grp.nodes:
            if n in seen:
                raise AssertionError(f"node %{n} is in kernels {seen[n]} and {i}")
            seen[n] = i
    free: dict[int, bool] = {}
    compute = {n for n in graph.nx.nodes if not is_free(graph, n, free)}
    if compute != set(seen):
        raise AssertionError(f"nodes without a kernel: {sorted(compute - set(seen))[:10]}")
    if not nx.is_directed_acyclic_graph(kernel_graph(graph, groups)):
        raise AssertionError("fusion produced a cycle between kernels")
