"""Training data: reading a UTF-8 corpus, splitting it, sampling random windows."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gptc.spec import GptcError


class DataError(GptcError):
    pass


def read_corpus(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, with a one-line DataError for anything unusable."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file '{path}' does not exist")
    if not p.is_file():
        raise DataError(f"data path '{path}' is not a file")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"data file '{path}' is empty; give a UTF-8 text file")
    if b"\x00" in raw[:65536]:
        raise DataError(f"data file '{path}' looks binary (it has NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None


class Batches:
    """Random (tokens, targets) windows of `seq_len` from a token array, drawn by a
    seeded generator whose state can be saved and restored (for exact resume)."""

    def __init__(self, tokens: np.ndarray, batch: int, seq_len: int, seed: int, name: str = "corpus") -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(f"the {name} has {len(tokens)} tokens, fewer than one window of "
                            f"{seq_len + 1}; give more text or a shorter seq_len")
        self.tokens = tokens.astype(np.int32, copy=False)
        self.batch, self.seq_len = batch, seq_len
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, self.batch)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return rows[:, :-1], rows[:, 1:]


def split(tokens: np.ndarray, validation_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(tokens) * (1.0 - validation_fraction))
    return tokens[:cut], tokens[cut:]
