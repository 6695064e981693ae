"""Hugging Face interop (gptc/tools/hf.py): `gptc export --format hf` gives transformers a
model with gptc's logits; `gptc train --init-from HFDIR` starts from a transformers
model's weights at its loss, trains, and resumes. Models are random and built here:
nothing is downloaded."""
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
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from gptc.models import build_graph
from gptc.runtime.reference import ReferenceExecutor
from gptc.spec import ModelSpec, Spec, TrainSpec
from gptc.tools import checkpoint as ckpt
from gptc.tools.cli import main
from gptc.tools.data import Batches, Part, Windows, split_parts
from gptc.tools.hf import load_pretrained
from gptc.tools.tokenizer import Tokenizer
from gptc.tools.train import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
VOCAB = 300
MODEL = ModelSpec(vocab_size=VOCAB, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=48, norm_eps=1e-6)
SPECS = {"untied": MODEL, "tied": replace(MODEL, tie_embeddings=True), "no-bias": replace(MODEL, bias=False)}


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
@pytest.mark.parametrize("name", SPECS)
def test_export_gives_transformers_the_same_logits(name, tmp_path, tokenizer, capsys):
    m = SPECS[name]
    checkpoint = gptc_run(tmp_path / "run", m, tokenizer)
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "-o", str(out), "--format", "hf"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"exported {checkpoint.path} (step 7) as GPT2LMHeadModel to {out}: config.json, "
                              "model.safetensors, tokenizer.json, tokenizer_config.json")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no temporary directory left
    assert (out / "tokenizer.json").read_text() == checkpoint.tokenizer_json  # as is

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is GPT2LMHeadModel and next(model.parameters()).dtype == torch.float32
    config = model.config
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner, config.n_positions, config.vocab_size) == \
        (32, 2, 2, 48, 16, VOCAB)
    assert config.layer_norm_epsilon == 1e-6 and config.tie_word_embeddings == m.tie_embeddings
    if not m.bias:  # GPT2LMHeadModel's biases are zero
        assert not model.transformer.h[1].mlp.c_fc.bias.detach().numpy().any()
    for x in (tokens(2, 16), tokens(3, 5)):  # the whole context, and shorter sequences
        assert rel_err(hf_logits(model, x), gptc_logits(checkpoint.spec, checkpoint.params, x)) < 1e-5


def test_export_of_a_checkpoint_directory_and_into_an_empty_one(tmp_path, tokenizer):
    checkpoint = gptc_run(tmp_path / "run", MODEL, tokenizer)
    (tmp_path / "hf").mkdir()
    assert main(["export", str(checkpoint.path), "-o", str(tmp_path / "hf")]) == 0
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert np.array_equal(tensors["lm_head.weight"], checkpoint.params["lm_head.weight"].T)
    assert np.array_equal(tensors["transformer.h.1.attn.c_attn.weight"], checkpoint.params["h.1.attn.c_attn.weight"])


def test_a_lm_head_bias_is_refused(tmp_path, tokenizer, capsys):
    """GPT2LMHeadModel's lm_head has no bias: a gptc model whose lm_head bias is not zero
    has no exact GPT2LMHeadModel, and is refused (nothing written)."""
    checkpoint = gptc_run(tmp_path / "run", MODEL, tokenizer)
    params = {**checkpoint.params, "lm_head.bias": np.full(VOCAB, 0.25, np.float32)}
    ckpt.save_checkpoint(tmp_path / "run", 8, params, checkpoint.optimizer, {}, checkpoint.spec,
                         checkpoint.tokenizer_json)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"gptc: error: cannot export '{tmp_path / 'run' / 'checkpoints' / 'step-000008'}': its lm_head.bias is not "
        "zero (largest |value| 0.25) and GPT2LMHeadModel has no such tensor (train with model.lm_head_bias = "
        "false to export)\n")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def _gptc_tokenizer_is_a_tokenizers_file() -> bool:
    try:
        tokenizers.Tokenizer.from_str(Tokenizer.train("a tokenizer, trained", 260).to_json())
    except Exception:  # the tokenizers package raises its own exception types
        return False
    return True


@pytest.mark.xfail(not _gptc_tokenizer_is_a_tokenizers_file(), strict=True,
                   reason="WAITS FOR THE TOKENIZER CHANGE: gptc's tokenizer.json is not yet a Hugging Face "
                          "`tokenizers` file (another branch converts it); the export writes it as is")
