"""The GPT family, written in the DSL like any user model.

The default layout is GPT-2's: token + learned position embeddings, pre-norm blocks
(causal multi-head attention with a fused QKV projection, GELU-tanh MLP, residual
adds), a final norm and an output projection (untied by default). Each model option
(norm, positions, FFN, attention kind, KV heads, dropout) is one function below.
Parameter names follow GPT-2's checkpoints, with weights stored (in, out) so that
y = x @ W + b."""
from __future__ import annotations

import math
from typing import Callable

from gptc.compiler import dsl
from gptc.compiler.ir import Graph, Tensor
from gptc.spec import ModelSpec, SpecError


# ----- norms ---------------------------------------------------------------------------
def _norm(g: Graph, x: Tensor, name: str, m: ModelSpec) -> Tensor:
    if m.norm == "layernorm":
        gain = g.param(f"{name}.weight", (m.d_model,), init="ones")
        bias = g.param(f"{name}.bias", (m.d_model,), init="zeros")
        return dsl.layernorm(x, gain, bias, m.norm_eps)
    if m.norm == "rmsnorm":
        return dsl.rmsnorm(x, g.param(f"{name}.weight", (m.d_model,), init="ones"), m.norm_eps)
    # scalenorm: one scalar gain, initialised to sqrt(d_model).
    gain = g.param(f"{name}.weight", (1,), init="constant", value=math.sqrt(m.d_model))
    return dsl.scalenorm(x, gain, m.norm_eps)


def _linear(g: Graph, x: Tensor, name: str, d_in: int, d_out: int, std: float, bias: bool) -> Tensor:
    w = g.param(f"{name}.weight", (d_in, d_out), std=std)
    b = g.param(f"{name}.bias", (d_out,), init="zeros") if bias else None
    return dsl.linear(x, w, b)


# ----- positions -----------------------------------------------------------------------
def _positions(g: Graph, seq: int, positions: Tensor | None) -> Tensor:
    """The i32 positions of the sequence's tokens: `positions`, or 0..seq-1."""
    return positions if positions is not None else g.iota((seq,), 0)


def _position_embedding(g: Graph, m: ModelSpec, seq: int, positions: Tensor | None) -> Tensor | None:
    """What is added to the token embeddings: (S, d) rows of a learned or sinusoidal
    table ((B, S, d) for per-sequence positions (B, S)), or None (RoPE rotates queries
    and keys instead)."""
    if positions is not None and len(positions.shape) == 2:
        rows = _position_embedding(g, m, positions.shape[0] * positions.shape[1],
                                   positions.reshape(positions.shape[0] * positions.shape[1]))
        return None if rows is None else rows.reshape(*positions.shape, m.d_model)
    if m.pos == "learned":
        wpe = g.param("wpe", (m.seq_len, m.d_model), std=m.init_std)
        if positions is None:
            return wpe.slice(0, 0, seq) if seq < m.seq_len else wpe
        return dsl.embedding(wpe, positions)
    if m.pos == "sinusoidal":
        return dsl.sinusoidal_table(_positions(g, seq, positions), m.d_model)
    return None


# ----- attention -----------------------------------------------------------------------
# attend(layer, q, k, v) -> y: q (B, H, S, head_dim), k and v (B, kv_heads, S, head_dim),
# y (B, H, S, head_dim). Attention over the sequence when training, or attention that
# also reads and writes a KV cache when sampling.
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def attend_sequence(m: ModelSpec, drop: Drop | None = None) -> Attend:
    """Attention of every position over the sequence, of the spec's kind; `drop`
    applies dropout to the attention probabilities."""
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if m.attention == "linear":
            return dsl.linear_attention(q, k, v)
        drop_probs = (lambda p: drop(p, dropout_stream(layer, "attn_probs"))) if drop else None
        return dsl.causal_attention(q, k, v, window=m.window if m.attention == "local" else 0, drop=drop_probs)
    return attend


