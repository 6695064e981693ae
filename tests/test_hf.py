"""Hugging Face interop (gptc/tools/hf.py): `gptc export --format hf` gives transformers a
model (GPT2LMHeadModel or LlamaForCausalLM) with gptc's logits; `gptc train --init-from
HFDIR` starts from a transformers model's weights at its loss, trains, and resumes.
Models are random and built here: nothing is downloaded."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from gptc.compiler import dsl
from gptc.compiler.ir import Graph
from gptc.models import build_graph
from gptc.runtime.reference import ReferenceExecutor
from gptc.spec import GptcError, ModelSpec, Spec, TrainSpec
from gptc.tools import checkpoint as ckpt
from gptc.tools.cli import main
from gptc.tools.data import Batches, Part, Windows, split_parts
from gptc.tools.hf import GPT2, LLAMA, layout_of, load_pretrained
from gptc.tools.tokenizer import Tokenizer
from gptc.tools.train import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
VOCAB = 300
MODEL = ModelSpec(vocab_size=VOCAB, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=48, norm_eps=1e-6)
# LLaMA's layout: RMSNorm, RoPE (a base other than the default, so that a lost base shows), SwiGLU, no biases.
LLAMA_MODEL = replace(MODEL, norm="rmsnorm", pos="rope", ffn="swiglu", bias=False, rope_base=500.0)
SPECS = {"untied": MODEL, "tied": replace(MODEL, tie_embeddings=True), "no-bias": replace(MODEL, bias=False),
         "no-attn-bias": replace(MODEL, attn_bias=False),  # GPT2LMHeadModel gets zero attention biases
         "llama": LLAMA_MODEL, "llama-tied": replace(LLAMA_MODEL, tie_embeddings=True),
         "llama-biases": replace(LLAMA_MODEL, bias=True),  # attention_bias and mlp_bias
         "llama-mlp-bias": replace(LLAMA_MODEL, bias=True, attn_bias=False),
         "llama-gqa": replace(LLAMA_MODEL, n_heads=4, n_kv_heads=2)}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXT, VOCAB)


def gptc_run(run_dir: Path, m: ModelSpec, tokenizer: Tokenizer, seed: int = 0) -> ckpt.Checkpoint:
    """A run directory with one checkpoint of random weights (every parameter, biases and
    norms included; the lm_head bias zero, as GPT2LMHeadModel has none)."""
    spec = Spec(m, TrainSpec(batch_size=2))
    graph = build_graph(spec, "train")
    rng = np.random.default_rng(seed)
    params = {n: (rng.standard_normal(graph.type(nid).shape) * 0.5).astype(np.float32)
              for n, nid in graph.params.items()}
    if "lm_head.bias" in params:
        params["lm_head.bias"][:] = 0
    states = {n: np.zeros(graph.type(nid).shape, np.float32) for n, nid in graph.states.items()}
    path = ckpt.save_checkpoint(run_dir, 7, params, states, {}, spec, tokenizer.to_json())
    return ckpt.load_checkpoint(path)


def gptc_logits(spec: Spec, params: dict, tokens: np.ndarray) -> np.ndarray:
    graph = build_graph(spec, "infer", batch=tokens.shape[0], seq_len=tokens.shape[1])
    return ReferenceExecutor(graph, params, np.float64).run({"tokens": tokens})["logits"]


def hf_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens(batch: int, seq: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


# ----- export ----------------------------------------------------------------------------
# config.json's names for d_ff and the norm's epsilon (transformers maps the other sizes' names)
CONFIG_KEYS = {"gpt2": ("n_inner", "layer_norm_epsilon"), "llama": ("intermediate_size", "rms_norm_eps")}


@pytest.mark.parametrize("name", [*SPECS])
def test_export_gives_transformers_the_same_logits(name, tmp_path, tokenizer, capsys):
    m = SPECS[name]
    layout = layout_of(m)
    checkpoint = gptc_run(tmp_path / "run", m, tokenizer)
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "-o", str(out), "--format", "hf"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"exported {checkpoint.path} (step 7) as {layout.architecture} to {out}: config.json, "
                              "model.safetensors, tokenizer.json, tokenizer_config.json")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no temporary directory left
    assert (out / "tokenizer.json").read_text() == checkpoint.tokenizer_json  # as is

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == layout.architecture and next(model.parameters()).dtype == torch.float32
    config = model.config
    ffn_key, eps_key = CONFIG_KEYS[layout.model_type]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, getattr(config, ffn_key),
            config.max_position_embeddings, config.vocab_size) == (32, 2, m.n_heads, 48, 16, VOCAB)
    assert getattr(config, eps_key) == 1e-6 and config.tie_word_embeddings == m.tie_embeddings
    if layout is LLAMA:
        assert (config.num_key_value_heads, config.attention_bias, config.mlp_bias, config.hidden_act) == \
            (m.kv_heads, m.bias and m.attn_bias, m.bias, "silu")
    elif not m.bias:  # GPT2LMHeadModel's biases are zero
        assert not model.transformer.h[1].mlp.c_fc.bias.detach().numpy().any()
    for x in (tokens(2, 16), tokens(3, 5)):  # the whole context, and shorter sequences
        assert rel_err(hf_logits(model, x), gptc_logits(checkpoint.spec, checkpoint.params, x)) < 1e-5


def test_export_of_a_checkpoint_directory_and_into_an_empty_one(tmp_path, tokenizer):
    checkpoint = gptc_run(tmp_path / "run", MODEL, tokenizer)
    (tmp_path / "hf").mkdir()
    assert main(["export", str(checkpoint.path), "-o", str(tmp_path / "hf")]) == 0
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert np.array_equal(tensors["lm_head.weight"], checkpoint.params["lm_head.weight"])  # both (V, E)
    assert np.array_equal(tensors["transformer.h.1.attn.c_attn.weight"], checkpoint.params["h.1.attn.c_attn.weight"])


def test_llama_export_splits_c_attn_and_c_fc(tmp_path, tokenizer):
    """c_attn's columns are q, k, v and SwiGLU's c_fc's are gate, up; each Linear is (out, in)."""
    checkpoint = gptc_run(tmp_path / "run", SPECS["llama-biases"], tokenizer)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    tensors, p = load_file(tmp_path / "hf" / "model.safetensors"), checkpoint.params
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        columns = slice(32 * i, 32 * (i + 1))
        assert np.array_equal(tensors[f"{attn}.{part}.weight"], p["h.1.attn.c_attn.weight"][:, columns].T)
        assert np.array_equal(tensors[f"{attn}.{part}.bias"], p["h.1.attn.c_attn.bias"][columns])
    assert np.array_equal(tensors[f"{attn}.o_proj.weight"], p["h.1.attn.c_proj.weight"].T)
    assert np.array_equal(tensors[f"{mlp}.gate_proj.weight"], p["h.1.mlp.c_fc.weight"][:, :48].T)
    assert np.array_equal(tensors[f"{mlp}.up_proj.weight"], p["h.1.mlp.c_fc.weight"][:, 48:].T)
    assert np.array_equal(tensors[f"{mlp}.up_proj.bias"], p["h.1.mlp.c_fc.bias"][48:])
    assert np.array_equal(tensors[f"{mlp}.down_proj.weight"], p["h.1.mlp.c_proj.weight"].T)
    assert np.array_equal(tensors["model.layers.0.post_attention_layernorm.weight"], p["h.0.ln_2.weight"])
    assert np.array_equal(tensors["model.norm.weight"], p["ln_f.weight"])
    assert np.array_equal(tensors["model.embed_tokens.weight"], p["wte"])
    assert "lm_head.bias" not in tensors and len(tensors) == 1 + 2 * 16 + 2  # 16 a layer: 2 norms, 7 Linears


