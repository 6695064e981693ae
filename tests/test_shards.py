"""Token shards (llm.c's .bin format), `gptc prepare`, and training from shards on the CPU:
the format both ways against a reference writer of llm.c's files, prepare over a file, a
directory and a glob, training and exact resume from shards, sampling that reads only the
windows it draws, and bad data as one-line errors that leave nothing behind."""
from __future__ import annotations

import builtins
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import llmc_datafile
from gptc.spec import preset
from gptc.tools.corpus import default_corpus_text
from gptc.tools import prepare as prep
from gptc.tools import train as trainer
from gptc.tools.cli import main
from gptc.tools.data import Batches, ShardData, Windows, open_data, validation_batches
from gptc.tools.shards import HEADER_BYTES, ShardWriter, open_shard, token_dtype
from gptc.tools.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
BYTES = Tokenizer.train("bytes", 256)  # the byte vocabulary of the tiny preset (no merges)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """A directory of text: a file, two in a subdirectory (one binary) and a hidden one."""
    root = tmp_path_factory.mktemp("texts")
    (root / "sub").mkdir()
    (root / "a.txt").write_text(default_corpus_text()[:30_000])
    (root / "sub" / "b.md").write_text((ROOT / "gptc" / "compiler" / "dsl.py").read_text()
                                       + "caf\u00e9 na\u00efve \u2014 \U0001f600\n" * 50)
    (root / "sub" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 100)
    (root / ".hidden.txt").write_text("never read")
    return root


@pytest.fixture(scope="module")
def tokenizer(texts) -> Tokenizer:
    return Tokenizer.train((texts / "a.txt").read_text(), 300)


def shard_tokens(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """(validation tokens, training tokens in order) of a prepared directory."""
    manifest = json.loads((directory / "prepare.json").read_text())
    val = [np.asarray(open_shard(directory / s["file"])) for s in manifest["shards"] if s["split"] == "val"]
    train = [np.asarray(open_shard(directory / s["file"])) for s in manifest["shards"] if s["split"] == "train"]
    return np.concatenate(val), np.concatenate(train)


# ----- the format -------------------------------------------------------------------------
@pytest.mark.parametrize("vocab,model_desc", [(5000, "gpt-2"), (2**16, "gpt-2"), (2**16 + 1, "llama-3"),
                                              (200_000, "llama-3")])
def test_writer_matches_llmc_byte_for_byte_and_reads_back(tmp_path, vocab, model_desc):
    tokens = np.random.default_rng(0).integers(0, vocab, 10_001)
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if model_desc == "gpt-2" else np.uint32)
    writer = ShardWriter(tmp_path / "x.bin", dtype)
    writer.write(tokens[:3])
    writer.write(tokens[3:])
    writer.finish()
    raw = (tmp_path / "x.bin").read_bytes()
    assert raw == llmc_datafile(tokens, model_desc)  # what llm.c's write_datafile writes
    header = np.frombuffer(raw[:HEADER_BYTES], "<i4")
    assert header[:3].tolist() == ([20240520, 1, 10_001] if model_desc == "gpt-2" else [20240801, 7, 10_001])
    assert not header[3:].any()
    back = open_shard(tmp_path / "x.bin")
    assert len(back) == 10_001 and back.dtype == dtype and np.array_equal(np.asarray(back), tokens)
    assert np.array_equal(np.asarray(back[5:-3][2:4]), tokens[7:9])


def test_a_writer_refuses_ids_its_dtype_cannot_hold(tmp_path):
    writer = ShardWriter(tmp_path / "x.bin", np.uint16)
    with pytest.raises(ValueError, match="token id 65536 does not fit a uint16 shard"):
        writer.write(np.array([1, 65536]))


