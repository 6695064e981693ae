"""Hugging Face interop: `gptc export --format hf` and `gptc train --init-from HFDIR`.

A Hugging Face model directory is what transformers' `save_pretrained` writes:
config.json, the weights in model.safetensors (or in shards that
model.safetensors.index.json lists) and, for the tokenizer, tokenizer.json with
tokenizer_config.json. gptc's tokenizer.json is a `tokenizers` file (byte-level BPE),
written as is and loaded by transformers' PreTrainedTokenizerFast; reading, a
tokenizer.json of that layout loads (GPT-2's, with its <|endoftext|>), others
(SentencePiece-style, as LLaMA 2's; another split regex, as LLaMA 3's) are refused.

Each model family gptc builds maps onto one transformers class through a Layout: the
class and its config.json both ways, and a table of tensor names (gptc's name, the
class's name, whether the class stores it transposed, and which columns of gptc's
tensor it holds when gptc's one tensor is several of the class's). layout_of(spec)
picks it:
- GPT2LMHeadModel (model_type "gpt2") for GPT-2's layout (LayerNorm, learned
  positions, GELU MLP, multi-head attention). gptc's parameters already carry GPT-2's
  names in its Conv1D (in, out) layout, so the table is a rename under `transformer.`
  (gptc's lm_head.weight is (vocab, d_model), as GPT2LMHeadModel's torch.nn.Linear).
- LlamaForCausalLM (model_type "llama") for LLaMA's (RMSNorm, RoPE over every head
  dimension, SwiGLU, causal attention, any model.n_kv_heads): model.embed_tokens,
  model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
  mlp.{gate,up,down}_proj}, model.norm, lm_head, every Linear (out, in) (gptc's
  lm_head.weight already is). gptc's c_attn is q_proj, k_proj, v_proj side by side
  (columns q, then k, then v) and SwiGLU's c_fc is gate_proj, up_proj (gate, then up). gptc's RoPE pairs dimension i with i + D/2,
  as transformers' rotate_half does, so q and k need no permutation (tested against
  transformers' apply_rotary_pos_emb). config.json: attention_bias = model.bias and
  model.attn_bias, mlp_bias = model.bias, rope_theta = model.rope_base (transformers 5
  writes rope_parameters instead; both are read).
A spec neither fits (ScaleNorm, sinusoidal positions, LayerNorm with RoPE, RMSNorm
with learned positions, RoPE over part of a head (rope_fraction < 1), MoE, local or
linear attention) is refused in one line naming what each class lacks. Dropout is a
training choice, no part of the function: it does not stop an export.

What a class cannot express is refused in one line, never approximated:
- gptc's lm_head has a bias when model.bias and model.lm_head_bias are true (the
  default); GPT2LMHeadModel's lm_head has none, so a checkpoint whose lm_head.bias is
  not all zeros is refused: train with model.lm_head_bias = false to export. A model
  read with --init-from gets lm_head_bias = false, so it exports back. (With
  model.bias = false no layer has a bias, and GPT2LMHeadModel gets zero biases: the
  same function.)
- GPT-2's config.json: an activation other than GELU's tanh approximation, attention
  without the 1/sqrt(head_dim) scale or scaled by the inverse layer index, cross
  attention. Dropout (GPT-2's configs say 0.1) is a training choice, not part of the
  function: a run started from the model trains without it (model.dropout 0), and says so.
- LLaMA's config.json: an activation other than SiLU, scaled RoPE (a rope_type other
  than "default"), partial_rotary_factor < 1, a head_dim other than hidden_size /
  num_attention_heads, attention_bias without mlp_bias (gptc's attention biases come
  only with the others). attention_dropout is noted and not used, as GPT-2's dropout.
  gptc's lm_head bias is refused at export as for GPT-2 (LLaMA's lm_head has none).
Reading, the tensors transformers does not load as parameters are skipped: the buffers
older versions saved (GPT-2's causal masks `attn.bias` and `attn.masked_bias`, LLaMA's
`rotary_emb.inv_freq`), and a tied model's lm_head.weight (transformers ties it to the
token embedding). Weights in float16 or float64 are read as float32; other dtypes
(bfloat16) are refused.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from gptc.common import first_file_in, make_temp_dir, write_atomic
from gptc.models import build_graph
from gptc.spec import CHOICES, GptcError, ModelSpec, Spec, SpecError, validate
from gptc.tools.checkpoint import MODEL_FILE, check_tensors, find_checkpoint, load_checkpoint
from gptc.tools.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
READ_DTYPES = ("F32", "F16", "F64")  # safetensors dtypes read (as float32)


@dataclass(frozen=True)
class Entry:
    """One row of a layout's table of names."""
    gptc: str                # gptc's parameter name
    hf: str | None           # the transformers class's tensor name; None: the class has no such tensor (it must be 0)
    transpose: bool = False  # the class stores it (out, in) where gptc stores (in, out)
    # The columns (last axis) of gptc's tensor this one holds, when gptc's one tensor is
    # several of the class's (LLaMA's q/k/v_proj of c_attn); the table lists them in order.
    columns: tuple[int, int] | None = None