def test_rope_pairs_dimensions_as_transformers_rotate_half():
    """gptc's RoPE (dsl.rope) equals transformers' LLaMA RoPE on the same (B, H, S, D)
    tensor: dimension i pairs with i + D/2 (rotate_half), rotated by position * base^(-2i/D)."""
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 8)).astype(np.float32)
    positions = np.array([0, 1, 2, 5, 9, 10, 15], np.int32)
    g = Graph()
    g.output("y", dsl.rope(g.input("x", x.shape), g.input("pos", (7,), "i32"), 8, 500.0))
    ours = ReferenceExecutor(g, {}, np.float64).run({"x": x, "pos": positions})["y"]
    config = LlamaConfig(hidden_size=24, num_attention_heads=3, rope_theta=500.0)
    xt = torch.tensor(x)
    cos, sin = LlamaRotaryEmbedding(config)(xt, torch.tensor(positions, dtype=torch.long)[None].expand(2, 7))
    theirs, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    assert np.abs(ours - theirs.numpy()).max() < 1e-5  # transformers computes in float32


@pytest.mark.parametrize("model, message", [
    (replace(LLAMA_MODEL, rope_fraction=0.5), "GPT2LMHeadModel has no model.norm = 'rmsnorm' (it has layernorm); "
     "LlamaForCausalLM has no RoPE over 8 of 16 head dimensions (model.rope_fraction = 0.5; it rotates all of an "
     "even head_dim)"),
    (replace(LLAMA_MODEL, norm="layernorm"), "GPT2LMHeadModel has no model.pos = 'rope' (it has learned); "
     "LlamaForCausalLM has no model.norm = 'layernorm' (it has rmsnorm)"),
    (replace(MODEL, norm="rmsnorm"), "GPT2LMHeadModel has no model.norm = 'rmsnorm' (it has layernorm); "
     "LlamaForCausalLM has no model.pos = 'learned' (it has rope)"),
    (replace(LLAMA_MODEL, norm="scalenorm"), "LlamaForCausalLM has no model.norm = 'scalenorm' (it has rmsnorm)"),
    (replace(LLAMA_MODEL, ffn="moe"), "LlamaForCausalLM has no model.ffn = 'moe' (it has swiglu)"),
    (replace(LLAMA_MODEL, attention="local", window=4), "LlamaForCausalLM has no model.attention = 'local'"),
    (replace(LLAMA_MODEL, attention="linear"), "LlamaForCausalLM has no model.attention = 'linear'"),
    (replace(MODEL, pos="sinusoidal"), "GPT2LMHeadModel has no model.pos = 'sinusoidal' (it has learned)"),
    (replace(MODEL, n_heads=4, n_kv_heads=2), "GPT2LMHeadModel has no model.n_kv_heads = 2 (it has n_heads "
     "key/value heads)"),
], ids=["rope-fraction", "layernorm-rope", "rmsnorm-learned", "scalenorm", "moe", "local", "linear", "sinusoidal",
        "gpt2-gqa"])
