"""Byte-level BPE tokenizer (GPT-2 style) on Hugging Face `tokenizers` (Rust, parallel).

gptc's tokenizer.json is a standard `tokenizers` file: `tokenizers.Tokenizer.from_file`
and transformers' `PreTrainedTokenizerFast(tokenizer_file=...)` load it and give the
same ids. Its layout:
  model          BPE: the 256 byte tokens (GPT-2's printable character for each byte),
                 then one token per learned merge, ids 0..vocab_size-1
  pre_tokenizer  ByteLevel, GPT-2's regex, no prefix space: every string encodes (no
                 unknown token) and decodes back exactly
  decoder        ByteLevel
gptc trains no special token: it trains on one continuous text and samples without a
stop token, so an end-of-text token would be an embedding row nothing uses. A file made
elsewhere may have added tokens (GPT-2's has <|endoftext|>) if they hold no space and
strip none; they encode and decode as their text.

Interface (gptc.tools.data, train, generate and prepare use it; keep it stable):
  Tokenizer.train(text, vocab_size, at_most=False) -> Tokenizer
      exactly vocab_size tokens, else ValueError; with at_most=True a text that runs
      out of pairs to merge gives fewer
  tok.vocab_size -> int                    ids are 0..vocab_size-1
  tok.encode(text) -> np.ndarray           1-D int32 ids (parallel over pieces of the text)
  tok.decode(ids) -> str                   invalid UTF-8 becomes U+FFFD
  tok.token_bytes(id) -> bytes             the bytes one token stands for
  tok.stream_decoder() -> StreamDecoder    feed(ids) -> str never ends in half a character,
                                           flush() -> str gives the rest
  tok.to_json() -> str, Tokenizer.from_json(text) -> Tokenizer     tokenizer.json content
  tok.save(path) -> Path, Tokenizer.load(path) -> Tokenizer        a file, or a directory
                                                                   holding tokenizer.json
  Tokenizer(hf)                            wraps a tokenizers.Tokenizer of this layout
  TRAINER_ID                               names what `train` builds: part of cache keys
Bad arguments raise TypeError or ValueError, bad files ValueError, in one line. A file
of gptc's former hand-written BPE ("format": "gptc-bpe") is refused: its pre-tokenizer
(Python's re, not GPT-2's regex) cannot be expressed in this layout, so a converted file
would split some text differently from how its model was trained.

Encoding splits the text into GPT-2's pre-tokens with Python's `regex` (the same
pattern, about four times faster than `tokenizers`' Oniguruma, which costs some 0.4
CPU-seconds a MB), and its ASCII stretches (all of most texts) with an equivalent
ASCII-only pattern for the stdlib `re`, 2-3 times faster again; it keeps each distinct
pre-token's ids (up to MEMO_SIZE of them): a large text repeats most of its pre-tokens,
so `tokenizers` encodes each once, and the ids of the text are gathered in one C-level
pass over its pre-tokens. A file with added tokens (special tokens matched before
pre-tokenizing) is encoded by `tokenizers` alone.

Training (and encoding a file with added tokens) cut the text into pieces of about CHUNK characters, only at a
space or line break that follows a non-space character: GPT-2's regex always ends a
pre-token there, so the pieces give the same pre-tokens as the whole text, and
`tokenizers` handles them in parallel. Training also cuts runs of more than MAX_RUN
non-space (or space) characters into MAX_RUN-character pieces: the trainer's time grows
with the square of a word's length (a text with a 300,000-letter word trains in a
minute uncut, in 0.03 s cut), and natural text has no such runs. Ties between equally frequent pairs go to the smallest
pair of `tokenizers`' internal ids, so training the same text twice gives the same file.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import regex
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptc.common import write_atomic

__all__ = ["Tokenizer", "StreamDecoder", "TRAINER_ID"]

TRAINER_ID = f"gptc-bytelevel-bpe-1/tokenizers-{tokenizers.__version__}"  # bump the 1 when `train` changes
TOKENIZER_FILE = "tokenizer.json"
N_BYTES = 256
CHUNK = 1 << 16  # characters per piece of text handed to tokenizers
BATCH = 256  # pieces per encode_batch_fast call (bounds the memory of a large corpus)
MAX_RUN = 256  # training cuts longer runs of non-space (or space) characters
MEMO_SIZE = 1 << 20  # distinct pre-tokens whose ids encode keeps
# GPT-2's pre-tokenizer pattern, as tokenizers' ByteLevel(use_regex=True) applies it
PRETOKEN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# The same pattern for pure-ASCII text, for the stdlib `re` (2-3x faster than `regex` here).
# Equal on ASCII: the ASCII letters are exactly \p{L}'s ASCII members, the ASCII digits
# \p{N}'s, and \t\n\v\f\r and space the ASCII members of \s (Unicode's White_Space; not
# \x1c-\x1f, which are \s to Python's re, hence the explicit class); the contractions are
# grouped behind one quote (none is a prefix of another, so the same one matches) and the
# runs are possessive (nothing follows them in their alternative to backtrack into).
_W = r"\t\n\v\f\r "
PRETOKEN_ASCII = re.compile(rf"""'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]++| ?[0-9]++| ?[^{_W}A-Za-z0-9]++|[{_W}]+(?![^{_W}])|[{_W}]+""")