@dataclass(frozen=True)
class Layout:
    """How one family of gptc models is written as one transformers class."""
    architecture: str                                   # the transformers class
    model_type: str                                     # config.json's model_type
    base: str                                           # the base model's prefix ("transformer.")
    heads: tuple[str, ...]                              # prefixes of the names outside the base model
    defaults: dict[str, Any]                            # the class's config defaults, for keys config.json lacks
    fits: Callable[[ModelSpec], str | None]             # why a spec does not fit the class (None: it fits)
    write_config: Callable[[ModelSpec], dict]           # spec -> config.json
    # config.json -> spec, given get(key, type) (config.json's value, type-checked) and note(text)
    read_config: Callable[[Callable[[str, type], Any], Callable[[str], None]], ModelSpec]
    table: Callable[[ModelSpec], list[Entry]]           # the table of names
    skipped: Callable[[str, ModelSpec], bool]           # a stored tensor the class does not load as a parameter


# ----- GPT-2 ---------------------------------------------------------------------------------
_GPT2_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")
_GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for GELU's tanh approximation
_GPT2_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _gpt2_fits(m: ModelSpec) -> str | None:
    for option in ("norm", "pos", "ffn", "attention"):
        if getattr(m, option) != CHOICES[option][0]:
            return f"model.{option} = '{getattr(m, option)}' (it has {CHOICES[option][0]})"
    if m.n_kv_heads not in (0, m.n_heads):
        return f"model.n_kv_heads = {m.n_kv_heads} (it has n_heads key/value heads)"
    return None


def _gpt2_config(m: ModelSpec) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
            "n_positions": m.seq_len, "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
            "n_inner": m.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
            "initializer_range": m.init_std, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": m.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True}


