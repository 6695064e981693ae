"""The precision pass: bf16 mixed precision as a rewrite of the training (or inference)
graph, run after the model, its backward and the optimizer are built (DESIGN's order:
model, autodiff, optimizer, precision, collectives, planning).

"fp32" leaves the graph as it is. "bf16" follows torch autocast's lists:
- matrix products take bf16 operands: every f32 operand of a `matmul` reads a bf16 copy
  of its source value, made by ONE `cast` node per source value (looking through views,
  which are replayed on the bf16 value), shared by all the matmuls that read it, forward
  and backward. So the activation a backward matmul reads is the bf16 copy the forward
  made, and where nothing else reads the f32 value the planner stores only the bf16 one.
  A bf16 x bf16 matmul gives an f32 product (float32 accumulation, ops/matmul.py): the
  outputs, the residual stream and the weight gradients stay f32.
- everything else stays f32: parameters (the master weights; their bf16 copies are
  casts of the updated params, computed per step), AdamW moments and the optimizer,
  reductions (norm statistics, softmax, cross-entropy, the gradient norm), embeddings
  (gathers), pointwise ops.
- cross-entropy reads the logits rounded to bf16, as autocast's output layer gives them
  (READS_ROUNDED), computing in f32 from them: the output layer stores them in bf16.
- causal attention (dsl.causal_attention) too, as torch's flash attention: q, k, v and
  the output's gradient dO are cast once, and inside the scope the probabilities P (the
  operand of P·V and of dV = Pᵀ·dO) and the scores' gradient dS (of dQ = dS·K and
  dK = Qᵀ·dS) get one cast each, in their scope + "/bf16" (planner/attention.py looks
  through these casts; the flash kernels round P and dS at the same places); softmax
  and its statistics stay f32, but the backward's delta = sum(dP * P) reads P rounded,
  as the kernels' delta = dO·O does (_attention_delta_reads_rounded).
- not yet: the matmuls of the other attention cores (in the scopes ATTENTION_SCOPES:
  cached-key decode, linear attention) stay f32; nor the grouped matmuls of a mixture
  of experts.
The NumPy reference rounds to bf16 at the casts, so it runs the bf16 graph as the oracle
of its kernels."""
from __future__ import annotations

from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import SOURCE, VIEW
from gptc.spec import CHOICES, SpecError

# Scopes (dsl composites) whose matmuls keep f32 operands: the attention cores other than
# causal_attention (whose bf16 matmuls the flash matcher looks through, see above).
ATTENTION_SCOPES = frozenset({"kv_attention", "linear_attention",
                              "linear_attention_state", "linear_attention_read"})


def apply_precision(graph: Graph, precision: str) -> None:
    """Rewrite `graph` in place for `precision` ("fp32": unchanged; "bf16": see above)."""
    if precision not in CHOICES["precision"]:
        raise SpecError(f"precision '{precision}' is not one of: {', '.join(CHOICES['precision'])}")
    if precision == "fp32":
        return
    copies: dict[int, int] = {}   # node -> its bf16 counterpart (casts of values, replayed views)
    for nid in graph.topo_order():
        if graph.op(nid) != "matmul" or _in_attention(graph, nid):
            continue
        for operand in dict.fromkeys(graph.inputs_of(nid)):
            if graph.type(operand).dtype == "f32":
                graph.rewire(operand, _bf16(graph, operand, copies), nid)
    _bias_gradients_read_bf16(graph, copies)
    _linear_outputs_read_bf16(graph, copies)
    _attention_delta_reads_rounded(graph, copies)


def _attention_delta_reads_rounded(graph: Graph, copies: dict[int, int]) -> None:
    """Causal attention's softmax backward sums delta = sum(dP * P) over the keys; it
    reads P rounded to bf16, as P·V reads it. The flash kernels compute delta = dO·O
    (torch's flash attention too), and O is the product of the rounded P: with the
    rounding here the reference computes the kernels' delta, not one that differs from
    it by P's rounding (which put the gpt2 layout's step beyond the bf16 bounds). With
    dropout on P, P·V reads the dropped P's copy and the sum keeps P, as before."""
    for p, copy in list(copies.items()):
        if graph.node(p)["scope"].split("/")[-2:] != ["causal_attention", "softmax"]:
            continue
        for user in dict.fromkeys(graph.users(p)):
            if graph.op(user) == "mul" and graph.node(user)["scope"].endswith("/softmax#bwd"):
                with graph.replace_scope(graph.node(user)["scope"]):
                    rounded = graph.add("cast", [copy], dtype="f32")
                graph.rewire(p, rounded, user)


# The composites that read a linear layer's output as autocast's linear gives it, rounded
# to bf16, and compute in fp32 from it: cross-entropy (the logits; autocast's
# cross_entropy casts its input to fp32). Not the MLP's activation functions: reading
# their pre-activation rounded made the matmuls that store and read it slower on an H200
# (gpt2: GELU forward 1.41 -> 1.64 ms a step, backward 1.66 -> 1.72; README, 5b681c7).
READS_ROUNDED = ("cross_entropy",)


