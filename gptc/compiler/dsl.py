"""The DSL: plain Python functions over Tensor handles. Each composite decomposes into
primitive ops inside a scope named after it, so generated kernels trace back here and
the planner can recognise the pattern (causal attention, for one)."""
from __future__ import annotations

import functools
import math
from typing import Callable

from gptc.compiler.ir import Graph, Tensor

__all__ = ["Graph", "Tensor", "composite", "linear", "gelu", "silu", "swiglu", "layernorm", "rmsnorm",
           "scalenorm", "softmax", "causal_attention", "rope", "sinusoidal_table", "cross_entropy", "embedding",
           "top_k", "group_rank", "group_offsets", "grouped_matmul", "moe"]


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
    The max is taken on ||x||², so a zero row has a zero gradient, not NaN."""
    return x * (x * x).sum(-1, keepdims=True).maximum(eps * eps).rsqrt() * gain


@composite
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    # The max only keeps exp in range: softmax does not depend on it, nor its gradient.
    e = (x - x.max(axis, keepdims=True).stop_gradient()).exp()
    return e / e.sum(axis, keepdims=True)


@composite
def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int = 0) -> Tensor:
    """softmax(q kᵀ / sqrt(d) with future positions masked) v, over (..., S, d) operands.
    With `window` > 0 a query also does not see keys `window` or more positions back."""
    if window or k.shape[-3] != q.shape[-3]:
        raise NotImplementedError("local windows and grouped key/value heads")
    seq, dim = q.shape[-2], q.shape[-1]
    scores = (q @ k.T) * (1.0 / math.sqrt(dim))
    graph = q.graph
    visible = graph.iota((seq, seq), 0) >= graph.iota((seq, seq), 1)   # row (query) >= column (key)
    scores = visible.where(scores, -math.inf)
    return softmax(scores) @ v


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
    rotates by position * base^(-2i/dims). x (..., S, D); positions i32 (S,)."""
    half, width, axis = dims // 2, x.shape[-1], len(x.shape) - 1
    angles = _angles(positions, half, dims, base)
    cos, sin = (t.broadcast_to(x.shape[:-1] + (half,)) for t in (angles.cos(), angles.sin()))
    x1, x2 = x.slice(axis, 0, half), x.slice(axis, half, dims)
    out = (x1 * cos - x2 * sin).pad(axis, 0, width - half) + (x2 * cos + x1 * sin).pad(axis, half, width - dims)
    return out + x.slice(axis, dims, width).pad(axis, dims, 0) if dims < width else out


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