def test_a_model_no_class_fits_is_refused_saying_what_does_not_map(model, message):
    with pytest.raises(GptcError) as e:
        layout_of(model)
    assert str(e.value).startswith("no transformers class gptc writes fits this model: ")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_dropout_is_a_training_choice_and_exports(tmp_path, tokenizer):
    """gptc's dropout is off at inference: it is no part of the function exported."""
    assert layout_of(replace(LLAMA_MODEL, dropout=0.1)) is LLAMA and layout_of(replace(MODEL, dropout=0.1)) is GPT2
    assert LLAMA.write_config(replace(LLAMA_MODEL, dropout=0.1))["attention_dropout"] == 0.0


def test_an_export_no_class_fits_is_refused_before_writing(tmp_path, tokenizer, capsys):
    gptc_run(tmp_path / "run", replace(LLAMA_MODEL, rope_fraction=0.5), tokenizer)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptc: error: no transformers class gptc writes fits this model: ") and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("name", ["untied", "llama-biases"])
def test_a_lm_head_bias_is_refused(name, tmp_path, tokenizer, capsys):
    """Neither class's lm_head has a bias: a gptc model whose lm_head bias is not zero
    has no exact GPT2LMHeadModel or LlamaForCausalLM, and is refused (nothing written)."""
    checkpoint = gptc_run(tmp_path / "run", SPECS[name], tokenizer)
    params = {**checkpoint.params, "lm_head.bias": np.full(VOCAB, 0.25, np.float32)}
    ckpt.save_checkpoint(tmp_path / "run", 8, params, checkpoint.optimizer, {}, checkpoint.spec,
                         checkpoint.tokenizer_json)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"gptc: error: cannot export '{tmp_path / 'run' / 'checkpoints' / 'step-000008'}': its lm_head.bias is not "
        f"zero (largest |value| 0.25) and {layout_of(SPECS[name]).architecture} has no such tensor (train with "
        "model.lm_head_bias = "
        "false to export)\n")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_the_exported_tokenizer_loads_in_transformers(tmp_path, tokenizer):
    gptc_run(tmp_path / "run", MODEL, tokenizer)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = TEXT[:2000]
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text).tolist()
    assert hf_tokenizer.decode(ids) == text
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(text).ids == ids


