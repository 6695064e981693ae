"""Model and training specifications: dataclasses, presets, TOML load/save, validation."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gptc.common import write_atomic

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class GptcError(Exception):
    """An error caused by the user's input: the CLI prints its message in one line
    and exits non-zero, with no traceback."""


class SpecError(GptcError):
    pass


# The choices each option accepts; the first is the GPT-2 layout gptc builds today.
CHOICES = {
    "norm": ("layernorm", "rmsnorm", "scalenorm"),
    "pos": ("learned", "rope", "sinusoidal"),
    "ffn": ("gelu", "swiglu", "moe"),
    "attention": ("causal", "local", "linear"),
    "expert_ffn": ("gelu", "swiglu"),
    "schedule": ("cosine", "constant"),
    "decay": ("matrices", "all", "none"),
    "precision": ("fp32", "bf16"),
}


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 5000
    seq_len: int = 32
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0          # 0: as many as n_heads (multi-head attention)
    d_ff: int = 256
    norm: str = "layernorm"
    pos: str = "learned"
    ffn: str = "gelu"
    attention: str = "causal"
    tie_embeddings: bool = False
    bias: bool = True
    attn_bias: bool = True      # the attention projections' biases (with bias = true)
    lm_head_bias: bool = True   # the output projection's bias (with bias = true); GPT-2's has none
    rope_base: float = 10000.0  # pos = "rope": the rotation frequencies are rope_base^(-2i/rotary dims)
    rope_fraction: float = 1.0  # pos = "rope": the fraction of each head's dimensions rotated
    window: int = 0             # attention = "local": a query sees itself and the window-1 keys before it
    n_experts: int = 4          # ffn = "moe": experts per layer
    moe_top_k: int = 2          # ffn = "moe": experts each token is routed to
    moe_aux_weight: float = 0.01  # ffn = "moe": weight of the load-balancing loss added to the training loss
    expert_ffn: str = "gelu"    # ffn = "moe": each expert's FFN (gelu or swiglu)
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when 0 (multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def rope_dims(self) -> int:
        """The dimensions of each head that RoPE rotates: an even number."""
        return 2 * int(self.head_dim * self.rope_fraction / 2)


@dataclass(frozen=True)
class TrainSpec:
    batch_size: int = 32
    steps: int = 2000
    lr: float = 3e-4
    min_lr: float = 0.0          # the cosine schedule decays from lr to min_lr
    warmup: int = 100
    schedule: str = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay: str = "matrices"      # which parameters weight decay applies to
    grad_clip: float = 1.0       # 0 disables clipping of the global gradient norm
    precision: str = "fp32"
    seed: int = 1337
    eval_interval: int = 200
    eval_batches: int = 8
    checkpoint_interval: int = 500
    keep_checkpoints: int = 3


@dataclass(frozen=True)
class Spec:
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)


PRESETS: dict[str, Spec] = {
    # The seed project's defaults.
    "hipgpt": Spec(ModelSpec(vocab_size=5000, seq_len=32, d_model=128, n_layers=2, n_heads=4, d_ff=256),
                   TrainSpec(batch_size=32, lr=3e-4)),
    # GPT-2 small, 124M parameters.
    "gpt2": Spec(ModelSpec(vocab_size=50257, seq_len=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
                 TrainSpec(batch_size=8, lr=6e-4, warmup=700)),
    # For tests and quick CPU runs: byte-sized vocabulary.
    "tiny": Spec(ModelSpec(vocab_size=256, seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64),
                 TrainSpec(batch_size=8, steps=300, lr=3e-3, warmup=20, eval_interval=100)),
    # The seed projects' layouts, with their bugs fixed (README: "Model options").
    # A modular PyTorch GPT: SwiGLU (hidden int(2 * 256 * 2 / 3) = 341, with biases),
    # RMSNorm, sinusoidal positions, tied embeddings without an output bias, dropout 0.1;
    # AdamW lr 1e-3 with weight decay 0.01 on every parameter, clip 1.0, warm-up 100.
    "modular": Spec(ModelSpec(vocab_size=5000, seq_len=256, d_model=256, n_layers=6, n_heads=8, d_ff=341,
                              norm="rmsnorm", pos="sinusoidal", ffn="swiglu", tie_embeddings=True,
                              lm_head_bias=False, dropout=0.1),
                    TrainSpec(batch_size=32, lr=1e-3, weight_decay=0.01, decay="all", grad_clip=1.0, warmup=100)),
    # A JAX GPT: RoPE over the whole head, one KV head (multi-query), RMSNorm, SwiGLU
    # (hidden 341, with biases), no biases in attention, tied embeddings, dropout 0.1;
    # lr 2e-4, weight decay 0.1, clip 1.0, warm-up + cosine.
    "giantgpt": Spec(ModelSpec(vocab_size=5000, seq_len=256, d_model=256, n_layers=2, n_heads=2, n_kv_heads=1,
                               d_ff=341, norm="rmsnorm", pos="rope", ffn="swiglu", attn_bias=False,
                               tie_embeddings=True, lm_head_bias=False, dropout=0.1),
                     TrainSpec(batch_size=32, lr=2e-4, weight_decay=0.1, grad_clip=1.0, warmup=100)),
    # A small LLaMA: RoPE, RMSNorm, SwiGLU (hidden 2/3 * 4 * d_model, to a multiple of 16),
    # grouped-query attention with 4 query heads per KV head, no biases, untied.
    "llama": Spec(ModelSpec(vocab_size=5000, seq_len=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                            d_ff=688, norm="rmsnorm", pos="rope", ffn="swiglu", bias=False, lm_head_bias=False),
                  TrainSpec(batch_size=32, lr=3e-4, warmup=100)),
}


def describe_options(m: ModelSpec) -> str:
    """The model options that differ from GPT-2's layout, in a few words (for the
    lines that introduce a model); "" for GPT-2's layout."""
    default = ModelSpec()
    parts = [f"{name} {getattr(m, name)}" for name in ("norm", "pos", "ffn", "attention")
             if getattr(m, name) != getattr(default, name)]
    if m.pos == "rope" and (m.rope_fraction, m.rope_base) != (default.rope_fraction, default.rope_base):
        parts.append(f"rope over {m.rope_dims} of {m.head_dim} dims, base {m.rope_base:g}")
    if m.ffn == "moe":
        parts.append(f"{m.n_experts} {m.expert_ffn} experts, top {m.moe_top_k}")
    if m.attention == "local":
        parts.append(f"window {m.window}")
    if m.kv_heads != m.n_heads:
        parts.append(f"{m.kv_heads} KV head{'s' if m.kv_heads > 1 else ''}")
    if m.tie_embeddings:
        parts.append("tied embeddings")
    if not m.bias or not m.attn_bias:
        parts.append("no biases" if not m.bias else "no attention biases")
    if m.dropout:
        parts.append(f"dropout {m.dropout:g}")
    return ", ".join(parts)


