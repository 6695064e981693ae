"""Training data: reading a UTF-8 corpus, tokenizing it (with a disk cache), splitting
it into training and validation tokens, sampling random windows.

Tokenization cache: the BPE tokenizer trained on a corpus and the corpus's token ids
are stored under $GPTC_CACHE_DIR/corpus/<key>/ (default ~/.cache/gptc/corpus/; set
GPTC_CACHE_DIR=off to disable), where key = sha256 of (gptc.tools.tokenizer.TRAINER_ID,
which names gptc's training recipe and the version of `tokenizers`; vocab_size; corpus
bytes). An entry is a directory holding tokenizer.json and tokens.npy (int32), written
into a temporary directory and renamed into place, so readers see a whole entry or none.
A cache that cannot be written (read-only, full disk) only costs the next run the
tokenization time."""
from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np

from gptc.common import make_temp_dir, write_atomic
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
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror}") from None
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

    @property
    def state(self) -> dict:
        """The generator's state (numpy bit_generator.state: JSON-serializable)."""
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        try:
            self.rng.bit_generator.state = value
        except (TypeError, ValueError, KeyError) as e:
            raise DataError(f"invalid data generator state: {e}") from None

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, self.batch)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return rows[:, :-1], rows[:, 1:]


def _cut(n: int, validation_fraction: float) -> int:
    """How many of n tokens go to training (the rest to validation)."""
    return int(n * (1.0 - validation_fraction))


def split(tokens: np.ndarray, validation_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    cut = _cut(len(tokens), validation_fraction)
    return tokens[:cut], tokens[cut:]


def validation_windows(tokens: np.ndarray, n_batches: int, batch: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n_batches` fixed (tokens, targets) batches spread evenly over `tokens` (the
    validation split): the same windows at every evaluation, drawn without touching the
    training generator, so evaluations are comparable and resuming stays exact."""
    if len(tokens) < seq_len + 1:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_batches * batch).round().astype(np.int64)
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    return [(rows[i * batch:(i + 1) * batch, :-1], rows[i * batch:(i + 1) * batch, 1:]) for i in range(n_batches)]


def min_corpus_tokens(seq_len: int, validation_fraction: float = 0.1) -> int:
    """The fewest tokens a corpus needs for one window of seq_len + 1 tokens in each
    split (as `split` cuts). Both splits grow with n, so a binary search finds it."""
    window = seq_len + 1

    def enough(n: int) -> bool:
        cut = _cut(n, validation_fraction)
        return cut >= window and n - cut >= window

    # hi is enough: hi * min(f, 1 - f) >= window + 1, so each split gets at least window
    lo, hi = window, (window + 1) * (1 + math.ceil(1 / min(validation_fraction, 1 - validation_fraction)))
    while lo < hi:  # the smallest enough n in [lo, hi]
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


def check_corpus_size(count: int, seq_len: int, validation_fraction: float, what: str = "tokens") -> None:
    """Refuse a corpus of `count` tokens too short for one window in each split. Called
    with the corpus's byte count before tokenizing (a token is at least one byte), so
    that a huge seq_len is refused at once, and with its token count after."""
    need = min_corpus_tokens(seq_len, validation_fraction)
    if count < need:
        raise DataError(f"the corpus has {count:,} {what}, fewer than the {need:,} tokens needed for one window of "
                        f"{seq_len + 1:,} tokens in both the training and the validation split; give more text "
                        "or lower model.seq_len")


# ----- tokenization with a disk cache -----------------------------------------------------
def corpus_cache_dir() -> Path | None:
    """$GPTC_CACHE_DIR/corpus (default ~/.cache/gptc/corpus), or None when GPTC_CACHE_DIR=off."""
    from gptc.runtime.cache import cache_root
    root = cache_root()
    return None if root is None else root / "corpus"


def corpus_key(text: str, vocab_size: int) -> str:
    from gptc.tools.tokenizer import TRAINER_ID
    h = hashlib.sha256()
    h.update(f"{TRAINER_ID}/vocab={vocab_size}\0".encode())
    h.update(text.encode("utf-8"))
    return h.hexdigest()


def _read_cache(entry: Path, vocab_size: int):
    from gptc.tools.tokenizer import Tokenizer
    try:
        tok = Tokenizer.load(entry / "tokenizer.json")
        ids = np.load(entry / "tokens.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if tok.vocab_size > vocab_size or ids.dtype != np.int32 or ids.ndim != 1:
        return None
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= tok.vocab_size):
        return None
    return tok, ids


def _write_cache(entry: Path, tok, ids: np.ndarray) -> None:
    """Write one cache entry atomically (temporary directory, then rename)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(entry.parent, f".tmp-{entry.name[:16]}-")
    try:
        buf = io.BytesIO()
        np.save(buf, ids, allow_pickle=False)
        write_atomic(tmp / "tokens.npy", buf.getvalue())
        write_atomic(tmp / "tokenizer.json", tok.to_json())
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "tokens.npy").is_file():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize_corpus(text: str, vocab_size: int, cache_dir: Path | None | str = "default",
                    warn=None) -> tuple[object, np.ndarray, bool]:
    """(tokenizer, int32 token ids, whether they came from the cache) for `text`: a
    byte-level BPE trained on `text` up to `vocab_size` tokens, fewer when the text runs
    out of pairs to merge (a model may have more embedding rows than its tokenizer has
    tokens). `cache_dir` None turns the cache off; "default" is corpus_cache_dir().
    `warn(message)` hears about a cache that could not be written."""
    from gptc.tools.tokenizer import Tokenizer
    if vocab_size < 256:
        raise DataError(f"byte-level BPE needs model.vocab_size >= 256, got {vocab_size}")
    root = corpus_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir is not None else None)
    entry = root / corpus_key(text, vocab_size) if root is not None else None
    if entry is not None and entry.is_dir():
        hit = _read_cache(entry, vocab_size)
        if hit is not None:
            return hit[0], hit[1], True
    tok = Tokenizer.train(text, vocab_size, at_most=True)
    ids = tok.encode(text)
    if entry is not None:
        try:
            _write_cache(entry, tok, ids)
        except OSError as e:
            if warn:
                warn(f"could not cache the tokenized corpus in {root} ({e.strerror or e}); "
                     "the next run tokenizes again")
    return tok, ids, False
