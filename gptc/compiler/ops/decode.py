"""Ops of the KV-cache decode step: one new position per sequence, at its own position.

- kv_write(cache (B, Hkv, S, D), value (B, Hkv, 1, D), pos (B,) i32): the cache with
  row pos[b] of sequence b replaced by value[b]. Its kernel writes only those B*Hkv*D
  elements, into the cache's own buffer (the new value of a state shares the state's
  buffer), so a decode step never copies a cache.
- decode_attention(q (B, H, 1, D), k, v (B, Hkv, S, D), pos (B,) i32; scale, window,
  splits): flash-decoding's first half. The keys are cut into `splits` chunks of
  ceil(S / splits); for each (b, h, chunk), over the keys j of the chunk that query b
  sees (j <= pos[b], and pos[b] - j < window when window > 0), it gives
  [sum_j e_j v_j (D values), m, l] with m the largest score (-inf: none seen),
  e_j = exp(score_j - m), l = sum_j e_j; (B, H, splits, D + 2). Query head h reads
  key/value head h // (H / Hkv) (grouped-query attention).
- decode_combine(partial, pos; seq, window, dtype): the second half, (B, H, 1, D) of q's dtype: the
  chunks' partial sums rescaled to their common maximum and divided by the common sum.
  Only chunks that hold a visible key are read (their l > 0).
None of them is differentiable: they exist for sampling."""
from __future__ import annotations

import math

import numpy as np

from gptc.compiler.ops.registry import DEDICATED, OpDef, ShapeError, TensorType, register


def _check_pos(name: str, pos: TensorType, batch: int) -> None:
    if pos.dtype != "i32" or pos.shape != (batch,):
        raise ShapeError(f"{name}: pos must be i32 ({batch},), got {pos}")


def _infer_kv_write(ts, attrs):
    cache, value, pos = ts
    b, h, _, d = cache.shape if len(cache.shape) == 4 else (0, 0, 0, 0)
    if len(cache.shape) != 4 or value.shape != (b, h, 1, d) or value.dtype != cache.dtype:
        raise ShapeError(f"kv_write: value {value} does not fit one position of the cache {cache}")
    _check_pos("kv_write", pos, b)
    return cache


def _kv_write_reference(xs, attrs, t, fd):
    cache, value, pos = xs
    out = np.array(cache, copy=True)
    for b, p in enumerate(np.asarray(pos)):
        out[b, :, int(p), :] = value[b, :, 0, :]
    return out


def visible_keys(pos: int, seq: int, window: int) -> tuple[int, int]:
    """[first, last] key positions a query at `pos` sees (window 0: all before it)."""
    first = max(0, pos - window + 1) if window > 0 else 0
    return first, min(pos, seq - 1)


def chunk_of(seq: int, splits: int) -> int:
    return -(-seq // splits)


def _infer_decode_attention(ts, attrs):
    q, k, v, pos = ts
    if len(q.shape) != 4 or len(k.shape) != 4 or k.shape != v.shape or q.shape[2] != 1:
        raise ShapeError(f"decode_attention: q {q} must be (B, H, 1, D) and k, v {k}, {v} (B, Hkv, S, D)")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1] or not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"decode_attention: query heads {q} do not fit key/value heads {k}")
    _check_pos("decode_attention", pos, b)
    if not 1 <= attrs["splits"] <= k.shape[2]:
        raise ShapeError(f"decode_attention: splits must be in [1, {k.shape[2]}], got {attrs['splits']}")
    return TensorType((b, h, attrs["splits"], d + 2), "f32")  # partial sums stay in float32


def _decode_attention_reference(xs, attrs, t, fd):
    q, k, v, pos = xs
    b_n, h_n, _, d = q.shape
    seq, group, splits = k.shape[2], h_n // k.shape[1], attrs["splits"]
    chunk = chunk_of(seq, splits)
    out = np.zeros(t.shape, dtype=np.float64 if fd == np.float64 else np.float32)
    out[..., d] = -np.inf
    for b in range(b_n):
        first, last = visible_keys(int(pos[b]), seq, attrs["window"])
        for h in range(h_n):
            scores = (k[b, h // group] @ q[b, h, 0]).astype(out.dtype) * attrs["scale"]
            for s in range(splits):
                lo, hi = max(first, s * chunk), min(last + 1, (s + 1) * chunk)
                if lo >= hi:
                    continue
                m = scores[lo:hi].max()
                e = np.exp(scores[lo:hi] - m)
                out[b, h, s, :d] = e @ v[b, h // group, lo:hi]
                out[b, h, s, d], out[b, h, s, d + 1] = m, e.sum()
    return out


def _infer_decode_combine(ts, attrs):
    partial, pos = ts
    if len(partial.shape) != 4 or partial.shape[3] < 3:
        raise ShapeError(f"decode_combine: partial sums must be (B, H, splits, D + 2), got {partial}")
    _check_pos("decode_combine", pos, partial.shape[0])
    b, h, _, d2 = partial.shape
    return TensorType((b, h, 1, d2 - 2), attrs["dtype"])


def _decode_combine_reference(xs, attrs, t, fd):
    partial, _ = xs
    d = t.shape[-1]
    acc, m, l = partial[..., :d], partial[..., d], partial[..., d + 1]
    top = m.max(axis=-1, keepdims=True)
    w = np.where(l > 0, np.exp(np.where(l > 0, m - top, 0.0)), 0.0)  # chunks with no visible key weigh 0
    out = (w[..., None] * acc).sum(axis=2) / (w * l).sum(axis=-1, keepdims=True)
    return out[:, :, None, :]


register(OpDef("kv_write", DEDICATED, infer=_infer_kv_write, reference=_kv_write_reference, vjp=None))
register(OpDef("decode_attention", DEDICATED, infer=_infer_decode_attention,
               reference=_decode_attention_reference, vjp=None))
register(OpDef("decode_combine", DEDICATED, infer=_infer_decode_combine,
               reference=_decode_combine_reference, vjp=None))


# The flash-decoding kernel's chunks: enough (batch * heads * chunks) blocks to fill a
# large GPU (an H200 has 132 units), but at least MIN_CHUNK keys each, so a block's
# warps have keys to share.
TARGET_BLOCKS, MIN_CHUNK = 256, 32


def decode_splits(rows: int, seq: int) -> int:
    """Key chunks per (sequence, head) for `rows` = batch * heads queries over `seq` keys."""
    return max(1, min(math.ceil(TARGET_BLOCKS / max(1, rows)), math.ceil(seq / MIN_CHUNK)))
