"""Counter-based random numbers: Philox4x32-10 (Salmon, Moraes, Dror and Shaw,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011), the generator of cuRAND, JAX
and PyTorch. A draw is a pure function of (key, counter), so the NumPy reference and
every kernel compute the same bits for an element without sharing any state, and a
backward kernel recomputes the mask of its forward kernel instead of reading it.

`random_uniform` gives element i of a tensor the uniform float of
    counter = (i mod 2^32, i div 2^32, step, stream), key = (seed mod 2^32, seed div 2^32 mod 2^32):
the first output word's top 24 bits times 2^-24, a float32 in [0, 1) (exact, so both
implementations agree bit for bit). `step` is a scalar operand (the training step,
fed each step: a fresh mask per step); `stream` tells dropout sites apart. The C twin
is philox_uniform in templates/prelude.h."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from gptc.compiler.ops.registry import SOURCE, OpDef, ShapeError, TensorType, register

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)   # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)   # key schedule increments (golden ratio, sqrt(3) - 1)


def philox4x32_10(counter: Sequence[np.ndarray | int], key: Sequence[int]) -> np.ndarray:
    """Philox4x32-10 of four counter words (arrays of one shape, or ints) under a
    two-word key: a (4, *shape) uint32 array. Words are held in uint64 so that the
    32x32-bit products keep their high halves."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & MASK32 for c in counter)
    k0, k1 = (np.uint64(k & MASK32) for k in key)
    m0, m1 = (np.uint64(m) for m in PHILOX_M)
    low, shift = np.uint64(MASK32), np.uint64(32)
    for _ in range(10):
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & low, (p0 >> shift) ^ c3 ^ k1, p0 & low
        k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & low, (k1 + np.uint64(PHILOX_W[1])) & low
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3)).astype(np.uint32)


def uniform(shape: Sequence[int], seed: int, stream: int, step: int) -> np.ndarray:
    """The float32 values in [0, 1) that random_uniform gives a tensor of `shape`."""
    flat = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64)
    word = philox4x32_10((flat, flat >> np.uint64(32), step, stream), (seed, seed >> 32))[0]
    return ((word >> 8).astype(np.float32) * np.float32(2.0 ** -24)).reshape(tuple(shape))


def dropout_threshold(p: float) -> float:
    """The uniform below which dropout of probability p drops an element: p rounded up
    to a multiple of 2^-24, the uniforms' grid, exact in float32 and float64, so the
    kernels' f32 comparison and the f64 reference drop the same elements."""
    return math.ceil(p * 2 ** 24) / 2 ** 24


def _infer(ts: list[TensorType], attrs: dict) -> TensorType:
    if len(ts) != 1 or ts[0].shape != () or ts[0].dtype not in ("f32", "i32"):
        raise ShapeError(f"random_uniform: the step operand must be one f32 or i32 scalar, got {[str(t) for t in ts]}")
    if any(d <= 0 for d in attrs["shape"]):
        raise ShapeError(f"random_uniform: every dimension must be positive, got {attrs['shape']}")
    if not 0 <= attrs["stream"] <= MASK32 or attrs["seed"] < 0:
        raise ShapeError("random_uniform: the stream must fit 32 bits and the seed must be non-negative")
    return TensorType(tuple(attrs["shape"]), "f32")


def _reference(xs, attrs, t, fd):
    # The step is fed as a float holding an integer; C converts it the same way,
    # (uint32_t)(int)step: truncation, then modulo 2^32.
    return uniform(attrs["shape"], attrs["seed"], attrs["stream"], int(xs[0]) % 2**32).astype(fd)


# A source like iota (computed per element wherever it is read, never stored), except
# for its scalar step operand, which kernels load.
register(OpDef("random_uniform", SOURCE, infer=_infer, reference=_reference, vjp=None))