def hub_style(tokenizer: Tokenizer) -> str:
    """gptc's tokenizer.json shaped as GPT-2's on the Hub: <|endoftext|> as the last id
    (a special added token) and a ByteLevel post-processor."""
    obj = json.loads(tokenizer.to_json())
    end = tokenizer.vocab_size
    obj["model"]["vocab"]["<|endoftext|>"] = end
    obj["added_tokens"] = [{"id": end, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": True, "special": True}]
    obj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return json.dumps(obj)


def test_a_hub_style_tokenizer_json_starts_a_run(tmp_path, tokenizer):
    """A model directory whose tokenizer.json is shaped as the Hub's GPT-2 one (special
    token, post-processor) is read, and encodes as transformers does."""
    hf_model(tmp_path / "hf", tokenizer, "llama", vocab_size=VOCAB + 1)
    (tmp_path / "hf" / "tokenizer.json").write_text(hub_style(tokenizer))
    pretrained = load_pretrained(tmp_path / "hf")
    text = TEXT[:500] + "<|endoftext|>" + TEXT[500:1000]
    ids = pretrained.tokenizer.encode(text).tolist()
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert pretrained.tokenizer.vocab_size == VOCAB + 1 and VOCAB in ids
    assert ids == hf_tokenizer(text)["input_ids"] and pretrained.tokenizer.decode(ids) == text


# ----- init-from -----------------------------------------------------------------------------
def hf_model(directory: Path, tokenizer: Tokenizer, family: str = "gpt2", tie: bool = True, seed: int = 0,
             **config) -> torch.nn.Module:
    """A random transformers GPT-2 or LLaMA (d_ff 128) saved by save_pretrained, with a
    tokenizer.json gptc reads; `config` overrides the class's config."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "tie_word_embeddings": tie, "bos_token_id": None, "eos_token_id": None}
    if family == "gpt2":
        hf_config = GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16, **common, **config})
    else:
        hf_config = LlamaConfig(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "intermediate_size": 128, "max_position_embeddings": 16, **common, **config})
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    model.save_pretrained(directory)
    tokenizer.save(directory / "tokenizer.json")
    return model


# LLaMA's weights at a larger init, so that attention (and RoPE's rotation) is far from uniform
INIT_CASES = {"gpt2-tied": ("gpt2", True, {}), "gpt2-untied": ("gpt2", False, {}),
              "llama-tied": ("llama", True, {"initializer_range": 0.3, "rope_theta": 500.0}),
              "llama-untied": ("llama", False, {"initializer_range": 0.3}),
              "llama-biases": ("llama", False, {"initializer_range": 0.3, "attention_bias": True, "mlp_bias": True}),
              "llama-mlp-bias": ("llama", False, {"initializer_range": 0.3, "mlp_bias": True}),
              # 4 query heads on 2 key/value heads: head h reads key/value head h // 2 (transformers' repeat_kv)
              "llama-gqa": ("llama", False, {"initializer_range": 0.3, "num_attention_heads": 4,
                                             "num_key_value_heads": 2})}


@pytest.mark.parametrize("case", [*INIT_CASES])
def test_init_from_reads_the_weights_exactly(case, tmp_path, tokenizer):
    family, tie, config = INIT_CASES[case]
    model = hf_model(tmp_path / "hf", tokenizer, family, tie, **config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    pretrained = load_pretrained(tmp_path / "hf")
    m = pretrained.model
    assert (pretrained.layout.model_type, m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.d_ff, m.seq_len,
            m.vocab_size, m.tie_embeddings) == \
        (family, 32, 2, config.get("num_attention_heads", 2), config.get("num_key_value_heads", 2), 128, 16, VOCAB,
         tie)
    assert m.bias == (family == "gpt2" or config.get("mlp_bias", False))
    assert "lm_head.bias" not in pretrained.params and not m.lm_head_bias  # neither class has one: it exports back
    if family == "llama":
        assert m.rope_base == config.get("rope_theta", 10000.0) and (m.norm, m.pos, m.ffn) == ("rmsnorm", "rope",
                                                                                               "swiglu")
    # every tensor the class loads is one of gptc's (or a column range of one), unchanged
    table = [e for e in pretrained.layout.table(m) if e.hf is not None]
    assert sorted(e.hf for e in table) == sorted(k for k in state if not pretrained.layout.skipped(k, m))
    for e in table:
        value = pretrained.params[e.gptc][..., slice(*e.columns) if e.columns else slice(None)]
        assert np.array_equal(value.T if e.transpose else value, state[e.hf]), e.hf
    assert pretrained.tokenizer == tokenizer
    x = tokens(2, 16)
    assert rel_err(hf_logits(model, x), gptc_logits(Spec(model=m), pretrained.params, x)) < 1e-5


# buffers older transformers saved, by layer, under the base model's names
BUFFERS = {"gpt2": {"h.{}.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.uint8)),
                    "h.{}.attn.masked_bias": np.array(-1e4, np.float32)},
           "llama": {"layers.{}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}}


@pytest.mark.parametrize("family", BUFFERS)
def test_init_from_skips_stored_buffers_and_reads_base_model_names(family, tmp_path, tokenizer):
    """Older transformers saved each layer's causal mask (GPT-2's attn.bias and
    attn.masked_bias, LLaMA's rotary_emb.inv_freq), and a base model's names lack
    `transformer.` or `model.`; float16 weights are read as float32."""
    hf_model(tmp_path / "hf", tokenizer, family)
    weights = tmp_path / "hf" / "model.safetensors"
    stored = load_file(weights)
    layout = GPT2 if family == "gpt2" else LLAMA
    base = {k.removeprefix(layout.base): v.astype(np.float16) for k, v in stored.items()}
    base.update({name.format(layer): value for name, value in BUFFERS[family].items() for layer in range(2)})
    save_file(base, weights, metadata={"format": "pt"})
    pretrained = load_pretrained(tmp_path / "hf")
    ln_1 = next(e.hf for e in layout.table(pretrained.model) if e.gptc == "h.0.ln_1.weight")
    assert np.array_equal(pretrained.params["h.0.ln_1.weight"], stored[ln_1].astype(np.float16))
    assert pretrained.params["h.0.attn.c_attn.weight"].dtype == np.float32


@pytest.mark.parametrize("edit, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not SiLU, which gptc's SwiGLU builds (silu or swish)"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "its RoPE has rope_type 'linear'; gptc builds unscaled RoPE (rope_type 'default')"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "its RoPE has rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor = 0.5: gptc's LLaMA layout rotates every head dimension"),
    ({"partial_rotary_factor": 0.25}, "partial_rotary_factor = 0.25: gptc's LLaMA layout rotates every head"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias = true with mlp_bias = false: gptc has attention "
     "biases only together with MLP biases"),
    ({"head_dim": 8}, "head_dim = 8 is not hidden_size / num_attention_heads (32 / 2)"),
    ({"num_key_value_heads": 3}, "gives a model gptc cannot build: model.n_kv_heads (3) must divide model.n_heads (2)"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a finite number, got \"1e-6\""),
], ids=["act", "rope-linear", "rope-scaling-legacy", "partial-rope", "partial-rope-top-level",
        "attention-bias-alone", "head-dim", "kv-heads", "eps-type"])
def test_init_from_refuses_a_llama_gptc_cannot_build(edit, message, tmp_path, tokenizer):
    hf_model(tmp_path / "hf", tokenizer, "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(GptcError) as e:
        load_pretrained(tmp_path / "hf")
    assert str(e.value).startswith(f"'{tmp_path / 'hf' / 'config.json'}'") and message in str(e.value)


def test_init_from_reads_a_transformers_4_llama_config(tmp_path, tokenizer):
    """transformers 4 wrote rope_theta and rope_scaling, 5 writes rope_parameters; a
    dropout in config.json is noted, not used."""
    hf_model(tmp_path / "hf", tokenizer, "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=500, rope_scaling=None, attention_dropout=0.1)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    notes = []
    assert load_pretrained(tmp_path / "hf", notes.append).model.rope_base == 500.0
    assert notes == ["config.json's attention_dropout (0.1) is not used: the run trains without dropout"]


def test_init_from_reads_sharded_weights(tmp_path, tokenizer):
    """save_pretrained splits a large model into shards listed in model.safetensors.index.json."""
    model = hf_model(tmp_path / "whole", tokenizer, tie=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tokenizer.save(tmp_path / "sharded" / "tokenizer.json")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    whole, sharded = load_pretrained(tmp_path / "whole"), load_pretrained(tmp_path / "sharded")
    assert sharded.params.keys() == whole.params.keys()
    assert all(np.array_equal(sharded.params[k], whole.params[k]) for k in whole.params)


@pytest.mark.parametrize("name", ["no-bias", "llama", "llama-biases", "llama-mlp-bias", "llama-gqa"])
def test_export_then_init_from_is_the_same_model(name, tmp_path, tokenizer):
    m = SPECS[name]
    checkpoint = gptc_run(tmp_path / "run", m, tokenizer)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    pretrained = load_pretrained(tmp_path / "hf")
    # GPT-2's missing biases come back as zeros; neither class has the lm_head bias (gptc_run's is zero)
    assert pretrained.model == replace(m, lm_head_bias=False, bias=m.bias or layout_of(m) is GPT2)
    assert set(checkpoint.params) - set(pretrained.params) <= {"lm_head.bias"}
    for name, value in pretrained.params.items():
        assert np.array_equal(value, checkpoint.params.get(name, np.zeros_like(value))), name


def write_text(path: Path) -> Path:
    path.write_text(TEXT, encoding="utf-8")
    return path


def first_batch(tokenizer: Tokenizer, batch: int, seq: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's first batch on TEXT: the same split and seeded windows."""
    train_part, _ = split_parts([Part("the corpus", tokenizer.encode(TEXT))], 0.1)
    return Batches(Windows(train_part, seq, tokenizer.vocab_size, "training split"), batch, seed).next()


def first_batch_loss(model: torch.nn.Module, tokenizer: Tokenizer, batch: int, seq: int, seed: int) -> float:
    """transformers' loss on the trainer's first batch (the same split and seeded windows)."""
    x, y = first_batch(tokenizer, batch, seq, seed)
    with torch.no_grad():
        logits = model(torch.tensor(x, dtype=torch.long)).logits
    return float(F.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(y, dtype=torch.long).reshape(-1)))


TRAIN_CASES = {"gpt2": ("gpt2", {}, "GPT2LMHeadModel, d_model 32, 2 layers, 2 heads"),
               "llama": ("llama", {}, "LlamaForCausalLM, d_model 32, 2 layers, 2 heads"),
               "llama-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2},
                             "LlamaForCausalLM, d_model 32, 2 layers, 4 heads (2 key/value heads)")}


