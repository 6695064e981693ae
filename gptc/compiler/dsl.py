"""The DSL: plain Python functions over Tensor handles. Each composite decomposes into
primitive ops inside a scope named after it, so generated kernels trace back here and
the planner can recognise the pattern (causal attention, for one)."""
from __future__ import annotations

import functools
import math
from typing import Callable

from gptc.compiler.ir import Graph, Tensor
from gptc.compiler.ops import ShapeError
from gptc.compiler.ops.random import dropout_threshold

__all__ = ["Graph", "Tensor", "composite", "linear", "gelu", "silu", "swiglu", "layernorm", "rmsnorm",
           "scalenorm", "softmax", "dropout", "causal_attention", "group_heads", "elu_plus_one", "linear_attention",
           "linear_attention_state", "linear_attention_read", "LINEAR_ATTENTION_EPS", "rope",
           "sinusoidal_table", "cross_entropy", "embedding", "top_k", "group_rank", "group_offsets",
           "grouped_matmul", "moe"]


def composite(fn: Callable) -> Callable:
    """Run `fn` inside a graph scope named after it."""
    @functools.wraps(fn)
    def wrapper(x: Tensor, *args, **kwargs):
        with x.graph.scope(fn.__name__):
            return fn(x, *args, **kwargs)
    return wrapper


@composite
def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x @ w (+ b) over the last axis of x; w is (in, out)."""
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]) @ w
    if b is not None:
        y = y + b
    return y.reshape(*lead, w.shape[-1])


@composite
def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (GPT-2's)."""
    inner = (x + x * x * x * 0.044715) * math.sqrt(2.0 / math.pi)
    return x * 0.5 * (inner.tanh() + 1.0)


@composite
def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x/2)) / 2: no exp to overflow, in
    the value or the gradient."""
    return x * ((x * 0.5).tanh() * 0.5 + 0.5)


@composite
def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, where gate and up are the two halves of the last axis."""
    half = gate_up.shape[-1] // 2
    axis = len(gate_up.shape) - 1
    return silu(gate_up.slice(axis, 0, half)) * gate_up.slice(axis, half, 2 * half)


@composite
def layernorm(x: Tensor, gain: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    centered = x - x.mean(-1, keepdims=True)
    variance = (centered * centered).mean(-1, keepdims=True)
    return centered * (variance + eps).rsqrt() * gain + bias


@composite
def rmsnorm(x: Tensor, gain: Tensor, eps: float = 1e-5) -> Tensor:
    """x / sqrt(mean(x²) + eps) * gain (LLaMA's RMSNorm)."""
    return x * ((x * x).mean(-1, keepdims=True) + eps).rsqrt() * gain


@composite
def scalenorm(x: Tensor, gain: Tensor, eps: float = 1e-5) -> Tensor:
    """gain * x / max(||x||, eps), with one scalar gain (Nguyen & Salazar's ScaleNorm).
    The max is taken on ||x||², so a zero row has a zero gradient, not NaN. The gain
    scales the per-row factor, so its gradient reuses the backward's row sums."""
    return x * ((x * x).sum(-1, keepdims=True).maximum(eps * eps).rsqrt() * gain)


@composite
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    # The max only keeps exp in range: softmax does not depend on it, nor its gradient.
    e = (x - x.max(axis, keepdims=True).stop_gradient()).exp()
    return e / e.sum(axis, keepdims=True)


@composite
def dropout(x: Tensor, p: float, step: Tensor, seed: int, stream: int) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the others by
    1/(1-p). The mask is random_uniform >= p, Philox bits of (seed, stream, step,
    element index): a fresh mask every step (`step`, a scalar input), an independent
    one per `stream`, the same one wherever it is recomputed (the backward pass)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    keep = x.graph.random_uniform(x.shape, step, seed, stream) >= dropout_threshold(p)
    return keep.where(x * (1.0 / (1.0 - p)), 0.0)


@composite
def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int = 0,
                     drop: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(d) with future positions masked) v. q (..., H, S, d); k and v
    (..., Hkv, S, d) with Hkv dividing H: query head h reads key/value head h // (H/Hkv)
    (grouped-query attention; multi-query with Hkv = 1). With `window` > 0 a query at i
    sees only the keys j with i - window < j <= i (local attention). `drop`, if given
    (dropout), is applied to the attention probabilities before they weight v."""
    seq, dim = q.shape[-2:]
    shape = q.shape
    q, k, v = group_heads(q, k, v)
    scores = (q @ k.T) * (1.0 / math.sqrt(dim))
    scores = _visible(q.graph, seq, window).where(scores, -math.inf)
    probs = softmax(scores)
    return ((drop(probs) if drop else probs) @ v).reshape(shape)


def group_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Views for grouped-query attention: q (..., H, Sq, d) and k, v (..., Hkv, Sk, d)
    with Hkv dividing H become q (..., Hkv, G, Sq, d) and k, v (..., Hkv, G, Sk, d),
    G = H / Hkv, where k and v are broadcast over G: a stride-0 view, never a copy (the
    broadcast's VJP sums dk and dv over the group). Query head h reads key/value head
    h // G. Unchanged when Hkv = H."""
    *lead, heads, _, dim = q.shape
    kv_heads, kv_seq = k.shape[-3], k.shape[-2]
    if heads % kv_heads or k.shape != v.shape or k.shape[:-3] != tuple(lead) or k.shape[-1] != dim:
        raise ShapeError(f"attention: query heads {q.shape} do not fit key/value heads {k.shape}, {v.shape}")
    group = heads // kv_heads
    if group == 1:
        return q, k, v
    q = q.reshape(*lead, kv_heads, group, *q.shape[-2:])
    shape = (*lead, kv_heads, group, kv_seq, dim)
    k, v = (t.reshape(*lead, kv_heads, 1, kv_seq, dim).broadcast_to(shape) for t in (k, v))
    return q, k, v