def _attention(g: Graph, x: Tensor, layer: int, m: ModelSpec, residual_std: float, attend: Attend,
               positions: Tensor) -> Tensor:
    batch, seq, e = x.shape
    heads, kv_heads, hd = m.n_heads, m.kv_heads, m.head_dim
    name = f"h.{layer}.attn"
    bias = m.bias and m.attn_bias
    # One projection for queries, keys and values: (B, S, (H + 2 * kv_heads) * hd).
    qkv = _linear(g, x, f"{name}.c_attn", e, (heads + 2 * kv_heads) * hd, m.init_std, bias)

    def split(start: int, n_heads: int) -> Tensor:  # -> (B, n_heads, S, hd)
        part = qkv.slice(2, start * hd, (start + n_heads) * hd)
        return part.reshape(batch, seq, n_heads, hd).permute(0, 2, 1, 3)

    q, k, v = split(0, heads), split(heads, kv_heads), split(heads + kv_heads, kv_heads)
    if m.pos == "rope":
        q = dsl.rope(q, positions, m.rope_dims, m.rope_base)
        if not getattr(attend, "rotates_keys", False):  # else the cache keeps keys before RoPE
            k = dsl.rope(k, positions, m.rope_dims, m.rope_base)
    y = attend(layer, q, k, v)
    y = y.permute(0, 2, 1, 3).reshape(batch, seq, e)
    return _linear(g, y, f"{name}.c_proj", e, e, residual_std, bias)


# ----- feed-forward --------------------------------------------------------------------
def _ffn(g: Graph, x: Tensor, name: str, m: ModelSpec, residual_std: float,
         aux_losses: list[Tensor] | None = None) -> Tensor:
    """The feed-forward block; a mixture of experts appends its load-balancing loss
    to `aux_losses`."""
    if m.ffn == "moe":
        return _moe(g, x, name, m, residual_std, aux_losses)
    if m.ffn == "gelu":
        h = dsl.gelu(_linear(g, x, f"{name}.c_fc", m.d_model, m.d_ff, m.init_std, m.bias))
    elif m.ffn == "swiglu":
        # The gate and up projections are one matmul: columns [0, d_ff) gate, [d_ff, 2 d_ff) up.
        gate_up = _linear(g, x, f"{name}.c_fc", m.d_model, 2 * m.d_ff, m.init_std, m.bias)
        h = dsl.swiglu(gate_up)
    return _linear(g, h, f"{name}.c_proj", m.d_ff, m.d_model, residual_std, m.bias)


def _moe(g: Graph, x: Tensor, name: str, m: ModelSpec, residual_std: float,
         aux_losses: list[Tensor] | None) -> Tensor:
    """Top-k routed experts (dsl.moe). Experts have no biases (as Mixtral's); the router
    is a (d_model, n_experts) matrix without bias."""
    hidden = m.d_ff * (2 if m.expert_ffn == "swiglu" else 1)
    router = g.param(f"{name}.router.weight", (m.d_model, m.n_experts), std=m.init_std)
    w_in = g.param(f"{name}.experts.c_fc.weight", (m.n_experts, m.d_model, hidden), std=m.init_std)
    w_out = g.param(f"{name}.experts.c_proj.weight", (m.n_experts, m.d_ff, m.d_model), std=residual_std)
    lead = x.shape[:-1]
    y, aux = dsl.moe(x.reshape(-1, m.d_model), router, w_in, w_out, m.moe_top_k, m.expert_ffn)
    if aux_losses is not None:
        aux_losses.append(aux)
    return y.reshape(*lead, m.d_model)


# ----- dropout -------------------------------------------------------------------------
# drop(x, stream) -> x after dropout with Philox stream `stream` (x itself when off).
Drop = Callable[[Tensor, int], Tensor]
DROPOUT_SITES = ("embedding", "attn_probs", "attn", "ffn")


def dropout_stream(layer: int, site: str) -> int:
    """The Philox stream of a dropout site, so that every site draws independent bits:
    0 the embeddings; in layer l, 3l+1 the attention probabilities, 3l+2 the attention
    output, 3l+3 the FFN output (both before the residual add)."""
    return 0 if site == "embedding" else 3 * layer + DROPOUT_SITES.index(site)