def test_the_exported_tokenizer_loads_in_transformers(tmp_path, tokenizer):
    gptc_run(tmp_path / "run", MODEL, tokenizer)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = TEXT[:2000]
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text).tolist()
    assert hf_tokenizer.decode(ids) == text


# ----- init-from -----------------------------------------------------------------------------
def hf_model(directory: Path, tokenizer: Tokenizer, tie: bool = True, seed: int = 0) -> GPT2LMHeadModel:
    """A random transformers GPT-2 saved by save_pretrained, with a tokenizer.json gptc reads."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16, tie_word_embeddings=tie,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save(directory / "tokenizer.json")
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_init_from_reads_the_weights_exactly(tie, tmp_path, tokenizer):
    model = hf_model(tmp_path / "hf", tokenizer, tie)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    pretrained = load_pretrained(tmp_path / "hf")
    m = pretrained.model
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.seq_len, m.vocab_size, m.tie_embeddings, m.bias) == \
        (32, 2, 2, 128, 16, VOCAB, tie, True)
    assert np.array_equal(pretrained.params["h.1.attn.c_attn.weight"], state["transformer.h.1.attn.c_attn.weight"])
    assert np.array_equal(pretrained.params["wte"], state["transformer.wte.weight"])
    assert "lm_head.bias" not in pretrained.params and not m.lm_head_bias  # GPT-2 has none: it exports back
    if not tie:
        assert np.array_equal(pretrained.params["lm_head.weight"], state["lm_head.weight"].T)
    assert pretrained.tokenizer == tokenizer
    x = tokens(2, 16)
    assert rel_err(hf_logits(model, x), gptc_logits(Spec(model=m), pretrained.params, x)) < 1e-5


def test_init_from_skips_stored_buffers_and_reads_base_model_names(tmp_path, tokenizer):
    """Older transformers saved each layer's causal mask (attn.bias) and attn.masked_bias,
    and a GPT2Model's names lack `transformer.`; float16 weights are read as float32."""
    hf_model(tmp_path / "hf", tokenizer)
    weights = tmp_path / "hf" / "model.safetensors"
    stored = load_file(weights)
    base = {k.removeprefix("transformer."): v.astype(np.float16) for k, v in stored.items()}
    for layer in range(2):
        base[f"h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.uint8))
        base[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(base, weights, metadata={"format": "pt"})
    pretrained = load_pretrained(tmp_path / "hf")
    assert np.array_equal(pretrained.params["h.0.ln_1.bias"], stored["transformer.h.0.ln_1.bias"].astype(np.float16))
    assert "h.0.attn.bias" not in pretrained.params and pretrained.params["h.0.attn.c_attn.bias"].dtype == np.float32


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


def test_export_then_init_from_is_the_same_model(tmp_path, tokenizer):
    checkpoint = gptc_run(tmp_path / "run", SPECS["no-bias"], tokenizer)
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    pretrained = load_pretrained(tmp_path / "hf")
    assert pretrained.model == replace(checkpoint.spec.model, bias=True, lm_head_bias=False)  # the biases are zeros
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


def test_train_init_from_starts_at_the_models_loss_and_trains(tmp_path, tokenizer, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = hf_model(tmp_path / "hf", tokenizer)
    data = write_text(tmp_path / "data.txt")
    (tmp_path / "train.toml").write_text("[train]\nbatch_size = 4\nlr = 1e-2\nwarmup = 0\nseed = 5\n")
    assert main(["train", "train.toml", "--init-from", "hf", "--device", "cpu", "--steps", "3", "--data", str(data),
                 "--out", "run"]) == 0
    out = capsys.readouterr().out
    assert "note: config.json's dropout (resid_pdrop 0.1, embd_pdrop 0.1, attn_pdrop 0.1) is not used" in out
    assert "init: hf: GPT2LMHeadModel, d_model 32, 2 layers, 2 heads, d_ff 128, context 16, vocabulary 300, " \
           "tied embeddings" in out
    assert "(BPE vocabulary 300 of the pretrained model's tokenizer, tokenized in " in out

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

    # the fine-tuned model has no lm_head bias (GPT-2 has none), so it exports back exactly
    assert main(["export", "run", "-o", "back"]) == 0
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
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