def _gpt2_spec(get: Callable[[str, type], Any], note: Callable[[str], None]) -> ModelSpec:
    activation = get("activation_function", str)
    if activation not in _GPT2_GELU:
        raise GptcError(f"activation_function '{activation}' is not GELU's tanh approximation, which gptc builds "
                        f"({' or '.join(_GPT2_GELU)})")
    for key, want, what in (("scale_attn_weights", True, "attention without the 1/sqrt(head_dim) scale"),
                            ("scale_attn_by_inverse_layer_idx", False, "attention scaled by the inverse layer index"),
                            ("add_cross_attention", False, "cross attention")):
        if get(key, bool) != want:
            raise GptcError(f"{key} = {str(not want).lower()}: gptc does not build {what}")
    dropout = {key: get(key, float) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if any(dropout.values()):
        note(f"config.json's dropout ({', '.join(f'{k} {v:g}' for k, v in dropout.items())}) is not used: "
             "the run trains without dropout")
    n_embd, n_inner = get("n_embd", int), get("n_inner", int)
    return ModelSpec(vocab_size=get("vocab_size", int), seq_len=get("n_positions", int), d_model=n_embd,
                     n_layers=get("n_layer", int), n_heads=get("n_head", int),
                     d_ff=4 * n_embd if n_inner is None else n_inner, tie_embeddings=get("tie_word_embeddings", bool),
                     bias=True, lm_head_bias=False, init_std=get("initializer_range", float),
                     norm_eps=get("layer_norm_epsilon", float))


def _gpt2_table(m: ModelSpec) -> list[Entry]:
    names = ["wte", "wpe", *(f"h.{layer}.{p}" for layer in range(m.n_layers) for p in _GPT2_BLOCK),
             "ln_f.weight", "ln_f.bias"]
    table = [Entry(n, f"transformer.{n}.weight" if n in ("wte", "wpe") else f"transformer.{n}") for n in names]
    if not m.tie_embeddings:
        table.append(Entry("lm_head.weight", "lm_head.weight"))  # both (vocab, d_model)
    return table + [Entry("lm_head.bias", None)]


_GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                  "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
                  "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
                  "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                  "tie_word_embeddings": True}

GPT2 = Layout(architecture="GPT2LMHeadModel", model_type="gpt2", base="transformer.", heads=("lm_head.",),
              defaults=_GPT2_DEFAULTS, fits=_gpt2_fits, write_config=_gpt2_config, read_config=_gpt2_spec,
              table=_gpt2_table,
              skipped=lambda name, m: bool(_GPT2_BUFFER.fullmatch(name))
              or (m.tie_embeddings and name == "lm_head.weight"))


# ----- LLaMA ---------------------------------------------------------------------------------
_LLAMA_ACT = ("silu", "swish")  # transformers' names for x * sigmoid(x)
_LLAMA_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older versions saved it


def _llama_fits(m: ModelSpec) -> str | None:
    for option, want in (("norm", "rmsnorm"), ("pos", "rope"), ("ffn", "swiglu"), ("attention", "causal")):
        if getattr(m, option) != want:
            return f"model.{option} = '{getattr(m, option)}' (it has {want})"
    if m.rope_dims != m.head_dim:  # rope_fraction < 1, or an odd head_dim
        return (f"RoPE over {m.rope_dims} of {m.head_dim} head dimensions (model.rope_fraction = {m.rope_fraction:g}; "
                "it rotates all of an even head_dim)")
    return None


def _llama_config(m: ModelSpec) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
            "max_position_embeddings": m.seq_len, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_base, "rope_scaling": None, "attention_bias": m.bias and m.attn_bias,
            "mlp_bias": m.bias, "attention_dropout": 0.0, "initializer_range": m.init_std,
            "tie_word_embeddings": m.tie_embeddings, "pretraining_tp": 1,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True}


def _llama_rope_base(get: Callable[[str, type], Any]) -> float:
    """RoPE's base from rope_parameters (transformers 5) or rope_theta and rope_scaling
    (transformers 4); GptcError for scaled or partial RoPE."""
    rope = get("rope_parameters", dict) or get("rope_scaling", dict) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise GptcError(f"its RoPE has rope_type '{kind}'; gptc builds unscaled RoPE (rope_type 'default')")
    partial = rope.get("partial_rotary_factor", get("partial_rotary_factor", float))  # or top-level, as older configs
    if partial != 1.0:
        raise GptcError(f"partial_rotary_factor = {partial}: gptc's LLaMA layout rotates every head dimension")
    base = rope.get("rope_theta", get("rope_theta", float))
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base):
        raise GptcError(f"rope_theta must be {_KINDS[float]}, got {json.dumps(base)}")
    return float(base)


