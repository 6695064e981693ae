"""Tests of the byte-level BPE tokenizer and the shipped default corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import tokenizers
from tokenizers import pre_tokenizers

import gptc.tools.tokenizer as tokenizer_module
from gptc.tools.corpus import default_corpus_path, default_corpus_text
from gptc.tools.tokenizer import _BYTE_CHARS, _CHAR_BYTE, StreamDecoder, Tokenizer, _chunks

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


def hf_pieces(text: str) -> list[str]:
    """The pre-tokens of tokenizers' ByteLevel pre-tokenizer, in byte characters."""
    return [p for p, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]


def merges_of(t: Tokenizer) -> list[tuple[str, str]]:
    return [tuple(m) for m in json.loads(t.to_json())["model"]["merges"]]


def byte_ids(t: Tokenizer) -> dict[int, int]:
    """byte -> id of its token"""
    return {t.token_bytes(i)[0]: i for i in range(t.vocab_size) if len(t.token_bytes(i)) == 1}


# ----------------------------------------------------------- layout, byte map
def test_byte_characters_are_gpt2s():
    assert sorted(_BYTE_CHARS) == sorted(pre_tokenizers.ByteLevel.alphabet())
    # every byte that occurs in UTF-8 (all but C0, C1, F5..FF) maps as tokenizers maps it
    chars = [chr(c) for c in range(0x7FF)] + [chr(c) for c in range(0x800, 0x10000, 61) if not 0xD800 <= c < 0xE000]
    chars += [chr(c) for c in range(0x10000, 0x110000, 4099)]
    seen = set()
    for ch in chars:
        data = ch.encode("utf-8")
        seen.update(data)
        assert "".join(hf_pieces(ch)) == "".join(_BYTE_CHARS[b] for b in data)
    assert seen == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}


def test_python_whitespace_covers_tokenizers_whitespace():
    """_BOUNDARY relies on it: a character tokenizers' regex takes for a space (two of
    them between letters are two pre-tokens) is whitespace to Python's re."""
    code_points = [*range(0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x110000, 97)]
    spaces = [c for c in map(chr, code_points) if len(hf_pieces(f"a{c}{c}a")) == 4]
    assert len(spaces) >= 20 and all(re.fullmatch(r"\s", c) for c in spaces)


def test_boundaries_are_pre_token_boundaries():
    """Encoding the pieces of _chunks gives the ids of the whole text, whatever the piece size."""
    hf = tokenizers.Tokenizer.from_str(Tokenizer.train(SAMPLE * 3 + "a b\nc  d \n e", 400).to_json())
    rng = np.random.default_rng(4)
    for _ in range(200):
        s = random_text(rng, int(rng.integers(0, 120)))
        whole = hf.encode(s, add_special_tokens=False).ids
        for size in (1, 3, 17):
            pieces = list(_chunks(s, size))
            assert "".join(pieces) == s
            assert [i for p in pieces for i in hf.encode(p, add_special_tokens=False).ids] == whole


# ------------------------------------------------------------------ round trip
def test_byte_tokenizer_round_trip():
    t = Tokenizer.train(SAMPLE, 256)
    assert t.vocab_size == 256 and merges_of(t) == []
    assert sorted(t.token_bytes(i) for i in range(256)) == [bytes([b]) for b in range(256)]
    ids = t.encode(SAMPLE)
    assert ids.dtype == np.int32
    assert [t.token_bytes(i) for i in ids] == [bytes([b]) for b in SAMPLE.encode("utf-8")]
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
    for s in ["", " ", "\n", "\t\t", " " * 1000, "a" * 5000, "\x00\x01\x7f", "\ufeffBOM", "\U0010ffff", SAMPLE,
              "x" * 300_000 + " y\n" * 3]:
        assert tok.decode(tok.encode(s)) == s


def test_encode_compresses(tok: Tokenizer, small_text: str):
    ids = tok.encode(small_text)
    assert len(ids) < 0.5 * len(small_text.encode("utf-8"))
    assert tok.decode(ids) == small_text


