"""Token shards in llm.c's .bin format, written by `gptc prepare` and memory-mapped by
`gptc train`, so that files made by llm.c's data scripts train in gptc and gptc's in llm.c.

A shard is a header of 256 little-endian int32, then the tokens, nothing else:
  header[0]  magic     20240520 for uint16 tokens, 20240801 for uint32 tokens
  header[1]  version   1 with the uint16 magic, 7 with the uint32 one
  header[2]  the number of tokens that follow; the other 253 ints are 0
These are llm.c's two formats (dev/data/data_common.py: write_datafile, HEADERS_INFO):
"gpt-2" (uint16, what llm.c's C trainer reads: llmc/dataloader.h) and "llama-3" (uint32).
gptc writes uint16 when the tokenizer has at most 65,536 tokens, else uint32. As in
llm.c, a shard holds fewer than 2**31 tokens (the count is an int32).
"""
from __future__ import annotations

import os
from pathlib import Path
import numpy as np

from gptc.spec import GptcError

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
MAX_TOKENS = 2**31 - 1
# token dtype -> (magic, version), as llm.c's HEADERS_INFO
FORMATS: dict[np.dtype, tuple[int, int]] = {np.dtype("<u2"): (20240520, 1), np.dtype("<u4"): (20240801, 7)}
_BY_MAGIC = {magic: (dtype, version) for dtype, (magic, version) in FORMATS.items()}


class ShardError(GptcError):
    """A token shard that cannot be used (one-line message)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype of a shard's tokens for a tokenizer of `vocab_size` tokens."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def header_bytes(n_tokens: int, dtype: np.dtype) -> bytes:
    magic, version = FORMATS[np.dtype(dtype)]
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = magic, version, n_tokens
    return header.tobytes()


def is_shard(path: str | os.PathLike) -> bool:
    """Whether `path` is meant as a shard: named *.bin, or starting with a shard magic."""
    p = Path(path)
    if p.suffix == ".bin":
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int(np.frombuffer(head, "<i4")[0]) in _BY_MAGIC


class ShardWriter:
    """Writes one shard: tokens are appended in pieces, the header is filled in by
    finish(). No file stays open between calls. The shard is complete only after
    finish(); callers write into a temporary directory that is renamed into place at the
    end (gptc/tools/prepare.py)."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype) -> None:
        self.path, self.dtype, self.count = Path(path), np.dtype(dtype), 0
        self.path.write_bytes(header_bytes(0, self.dtype))

    def write(self, tokens: np.ndarray) -> None:
        if self.count + len(tokens) > MAX_TOKENS:
            raise ValueError(f"a shard holds at most {MAX_TOKENS:,} tokens")
        if len(tokens) and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(tokens.max())} does not fit a {self.dtype.name} shard")
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(tokens, self.dtype).tobytes())
        self.count += len(tokens)

    def finish(self) -> None:
        with open(self.path, "r+b") as f:
            f.write(header_bytes(self.count, self.dtype))


def open_shard(path: str | os.PathLike) -> "TokenFile":
    """The tokens of a shard, to be read a slice at a time (nothing is read yet), after
    checking its header against its size. ShardError for anything unusable."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"token shard '{path}' does not exist") from None
    except IsADirectoryError:
        raise ShardError(f"token shard '{path}' is a directory") from None
    except OSError as e:
        raise ShardError(f"cannot read token shard '{path}': {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"'{path}' is not a token shard: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte "
                         "header")
    magic, version, count = (int(x) for x in np.frombuffer(raw, "<i4")[:3])
    if magic not in _BY_MAGIC:
        raise ShardError(f"'{path}' is not a token shard: its magic is {magic}, llm.c's are 20240520 (uint16 tokens) "
                         "and 20240801 (uint32 tokens)")
    dtype, expected = _BY_MAGIC[magic]
    if version != expected:
        raise ShardError(f"token shard '{path}' has version {version}; magic {magic} goes with version {expected}")
    if count <= 0:
        raise ShardError(f"token shard '{path}' holds no tokens (its header says {count})")
    need = HEADER_BYTES + count * dtype.itemsize
    if size < need:
        raise ShardError(f"token shard '{path}' is truncated: its header says {count:,} tokens ({need:,} bytes), "
                         f"the file has {size:,} bytes")
    if size > need:
        raise ShardError(f"token shard '{path}' has {size - need:,} unexpected bytes after its {count:,} tokens")
    return TokenFile(p, dtype, 0, count)


class TokenFile:
    """The tokens [start, stop) of a shard, read only when asked for: slicing gives another
    TokenFile (nothing read), np.asarray() reads its tokens with one os.pread.

    Why not a memory map: drawing a window from an mmap maps whole page-cache folios
    into the process (2 MiB per window on Linux 6.x, whose page cache holds large
    folios), so a run's resident memory grows towards the size of the corpus; and
    without MADV_RANDOM each fault reads ahead. A read of the window alone costs one
    system call (about the same as a page fault) and keeps memory flat."""

    def __init__(self, path: Path, dtype: np.dtype, start: int, stop: int) -> None:
        self.path, self.dtype, self.start, self.stop = path, np.dtype(dtype), start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> "TokenFile":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenFile takes only slices with step 1")
        begin, end, _ = key.indices(len(self))
        return TokenFile(self.path, self.dtype, self.start + begin, self.start + max(begin, end))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        n_bytes = len(self) * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, n_bytes, HEADER_BYTES + self.start * self.dtype.itemsize)
        finally:
            os.close(fd)
        if len(raw) != n_bytes:
            raise ShardError(f"token shard '{self.path}' changed while in use (it is shorter than its header says)")
        tokens = np.frombuffer(raw, self.dtype)
        return tokens if dtype is None else tokens.astype(dtype)
