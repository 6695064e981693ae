"""NumPy helpers shared by the reference implementations."""
from __future__ import annotations

import numpy as np


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)


def numpy_dtype(dtype: str, float_dtype: type) -> type:
    """The NumPy dtype the reference executor stores a tensor of `dtype` in."""
    return {"i32": np.int32, "bool": np.bool_}.get(dtype, float_dtype)
