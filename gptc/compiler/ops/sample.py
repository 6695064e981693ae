"""sample_tokens: the next token of each row of logits, drawn on the device.

sample_tokens(logits (B, V) float, seen (B, V) float, settings (5,) f32, ints (4,) i32,
index (B,) i32, sequence (B,) i32) -> (B,) i32, with
    settings = (1/temperature, top_p, penalty, 1/penalty, greedy (0 or 1)),
    ints     = (top_k (0: off), n (the tokens that may be drawn: 0..n-1, n clamped to
                [1, V]), seed low 32 bits, seed high 32 bits),
    index    = each row's token index (the draw's counter),
    sequence = each row's sequence id (the counter's second word: a sequence's draws
               depend on its id, not on the row it occupies in a batch),
the semantics of gptc.tools.generate.choose (the host sampler), step by step:
  1. z = logits[:n]; a seen token's (seen != 0) logit is shrunk if positive (z / penalty)
     and grown if negative (z * penalty) (CTRL's repetition penalty);
  2. greedy: the first index of the largest z;
  3. top-k: keep the tokens with z >= the k-th largest z (ties at the cut are kept);
  4. weights e = exp((z - max z) * (1/temperature)), quantised to integers
     q = floor(e * 2^24) (the largest token has q = 2^24 exactly);
  5. top-p (< 1): in the order (q descending, index ascending), keep each token whose
     mass before it is below top_p times the total (the top token is always kept);
  6. a 64-bit Philox draw R (counter (index, sequence, STREAM, 0), key (seed low, seed high)),
     r = floor(R * K / 2^64) with K the kept mass, and the token whose span of the
     kept masses, laid end to end in index order, holds r.

Why integers: every sum and comparison after step 4 is exact, so the kernel (a block
per row, sums in any order, radix selections of the top-k cut and the top-p weight
class instead of a sort) and this reference pick the same token from the same q. The float steps are single IEEE operations
(products by the host-computed reciprocals, a subtraction, one expf), computed in
float32 here whatever the executor's float dtype. Residual risk: expf may differ by an
ulp or two between NumPy and the GPU's libm, changing a q by a few units in 2^24; the
token changes only if r falls within those units of a span's end (about
kept tokens x 4 / K, below 1e-5 per token), or a top-p boundary sits that close.
Quantisation drops tokens with e < 2^-24 (probability below 6e-8 of the top one).

The op has no VJP: sampling is not differentiated."""
from __future__ import annotations

import numpy as np

from gptc.compiler.ops.random import philox4x32_10
from gptc.compiler.ops.registry import DEDICATED, FLOAT_DTYPES, OpDef, ShapeError, TensorType, register

SETTINGS = ("inv_temperature", "top_p", "penalty", "inv_penalty", "greedy")
INTS = ("top_k", "vocab_limit", "seed_lo", "seed_hi")
STREAM = 0x53414D50   # "SAMP": the draws' Philox stream (dropout uses small stream numbers)
QUANTUM = 2.0 ** 24   # weights are integers in [0, 2^24]


def settings_arrays(temperature: float, top_k: int, top_p: float, penalty: float, greedy: bool,
                    seed: int, vocab_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The `settings` (f32) and `ints` (i32) operands for one set of sampling settings.
    The reciprocals are computed here, once, so the kernel and the reference multiply
    by the same float32."""
    settings = np.array([1.0 / temperature, top_p, penalty, 1.0 / penalty, 1.0 if greedy else 0.0], np.float32)
    seed = int(seed) % 2**64
    ints = np.array([top_k, vocab_limit, seed & 0xFFFFFFFF, seed >> 32], np.uint32).view(np.int32)
    return settings, ints


def sample_row(z: np.ndarray, seen: np.ndarray, settings: np.ndarray, ints: np.ndarray, sequence: int,
               index: int) -> int:
    """The token of one row (see the module docstring)."""
    inv_temp, top_p, penalty, inv_penalty, greedy = (np.float32(s) for s in settings)
    top_k, limit, seed_lo, seed_hi = (int(i) for i in np.asarray(ints, np.int32).view(np.uint32))
    n = min(max(limit, 1), z.shape[0])
    z = np.asarray(z[:n], np.float32)
    z = np.where(np.asarray(seen[:n]) != 0, np.where(z > 0, z * inv_penalty, z * penalty), z).astype(np.float32)
    if greedy != 0:
        return int(np.argmax(z))
    valid = np.ones(n, bool)
    if 0 < top_k < n:
        valid = z >= np.partition(z, n - top_k)[n - top_k]
    e = np.exp(((z - z.max()) * inv_temp).astype(np.float32)).astype(np.float32)
    q = np.where(valid, (e * np.float32(QUANTUM)).astype(np.uint64), np.uint64(0))
    if top_p < 1:
        order = np.lexsort((np.arange(n), -q.astype(np.int64)))  # q descending, index ascending
        before = np.cumsum(q[order]) - q[order]
        kept = np.zeros(n, bool)
        kept[order[before.astype(np.float64) < float(top_p) * float(q.sum())]] = True
        q = np.where(kept, q, np.uint64(0))
    words = philox4x32_10((index % 2**32, sequence % 2**32, STREAM, 0), (seed_lo, seed_hi))
    draw = int(words[0]) | int(words[1]) << 32
    r = (draw * int(q.sum())) >> 64
    return min(int(np.searchsorted(np.cumsum(q), r, side="right")), n - 1)  # n - 1: weights not numbers


def _infer(ts: list[TensorType], attrs: dict) -> TensorType:
    logits, seen, settings, ints, index, sequence = ts
    if len(logits.shape) != 2 or logits.dtype not in FLOAT_DTYPES or seen.shape != logits.shape:
        raise ShapeError(f"sample_tokens: logits and seen must be (B, V) float tensors, got {logits} and {seen}")
    if settings != TensorType((len(SETTINGS),), "f32") or ints != TensorType((len(INTS),), "i32"):
        raise ShapeError(f"sample_tokens: settings must be f32[{len(SETTINGS)}] and ints i32[{len(INTS)}], "
                         f"got {settings} and {ints}")
    if index != TensorType(logits.shape[:1], "i32") or sequence != index:
        raise ShapeError(f"sample_tokens: index and sequence must be i32[{logits.shape[0]}], got {index} and {sequence}")
    return TensorType(logits.shape[:1], "i32")


def _reference(xs, attrs, t, fd):
    logits, seen, settings, ints, index, sequence = xs
    return np.array([sample_row(logits[b], seen[b], settings, ints, int(sequence[b]), int(index[b]))
                     for b in range(logits.shape[0])], np.int32)


register(OpDef("sample_tokens", DEDICATED, infer=_infer, reference=_reference, vjp=None))
