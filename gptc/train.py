"""The trainer: data in, a trained model and its metrics out."""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from gptc.data import Batches, DataError, read_corpus, split
from gptc.models import build_graph, init_params
from gptc.runtime.reference import ReferenceExecutor
from gptc.spec import GptcError, Spec, lr_at, save_spec


def byte_tokens(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def train(spec: Spec, data_path: str | None = None, device: str = "cpu", out_dir: str | None = None,
          log: Callable[[str], None] = print) -> list[float]:
    """Train `spec` on the text file at `data_path` (default: the bundled corpus);
    return the loss of every step."""
    if device not in ("cpu", "auto"):
        raise GptcError(f"device '{device}' is not available yet; use --device cpu")
    m, t = spec.model, spec.train
    if m.vocab_size < 256:
        raise GptcError(f"byte-level tokens need model.vocab_size >= 256, got {m.vocab_size}")
    if data_path is None:
        from gptc.corpus import default_corpus_text
        text = default_corpus_text()
    else:
        text = read_corpus(data_path)
    tokens = byte_tokens(text)
    train_tokens, _ = split(tokens)
    batches = Batches(train_tokens, t.batch_size, m.seq_len, t.seed, name="training split")

    out = Path(out_dir) if out_dir else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            save_spec(spec, out / "spec.toml")
        except OSError as e:
            raise GptcError(f"cannot write to output directory '{out_dir}': {e.strerror}") from None
    metrics = open(out / "metrics.jsonl", "w") if out is not None else None

    graph = build_graph(spec, "train")
    executor = ReferenceExecutor(graph, init_params(graph, t.seed))
    log(f"training on cpu (NumPy reference executor): {len(graph)} graph nodes, "
        f"{len(train_tokens):,} training tokens, {t.steps} steps of {t.batch_size}x{m.seq_len}")
    losses: list[float] = []
    every = max(1, t.steps // 20)
    start = time.perf_counter()
    try:
        for step in range(t.steps):
            x, y = batches.next()
            lr = lr_at(t, step)
            outputs = executor.run({"tokens": x, "targets": y, "lr": np.float32(lr), "step": np.float32(step + 1)})
            loss = float(outputs["loss"])
            if not np.isfinite(loss):
                raise GptcError(f"the loss became {loss} at step {step + 1}; lower train.lr")
            losses.append(loss)
            elapsed = time.perf_counter() - start
            tokens_per_s = (step + 1) * t.batch_size * m.seq_len / elapsed
            if metrics:
                metrics.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr,
                                          "grad_norm": float(outputs["grad_norm"]), "tokens_per_s": tokens_per_s}) + "\n")
            if (step + 1) % every == 0 or step == 0 or step + 1 == t.steps:
                log(f"step {step + 1:>6}/{t.steps}  loss {loss:.4f}  {tokens_per_s:,.0f} tokens/s")
    finally:
        if metrics:
            metrics.close()
    return losses
