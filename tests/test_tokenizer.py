"""Tests of the byte-level BPE tokenizer and the shipped default corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gptc.tools.corpus import default_corpus_path, default_corpus_text
from gptc.tools.tokenizer import MAX_PIECE, StreamDecoder, Tokenizer, pretokenize

# Unicode ranges the random strings draw from: (first, last) code points, inclusive.
RANGES = [
    (0x20, 0x7E),  # printable ASCII
    (0x30, 0x39),  # digits, again, so digit runs are common
    (0xA0, 0xFF),  # Latin-1 supplement (incl. NBSP)
    (0x100, 0x17F),  # Latin extended-A
    (0x300, 0x36F),  # combining diacritical marks
    (0x391, 0x3C9),  # Greek
    (0x410, 0x44F),  # Cyrillic
    (0x5D0, 0x5EA),  # Hebrew
    (0x660, 0x669),  # Arabic-Indic digits (\d but not ASCII)
    (0x900, 0x97F),  # Devanagari (letters and vowel signs)
    (0x2000, 0x200D),  # spaces of many widths, zero-width joiner
    (0x2028, 0x2029),  # line/paragraph separators
    (0x3000, 0x3000),  # ideographic space
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xFE00, 0xFE0F),  # variation selectors
    (0x1F300, 0x1F6FF),  # emoji and pictographs
    (0x1F900, 0x1F9FF),  # more emoji
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers
    (0x10000, 0x1007F),  # Linear B (4-byte UTF-8, not emoji)
]
WHITESPACE = [" ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\r", "\x0b", "\x0c", "\x85", "   \t "]


def random_text(rng: np.random.Generator, n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.2:
            out.append(WHITESPACE[rng.integers(len(WHITESPACE))])
        elif r < 0.25:
            out.append(["'s", "'T", "'ll", "'VE", "'re", "'d", "'m", "'"][rng.integers(8)])
        else:
            lo, hi = RANGES[rng.integers(len(RANGES))]
            out.append(chr(int(rng.integers(lo, hi + 1))))
    return "".join(out)


SAMPLE = (
    "Hello, world! It's a test: don't PANIC, we'll see. 1234 + 56 = 1290.\n"
    "\tTabs\tand  double  spaces,   and trailing   \n"
    "naïve café, Größe, ﬁne; 東京は晴れ。 😀👍🏽 👨‍👩‍👧 e\u0301 "
    "snake_case_name __dunder__ x=y*(z-1) ... !!! ??? \r\n\r\n"
)


@pytest.fixture(scope="module")
def corpus() -> str:
    return default_corpus_text()


@pytest.fixture(scope="module")
def small_text(corpus: str) -> str:
    return corpus[:60_000] + SAMPLE * 20


@pytest.fixture(scope="module")
def tok(small_text: str) -> Tokenizer:
    return Tokenizer.train(small_text, 600)


# ----------------------------------------------------------------- pre-tokens
def test_pretokenize_covers_everything():
    rng = np.random.default_rng(1)
    for _ in range(200):
        s = random_text(rng, int(rng.integers(0, 80)))
        assert "".join(pretokenize(s)) == s
    assert "".join(pretokenize(SAMPLE)) == SAMPLE


def test_pretokenize_gpt2_style():
    assert pretokenize("Hello world") == ["Hello", " world"]
    assert pretokenize("don't we'll I'M") == ["don", "'t", " we", "'ll", " I", "'M"]
    assert pretokenize("abc123 456") == ["abc", "123", " 456"]
    assert pretokenize("a   b") == ["a", "  ", " b"]
    assert pretokenize("hi!!! ...") == ["hi", "!!!", " ..."]
    assert pretokenize("end.\n\nNext") == ["end", ".", "\n\n", "Next"]
    assert pretokenize("x  \n") == ["x", "  \n"]


def test_pretokenize_caps_piece_length():
    s = "a" * 300 + " " * 1000 + "b" + " " * 200 + "\n" * 500 + "1" * 1000 + "!" * 999
    pieces = pretokenize(s)
    assert "".join(pieces) == s
    assert max(len(p) for p in pieces) <= 2 * MAX_PIECE


# ------------------------------------------------------------------ round trip
def test_byte_tokenizer_round_trip():
    t = Tokenizer()
    assert t.vocab_size == 256
    ids = t.encode(SAMPLE)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(SAMPLE.encode("utf-8"))
    assert t.decode(ids) == SAMPLE


def test_random_unicode_round_trip(tok: Tokenizer):
    rng = np.random.default_rng(12345)
    for _ in range(300):
        s = random_text(rng, int(rng.integers(0, 200)))
        ids = tok.encode(s)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
        assert tok.decode(ids) == s
        assert tok.decode(ids.tolist()) == s


def test_trained_on_unicode_round_trip():
    # merges inside multi-byte characters make tokens that are not valid UTF-8 alone
    rng = np.random.default_rng(7)
    train_text = "".join(random_text(rng, 50) for _ in range(200))
    t = Tokenizer.train(train_text, 400)
    assert any(_not_utf8(t.token_bytes(i)) for i in range(256, t.vocab_size))
    for _ in range(100):
        s = random_text(rng, int(rng.integers(0, 150)))
        assert t.decode(t.encode(s)) == s


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_round_trip_edge_cases(tok: Tokenizer):
    for s in ["", " ", "\n", "\t\t", " " * 1000, "a" * 5000, "\x00\x01\x7f", "\ufeffBOM", "\U0010ffff", SAMPLE]:
        assert tok.decode(tok.encode(s)) == s


def test_encode_compresses(tok: Tokenizer, small_text: str):
    ids = tok.encode(small_text)
    assert len(ids) < 0.5 * len(small_text.encode("utf-8"))
    assert tok.decode(ids) == small_text


def _apply_merges(piece: str, merges) -> list[int]:
    ids = list(piece.encode("utf-8"))
    for k, pair in enumerate(merges):
        out, i = [], 0
        while i < len(ids):
            if i < len(ids) - 1 and (ids[i], ids[i + 1]) == pair:
                out.append(256 + k)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return ids


def test_encoding_applies_merges_in_order(tok: Tokenizer, small_text: str):
    # rank-based encoding equals applying every merge, in training order, to each piece
    rng = np.random.default_rng(2)
    pieces = sorted(set(pretokenize(small_text)))
    pieces += pretokenize(random_text(rng, 300)) + ["aaaaaaa", " " * 9, "abababab"]
    for piece in pieces[::3]:
        assert tok.encode(piece).tolist() == _apply_merges(piece, tok.merges)


# --------------------------------------------------------------------- decode
def test_decode_any_ids(tok: Tokenizer):
    rng = np.random.default_rng(3)
    for _ in range(50):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(0, 64)))
        s = tok.decode(ids)
        assert isinstance(s, str)
        assert s == tok.decode_bytes(ids).decode("utf-8", errors="replace")


def test_decode_rejects_out_of_range(tok: Tokenizer):
    for bad in ([tok.vocab_size], [-1], [1, 2, 10**9]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)
    with pytest.raises(ValueError):
        tok.decode(np.array([-1], dtype=np.int32))


def test_stream_decoder_matches_decode(tok: Tokenizer):
    rng = np.random.default_rng(11)
    for _ in range(100):
        s = random_text(rng, int(rng.integers(0, 100)))
        ids = tok.encode(s)
        dec = tok.stream_decoder()
        pieces = [dec.feed(int(i)) for i in ids]
        pieces.append(dec.flush())
        assert "".join(pieces) == s
        # never emits half a character: every piece is valid text on its own
        assert all("\ufffd" not in p for p in pieces)
    # arbitrary ids: same result as decode (replacement characters included)
    for _ in range(100):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(0, 40))).tolist()
        dec = StreamDecoder(tok)
        out = "".join(dec.feed(i) for i in ids) + dec.flush()
        assert out == tok.decode(ids)


def test_stream_decoder_holds_partial_characters():
    t = Tokenizer()
    dec = t.stream_decoder()
    emoji = "😀".encode("utf-8")
    assert [dec.feed(b) for b in emoji] == ["", "", "", "😀"]
    assert dec.feed(list(b"ok")) == "ok"
    assert dec.feed(emoji[0]) == ""
    assert dec.flush() == "\ufffd"
    assert dec.feed(np.array(list("é".encode()), dtype=np.int32)) == "é"


# ---------------------------------------------------------------------- train
def test_vocab_size_exact(small_text: str):
    for vs in (256, 257, 300, 777):
        t = Tokenizer.train(small_text, vs)
        assert t.vocab_size == vs == len(t)
        assert len(t.merges) == vs - 256
        assert len({t.token_bytes(i) for i in range(vs)}) == vs  # no duplicate tokens


def test_deterministic(small_text: str):
    a = Tokenizer.train(small_text, 700)
    b = Tokenizer.train(small_text, 700)
    assert a.merges == b.merges
    assert a.to_json() == b.to_json()
    # a prefix of the merges is the tokenizer trained to a smaller size
    c = Tokenizer.train(small_text, 500)
    assert a.merges[:244] == c.merges


def _naive_merges(text: str, n: int) -> list[tuple[int, int]]:
    words = Counter(tuple(p.encode("utf-8")) for p in pretokenize(text))
    merges = []
    for k in range(n):
        pairs: Counter = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_id = 256 + k
        nxt: Counter = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            nxt[tuple(out)] += f
        words = nxt
    return merges


def test_matches_naive_bpe():
    rng = np.random.default_rng(5)
    text = SAMPLE * 3 + "aaaaaaa aaaa aaa abababab " * 5 + "".join(random_text(rng, 30) for _ in range(30))
    assert Tokenizer.train(text, 256 + 150).merges == _naive_merges(text, 150)


def test_too_small_corpus():
    with pytest.raises(ValueError, match="lower vocab_size") as e:
        Tokenizer.train("hello hello", 1000)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="lower vocab_size"):
        Tokenizer.train("", 257)
    # exactly the number of merges available works
    t = Tokenizer.train("hello", 260)
    assert t.vocab_size == 260 and t.encode("hello").tolist() == [259]
    with pytest.raises(ValueError, match="at most 260"):
        Tokenizer.train("hello", 261)


def test_at_most_stops_where_the_text_runs_out_of_pairs():
    assert Tokenizer.train("hello", 1000, at_most=True) == Tokenizer.train("hello", 260)
    assert Tokenizer.train("hello hello", 258, at_most=True).vocab_size == 258


def test_vocab_size_below_bytes():
    with pytest.raises(ValueError, match=">= 256"):
        Tokenizer.train("some text", 255)
    with pytest.raises(TypeError):
        Tokenizer.train("some text", 300.0)


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path):
    p = tok.save(tmp_path)
    assert p == tmp_path / "tokenizer.json"
    obj = json.loads(p.read_text())
    assert obj["version"] == 1 and obj["vocab_size"] == tok.vocab_size
    assert obj["merges"] == [list(m) for m in tok.merges]
    t2 = Tokenizer.load(tmp_path)
    assert t2 == tok and t2.merges == tok.merges
    t3 = Tokenizer.load(p)
    assert t3.encode(SAMPLE).tolist() == tok.encode(SAMPLE).tolist()
    # deterministic bytes, and no temporary files left behind
    q = tok.save(tmp_path / "again.json")
    assert q.read_bytes() == p.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["again.json", "tokenizer.json"]
    # overwriting works (os.replace)
    Tokenizer().save(p)
    assert Tokenizer.load(p).vocab_size == 256


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'{"format": "gptc-bpe"}',
        b'{"format": "other", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 256, "merges": []}',
        b'{"format": "gptc-bpe", "version": 2, "pretokenizer": "gptc-re-v1", "vocab_size": 256, "merges": []}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "x", "vocab_size": 256, "merges": []}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 258, "merges": [[1, 2]]}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 257, "merges": [[1, 256]]}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 257, "merges": [[1, -1]]}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 257, "merges": [[1]]}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 257, "merges": [[1, "2"]]}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 257, "merges": [[1, true]]}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 258, "merges": [[1, 2], [1, 2]]}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": "256", "merges": []}',
        b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 256, "merges": {}}',
    ],
)
def test_load_rejects_invalid(tmp_path: Path, content: bytes):
    p = tmp_path / "tokenizer.json"
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        Tokenizer.load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg


def test_load_rejects_truncated(tok: Tokenizer, tmp_path: Path):
    p = tok.save(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.load(p)


def test_load_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nope.json")


def test_constructor_validates_merges():
    with pytest.raises(ValueError):
        Tokenizer([(0, 300)])
    assert Tokenizer([(104, 105)]).encode("hi").tolist() == [256]


# ----------------------------------------------------------------- the corpus
def test_default_corpus(corpus: str):
    assert isinstance(corpus, str)
    assert len(corpus.encode("utf-8")) >= 1_000_000
    assert corpus.startswith("THE TRAGEDY OF TITUS ANDRONICUS")
    assert "\r" not in corpus and corpus.endswith("\n")
    assert "gutenberg" not in corpus.lower()
    # English prose/verse: mostly letters and spaces, common words frequent
    words = Counter(re.findall(r"[a-z]+", corpus.lower()))
    assert words["the"] > 10_000 and words["and"] > 10_000


def test_default_corpus_checksum_matches_provenance():
    md = (Path(default_corpus_path()).parent / "CORPUS.md").read_text(encoding="utf-8")
    raw = gzip.decompress(default_corpus_path().read_bytes())
    assert hashlib.sha256(raw).hexdigest() in md
    assert hashlib.sha256(default_corpus_path().read_bytes()).hexdigest() in md