def _visible(graph: Graph, seq: int, window: int = 0) -> Tensor:
    """(seq, seq) bool: query (row) i sees key (column) j when j <= i, and i - j < window
    with a window. A window of seq or more is plain causal (the planner's attention
    matcher reads exactly these two forms)."""
    row, col = graph.iota((seq, seq), 0), graph.iota((seq, seq), 1)
    visible = row >= col
    if 0 < window < seq:
        visible = visible.logical_and(row - col < window)
    return visible


# ----- causal linear attention (Katharopoulos et al., 2020) ------------------------------
# y_t = phi(q_t)ᵀ Σ_{s<=t} phi(k_s) v_sᵀ / (phi(q_t)ᵀ Σ_{s<=t} phi(k_s) + eps), phi = elu + 1.
# No 1/sqrt(d) scale: phi(q)ᵀphi(k) > 0 is not exponentiated and the normaliser cancels
# any scale of q. The eps only guards the division: the denominator is a sum of positive
# terms (it includes phi(q_t)ᵀphi(k_t) > 0, about d at initialisation), so its relative
# effect, eps / denominator, is below float32 rounding unless every phi is tiny (q, k far
# below 0). The PyTorch twin uses the same eps.
LINEAR_ATTENTION_EPS = 1e-6


@composite
def elu_plus_one(x: Tensor) -> Tensor:
    """elu(x) + 1 = x + 1 for x > 0, exp(x) otherwise, as relu(x) + exp(min(x, 0)): exp
    never sees a positive argument, so neither the value nor the gradient overflows."""
    relu = x.maximum(0.0)
    return relu + (x - relu).exp()


def _with_ones(v: Tensor) -> Tensor:
    """(..., S, d) -> (..., S, d + 1), a column of ones appended: a product with it
    yields the numerator (first d columns) and the normaliser (the last) at once."""
    dim, axis = v.shape[-1], v.ndim - 1
    return v.graph.iota(v.shape[:-1] + (dim + 1,), axis).eq(dim).where(1.0, v.pad(axis, 0, 1))


def _normalise(y1: Tensor, eps: float) -> Tensor:
    """(..., d + 1) numerators and normaliser -> (..., d) outputs."""
    dim, axis = y1.shape[-1] - 1, y1.ndim - 1
    return y1.slice(axis, 0, dim) / (y1.slice(axis, dim, dim + 1) + eps)


