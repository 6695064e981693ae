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
  With one chunk (splits 1) and attr `dtype`, the op is the whole attention: it
  divides by l itself and gives (B, H, 1, D) of that dtype (no combine to launch).
- decode_combine(partial, pos; seq, window, dtype): the second half, (B, H, 1, D) of q's dtype: the
  chunks' partial sums rescaled to their common maximum and divided by the common sum.
  Only chunks that hold a visible key are read (their l > 0).
StreamingLLM-style decoding past the context (attrs sink > 0, one more input `slot`
(B,) i32, the slot the new key went to): the cache keeps `sink` first tokens in slots
0..sink-1 and the most recent ones in a ring over the other slots. `pos` is the query's
position within the cache (seq - 1 once the ring is full), slot j < sink is at position
j and ring slot j at pos - ((slot - j) mod (seq - sink)) (its age behind the new token);
with rope_dims > 0 the cache holds keys before RoPE, which the op rotates by these
positions (RoPE within the cache, as StreamingLLM does), and a window is over positions.
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


def chunk_of(seq: int, splits: int) -> int:
    return -(-seq // splits)


def slot_positions(pos: int, slot: int, seq: int, sink: int) -> np.ndarray:
    """The position within the cache of every slot (the streaming cache; see above)."""
    j = np.arange(seq)
    return np.where(j < sink, j, pos - (slot - j) % (seq - sink)) if sink else j


def rotate(x: np.ndarray, positions: np.ndarray, dims: int, base: float) -> np.ndarray:
    """dsl.rope of rows x (S, D) at `positions` (S,) (rotate-half pairs in the first dims)."""
    half = dims // 2
    angle = positions[:, None].astype(np.float32) * np.exp(np.arange(half, dtype=np.float32)
                                                           * np.float32(-2.0 * math.log(base) / dims))
    cos, sin = np.cos(angle).astype(x.dtype), np.sin(angle).astype(x.dtype)
    out = x.copy()
    x1, x2 = x[:, :half], x[:, half:dims]
    out[:, :half], out[:, half:dims] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return out


def _infer_decode_attention(ts, attrs):
    if len(ts) != (5 if attrs.get("sink") else 4):
        raise ShapeError("decode_attention: inputs q, k, v, pos (and slot with a sink)")
    q, k, v, pos = ts[:4]
    if len(q.shape) != 4 or len(k.shape) != 4 or k.shape != v.shape or q.shape[2] != 1:
        raise ShapeError(f"decode_attention: q {q} must be (B, H, 1, D) and k, v {k}, {v} (B, Hkv, S, D)")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1] or not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"decode_attention: query heads {q} do not fit key/value heads {k}")
    for p in ts[3:]:
        _check_pos("decode_attention", p, b)
    if not 1 <= attrs["splits"] <= k.shape[2]:
        raise ShapeError(f"decode_attention: splits must be in [1, {k.shape[2]}], got {attrs['splits']}")
    if "dtype" in attrs:
        if attrs["splits"] != 1:
            raise ShapeError(f"decode_attention: only one chunk gives the attention itself, got {attrs['splits']}")
        return TensorType((b, h, 1, d), attrs["dtype"])
    return TensorType((b, h, attrs["splits"], d + 2), "f32")  # partial sums stay in float32


def _decode_attention_reference(xs, attrs, t, fd):
    q, k, v, pos = xs[:4]
    b_n, h_n, _, d = q.shape
    seq, group, splits = k.shape[2], h_n // k.shape[1], attrs["splits"]
    sink, window, dims = attrs.get("sink", 0), attrs["window"], attrs.get("rope_dims", 0)
    chunk = chunk_of(seq, splits)
    out = np.zeros((b_n, h_n, splits, d + 2), dtype=np.float64 if fd == np.float64 else np.float32)
    out[..., d] = -np.inf
    for b in range(b_n):
        p = int(pos[b])
        positions = slot_positions(p, int(xs[4][b]) if sink else p, seq, sink)
        seen = (np.arange(seq) <= p) & ((p - positions < window) if window else True)
        for h in range(h_n):
            keys = k[b, h // group].astype(out.dtype)
            if dims:
                keys = rotate(keys, positions, dims, attrs["rope_base"])
            scores = (keys @ q[b, h, 0]) * attrs["scale"]
            for s in range(splits):
                part = np.flatnonzero(seen[s * chunk:(s + 1) * chunk]) + s * chunk
                if not part.size:
                    continue
                m = scores[part].max()
                e = np.exp(scores[part] - m)
                out[b, h, s, :d] = e @ v[b, h // group, part]
                out[b, h, s, d], out[b, h, s, d + 1] = m, e.sum()
    return out[..., :d] / out[..., d + 1:] if "dtype" in attrs else out


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
