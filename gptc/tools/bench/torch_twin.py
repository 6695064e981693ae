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
would write; in float32 it dispatches to the memory-efficient kernel.

Only gptc.tools.bench.peers and tests import this module, and only where PyTorch is installed."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptc.compiler.optim import decays
from gptc.spec import ModelSpec, TrainSpec


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
        self.heads = m.n_heads
        self.c_attn = Linear(m.d_model, 3 * m.d_model, m.bias and m.attn_bias)
        self.c_proj = Linear(m.d_model, m.d_model, m.bias and m.attn_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (t.view(b, s, self.heads, e // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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


class Block(nn.Module):
    def __init__(self, m: ModelSpec):
        super().__init__()
        self.ln_1 = make_norm(m)
        self.attn = Attention(m)
        self.ln_2 = make_norm(m)
        self.mlp = MLP(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """forward(tokens (B, S) int64) -> logits (B, S, V)."""

    def __init__(self, m: ModelSpec):
        super().__init__()
        self.spec = m
        self.wte = nn.Parameter(torch.empty(m.vocab_size, m.d_model))
        if m.pos == "learned":
            self.wpe = nn.Parameter(torch.empty(m.seq_len, m.d_model))
        elif m.pos != "sinusoidal":
            raise NotImplementedError(f"model.pos = '{m.pos}' in the PyTorch twin")
        if m.ffn not in ("gelu", "swiglu") or m.attention != "causal" or m.kv_heads != m.n_heads:
            raise NotImplementedError("the PyTorch twin has causal multi-head attention and GELU/SwiGLU MLPs")
        self.h = nn.ModuleList(Block(m) for _ in range(m.n_layers))
        self.ln_f = make_norm(m)
        out_bias = m.bias and m.lm_head_bias
        self.lm_head = None if m.tie_embeddings else Linear(m.d_model, m.vocab_size, out_bias)
        if m.tie_embeddings and out_bias:
            self.lm_head_bias = nn.Parameter(torch.empty(m.vocab_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        if self.spec.pos == "learned":
            x = self.wte[tokens] + self.wpe[:s]
        else:
            x = self.wte[tokens] + sinusoidal_table(s, self.spec.d_model, device=tokens.device, dtype=self.wte.dtype)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(x, self.wte, getattr(self, "lm_head_bias", None))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


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


__all__ = ["TorchGPT", "build_model", "load_params", "make_optimizer", "reset_optimizer", "train_step"]
