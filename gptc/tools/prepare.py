"""`gptc prepare`: text in (files, directories, globs), a tokenizer and token shards out,
so that a corpus of any size trains with flat memory (gptc/tools/data.py reads the shards
a window at a time).

DIR after `gptc prepare DATA... -o DIR`:

    tokenizer.json               the given tokenizer (--tokenizer), or a BPE trained on a
                                 sample of the data: TOKENIZER_SAMPLE_BYTES taken in pieces
                                 of SAMPLE_PIECE_BYTES spread evenly over it (all of it when smaller)
    NAME_val_000000.bin          validation: the first 10% of the tokens, at most one shard
    NAME_train_000001.bin ...    training: the rest, --shard-tokens tokens per shard
    prepare.json                 sources (path, bytes, tokens), skipped binary files, the
                                 tokenizer's sha256 and vocabulary, and every shard with its
                                 split and token count; written last

NAME is DIR's name. The shards are llm.c's .bin files (gptc/tools/shards.py), named as
llm.c's fineweb.py names its own, so llm.c trains on them (uint16 ones: vocabularies up to
65,536) and `gptc train --data DIR` (or DIR/*.bin) does too.

Every file is encoded on its own (no token spans two files; files follow each other with
nothing between them: a byte-level BPE has no end-of-text token) in chunks of about
CHUNK_BYTES, by --jobs worker processes; chunks end where a line break stands between two
visible characters ("x\\nY"), where GPT-style pre-tokenizers never join pieces, so the
tokens are those of encoding each file whole (elsewhere only in a text without such a
place in a whole chunk; the text always decodes back exactly). The main process reads,
checks UTF-8, and writes the results in order, so the output does not depend on --jobs;
at most 2 x --jobs chunks are in flight, so memory stays flat whatever the corpus size.

Everything is written into a hidden temporary directory beside DIR and renamed to DIR at
the end: DIR holds a whole prepared corpus or nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import numpy as np

from gptc.common import VERSION, first_file_in, make_temp_dir, usable_cpus, write_atomic
from gptc.spec import GptcError, preset
from gptc.tools.console import Console, duration
from gptc.tools.data import (PREPARED_FILE, PREPARED_FORMAT, TOKENIZER_FILE, VALIDATION_FRACTION, DataError,
                             check_text_file, collect_inputs, decode_utf8, load_tokenizer)
from gptc.tools.shards import MAX_TOKENS, FORMATS, ShardWriter, open_shard, token_dtype

DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's fineweb.py shard size
TOKENIZER_SAMPLE_BYTES = 32 * 2**20
SAMPLE_PIECE_BYTES = 2**20
CHUNK_BYTES = 4 * 2**20
MAX_VOCAB = 2**32  # token ids of a uint32 shard
COPY_TOKENS = 2**24  # tokens copied at a time when the first shard is split


def default_vocab_size() -> int:
    return preset("hipgpt").model.vocab_size


def max_jobs() -> int:
    return 4 * usable_cpus()


def prepare(sources: Sequence[str], out_dir: str | os.PathLike, *, vocab_size: int | None = None,
            tokenizer: str | os.PathLike | None = None, shard_tokens: int | None = None,
            jobs: int | None = None, stdout: TextIO | None = None, tty: bool | None = None) -> dict:
    """Tokenize `sources` into DIR (see the module's docstring) and return what
    prepare.json holds. `shard_tokens` None: DEFAULT_SHARD_TOKENS; `jobs` None: one per
    CPU core. GptcError for bad input, before any work."""
    console = Console(stdout, tty)
    out = Path(out_dir)
    shard_tokens = DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens
    jobs = usable_cpus() if jobs is None else jobs
    if vocab_size is not None and tokenizer is not None:
        raise GptcError("give either --vocab-size or --tokenizer, not both")
    if vocab_size is not None and not 256 <= vocab_size <= MAX_VOCAB:
        raise GptcError(f"--vocab-size must be between 256 (the byte tokens of a byte-level BPE) and {MAX_VOCAB:,} "
                        f"(uint32 token ids), got {vocab_size}")
    if not 1 <= shard_tokens <= MAX_TOKENS:
        raise GptcError(f"--shard-tokens must be between 1 and {MAX_TOKENS:,} (a shard's count is an int32), "
                        f"got {shard_tokens}")
    if not 1 <= jobs <= max_jobs():
        raise GptcError(f"--jobs must be between 1 and {max_jobs()} (4 per CPU core), got {jobs}")
    if first_file_in(out):
        raise GptcError(f"cannot use '{out}' as the output directory: '{first_file_in(out)}' is a file, not a "
                        "directory; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        raise GptcError(f"'{out}' is not empty; choose another -o (or delete it)")
    inputs = collect_inputs(sources)
    if inputs.shards:
        raise DataError(f"'{inputs.shards[0]}' is a token shard already; gptc prepare takes text (train on shards "
                        "with: gptc train --data ...)")
    if not inputs.texts:
        raise DataError(f"no text files in {', '.join(repr(s) for s in sources)}")
    sizes = [_size(p) for p in inputs.texts]
    total = sum(sizes)
    if total == 0:
        raise DataError("the data is empty: " + (f"'{inputs.texts[0]}' has" if len(sizes) == 1
                                                  else f"its {len(sizes)} text files have") + " no bytes")
    for p in inputs.texts:
        check_text_file(p)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None

    console.line(f"data: {len(inputs.texts):,} text file{'s' * (len(inputs.texts) != 1)}, {total / 1e6:,.1f} MB"
                 + (f" ({len(inputs.skipped)} binary file{'s' * (len(inputs.skipped) != 1)} skipped)"
                    if inputs.skipped else ""))
    if tok is None:
        tok, sampled = _train_tokenizer(inputs.texts, sizes, vocab_size or default_vocab_size(), console)
    else:
        sampled = None
        console.line(f"tokenizer: '{tokenizer}', {tok.vocab_size:,} tokens")
    dtype = token_dtype(tok.vocab_size)
    tok_json = tok.to_json()
    created = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)  # removed on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.prepare-")
    try:
        write_atomic(tmp / TOKENIZER_FILE, tok_json)
        parts, per_file = _encode_all(inputs.texts, sizes, tok_json, dtype, shard_tokens, jobs, tmp, console)
        shards = _name_shards(parts, tmp, out.resolve().name, shard_tokens)
        manifest = {
            "format": PREPARED_FORMAT, "version": 1, "gptc_version": VERSION,
            "sources": [{"path": os.path.abspath(p), "bytes": b, "tokens": n}
                        for p, b, n in zip(inputs.texts, sizes, per_file)],
            "skipped": [os.path.abspath(p) for p in inputs.skipped],
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
                          "vocab_size": tok.vocab_size, "given": os.path.abspath(tokenizer) if tokenizer else None,
                          "trained_on_bytes": sampled},
            "dtype": dtype.name, "magic": FORMATS[dtype][0], "header_version": FORMATS[dtype][1],
            "shard_tokens": shard_tokens,
            "tokens": {"total": sum(per_file), **{split: sum(s["tokens"] for s in shards if s["split"] == split)
                                                  for split in ("train", "val")}},
            "shards": shards,
        }
        write_atomic(tmp / PREPARED_FILE, json.dumps(manifest, indent=1) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None and created != out:
            shutil.rmtree(created, ignore_errors=True)
        raise
    val = [s for s in shards if s["split"] == "val"]
    console.line(f"wrote {out}: {len(shards) - len(val)} training shard{'s' * (len(shards) - len(val) != 1)} "
                 f"({manifest['tokens']['train']:,} tokens) and {val[0]['file']} ({manifest['tokens']['val']:,} "
                 f"tokens), {dtype.name}, tokenizer.json, {PREPARED_FILE}")
    if dtype == np.dtype("<u4"):
        console.line("note: more than 65,536 tokens: uint32 shards (llm.c's llama-3 format, which its GPT-2 trainer "
                     "does not read)")
    return manifest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror}") from None


def _train_tokenizer(texts: list[Path], sizes: list[int], vocab_size: int, console: Console):
    """(a BPE trained on a sample of the data, the sample's size in bytes). It trains in a
    process of its own, so that the memory training takes is given back when it ends."""
    from gptc.tools.tokenizer import Tokenizer
    whole = sum(sizes) <= TOKENIZER_SAMPLE_BYTES
    what = "all the data" if whole else f"{TOKENIZER_SAMPLE_BYTES / 1e6:,.1f} MB sampled evenly from the data"
    console.line(f"tokenizer: training a BPE of up to {vocab_size:,} tokens on {what}")
    started = time.perf_counter()
    with ProcessPoolExecutor(1) as pool:
        tok_json, n_bytes = pool.submit(_trained, texts, sizes, vocab_size, TOKENIZER_SAMPLE_BYTES,
                                        SAMPLE_PIECE_BYTES).result()
    tok = Tokenizer.from_json(tok_json)
    console.line(f"tokenizer: {tok.vocab_size:,} tokens" + (" (all this sample yields)" if tok.vocab_size < vocab_size
                                                            else "")
                 + f", trained on {n_bytes / 1e6:,.1f} MB in {time.perf_counter() - started:.1f}s")
    return tok, n_bytes


def _trained(texts: list[Path], sizes: list[int], vocab_size: int, budget: int, piece: int) -> tuple[str, int]:
    """(the JSON of a BPE trained on a sample of the data, the sample's size in bytes)."""
    from gptc.tools.tokenizer import Tokenizer
    sample = _sample(texts, sizes, budget, piece)
    return Tokenizer.train(sample, vocab_size, at_most=True).to_json(), len(sample.encode("utf-8"))


def _sample(texts: list[Path], sizes: list[int], budget: int, piece: int) -> str:
    """The whole data if it fits `budget` bytes, else that many bytes in pieces of `piece`
    bytes at evenly spaced places, each cut to whole lines."""
    total = sum(sizes)
    if total <= budget:
        return "".join(decode_utf8(p.read_bytes(), p) for p in texts)
    starts, ends = np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)
    pieces = []
    for at in np.linspace(0, total - piece, budget // piece).astype(np.int64).tolist():
        k = int(np.searchsorted(ends, at, side="right"))
        with open(texts[k], "rb") as f:
            f.seek(at - int(starts[k]))
            raw = f.read(piece)
        first, last = raw.find(b"\n"), raw.rfind(b"\n")
        pieces.append(raw[first + 1:last + 1].decode("utf-8", errors="replace") if 0 <= first < last
                      else raw.decode("utf-8", errors="replace"))
    return "".join(pieces)


# ----- encoding in worker processes -------------------------------------------------------
_worker_tokenizer = None


def _start_worker(tokenizer_json: str) -> None:
    """A worker ignores Ctrl-C: the main process stops the pool and removes what it wrote."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from gptc.tools.tokenizer import Tokenizer
    _worker_tokenizer = Tokenizer.from_json(tokenizer_json)


def _encode(raw: bytes, dtype: str) -> np.ndarray:
    return _worker_tokenizer.encode(raw.decode("utf-8")).astype(dtype)


def _visible(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E


def cut_point(buf: bytes) -> int:
    """Where a chunk of `buf` ends: after the last line break between two visible ASCII
    characters; else after the last line break; else before the last UTF-8 character
    that starts in it; else (no place at all) the whole of it."""
    i = buf.rfind(b"\n", 1, len(buf) - 1)
    while i > 0:
        if _visible(buf[i - 1]) and _visible(buf[i + 1]):
            return i + 1
        i = buf.rfind(b"\n", 1, i)
    i = buf.rfind(b"\n")
    if i >= 0:
        return i + 1
    for i in range(len(buf) - 1, max(len(buf) - 4, 0), -1):  # a UTF-8 character has at most 4 bytes
        if buf[i] & 0xC0 != 0x80:  # not a continuation byte
            return i if i > 0 else len(buf)
    return len(buf)


def _chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of `path` in chunks of about CHUNK_BYTES ending at cut points."""
    try:
        with open(path, "rb") as f:
            offset, carry = 0, b""
            while True:
                block = f.read(CHUNK_BYTES)
                buf = carry + block
                if not block:
                    if buf:
                        yield offset, buf
                    return
                cut = cut_point(buf)
                yield offset, buf[:cut]
                offset, carry = offset + cut, buf[cut:]
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror}") from None


class _Shards:
    """Tokens in order into temporary shards part_NNNNNN.bin of `shard_tokens` each."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.paths: list[Path] = []
        self.writer: ShardWriter | None = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.writer is None or self.writer.count == self.shard_tokens:
                self.finish()
                self.paths.append(self.directory / f"part_{len(self.paths):06d}.bin")
                self.writer = ShardWriter(self.paths[-1], self.dtype)
            room = self.shard_tokens - self.writer.count
            self.writer.write(ids[:room])
            ids = ids[room:]

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.finish()
            self.writer = None


def _encode_all(texts: list[Path], sizes: list[int], tokenizer_json: str, dtype: np.dtype, shard_tokens: int,
                jobs: int, directory: Path, console: Console) -> tuple[list[Path], list[int]]:
    """Encode every file into temporary shards; (their paths, tokens per file)."""
    total = sum(sizes)
    shards = _Shards(directory, dtype, shard_tokens)
    per_file = [0] * len(texts)
    done_bytes, done_tokens = 0, 0
    started = last = time.perf_counter()
    pending: deque = deque()

    def collect() -> None:
        nonlocal done_bytes, done_tokens, last
        k, n_bytes, future = pending.popleft()
        ids = future.result()
        shards.write(ids)
        per_file[k] += len(ids)
        done_bytes += n_bytes
        done_tokens += len(ids)
        now = time.perf_counter()
        if now - last >= (0.5 if console.tty else 10.0):
            last = now
            rate = done_bytes / max(now - started, 1e-9)
            text = (f"tokenizing: {done_bytes / 1e6:,.1f} of {total / 1e6:,.1f} MB ({100 * done_bytes / total:.0f}%), "
                    f"{rate / 1e6:.1f} MB/s, {done_tokens:,} tokens, ETA {duration((total - done_bytes) / rate)}")
            if console.tty:
                console.status(text)
            else:
                console.line(text)

    with ProcessPoolExecutor(jobs, initializer=_start_worker, initargs=(tokenizer_json,)) as pool:
        try:
            for k, path in enumerate(texts):
                for offset, raw in _chunks(path):
                    decode_utf8(raw, path, offset)  # a one-line error naming the byte, before encoding
                    pending.append((k, len(raw), pool.submit(_encode, raw, dtype.str)))
                    if len(pending) >= 2 * jobs:
                        collect()
            while pending:
                collect()
        except BaseException:
            console.end()  # an error message starts on a line of its own
            pool.shutdown(cancel_futures=True)  # the chunks being encoded finish, the rest never start
            raise
    shards.finish()
    elapsed = time.perf_counter() - started
    console.line(f"tokenized {total / 1e6:,.1f} MB into {done_tokens:,} tokens in {duration(elapsed)} "
                 f"({total / 1e6 / max(elapsed, 1e-9):.1f} MB/s, {jobs} job{'s' * (jobs != 1)})")
    return shards.paths, per_file


def _name_shards(parts: list[Path], directory: Path, name: str, shard_tokens: int) -> list[dict]:
    """Rename the temporary shards: the first VALIDATION_FRACTION of the tokens (at most one
    shard) becomes NAME_val_000000.bin, the rest NAME_train_000001.bin, ... (the first
    temporary shard is split in two when validation takes only part of it)."""
    counts = [len(open_shard(p)) for p in parts]
    total = sum(counts)
    n_val = min(shard_tokens, int(total * VALIDATION_FRACTION))
    if n_val == 0 or n_val == total:
        raise DataError(f"the data yields only {total:,} tokens, too few for a validation and a training shard")
    val_path = directory / f"{name}_val_{0:06d}.bin"
    train_paths = []
    if n_val == counts[0]:
        os.replace(parts[0], val_path)
    else:
        first = open_shard(parts[0])
        for path, begin, end in ((val_path, 0, n_val), (directory / "part_first_rest.bin", n_val, counts[0])):
            writer = ShardWriter(path, first.dtype)
            for at in range(begin, end, COPY_TOKENS):
                writer.write(np.asarray(first[at:min(at + COPY_TOKENS, end)]))
            writer.finish()
        parts[0].unlink()
        train_paths.append((directory / "part_first_rest.bin", counts[0] - n_val))
    train_paths += list(zip(parts[1:], counts[1:]))
    shards = [{"file": val_path.name, "split": "val", "tokens": n_val}]
    for i, (path, count) in enumerate(train_paths, start=1):
        final = directory / f"{name}_train_{i:06d}.bin"
        os.replace(path, final)
        shards.append({"file": final.name, "split": "train", "tokens": count})
    return shards
