"""The GPT family, written in the DSL like any user model.

Today's layout is GPT-2's: token + learned position embeddings, pre-LayerNorm blocks
(causal multi-head attention with a fused QKV projection, GELU-tanh MLP, residual
adds), a final LayerNorm and an output projection (untied by default). Parameter names
follow GPT-2's checkpoints, with weights stored (in, out) so that y = x @ W + b."""
from __future__ import annotations

import math
from typing import Callable

from gptc.compiler import dsl
from gptc.compiler.ir import Graph, Tensor
from gptc.spec import CHOICES, ModelSpec, SpecError


def check_supported(m: ModelSpec) -> None:
    """Options the spec accepts but this builder does not implement yet are refused
    here, never silently ignored."""
    for option in ("norm", "pos", "ffn", "attention"):
        value, default = getattr(m, option), CHOICES[option][0]
        if value != default:
            raise SpecError(f"model.{option} = '{value}' is not implemented yet; use '{default}'")
    if m.n_kv_heads not in (0, m.n_heads):
        raise SpecError("grouped/multi-query attention (model.n_kv_heads != n_heads) is not implemented yet; set n_kv_heads = 0")
    if m.dropout != 0.0:
        raise SpecError("dropout is not implemented yet; set model.dropout = 0")


def _norm(g: Graph, x: Tensor, name: str, m: ModelSpec) -> Tensor:
    gain = g.param(f"{name}.weight", (m.d_model,), init="ones")
    bias = g.param(f"{name}.bias", (m.d_model,), init="zeros")
    return dsl.layernorm(x, gain, bias, m.norm_eps)


def _linear(g: Graph, x: Tensor, name: str, d_in: int, d_out: int, m: ModelSpec, std: float) -> Tensor:
    w = g.param(f"{name}.weight", (d_in, d_out), std=std)
    b = g.param(f"{name}.bias", (d_out,), init="zeros") if m.bias else None
    return dsl.linear(x, w, b)


# attend(layer, q, k, v) -> y, each (B, H, S, head_dim): full causal attention when
# training, or attention that also reads and writes a KV cache when sampling.
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def causal(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return dsl.causal_attention(q, k, v)


def _attention(g: Graph, x: Tensor, layer: int, m: ModelSpec, residual_std: float, attend: Attend) -> Tensor:
    batch, seq, e = x.shape
    heads, hd = m.n_heads, m.head_dim
    name = f"h.{layer}.attn"
    qkv = _linear(g, x, f"{name}.c_attn", e, 3 * e, m, m.init_std)

    def split(i: int) -> Tensor:  # (B, S, 3E) -> (B, H, S, hd)
        return qkv.slice(2, i * e, (i + 1) * e).reshape(batch, seq, heads, hd).permute(0, 2, 1, 3)

    y = attend(layer, split(0), split(1), split(2))
    y = y.permute(0, 2, 1, 3).reshape(batch, seq, e)
    return _linear(g, y, f"{name}.c_proj", e, e, m, residual_std)


def _mlp(g: Graph, x: Tensor, name: str, m: ModelSpec, residual_std: float) -> Tensor:
    h = dsl.gelu(_linear(g, x, f"{name}.c_fc", m.d_model, m.d_ff, m, m.init_std))
    return _linear(g, h, f"{name}.c_proj", m.d_ff, m.d_model, m, residual_std)


def gpt_logits(g: Graph, m: ModelSpec, tokens: Tensor, attend: Attend = causal,
               positions: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Logits (B, S, V) for token ids (B, S). `positions` (i32, default 0..S-1) picks
    the rows of the position embedding; with `rows` (i32 (R,), indices into the B*S
    positions) only those positions' logits are computed: (R, V)."""
    check_supported(m)
    batch, seq = tokens.shape
    if seq > m.seq_len:
        raise SpecError(f"sequence length {seq} exceeds the model's context of {m.seq_len}")
    # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * layers).
    residual_std = m.init_std / math.sqrt(2 * m.n_layers)
    wte = g.param("wte", (m.vocab_size, m.d_model), std=m.init_std)
    wpe = g.param("wpe", (m.seq_len, m.d_model), std=m.init_std)
    if positions is None:
        pos_emb = wpe.slice(0, 0, seq) if seq < m.seq_len else wpe
    else:
        pos_emb = dsl.embedding(wpe, positions)
    x = dsl.embedding(wte, tokens) + pos_emb
    for layer in range(m.n_layers):
        with g.scope(f"h.{layer}"):
            x = x + _attention(g, _norm(g, x, f"h.{layer}.ln_1", m), layer, m, residual_std, attend)
            x = x + _mlp(g, _norm(g, x, f"h.{layer}.ln_2", m), f"h.{layer}.mlp", m, residual_std)
    if rows is not None:
        x = x.reshape(batch * seq, m.d_model).gather(rows)
    x = _norm(g, x, "ln_f", m)
    with g.scope("lm_head"):
        w = wte.T if m.tie_embeddings else g.param("lm_head.weight", (m.d_model, m.vocab_size), std=m.init_std)
        b = g.param("lm_head.bias", (m.vocab_size,), init="zeros") if m.bias and m.lm_head_bias else None
        return dsl.linear(x, w, b)


def kv_cache_shape(m: ModelSpec, batch: int) -> tuple[int, int, int, int]:
    return (batch, m.n_heads, m.seq_len, m.head_dim)


def prefill_attend(g: Graph, m: ModelSpec) -> Attend:
    """Causal attention over the whole (padded) context that also stores every
    position's keys and values into the KV cache states k_cache.<l>, v_cache.<l>."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        for name, value in ((f"k_cache.{layer}", k), (f"v_cache.{layer}", v)):
            cache = g.state(name, kv_cache_shape(m, q.shape[0]))
            g.updates[name] = value._new("copy", [value]).id
            del cache  # overwritten whole: the old value is not read
        return dsl.causal_attention(q, k, v)
    return attend


def decode_attend(g: Graph, m: ModelSpec, pos: Tensor) -> Attend:
    """Attention of one new position `pos` (an i32 (1,) input) over the KV cache: the
    new key and value are written into the cache at `pos` first, then the query attends
    to cache positions 0..pos."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        shape = kv_cache_shape(m, q.shape[0])
        at_pos = g.iota(shape, 2).eq(pos.reshape(1, 1, 1, 1))
        caches = []
        for name, value in ((f"k_cache.{layer}", k), (f"v_cache.{layer}", v)):
            updated = at_pos.where(value.broadcast_to(shape), g.state(name, shape))
            g.updates[name] = updated.id
            caches.append(updated)
        with g.scope("kv_attention"):
            scores = (q @ caches[0].T) * (1.0 / math.sqrt(m.head_dim))
            visible = pos.reshape(1, 1, 1, 1) >= g.iota((1, 1, 1, m.seq_len), 3)
            return dsl.softmax(visible.where(scores, -math.inf)) @ caches[1]
    return attend