def preset(name: str) -> Spec:
    if not isinstance(name, str) or name not in PRESETS:
        raise SpecError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# ----- validation -------------------------------------------------------------------
def validate(spec: Spec) -> Spec:
    """Raise SpecError naming the first problem; return the spec unchanged if valid."""
    m, t = spec.model, spec.train
    # Types first (specs built in Python skip the TOML coercion): a str or float size
    # would otherwise fail with a TypeError below, or pass and build odd shapes.
    for section, obj in (("model", m), ("train", t)):
        for f in fields(obj):
            value = getattr(obj, f.name)
            _coerce(section, f, list(value) if isinstance(value, tuple) else value)
    for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
        if getattr(m, name) <= 0:
            raise SpecError(f"model.{name} must be positive, got {getattr(m, name)}")
    # NumPy and the generated kernels index with 64-bit integers: no tensor may hold 2**63
    # bytes. No machine comes near; this refuses absurd sizes (e.g. --batch 10**21) in
    # one line instead of failing deep inside the graph builder.
    b, s, e = t.batch_size, m.seq_len, m.d_model
    largest = max(b * s * max(3 * e, m.d_ff, m.vocab_size), b * m.n_heads * s * s, m.vocab_size * e, s * e, e * m.d_ff)
    if largest * 4 >= 2**63:
        raise SpecError(f"the model is too large: one of its tensors would hold {largest:.2e} numbers, more than "
                        "64-bit offsets address; lower model.seq_len, model.d_model, model.d_ff, model.vocab_size "
                        "or train.batch_size")
    if m.d_model % m.n_heads:
        raise SpecError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads):
        raise SpecError(f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads}), or be 0")
    if m.pos == "rope" and (m.rope_base <= 1.0 or not 0.0 < m.rope_fraction <= 1.0 or m.rope_dims < 2):
        raise SpecError(f"model.rope_base must be > 1 and model.rope_fraction in (0, 1], rotating at least 2 of the "
                        f"{m.head_dim} head dimensions; got rope_base={m.rope_base}, rope_fraction={m.rope_fraction}")
    if m.pos == "sinusoidal" and m.d_model % 2:
        raise SpecError(f"model.pos = 'sinusoidal' needs an even model.d_model, got {m.d_model}")
    if m.attention == "local" and not 0 < m.window:
        raise SpecError(f"model.attention = 'local' needs model.window > 0 (the keys a query sees), got {m.window}")
    if m.window < 0:
        raise SpecError(f"model.window must be 0 or more, got {m.window}")
    if m.ffn == "moe" and not 1 <= m.moe_top_k <= m.n_experts:
        raise SpecError(f"model.moe_top_k ({m.moe_top_k}) must be between 1 and model.n_experts ({m.n_experts})")
    if m.n_experts < 1 or m.moe_aux_weight < 0:
        raise SpecError(f"model.n_experts must be positive and model.moe_aux_weight >= 0, got {m.n_experts} and {m.moe_aux_weight}")
    if not 0.0 <= m.dropout < 1.0:
        raise SpecError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.init_std <= 0 or m.norm_eps <= 0:
        raise SpecError("model.init_std and model.norm_eps must be positive")
    for section, obj in (("model", m), ("train", t)):
        for name, choices in CHOICES.items():
            if hasattr(obj, name) and getattr(obj, name) not in choices:
                raise SpecError(f"{section}.{name} = '{getattr(obj, name)}' is not one of: {', '.join(choices)}")
    for name in ("batch_size", "steps"):
        if getattr(t, name) <= 0:
            raise SpecError(f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("eval_interval", "eval_batches", "checkpoint_interval", "keep_checkpoints"):
        if getattr(t, name) <= 0:
            raise SpecError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.seed < 0:
        raise SpecError(f"train.seed must be 0 or more, got {t.seed}")
    if not (t.lr > 0 and 0 <= t.min_lr <= t.lr):
        raise SpecError(f"train.lr must be positive and train.min_lr in [0, lr], got lr={t.lr}, min_lr={t.min_lr}")
    if t.warmup < 0 or t.weight_decay < 0 or t.grad_clip < 0 or t.eps <= 0:
        raise SpecError("train.warmup, train.weight_decay and train.grad_clip must be >= 0, train.eps > 0")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise SpecError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
    return spec


def lr_at(train: TrainSpec, step: int) -> float:
    """Learning rate for 0-based `step`: linear warm-up, then cosine decay to min_lr
    (or constant)."""
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    if train.schedule == "constant":
        return train.lr
    progress = min(1.0, (step - train.warmup) / max(1, train.steps - train.warmup))
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


# ----- TOML ----------------------------------------------------------------------------
def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    expected = f.type if isinstance(f.type, str) else f.type.__name__
    where = f"{section}.{f.name}"
    if expected == "bool":
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {value!r}")
        return value
    if expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where} must be a number, got {value!r}")
        return _finite(where, value)
    if expected == "str":
        if not isinstance(value, str):
            raise SpecError(f"{where} must be a string, got {value!r}")
        return value
    if expected.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise SpecError(f"{where} must be a list of numbers, got {value!r}")
        return tuple(_finite(where, v) for v in value)
    raise AssertionError(f"unhandled field type {expected}")


