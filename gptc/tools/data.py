"""Training data: finding it (files, directories, globs), reading text, opening token
shards (llm.c's .bin format: gptc/tools/shards.py), tokenizing text
(with a disk cache), splitting training from validation tokens, drawing windows.

What `gptc train --data ARG` reads (open_data): a text file, a directory or glob of text
files (read whole and tokenized, as one text), a directory written by `gptc prepare`
(its prepare.json lists its shards), or token shards (.bin files, or a directory or glob
of them). Validation: the shards named *_val_* (llm.c's names), else the last
VALIDATION_FRACTION of the tokens (of a text, or of the shards in order).

Windows are drawn from shards without loading them: each window drawn is read alone
(one small read), so memory stays flat whatever the size of the shards. A window never
crosses from one shard into the next. Token ids are checked against the tokenizer's
vocabulary in every window drawn (so a shard made with another tokenizer is refused when
first met, without reading whole shards up front).

Tokenization cache: the BPE tokenizer trained on a corpus and the corpus's token ids
are stored under $GPTC_CACHE_DIR/corpus/<key>/ (default ~/.cache/gptc/corpus/; set
GPTC_CACHE_DIR=off to disable), where key = sha256 of (gptc.tools.tokenizer.TRAINER_ID,
which names gptc's training recipe and the version of `tokenizers`; vocab_size or the
given tokenizer; corpus bytes). An entry is a directory holding tokenizer.json and
tokens.npy (int32), written into a temporary directory and renamed into place, so
readers see a whole entry or none. A cache that cannot be written (read-only, full disk)
only costs the next run the tokenization time."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from gptc.common import make_temp_dir, write_atomic
from gptc.spec import GptcError
from gptc.tools.shards import TokenFile, is_shard, open_shard

if TYPE_CHECKING:
    from gptc.tools.tokenizer import Tokenizer


class DataError(GptcError):
    pass


VALIDATION_FRACTION = 0.1  # of a text, or of shards without a validation shard: the tail
PREPARED_FILE = "prepare.json"  # what `gptc prepare` writes last into its directory (gptc/tools/prepare.py)
PREPARED_FORMAT = "gptc-prepared-data"
TOKENIZER_FILE = "tokenizer.json"
_VAL_SHARD = re.compile(r"(?:^|_)val(?:_|\.|$)")  # llm.c's names: fineweb_val_000000.bin, tiny_shakespeare_val.bin
_SNIFF = 65536  # a file with a NUL byte in its first 64 KiB is binary


# ----- finding the data -------------------------------------------------------------------
@dataclass
class Inputs:
    """The files that data arguments name, in order, each once: text files, token shards,
    and the binary files met in directories (skipped)."""
    texts: list[Path] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def _looks_binary(path: Path) -> bool:
    """Whether a file has a NUL byte in its first 64 KiB; DataError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return b"\x00" in f.read(_SNIFF)
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror}") from None


def check_text_file(path: Path) -> None:
    """Refuse a file that cannot be read or looks binary (UTF-8 is checked as it is read)."""
    if _looks_binary(path):
        raise DataError(f"data file '{path}' looks binary (it has NUL bytes); give a UTF-8 text file")


def collect_inputs(args: Sequence[str]) -> Inputs:
    """Text files and token shards named by files, directories (every file below them,
    hidden ones skipped, in path order) and globs (`data/*.txt`, `web/**/*.md`). A file
    named *.bin or starting with a shard magic is a token shard; the binary files of a
    directory or a glob are skipped, a binary file named on its own is refused when read."""
    found, seen = Inputs(), set()
    for arg in args:
        path = Path(arg)
        if path.exists():
            named = [path]
        elif any(c in arg for c in "*?["):
            named = [Path(m) for m in sorted(glob.glob(arg, recursive=True))]
            if not named:
                raise DataError(f"no files match '{arg}'")
        else:
            raise DataError(f"data file '{arg}' does not exist")
        for p in named:
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file()
                               and not any(part.startswith(".") for part in f.relative_to(p).parts))
            elif p.is_file():
                files = [p]
            else:
                raise DataError(f"data path '{p}' is not a file")
            named_alone = p == path and p.is_file()  # not found in a directory or by a glob
            for f in files:
                key = f.resolve()
                if key in seen:
                    continue
                seen.add(key)
                if is_shard(f):
                    found.shards.append(f)
                elif named_alone or not _looks_binary(f):
                    found.texts.append(f)
                else:
                    found.skipped.append(f)
    return found


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, with a one-line DataError for anything unusable."""
    check_text_file(Path(path))
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror}") from None
    return decode_utf8(raw, path)


def decode_utf8(raw: bytes, path: str | os.PathLike, offset: int = 0) -> str:
    """`raw` (bytes of `path` from `offset` on) as text; DataError naming the byte if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not valid UTF-8 (byte {offset + e.start}); convert it to UTF-8 "
                        "first") from None


