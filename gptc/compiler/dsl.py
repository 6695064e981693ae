"""The DSL: plain Python functions over Tensor handles. Each composite decomposes into
primitive ops inside a scope named after it, so generated kernels trace back here and
the planner can recognise the pattern (causal attention, for one)."""
from __future__ import annotations

import functools
import math
from typing import Callable

from gptc.compiler.ir import Graph, Tensor

__all__ = ["Graph", "Tensor", "composite", "linear", "gelu", "layernorm", "softmax",
           "causal_attention", "cross_entropy", "embedding"]


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
def layernorm(x: Tensor, gain: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    centered = x - x.mean(-1, keepdims=True)
    variance = (centered * centered).mean(-1, keepdims=True)
    return centered * (variance + eps).rsqrt() * gain + bias


@composite
def softmax(x: Tensor, axis: int = -1) -> Tensor:
    # The max only keeps exp in range: softmax does not depend on it, nor its gradient.
    e = (x - x.max(axis, keepdims=True).stop_gradient()).exp()
    return e / e.sum(axis, keepdims=True)


@composite
def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d) with future positions masked) v, over (..., S, d) operands."""
    seq, dim = q.shape[-2], q.shape[-1]
    scores = (q @ k.T) * (1.0 / math.sqrt(dim))
    graph = q.graph
    visible = graph.iota((seq, seq), 0) >= graph.iota((seq, seq), 1)   # row (query) >= column (key)
    scores = visible.where(scores, -math.inf)
    return softmax(scores) @ v


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