def _repeat_heads(t: Tensor, heads: int) -> Tensor:
    """(..., G, S, d) key/value heads -> (..., heads, S, d): query head h reads group
    h // (heads / G) (grouped-query attention)."""
    groups = t.shape[-3]
    if groups == heads:
        return t
    lead, rest = t.shape[:-3], t.shape[-2:]
    wide = t.reshape(*lead, groups, 1, *rest).broadcast_to(lead + (groups, heads // groups) + rest)
    return wide.reshape(*lead, heads, *rest)


@composite
def linear_attention(q: Tensor, k: Tensor, v: Tensor, chunk: int = 64, eps: float = LINEAR_ATTENTION_EPS) -> Tensor:
    """Causal linear attention over q (..., H, S, d) and k, v (..., G, S, d), G dividing H,
    in chunks of `chunk` positions (the sequence is zero-padded to a multiple): within a
    chunk, (phi(Q) phi(K)ᵀ ⊙ causal mask) [V 1]; across chunks, phi(Q) times the sum of
    phi(K)ᵀ [V 1] over the earlier chunks (an exclusive prefix sum). O(S C d + S d²
    + (S/C)² d²) instead of O(S² d)."""
    seq, dim = q.shape[-2], q.shape[-1]
    k, v = (_repeat_heads(t, q.shape[-3]) for t in (k, v))
    size = min(chunk, seq)
    n = -(-seq // size)
    lead, axis = q.shape[:-2], q.ndim - 2

    def chunked(t: Tensor) -> Tensor:  # (..., S, w) -> (..., n, size, w); padded rows are zeros
        t = t.pad(axis, 0, n * size - seq) if n * size > seq else t
        return t.reshape(*lead, n, size, t.shape[-1])

    fq, fk, v1 = chunked(elu_plus_one(q)), chunked(elu_plus_one(k)), chunked(_with_ones(v))
    graph = q.graph
    causal = graph.iota((size, size), 0) >= graph.iota((size, size), 1)  # row (query) >= column (key)
    y1 = causal.where(fq @ fk.T, 0.0) @ v1
    if n > 1:
        # Chunk i reads the sum of chunks j < i: a masked sum over j (a matmul with a
        # constant 0/1 matrix would need that matrix in memory; the planner inlines it).
        width = dim * (dim + 1)
        per_chunk = (fk.T @ v1).reshape(*lead, 1, n, width).broadcast_to(lead + (n, n, width))
        earlier = graph.iota((n, n, 1), 1) < graph.iota((n, n, 1), 0)  # (i, j): j < i
        prefix = earlier.where(per_chunk, 0.0).sum(-2).reshape(*lead, n, dim, dim + 1)
        y1 = y1 + fq @ prefix
    y1 = y1.reshape(*lead, n * size, dim + 1)
    return _normalise(y1.slice(axis, 0, seq) if n * size > seq else y1, eps)


@composite
def linear_attention_state(k: Tensor, v: Tensor, keep: Tensor | None = None) -> Tensor:
    """The recurrent state of linear attention after keys and values k, v (..., S, d):
    (..., d, d + 1), Σ_s phi(k_s) [v_s 1]ᵀ (columns < d: Σ phi(k) vᵀ; column d: Σ phi(k)).
    `keep` (bool, broadcastable to (..., S, 1)) picks the positions summed."""
    fk = elu_plus_one(k)
    if keep is not None:
        fk = keep.where(fk, 0.0)
    return fk.T @ _with_ones(v)


@composite
def linear_attention_read(q: Tensor, state: Tensor, eps: float = LINEAR_ATTENTION_EPS) -> Tensor:
    """Outputs of queries q (..., H, S, d) from states (..., G, d, d + 1) of G key/value
    heads (G dividing H): phi(q)ᵀ Σ phi(k) vᵀ / (phi(q)ᵀ Σ phi(k) + eps)."""
    heads, seq, dim = q.shape[-3:]
    groups, lead = state.shape[-3], q.shape[:-3]
    grouped = elu_plus_one(q).reshape(*lead, groups, heads // groups * seq, dim)
    return _normalise((grouped @ state).reshape(*lead, heads, seq, dim + 1), eps)


def _angles(positions: Tensor, pairs: int, dims: int, base: float) -> Tensor:
    """(S, pairs) rotation angles: position p, pair i -> p * base^(-2i / dims)."""
    graph = positions.graph
    frequency = (graph.iota((1, pairs), 1, "f32") * (-2.0 * math.log(base) / dims)).exp()
    seq = positions.shape[0]
    return positions.cast("f32").reshape(seq, 1).broadcast_to((seq, pairs)) * frequency.broadcast_to((seq, pairs))


@composite
def rope(x: Tensor, positions: Tensor, dims: int, base: float = 10000.0) -> Tensor:
    """Rotary position embedding, rotate-half pairing (GPT-NeoX's and LLaMA's): within
    the first `dims` of the last axis, dimension i pairs with i + dims/2, and the pair
    rotates by position * base^(-2i/dims). x (..., S, D); positions i32 (S,), or (B, S)
    per sequence when x is (B, ..., S, D) (the KV-cache decode: each sequence at its own
    position)."""
    half, width, axis = dims // 2, x.shape[-1], len(x.shape) - 1
    per_sequence = positions.shape if len(positions.shape) == 2 else None
    if per_sequence:
        positions = positions.reshape(positions.shape[0] * positions.shape[1])
    seq = positions.shape[0]
    # Each pair's angle at both its dimensions, (S, half) -> (S, 2, half) -> (S, dims) by
    # views, so a kernel computes one angle, cos and sin per element it rotates.
    angles = _angles(positions, half, dims, base).reshape(seq, 1, half).broadcast_to((seq, 2, half)).reshape(seq, dims)
    if per_sequence:  # (B*S, dims) -> (B, 1.., S, dims)
        angles = angles.reshape(per_sequence[0], *(1,) * (len(x.shape) - 3), per_sequence[1], dims)
    cos, sin = (t.broadcast_to(x.shape[:-1] + (dims,)) for t in (angles.cos(), angles.sin()))
    rotated = x.slice(axis, 0, dims) if dims < width else x
    x1, x2 = rotated.slice(axis, 0, half), rotated.slice(axis, half, dims)
    turned = (-x2).pad(axis, 0, half) + x1.pad(axis, half, 0)  # rotate_half: (-x2, x1)
    out = rotated * cos + turned * sin  # (x1 cos - x2 sin, x2 cos + x1 sin)
    return out.pad(axis, 0, width - dims) + x.slice(axis, dims, width).pad(axis, dims, 0) if dims < width else out


@composite
def sinusoidal_table(positions: Tensor, dims: int, base: float = 10000.0) -> Tensor:
    """The fixed (S, dims) position table of "Attention is all you need":
    sin(p * base^(-2i/dims)) at column 2i, cos(...) at column 2i+1."""
    seq, pairs = positions.shape[0], dims // 2
    angles = _angles(positions, pairs, dims, base).reshape(seq, pairs, 1).broadcast_to((seq, pairs, 2))
    even = positions.graph.iota((seq, pairs, 2), 2).eq(0)
    return even.where(angles.sin(), angles.cos()).reshape(seq, dims)


@composite
def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over all rows of -log softmax(logits)[target]; logits (..., V), targets (...) i32."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n = rows.shape[0]
    top = rows.max(-1, keepdims=True).stop_gradient()  # log-sum-exp does not depend on it
    log_sum = (rows - top).exp().sum(-1, keepdims=True).log() + top
    picked = rows.graph.iota((n, vocab), 1).eq(targets.reshape(n, 1)).where(rows, 0.0).sum(-1, keepdims=True)
    return (log_sum - picked).mean()


@composite
def embedding(table: Tensor, ids: Tensor) -> Tensor:
    return table.gather(ids)


# ----- mixture of experts --------------------------------------------------------------
@composite
def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest of each row of scores (T, E): (ids (T, k) i32, their scores (T, k),
    picks (T, E) float: 1 where chosen). Ties go to the lowest index, so the choice is
    deterministic; gradients flow to the chosen scores only (the choice is a constant)."""
    rows, width = scores.shape
    graph = scores.graph
    column = graph.iota((rows, width), 1, scores.dtype)
    left = scores.stop_gradient()
    ids, chosen, picks = [], [], []
    for slot in range(k):
        best = left.max(-1, keepdims=True).broadcast_to((rows, width))
        # -(the lowest column holding the best score): a max, as there is no min.
        first = left.eq(best).where(-column, -float(width)).max(-1, keepdims=True)
        pick = column.eq((-first).broadcast_to((rows, width)))
        ids.append((-first).cast("i32").pad(1, slot, k - 1 - slot))
        chosen.append(pick.where(scores, 0.0).sum(-1, keepdims=True).pad(1, slot, k - 1 - slot))
        picks.append(pick.cast(scores.dtype))
        left = pick.where(-math.inf, left)
    return sum(ids[1:], ids[0]), sum(chosen[1:], chosen[0]), sum(picks[1:], picks[0])


def group_rank(ids: Tensor, num_groups: int) -> Tensor:
    """The slot of each of ids (R,) in their stable sort by group (ops/grouped.py)."""
    return ids._new("group_rank", [ids], num_groups=int(num_groups))


def group_offsets(ids: Tensor, num_groups: int) -> Tensor:
    """(G+1,) i32: where each group's rows start once sorted by group."""
    return ids._new("group_offsets", [ids], num_groups=int(num_groups))


def grouped_matmul(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """x (R, K) rows sorted by group, w (G, K, N): row r of group g times w[g]."""
    return x._new("grouped_matmul", [x, w, offsets])


@composite
def moe(x: Tensor, router: Tensor, w_in: Tensor, w_out: Tensor, k: int,
        expert_ffn: str = "gelu") -> tuple[Tensor, Tensor]:
    """Mixture of experts over the rows of x (T, D) -> (y (T, D), aux scalar).

    Each row goes to its top-k experts by router logits x @ router (D, E), weighted by
    the softmax of those k logits (Mixtral's routing). Every (row, slot) pair is kept
    (no capacity, no dropped token): the R = T*k pairs are sorted by expert (a stable
    counting sort), each expert's FFN runs on its contiguous rows only (grouped
    matmuls with w_in (E, D, H) and w_out (E, F, D); H = F for gelu, 2F for swiglu),
    and the results go back to their pairs, summed per row with the gates.
    aux is the load-balancing loss of Switch Transformer: E * sum_e f_e * P_e, f_e the
    fraction of pairs routed to e (a constant to autodiff) and P_e the mean router
    probability of e; it is 1 when the load is uniform."""
    rows, width = x.shape
    experts = router.shape[1]
    pairs = rows * k
    logits = x @ router
    ids, chosen, picks = top_k(logits, k)
    gates = softmax(chosen)
    fraction = picks.stop_gradient().sum(0) * (1.0 / pairs)
    aux = (fraction * softmax(logits).mean(0)).sum() * float(experts)
    flat = ids.reshape(pairs)
    rank, offsets = group_rank(flat, experts), group_offsets(flat, experts)
    # Pair (row, slot) moves to its slot in expert order, and back after the experts.
    sorted_x = x.reshape(rows, 1, width).broadcast_to((rows, k, width)).reshape(pairs, width).scatter_add(rank, pairs)
    hidden = grouped_matmul(sorted_x, w_in, offsets)
    hidden = gelu(hidden) if expert_ffn == "gelu" else swiglu(hidden)
    out = grouped_matmul(hidden, w_out, offsets).gather(rank).reshape(rows, k, width)
    return (out * gates.reshape(rows, k, 1).broadcast_to((rows, k, width))).sum(1), aux


# ----- KV-cache decode (ops/decode.py) -------------------------------------------------
def kv_write(cache: Tensor, value: Tensor, pos: Tensor) -> Tensor:
    """The cache (B, Hkv, S, D) with row pos[b] of sequence b replaced by value (B, Hkv, 1, D);
    as a state's update, written in place (only those rows)."""
    return cache._new("kv_write", [cache, value, pos])


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, window: int = 0,
                     splits: int | None = None, slot: Tensor | None = None, sink: int = 0,
                     rope: tuple[int, float] | None = None) -> Tensor:
    """Attention of one query per sequence, q (B, H, 1, D), over the cached keys and values
    (B, Hkv, S, D) it sees: positions j <= pos[b] (and pos[b] - j < window when window > 0).
    Flash-decoding: partial sums over `splits` chunks of the keys (default: enough to fill
    the GPU, ops/decode.decode_splits), then one combine (none for one chunk). With `sink` > 0 the cache is a
    StreamingLLM ring (ops/decode.py) whose new key went to `slot`; `rope` (dims, base):
    the cache holds keys before RoPE, rotated here by their positions within the cache."""
    from gptc.compiler.ops.decode import decode_splits
    seq = k.shape[2]
    splits = splits or decode_splits(q.shape[0] * q.shape[1], seq)
    stream = dict(sink=sink) if sink else {}
    if rope:
        stream.update(rope_dims=rope[0], rope_base=float(rope[1]))
    operands = [q, k, v, pos] + ([slot] if sink else [])
    if splits == 1:  # one chunk: the kernel divides by the sum itself
        return q._new("decode_attention", operands, scale=float(scale), window=int(window), splits=1,
                      dtype=q.dtype, **stream)
    partial = q._new("decode_attention", operands, scale=float(scale), window=int(window), splits=splits, **stream)
    return partial._new("decode_combine", [partial, pos], seq=seq, window=0 if sink else int(window), dtype=q.dtype)