def _llama_spec(get: Callable[[str, type], Any], note: Callable[[str], None]) -> ModelSpec:
    activation = get("hidden_act", str)
    if activation not in _LLAMA_ACT:
        raise GptcError(f"hidden_act '{activation}' is not SiLU, which gptc's SwiGLU builds "
                        f"({' or '.join(_LLAMA_ACT)})")
    attention_bias, mlp_bias = get("attention_bias", bool), get("mlp_bias", bool)
    if attention_bias and not mlp_bias:  # gptc's attn_bias turns attention biases off, never the MLP's alone
        raise GptcError("attention_bias = true with mlp_bias = false: gptc has attention biases only together with "
                        "MLP biases (model.bias, model.attn_bias)")
    hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
    head_dim = get("head_dim", int)
    if head_dim is not None and heads > 0 and head_dim * heads != hidden:
        raise GptcError(f"head_dim = {head_dim} is not hidden_size / num_attention_heads ({hidden} / {heads}); "
                        "gptc's heads split d_model")
    if get("attention_dropout", float):
        note(f"config.json's attention_dropout ({get('attention_dropout', float):g}) is not used: the run "
             "trains without dropout")
    kv_heads = get("num_key_value_heads", int)
    return ModelSpec(vocab_size=get("vocab_size", int), seq_len=get("max_position_embeddings", int), d_model=hidden,
                     n_layers=get("num_hidden_layers", int), n_heads=heads,
                     n_kv_heads=0 if kv_heads in (None, heads) else kv_heads, d_ff=get("intermediate_size", int),
                     norm="rmsnorm", pos="rope", ffn="swiglu", rope_base=_llama_rope_base(get),
                     tie_embeddings=get("tie_word_embeddings", bool), bias=mlp_bias,
                     attn_bias=attention_bias if mlp_bias else ModelSpec.attn_bias,  # without biases: unused, default
                     lm_head_bias=False, init_std=get("initializer_range", float), norm_eps=get("rms_norm_eps", float))


def _llama_table(m: ModelSpec) -> list[Entry]:
    q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    attn_bias = m.bias and m.attn_bias

    def linear(gptc: str, parts: tuple[tuple[str, tuple[int, int] | None], ...], bias: bool) -> list[Entry]:
        """gptc's Linear `gptc` as the class's Linears `parts` (name, columns of gptc's)."""
        kinds = ("weight", "bias") if bias else ("weight",)  # a weight is stored (out, in), a bias as is
        return [Entry(f"{gptc}.{kind}", f"{hf}.{kind}", kind == "weight", columns)
                for kind in kinds for hf, columns in parts]

    table = [Entry("wte", "model.embed_tokens.weight")]
    for layer in range(m.n_layers):
        g, h = f"h.{layer}", f"model.layers.{layer}"
        table += [Entry(f"{g}.ln_1.weight", f"{h}.input_layernorm.weight"),
                  *linear(f"{g}.attn.c_attn", ((f"{h}.self_attn.q_proj", (0, q)),  # columns: q, k, v
                                               (f"{h}.self_attn.k_proj", (q, q + kv)),
                                               (f"{h}.self_attn.v_proj", (q + kv, q + 2 * kv))), attn_bias),
                  *linear(f"{g}.attn.c_proj", ((f"{h}.self_attn.o_proj", None),), attn_bias),
                  Entry(f"{g}.ln_2.weight", f"{h}.post_attention_layernorm.weight"),
                  *linear(f"{g}.mlp.c_fc", ((f"{h}.mlp.gate_proj", (0, m.d_ff)),  # SwiGLU's columns: gate, up
                                            (f"{h}.mlp.up_proj", (m.d_ff, 2 * m.d_ff))), m.bias),
                  *linear(f"{g}.mlp.c_proj", ((f"{h}.mlp.down_proj", None),), m.bias)]
    table.append(Entry("ln_f.weight", "model.norm.weight"))
    if not m.tie_embeddings:
        table.append(Entry("lm_head.weight", "lm_head.weight"))  # both (vocab, d_model)
    return table + [Entry("lm_head.bias", None)]


_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
                   "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
                   "rope_parameters": None, "partial_rotary_factor": 1.0, "attention_bias": False,
                   "attention_dropout": 0.0, "mlp_bias": False}

LLAMA = Layout(architecture="LlamaForCausalLM", model_type="llama", base="model.", heads=("lm_head.",),
               defaults=_LLAMA_DEFAULTS, fits=_llama_fits, write_config=_llama_config, read_config=_llama_spec,
               table=_llama_table,
               skipped=lambda name, m: bool(_LLAMA_BUFFER.fullmatch(name))
               or (m.tie_embeddings and name == "lm_head.weight"))