@pytest.mark.parametrize("model_desc", ["gpt-2", "llama-3"])
def test_files_written_by_llmc_train_in_gptc(tmp_path, model_desc, capsys):
    """A fineweb-style directory written by (a reference of) llm.c's writer, uint16 or
    uint32, trains with a tokenizer given on the command line."""
    text = (ROOT / "README.md").read_text()
    ids = BYTES.encode(text)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "web_val_000000.bin").write_bytes(llmc_datafile(ids[:2000], model_desc))
    (tmp_path / "data" / "web_train_000001.bin").write_bytes(llmc_datafile(ids[2000:], model_desc))
    (tmp_path / "tok.json").write_text(BYTES.to_json())
    assert main(["train", "--preset", "tiny", "--device", "cpu", "--data", str(tmp_path / "data"), "--tokenizer",
                 str(tmp_path / "tok.json"), "--steps", "3", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert (f"data: '{tmp_path / 'data'}', 1 shard for training ({len(ids) - 2000:,} tokens), 1 shard for validation "
            "(2,000 tokens), read a window at a time") in out
    assert "done: step 3 of 3" in out


# ----- gptc prepare -----------------------------------------------------------------------
def test_prepare_a_file(tmp_path, texts, tokenizer, monkeypatch):
    """Many chunks in two processes give the tokens of encoding the file whole, split into
    a validation shard (the first 10%) and training shards of --shard-tokens."""
    monkeypatch.setattr(prep, "CHUNK_BYTES", 3000)
    (tmp_path / "tok.json").write_text(tokenizer.to_json())
    out = io.StringIO()
    manifest = prep.prepare([str(texts / "a.txt")], tmp_path / "d", tokenizer=tmp_path / "tok.json",
                            shard_tokens=4000, jobs=2, stdout=out)
    whole = tokenizer.encode((texts / "a.txt").read_text())
    val, train = shard_tokens(tmp_path / "d")
    assert np.array_equal(np.concatenate([val, train]), whole)
    assert len(val) == len(whole) // 10 < 4000
    shards = manifest["shards"]
    assert shards[0] == {"file": "d_val_000000.bin", "split": "val", "tokens": len(val)}
    assert [s["file"] for s in shards[1:]] == [f"d_train_{i:06d}.bin" for i in range(1, len(shards))]
    assert shards[1]["tokens"] == 4000 - len(val) and all(s["tokens"] == 4000 for s in shards[2:-1])
    assert len(shards) > 3
    assert manifest["tokens"] == {"total": len(whole), "train": len(train), "val": len(val)}
    assert manifest["sources"] == [{"path": str(texts / "a.txt"), "bytes": (texts / "a.txt").stat().st_size,
                                    "tokens": len(whole)}]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 300
    assert json.loads((tmp_path / "d" / "prepare.json").read_text()) == manifest
    assert (tmp_path / "d" / "tokenizer.json").read_text() == tokenizer.to_json()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "tok.json"]  # no temporary directory left
    lines = out.getvalue().splitlines()
    assert lines[0] == f"data: 1 text file, {(texts / 'a.txt').stat().st_size / 1e6:.1f} MB"
    assert lines[-1].startswith(f"wrote {tmp_path / 'd'}: {len(shards) - 1} training shards ({len(train):,} tokens) "
                                f"and d_val_000000.bin ({len(val):,} tokens), uint16")


def test_prepare_a_directory_and_a_glob(tmp_path, texts, tokenizer, monkeypatch):
    """A directory: every text file below it in path order (binary and hidden files
    skipped); a glob the same; --jobs does not change the output; each file is encoded on
    its own and the shards decode to the texts exactly."""
    monkeypatch.setattr(prep, "CHUNK_BYTES", 5000)
    (tmp_path / "tok.json").write_text(tokenizer.to_json())
    kw = dict(tokenizer=tmp_path / "tok.json", shard_tokens=10**6, stdout=io.StringIO())
    manifest = prep.prepare([str(texts)], tmp_path / "dir", jobs=1, **kw)
    files = [texts / "a.txt", texts / "sub" / "b.md"]
    assert [s["path"] for s in manifest["sources"]] == [str(f) for f in files]
    assert manifest["skipped"] == [str(texts / "sub" / "image.png")]
    val, train = shard_tokens(tmp_path / "dir")
    each = [tokenizer.encode(f.read_text()) for f in files]
    assert np.array_equal(np.concatenate([val, train]), np.concatenate(each))
    assert tokenizer.decode(np.concatenate([val, train])) == "".join(f.read_text() for f in files)
    prep.prepare([str(texts / "**" / "*.*")], tmp_path / "glob", jobs=2, **kw)
    for name in ("val_000000", "train_000001"):
        dir_shard, glob_shard = tmp_path / "dir" / f"dir_{name}.bin", tmp_path / "glob" / f"glob_{name}.bin"
        assert dir_shard.read_bytes() == glob_shard.read_bytes()


def test_prepare_trains_a_tokenizer_on_a_sample(tmp_path, texts, monkeypatch, capsys):
    """Without --tokenizer, a BPE of --vocab-size is trained on pieces spread over the data
    (all of it when small); the CLI prints what it did."""
    monkeypatch.setattr(prep, "TOKENIZER_SAMPLE_BYTES", 8192)
    monkeypatch.setattr(prep, "SAMPLE_PIECE_BYTES", 1024)
    assert main(["prepare", str(texts / "a.txt"), str(texts / "sub"), "-o", str(tmp_path / "d"), "--vocab-size", "280",
                 "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: training a BPE of up to 280 tokens on " in out and "sampled evenly from the data" in out
    manifest = json.loads((tmp_path / "d" / "prepare.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 280 and manifest["tokenizer"]["trained_on_bytes"] <= 8192
    tok = Tokenizer.from_json((tmp_path / "d" / "tokenizer.json").read_text())
    val, train = shard_tokens(tmp_path / "d")
    texts_read = (texts / "a.txt").read_text() + (texts / "sub" / "b.md").read_text()
    assert tok.decode(np.concatenate([val, train])) == texts_read


def test_cut_points():
    assert prep.cut_point(b"one\ntwo\n three\nfour  \nfive") == len(b"one\ntwo\n three\n")
    assert prep.cut_point(b"one\n\ntwo") == len(b"one\n\n")  # no line break between visible characters
    assert prep.cut_point("na\u00efve caf\u00e9".encode()) == len("na\u00efve caf".encode())  # before the last one
    assert prep.cut_point(b"abc") == 2


# ----- training from shards ---------------------------------------------------------------
def tiny(**train):
    spec = preset("tiny")
    base = dict(steps=30, eval_interval=10, eval_batches=2, checkpoint_interval=10, keep_checkpoints=3)
    return replace(spec, train=replace(spec.train, **{**base, **train}))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, texts) -> Path:
    """The README and dsl.py prepared with the byte tokenizer, in shards of 8,000 tokens."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "tok.json").write_text(BYTES.to_json())
    prep.prepare([str(texts)], root / "data", tokenizer=root / "tok.json", shard_tokens=8000, jobs=1,
                 stdout=io.StringIO())
    return root / "data"


def run(spec, data, out=None, **kw):
    buf = io.StringIO()
    result = trainer.train(spec, None if data is None else str(data), device="cpu", out_dir=out, stdout=buf, **kw)
    return result, buf.getvalue()


def test_train_from_shards_and_resume_exactly(tmp_path, prepared):
    straight, text = run(tiny(), prepared, tmp_path / "straight")
    assert "(gptc prepare), " in text and "read a window at a time" in text
    assert all(np.isfinite(straight.losses)) and np.mean(straight.losses[-5:]) < straight.losses[0] - 0.3
    with pytest.raises(trainer.Interrupted):
        run(tiny(), prepared, tmp_path / "split", on_step=stop_at(13))
    resumed, text = run(None, None, resume=tmp_path / "split")  # the data and tokenizer come from the run
    assert "resuming" in text and resumed.losses == straight.losses[13:]  # bitwise, on the CPU
    def losses_of(run_dir):
        return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in trainer.read_metrics(run_dir)]
    assert losses_of(tmp_path / "split") == losses_of(tmp_path / "straight")


def stop_at(n):
    def on_step(step, record):
        if step == n:
            raise KeyboardInterrupt
    return on_step


def test_resuming_on_other_shards_is_refused(tmp_path, prepared, capsys):
    run(tiny(steps=2), prepared, tmp_path / "run")
    (tmp_path / "other").mkdir()
    for f in prepared.iterdir():
        (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
    val = next((tmp_path / "other").glob("*_val_*.bin"))
    val.write_bytes(llmc_datafile(np.asarray(open_shard(val)[:-1])))  # one token fewer
    manifest = json.loads((tmp_path / "other" / "prepare.json").read_text())
    manifest["shards"][0]["tokens"] -= 1
    (tmp_path / "other" / "prepare.json").write_text(json.dumps(manifest))
    code = main(["train", "--resume", str(tmp_path / "run"), "--data", str(tmp_path / "other"), "--steps", "3",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "differs from the data the run was trained on" in err


def test_sampling_reads_only_the_windows_it_draws(prepared, monkeypatch):
    """Once the shards are open, drawing batches reads each window alone (one read of 33
    tokens) and nothing else."""
    data = open_data(str(prepared))
    assert isinstance(data, ShardData)
    batches = Batches(Windows(data.train, 32, 256, "training split"), 8, seed=0)
    val = Windows(data.val, 32, 256, "validation split")

    def no_reading(*args, **kwargs):
        raise AssertionError("a file was read whole")
    for module, name in ((builtins, "open"), (io, "open"), (np, "fromfile"), (np, "load"), (np, "memmap"),
                         (Path, "read_bytes")):
        monkeypatch.setattr(module, name, no_reading)
    reads, pread = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append(n) or pread(fd, n, offset))
    x, y = batches.next()
    assert x.shape == (8, 32) and x.dtype == np.int32 and np.array_equal(x[:, 1:], y[:, :-1])
    validation_batches(val, 2, 8)
    assert reads == [33 * 2] * (8 + 2 * 8)


def test_memory_stays_flat_on_a_huge_shard(tmp_path):
    """A 4 GiB shard (sparse: 2**31 - 1 zero tokens) costs only the windows drawn."""
    path = tmp_path / "huge_train_000001.bin"
    with open(path, "wb") as f:
        f.write(llmc_datafile([], count=2**31 - 1))
        f.truncate(HEADER_BYTES + 2 * (2**31 - 1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    windows = Windows([open_data(str(path)).train[0]], 1024, 256, "training split")
    batches = Batches(windows, 8, seed=0)
    for _ in range(500):
        x, _ = batches.next()
    assert x.shape == (8, 1024) and windows.count == int(0.9 * (2**31 - 1)) - 1024
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20 * 1024  # KiB: under 20 MiB more


# ----- bad data: one line, nothing left behind --------------------------------------------
def one_line_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("gptc: error: ") and "Traceback" not in err, err
    return err


def test_bad_text_deep_in_a_file_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 1000)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.txt").write_bytes(b"fine text\n" * 500 + "caf\u00e9".encode("latin-1"))
    (tmp_path / "tok.json").write_text(BYTES.to_json())
    err = one_line_error(capsys, ["prepare", tmp_path / "in", "-o", tmp_path / "new" / "out", "--tokenizer",
                                  tmp_path / "tok.json"])
    assert f"'{tmp_path / 'in' / 'bad.txt'}' is not valid UTF-8 (byte 5003)" in err
    (tmp_path / "few.txt").write_text("abc")
    err = one_line_error(capsys, ["prepare", tmp_path / "few.txt", "-o", tmp_path / "out", "--tokenizer",
                                  tmp_path / "tok.json"])
    assert "the data yields only 3 tokens, too few for a validation and a training shard" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.txt", "in", "tok.json"]


def test_token_ids_outside_the_vocabulary_stop_training_in_one_line(tmp_path, capsys):
    """A training shard made with a larger vocabulary: refused at the first window that holds
    such an id, and a new run that never finished a step leaves no run directory."""
    ids = BYTES.encode((ROOT / "README.md").read_text())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x_val_000000.bin").write_bytes(llmc_datafile(ids[:2000]))
    (tmp_path / "d" / "x_train_000001.bin").write_bytes(llmc_datafile(np.full(5000, 4000)))
    (tmp_path / "d" / "tokenizer.json").write_text(BYTES.to_json())
    err = one_line_error(capsys, ["train", "--preset", "tiny", "--device", "cpu", "--data", tmp_path / "d",
                                  "--steps", "2", "--out", tmp_path / "run"])
    assert f"token shard '{tmp_path / 'd' / 'x_train_000001.bin'}' holds the token id 4,000" in err
    assert "outside the tokenizer's vocabulary of 256 tokens" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum,code,said", [(signal.SIGINT, 130, "gptc: interrupted"),
                                              (signal.SIGTERM, 143, "gptc: terminated")])
def test_a_signal_stops_prepare_cleanly(tmp_path, signum, code, said):
    """Ctrl-C (to the whole process group, as a terminal sends it) or SIGTERM while the
    workers encode: one line, status 128 + the signal, no output directory, no temporary
    files, no process left."""
    (tmp_path / "big.txt").write_text(default_corpus_text() * 30)  # 90 MB: encoding takes seconds
    (tmp_path / "tok.json").write_text(BYTES.to_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gptc", "prepare", str(tmp_path / "big.txt"), "-o",
                             str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("tokenizer:"):
                break
        time.sleep(0.5)
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code and err.strip() == said, err
    assert "tokenized" not in out and sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "tok.json"]
    assert not [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _session(pid) == proc.pid]


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:  # gone
        return None
