"""The GPT of gptc's presets written in plain PyTorch, for benchmarks: the same layout
(learned or sinusoidal positions, pre-norm (LayerNorm, RMSNorm or ScaleNorm), causal
attention with a fused QKV projection (with or without biases: model.attn_bias),
GELU-tanh or SwiGLU MLP, final norm, output projection, untied or tied), built from
gptc's parameter dict, so both frameworks start from the same weights.

gptc stores weights (in, out), y = x @ W + b; so does this module (F.linear takes
W.T, a view: no copy). Parameter names are gptc's: named_parameters() yields
"wte", "h.0.attn.c_attn.weight", ... exactly the keys of gptc.init_params.

The training step matches gptc's graph: mean cross-entropy over all positions,
backward, torch.nn.utils.clip_grad_norm_ (when train.grad_clip > 0), then
torch.optim.AdamW with weight decay on the parameters gptc.compiler.optim.decays() picks
(matrices, by default), same lr, betas, eps and weight decay.

Attention uses F.scaled_dot_product_attention(is_causal=True), what a PyTorch user
would write; in float32 it dispatches to the memory-efficient kernel. With pos = "rope",
queries and keys are rotated as Hugging Face's models do (rotate_half, partial rotary).
Grouped/multi-query attention repeats each key/value head over its group of query heads
(a copy, fine for a twin); local attention passes an explicit boolean mask. Linear
attention (attention = "linear") is the naive causal O(S²) form, `linear_attention`.

model.ffn = "moe" (mixture of experts) is the plain loop over experts of MoE below;
its loss() adds the load-balancing loss as gptc's training graph does.

Dropout (model.dropout > 0) applies gptc's own masks, so that both frameworks drop the
same elements: set `model.masks = dropout_masks(spec, batch, seq, step)` before a
training step (no masks: no dropout, as in gptc's eval and inference graphs). With a
mask on the attention probabilities, attention is computed explicitly (softmax, mask,
matmul), as scaled_dot_product_attention takes no mask of ours.

Only gptc.tools.bench.peers and tests import this module, and only where PyTorch is installed."""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptc.compiler.ops.random import dropout_threshold, uniform
from gptc.compiler.optim import decays
from gptc.models.gpt import dropout_stream
from gptc.spec import ModelSpec, Spec, TrainSpec

# drop(x, site) -> x after dropout at that site of the block ("attn_probs", "attn", "ffn")
Drop = Callable[[torch.Tensor, str], torch.Tensor]


