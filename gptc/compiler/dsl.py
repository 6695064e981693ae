"""The DSL: plain Python functions over Tensor handles. Each composite decomposes into
primitive ops inside a scope named after it, so generated kernels trace back here and
the planner can recognise the pattern (causal attention, for one)."""
from __future__ import annotations

import functools
import math
from typing import Callable

from gptc.compiler.ir import Graph, Tensor

__all__ = ["Graph", "Tensor", "composite", "linear", "gelu", "silu", "swiglu", "layernorm", "rmsnorm",
           "scalenorm", "softmax", "causal_attention", "rope", "sinusoidal_table", "cross_entropy", "embedding"]


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
