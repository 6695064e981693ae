"""Every argument of every `gptc` subcommand at its edges, and every file gptc reads,
broken in every way: one table, one row per case.

A row is the argv, the exit status and a piece of the one-line error. Each row runs
`gptc` in-process in an empty working directory and checks: that status, stderr is
exactly one line `gptc: error: ...` holding the piece, no traceback, and nothing
written or changed anywhere (the working directory, the files the row reads, the run
it names). Arguments must be refused before any expensive work, so the whole table
takes seconds. test_every_argument_has_a_row walks the argparse parser and fails when
an argument (a new option, say) has no row.

Placeholders in argv and errors: {data} a small UTF-8 text, {run} a finished tiny run (2 steps;
{ckpt} its checkpoint), {tmp} the row's own directory, where `files` (name -> bytes)
are written and `prepare(tmp, run)` may build damaged copies of the run."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import llmc_datafile
from gptc.tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads files whatever their mode


@dataclass
class Row:
    covers: str                      # "command argument", e.g. "train --lr" or "train spec"
    argv: list[str]
    error: str                       # a piece of the one-line error
    code: int = 2
    files: dict[str, bytes] = field(default_factory=dict)
    prepare: Callable[[Path, Path], None] | None = None
    marks: tuple = ()

    @property
    def id(self) -> str:
        return " ".join(self.argv)[:90]


def copy_run(name: str, damage: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    """A `prepare` that copies the finished run to {tmp}/name and damages its checkpoint."""
    def prepare(tmp: Path, run: Path) -> None:
        shutil.copytree(run, tmp / name)
        if damage is not None:
            damage(tmp / name / "checkpoints" / "step-000002")
    return prepare


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_bytes(data)


def truncate(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_bytes((ckpt / name).read_bytes()[:-7])


def no_permission(name: str) -> Callable[[Path], None]:
    return lambda ckpt: os.chmod(ckpt / name, 0)


def without_wpe(tmp: Path, run: Path) -> None:
    """A checkpoint whose checksums hold but whose tensors do not fit its spec."""
    from gptc.tools import checkpoint as ckpt
    c = ckpt.load_checkpoint(run / "checkpoints" / "step-000002")
    params = {k: v for k, v in c.params.items() if k != "wpe"}
    ckpt.save_checkpoint(tmp / "other", c.step, params, c.optimizer, c.rng_state, c.spec, c.tokenizer_json)


def edit_state(**changes) -> Callable[[Path], None]:
    """Damage a checkpoint's state.json (not covered by its checksums) with valid JSON of the wrong content."""
    def damage(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, **changes}))
    return damage


def older_copy(ckpt: Path) -> None:
    """Make the run's only checkpoint look like the second of two (step-000001 older)."""
    shutil.copytree(ckpt, ckpt.with_name("step-000001"))


HF_CONFIG = {"model_type": "gpt2", "vocab_size": 300, "n_positions": 16, "n_embd": 32, "n_layer": 1, "n_head": 2}


def hf_dir(config: dict | None = None, edit: Callable[[dict], None] | None = None, tokenizer: bool = True,
           bf16: bool = False) -> Callable[[Path, Path], None]:
    """A `prepare` that writes {tmp}/hf, a tiny GPT-2 in the layout transformers' save_pretrained
    writes (config.json, model.safetensors; tokenizer.json: the finished run's, 256 tokens),
    changed: config.json's keys updated with `config`, the tensors by `edit(tensors)`."""
    def prepare(tmp: Path, run: Path) -> None:
        from safetensors.numpy import save_file
        d = tmp / "hf"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**HF_CONFIG, **(config or {})}))
        e, shapes = 32, {"wte.weight": (300, 32), "wpe.weight": (16, 32), "ln_f.weight": (32,), "ln_f.bias": (32,)}
        for name, shape in (("ln_1.weight", (e,)), ("ln_1.bias", (e,)), ("attn.c_attn.weight", (e, 3 * e)),
                            ("attn.c_attn.bias", (3 * e,)), ("attn.c_proj.weight", (e, e)), ("attn.c_proj.bias", (e,)),
                            ("ln_2.weight", (e,)), ("ln_2.bias", (e,)), ("mlp.c_fc.weight", (e, 4 * e)),
                            ("mlp.c_fc.bias", (4 * e,)), ("mlp.c_proj.weight", (4 * e, e)), ("mlp.c_proj.bias", (e,))):
            shapes[f"h.0.{name}"] = shape
        tensors = {f"transformer.{k}": np.full(s, 0.01, np.float32) for k, s in shapes.items()}
        if edit is not None:
            edit(tensors)
        if bf16:
            import torch
            from safetensors.torch import save_file as save_torch
            save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()},
                       str(d / "model.safetensors"), metadata={"format": "pt"})
        else:
            save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        if tokenizer:
            shutil.copy(run / "tokenizer.json", d / "tokenizer.json")
    return prepare


def hf_files(files: dict[str, bytes | None]) -> Callable[[Path, Path], None]:
    """hf_dir() with some of its files replaced (None: removed)."""
    def prepare(tmp: Path, run: Path) -> None:
        hf_dir()(tmp, run)
        for name, content in files.items():
            if content is None:
                (tmp / "hf" / name).unlink()
            else:
                (tmp / "hf" / name).write_bytes(content)
    return prepare


TOKENS = list(range(256)) * 8  # 2,048 tokens of the finished run's byte vocabulary


def prepared(vocab_size: int | None = None, damage: Callable[[Path], None] | None = None
             ) -> Callable[[Path, Path], None]:
    """A `prepare` that runs gptc prepare on the README into {tmp}/p (with the finished run's
    tokenizer, or a BPE of vocab_size trained on it), then damages it."""
    def make(tmp: Path, run: Path) -> None:
        from gptc.tools.prepare import prepare
        (tmp / "text.txt").write_text((ROOT / "README.md").read_text())
        prepare([str(tmp / "text.txt")], tmp / "p", vocab_size=vocab_size,
                tokenizer=None if vocab_size else run / "tokenizer.json", jobs=1, stdout=io.StringIO())
        if damage is not None:
            damage(tmp / "p")
    return make


def other_tokenizer(tmp: Path, run: Path) -> None:
    from gptc.tools.tokenizer import Tokenizer
    (tmp / "t.json").write_text(Tokenizer.train("ab ab ab ab", 257, at_most=True).to_json())


def edit_manifest(p: Path) -> None:
    manifest = json.loads((p / "prepare.json").read_text())
    manifest["shards"][1]["tokens"] += 1
    (p / "prepare.json").write_text(json.dumps(manifest))