def _finite(where: str, value: int | float) -> float:
    """value as a float; inf and nan (which TOML allows) are refused."""
    if not math.isfinite(value):
        raise SpecError(f"{where} must be finite, got {value}")
    return float(value)


def _apply(section: str, base: Any, values: dict) -> Any:
    known = {f.name: f for f in fields(base)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise SpecError(f"unknown option '{key}' in [{section}]; known options: {', '.join(known)}")
        changes[key] = _coerce(section, known[key], value)
    return replace(base, **changes)


def spec_from_dict(data: dict) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a table of 'preset', [model] and [train], not {type(data).__name__}")
    unknown = set(data) - {"preset", "model", "train"}
    if unknown:
        raise SpecError(f"unknown section '{sorted(unknown)[0]}'; a spec has 'preset', [model] and [train]")
    base = preset(data["preset"]) if "preset" in data else Spec()
    for section in ("model", "train"):
        if not isinstance(data.get(section, {}), dict):
            raise SpecError(f"'{section}' must be a table ([{section}])")
    return validate(Spec(_apply("model", base.model, data.get("model", {})),
                         _apply("train", base.train, data.get("train", {}))))


def load_spec(path: str | os.PathLike) -> Spec:
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec file '{path}' does not exist")
    if not p.is_file():
        raise SpecError(f"spec file '{path}' is not a file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"spec file '{path}' is not valid TOML: {e}") from None
    except OSError as e:
        raise SpecError(f"cannot read spec file '{path}': {e.strerror}") from None
    return spec_from_dict(data)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def spec_to_toml(spec: Spec) -> str:
    lines = []
    for section, obj in (("model", spec.model), ("train", spec.train)):
        lines.append(f"[{section}]")
        lines += [f"{f.name} = {_toml_value(getattr(obj, f.name))}" for f in fields(obj)]
        lines.append("")
    return "\n".join(lines)


def save_spec(spec: Spec, path: str | os.PathLike) -> None:
    write_atomic(path, spec_to_toml(spec))
