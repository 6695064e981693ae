"""The sampling tail of the prefill and decode graphs: the next token of each sequence,
drawn from its logits on the device (ops/sample.py), so a generation step reads back
token ids only.

Inputs (run-time, so one compiled bundle serves every setting):
  sample_settings (5,) f32: 1/temperature, top_p, penalty, 1/penalty, greedy (0 or 1);
  sample_ints (4,) i32: top_k (0: off), the number of drawable tokens n (the
      tokenizer's vocabulary), the seed's low and high 32 bits;
  sample_index (B,) i32: each sequence's token index, the draw's counter;
  sample_sequence (B,) i32: each sequence's id, the counter's second word, so a
      sequence draws the same tokens in any row of any batch (gptc generate gives
      prompt i of the prompt file id i; one prompt: 0).
State sample_seen (B, V) f32: 1 for the tokens each sequence has seen (the repetition
penalty's history). The host writes the prompt's tokens into it before the first step;
each step adds the token it drew.
Output next_token (B,) i32."""
from __future__ import annotations

import secrets

import numpy as np

from gptc.compiler.ir import Graph, Tensor
from gptc.compiler.ops.sample import INTS, SETTINGS, settings_arrays

SEEN = "sample_seen"

__all__ = ["SEEN", "add_sampling", "sampling_feeds", "seen_rows"]


def add_sampling(g: Graph, logits: Tensor) -> None:
    """Append the tail after `logits` (B, V): output next_token, update sample_seen."""
    batch, vocab = logits.shape
    with g.scope("sample"):
        seen = g.state(SEEN, (batch, vocab))
        settings = g.input("sample_settings", (len(SETTINGS),), "f32")
        ints = g.input("sample_ints", (len(INTS),), "i32")
        index = g.input("sample_index", (batch,), "i32")
        sequence = g.input("sample_sequence", (batch,), "i32")
        token = logits._new("sample_tokens", [logits, seen, settings, ints, index, sequence])
        g.output("next_token", token)
        drawn = g.iota((batch, vocab), 1).eq(token.reshape(batch, 1).broadcast_to((batch, vocab)))
        g.updates[SEEN] = drawn.where(1.0, seen).id


def sampling_feeds(p, vocab_limit: int, index: np.ndarray, sequence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The tail's inputs for gptc.tools.generate.SamplingParams `p` (seed None: a fresh
    random seed, as the host sampler drew from fresh entropy); `sequence` defaults to
    the row numbers."""
    index = np.asarray(index, np.int32).reshape(-1)
    sequence = np.arange(len(index), dtype=np.int32) if sequence is None else sequence
    seed = p.seed if p.seed is not None else secrets.randbits(64)
    settings, ints = settings_arrays(p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.greedy,
                                     seed, vocab_limit)
    return {"sample_settings": settings, "sample_ints": ints,
            "sample_index": index, "sample_sequence": np.asarray(sequence, np.int32).reshape(-1)}


def seen_rows(histories, vocab: int) -> np.ndarray:
    """sample_seen for the token histories of a batch: (B, V) f32."""
    seen = np.zeros((len(histories), vocab), np.float32)
    for b, history in enumerate(histories):
        ids = np.asarray(list(history), np.int64)
        seen[b, ids[(ids >= 0) & (ids < vocab)]] = 1.0  # the steps refuse ids outside, with their bounds
    return seen