NEEDS_NON_ROOT = (pytest.mark.skipif(ROOT_USER, reason="root reads files whatever their permissions"),)
TRAIN = ["train", "--preset", "tiny", "--device", "cpu", "--data", "{data}"]
GENERATE = ["generate", "--checkpoint", "{run}", "--prompt", "x", "--device", "cpu"]
INIT = ["train", "--device", "cpu", "--data", "{data}", "--init-from"]
EXPORT = ["export", "{run}", "-o", "{tmp}/hf"]
SPEC_FILES = {"bad.toml": b"[model\nd_model = 3", "binary.toml": b"\x00\xff\xfe" * 50,
              "wrong.toml": b"[model]\nd_model = 'wide'\n", "inf.toml": b"[train]\nlr = inf\n",
              "unknown.toml": b"[model]\nd_modle = 64\n", "seed.toml": b"preset = 'tiny'\n[train]\nseed = -1\n",
              "list.toml": b"preset = ['tiny']\n"}
NOT_UTF8 = b"a\xff".decode("utf-8", "surrogateescape")  # how Python passes bytes that are not UTF-8 in argv

ROWS = [
    # ---- gptc ------------------------------------------------------------------------------
    Row("gptc command", [], "the following arguments are required: command"),
    Row("gptc command", ["fly"], "invalid choice: 'fly'"),

    # ---- train -------------------------------------------------------------------------------
    Row("train spec", ["train", "{tmp}/none.toml", "--device", "cpu"], "spec file '{tmp}/none.toml' does not exist"),
    Row("train spec", ["train", "{tmp}/bad.toml", "--device", "cpu"], "is not valid TOML", files=SPEC_FILES),
    Row("train spec", ["train", "{tmp}/binary.toml", "--device", "cpu"], "is not valid TOML", files=SPEC_FILES),
    Row("train spec", ["train", "{tmp}/wrong.toml", "--device", "cpu"], "model.d_model must be an integer, got 'wide'",
        files=SPEC_FILES),
    Row("train spec", ["train", "{tmp}/inf.toml", "--device", "cpu"], "train.lr must be finite, got inf",
        files=SPEC_FILES),
    Row("train spec", ["train", "{tmp}/unknown.toml", "--device", "cpu"], "unknown option 'd_modle' in [model]",
        files=SPEC_FILES),
    Row("train spec", ["train", "{tmp}/seed.toml", "--device", "cpu"], "train.seed must be 0 or more, got -1",
        files=SPEC_FILES),
    Row("train spec", ["train", "{tmp}/list.toml", "--device", "cpu"], "unknown preset '['tiny']'", files=SPEC_FILES),
    Row("train spec", ["train", "{tmp}", "--device", "cpu"], "is a directory but not a bundle"),
    Row("train spec", ["train", "{tmp}/bad.toml", "--preset", "tiny"], "either a spec file or --preset, not both",
        files=SPEC_FILES),
    Row("train --preset", ["train", "--preset", "gpt5", "--device", "cpu"], "unknown preset 'gpt5'"),
    Row("train --preset", ["train", "--preset", "", "--device", "cpu"], "argument --preset: must not be empty"),
    Row("train spec", ["train", "", "--device", "cpu"], "argument spec: must not be empty"),
    Row("train --data", [*TRAIN[:-1], ""], "argument --data: must not be empty"),
    Row("train --out", [*TRAIN, "--out", ""], "argument --out: must not be empty"),
    Row("train --resume", ["train", "--resume", ""], "argument --resume: must not be empty"),
    Row("train --data", [*TRAIN[:-1], "{tmp}/none.txt"], "data file '{tmp}/none.txt' does not exist"),
    Row("train --data", [*TRAIN[:-1], "{tmp}"], "no text files or token shards in '{tmp}'"),
    Row("train --data", [*TRAIN[:-1], "{tmp}/*.nothing"], "no files match '{tmp}/*.nothing'"),
    Row("train --data", [*TRAIN[:-1], "{tmp}/d"], "the text files of '{tmp}/d' are empty",
        files={"d/a.txt": b"", "d/b/c.txt": b"\n \n"}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/m"], "'{tmp}/m' holds both token shards and text files",
        files={"m/a.txt": b"text", "m/b.bin": llmc_datafile(TOKENS)}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/magic.bin"], "'{tmp}/magic.bin' is not a token shard: its magic is 7,",
        files={"magic.bin": llmc_datafile(TOKENS, magic=7)}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/v.bin"], "has version 2; magic 20240520 goes with version 1",
        files={"v.bin": llmc_datafile(TOKENS, version=2)}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/cut.bin"], "token shard '{tmp}/cut.bin' is truncated: its header says "
        "2,048 tokens (5,120 bytes), the file has 5,110 bytes", files={"cut.bin": llmc_datafile(TOKENS)[:-10]}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/long.bin"], "has 2 unexpected bytes after its 2,048 tokens",
        files={"long.bin": llmc_datafile(TOKENS) + b"xx"}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/short.bin"], "'{tmp}/short.bin' is not a token shard: 10 bytes, shorter "
        "than the 1024-byte header", files={"short.bin": bytes(10)}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/none.bin"], "token shard '{tmp}/none.bin' holds no tokens",
        files={"none.bin": llmc_datafile([])}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/s/a.bin"], "the token shards of '{tmp}/s/a.bin' come without a "
        "tokenizer", files={"s/a.bin": llmc_datafile(TOKENS)}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/x_val_000000.bin", "--tokenizer", "{run}"],
        "are all validation shards", files={"x_val_000000.bin": llmc_datafile(TOKENS)}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/big.bin", "--tokenizer", "{run}"], "token shard '{tmp}/big.bin' holds "
        "the token id 300 (token 1,843), outside the tokenizer's vocabulary of 256 tokens",
        files={"big.bin": llmc_datafile([300] * 2048)}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/few.bin", "--tokenizer", "{run}"], "the training split has 27 tokens, "
        "fewer than one window of 33", files={"few.bin": llmc_datafile(range(30))}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/p"], "'{tmp}/p/prepare.json' is not valid JSON",
        prepare=prepared(damage=lambda p: (p / "prepare.json").write_text('{"format": '))),
    Row("train --data", [*TRAIN[:-1], "{tmp}/p"], "'{tmp}/p/prepare.json' is not a gptc prepare manifest",
        prepare=prepared(damage=lambda p: (p / "prepare.json").write_text('{"format": "gptc-prepared-data"}'))),
    Row("train --data", [*TRAIN[:-1], "{tmp}/p"], "'{tmp}/p/prepare.json' is not a gptc prepare manifest",
        prepare=prepared(damage=lambda p: (p / "prepare.json").write_text("[1]"))),
    Row("train --data", [*TRAIN[:-1], "{tmp}/p"], "but '{tmp}/p/prepare.json' says", prepare=prepared(
        damage=edit_manifest)),
    Row("train --data", [*TRAIN[:-1], "{tmp}/p"], "token shard '{tmp}/p/p_train_000001.bin' does not exist",
        prepare=prepared(damage=lambda p: (p / "p_train_000001.bin").unlink())),
    Row("train --data", [*TRAIN[:-1], "{tmp}/p"], "is not the tokenizer the data was prepared with",
        prepare=prepared(damage=lambda p: (p / "tokenizer.json").write_text("{}"))),
    Row("train --vocab-size", ["train", "--preset", "tiny", "--device", "cpu", "--data", "{tmp}/p", "--vocab-size",
                               "280"], "the tokenizer '{tmp}/p/tokenizer.json' has 300 tokens, more than the model's "
        "280 embedding rows; give --vocab-size 300 (or more)", prepare=prepared(vocab_size=300)),
    Row("train --tokenizer", [*TRAIN, "--tokenizer", ""], "argument --tokenizer: must not be empty"),
    Row("train --tokenizer", [*TRAIN, "--tokenizer", "{tmp}/none.json"], "tokenizer file '{tmp}/none.json' does not "
        "exist"),
    Row("train --tokenizer", [*TRAIN, "--tokenizer", "{tmp}"], "tokenizer file '{tmp}/tokenizer.json' does not exist"),
    Row("train --tokenizer", [*TRAIN, "--tokenizer", "{tmp}/e.json"], "'{tmp}/e.json' is not a usable tokenizer file",
        files={"e.json": b""}),
    Row("train --tokenizer", [*TRAIN, "--tokenizer", "{tmp}/g.json"], "'{tmp}/g.json' is not a usable tokenizer file",
        files={"g.json": b'{"merges": 5}'}),
    Row("train --tokenizer", [*TRAIN, "--tokenizer", "{tmp}/b.json"], "'{tmp}/b.json' is not a tokenizer file (not "
        "UTF-8 text)", files={"b.json": b"\xff\xfe" * 9}),
    Row("train --tokenizer", ["train", "--resume", "{run}", "--steps", "3", "--device", "cpu", "--tokenizer",
                              "{tmp}/t.json"], "the tokenizer '{tmp}/t.json' is not the one the run was trained with",
        prepare=other_tokenizer),
    Row("train --data", [*TRAIN[:-1], "{tmp}/empty.txt"], "is empty", files={"empty.txt": b""}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/spaces.txt"], "is empty", files={"spaces.txt": b" \n\t\n" * 100}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/binary.txt"], "looks binary", files={"binary.txt": b"\x00\x01\x02" * 99}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/latin1.txt"], "is not valid UTF-8",
        files={"latin1.txt": "caf\u00e9 ".encode("latin-1") * 100}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/cut.txt"], "is not valid UTF-8",  # a character cut in half
        files={"cut.txt": ("x" * 5000 + "\u00e9").encode()[:-1]}),
    Row("train --data", [*TRAIN[:-1], "{tmp}/short.txt"], "fewer than the 321 tokens needed",
        files={"short.txt": b"too short " * 10}),
    Row("train --steps", [*TRAIN, "--steps", "0"], "train.steps must be positive, got 0"),
    Row("train --steps", [*TRAIN, "--steps", "-5"], "train.steps must be positive, got -5"),
    Row("train --steps", [*TRAIN, "--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
    Row("train --steps", [*TRAIN, "--steps", "nan"], "argument --steps: invalid int value: 'nan'"),
    Row("train --lr", [*TRAIN, "--lr", "0"], "train.lr must be positive"),
    Row("train --lr", [*TRAIN, "--lr=-1e-3"], "train.lr must be positive"),
    Row("train --lr", [*TRAIN, "--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
    Row("train --lr", [*TRAIN, "--lr=-inf"], "argument --lr: must be a finite number, got '-inf'"),
    Row("train --lr", [*TRAIN, "--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    Row("train --lr", [*TRAIN, "--lr", "1e999"], "argument --lr: must be a finite number, got '1e999'"),
    Row("train --lr", [*TRAIN, "--lr", "fast"], "argument --lr: not a number: 'fast'"),
    Row("train --batch", [*TRAIN, "--batch", "0"], "train.batch_size must be positive, got 0"),
    Row("train --batch", [*TRAIN, "--batch", "-1"], "train.batch_size must be positive, got -1"),
    Row("train --batch", [*TRAIN, "--batch", "x"], "argument --batch: invalid int value: 'x'"),
    Row("train --batch", [*TRAIN, "--batch", str(10**21)], "the model is too large"),
    Row("train --batch", [*TRAIN, "--batch", str(10**9)], "one training step of tiny (batch 1000000000 x seq_len 32) "
        "needs about "),
    Row("train --vocab-size", [*TRAIN, "--vocab-size", "0"], "model.vocab_size must be positive, got 0"),
    Row("train --vocab-size", [*TRAIN, "--vocab-size", "-1"], "model.vocab_size must be positive, got -1"),
    Row("train --vocab-size", [*TRAIN, "--vocab-size", "255"], "byte-level BPE needs model.vocab_size >= 256, got 255"),
    Row("train --vocab-size", [*TRAIN, "--vocab-size", "5e3"], "argument --vocab-size: invalid int value: '5e3'"),
    Row("train --vocab-size", [*TRAIN, "--vocab-size", str(10**20)], "the model is too large"),
    Row("train --vocab-size", ["train", "--resume", "{run}", "--vocab-size", "300", "--steps", "3", "--device", "cpu"],
        "model.vocab_size is 300 in the given spec but 256 in the run"),
    Row("train --device", [*TRAIN, "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    Row("train --out", [*TRAIN, "--out", "{tmp}/file"], "'{tmp}/file' is a file, not a directory",
        files={"file": b"x"}),
    Row("train --out", [*TRAIN, "--out", "{tmp}/file/run"], "'{tmp}/file' is a file, not a directory",
        files={"file": b"x"}),
    Row("train --out", [*TRAIN, "--out", "{run}"], "already holds a run with checkpoints"),
    Row("train --resume", ["train", "--resume", "{tmp}/none", "--device", "cpu"], "does not exist"),
    Row("train --resume", ["train", "--resume", "{tmp}/file", "--device", "cpu"], "is not a run directory",
        files={"file": b"x"}),
    Row("train --resume", ["train", "--resume", "{tmp}", "--device", "cpu"], "has no checkpoints"),
    Row("train --resume", ["train", "--resume", "{run}", "--steps", "1", "--device", "cpu"], "already at step 2"),
    Row("train --resume", ["train", "--resume", "{run}", "--lr", "0.5", "--device", "cpu"],
        "train.lr is 0.5 in the given spec"),
    Row("train --resume", ["train", "--resume", "{tmp}/r/checkpoints/step-000001", "--device", "cpu"],
        "going on from it there would fork the run's history", prepare=copy_run("r", older_copy)),
    Row("train --resume", ["train", "--resume", "{run}", "--out", "{run}/spec.toml", "--steps", "5", "--device", "cpu"],
        "'{run}/spec.toml' is a file, not a directory"),
    Row("train --resume", ["train", "--resume", "{run}", "--out", "{tmp}/fork", "--device", "cpu"], "already at step 2"),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "truncated",
        prepare=copy_run("r", truncate("model.safetensors"))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "corrupt or truncated",
        prepare=copy_run("r", write("optimizer.safetensors", b""))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "state.json is missing",
        prepare=copy_run("r", lambda c: (c / "state.json").unlink())),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "state.json is not valid JSON",
        prepare=copy_run("r", write("state.json", b'{"step": 2,'))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "is not a gptc checkpoint",
        prepare=copy_run("r", write("state.json", b"[1, 2]"))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "lacks step, rng or files",
        prepare=copy_run("r", write("state.json", b'{"format": "gptc-checkpoint", "version": 1, "step": -2}'))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--steps", "3", "--device", "cpu"],
        "state.json has an invalid 'data' or 'device'", prepare=copy_run("r", edit_state(data={"path": 3}))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--steps", "3", "--device", "cpu"],
        "state.json has an invalid 'data' or 'device'", prepare=copy_run("r", edit_state(data=[1]))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--steps", "3", "--device", "cpu"],
        "state.json has an invalid 'data' or 'device'", prepare=copy_run("r", edit_state(device=7))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--steps", "3", "--device", "cpu"],
        "holds an invalid spec: a spec is a table of 'preset', [model] and [train], not list",
        prepare=copy_run("r", edit_state(spec=[]))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--steps", "3", "--device", "cpu"],
        "holds an invalid spec: model.d_model must be an integer", prepare=copy_run("r", edit_state(
            spec={"model": {"d_model": "x"}}))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--steps", "3", "--device", "cpu"],
        "invalid data generator state", prepare=copy_run("r", edit_state(rng={"bit_generator": "PCG64", "state": 5}))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "does not match the sha256",
        prepare=copy_run("r", write("tokenizer.json", b"{}"))),
    Row("train --resume", ["train", "--resume", "{tmp}/r", "--device", "cpu"], "cannot read",
        prepare=copy_run("r", no_permission("model.safetensors")), marks=NEEDS_NON_ROOT),
    Row("train --init-from", [*INIT, ""], "argument --init-from: must not be empty"),
    Row("train --init-from", [*INIT, "{tmp}/none"], "'{tmp}/none' does not exist"),
    Row("train --init-from", [*INIT, "{tmp}/file"], "'{tmp}/file' is not a directory", files={"file": b"x"}),
    Row("train --init-from", [*INIT, "{tmp}"], "'{tmp}' is not a Hugging Face model directory: it has no config.json"),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'{tmp}/hf/config.json' is not valid JSON",
        prepare=hf_files({"config.json": b'{"model_type": '})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'{tmp}/hf/config.json' is not a JSON object",
        prepare=hf_files({"config.json": b"[]"})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "has model_type \"mistral\"; gptc reads 'gpt2' (GPT2LMHeadModel), "
        "'llama' (LlamaForCausalLM) models", prepare=hf_dir({"model_type": "mistral"})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'{tmp}/hf/config.json': n_embd must be an integer, got \"32\"",
        prepare=hf_dir({"n_embd": "32"})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "layer_norm_epsilon must be a finite number, got null",
        prepare=hf_dir({"layer_norm_epsilon": None})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "activation_function 'relu' is not GELU's tanh approximation",
        prepare=hf_dir({"activation_function": "relu"})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "gptc does not build attention scaled by the inverse layer index",
        prepare=hf_dir({"scale_attn_by_inverse_layer_idx": True})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "scale_attn_weights = false: gptc does not build attention "
        "without the 1/sqrt(head_dim) scale", prepare=hf_dir({"scale_attn_weights": False})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "gptc does not build cross attention",
        prepare=hf_dir({"add_cross_attention": True})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "gives a model gptc cannot build: model.d_model (32) must be "
        "divisible by model.n_heads (3)", prepare=hf_dir({"n_head": 3})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'{tmp}/hf' has no tokenizer.json, and gptc trains a pretrained "
        "model with its own tokenizer", prepare=hf_dir(tokenizer=False)),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "cannot use the tokenizer of '{tmp}/hf'",
        prepare=hf_files({"tokenizer.json": b'{"model": {"type": "BPE"}}'})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "has 256 tokens, more than the model's vocab_size 200",
        prepare=hf_dir({"vocab_size": 200})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "has no model.safetensors (gptc reads safetensors, not "
        "pytorch_model.bin", prepare=hf_files({"model.safetensors": None, "pytorch_model.bin": b"PK"})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'{tmp}/hf/model.safetensors' is not a readable safetensors file",
        prepare=hf_files({"model.safetensors": b"\x08" + b"\x00" * 7 + b"{}"})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'{tmp}/hf/model.safetensors.index.json' has no weight_map",
        prepare=hf_files({"model.safetensors": None, "model.safetensors.index.json": b'{"metadata": {}}'})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'{tmp}/hf/model-00002-of-00002.safetensors' is missing",
        prepare=hf_files({"model.safetensors": None, "model.safetensors.index.json": json.dumps({"weight_map": {
            "transformer.wte.weight": "model-00002-of-00002.safetensors"}}).encode()})),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "the weights in '{tmp}/hf' lack 'transformer.ln_f.bias'",
        prepare=hf_dir(edit=lambda t: t.pop("transformer.ln_f.bias"))),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "the weights in '{tmp}/hf' hold a tensor GPT2LMHeadModel has no "
        "place for: 'score.weight'", prepare=hf_dir(edit=lambda t: t.update({"score.weight": np.zeros((2, 32))}))),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "'transformer.wpe.weight' has shape (8, 32), config.json's model "
        "needs (16, 32)", prepare=hf_dir(edit=lambda t: t.update({"transformer.wpe.weight": np.zeros((8, 32))}))),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "tensor 'transformer.wte.weight' of '{tmp}/hf/model.safetensors' "
        "holds values that are not finite", prepare=hf_dir(edit=lambda t: t["transformer.wte.weight"].fill(np.nan))),
    Row("train --init-from", [*INIT, "{tmp}/hf"], "of '{tmp}/hf/model.safetensors' is BF16; gptc reads F32, F16, F64",
        prepare=hf_dir(bf16=True)),
    Row("train --init-from", [*INIT, "{tmp}/hf", "--resume", "{run}"], "give it without --resume"),
    Row("train --init-from", [*INIT, "{tmp}/hf", "--vocab-size", "300"], "give it without --vocab-size"),
    Row("train --init-from", ["train", "{tmp}/b", *INIT[1:], "{tmp}/hf"], "give it without a bundle",
        files={"b/manifest.json": b"{}"}),

    # ---- prepare -----------------------------------------------------------------------------
    Row("prepare data", ["prepare", "-o", "{tmp}/out"], "the following arguments are required: DATA"),
    Row("prepare data", ["prepare", "", "-o", "{tmp}/out"], "argument DATA: must not be empty"),
    Row("prepare data", ["prepare", "{tmp}/none.txt", "-o", "{tmp}/out"], "data file '{tmp}/none.txt' does not exist"),
    Row("prepare data", ["prepare", "{tmp}/*.nothing", "-o", "{tmp}/out"], "no files match '{tmp}/*.nothing'"),
    Row("prepare data", ["prepare", "{tmp}/empty", "-o", "{tmp}/out"], "no text files in '{tmp}/empty'",
        prepare=lambda tmp, run: (tmp / "empty").mkdir()),
    Row("prepare data", ["prepare", "{tmp}/empty.txt", "-o", "{tmp}/out"], "the data is empty: '{tmp}/empty.txt' "
        "has no bytes", files={"empty.txt": b""}),
    Row("prepare data", ["prepare", "{tmp}/binary.txt", "-o", "{tmp}/out"], "looks binary",
        files={"binary.txt": b"\x00\x01\x02" * 99}),
    Row("prepare data", ["prepare", "{tmp}/latin1.txt", "-o", "{tmp}/out"], "'{tmp}/latin1.txt' is not valid UTF-8 "
        "(byte 3)", files={"latin1.txt": "caf\u00e9 ".encode("latin-1") * 100}),
    Row("prepare data", ["prepare", "{tmp}/s.bin", "-o", "{tmp}/out"], "'{tmp}/s.bin' is a token shard already",
        files={"s.bin": llmc_datafile(TOKENS)}),
    Row("prepare --output", ["prepare", "{data}"], "the following arguments are required: -o/--output"),
    Row("prepare --output", ["prepare", "{data}", "-o", ""], "argument -o/--output: must not be empty"),
    Row("prepare --output", ["prepare", "{data}", "-o", "{tmp}/file"], "'{tmp}/file' is a file, not a directory",
        files={"file": b"x"}),
    Row("prepare --output", ["prepare", "{data}", "-o", "{tmp}/file/out"], "'{tmp}/file' is a file, not a directory",
        files={"file": b"x"}),
    Row("prepare --output", ["prepare", "{data}", "-o", "{tmp}/full"], "'{tmp}/full' is not empty",
        files={"full/x": b"x"}),
    Row("prepare --vocab-size", ["prepare", "{data}", "-o", "{tmp}/out", "--vocab-size", "0"],
        "--vocab-size must be between 256 (the byte tokens of a byte-level BPE) and 4,294,967,296"),
    Row("prepare --vocab-size", ["prepare", "{data}", "-o", "{tmp}/out", "--vocab-size", "-1"], "got -1"),
    Row("prepare --vocab-size", ["prepare", "{data}", "-o", "{tmp}/out", "--vocab-size", "255"], "got 255"),
    Row("prepare --vocab-size", ["prepare", "{data}", "-o", "{tmp}/out", "--vocab-size", str(2**32 + 1)],
        "got 4294967297"),
    Row("prepare --vocab-size", ["prepare", "{data}", "-o", "{tmp}/out", "--vocab-size", "nan"],
        "argument --vocab-size: invalid int value: 'nan'"),
    Row("prepare --vocab-size", ["prepare", "{data}", "-o", "{tmp}/out", "--vocab-size", "300", "--tokenizer", "{run}"],
        "give either --vocab-size or --tokenizer, not both"),
    Row("prepare --tokenizer", ["prepare", "{data}", "-o", "{tmp}/out", "--tokenizer", ""],
        "argument --tokenizer: must not be empty"),
    Row("prepare --tokenizer", ["prepare", "{data}", "-o", "{tmp}/out", "--tokenizer", "{tmp}/none.json"],
        "tokenizer file '{tmp}/none.json' does not exist"),
    Row("prepare --tokenizer", ["prepare", "{data}", "-o", "{tmp}/out", "--tokenizer", "{tmp}/e.json"],
        "'{tmp}/e.json' is not a usable tokenizer file", files={"e.json": b""}),
    Row("prepare --tokenizer", ["prepare", "{data}", "-o", "{tmp}/out", "--tokenizer", "{tmp}/g.json"],
        "'{tmp}/g.json' is not a usable tokenizer file", files={"g.json": b"[1, 2]"}),
    Row("prepare --shard-tokens", ["prepare", "{data}", "-o", "{tmp}/out", "--shard-tokens", "0"],
        "--shard-tokens must be between 1 and 2,147,483,647 (a shard's count is an int32), got 0"),
    Row("prepare --shard-tokens", ["prepare", "{data}", "-o", "{tmp}/out", "--shard-tokens", "-5"], "got -5"),
    Row("prepare --shard-tokens", ["prepare", "{data}", "-o", "{tmp}/out", "--shard-tokens", str(2**31)],
        "got 2147483648"),
    Row("prepare --shard-tokens", ["prepare", "{data}", "-o", "{tmp}/out", "--shard-tokens", "nan"],
        "argument --shard-tokens: invalid int value: 'nan'"),
    Row("prepare --jobs", ["prepare", "{data}", "-o", "{tmp}/out", "--jobs", "0"], "--jobs must be between 1 and"),
    Row("prepare --jobs", ["prepare", "{data}", "-o", "{tmp}/out", "--jobs", "-2"], "got -2"),
    Row("prepare --jobs", ["prepare", "{data}", "-o", "{tmp}/out", "--jobs", str(10**6)], "got 1000000"),
    Row("prepare --jobs", ["prepare", "{data}", "-o", "{tmp}/out", "--jobs", "two"],
        "argument --jobs: invalid int value: 'two'"),

    # ---- demo --------------------------------------------------------------------------------
    Row("demo --preset", ["demo", "--preset", "gpt5", "--device", "cpu"], "unknown preset 'gpt5'"),
    Row("demo --device", ["demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    Row("demo --steps", ["demo", "--steps", "0", "--device", "cpu"], "train.steps must be positive, got 0"),
    Row("demo --steps", ["demo", "--steps", "-1", "--device", "cpu"], "train.steps must be positive, got -1"),
    Row("demo --steps", ["demo", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    Row("demo --out", ["demo", "--out", "{tmp}/file", "--device", "cpu"], "'{tmp}/file' is a file, not a directory",
        files={"file": b"x"}),
    Row("demo --out", ["demo", "--out", "{run}", "--device", "cpu"], "holds an earlier run"),
    Row("demo --prompt", ["demo", "--prompt", "", "--device", "cpu"], "the prompt is empty"),
    Row("demo --prompt", ["demo", "--prompt", NOT_UTF8, "--device", "cpu"], "the prompt is not valid UTF-8"),
    Row("demo --num-tokens", ["demo", "--num-tokens", "0", "--device", "cpu"], "--num-tokens must be at least 1, got 0"),
    Row("demo --num-tokens", ["demo", "--num-tokens", "-3", "--device", "cpu"], "--num-tokens must be at least 1"),
    Row("demo --num-tokens", ["demo", "--num-tokens", "1e3"], "argument --num-tokens: invalid int value: '1e3'"),

    # ---- compile -----------------------------------------------------------------------------
    Row("compile spec", ["compile", "{tmp}/none.toml", "-o", "{tmp}/b", "--target", "cuda:sm_90"], "does not exist"),
    Row("compile spec", ["compile", "{tmp}/bad.toml", "-o", "{tmp}/b", "--target", "cuda:sm_90"], "not valid TOML",
        files=SPEC_FILES),
    Row("compile --preset", ["compile", "--preset", "gpt5", "-o", "{tmp}/b"], "unknown preset 'gpt5'"),
    Row("compile --output", ["compile", "--preset", "tiny"], "the following arguments are required: -o/--output"),
    Row("compile --output", ["compile", "--preset", "tiny", "-o", ""], "argument -o/--output: must not be empty"),
    Row("compile --output", ["compile", "--preset", "tiny", "-o", "{tmp}/file", "--target", "cuda:sm_90"],
        "exists and is not a directory", files={"file": b"x"}),
    Row("compile --output", ["compile", "--preset", "tiny", "-o", "{tmp}/file/b", "--target", "cuda:sm_90"],
        "is a file", files={"file": b"x"}),
    Row("compile --target", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--target", "hip:gfx9999"], "gfx9999"),
    Row("compile --target", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--target", "tpu"], "tpu"),
    Row("compile --no-fuse", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--no-fuse=yes"],
        "argument --no-fuse: ignored explicit argument 'yes'"),
    Row("compile --batch", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--batch", "0"],
        "train.batch_size must be positive"),
    Row("compile --batch", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--batch", str(10**21)], "too large"),
    Row("compile --seq-len", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--seq-len", "0"],
        "model.seq_len must be positive, got 0"),
    Row("compile --seq-len", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--seq-len", "-8"],
        "model.seq_len must be positive, got -8"),
    Row("compile --seq-len", ["compile", "--preset", "tiny", "-o", "{tmp}/b", "--seq-len", str(10**12)], "too large"),

    # ---- generate ----------------------------------------------------------------------------
    Row("generate --checkpoint", ["generate", "--prompt", "x"], "required: --checkpoint"),
    Row("generate --checkpoint", ["generate", "--checkpoint", "", "--prompt", "x"], "must not be empty"),
    Row("generate --checkpoint", ["generate", "--checkpoint", "{tmp}/none", "--prompt", "x"], "does not exist"),
    Row("generate --checkpoint", ["generate", "--checkpoint", "{tmp}", "--prompt", "x"], "has no checkpoints"),
    Row("generate --checkpoint", ["generate", "--checkpoint", "{tmp}/r", "--prompt", "x", "--device", "cpu"],
        "truncated", prepare=copy_run("r", truncate("model.safetensors"))),
    Row("generate --checkpoint", ["generate", "--checkpoint", "{tmp}/r", "--prompt", "x", "--device", "cpu"],
        "is not a gptc checkpoint", prepare=copy_run("r", write("state.json", b'"state"'))),
    Row("generate --prompt", ["generate", "--checkpoint", "{run}", "--prompt", ""], "the prompt is empty"),
    Row("generate --prompt", ["generate", "--checkpoint", "{run}", "--prompt", NOT_UTF8],
        "the prompt is not valid UTF-8 (character 2)"),
    Row("generate --prompt", ["generate", "--checkpoint", "{run}"], "one of the arguments --prompt --prompt-file is required"),
    Row("generate --prompt-file", ["generate", "--checkpoint", "{run}", "--prompt-file", "{tmp}/none.txt"],
        "cannot read the prompt file '{tmp}/none.txt'"),
    Row("generate --prompt-file", ["generate", "--checkpoint", "{run}", "--prompt-file", "{tmp}/blank.txt"],
        "the prompt file '{tmp}/blank.txt' has no prompt; give one per line", files={"blank.txt": b"\n \n"}),
    Row("generate --prompt-file", ["generate", "--checkpoint", "{run}", "--prompt", "x", "--prompt-file", "f"],
        "argument --prompt-file: not allowed with argument --prompt"),
    Row("generate --batch", [*GENERATE, "--batch", "0"], "--batch must be at least 1, got 0"),
    Row("generate --past-context", [*GENERATE, "--past-context", "slide"], "invalid choice: 'slide'"),
    Row("generate --sink", [*GENERATE, "--past-context", "stream", "--sink", "0"],
        "a streaming cache keeps 1 to 30 first tokens of the prefill and decode steps, got 0"),
    Row("generate --checkpoint", ["generate", "--checkpoint", "{tmp}/other", "--prompt", "x", "--device", "cpu"],
        "does not match the model: model.safetensors lacks 'wpe'", prepare=lambda tmp, run: without_wpe(tmp, run)),
    Row("generate --num-tokens", [*GENERATE, "--num-tokens", "0"], "--num-tokens must be at least 1, got 0"),
    Row("generate --num-tokens", [*GENERATE, "--num-tokens", "-1"], "--num-tokens must be at least 1, got -1"),
    Row("generate --num-tokens", [*GENERATE, "--num-tokens", "lots"], "invalid int value: 'lots'"),
    Row("generate --temp", [*GENERATE, "--temp", "0"], "--temp must be greater than 0, got 0.0"),
    Row("generate --temp", [*GENERATE, "--temp", "-1"], "--temp must be greater than 0"),
    Row("generate --temp", [*GENERATE, "--temp", "nan"], "argument --temp: must be a finite number, got 'nan'"),
    Row("generate --temp", [*GENERATE, "--temp", "inf"], "argument --temp: must be a finite number, got 'inf'"),
    Row("generate --top-k", [*GENERATE, "--top-k", "-1"], "--top-k must be between 0 (off) and the vocabulary size"),
    Row("generate --top-k", [*GENERATE, "--top-k", "257"], "--top-k must be between 0 (off) and the vocabulary size 256"),
    Row("generate --top-k", [*GENERATE, "--top-k", "1.5"], "argument --top-k: invalid int value: '1.5'"),
    Row("generate --top-p", [*GENERATE, "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    Row("generate --top-p", [*GENERATE, "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    Row("generate --top-p", [*GENERATE, "--top-p", "-0.5"], "--top-p must be in (0, 1]"),
    Row("generate --top-p", [*GENERATE, "--top-p", "nan"], "argument --top-p: must be a finite number, got 'nan'"),
    Row("generate --repetition-penalty", [*GENERATE, "--repetition-penalty", "0"],
        "--repetition-penalty must be greater than 0"),
    Row("generate --repetition-penalty", [*GENERATE, "--repetition-penalty", "-2"],
        "--repetition-penalty must be greater than 0"),
    Row("generate --repetition-penalty", [*GENERATE, "--repetition-penalty", "inf"],
        "argument --repetition-penalty: must be a finite number, got 'inf'"),
    Row("generate --greedy", [*GENERATE, "--greedy=1"], "argument --greedy: ignored explicit argument '1'"),
    Row("generate --seed", [*GENERATE, "--seed", "-1"], "--seed must be 0 or more, got -1"),
    Row("generate --seed", [*GENERATE, "--seed", "0x10"], "argument --seed: invalid int value: '0x10'"),
    Row("generate --device", [*GENERATE, "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),

    # ---- export ------------------------------------------------------------------------------
    Row("export path", ["export", "-o", "{tmp}/hf"], "the following arguments are required: RUNDIR"),
    Row("export path", ["export", "", "-o", "{tmp}/hf"], "argument RUNDIR: must not be empty"),
    Row("export path", ["export", "{tmp}/none", "-o", "{tmp}/hf"], "run directory '{tmp}/none' does not exist"),
    Row("export path", ["export", "{tmp}/file", "-o", "{tmp}/hf"], "is not a run directory", files={"file": b"x"}),
    Row("export path", ["export", "{tmp}", "-o", "{tmp}/hf"], "has no checkpoints"),
    Row("export path", ["export", "{tmp}/r", "-o", "{tmp}/hf"], "truncated",
        prepare=copy_run("r", truncate("model.safetensors"))),
    Row("export path", ["export", "{tmp}/r", "-o", "{tmp}/hf"], "does not match the sha256",
        prepare=copy_run("r", write("tokenizer.json", b"{}"))),
    Row("export path", ["export", "{tmp}/other", "-o", "{tmp}/hf"],
        "does not match the model: model.safetensors lacks 'wpe'", prepare=lambda tmp, run: without_wpe(tmp, run)),
    Row("export path", EXPORT, "cannot export '{ckpt}': its lm_head.bias is not zero"),
    Row("export --output", ["export", "{run}"], "the following arguments are required: -o/--output"),
    Row("export --output", ["export", "{run}", "-o", ""], "argument -o/--output: must not be empty"),
    Row("export --output", ["export", "{run}", "-o", "{tmp}/file"], "'{tmp}/file' exists and is not a directory",
        files={"file": b"x"}),
    Row("export --output", ["export", "{run}", "-o", "{tmp}/file/hf"], "cannot create '{tmp}/file/hf': "
        "'{tmp}/file' is a file", files={"file": b"x"}),
    Row("export --output", ["export", "{run}", "-o", "{tmp}/hf"], "'{tmp}/hf' is not empty; choose a new or empty "
        "directory", files={"hf/config.json": b"{}"}),
    Row("export --format", [*EXPORT, "--format", "gguf"], "argument --format: invalid choice: 'gguf'"),

    # ---- inspect -----------------------------------------------------------------------------
    Row("inspect bundle", ["inspect"], "the following arguments are required: bundle"),
    Row("inspect bundle", ["inspect", ""], "argument bundle: must not be empty"),
    Row("inspect --dot", ["inspect", "{tmp}/none", "--dot", ""], "argument --dot: must not be empty"),
    Row("inspect bundle", ["inspect", "{tmp}/none"], "is not a gptc bundle (no manifest.json)"),
    Row("inspect bundle", ["inspect", "{tmp}/file"], "is not a gptc bundle", files={"file": b"x"}),
    Row("inspect bundle", ["inspect", "{tmp}/b"], "manifest", files={"b/manifest.json": b""}),
    Row("inspect bundle", ["inspect", "{tmp}/b"], "manifest", files={"b/manifest.json": b"[]"}),
    Row("inspect bundle", ["inspect", "{tmp}/b"], "(bundle format 1)", files={"b/manifest.json": b'{"format": 1, "versions": '
                                                                              b'{"gptc": "0.1.0"}}'}),
    Row("inspect --step", ["inspect", "{tmp}/none", "--step", ""], "argument --step: must not be empty"),
    Row("inspect --dot", ["inspect", "{tmp}/none", "--dot", "{tmp}/no/such/dir/f.dot"],
        "cannot write --dot '{tmp}/no/such/dir/f.dot': the directory '{tmp}/no/such/dir' does not exist"),

    # ---- plan --------------------------------------------------------------------------------
    Row("plan spec", ["plan", "{tmp}/none.toml"], "does not exist"),
    Row("plan spec", ["plan", "{tmp}"], "spec file '{tmp}' is not a file"),
    Row("plan spec", ["plan", "{tmp}/wrong.toml"], "model.d_model must be an integer", files=SPEC_FILES),
    Row("plan --preset", ["plan", "--preset", "gpt5"], "unknown preset 'gpt5'"),
    Row("plan --mode", ["plan", "--mode", "decode"], "argument --mode: invalid choice: 'decode'"),
    Row("plan --batch", ["plan", "--preset", "tiny", "--batch", "0"], "train.batch_size must be positive"),
    Row("plan --batch", ["plan", "--preset", "tiny", "--batch", str(10**21)], "too large"),

    # ---- bench -------------------------------------------------------------------------------
    Row("bench --preset", ["bench", "--preset", "gpt5"], "unknown preset 'gpt5'"),
    Row("bench --preset", ["bench", "--preset", "{tmp}/none.toml"], "does not exist"),
    Row("bench --preset", ["bench", "--preset", "{tmp}/inf.toml"], "train.lr must be finite", files=SPEC_FILES),
    Row("bench --batch", ["bench", "--batch", "0"], "train.batch_size must be positive"),
    Row("bench --gpus", ["bench", "--gpus", "0"], "--gpus must be at least 2 to compare with one GPU, got 0"),
    Row("bench --gpus", ["bench", "--gpus", "two"], "argument --gpus: invalid int value: 'two'"),
    Row("bench --zero1", ["bench", "--zero1"], "--zero1 times ZeRO-1 on several GPUs; give it with --gpus N"),
    Row("train --gpus", ["train", "--preset", "tiny", "--gpus", "0"], "--gpus must be at least 1, got 0"),
    Row("train --gpus", [*TRAIN, "--gpus", "2"], "--gpus trains on GPUs; leave out --device cpu"),
    Row("train --zero1", [*TRAIN, "--zero1"], "--zero1 shards the optimizer state across GPUs"),
    Row("bench --batch", ["bench", "--batch", "-4"], "train.batch_size must be positive"),
    Row("bench --what", ["bench", "--what", "train,backprop"], "--what: unknown value 'backprop'"),
    Row("bench --what", ["bench", "--what", ""], "argument --what: must not be empty"),
    Row("bench --compare", ["bench", "--compare", "jax"], "--compare: unknown value 'jax'"),
    Row("bench --out", ["bench", "--out", "{tmp}/file"], "'{tmp}/file' is a file, not a directory",
        files={"file": b"x"}),
    Row("bench --repeats", ["bench", "--repeats", "0"], "--repeats must be at least 1"),
    Row("bench --repeats", ["bench", "--repeats", "-1"], "--repeats must be at least 1"),
    Row("bench --no-kernels", ["bench", "--no-kernels=no"], "argument --no-kernels: ignored explicit argument 'no'"),
    Row("bench --device", ["bench", "--device", "cpu"], "argument --device: invalid choice: 'cpu'"),
    Row("bench --batches", ["bench", "--what", "decode", "--batches", "8,0"], "--batches takes positive integers"),
    Row("bench --smoke", ["bench", "--what", "infer", "--smoke"], "--smoke and --batches go with --what decode"),
    Row("train --precision", ["train", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    Row("compile --precision", ["compile", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    Row("plan --precision", ["plan", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    Row("bench --precision", ["bench", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    Row("bench --gemm", ["bench", "--gemm=no"], "argument --gemm: ignored explicit argument 'no'"),
]


def arguments(parser: argparse.ArgumentParser) -> set[str]:
    """'command argument' for every argument of every subcommand (and 'gptc command')."""
    found = {"gptc command"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for a in sub._actions:
                    if not isinstance(a, argparse._HelpAction):
                        found.add(f"{name} {max(a.option_strings, key=len) if a.option_strings else a.dest}")
    return found


def test_every_argument_has_a_row():
    missing = arguments(build_parser()) - {row.covers for row in ROWS}
    assert not missing, f"arguments without a row in ROWS: {sorted(missing)}"


@pytest.fixture(scope="module", autouse=True)
def alarm_fails_the_test():
    def on_alarm(signum, frame):
        raise AssertionError("still running after 30 s: the arguments were not refused before the work")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    yield
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text((ROOT / "README.md").read_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_file) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--preset", "tiny", "--device", "cpu", "--data", str(data_file), "--steps", "2",
                 "--out", str(run_dir)]) == 0
    return run_dir


def snapshot(*roots: Path) -> dict:
    return {str(p): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns) for root in roots
            for p in sorted([root, *root.rglob("*")])}


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_edge(row: Row, tmp_path, monkeypatch, capsys, data_file, finished_run):
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    for name, content in row.files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)
    if row.prepare is not None:
        row.prepare(tmp, finished_run)
    fill = lambda s: s.format(tmp=tmp, data=data_file, run=finished_run,  # noqa: E731
                              ckpt=finished_run / "checkpoints" / "step-000002")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path, finished_run)
    capsys.readouterr()
    signal.alarm(30)  # a row that starts real work fails here instead of running for minutes
    try:
        code = main([fill(a) for a in row.argv])
    except SystemExit as e:  # argparse's exits
        code = e.code
    finally:
        signal.alarm(0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptc: error: "), err
    assert fill(row.error) in lines[0]
    assert code == row.code
    assert snapshot(tmp_path, finished_run) == before, "a refused command wrote or changed files"


@pytest.mark.parametrize("signum,code,said", [(signal.SIGINT, 130, "gptc: interrupted"),
                                              (signal.SIGTERM, 143, "gptc: terminated")])
def test_a_signal_stops_generate_cleanly(finished_run, signum, code, said):
    """`gptc generate` has no cap on --num-tokens; Ctrl-C or SIGTERM stops it: the text
    ends its line, one line on stderr, status 128 + the signal, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gptc", "generate", "--checkpoint", str(finished_run), "--prompt",
                             "Once", "--num-tokens", str(10**12), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = proc.stdout.read(len("Once") + 2)  # the prompt and the first tokens are streamed
        time.sleep(0.5)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert first.startswith(b"Once") and proc.returncode == code, err
    assert (first + out).endswith(b"\n") and b"Traceback" not in err
    assert err.decode().strip().splitlines()[-1] == said


def test_out_of_memory_anywhere_is_one_line(tmp_path, monkeypatch, capsys, data_file):
    """Out of memory outside the steps (which say what was too big), e.g. reading a corpus."""
    from gptc.tools import data

    def no_memory(path):
        raise MemoryError
    monkeypatch.setattr(data, "read_text", no_memory)
    monkeypatch.chdir(tmp_path)
    assert main(TRAIN[:-1] + [str(data_file)]) == 2
    err = capsys.readouterr().err
    assert err == ("gptc: error: out of memory in gptc train; give it less to hold (a smaller corpus, --batch or "
                   "model.seq_len) or more memory\n")
    assert not list(tmp_path.iterdir())


def test_a_reader_that_goes_away_stops_output_quietly(finished_run):
    """`gptc generate ... | head -c 10`: no BrokenPipeError traceback, status 141 (SIGPIPE)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gptc", "generate", "--checkpoint", str(finished_run), "--prompt",
                             "Once", "--num-tokens", str(10**12), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdout.read(10)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 141 and b"Traceback" not in err, err
    assert err.decode().strip().splitlines() == ["generating on cpu (NumPy reference executor) from step 2"]


@pytest.mark.parametrize("argv,unreadable,error", [
    (TRAIN[:-1] + ["{data}"], "{data}", "cannot read data file '{data}': Permission denied"),
    (["train", "{tmp}/spec.toml", "--device", "cpu"], "{tmp}/spec.toml",
     "cannot read spec file '{tmp}/spec.toml': Permission denied"),
    (["train", "--resume", "{run}", "--steps", "3", "--device", "cpu"], "{ckpt}/state.json",
     "cannot read '{ckpt}/state.json': Permission denied"),
    (["train", "--resume", "{run}", "--steps", "3", "--device", "cpu"], "{ckpt}/model.safetensors",
     "cannot read '{ckpt}/model.safetensors': Permission denied"),
    (GENERATE, "{ckpt}/tokenizer.json", "cannot read '{ckpt}/tokenizer.json': Permission denied"),
    (TRAIN + ["--tokenizer", "{tmp}/tok.json"], "{tmp}/tok.json",
     "cannot read tokenizer file '{tmp}/tok.json': Permission denied"),
    (["prepare", "{data}", "-o", "{tmp}/out"], "{data}", "cannot read data file '{data}': Permission denied"),
    (["prepare", "{data}", "-o", "{tmp}/out", "--tokenizer", "{tmp}/tok.json"], "{tmp}/tok.json",
     "cannot read tokenizer file '{tmp}/tok.json': Permission denied"),
])
def test_unreadable_files_are_one_line_errors(argv, unreadable, error, tmp_path, monkeypatch, capsys, data_file,
                                              finished_run):
    """A file gptc may not read (mode 000 for another user; simulated, since root reads anything)."""
    import builtins
    import io
    fill = lambda s: s.format(tmp=tmp_path, data=data_file, run=finished_run,  # noqa: E731
                              ckpt=finished_run / "checkpoints" / "step-000002")
    (tmp_path / "spec.toml").write_text("preset = 'tiny'\n")
    shutil.copy(finished_run / "tokenizer.json", tmp_path / "tok.json")
    denied, real_open = os.path.abspath(fill(unreadable)), builtins.open

    def open_unless_denied(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_unless_denied)
    monkeypatch.setattr(io, "open", open_unless_denied)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, finished_run)
    code = main([fill(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err == f"gptc: error: {fill(error)}\n"
    assert snapshot(tmp_path, finished_run) == before