# ----- what training reads --------------------------------------------------------------
class Part(NamedTuple):
    """Tokens to draw windows from (an array, or a shard's TokenFile), what to call them,
    and where they start in it (for messages)."""
    name: str
    tokens: np.ndarray | TokenFile
    start: int = 0


@dataclass
class TextData:
    text: str
    source: str       # for messages: "'corpus.txt'", "the bundled corpus (...)"
    fingerprint: str  # sha256 of the text: a resumed run checks it reads the same data


@dataclass
class ShardData:
    train: list[Part]
    val: list[Part]
    source: str
    fingerprint: str            # sha256 of the shards' names, token counts, dtype and split
    tokenizer_file: Path | None  # the tokenizer of the prepared data (or one beside the shards)
    val_named: bool             # validation from *_val_* shards (else the tail of the training shards)
    prepared: bool              # a directory written by gptc prepare
    opened: list[Part]          # every shard, whole, in the order given


def open_data(arg: str | None) -> TextData | ShardData:
    """The data `gptc train --data ARG` names: the bundled corpus (None), a text file, a
    directory or glob of text files, a directory written by `gptc prepare`, or token
    shards (.bin files, a directory or glob of them). Texts are read; shards are only
    opened (nothing read but their headers)."""
    if arg is None:
        from gptc.tools.corpus import default_corpus_text
        text = default_corpus_text()
        return TextData(text, "the bundled corpus (gptc/data/corpus.txt.gz)", _sha256(text))
    path = Path(arg)
    if path.is_dir() and (path / PREPARED_FILE).is_file():
        return open_prepared(path)
    inputs = collect_inputs([arg])
    if inputs.shards:  # the tokenizer.json beside shards is not text to train on
        inputs.texts = [p for p in inputs.texts if p.name != TOKENIZER_FILE]
    if inputs.shards and inputs.texts:
        raise DataError(f"'{arg}' holds both token shards and text files; give one kind (e.g. '{arg}/*.bin')")
    if inputs.shards:
        return _open_shards(inputs.shards, f"'{arg}'")
    if not inputs.texts:
        raise DataError(f"no text files or token shards in '{arg}'")
    text = "".join(read_text(p) for p in inputs.texts)
    if not text.strip():
        raise DataError(f"data file '{arg}' is empty; give a UTF-8 text file" if inputs.texts == [path]
                        else f"the text files of '{arg}' are empty")
    return TextData(text, f"'{arg}'", _sha256(text))


def open_prepared(directory: Path) -> ShardData:
    """The shards a `gptc prepare` directory lists in its prepare.json, each checked
    against its entry there, and its tokenizer against the recorded sha256."""
    where = directory / PREPARED_FILE
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read '{where}': {e.strerror}") from None
    except ValueError:
        raise DataError(f"'{where}' is not valid JSON; prepare the data again") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    tokenizer = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT or not isinstance(shards, list)
            or not shards
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and s.get("split") in ("train", "val")
                       and isinstance(s.get("tokens"), int) for s in shards)
            or not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("sha256"), str))):
        raise DataError(f"'{where}' is not a gptc prepare manifest; prepare the data again")
    data = _open_shards([directory / s["file"] for s in shards], f"'{directory}'", [s["split"] for s in shards],
                        prepared=True)
    for s, part in zip(shards, data.opened):
        if len(part.tokens) != s["tokens"]:
            raise DataError(f"{part.name} holds {len(part.tokens):,} tokens, but '{where}' says {s['tokens']:,}; "
                            "prepare the data again")
    try:
        digest = hashlib.sha256((directory / TOKENIZER_FILE).read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read the tokenizer of the prepared data '{directory / TOKENIZER_FILE}': "
                        f"{e.strerror}") from None
    if digest != tokenizer["sha256"]:
        raise DataError(f"'{directory / TOKENIZER_FILE}' is not the tokenizer the data was prepared with (its sha256 "
                        f"is not the one in '{where}'); prepare the data again")
    return data