def _merge(symbols, pair: tuple[str, str]) -> list[str]:
    """`symbols` with every occurrence of `pair`, left to right, joined into one symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _apply_merges(piece: str, merges) -> list[str]:
    symbols = list(piece)
    for pair in merges:
        symbols = _merge(symbols, pair)
    return symbols


def test_encoding_applies_merges_in_order(tok: Tokenizer, small_text: str):
    # encoding equals applying every merge, in training order, to each pre-token
    rng = np.random.default_rng(2)
    vocab = json.loads(tok.to_json())["model"]["vocab"]
    pieces = sorted(set(hf_pieces(small_text)))
    pieces += hf_pieces(random_text(rng, 300)) + ["aaaaaaa", "Ġ" * 9, "abababab"]
    merges = merges_of(tok)
    for piece in pieces[::3]:
        text = bytes(_CHAR_BYTE[c] for c in piece).decode("utf-8")
        assert tok.encode(text).tolist() == [vocab[s] for s in _apply_merges(piece, merges)]


def test_a_standard_tokenizers_file(tok: Tokenizer, tmp_path: Path):
    path = tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    for s in (SAMPLE, "", "naïve 😀\n\n  x"):
        ids = hf.encode(s).ids
        assert ids == tok.encode(s).tolist()
        assert hf.decode(ids) == s


def test_transformers_loads_it(tok: Tokenizer, tmp_path: Path):
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tok.save(tmp_path)))
    assert len(fast) == tok.vocab_size
    ids = fast.encode(SAMPLE)
    assert ids == tok.encode(SAMPLE).tolist()
    assert fast.decode(ids, clean_up_tokenization_spaces=False) == SAMPLE


# --------------------------------------------------------------------- decode
def test_decode_any_ids(tok: Tokenizer):
    rng = np.random.default_rng(3)
    for _ in range(200):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(0, 64)))
        s = tok.decode(ids)
        assert isinstance(s, str)
        assert s == b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def test_decode_rejects_bad_ids(tok: Tokenizer):
    for bad in ([tok.vocab_size], [-1], [1, 2, 10**9]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)
    with pytest.raises(ValueError):
        tok.decode(np.array([-1], dtype=np.int32))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[1, 2]])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(tok.vocab_size)


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
    t = Tokenizer.train("", 256)
    ids = byte_ids(t)
    dec = t.stream_decoder()
    emoji = "😀".encode("utf-8")
    assert [dec.feed(ids[b]) for b in emoji] == ["", "", "", "😀"]
    assert dec.feed([ids[b] for b in b"ok"]) == "ok"
    assert dec.feed(ids[emoji[0]]) == ""
    assert dec.flush() == "\ufffd"
    assert dec.feed(np.array([ids[b] for b in "é".encode()], dtype=np.int32)) == "é"


def test_added_tokens_round_trip(monkeypatch):
    """A tokenizers file with special tokens (GPT-2's has <|endoftext|>) loads, and they
    decode to their text, through decode and the stream decoder alike; encoding in pieces
    gives tokenizers' ids of the whole text."""
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.train_from_iterator([SAMPLE], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "€uro"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    t = Tokenizer.from_json(hf.to_str())
    assert t.vocab_size == 300 and t.token_bytes(0) == b"<|endoftext|>" and t.token_bytes(1) == "€uro".encode()
    s = "one<|endoftext|>two €uro three\n<|endoftext|> x<|endoftext|>\n"
    ids = t.encode(s)
    assert 0 in ids and 1 in ids and t.decode(ids) == s
    dec = t.stream_decoder()
    assert "".join(dec.feed(i) for i in ids) + dec.flush() == s
    monkeypatch.setattr(tokenizer_module, "CHUNK", 1)
    assert t.encode(s).tolist() == ids.tolist() == hf.encode(s, add_special_tokens=False).ids


# ---------------------------------------------------------------------- train
def test_vocab_size_exact(small_text: str):
    for vs in (256, 257, 300, 777):
        t = Tokenizer.train(small_text, vs)
        assert t.vocab_size == vs
        assert len({t.token_bytes(i) for i in range(vs)}) == vs  # no duplicate tokens


def test_deterministic(small_text: str):
    a = Tokenizer.train(small_text, 700)
    b = Tokenizer.train(small_text, 700)
    assert a == b and a.to_json() == b.to_json()
    assert Tokenizer.from_json(a.to_json()).to_json() == a.to_json()  # the file is canonical
    # a prefix of the merges is the tokenizer trained to a smaller size
    c = Tokenizer.train(small_text, 500)
    assert merges_of(a)[:244] == merges_of(c)


def test_training_is_bpe():
    """Each merge joins a most frequent pair of adjacent symbols within the pre-tokens
    (ties may go either way), and training stops only when no pair is left."""
    rng = np.random.default_rng(5)
    text = SAMPLE * 3 + "aaaaaaa aaaa aaa abababab " * 5 + "".join(random_text(rng, 30) for _ in range(30))
    words = Counter(tuple(p) for p in hf_pieces(text))
    t = Tokenizer.train(text, 100_000, at_most=True)
    for a, b in merges_of(t):
        pairs: Counter = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        assert pairs[(a, b)] == max(pairs.values())
        words = Counter({tuple(_merge(w, (a, b))): f for w, f in words.items()})
    assert all(len(w) == 1 for w in words)


def test_training_in_pieces_equals_training_on_the_whole_text(small_text: str, monkeypatch):
    whole = tokenizers.Tokenizer(tokenizers.models.BPE())
    whole.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    whole.decoder = tokenizers.decoders.ByteLevel()
    whole.train_from_iterator([small_text], tokenizers.trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    monkeypatch.setattr(tokenizer_module, "CHUNK", 100)
    assert Tokenizer.train(small_text, 600).to_json() == whole.to_str()


def test_long_runs_train_fast():
    """Runs of one character class are cut for training (tokenizers' trainer takes time
    quadratic in a word's length): a 300,000-letter word trains in well under a second."""
    text = "a" * 300_000 + " " * 300_000 + "ab" * 100_000 + " end\n"
    started = time.perf_counter()
    t = Tokenizer.train(text, 300, at_most=True)
    assert time.perf_counter() - started < 10  # about 25 s uncut
    assert t.vocab_size > 256 and t.decode(t.encode(text)) == text


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


def test_bad_arguments():
    with pytest.raises(ValueError, match=">= 256"):
        Tokenizer.train("some text", 255)
    with pytest.raises(TypeError):
        Tokenizer.train("some text", 300.0)
    with pytest.raises(TypeError):
        Tokenizer.train(b"bytes", 300)
    with pytest.raises(TypeError):
        Tokenizer.train("", 256).encode(b"bytes")


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path):
    p = tok.save(tmp_path)
    assert p == tmp_path / "tokenizer.json"
    obj = json.loads(p.read_text())
    assert obj["model"]["type"] == "BPE" and len(obj["model"]["vocab"]) == tok.vocab_size
    assert obj["added_tokens"] == [] and obj["normalizer"] is None
    t2 = Tokenizer.load(tmp_path)
    assert t2 == tok and t2.vocab_size == tok.vocab_size
    t3 = Tokenizer.load(p)
    assert t3.encode(SAMPLE).tolist() == tok.encode(SAMPLE).tolist()
    # deterministic bytes, and no temporary files left behind
    q = tok.save(tmp_path / "again.json")
    assert q.read_bytes() == p.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["again.json", "tokenizer.json"]
    # overwriting works (os.replace)
    Tokenizer.train("", 256).save(p)
    assert Tokenizer.load(p).vocab_size == 256


def _edit(**edits):
    """A change to a valid tokenizer.json: key paths separated by '/', value None deletes."""
    def apply(obj: dict) -> dict:
        for path, value in edits.items():
            *parents, key = path.split("/")
            node = obj
            for k in parents:
                node = node[k]
            if value is _DELETE:
                del node[key]
            else:
                node[key] = value
        return obj
    return apply


_DELETE = object()


def _without_a_byte_token(obj: dict) -> dict:
    """The token for byte 0 replaced by the last learned token (ids stay 0..n-1)."""
    vocab = obj["model"]["vocab"]
    free = vocab.pop("Ā")
    vocab[max(vocab, key=vocab.get)] = free
    return obj
OLD_FORMAT = b'{"format": "gptc-bpe", "version": 1, "pretokenizer": "gptc-re-v1", "vocab_size": 257, "merges": [[1, 2]]}'


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "invalid JSON"),
        (b"not json", "invalid JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"[]", "not a tokenizers file"),
        (b"{}", "not a tokenizers file"),
        (OLD_FORMAT, "former hand-written BPE (format 'gptc-bpe'), which this gptc no longer reads"),
        (_edit(**{"model/type": "WordLevel", "model/unk_token": "a"}), "its model is WordLevel, not BPE"),
        (_edit(**{"model/dropout": 0.5}), "dropout"),
        (_edit(normalizer={"type": "NFC"}), "it has a normalizer"),
        (_edit(**{"pre_tokenizer/add_prefix_space": True}), "not ByteLevel with GPT-2's regex and without a prefix"),
        (_edit(**{"pre_tokenizer/use_regex": False}), "not ByteLevel with GPT-2's regex and without a prefix"),
        (_edit(pre_tokenizer={"type": "Whitespace"}), "not ByteLevel with GPT-2's regex and without a prefix"),
        (_edit(decoder=None), "its decoder is not ByteLevel"),
        (_edit(truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}),
         "it truncates or pads"),
        (_edit(**{"model/vocab/Ā": 10**6}), "its token ids are not 0..n-1"),
        (_edit(added_tokens=[{"id": 0, "content": "é!", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}]),
         "('é!') does not decode to its own text"),
        (_edit(added_tokens=[{"id": 0, "content": "<|end of text|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}]),
         "('<|end of text|>') holds or strips spaces, or is single_word"),
        (_edit(added_tokens=[{"id": 0, "content": "<|eot|>", "single_word": False, "lstrip": False, "rstrip": True,
                              "normalized": False, "special": True}]),
         "('<|eot|>') holds or strips spaces, or is single_word"),
        (_edit(**{"model/vocab/Ā": _DELETE}), "its token ids are not 0..n-1"),
        (_without_a_byte_token, "1 of the 256 byte tokens are missing"),
        (_edit(**{"model/merges": [["x", "not-a-token"]]}), "not a tokenizers file"),
        (_edit(**{"model/vocab": "x"}), "not a tokenizers file"),
    ],
)
def test_load_rejects_invalid(tok: Tokenizer, tmp_path: Path, content, message: str):
    if callable(content):
        content = json.dumps(content(json.loads(tok.to_json()))).encode()
    p = tmp_path / "tokenizer.json"
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        Tokenizer.load(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ") and message in msg
    with pytest.raises(ValueError, match="^invalid tokenizer: "):
        Tokenizer.from_json(content.decode("utf-8", errors="replace"))


def test_load_rejects_truncated(tok: Tokenizer, tmp_path: Path):
    p = tok.save(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.load(p)


def test_load_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nope.json")


def test_the_corpus_cache_key_names_the_tokenizer_implementation(monkeypatch):
    from gptc.tools.data import corpus_key
    assert tokenizers.__version__ in tokenizer_module.TRAINER_ID
    key = corpus_key(SAMPLE, 300)
    assert corpus_key(SAMPLE, 301) != key
    monkeypatch.setattr(tokenizer_module, "TRAINER_ID", tokenizer_module.TRAINER_ID + "x")
    assert corpus_key(SAMPLE, 300) != key


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


def _tokenizers_alone(tok: Tokenizer, text: str) -> list[int]:
    """What `tokenizers` itself encodes `text` to (its own pre-tokenizer, no memo)."""
    return tok._hf.encode(text, add_special_tokens=False).ids


def test_memoized_encoding_equals_tokenizers_own():
    """encode splits pre-tokens with Python's regex and keeps their ids: it must give
    exactly what tokenizers gives, on the corpus (twice: the second from the memo) and on
    random text of letters, digits, marks, spaces of every kind, emoji and contractions."""
    import random
    text = default_corpus_text()
    tok = Tokenizer.train(text[:300_000], 2000)
    expected = _tokenizers_alone(tok, text[:400_000])
    assert tok.encode(text[:400_000]).tolist() == expected
    assert tok.encode(text[:400_000]).tolist() == expected
    rng = random.Random(7)
    alphabet = list("aZé漢字 \t\n\r\u00a0\u2028\u3000.,!?-_'0123456789٣") + ["😀", "'s", "'ll", "\u0301", "  "]
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert tok.encode(s).tolist() == _tokenizers_alone(tok, s), repr(s)


def test_memo_stays_bounded(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MEMO_SIZE", 10)
    tok = Tokenizer.train(default_corpus_text()[:50_000], 300)
    words = " ".join(f"w{i}" for i in range(100))
    assert tok.encode(words).tolist() == _tokenizers_alone(tok, words)
    assert len(tok._memo) <= 10


# Random text that stresses encode's fast paths: the ASCII pattern (all 128 ASCII
# characters, contractions and their upper-case look-alikes GPT-2 does not split off, runs
# of spaces before line breaks and at the end) and the regex one (non-ASCII letters,
# digits and spaces, emoji, mixed scripts).
ASCII_PARTS = ([chr(c) for c in range(128)] + list("aZq09 ") * 8
               + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ll", "''s", "'x",
                  "   \n", "  \n\n", " \t\n", "\r\n", "\r\n\r\n", "\t\t", "  ", "\x0b\x0c", "\x1c\x1d ", "don't", "1,234"])
UNICODE_PARTS = ["é", "ß", "Ω", "ж", "漢字", "١٢", "٣", "½", "Ⅻ", "\u00a0", "\u2003", "\u3000", "\u2028", "\x85",
                 "😀", "👍🏽", "👨\u200d👩\u200d👧", "e\u0301", "ﬁ", "İ", "ǅ", "'ſ", "'Ｓ", " é", " ١"]


def stress_text(rng: np.random.Generator, n: int, ascii_only: bool) -> str:
    parts = ASCII_PARTS if ascii_only else ASCII_PARTS + UNICODE_PARTS * 3
    text = "".join(parts[i] for i in rng.integers(len(parts), size=n))
    return text + [" ", "   ", " \n", "\t", ""][rng.integers(5)]  # sometimes spaces at the very end


def test_ascii_pattern_equals_gpt2s_on_ascii():
    """PRETOKEN_ASCII (stdlib re) splits ASCII text as PRETOKEN (regex) and as tokenizers'
    own ByteLevel pre-tokenizer do."""
    rng = np.random.default_rng(21)
    for _ in range(3000):
        s = stress_text(rng, int(rng.integers(0, 60)), ascii_only=True)
        pieces = tokenizer_module.PRETOKEN_ASCII.findall(s)
        assert pieces == tokenizer_module.PRETOKEN.findall(s), repr(s)
        assert ["".join(_BYTE_CHARS[ord(c)] for c in p) for p in pieces] == hf_pieces(s), repr(s)


def test_fast_encoding_equals_tokenizers_own_on_stress_text():
    """encode (pure-ASCII texts through PRETOKEN_ASCII, others through PRETOKEN, ids from
    the memo) gives exactly tokenizers' ids, on texts met fresh and met again."""
    rng = np.random.default_rng(22)
    tok = Tokenizer.train("".join(stress_text(rng, 40, ascii_only=k % 2 == 0) for k in range(400)) + SAMPLE * 5, 700)
    texts = [stress_text(rng, int(rng.integers(0, 150)), ascii_only=k % 2 == 0) for k in range(800)]
    assert sum(t.isascii() for t in texts) >= 400 and sum(not t.isascii() for t in texts) >= 350
    for s in texts + texts[::-1]:
        assert tok.encode(s).tolist() == _tokenizers_alone(tok, s), repr(s)
    whole = "".join(texts)
    assert tok.encode(whole).tolist() == _tokenizers_alone(tok, whole)


def test_memo_overflow_keeps_ids_exact(monkeypatch):
    """A text with more distinct pre-tokens than MEMO_SIZE, or one that overflows a full
    memo, still encodes exactly, and the memo stays within its bound."""
    monkeypatch.setattr(tokenizer_module, "MEMO_SIZE", 50)
    tok = Tokenizer.train(default_corpus_text()[:50_000], 300)
    rng = np.random.default_rng(23)
    for n in (10, 40, 49, 50, 51, 120, 400):
        s = " ".join(f"w{i % n}" for i in rng.integers(n, size=3 * n)) + " the end"
        assert tok.encode(s).tolist() == _tokenizers_alone(tok, s)
        assert len(tok._memo) <= 50


@pytest.mark.parametrize("region", [0, 1, 7, 60, tokenizer_module.NON_ASCII_REGION])
def test_mostly_ascii_text_splits_as_gpt2s(region: int, monkeypatch):
    """_pretokens (ASCII stretches through PRETOKEN_ASCII, stretches of at least
    NON_ASCII_REGION characters around non-ASCII ones through PRETOKEN, cut at line breaks
    after non-space characters) equals PRETOKEN on lines of ASCII and mixed text, some
    ending in spaces (no cut there) or empty, some non-ASCII at a line's start or end."""
    monkeypatch.setattr(tokenizer_module, "NON_ASCII_REGION", region)
    rng = np.random.default_rng(24)
    for _ in range(300):
        lines = [stress_text(rng, int(rng.integers(0, 12)), ascii_only=rng.random() < 0.7)
                 + ["", "", " ", "  \t", "é", "\u3000"][rng.integers(6)] for _ in range(int(rng.integers(0, 30)))]
        s = "\n".join(lines)
        assert tokenizer_module._pretokens(s) == tokenizer_module.PRETOKEN.findall(s), repr(s)
    tok = Tokenizer.train(SAMPLE * 20, 400)
    s = "\n".join(stress_text(rng, 30, ascii_only=k % 3 > 0) for k in range(300))
    assert tok.encode(s).tolist() == _tokenizers_alone(tok, s)
