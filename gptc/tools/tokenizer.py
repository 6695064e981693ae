"""Byte-level BPE tokenizer (GPT-2 style), pure Python + NumPy.

Vocabulary: ids 0..255 are the 256 single bytes, so every string encodes (no
unknown token) and decodes back exactly. Ids 256.. are learned merges, in the
order they were learned: token 256+k is the concatenation of the two tokens of
merge k, and a lower id means an earlier (higher priority) merge.

Pre-tokenization follows GPT-2 with the stdlib `re` module: contractions ('s 't
're 've 'm 'll 'd), letter runs with an optional leading space, digit runs with
an optional leading space, runs of other symbols with an optional leading space,
and whitespace runs (a whitespace run followed by a word leaves its last space
to the word). Merges never cross pre-token boundaries. Two departures from
GPT-2: a run of line breaks, with the whitespace before it, is one pre-token
("\n\n" is one piece, as in the GPT-4 pattern, where GPT-2 splits it in two);
and every run is cut after MAX_PIECE characters (so no pre-token is longer
than 2 * MAX_PIECE characters; longer runs become consecutive pieces), which bounds the cost of pathological inputs (a megabyte
of spaces or of one letter) and never matters for natural text.

Training counts the unique pre-tokens once, then merges incrementally: a
pair -> count map, a pair -> words index and a max-heap with lazy deletion, so
each merge only touches the words that contain the merged pair. Ties between
equally frequent pairs go to the smallest (left id, right id), so training is
deterministic. Encoding caches the ids of each unique pre-token.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gptc.common import write_atomic

__all__ = ["Tokenizer", "StreamDecoder", "pretokenize", "FORMAT", "FORMAT_VERSION", "MAX_PIECE"]

FORMAT = "gptc-bpe"
FORMAT_VERSION = 1
PRETOKENIZER = "gptc-re-v1"  # names PATTERN below; bump it if the pattern ever changes
TOKENIZER_FILE = "tokenizer.json"
N_BYTES = 256
MAX_PIECE = 128  # most characters in one run of a class; a pre-token has at most 2 * MAX_PIECE

# Character classes built from stdlib `re` (no \p{..}):
#   letters  [^\W\d_]   word characters that are neither decimal digits nor '_'
#   digits   \d         Unicode decimal digits
#   other    [^\s\w]|_  neither whitespace nor word character (punctuation,
#                       symbols, emoji, combining marks, ...), plus '_' as in GPT-2
# Every character falls in exactly one of letters, digits, other, whitespace, so
# the alternatives below cover any string: "".join(pretokenize(s)) == s.
_M = MAX_PIECE
PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    rf"| ?[^\W\d_]{{1,{_M}}}"
    rf"| ?\d{{1,{_M}}}"
    rf"| ?(?:[^\s\w]|_){{1,{_M}}}"
    rf"|\s{{0,{_M}}}[\r\n]{{1,{_M}}}"
    rf"|\s{{1,{_M}}}(?!\S)"
    rf"|\s{{1,{_M}}}"
)
_PAT = re.compile(PATTERN)


def pretokenize(text: str) -> list[str]:
    """Split text into pre-tokens; their concatenation is exactly `text`."""
    return _PAT.findall(text)


class Tokenizer:
    """Byte-level BPE tokenizer.

    Build one with `Tokenizer.train(text, vocab_size)` or `Tokenizer.load(path)`;
    `Tokenizer()` is the plain 256-byte vocabulary.
    """

    def __init__(self, merges: Iterable[Sequence[int]] = ()):
        merges = [tuple(m) for m in merges]
        _check_merges(merges)
        self._merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self._ranks: dict[tuple[int, int], int] = {}
        vocab = [bytes([i]) for i in range(N_BYTES)]
        for k, (a, b) in enumerate(self._merges):
            self._ranks[(a, b)] = N_BYTES + k
            vocab.append(vocab[a] + vocab[b])
        self._vocab: list[bytes] = vocab
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The learned merges in order: merge k makes token 256 + k."""
        return list(self._merges)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes that token `token_id` stands for."""
        return self._vocab[self._check_id(token_id)]

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self._merges == other._merges

    def __hash__(self) -> int:
        return hash(tuple(self._merges))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, text: str, vocab_size: int, at_most: bool = False) -> "Tokenizer":
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
        n_merges = vocab_size - N_BYTES
        merges = _learn_merges(text, n_merges) if n_merges else []
        if len(merges) < n_merges and not at_most:
            raise ValueError(
                f"corpus too small for vocab_size={vocab_size}: its {len(text)} characters yield only "
                f"{N_BYTES + len(merges)} tokens; lower vocab_size to at most {N_BYTES + len(merges)} or give more text"
            )
        return cls(merges)

    # ---------------------------------------------------------------- encoding
    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = list(piece.encode("utf-8"))
        ranks = self._ranks
        while len(ids) > 1:
            best = None
            best_rank = 1 << 62
            for pair in zip(ids, ids[1:]):
                r = ranks.get(pair)
                if r is not None and r < best_rank:
                    best_rank, best = r, pair
            if best is None:
                break
            a, b = best
            out = []
            i, n = 0, len(ids)
            while i < n:
                if i < n - 1 and ids[i] == a and ids[i + 1] == b:
                    out.append(best_rank)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return tuple(ids)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as a 1-D int32 array."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, not {type(text).__name__}")
        cache = self._cache
        if len(cache) > 1_000_000:  # bound memory on endless streams of new words
            cache.clear()
        out: list[int] = []
        extend = out.extend
        for piece in _PAT.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = self._encode_piece(piece)
            extend(ids)
        return np.array(out, dtype=np.int32)

    # ---------------------------------------------------------------- decoding
    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._vocab):
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self._vocab)})")
        return i

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of a sequence of token ids."""
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape {ids.shape}")
            ids = ids.tolist()
        elif not isinstance(ids, list):
            ids = list(ids)
        if not ids:
            return b""
        vocab = self._vocab
        try:
            parts = [vocab[i] for i in ids]
            if min(ids) >= 0:  # a negative index would wrap around silently
                return b"".join(parts)
        except (IndexError, TypeError):
            pass
        return b"".join([vocab[self._check_id(i)] for i in ids])

    def decode(self, ids) -> str:
        """Text of a sequence of token ids (invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder to feed ids one at a time while generating."""
        return StreamDecoder(self)

    # ------------------------------------------------------------ persistence
    def to_json(self) -> str:
        """The deterministic JSON text written by `save` (one merge per line)."""
        head = (
            f'{{\n"format": "{FORMAT}",\n"version": {FORMAT_VERSION},\n'
            f'"pretokenizer": "{PRETOKENIZER}",\n"vocab_size": {self.vocab_size},\n"merges": ['
        )
        body = ",\n".join(f"[{a}, {b}]" for a, b in self._merges)
        return head + ("\n" + body + "\n" if body else "") + "]\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer atomically. `path` is a file, or a directory that gets `tokenizer.json`."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        data = self.to_json().encode("utf-8")
        write_atomic(path, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a file written by `save` (or a directory holding `tokenizer.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        raw = path.read_bytes()  # a missing file raises FileNotFoundError
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a tokenizer file (invalid JSON: {_one_line(e)})") from None
        try:
            return cls._from_obj(obj)
        except ValueError as e:
            raise ValueError(f"{path}: invalid tokenizer file: {_one_line(e)}") from None

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        """Parse the content of a tokenizer.json (as `to_json` writes it)."""
        try:
            return cls._from_obj(json.loads(text))
        except ValueError as e:
            raise ValueError(f"invalid tokenizer: {_one_line(e)}") from None

    @classmethod
    def _from_obj(cls, obj) -> "Tokenizer":
        if not isinstance(obj, dict):
            raise ValueError("top level is not a JSON object")
        if obj.get("format") != FORMAT:
            raise ValueError(f"format is {obj.get('format')!r}, expected {FORMAT!r}")
        if obj.get("version") != FORMAT_VERSION or isinstance(obj.get("version"), bool):
            raise ValueError(f"version is {obj.get('version')!r}, this gptc reads version {FORMAT_VERSION}")
        if obj.get("pretokenizer") != PRETOKENIZER:
            raise ValueError(f"pretokenizer is {obj.get('pretokenizer')!r}, expected {PRETOKENIZER!r}")
        vs = obj.get("vocab_size")
        if not _is_int(vs) or vs < N_BYTES:
            raise ValueError(f"vocab_size is {vs!r}, expected an int >= {N_BYTES}")
        merges = obj.get("merges")
        if not isinstance(merges, list):
            raise ValueError("merges is not a list")
        if len(merges) != vs - N_BYTES:
            raise ValueError(f"{len(merges)} merges do not match vocab_size {vs} (expected {vs - N_BYTES})")
        for k, m in enumerate(merges):
            if not (isinstance(m, list) and len(m) == 2 and all(_is_int(x) for x in m)):
                raise ValueError(f"merge {k} is {m!r}, expected a pair of token ids")
        return cls(merges)


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

    def feed(self, ids) -> str:
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
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _check_merges(merges: list) -> None:
    seen = set()
    for k, m in enumerate(merges):
        if len(m) != 2 or not all(_is_int(x) or isinstance(x, np.integer) for x in m):
            raise ValueError(f"merge {k} is {m!r}, expected a pair of token ids")
        a, b = int(m[0]), int(m[1])
        limit = N_BYTES + k
        if not (0 <= a < limit and 0 <= b < limit):
            raise ValueError(f"merge {k} ({a}, {b}) uses a token id outside [0, {limit})")
        if (a, b) in seen:
            raise ValueError(f"merge {k} ({a}, {b}) repeats an earlier merge")
        seen.add((a, b))


def _learn_merges(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Up to n_merges BPE merges over the pre-tokens of text (fewer if it runs out of pairs)."""
    counts = Counter(_PAT.findall(text))
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, c in counts.items():
        b = piece.encode("utf-8")
        if len(b) > 1:  # single bytes hold no pair
            words.append(list(b))
            freqs.append(c)

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, w in enumerate(words):
        f = freqs[wi]
        for p in zip(w, w[1:]):
            pair_counts[p] = pair_counts.get(p, 0) + f
            s = where.get(p)
            if s is None:
                where[p] = {wi}
            else:
                s.add(wi)
    # max-heap by count, ties to the smallest pair; stale entries skipped on pop
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges:
        best = None
        while heap:
            negc, p = heapq.heappop(heap)
            if pair_counts.get(p, 0) == -negc:
                best = p
                break
        if best is None:
            break
        new_id = N_BYTES + len(merges)
        merges.append(best)
        a, b = best
        delta: dict[tuple[int, int], int] = {}
        for wi in where.pop(best, ()):
            w = words[wi]
            n = len(w)
            out = []
            i = 0
            hit = False
            while i < n:
                if i < n - 1 and w[i] == a and w[i + 1] == b:
                    out.append(new_id)
                    i += 2
                    hit = True
                else:
                    out.append(w[i])
                    i += 1
            if not hit:  # stale index entry
                continue
            f = freqs[wi]
            for q in zip(w, w[1:]):
                delta[q] = delta.get(q, 0) - f
            for q in zip(out, out[1:]):
                delta[q] = delta.get(q, 0) + f
                if q[0] == new_id or q[1] == new_id:
                    s = where.get(q)
                    if s is None:
                        where[q] = {wi}
                    else:
                        s.add(wi)
            words[wi] = out
        pair_counts.pop(best, None)
        delta.pop(best, None)
        for q, d in delta.items():
            if d == 0:
                continue
            c = pair_counts.get(q, 0) + d
            if c > 0:
                pair_counts[q] = c
                heapq.heappush(heap, (-c, q))
            else:
                pair_counts.pop(q, None)
                where.pop(q, None)
    return merges