def _open_shards(paths: Sequence[Path], source: str, splits: Sequence[str] | None = None,
                 prepared: bool = False) -> ShardData:
    """Open shards; `splits` says which are "val" (default: those named *_val_*)."""
    opened = [Part(f"token shard '{p}'", open_shard(p)) for p in paths]
    if splits is None:
        splits = ["val" if _VAL_SHARD.search(p.name) else "train" for p in paths]
    train = [part for part, split in zip(opened, splits) if split == "train"]
    val = [part for part, split in zip(opened, splits) if split == "val"]
    if not train:
        raise DataError(f"the token shards of {source} are all validation shards (named *_val_*); give training "
                        "shards too")
    fingerprint = _sha256(json.dumps([[p.name, len(part.tokens), part.tokens.dtype.str, split]
                                      for p, part, split in zip(paths, opened, splits)]))
    val_named = bool(val)
    if not val_named:
        train, val = split_parts(train, VALIDATION_FRACTION)
    beside = Path(paths[0]).parent / TOKENIZER_FILE
    return ShardData(train, val, source, fingerprint, beside if beside.is_file() else None, val_named, prepared,
                     opened)


def split_parts(parts: Sequence[Part], fraction: float) -> tuple[list[Part], list[Part]]:
    """The first 1 - fraction of the tokens of `parts`, in order, and the rest (the tail)."""
    cut, seen = _cut(sum(len(p.tokens) for p in parts), fraction), 0
    head: list[Part] = []
    tail: list[Part] = []
    for p in parts:
        n = len(p.tokens)
        k = min(max(cut - seen, 0), n)
        if k:
            head.append(Part(p.name, p.tokens[:k], p.start))
        if k < n:
            tail.append(Part(p.name, p.tokens[k:], p.start + k))
        seen += n
    return head, tail


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in a tokenizer.json file (or a directory holding one: a run or a
    prepared data directory), with one-line errors."""
    from gptc.tools.tokenizer import Tokenizer
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"tokenizer file '{p}' does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read tokenizer file '{p}': {e.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"'{p}' is not a tokenizer file (not UTF-8 text)") from None
    try:
        return Tokenizer.from_json(text)
    except ValueError as e:
        raise DataError(f"'{p}' is not a usable tokenizer file ({' '.join(str(e).split())})") from None


class Windows:
    """Every window of seq_len + 1 consecutive tokens inside one part, numbered part
    after part. rows(indices) reads only those windows (from a shard: one read each) and
    checks their ids against the tokenizer's vocabulary."""

    def __init__(self, parts: Sequence[Part], seq_len: int, vocab_size: int, what: str) -> None:
        self.parts, self.seq_len, self.vocab_size = list(parts), seq_len, vocab_size
        self.counts = np.array([max(0, len(p.tokens) - seq_len) for p in self.parts], np.int64)
        self.ends = np.cumsum(self.counts)
        self.count = int(self.ends[-1]) if len(self.ends) else 0
        if self.count == 0:
            longest = max((len(p.tokens) for p in self.parts), default=0)
            raise DataError(f"the {what} has {longest:,} tokens" + (" in its longest shard" if len(self.parts) > 1
                                                                     else "")
                            + f", fewer than one window of {seq_len + 1:,}; give more data or lower model.seq_len")

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """The windows `indices` (each in [0, count)) as int32 rows of seq_len + 1 tokens."""
        which = np.searchsorted(self.ends, indices, side="right")
        starts = indices - (self.ends[which] - self.counts[which])
        rows = np.stack([np.asarray(self.parts[k].tokens[s:s + self.seq_len + 1])
                         for k, s in zip(which.tolist(), starts.tolist())])
        bad = rows >= self.vocab_size
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            part = self.parts[int(which[r])]
            position = part.start + int(starts[r]) + c
            raise DataError(f"{part.name} holds the token id {int(rows[r, c]):,} (token {position:,}), outside the "
                            f"tokenizer's vocabulary of {self.vocab_size:,} tokens; give the tokenizer the data was "
                            "made with (--tokenizer FILE)")
        return rows.astype(np.int32)