class Linear(nn.Module):
    """y = x @ W + b with W stored (in, out), as gptc stores it."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d))
        self.bias = nn.Parameter(torch.empty(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Causal linear attention, the naive O(S²) form: with phi = elu + 1,
    y_t = Σ_{s<=t} (phi(q_t)·phi(k_s)) v_s / (Σ_{s<=t} phi(q_t)·phi(k_s) + eps). No
    1/sqrt(d) scale (the normaliser cancels it); eps is gptc's dsl.LINEAR_ATTENTION_EPS."""
    s = q.shape[-2]
    scores = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)
    scores = scores * torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, dims: int, base: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding as Hugging Face's GPT-NeoX/LLaMA write it (rotate_half), over the
    first `dims` dimensions of each head (partial rotary), positions 0..S-1 (or
    `positions` (S,)). x (B, H, S, D)."""
    seq = x.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, device=x.device, dtype=x.dtype) / dims))
    at = torch.arange(seq, device=x.device) if positions is None else positions
    angles = at.to(x.dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    rot, rest = x[..., :dims], x[..., dims:]
    return torch.cat((rot * emb.cos() + rotate_half(rot) * emb.sin(), rest), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ScaleNorm(nn.Module):
    """gain * x / max(||x||, eps), one scalar gain (shape (1,), as gptc's)."""

    def __init__(self, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.weight / x.norm(dim=-1, keepdim=True).clamp_min(self.eps))


def make_norm(m: ModelSpec) -> nn.Module:
    if m.norm == "rmsnorm":
        return RMSNorm(m.d_model, m.norm_eps)
    if m.norm == "scalenorm":
        return ScaleNorm(m.norm_eps)
    return LayerNorm(m.d_model, m.norm_eps)


def sinusoidal_table(seq: int, dims: int, base: float = 10000.0, device=None, dtype=None) -> torch.Tensor:
    """(seq, dims): sin(p * base^(-2i/dims)) at column 2i, cos at column 2i + 1."""
    p = torch.arange(seq, device=device, dtype=dtype)[:, None]
    angle = p * base ** (-2 * torch.arange(dims // 2, device=device, dtype=dtype) / dims)
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)


class Attention(nn.Module):
    def __init__(self, m: ModelSpec):
        super().__init__()
        self.spec = m
        self.heads, self.kv_heads, self.head_dim = m.n_heads, m.kv_heads, m.head_dim
        self.linear = m.attention == "linear"
        self.window = m.window if m.attention == "local" else 0
        self.c_attn = Linear(m.d_model, (m.n_heads + 2 * m.kv_heads) * m.head_dim, m.bias and m.attn_bias)
        self.c_proj = Linear(m.d_model, m.d_model, m.bias and m.attn_bias)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor | None = None):
        """q (B, H, S, hd) and k, v (B, kv_heads, S, hd) of x (B, S, E), RoPE applied at
        positions 0..S-1 (or `positions` (S,))."""
        b, s, e = x.shape
        hd, kv = self.head_dim, self.kv_heads
        q, k, v = self.c_attn(x).split([self.heads * hd, kv * hd, kv * hd], dim=2)
        q = q.view(b, s, self.heads, hd).transpose(1, 2)
        k, v = (t.view(b, s, kv, hd).transpose(1, 2) for t in (k, v))
        if self.spec.pos == "rope":
            q, k = (apply_rope(t, self.spec.rope_dims, self.spec.rope_base, positions) for t in (q, k))
        return q, k, v

    def forward(self, x: torch.Tensor, drop: Drop | None = None) -> torch.Tensor:
        b, s, e = x.shape
        hd, kv = self.head_dim, self.kv_heads
        q, k, v = self.qkv(x)
        if kv != self.heads:  # query head h reads key/value head h // group
            k, v = (t.repeat_interleave(self.heads // kv, dim=1) for t in (k, v))
        back = torch.arange(s, device=x.device)[:, None] - torch.arange(s, device=x.device)[None, :]
        visible = (back >= 0) & (back < self.window) if self.window else back >= 0  # query i sees key j
        if self.linear:
            y = linear_attention(q, k, v)
        elif drop is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible if self.window else None,
                                               is_causal=not self.window)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            y = drop(scores.masked_fill(~visible, float("-inf")).softmax(-1), "attn_probs") @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, s, e))