LAYOUTS = {layout.model_type: layout for layout in (GPT2, LLAMA)}


def layout_of(m: ModelSpec) -> Layout:
    """The layout a gptc model is exported with; GptcError when no class fits it."""
    reasons = []
    for layout in LAYOUTS.values():
        reason = layout.fits(m)
        if reason is None:
            return layout
        reasons.append(f"{layout.architecture} has no {reason}")
    raise GptcError(f"no transformers class gptc writes fits this model: {'; '.join(reasons)}")


def param_shapes(m: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of the gptc model `m`."""
    graph = build_graph(Spec(model=m), "infer", batch=1)
    return {name: tuple(graph.type(nid).shape) for name, nid in graph.params.items()}


# ----- export ----------------------------------------------------------------------------------
def to_hf(layout: Layout, m: ModelSpec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The class's tensors for gptc's parameters `params` of model `m`. A bias gptc's
    model lacks (model.bias = false) is written as zeros; a gptc tensor the class has no
    place for must be all zeros, else GptcError."""
    full = param_shapes(replace(m, bias=True, attn_bias=True))  # the model with every bias, as GPT-2 has them
    tensors = {}
    for entry in layout.table(m):
        value = params.get(entry.gptc)
        if entry.hf is None:
            if value is not None and np.any(value != 0):
                raise GptcError(f"its {entry.gptc} is not zero (largest |value| {float(np.abs(value).max()):.3g}) "
                                f"and {layout.architecture} has no such tensor (train with model.lm_head_bias = "
                                "false to export)")
            continue
        value = np.zeros(full[entry.gptc], np.float32) if value is None else value
        if entry.columns is not None:
            value = value[..., entry.columns[0]:entry.columns[1]]
        tensors[entry.hf] = np.ascontiguousarray(value.T if entry.transpose else value, dtype=np.float32)
    return tensors


def tokenizer_config(m: ModelSpec) -> dict:
    """tokenizer_config.json: transformers' fast tokenizer over tokenizer.json (no special tokens: gptc has none)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": m.seq_len,
            "clean_up_tokenization_spaces": False}


def check_export_dir(out: Path) -> None:
    """Refuse, before any work, an output directory that holds anything or cannot be made."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise GptcError(f"'{out}' exists and is not a directory; choose a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise GptcError(f"'{out}' is not empty; choose a new or empty directory")
    blocker = first_file_in(out.absolute().parent)
    if blocker is not None:
        raise GptcError(f"cannot create '{out}': '{blocker}' is a file")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GptcError(f"cannot create '{out}': no permission to write in '{parent}'")


def export_hf(path: str | os.PathLike, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """`gptc export PATH -o OUT --format hf`: the checkpoint PATH names (a checkpoint
    directory, or a run directory's newest) as a transformers model directory OUT:
    config.json, model.safetensors, tokenizer.json (the checkpoint's, as is) and
    tokenizer_config.json. OUT is written whole or not at all."""
    out = Path(out_dir)
    check_export_dir(out)
    checkpoint = load_checkpoint(find_checkpoint(path))
    m = checkpoint.spec.model
    layout = layout_of(m)
    graph = build_graph(checkpoint.spec, "infer", batch=1)
    check_tensors(checkpoint.params, graph.params, graph, MODEL_FILE, checkpoint.path)
    try:
        tensors = to_hf(layout, m, checkpoint.params)
    except GptcError as e:
        raise GptcError(f"cannot export '{checkpoint.path}': {e}") from None
    files = {CONFIG_FILE: json.dumps(layout.write_config(m), indent=2) + "\n",
             WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),  # transformers reads only "pt"-format files
             TOKENIZER_FILE: checkpoint.tokenizer_json,
             TOKENIZER_CONFIG_FILE: json.dumps(tokenizer_config(m), indent=2) + "\n"}
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out.absolute().parent, f".tmp-{out.name}-")
        try:
            for name, content in files.items():
                write_atomic(tmp / name, content)
            os.replace(tmp, out)  # onto nothing, or onto an empty directory
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise GptcError(f"cannot write '{out}': {e.strerror or e}") from None
    n_params = sum(t.size for t in tensors.values())
    log(f"exported {checkpoint.path} (step {checkpoint.step}) as {layout.architecture} to {out}: "
        f"{', '.join(files)} ({n_params:,} parameters)")
    log(f"load it with: transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return out


# ----- import ----------------------------------------------------------------------------------
@dataclass
class Pretrained:
    """A transformers model directory read as a gptc model."""
    path: Path
    layout: Layout
    model: ModelSpec
    params: dict[str, np.ndarray]
    tokenizer: Tokenizer

    def describe(self) -> str:
        m = self.model
        kv = f" ({m.kv_heads} key/value heads)" if m.kv_heads != m.n_heads else ""
        return (f"{self.layout.architecture}, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads{kv}, d_ff "
                f"{m.d_ff}, context {m.seq_len}, vocabulary {m.vocab_size}, "
                f"{'tied' if m.tie_embeddings else 'untied'} embeddings")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise GptcError(f"'{path}' is not valid JSON ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise GptcError(f"cannot read '{path}': {e.strerror}") from None


_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object"}


def _config_getter(config: dict, defaults: dict) -> Callable[[str, type], Any]:
    """get(key, kind): config.json's value for key (the class's default when absent) if
    it is of that kind (or null where the default is null), else GptcError."""
    def get(key: str, kind: type) -> Any:
        value = config.get(key, defaults[key])
        if value is None and defaults[key] is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind or (kind is float and not math.isfinite(value)):
            raise GptcError(f"{key} must be {_KINDS[kind]}, got {json.dumps(value)}")
        return value
    return get


def _read_config(d: Path, note: Callable[[str], None]) -> tuple[Layout, ModelSpec]:
    path = d / CONFIG_FILE
    if not path.is_file():
        raise GptcError(f"'{d}' is not a Hugging Face model directory: it has no {CONFIG_FILE}")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise GptcError(f"'{path}' is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        known = ", ".join(f"'{t}' ({layout.architecture})" for t, layout in LAYOUTS.items())
        raise GptcError(f"'{path}' has model_type {json.dumps(model_type)}; gptc reads {known} models")
    layout = LAYOUTS[model_type]
    try:
        m = layout.read_config(_config_getter(config, layout.defaults), note)
        validate(Spec(model=m))
    except SpecError as e:
        raise GptcError(f"'{path}' gives a model gptc cannot build: {e}") from None
    except GptcError as e:
        raise GptcError(f"'{path}': {e}") from None
    return layout, m


def _read_tokenizer(d: Path, m: ModelSpec) -> Tokenizer:
    path = d / TOKENIZER_FILE
    if not path.is_file():
        raise GptcError(f"'{d}' has no {TOKENIZER_FILE}, and gptc trains a pretrained model with its own "
                        f"tokenizer: save it there (a fast tokenizer's save_pretrained('{d}') writes {TOKENIZER_FILE})")
    try:
        tokenizer = Tokenizer.load(path)
    except ValueError as e:
        raise GptcError(f"cannot use the tokenizer of '{d}': {e}") from None
    except OSError as e:
        raise GptcError(f"cannot read '{path}': {e.strerror}") from None
    if tokenizer.vocab_size > m.vocab_size:
        raise GptcError(f"the tokenizer of '{d}' has {tokenizer.vocab_size:,} tokens, more than the model's "
                        f"vocab_size {m.vocab_size:,}")
    return tokenizer


def _weight_files(d: Path) -> list[Path]:
    if (d / WEIGHTS_FILE).is_file():
        return [d / WEIGHTS_FILE]
    if (d / WEIGHTS_INDEX).is_file():
        index = _read_json(d / WEIGHTS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) for f in weight_map.values())):
            raise GptcError(f"'{d / WEIGHTS_INDEX}' has no weight_map of tensor names to files")
        return [d / f for f in sorted(set(weight_map.values()))]
    other = next((f for f in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack") if (d / f).exists()), None)
    raise GptcError(f"'{d}' has no {WEIGHTS_FILE}" + (f" (gptc reads safetensors, not {other}; save the model with "
                                                      "save_pretrained, which writes safetensors)" if other else ""))


def _read_weights(d: Path, layout: Layout, m: ModelSpec) -> dict[str, np.ndarray]:
    """The stored tensors the class loads as parameters, as float32, under the class's
    names (a base model saved alone, whose names lack the `base` prefix, gets it)."""
    stored = []  # (file, name, dtype, value: None when the dtype is not read)
    for path in _weight_files(d):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    stored.append((path, key, dtype, f.get_tensor(key) if dtype in READ_DTYPES else None))
        except FileNotFoundError:
            raise GptcError(f"'{path}' is missing") from None
        except (SafetensorError, OSError) as e:
            raise GptcError(f"'{path}' is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    base_alone = not any(key.startswith(layout.base) for _, key, _, _ in stored)
    tensors = {}
    for path, key, dtype, value in stored:
        name = layout.base + key if base_alone and not key.startswith(layout.heads) else key
        if layout.skipped(name, m):
            continue
        if value is None:
            raise GptcError(f"tensor '{key}' of '{path}' is {dtype}; gptc reads {', '.join(READ_DTYPES)} weights "
                            "(save the model in float32: model.float().save_pretrained(DIR))")
        if not np.isfinite(value).all():
            raise GptcError(f"tensor '{key}' of '{path}' holds values that are not finite")
        tensors[name] = value.astype(np.float32, copy=False)
    return tensors


def from_hf(layout: Layout, m: ModelSpec, tensors: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """gptc's parameters of model `m` from the class's tensors; a tensor gptc has that
    the class lacks (the lm_head bias, when model.lm_head_bias) starts at zero."""
    shapes = param_shapes(m)
    table = layout.table(m)
    known = {e.hf for e in table if e.hf}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise GptcError(f"{where} hold a tensor {layout.architecture} has no place for: '{unknown[0]}'")
    params, parts = {}, {}  # parts: gptc's name -> the class's tensors of its columns, in order
    for entry in table:
        if entry.gptc not in shapes:  # a tensor neither has (lm_head.bias with lm_head_bias = false)
            continue
        shape = shapes[entry.gptc]
        if entry.hf is None:
            params[entry.gptc] = np.zeros(shape, np.float32)
            continue
        if entry.hf not in tensors:
            raise GptcError(f"{where} lack '{entry.hf}'")
        if entry.columns is not None:
            shape = (*shape[:-1], entry.columns[1] - entry.columns[0])
        value, want = tensors[entry.hf], shape[::-1] if entry.transpose else shape
        if value.shape != want:
            raise GptcError(f"{where}: '{entry.hf}' has shape {value.shape}, config.json's model needs {want}")
        parts.setdefault(entry.gptc, []).append(value.T if entry.transpose else value)
    for name, values in parts.items():
        params[name] = np.ascontiguousarray(np.concatenate(values, axis=-1))
    return params


def load_pretrained(path: str | os.PathLike, note: Callable[[str], None] = lambda text: None) -> Pretrained:
    """Read a transformers model directory (save_pretrained's) as a gptc model: the spec
    from config.json, the weights, and the tokenizer (tokenizer.json, required). Refuses
    in one line what gptc cannot build. `note(text)` hears what is not carried over."""
    d = Path(path)
    if not d.exists():
        raise GptcError(f"'{path}' does not exist")
    if not d.is_dir():
        raise GptcError(f"'{path}' is not a directory (give a Hugging Face model directory)")
    notes: list[str] = []
    layout, m = _read_config(d, notes.append)  # noted only once the whole directory is read
    tokenizer = _read_tokenizer(d, m)
    params = from_hf(layout, m, _read_weights(d, layout, m), f"the weights in '{d}'")
    for text in notes:
        note(text)
    return Pretrained(d, layout, m, params, tokenizer)