def _dropout(g: Graph, m: ModelSpec, training: bool, seed: int) -> Drop:
    """Dropout of rate model.dropout when training, else the identity. The masks are
    keyed by the training seed and the step: the optimizer's scalar input "step" (fed
    1, 2, ... by the trainer), created here when the forward pass needs it first."""
    if not training or m.dropout == 0:
        return lambda x, stream: x
    step = Tensor(g, g.inputs["step"]) if "step" in g.inputs else g.input("step", ())
    return lambda x, stream: dsl.dropout(x, m.dropout, step, seed, stream)


# ----- the model -----------------------------------------------------------------------
def gpt_logits(g: Graph, m: ModelSpec, tokens: Tensor, attend: Attend | None = None,
               positions: Tensor | None = None, rows: Tensor | None = None, training: bool = False,
               aux_losses: list[Tensor] | None = None, seed: int = 0) -> Tensor:
    """Logits (B, S, V) for token ids (B, S). `attend` defaults to attention over the
    sequence; `positions` (i32 (S,), default 0..S-1) are the tokens' positions; with
    `rows` (i32 (R,), indices into the B*S positions) only those positions' logits are
    computed: (R, V). Positions may also be (B, S), per sequence (the KV-cache decode).
    `training` turns dropout on, its masks keyed by `seed`. Each mixture-of-experts layer appends
    its load-balancing loss to `aux_losses` (when given)."""
    batch, seq = tokens.shape
    if seq > m.seq_len:
        raise SpecError(f"sequence length {seq} exceeds the model's context of {m.seq_len}")
    drop = _dropout(g, m, training, seed)
    attend = attend or attend_sequence(m, drop)
    # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * layers).
    residual_std = m.init_std / math.sqrt(2 * m.n_layers)
    wte = g.param("wte", (m.vocab_size, m.d_model), std=m.init_std)
    x = dsl.embedding(wte, tokens)
    pos_emb = _position_embedding(g, m, seq, positions)
    if pos_emb is not None:
        x = x + pos_emb
    x = drop(x, dropout_stream(0, "embedding"))
    pos = _positions(g, seq, positions)
    for layer in range(m.n_layers):
        with g.scope(f"h.{layer}"):
            y = _attention(g, _norm(g, x, f"h.{layer}.ln_1", m), layer, m, residual_std, attend, pos)
            x = x + drop(y, dropout_stream(layer, "attn"))
            y = _ffn(g, _norm(g, x, f"h.{layer}.ln_2", m), f"h.{layer}.mlp", m, residual_std, aux_losses)
            x = x + drop(y, dropout_stream(layer, "ffn"))
    if rows is not None:
        x = x.reshape(batch * seq, m.d_model).gather(rows)
    x = _norm(g, x, "ln_f", m)
    with g.scope("lm_head"):
        # Stored (vocab, d_model) like wte, so that the gradient's dLogits @ W (k = vocab)
        # reads W along its rows: the matrix units take 0.9 ms there, 1.5 ms along columns.
        w = (wte if m.tie_embeddings else g.param("lm_head.weight", (m.vocab_size, m.d_model), std=m.init_std)).T
        b = g.param("lm_head.bias", (m.vocab_size,), init="zeros") if m.bias and m.lm_head_bias else None
        return dsl.linear(x, w, b)


# ----- sampling: the KV cache ----------------------------------------------------------
def kv_cache_shape(m: ModelSpec, batch: int) -> tuple[int, int, int, int]:
    return (batch, m.kv_heads, m.seq_len, m.head_dim)


def linear_state_shape(m: ModelSpec, batch: int) -> tuple[int, int, int, int]:
    """Linear attention's recurrent state per layer: Σ phi(k) [v 1]ᵀ per key/value head."""
    return (batch, m.kv_heads, m.head_dim, m.head_dim + 1)