# A space or line break after a non-space character: GPT-2's regex ends a pre-token
# there. (Python's \s holds every character that tokenizers' regex takes for a space.)
_BOUNDARY = re.compile(r"(?<=\S)(?=[ \n])")
_RUN = re.compile(rf"\S{{{MAX_RUN}}}|\s{{{MAX_RUN}}}")
# Mostly-ASCII text: the stretches around non-ASCII characters (at least NON_ASCII_REGION
# characters each, so that a text full of them pays little per stretch) go through PRETOKEN,
# the rest through PRETOKEN_ASCII; both cut at a line break after a non-space character,
# where a pre-token always ends (see _BOUNDARY).
NON_ASCII_REGION = 4096
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_LINE_CUT = re.compile(r"(?<=\S)\n")


def _byte_chars() -> list[str]:
    """GPT-2's map from a byte to the printable character that stands for it in tokens:
    printable Latin-1 bytes stand for themselves, the others for U+0100 onwards."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(others)) for b in range(N_BYTES)]


_BYTE_CHARS = _byte_chars()
_CHAR_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}
_OLD_FORMAT = ("it is a file of gptc's former hand-written BPE (format 'gptc-bpe'), which this gptc no longer "
               "reads (its pre-tokenizer differs from GPT-2's); train the run again")


class Tokenizer:
    """Byte-level BPE tokenizer: build one with `Tokenizer.train(text, vocab_size)`,
    `Tokenizer.load(path)` or `Tokenizer.from_json(text)`."""

    def __init__(self, hf: tokenizers.Tokenizer):
        self._bytes = _check_layout(hf)
        self._hf = hf
        # each pre-token's ids; None where added tokens must be matched first
        self._memo: _IdsMemo | None = None if hf.get_added_tokens_decoder() else _IdsMemo()

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes that token `token_id` stands for."""
        return self._bytes[self._check_id(token_id)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, text: str, vocab_size: int, at_most: bool = False) -> Tokenizer:
        """Learn merges on `text` until the vocabulary has exactly `vocab_size` tokens;
        with at_most=True, a text that runs out of pairs to merge first gives a smaller
        vocabulary instead of a ValueError."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise TypeError(f"vocab_size must be an int, not {type(vocab_size).__name__}")
        vocab_size = int(vocab_size)
        if vocab_size < N_BYTES:
            raise ValueError(
                f"vocab_size={vocab_size} is below the {N_BYTES} byte tokens of a byte-level BPE: use vocab_size >= {N_BYTES}"
            )
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        hf.train_from_iterator(_training_pieces(text), trainer)
        tok = cls(hf)
        if tok.vocab_size < vocab_size and not at_most:
            raise ValueError(
                f"corpus too small for vocab_size={vocab_size}: its {len(text)} characters yield only "
                f"{tok.vocab_size} tokens; lower vocab_size to at most {tok.vocab_size} or give more text"
            )
        return tok

    # ------------------------------------------------------- encoding, decoding
    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as a 1-D int32 array."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, not {type(text).__name__}")
        if self._memo is None:
            pieces = _chunks(text, CHUNK)
            parts = [np.zeros(0, np.int32)]
            while batch := list(itertools.islice(pieces, BATCH)):
                parts += [np.array(e.ids, np.int32) for e in self._hf.encode_batch_fast(batch, add_special_tokens=False)]
            return np.concatenate(parts)
        pieces = _pretokens(text)
        memo = self._memo
        rows = memo.rows(pieces)  # -1: not met before
        missing = np.flatnonzero(rows < 0).tolist()
        if missing:
            new = dict.fromkeys(pieces[i] for i in missing)
            if len(memo) + len(new) > MEMO_SIZE:  # bounded: a text of ever new pre-tokens keeps memory flat
                memo.clear()
                new, missing = dict.fromkeys(pieces), range(len(pieces))
            if len(new) > MEMO_SIZE:  # a text of more distinct pre-tokens: a table of its own
                memo = _IdsMemo()
            for piece in new:
                memo.add(piece, self._hf.encode(piece, add_special_tokens=False).ids)
            rows[missing] = [memo.index[pieces[i]] for i in missing]
        return memo.gather(rows)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a sequence of token ids (invalid UTF-8 becomes U+FFFD)."""
        a = np.asarray(ids)
        if a.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of ids, got shape {a.shape}")
        if a.size == 0:
            return ""
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"token ids must be integers, not {a.dtype}")
        self._check_id(a.min())
        self._check_id(a.max())
        return self._hf.decode(a.tolist(), skip_special_tokens=False)

    def stream_decoder(self) -> StreamDecoder:
        """A decoder to feed ids one at a time while generating."""
        return StreamDecoder(self)

    def _check_id(self, token_id: int | np.integer) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._bytes):
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self._bytes)})")
        return i

    # ------------------------------------------------------------ persistence
    def to_json(self) -> str:
        """The content of tokenizer.json (deterministic: the same tokenizer gives the same text)."""
        return self._hf.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer atomically. `path` is a file, or a directory that gets `tokenizer.json`."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        write_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer.json (or a directory holding one); a missing file raises FileNotFoundError."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        raw = path.read_bytes()
        try:
            return cls._parse(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a tokenizer file (not UTF-8)") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Parse the content of a tokenizer.json."""
        try:
            return cls._parse(text)
        except ValueError as e:
            raise ValueError(f"invalid tokenizer: {e}") from None

    @classmethod
    def _parse(cls, text: str) -> Tokenizer:
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not a tokenizer file (invalid JSON: {_one_line(e)})") from None
        if isinstance(obj, dict) and obj.get("format") == "gptc-bpe":
            raise ValueError(_OLD_FORMAT)
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception
            raise ValueError(f"not a tokenizers file ({_one_line(e)})") from None
        try:
            return cls(hf)
        except ValueError as e:
            raise ValueError(f"not a byte-level BPE tokenizer as gptc uses: {e}") from None


class StreamDecoder:
    """Incremental decoder for streaming generation.

    `feed(ids)` takes one id or an iterable of ids and returns the text that is
    now complete: bytes of a UTF-8 character split across tokens are held back
    until the character is whole. `flush()` returns what is left (an incomplete
    character becomes U+FFFD). The pieces joined equal `Tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Sequence[int] | np.ndarray) -> str:
        if isinstance(ids, (int, np.integer)):
            data = self._tok.token_bytes(ids)
        else:
            data = b"".join(self._tok.token_bytes(i) for i in np.asarray(ids).reshape(-1).tolist())
        return self._dec.decode(data, final=False)

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    def reset(self) -> None:
        self._dec.reset()


# -------------------------------------------------------------------- helpers
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class _IdsMemo:
    """The ids of pre-tokens met before: `index` maps a pre-token to its row, whose ids are
    flat[offsets[row]:offsets[row] + lengths[row]]. `rows` and `gather` turn a list of
    pre-tokens into their ids with one C-level pass of dict lookups and a few NumPy
    operations (no Python code, and no Python int, per pre-token met before)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.index: dict[str, int] = {}
        self.flat = np.zeros(1 << 12, np.int32)
        self.offsets = np.zeros(1 << 10, np.int64)
        self.lengths = np.zeros(1 << 10, np.int64)
        self.used = 0  # of flat

    def __len__(self) -> int:
        return len(self.index)

    def add(self, piece: str, ids: list[int]) -> None:
        row = len(self.index)
        if row == len(self.offsets):
            self.offsets, self.lengths = np.resize(self.offsets, 2 * row), np.resize(self.lengths, 2 * row)
        if self.used + len(ids) > len(self.flat):
            self.flat = np.resize(self.flat, 2 * (self.used + len(ids)))
        self.offsets[row], self.lengths[row] = self.used, len(ids)
        self.flat[self.used:self.used + len(ids)] = ids
        self.used += len(ids)
        self.index[piece] = row

    def rows(self, pieces: list[str]) -> np.ndarray:
        """Each pre-token's row, -1 for those not held (one C-level pass of dict lookups)."""
        return np.fromiter(map(self.index.get, pieces, itertools.repeat(-1)), np.int64, len(pieces))

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The ids of the pre-tokens of `rows`, one after another."""
        lengths = self.lengths[rows]
        ends = np.cumsum(lengths)
        # position t of the output reads flat[offsets[row] + (t - start of its pre-token)]
        shift = np.repeat(self.offsets[rows] - (ends - lengths), lengths)
        return self.flat[np.arange(int(ends[-1]) if len(ends) else 0) + shift]


def _pretokens(text: str) -> list[str]:
    """GPT-2's pre-tokens of `text` (PRETOKEN.findall(text)), its ASCII stretches split
    with the faster PRETOKEN_ASCII."""
    if text.isascii():
        return PRETOKEN_ASCII.findall(text)
    pieces: list[str] = []
    pos = 0  # where the text not yet split starts: 0 or a _LINE_CUT
    while m := _NON_ASCII.search(text, pos):
        start = text.rfind("\n", pos, m.start())  # the last _LINE_CUT before the non-ASCII character, else pos
        while start > pos and text[start - 1].isspace():
            start = text.rfind("\n", pos, start)
        start = max(start, pos)
        cut = _LINE_CUT.search(text, max(m.end(), start + NON_ASCII_REGION))
        end = cut.start() if cut else len(text)
        pieces += PRETOKEN_ASCII.findall(text, pos, start)
        pieces += PRETOKEN.findall(text, start, end)
        pos = end
    pieces += PRETOKEN_ASCII.findall(text, pos)
    return pieces


def _chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of `text` of about `size` characters, cut only at _BOUNDARY."""
    start = 0
    while start < len(text):
        m = _BOUNDARY.search(text, start + size)
        end = m.start() if m else len(text)
        yield text[start:end]
        start = end


def _training_pieces(text: str) -> Iterator[str]:
    """The pieces of `_chunks`, with runs of more than MAX_RUN characters cut after every MAX_RUN."""
    for chunk in _chunks(text, CHUNK):
        start = 0
        for m in _RUN.finditer(chunk):
            yield chunk[start:m.end()]
            start = m.end()
        if start < len(chunk):
            yield chunk[start:]


def _check_layout(hf: tokenizers.Tokenizer) -> list[bytes]:
    """The bytes of every token of `hf`, by id; ValueError unless `hf` turns every string
    into ids 0..n-1 and back exactly (the layout described at the top of this module)."""
    model = hf.model
    if not isinstance(model, models.BPE):
        raise ValueError(f"its model is {type(model).__name__}, not BPE")
    if model.dropout or model.continuing_subword_prefix or model.end_of_word_suffix:
        raise ValueError("its BPE model has dropout, a subword prefix or a word suffix")
    if hf.normalizer is not None:
        raise ValueError("it has a normalizer")
    pre = hf.pre_tokenizer
    if not isinstance(pre, pre_tokenizers.ByteLevel) or pre.add_prefix_space or not pre.use_regex:
        raise ValueError("its pre-tokenizer is not ByteLevel with GPT-2's regex and without a prefix space")
    if not isinstance(hf.decoder, decoders.ByteLevel):
        raise ValueError("its decoder is not ByteLevel")
    if hf.truncation is not None or hf.padding is not None:
        raise ValueError("it truncates or pads")
    vocab = hf.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("its token ids are not 0..n-1")
    missing = set(_BYTE_CHARS).difference(hf.get_vocab(with_added_tokens=False))
    if missing:
        raise ValueError(f"{len(missing)} of the {N_BYTES} byte tokens are missing")
    table = [_token_bytes(token) for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    for i, added in hf.get_added_tokens_decoder().items():
        if table[i] != added.content.encode("utf-8"):
            raise ValueError(f"its added token {i} ({added.content!r}) does not decode to its own text")
        if added.lstrip or added.rstrip or added.single_word or any(c.isspace() for c in added.content):
            # such a token could match across a cut of _chunks, or not match next to one
            raise ValueError(f"its added token {i} ({added.content!r}) holds or strips spaces, or is single_word")
    return table


def _token_bytes(token: str) -> bytes:
    """The bytes tokenizers' ByteLevel decoder makes of a token: the bytes its characters
    stand for, or, for a token with a character that stands for no byte, its UTF-8."""
    try:
        return bytes(_CHAR_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")