def _linear_outputs_read_bf16(graph: Graph, copies: dict[int, int]) -> None:
    """The output of a linear layer that a READS_ROUNDED composite reads is read rounded
    to bf16, so the layer's kernel stores its bf16 copy only: gpt2's logits (8192 x
    50257, the largest activation of a small model, written once and read twice: the
    loss, its gradient) at half the bytes, rows padded as a matmul operand's copy (the
    layer's epilogue stores them so, fusion._epilogue_legal): the reader's rows are then
    16-byte aligned, read 16 bytes at a time (codegen _row_lanes). Gradients flow to the unrounded output
    unchanged, as through autocast's casts. Each reader (seen through views) widens the
    copy itself, so the widening joins the reader's kernel."""
    for nid in list(graph.nx.nodes):
        if OPS[graph.op(nid)].kind == VIEW or not any(_in_scope(graph, nid, c) for c in READS_ROUNDED):
            continue
        for x in dict.fromkeys(graph.inputs_of(nid)):
            base = graph.view_base(x)
            if graph.type(x).dtype != "f32" or not _in_scope(graph, base, "linear") or graph.node(base)["scope"].endswith("#bwd"):
                continue
            with graph.replace_scope(graph.node(nid)["scope"]):
                rounded = graph.add("cast", [_bf16(graph, x, copies)], dtype="f32")
            graph.rewire(x, rounded, nid)


def _in_scope(graph: Graph, nid: int, composite: str) -> bool:
    """`nid` is a node of the dsl composite `composite` (forward or backward)."""
    return any(part.removesuffix("#bwd") == composite for part in graph.node(nid)["scope"].split("/"))


def _bias_gradients_read_bf16(graph: Graph, copies: dict[int, int]) -> None:
    """A gradient the backward matmuls read in bf16 (that of a linear layer's output) is
    often read otherwise only by sums: its bias's gradient. Those read the bf16 copy too,
    as under torch autocast (where that gradient is bf16; the sum accumulates in f32), so
    the f32 gradient need not be stored at all: the logits' gradient is the largest
    activation of a small model."""
    for value, copy in list(copies.items()):
        if OPS[graph.op(value)].kind == VIEW or not graph.node(value)["scope"].endswith("#bwd"):
            continue
        cast = copy if graph.op(copy) == "cast" else graph.inputs_of(copy)[0]  # slice(cast(pad)): rows padded
        readers = _readers_through_views(graph, value)
        others = [(v, u) for v, u in readers if u != cast]
        if others and all(graph.op(u) == "sum" for _, u in others):
            for v, u in others:
                graph.rewire(v, _bf16(graph, v, copies), u)


def _readers_through_views(graph: Graph, nid: int) -> list[tuple[int, int]]:
    """(operand, reader) for each non-view node reading `nid`, directly or through views."""
    found = []
    for user in graph.users(nid):
        if OPS[graph.op(user)].kind == VIEW:
            found += _readers_through_views(graph, user)
        else:
            found.append((nid, user))
    return found


def _in_attention(graph: Graph, nid: int) -> bool:
    return any(_in_scope(graph, nid, scope) for scope in ATTENTION_SCOPES)


def _bf16(graph: Graph, nid: int, copies: dict[int, int]) -> int:
    """The bf16 counterpart of `nid`: for a view, the same view of its source's
    counterpart; for a value, its cast (one per value, rows padded where _cast_aligned
    pads them), in the value's scope + "/bf16", so its kernel traces back to the producer
    while scope-based matchers (attention) do not take it for one of their own nodes."""
    if nid not in copies:
        node = graph.node(nid)
        if OPS[node["op"]].kind == VIEW and not _read_permuted(graph, nid):
            src = _bf16(graph, graph.inputs_of(nid)[0], copies)
            with graph.replace_scope(node["scope"]):
                copies[nid] = graph.add(node["op"], [src], **node["attrs"])
        else:
            with graph.replace_scope(f"{node['scope']}/bf16" if node["scope"] else "bf16"):
                copies[nid] = _cast_aligned(graph, nid)
    return copies[nid]


def _read_permuted(graph: Graph, nid: int) -> bool:
    """`nid` permutes a computed value that nothing else reads: its bf16 copy is a cast
    of the permuted view, stored in the order the matmuls read it (attention's output
    (.., H, S, D), read as (.., S, H·D) by the projection after it: its weight
    gradient's Xᵀ would otherwise be a view no matmul can read, copied again)."""
    if graph.op(nid) != "permute":
        return False
    (src,) = graph.inputs_of(nid)
    return OPS[graph.op(src)].kind not in (VIEW, SOURCE) and graph.users(src) == [nid]


# A bf16 copy whose rows are not a multiple of 16 bytes (gpt2's 50,257-wide logits and
# their gradient) is stored with its rows padded to 8 elements and read
# through a slice: the matrix-unit kernels copy operand rows, and the row kernels read
# rows, 16 bytes at a time only when each row starts 16-byte aligned (else 2 bytes at a
# time). Small tensors are left alone.
ROW_ALIGN, PAD_MIN_SIZE = 8, 1 << 20


def _cast_aligned(graph: Graph, nid: int) -> int:
    t = graph.type(nid)
    width = t.shape[-1] if t.shape else 0
    inside_attention = "causal_attention" in graph.node(nid)["scope"]  # P: the flash kernels' own, never stored
    if len(t.shape) < 2 or width % ROW_ALIGN == 0 or t.size < PAD_MIN_SIZE or inside_attention:
        return graph.add("cast", [nid], dtype="bf16")
    padded = graph.add("pad", [nid], axis=len(t.shape) - 1, before=0, after=-width % ROW_ALIGN)
    return graph.add("slice", [graph.add("cast", [padded], dtype="bf16")], axis=len(t.shape) - 1, start=0, stop=width)