class Batches:
    """Random (tokens, targets) batches of windows, drawn by a seeded generator whose
    state can be saved and restored (for exact resume).

    Rank `rank` of a data-parallel run of `world` ranks draws the windows of all ranks
    (world x batch) and keeps its own part: every rank's generator stays in one state,
    so rank 0's checkpoint resumes them all exactly, and the run sees the windows a
    single GPU at world x batch would."""

    def __init__(self, windows: Windows, batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.windows, self.batch, self.rank, self.world = windows, batch, rank, world
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
        picks = self.rng.integers(0, self.windows.count, self.batch * self.world)
        rows = self.windows.rows(picks[self.rank * self.batch:(self.rank + 1) * self.batch])
        return rows[:, :-1], rows[:, 1:]


def validation_batches(windows: Windows, n_batches: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n_batches` fixed (tokens, targets) batches spread evenly over the validation
    windows: the same windows at every evaluation, drawn without touching the training
    generator, so evaluations are comparable and resuming stays exact."""
    rows = windows.rows(np.linspace(0, windows.count - 1, n_batches * batch).round().astype(np.int64))
    return [(rows[i * batch:(i + 1) * batch, :-1], rows[i * batch:(i + 1) * batch, 1:]) for i in range(n_batches)]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cut(n: int, validation_fraction: float) -> int:
    """How many of n tokens go to training (the rest to validation)."""
    return int(n * (1.0 - validation_fraction))


def min_corpus_tokens(seq_len: int, validation_fraction: float = 0.1) -> int:
    """The fewest tokens a corpus needs for one window of seq_len + 1 tokens in each
    split (as `split_parts` cuts). Both splits grow with n, so a binary search finds it."""
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


def corpus_key(text: str, vocab_size: int, tokenizer_json: str | None = None) -> str:
    """The cache key of `text` tokenized by a BPE trained on it up to vocab_size tokens,
    or by the given tokenizer."""
    from gptc.tools.tokenizer import TRAINER_ID
    h = hashlib.sha256()
    given = "" if tokenizer_json is None else f"/tokenizer={hashlib.sha256(tokenizer_json.encode()).hexdigest()}"
    h.update(f"{TRAINER_ID}/vocab={vocab_size}{given}\0".encode())
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
                    warn=None, tokenizer=None) -> tuple[object, np.ndarray, bool]:
    """(tokenizer, int32 token ids, whether they came from the cache) for `text`: by
    `tokenizer` when given, else by a byte-level BPE trained on `text` up to `vocab_size`
    tokens, fewer when the text runs out of pairs to merge (a model may have more
    embedding rows than its tokenizer has tokens). `cache_dir` None turns the cache off;
    "default" is corpus_cache_dir(). `warn(message)` hears about a cache that could not
    be written."""
    from gptc.tools.tokenizer import Tokenizer
    if tokenizer is None and vocab_size < 256:
        raise DataError(f"byte-level BPE needs model.vocab_size >= 256, got {vocab_size}")
    root = corpus_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir is not None else None)
    key = corpus_key(text, vocab_size, None if tokenizer is None else tokenizer.to_json())
    entry = root / key if root is not None else None
    if entry is not None and entry.is_dir():
        hit = _read_cache(entry, vocab_size)
        if hit is not None:
            return hit[0], hit[1], True
    tok = tokenizer if tokenizer is not None else Tokenizer.train(text, vocab_size, at_most=True)
    ids = tok.encode(text)
    if entry is not None:
        try:
            _write_cache(entry, tok, ids)
        except OSError as e:
            if warn:
                warn(f"could not cache the tokenized corpus in {root} ({e.strerror or e}); "
                     "the next run tokenizes again")
    return tok, ids, False