class MLP(nn.Module):
    """GELU-tanh, or SwiGLU: c_fc is the gate and up projections in one (gate columns
    first, then up, as gptc's), silu(gate) * up."""

    def __init__(self, m: ModelSpec):
        super().__init__()
        self.swiglu = m.ffn == "swiglu"
        self.c_fc = Linear(m.d_model, (2 if self.swiglu else 1) * m.d_ff, m.bias)
        self.c_proj = Linear(m.d_ff, m.d_model, m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Weight(nn.Module):
    """A bare parameter named "weight" (gptc's "<module>.weight" names)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class MoE(nn.Module):
    """Mixture of experts as gptc's dsl.moe: top-k experts per token by router logits
    (ties to the lowest index: a stable descending sort), gates = softmax of the k
    logits, a loop over the experts on the tokens routed to each. `aux` keeps the last
    forward's load-balancing loss E * sum_e f_e P_e (f_e the fraction of the
    (token, slot) pairs routed to e, a constant; P_e the mean router probability)."""

    def __init__(self, m: ModelSpec):
        super().__init__()
        self.k, self.n_experts, self.swiglu = m.moe_top_k, m.n_experts, m.expert_ffn == "swiglu"
        hidden = m.d_ff * (2 if self.swiglu else 1)
        self.router = Linear(m.d_model, m.n_experts, False)
        self.experts = nn.Module()
        self.experts.c_fc = Weight(m.n_experts, m.d_model, hidden)
        self.experts.c_proj = Weight(m.n_experts, m.d_ff, m.d_model)
        self.aux = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :self.k]
        gates = torch.softmax(logits.gather(1, order), dim=-1)
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            token, slot = (order == e).nonzero(as_tuple=True)
            h = flat[token] @ self.experts.c_fc.weight[e]
            if self.swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h, approximate="tanh")
            out = out.index_add(0, token, (h @ self.experts.c_proj.weight[e]) * gates[token, slot, None])
        fraction = F.one_hot(order, self.n_experts).sum((0, 1)).to(flat.dtype) / order.numel()
        self.aux = self.n_experts * (fraction * torch.softmax(logits, dim=-1).mean(0)).sum()
        return out.reshape(x.shape)


class Block(nn.Module):
    def __init__(self, m: ModelSpec):
        super().__init__()
        self.ln_1 = make_norm(m)
        self.attn = Attention(m)
        self.ln_2 = make_norm(m)
        self.mlp = MoE(m) if m.ffn == "moe" else MLP(m)

    def forward(self, x: torch.Tensor, drop: Drop | None = None) -> torch.Tensor:
        x = x + (drop or _keep)(self.attn(self.ln_1(x), drop), "attn")
        return x + (drop or _keep)(self.mlp(self.ln_2(x)), "ffn")


def _keep(x: torch.Tensor, site: str) -> torch.Tensor:
    return x


class TorchGPT(nn.Module):
    """forward(tokens (B, S) int64) -> logits (B, S, V). `masks` ({Philox stream:
    keep mask}, see dropout_masks) turns dropout on."""

    def __init__(self, m: ModelSpec):
        super().__init__()
        self.spec = m
        self.wte = nn.Parameter(torch.empty(m.vocab_size, m.d_model))
        if m.pos == "learned":  # RoPE rotates queries and keys instead
            self.wpe = nn.Parameter(torch.empty(m.seq_len, m.d_model))
        self.h = nn.ModuleList(Block(m) for _ in range(m.n_layers))
        self.ln_f = make_norm(m)
        out_bias = m.bias and m.lm_head_bias
        self.lm_head = None if m.tie_embeddings else nn.Linear(m.d_model, m.vocab_size, out_bias)  # (V, E), as gptc's
        if m.tie_embeddings and out_bias:
            self.lm_head_bias = nn.Parameter(torch.empty(m.vocab_size))
        self.masks: Mapping[int, np.ndarray] = {}

    def _dropout(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """gptc's inverted dropout, x * keep * 1/(1-p), with gptc's keep mask."""
        keep = torch.from_numpy(self.masks[stream]).to(x.device, x.dtype)
        return x * keep * (1.0 / (1.0 - self.spec.dropout))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        x = self.wte[tokens]
        if self.spec.pos == "learned":
            x = x + self.wpe[:s]
        elif self.spec.pos == "sinusoidal":
            x = x + sinusoidal_table(s, self.spec.d_model, device=tokens.device, dtype=self.wte.dtype)
        if self.masks:
            x = self._dropout(x, dropout_stream(0, "embedding"))
        for layer, block in enumerate(self.h):
            drop = (lambda t, site, layer=layer: self._dropout(t, dropout_stream(layer, site))) if self.masks else None
            x = block(x, drop)
        x = self.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(x, self.wte, getattr(self, "lm_head_bias", None))

    def aux_loss(self) -> torch.Tensor | None:
        """The last forward's load-balancing loss averaged over the MoE layers (as
        gptc's "aux_loss"), or None without experts."""
        if self.spec.ffn != "moe":
            return None
        return sum(block.mlp.aux for block in self.h) / len(self.h)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training objective: the cross-entropy, plus moe_aux_weight * aux_loss
        with experts (as gptc's training graph minimizes)."""
        logits = self(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux = self.aux_loss()
        return loss if aux is None else loss + self.spec.moe_aux_weight * aux


def dropout_masks(spec: Spec, batch: int, seq: int, step: int) -> dict[int, np.ndarray]:
    """The keep masks (1 keep, 0 drop) of gptc's training step `step` (the value fed
    as its "step" input), by Philox stream: drawn with gptc's own Philox, so the twin
    drops exactly the elements gptc drops. Empty when model.dropout is 0."""
    m = spec.model
    if m.dropout == 0:
        return {}
    shapes = {dropout_stream(0, "embedding"): (batch, seq, m.d_model)}
    for layer in range(m.n_layers):
        shapes[dropout_stream(layer, "attn_probs")] = (batch, m.n_heads, seq, seq)
        shapes[dropout_stream(layer, "attn")] = shapes[dropout_stream(layer, "ffn")] = (batch, seq, m.d_model)
    threshold = dropout_threshold(m.dropout)
    return {stream: (uniform(shape, spec.train.seed, stream, step) >= threshold).astype(np.float32)
            for stream, shape in shapes.items()}


def gptc_name(torch_name: str) -> str:
    """The gptc parameter a torch parameter holds (the tied model's output bias is
    gptc's "lm_head.bias")."""
    return "lm_head.bias" if torch_name == "lm_head_bias" else torch_name


def build_model(m: ModelSpec, params: Mapping[str, np.ndarray], device="cuda",
                dtype: torch.dtype = torch.float32) -> TorchGPT:
    """A TorchGPT on `device` holding gptc's parameter values (every parameter must be
    given, with gptc's shape)."""
    model = TorchGPT(m)
    names = {gptc_name(n) for n, _ in model.named_parameters()}
    missing, extra = names - set(params), set(params) - names
    if missing or extra:
        raise ValueError(f"parameters do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = np.asarray(params[gptc_name(name)], dtype=np.float32)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: gptc shape {value.shape}, torch shape {tuple(p.shape)}")
            p.copy_(torch.from_numpy(value))
    return model.to(device=device, dtype=dtype)


def load_params(model: TorchGPT, params: Mapping[str, np.ndarray]) -> None:
    """Copy gptc's values into the model's parameters in place (storage kept, so
    tensors captured in a CUDA graph see the new values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(params[gptc_name(name)], dtype=np.float32)).to(p.device, p.dtype))


def make_optimizer(model: TorchGPT, train: TrainSpec, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW as gptc's graph does it: decay on the parameters gptc.compiler.optim.decays picks."""
    decay = [p for p in model.parameters() if decays(train, tuple(p.shape))]
    other = [p for p in model.parameters() if not decays(train, tuple(p.shape))]
    groups = [g for g in ({"params": decay, "weight_decay": train.weight_decay},
                          {"params": other, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                             capturable=capturable, foreach=True)


def reset_optimizer(opt: torch.optim.AdamW) -> None:
    """Zero the moments and step counts in place (as a fresh optimizer, but keeping
    the storage a captured CUDA graph points at)."""
    with torch.no_grad():
        for state in opt.state.values():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state and torch.is_tensor(state[key]):
                    state[key].zero_()


def train_step(loss_fn, model: TorchGPT, opt: torch.optim.AdamW, tokens: torch.Tensor, targets: torch.Tensor,
               grad_clip: float) -> torch.Tensor:
    """One training step; returns the loss (a device tensor: no host sync).
    loss_fn(tokens, targets) is model.loss or a compiled version of it."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(tokens, targets)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    opt.step()
    return loss.detach()


__all__ = ["TorchGPT", "linear_attention", "build_model", "dropout_masks", "load_params", "make_optimizer",
           "reset_optimizer", "train_step"]


# ----- KV-cache decoding (gptc bench --what decode) ---------------------------------------
class KVCache:
    """Keys and values of every layer, (B, kv_heads, seq_len, head_dim), allocated once:
    static shapes, written in place at the new positions (what transformers'
    StaticCache does, so torch.compile and CUDA graphs can capture a decode step)."""

    def __init__(self, m: ModelSpec, batch: int, device="cuda", dtype: torch.dtype = torch.float32):
        shape = (batch, m.kv_heads, m.seq_len, m.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(m.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(m.n_layers)]


def cached_attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor) -> torch.Tensor:
    """Attention of the new positions `positions` (T,) of x (B, T, E): their keys and
    values are written into the caches first, then each query attends to the cache
    positions it sees (0..its position, or the last `window` of them)."""
    if attn.linear:
        raise NotImplementedError("the twin has no KV-cache decoding of linear attention")
    b, t, e = x.shape
    kv = attn.kv_heads
    q, k, v = attn.qkv(x, positions)
    k_cache.index_copy_(2, positions, k)
    v_cache.index_copy_(2, positions, v)
    keys, values = k_cache, v_cache
    if kv != attn.heads:
        keys, values = (u.repeat_interleave(attn.heads // kv, dim=1) for u in (keys, values))
    back = positions[:, None] - torch.arange(k_cache.shape[2], device=x.device)[None, :]
    visible = (back >= 0) & (back < attn.window) if attn.window else back >= 0
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
    return attn.c_proj(y.transpose(1, 2).reshape(b, t, e))


def forward_cached(model: TorchGPT, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of the last of `tokens` (B, T) at `positions` (T,) int64, reading
    and extending `cache` (the prefill: positions 0..T-1; a decode step: one position).
    Inference only: no dropout."""
    m = model.spec
    x = model.wte[tokens]
    if m.pos == "learned":
        x = x + model.wpe[positions]
    elif m.pos == "sinusoidal":
        x = x + sinusoidal_table(m.seq_len, m.d_model, device=tokens.device, dtype=model.wte.dtype)[positions]
    for layer, block in enumerate(model.h):
        x = x + cached_attention(block.attn, block.ln_1(x), positions, cache.k[layer], cache.v[layer])
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_f(x[:, -1])
    if model.lm_head is not None:
        return model.lm_head(x)
    return F.linear(x, model.wte, getattr(model, "lm_head_bias", None))
