"""Matching causal attention in the graph, for the flash-style kernels.

`dsl.causal_attention` decomposes into primitives inside a scope named after it:
    scores = (q @ kᵀ) * scale;  masked = where(visible, scores, -inf)
    m = max(masked); e = exp(masked - m); s = sum(e); p = e / s;  out = p @ v
and autodiff tags its backward nodes with the same scope plus "#bwd". For each such
scope the matcher checks that the nodes have exactly this structure and find the
operands. The mask `visible` must be one the kernels implement, read from its nodes:
row >= col (causal), or that and row - col < window (local); any other mask is left
to the generic fusion. Grouped-query attention arrives as views (query heads
(.., Hkv, G, S, d), keys and values broadcast over G with stride 0), which the
kernels index like any other operand; the sums over G that autodiff adds for dk and
dv (the broadcast's VJP) join the backward match, whose key blocks then accumulate
dK and dV over the G query heads of their key/value head. The planner then puts the
forward nodes in one "attention" kernel (which stores only out, m and s: the S×S
matrix never reaches memory) and the backward nodes in one "attention_bwd" launch that
recomputes p from q, k, m and s. Anything that does not match exactly is left to the
generic fusion, which computes the same values.

With dropout on the probabilities (dsl.dropout inside it, `drop`), out =
where(uniform >= threshold, p * 1/(1-rate), 0) @ v: the kernels recompute the Philox
mask per element (forward: after the row statistics, which dropout does not change;
backward: on p for dV and on dP for dS, where delta = rowsum(dO * out) still equals
rowsum(P_dropped * dP_dropped)).

A prologue: when q or k is `dsl.rope` of a view of a buffer (the rotated queries and
keys of a RoPE model), the rope's compute nodes join the forward kernel, which
evaluates them as it loads its q and k tiles (the backward kernel re-evaluates them the
same way), so the rotated q and k never reach memory. The gradients the backward
kernel stores are those of the rotated values; rope's own VJP (the inverse rotation)
stays in the generic fusion downstream.

bf16 (the precision pass, compiler/precision.py): q, k, v and dO arrive as views of
bf16 casts made outside the scope, and the probabilities P (operand of P·V and of
dV = Pᵀ·dO) and the scores' gradient dS (operand of dQ and dKᵀ) are cast inside it,
in the scopes ".../softmax/bf16" (".../dropout/bf16" with dropout) and "...#bwd/bf16".
The matcher looks through those casts (they join the match) and records `bf16`: the
kernels then read bf16 operands and round P and dS to bf16 where the casts are.
The cast of out itself (for the projection that reads it, in ".../causal_attention/bf16")
is stored by the forward kernel as well, where nothing else outside the match reads out
(`_match_copy`); likewise the backward stores dq, dk, dv straight into the QKV
concatenation that reads them (`_match_concat`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.strides import strided
from gptc.compiler.ops.registry import ELEMENTWISE, VIEW

MAX_HEAD_DIM = 128  # the kernels stage tiles of head_dim-float rows in shared memory (codegen's _attention_tiles)
# Composites whose (elementwise) nodes the kernels evaluate while loading q and k.
PROLOGUE_COMPOSITES = ("rope",)
# Scope tails (after "causal_attention") of the precision pass's casts of P and dS.
INNER_CASTS = ("/softmax/bf16", "/dropout/bf16", "#bwd/bf16")


@dataclass(frozen=True)
class AttentionDropout:
    """Dropout on the attention probabilities: drop where random_uniform < threshold,
    scale the others by `scale` (gptc/compiler/ops/random.py)."""
    step: int          # the scalar step input the mask is keyed by
    seed: int
    stream: int
    threshold: float
    scale: float


@dataclass
class AttentionMatch:
    scope: str
    q: int              # operand nodes as the matmuls read them (views of buffers)
    k_t: int            # kᵀ: (.., D, S)
    v: int
    scale: float
    window: int         # 0: causal; else a query at i sees keys j with i - window < j <= i
    out: int            # p @ v
    m: int              # row max of the masked scores (keepdims)
    s: int              # row sum of exp(masked - m) (keepdims)
    forward: set[int] = field(default_factory=set)
    backward: set[int] = field(default_factory=set)
    d_out: int | None = None   # the gradient of out (an operand of dv), if trained
    dq: int | None = None      # (.., S, D)
    dk_t: int | None = None    # (.., D, S) = qᵀ dS, or
    dk: int | None = None      # (.., S, D) = dSᵀ q where planning transposed the product (transpose_products)
    dv: int | None = None      # (.., S, D)
    group: int = 1             # query heads per key/value head; with more than one, the
    dk_sum: int | None = None  # backward stores dkᵀ and dv summed over the group instead:
    dv_sum: int | None = None  # (.., Hkv, 1, S, D) each
    # Compute nodes of q's and k's prologues (dsl.rope), evaluated by both kernels as
    # they load q and k: then q (k_t) is not stored, the kernels read its inputs.
    prologue: set[int] = field(default_factory=set)
    dropout: AttentionDropout | None = None
    bf16: bool = False         # bf16 operands; P and dS rounded to bf16 (casts in the match)
    # The gradients' concatenation (QKV's, for the fused projection's backward), which
    # the backward stores instead of them: the node stored (the last add, or its cast),
    # its add (and cast) nodes, and each gradient's place in it (offset, strides).
    concat: int | None = None
    concat_nodes: set[int] = field(default_factory=set)
    places: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    # out's bf16 copy (the precision pass's cast, for the projection after it), which the
    # forward stores too when nothing else outside the match reads out: the cast node and
    # out's place in it (offset, strides).
    copy: int | None = None
    copy_place: tuple[int, list[int]] | None = None

    def gradients(self) -> list[int]:
        """dq, dk (dkᵀ or dk) and dv as the backward kernel computes them."""
        if self.group > 1:
            return [self.dq, self.dk_sum, self.dv_sum]
        return [self.dq, self.dk if self.dk is not None else self.dk_t, self.dv]

    def stores(self) -> list[int]:
        """The nodes the backward kernel stores."""
        return [self.concat] if self.concat is not None else self.gradients()


def _base(graph: Graph, nid: int) -> tuple[int, list[int]]:
    chain = []
    while OPS[graph.op(nid)].kind == VIEW:
        chain.append(nid)
        nid = graph.inputs_of(nid)[0]
    return nid, chain


def _only_user(graph: Graph, nid: int, op: str) -> int | None:
    """The single user of nid (looking through one broadcast) if it is `op`."""
    users = graph.users(nid)
    if len(users) == 1 and graph.op(users[0]) == "broadcast":
        users = graph.users(users[0])
    return users[0] if len(users) == 1 and graph.op(users[0]) == op else None


def _users_through_views(graph: Graph, nid: int) -> set[int]:
    out, stack = set(), list(graph.users(nid))
    while stack:
        u = stack.pop()
        if OPS[graph.op(u)].kind == VIEW:
            stack.extend(graph.users(u))
        else:
            out.add(u)
    return out


def _views_of(graph: Graph, nid: int) -> set[int]:
    """The views of nid, through chains of views."""
    out, stack = set(), [u for u in graph.users(nid) if OPS[graph.op(u)].kind == VIEW]
    while stack:
        u = stack.pop()
        out.add(u)
        stack.extend(w for w in graph.users(u) if OPS[graph.op(w)].kind == VIEW)
    return out


def find_attention(graph: Graph, is_free) -> list[AttentionMatch]:
    by_scope: dict[str, set[int]] = {}
    for nid in graph.nx.nodes:
        scope = graph.node(nid)["scope"]
        head, _, tail = scope.partition("causal_attention")
        inside = tail in ("", "/softmax", "/dropout", "#bwd", "/softmax#bwd", "/dropout#bwd") \
            or tail in INNER_CASTS and graph.op(nid) == "cast"
        if inside and "causal_attention" in scope and not is_free(nid):
            by_scope.setdefault(head + "causal_attention", set()).add(nid)
    matches = []
    for scope, nodes in sorted(by_scope.items()):
        forward = {n for n in nodes if not graph.node(n)["scope"].removesuffix("/bf16").endswith("#bwd")}
        backward = nodes - forward
        match = _match_forward(graph, scope, forward)
        if match and (not backward or _match_backward(graph, match, backward)):
            region = match.forward | match.backward
            for operand in (match.q, match.k_t):
                match.prologue |= _prologue(graph, operand, region, is_free)
            if match.backward and match.group == 1:
                _match_concat(graph, match)
            _match_copy(graph, match)
            matches.append(match)
    return matches


def _match_copy(graph: Graph, match: AttentionMatch) -> None:
    """When out is read outside the match only by its bf16 cast (through permutes and
    reshapes: the precision pass casts it in the order the projection after it reads
    it), the forward kernel stores that cast too, at out's place in it, and no other
    kernel reads out to make it."""
    region = match.forward | match.backward
    readers, stack = [], [(u, []) for u in graph.users(match.out)]
    while stack:
        node, chain = stack.pop()
        if OPS[graph.op(node)].kind == VIEW:
            stack.extend((u, chain + [node]) for u in graph.users(node))
        elif node not in region:
            readers.append((node, chain))
    if len(readers) != 1 or match.out in graph.roots():
        return
    ((cast, chain),) = readers
    if graph.op(cast) != "cast" or graph.type(cast).dtype != "bf16" or any(n in graph.roots() for n in chain):
        return
    place = _place(graph, match.out, chain, graph.type(cast).shape)
    if place is not None:
        match.copy, match.copy_place = cast, place


def _match_concat(graph: Graph, match: AttentionMatch) -> None:
    """When the gradients dq, dk, dv are read only as the parts of one concatenation,
    add(pad(views of dq), pad(views of dk), pad(views of dv)) (the VJP of slicing q, k
    and v out of one QKV projection), perhaps cast to bf16 for the projection's
    backward matmuls: the backward kernel stores straight into it (each gradient at its
    place, a strided view of the concatenation), and no other kernel assembles it."""
    leaves: dict[int, tuple[int, list[int]]] = {}   # pad -> (gradient, views from it to the pad)
    for grad in match.gradients():
        chain, node = [], grad
        while len(users := graph.users(node)) == 1 and OPS[graph.op(users[0])].kind == VIEW:
            node = users[0]
            chain.append(node)
        if not chain or graph.op(node) != "pad" or len(users) != 1 or graph.op(users[0]) != "add":
            return
        leaves[node] = (grad, chain)
    roots = set(graph.roots())
    if any(n in roots for grad, chain in leaves.values() for n in [grad, *chain]):
        return
    adds, top = set(), None
    for pad in leaves:
        node = graph.users(pad)[0]
        while True:
            adds.add(node)
            users = graph.users(node)
            if len(users) != 1 or graph.op(users[0]) != "add" or node in roots:
                break
            node = users[0]
        if top not in (None, node):
            return
        top = node
    if len(adds) != len(leaves) - 1 or any(set(graph.inputs_of(a)) - adds - set(leaves) for a in adds):
        return
    shape = graph.type(top).shape
    axes = {graph.node(pad)["attrs"]["axis"] for pad in leaves}
    if len(axes) != 1 or any(graph.type(pad).shape != shape for pad in leaves):
        return
    (axis,) = axes
    spans = sorted((graph.node(pad)["attrs"]["before"], graph.type(graph.inputs_of(pad)[0]).shape[axis]) for pad in leaves)
    end = 0
    for before, size in spans:
        if before != end:
            return   # the pieces must tile the axis: a concatenation, each element from one of them
        end += size
    if end != shape[axis]:
        return
    stored = top
    users = graph.users(top)
    if top not in roots and len(users) == 1 and graph.op(users[0]) == "cast" and graph.type(users[0]).dtype == "bf16":
        stored = users[0]
    places = {}
    for pad, (grad, chain) in leaves.items():
        place = _place(graph, grad, chain, shape)
        if place is None:
            return
        places[grad] = place
    match.concat, match.places = stored, places
    match.concat_nodes = adds | {stored}


def _place(graph: Graph, value: int, chain: list[int], shape: tuple[int, ...]) -> tuple[int, list[int]] | None:
    """(offset, strides) of `value` inside a contiguous buffer of `shape` that `chain`
    (permutes, reshapes, a pad last) places it in, or None if it is not a strided view
    of it: the chain's inverse (slice, the inverse permutes, reshapes back), read from
    the buffer."""
    inverse = []
    for node in reversed(chain):
        (src,) = graph.inputs_of(node)
        op, attrs = graph.op(node), graph.node(node)["attrs"]
        out_shape, in_shape = graph.type(node).shape, graph.type(src).shape
        if op == "pad":
            inverse.append(("slice", {"axis": attrs["axis"], "start": attrs["before"]}, out_shape, in_shape))
        elif op == "permute":
            perm = attrs["perm"]
            inverse.append(("permute", {"perm": tuple(perm.index(a) for a in range(len(perm)))}, out_shape, in_shape))
        elif op == "reshape":
            inverse.append(("reshape", {}, out_shape, in_shape))
        else:
            return None
    return strided(inverse, shape)


def _prologue(graph: Graph, operand: int, region: set[int], is_free) -> set[int]:
    """The compute nodes of a PROLOGUE_COMPOSITES composite computing `operand` (through
    views), if they are elementwise and read only by each other and by the attention
    nodes in `region` (so no other kernel needs their values); else none."""
    base, _ = _base(graph, operand)
    scope = graph.node(base)["scope"]
    if is_free(base) or scope.rpartition("/")[2] not in PROLOGUE_COMPOSITES:
        return set()
    nodes, stack = set(), [base]
    while stack:   # the composite's nodes that `operand` depends on
        nid = stack.pop()
        if nid in nodes or graph.node(nid)["scope"] != scope or is_free(nid):
            continue
        if OPS[graph.op(nid)].kind != ELEMENTWISE:
            return set()
        nodes.add(nid)
        for src in graph.inputs_of(nid):
            stack.append(_base(graph, src)[0])
    if any(not _users_through_views(graph, n) <= nodes | region for n in nodes):
        return set()
    return nodes


def _match_forward(graph: Graph, scope: str, nodes: set[int]) -> AttentionMatch | None:
    matmuls = sorted(n for n in nodes if graph.op(n) == "matmul")
    if len(matmuls) != 2:
        return None
    mm1, mm2 = matmuls
    scaled = _only_user(graph, mm1, "mul")
    masked = _only_user(graph, scaled, "where") if scaled is not None else None
    if masked is None:
        return None
    const = [i for i in graph.inputs_of(scaled) if i != mm1]
    const_base = _base(graph, const[0])[0] if len(const) == 1 else None
    if const_base is None or graph.op(const_base) != "const":
        return None
    users = _users_through_views(graph, masked)
    m = next((u for u in users if graph.op(u) == "max"), None)
    if m is None:
        return None
    sub = next((u for u in users if graph.op(u) == "sub"), None)
    e = _only_user(graph, sub, "exp") if sub is not None else None
    if e is None:
        return None
    s = next((u for u in _users_through_views(graph, e) if graph.op(u) == "sum"), None)
    p = next((u for u in _users_through_views(graph, e) if graph.op(u) == "div"), None)
    if s is None or p is None:
        return None
    dropout, dropout_nodes = None, set()
    weights, p_cast = graph.inputs_of(mm2)[0], None
    if graph.op(weights) == "cast" and graph.type(weights).dtype == "bf16":
        p_cast, weights = weights, graph.inputs_of(weights)[0]   # bf16: P rounded before P·V
    if weights != p:
        found = _match_dropout(graph, p, weights)
        if found is None:
            return None
        dropout, dropout_nodes = found
    q, k_t = graph.inputs_of(mm1)
    v = graph.inputs_of(mm2)[1]
    head_dim, seq = graph.type(q).shape[-1], graph.type(q).shape[-2]
    if graph.type(k_t).shape[-2:] != (head_dim, seq) or graph.type(mm2).shape[-1] > MAX_HEAD_DIM or head_dim > MAX_HEAD_DIM:
        return None
    bf16 = graph.type(q).dtype == "bf16"
    if graph.type(v).shape[-1] != head_dim or graph.type(q).dtype not in ("f32", "bf16"):
        return None
    if {graph.type(k_t).dtype, graph.type(v).dtype} != {graph.type(q).dtype} or (p_cast is not None) != bf16:
        return None   # the kernels read q, k, v in one dtype; bf16 ones with P rounded
    core = {mm1, scaled, masked, m, sub, e, s, p, mm2} | dropout_nodes | ({p_cast} if bf16 else set())
    cond, kept, hidden = graph.inputs_of(masked)
    window = _mask_window(graph, cond, seq)
    hidden = _base(graph, hidden)[0]
    if not core <= nodes or window is None or kept != scaled:
        return None
    if graph.op(hidden) != "const" or graph.node(hidden)["attrs"]["value"] != float("-inf"):
        return None
    return AttentionMatch(scope, q, k_t, v, graph.node(const_base)["attrs"]["value"], window, mm2, m, s,
                          forward=set(nodes), dropout=dropout, bf16=bf16)


def _match_dropout(graph: Graph, p: int, dropped: int) -> tuple[AttentionDropout, set[int]] | None:
    """dsl.dropout of p: where(random_uniform >= threshold, p * scale, 0)."""
    if graph.op(dropped) != "where":
        return None
    keep, scaled, zero = graph.inputs_of(dropped)
    if graph.op(scaled) != "mul" or graph.inputs_of(scaled)[0] != p or graph.op(keep) != "greater_equal":
        return None
    uniform, threshold = graph.inputs_of(keep)
    consts = [_base(graph, n)[0] for n in (graph.inputs_of(scaled)[1], zero, threshold)]
    if any(graph.op(c) != "const" for c in consts) or graph.op(uniform) != "random_uniform":
        return None
    scale, zero_value, threshold_value = (graph.node(c)["attrs"]["value"] for c in consts)
    if zero_value != 0.0 or graph.type(uniform).shape != graph.type(p).shape:
        return None
    attrs = graph.node(uniform)["attrs"]
    found = AttentionDropout(graph.inputs_of(uniform)[0], attrs["seed"], attrs["stream"], threshold_value, scale)
    return found, {dropped, scaled}



def _mask_window(graph: Graph, cond: int, seq: int) -> int | None:
    """The window of a mask the kernels implement: 0 for row >= col (causal), w for
    (row >= col) and (row - col < w) with 0 < w; None for any other mask. Rows are
    queries, columns keys, of one (seq, seq) mask broadcast over the leading axes."""
    base, chain = _base(graph, cond)
    if any(graph.op(n) != "broadcast" for n in chain) or graph.type(base).shape != (seq, seq):
        return None  # only leading axes may be added: a transposed mask is not causal

    def iota(n: int, axis: int) -> bool:
        return graph.op(n) == "iota" and graph.node(n)["attrs"]["axis"] == axis and graph.type(n).shape == (seq, seq)

    def causal(n: int) -> bool:
        return graph.op(n) == "greater_equal" and iota(graph.inputs_of(n)[0], 0) and iota(graph.inputs_of(n)[1], 1)

    def window(n: int) -> int | None:  # row - col < w
        if graph.op(n) != "less":
            return None
        diff, bound = graph.inputs_of(n)
        bound = _base(graph, bound)[0]
        if graph.op(diff) != "sub" or not (iota(graph.inputs_of(diff)[0], 0) and iota(graph.inputs_of(diff)[1], 1)):
            return None
        if graph.op(bound) != "const" or graph.type(bound).dtype != "i32":
            return None
        w = graph.node(bound)["attrs"]["value"]
        return int(w) if w == int(w) and w >= 1 else None

    if causal(base):
        return 0
    if graph.op(base) == "logical_and":
        a, b = graph.inputs_of(base)
        for c, w in ((a, b), (b, a)):
            if causal(c) and window(w) is not None:
                return window(w)
    return None


def _match_backward(graph: Graph, match: AttentionMatch, nodes: set[int]) -> bool:
    """Find dq, dkᵀ (or dk, where planning transposed that product), dv and the gradient
    of out among the backward nodes (and with grouped key/value heads the sums of dk and
    dv over the group); every value leaving the two regions must be out or one of the
    stored gradients."""
    for n in nodes:
        if graph.op(n) != "matmul":
            continue
        a, b = graph.inputs_of(n)
        a_base, a_chain = _base(graph, a)
        b_base, b_chain = _base(graph, b)
        if a_base in match.forward and a_base == graph.inputs_of(match.out)[0]:   # pᵀ @ d_out (p dropped)
            match.dv, match.d_out = n, b
        elif match.k_t in b_chain + [b_base]:                      # ds @ (kᵀ)ᵀ
            match.dq = n
        elif match.q in a_chain + [a_base]:                        # qᵀ @ ds
            match.dk_t = n
        elif match.q in b_chain + [b_base]:                        # dsᵀ @ q
            match.dk = n
    if None in (match.dv, match.dq) or (match.dk_t is None) == (match.dk is None):
        return False
    if match.bf16 != (graph.type(match.d_out).dtype == "bf16"):
        return False   # the kernels read dO in the dtype of q, k, v
    ds = [graph.inputs_of(match.dq)[0],
          _base(graph, graph.inputs_of(match.dk_t)[1] if match.dk is None else graph.inputs_of(match.dk)[0])[0]]
    if match.bf16 and any(graph.op(n) != "cast" or n not in nodes for n in ds):
        return False   # bf16: dS rounded once, by a cast of the scope (the kernels round it there)
    if not _match_group_sums(graph, match, nodes):
        return False
    region = nodes | match.forward
    roots = set(graph.roots())
    # Compute nodes only: a view of one (say dkᵀ permuted back) is read through it.
    leaving = {n for n in region if OPS[graph.op(n)].kind != VIEW
               and (any(u not in region for u in _users_through_views(graph, n)) or n in roots or _views_of(graph, n) & roots)}
    if leaving - {match.out, *match.stores()}:
        return False
    if match.d_out in region or _base(graph, match.d_out)[0] in region:
        return False
    match.backward = set(nodes)
    return True


def _match_group_sums(graph: Graph, match: AttentionMatch, nodes: set[int]) -> bool:
    """With query heads (.., Hkv, G, S, D) over key/value heads broadcast along G, autodiff
    sums dk and dv over G: sum(permute(dkᵀ) swapping the last two axes), or sum(dk)
    where planning transposed that product, and sum(dv) over axis -3, keeping it. Find
    both (the group is then G), or neither (G = 1)."""
    shape = graph.type(match.dv).shape
    rank = len(shape)
    swap = tuple(range(rank - 2)) + (rank - 1, rank - 2)
    sums = {}
    for n in nodes:
        if graph.op(n) != "sum":
            continue
        base, chain = _base(graph, graph.inputs_of(n)[0])
        if base not in (match.dk_t, match.dk, match.dv):
            continue
        attrs = graph.node(n)["attrs"]
        views = [(graph.op(c), graph.node(c)["attrs"].get("perm")) for c in chain]
        expected = [("permute", swap)] if base == match.dk_t else []
        if rank < 4 or attrs["axes"] != (rank - 3,) or not attrs["keepdims"] or views != expected:
            return False  # some other sum of the gradients: not the kernels' to compute
        sums[base] = n
    if not sums:
        return True
    if len(sums) != 2 or shape[-3] < 2:
        return False
    match.group, match.dk_sum, match.dv_sum = shape[-3], sums[match.dk_t if match.dk is None else match.dk], sums[match.dv]
    return True