def prefill_attend(g: Graph, m: ModelSpec, last: Tensor | None = None, sink: int = 0) -> Attend:
    """Attention over the whole (padded) context that also stores every position's
    keys and values into the KV cache states k_cache.<l>, v_cache.<l>. Linear
    attention stores its state kv_state.<l> instead, summed over the positions up to
    each sequence's last token: `last` (B,) i32, the flat index b*S + (length-1).
    For the streaming cache (`sink` > 0) of a RoPE model, the cache keeps keys before
    RoPE (decode_attend rotates them by their positions within the cache)."""
    over_sequence = attend_sequence(m)
    if m.attention == "linear":
        if last is None:
            raise ValueError("prefill of linear attention needs the sequences' last positions")

        def attend_linear(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            batch, seq = q.shape[0], q.shape[2]
            flat = g.iota((batch, 1, seq, 1), 0) * seq + g.iota((batch, 1, seq, 1), 2)
            keep = last.reshape(batch, 1, 1, 1) >= flat  # the padding after the prompt is left out
            name = f"kv_state.{layer}"
            g.state(name, linear_state_shape(m, batch))  # overwritten whole: the old value is not read
            state = dsl.linear_attention_state(k, v, keep)
            g.updates[name] = state._new("copy", [state]).id  # a matmul kernel cannot store a state
            return over_sequence(layer, q, k, v)
        return attend_linear

    raw_keys = bool(sink) and m.pos == "rope"

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        for name, value in ((f"k_cache.{layer}", k), (f"v_cache.{layer}", v)):
            cache = g.state(name, kv_cache_shape(m, q.shape[0]))
            if value.shape[2] < m.seq_len:  # a shorter prefill: the rows past it are zero,
                value = value.pad(2, 0, m.seq_len - value.shape[2])  # never read before decode writes them
            g.updates[name] = value._new("copy", [value]).id
            del cache  # overwritten whole: the old value is not read
        if raw_keys:
            k = dsl.rope(k, g.iota((k.shape[2],), 0), m.rope_dims, m.rope_base)
        return over_sequence(layer, q, k, v)
    attend.rotates_keys = raw_keys  # type: ignore[attr-defined]
    return attend


def decode_attend(g: Graph, m: ModelSpec, pos: Tensor, slot: Tensor | None = None, sink: int = 0) -> Attend:
    """Attention of one new position per sequence, sequence b's at pos[b] (`pos` an i32
    (B,) input), over the KV cache: the new key and value are written into the cache at
    pos[b] first (only those rows: dsl.kv_write, in place), then the query attends to
    the cache positions it sees (0..pos[b], or the last `window` of them) by
    flash-decoding (dsl.decode_attention), which reads no key past pos[b]. Linear
    attention instead adds the new key and value to its state kv_state.<l>, which
    holds positions 0..pos-1 (the prefill and the decode steps before).
    The streaming cache (`sink` > 0, StreamingLLM-style): the new key and value go to
    `slot` (B,) i32 instead, `pos` is the position within the cache, and a RoPE model's
    cache holds keys before RoPE, rotated in the attention (ops/decode.py)."""
    if m.attention == "linear":
        def attend_linear(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            # O(1) per token: add the new key and value to the state, read it with the query.
            name = f"kv_state.{layer}"
            state = g.state(name, linear_state_shape(m, q.shape[0])) + dsl.linear_attention_state(k, v)
            g.updates[name] = state.id
            return dsl.linear_attention_read(q, state)
        return attend_linear

    raw_keys = bool(sink) and m.pos == "rope"

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        shape = kv_cache_shape(m, q.shape[0])
        caches = []
        for name, value in ((f"k_cache.{layer}", k), (f"v_cache.{layer}", v)):
            updated = dsl.kv_write(g.state(name, shape), value, slot if sink else pos)
            g.updates[name] = updated.id
            caches.append(updated)
        with g.scope("kv_attention"):
            return dsl.decode_attention(q, *caches, pos, 1.0 / math.sqrt(m.head_dim),
                                        window=m.window if m.attention == "local" else 0, slot=slot, sink=sink,
                                        rope=(m.rope_dims, m.rope_base) if raw_keys else None)
    attend.rotates_keys = raw_keys  # type: ignore[attr-defined]
    return attend