@pytest.mark.parametrize("case", [*TRAIN_CASES])
def test_train_init_from_starts_at_the_models_loss_and_trains(case, tmp_path, tokenizer, capsys, monkeypatch):
    family, config, described = TRAIN_CASES[case]
    monkeypatch.chdir(tmp_path)
    model = hf_model(tmp_path / "hf", tokenizer, family, **config)
    data = write_text(tmp_path / "data.txt")
    (tmp_path / "train.toml").write_text("[train]\nbatch_size = 4\nlr = 1e-2\nwarmup = 0\nseed = 5\n")
    assert main(["train", "train.toml", "--init-from", "hf", "--device", "cpu", "--steps", "3", "--data", str(data),
                 "--out", "run"]) == 0
    out = capsys.readouterr().out
    if family == "gpt2":
        assert "note: config.json's dropout (resid_pdrop 0.1, embd_pdrop 0.1, attn_pdrop 0.1) is not used" in out
    assert f"init: hf: {described}, d_ff 128, context 16, vocabulary 300, tied embeddings" in out
    assert "(BPE vocabulary 300 of the pretrained model's tokenizer, " in out  # tokenized, or cached by another case

    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    hf_loss = first_batch_loss(model, tokenizer, 4, 16, 5)
    assert abs(losses[0] - hf_loss) <= 1e-5 * hf_loss  # the first step's loss is the model's, before any update
    trained = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path / "run"))
    assert trained.step == 3 and trained.spec.train.lr == 1e-2 and trained.spec.model.d_ff == 128
    assert trained.tokenizer_json == tokenizer.to_json()
    eval_spec = replace(trained.spec, train=replace(trained.spec.train, batch_size=4))
    x, y = first_batch(tokenizer, 4, 16, 5)
    after = ReferenceExecutor(build_graph(eval_spec, "eval"), trained.params).run({"tokens": x, "targets": y})["loss"]
    assert float(after) < hf_loss - 0.1  # three AdamW steps at lr 1e-2 lower the loss

    # the fine-tuned model has no lm_head bias (neither class has one), so it exports back exactly
    assert main(["export", "run", "-o", "back"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(model)
    probe = tokens(2, 16)
    assert rel_err(hf_logits(back, probe), gptc_logits(trained.spec, trained.params, probe)) < 1e-5


def test_a_run_started_from_a_pretrained_model_resumes_exactly(tmp_path, tokenizer, monkeypatch, capsys):
    """Resuming uses the checkpoint's copy of the model's tokenizer (not one trained on the data)."""
    monkeypatch.chdir(tmp_path)
    hf_model(tmp_path / "hf", tokenizer, tie=False)
    data = str(write_text(tmp_path / "data.txt"))
    common = ["--device", "cpu", "--data", data, "--batch", "2"]
    assert main(["train", "--init-from", "hf", "--steps", "3", "--out", "whole", *common]) == 0
    assert main(["train", "--init-from", "hf", "--steps", "2", "--out", "parts", *common]) == 0
    assert main(["train", "--resume", "parts", "--steps", "3", "--device", "cpu"]) == 0
    losses = [[r["loss"] for r in read_metrics(tmp_path / run)] for run in ("parts", "whole")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    state = json.loads((tmp_path / "parts" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["init_from"] == str(tmp_path / "hf")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", "parts", "--prompt", "gptc", "--num-tokens", "3", "--device", "cpu",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("gptc")
