"""The trainer on the CPU: loss falls, exact resume after Ctrl-C, run files, keep-last-K,
tokenization cache, the CPU step cap, the loss plot (with and without matplotlib), and
bad input (one line, no traceback, nothing left behind)."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptc.tools import checkpoint as ckpt
from gptc.tools import train as trainer
from gptc.tools.cli import main
from gptc.spec import GptcError, preset
from conftest import png_size

ROOT = Path(__file__).resolve().parent.parent


def tiny(**train):
    spec = preset("tiny")
    base = dict(steps=40, eval_interval=10, eval_batches=2, checkpoint_interval=10, keep_checkpoints=3)
    return replace(spec, train=replace(spec.train, **{**base, **train}))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("GPTC_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text((ROOT / "README.md").read_text() + (ROOT / "gptc" / "compiler" / "dsl.py").read_text(), encoding="utf-8")
    return path


def run(spec, data, out=None, **kw):
    buf = io.StringIO()
    result = trainer.train(spec, str(data), device="cpu", out_dir=out, stdout=buf, **kw)
    return result, buf.getvalue()


def stop_at(n):
    def on_step(step, record):
        if step == n:
            raise KeyboardInterrupt
    return on_step


def losses_of(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in trainer.read_metrics(run_dir)]


def test_loss_falls_and_run_files(tmp_path, data_file):
    spec = tiny(steps=100, eval_interval=40, checkpoint_interval=40)
    result, text = run(spec, data_file, tmp_path / "run")
    first, last = result.losses[0], float(np.mean(result.losses[-10:]))
    assert last < 0.75 * first, (first, last)
    assert "tokens/s" in text and "ETA" in text and "validation loss" in text and "perplexity" in text
    run_dir = tmp_path / "run"
    records = trainer.read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 101))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [40, 80, 100]
    assert all(abs(r["val_ppl"] - np.exp(r["val_loss"])) < 1e-6 * r["val_ppl"] for r in evals)
    assert png_size(run_dir / "loss.png") == (900, 640)
    assert f"saved: {run_dir / 'checkpoints' / 'step-000100'}, {run_dir / 'metrics.jsonl'}, {run_dir / 'loss.png'}" in text
    assert (run_dir / "spec.toml").is_file()
    from gptc.tools.tokenizer import Tokenizer
    assert Tokenizer.load(run_dir / "tokenizer.json").vocab_size == 256
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [40, 80, 100]
    c = ckpt.load_checkpoint(run_dir / "checkpoints" / "step-000100")
    assert c.step == 100 and c.spec == spec and result.checkpoint == c.path
    assert set(c.optimizer) == {f"{k}.{n}" for n in c.params for k in "mv"}
    assert "wte" in c.params and c.params["wte"].shape == (256, 32)
    assert not list((run_dir / "checkpoints").glob(".tmp*"))


def test_loss_figure_shows_the_metrics():
    records = [{"step": s, "loss": 9.0 - s / 10, "lr": 1e-3 * min(s, 5) / 5} for s in range(1, 21)]
    for r in records[9::10]:
        r["val_loss"] = r["loss"] + 0.5
    figure = trainer.loss_figure(records, "run-1: tiny on cpu")
    loss_ax, lr_ax = figure.axes
    assert figure.get_suptitle() == "run-1: tiny on cpu"
    train, val = loss_ax.get_lines()
    assert list(train.get_xdata()) == list(range(1, 21)) and list(train.get_ydata()) == [r["loss"] for r in records]
    assert list(val.get_xdata()) == [10, 20] and list(val.get_ydata()) == [8.5, 7.5]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["training loss (each step's batch)",
                                                                        "validation loss"]
    (lr,) = lr_ax.get_lines()
    assert list(lr.get_ydata()) == [r["lr"] for r in records]
    assert loss_ax.get_ylabel().startswith("loss") and lr_ax.get_ylabel() == "learning rate"
    assert lr_ax.get_xlabel() == "step"


def test_without_matplotlib_the_run_finishes_without_a_plot(tmp_path, data_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result, text = run(tiny(steps=3, eval_interval=3, checkpoint_interval=3), data_file, tmp_path / "run")
    assert result.step == 3
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert notes == ["note: matplotlib is not installed; no plot written (pip install matplotlib)"]
    assert not (tmp_path / "run" / "loss.png").exists()
    assert [r["step"] for r in trainer.read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert text.rstrip().endswith(f"saved: {result.checkpoint}, {tmp_path / 'run' / 'metrics.jsonl'}")


def test_interrupt_and_resume_equal_an_uninterrupted_run(tmp_path, data_file):
    spec = tiny()
    straight, _ = run(spec, data_file, tmp_path / "straight")

    with pytest.raises(trainer.Interrupted) as info:
        run(spec, data_file, tmp_path / "split", on_step=stop_at(17))
    assert info.value.step == 17  # saved at the step of the interrupt, not the last interval
    assert info.value.checkpoint == tmp_path / "split" / "checkpoints" / "step-000017"
    assert ckpt.load_checkpoint(info.value.checkpoint).step == 17

    resumed, text = run(None, data_file, resume=tmp_path / "split")
    assert "resuming" in text
    assert resumed.step == 40 and len(resumed.losses) == 23
    assert resumed.losses == straight.losses[17:]            # bitwise equal on the CPU
    assert losses_of(tmp_path / "split") == losses_of(tmp_path / "straight")
    a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-000040")
    b = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "step-000040")
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    for name in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[name], b.optimizer[name])
    assert a.rng_state == b.rng_state


def test_resume_with_more_steps_equals_a_longer_run(tmp_path, data_file):
    # With a constant schedule the learning rate does not depend on the total, so 20
    # steps then --steps 40 must equal 40 straight steps (the data is drawn the same way).
    spec = tiny(schedule="constant", warmup=5)
    straight, _ = run(spec, data_file, tmp_path / "a")
    run(replace(spec, train=replace(spec.train, steps=20)), data_file, tmp_path / "b")
    resumed, _ = run(None, data_file, resume=tmp_path / "b", steps=40)
    assert resumed.losses == straight.losses[20:]
    # a metrics line written after the newest checkpoint (a crash) is dropped on resume
    run_dir = tmp_path / "c"
    run(replace(spec, train=replace(spec.train, steps=20)), data_file, run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 21, "loss": 9.0}) + "\n" + '{"step": 22, "lo')  # the last line cut short
    run(None, data_file, resume=run_dir, steps=25)
    assert [r["step"] for r in trainer.read_metrics(run_dir)] == list(range(1, 26))


def test_keep_last_k_checkpoints(tmp_path, data_file):
    run(tiny(steps=23, checkpoint_interval=5, keep_checkpoints=2), data_file, tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [20, 23]


def test_tokenization_is_cached(tmp_path, data_file, cache_dir):
    spec = replace(tiny(steps=2), model=replace(tiny().model, vocab_size=300))
    _, first = run(spec, data_file, tmp_path / "a")
    assert "tokenized in" in first
    entries = list((cache_dir / "corpus").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokens.npy").is_file() and (entries[0] / "tokenizer.json").is_file()
    _, second = run(spec, data_file, tmp_path / "b")
    assert "cached" in second
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    (entries[0] / "tokens.npy").write_bytes(b"garbage")  # a damaged entry is rebuilt
    _, third = run(spec, data_file, tmp_path / "c")
    assert "tokenized in" in third
    assert trainer.read_metrics(tmp_path / "a")[0]["loss"] == trainer.read_metrics(tmp_path / "c")[0]["loss"]


def test_cpu_step_cap(tmp_path, data_file, monkeypatch):
    assert trainer.cpu_step_cap(preset("tiny"), 34816) >= preset("tiny").train.steps
    assert 100 <= trainer.cpu_step_cap(preset("hipgpt"), 1554312) < preset("hipgpt").train.steps
    flops = trainer.step_flops(preset("tiny"), 34816)
    monkeypatch.setattr(trainer, "CPU_STEP_BUDGET_FLOP", 12 * flops)
    result, text = run(tiny(steps=300), data_file, tmp_path / "a", steps=None)
    assert result.step == 10 and "training 10 steps instead of the spec's 300" in text
    result, _ = run(tiny(steps=12), data_file, tmp_path / "b", steps=12)  # an explicit --steps is obeyed
    assert result.step == 12


def test_disk_full_leaves_nothing(tmp_path, data_file, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(ckpt, "write_atomic", full)
    with pytest.raises(GptcError, match="no space left on the device"):
        run(tiny(), data_file, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_disk_full_at_a_checkpoint(tmp_path, data_file, monkeypatch):
    real = ckpt.write_atomic

    def fill_disk(step, record):
        if step == 15:
            monkeypatch.setattr(ckpt, "write_atomic", lambda p, d: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(GptcError) as info:
        run(tiny(), data_file, tmp_path / "run", on_step=fill_disk)
    message = str(info.value)
    assert "no space left" in message and "step 20" in message and "--resume" in message
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [10]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))
    monkeypatch.setattr(ckpt, "write_atomic", real)
    result, _ = run(None, data_file, resume=tmp_path / "run")
    assert result.step == 40


# ----- the command line -------------------------------------------------------------------
def cli(capsys, *args):
    code = main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, expected):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptc: error:"), err
    assert expected in lines[0], lines[0]


@pytest.fixture
def finished_run(tmp_path, data_file, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = cli(capsys, "--preset", "tiny", "--device", "cpu", "--data", data_file, "--steps", 20, "--out", run_dir)
    assert code == 0
    return run_dir


def test_cli_resume_and_mismatch(finished_run, data_file, capsys):
    code, out, err = cli(capsys, "--resume", finished_run, "--steps", 25, "--device", "cpu")
    assert code == 0, err
    assert "resuming" in out and "step-000025" in out
    code, _, err = cli(capsys, "--resume", finished_run, "--preset", "hipgpt", "--device", "cpu")
    assert_one_line_error(code, err, "model.vocab_size is 5000 in the given spec but 256 in the run")
    code, _, err = cli(capsys, "--resume", finished_run, "--lr", "0.1", "--device", "cpu")
    assert_one_line_error(code, err, "train.lr is 0.1 in the given spec")
    code, _, err = cli(capsys, "--resume", finished_run, "--steps", 10, "--device", "cpu")
    assert_one_line_error(code, err, "already at step 25")
    code, out, _ = cli(capsys, "--resume", finished_run, "--device", "cpu")
    assert code == 0 and "nothing to do" in out
    code, _, err = cli(capsys, "--preset", "tiny", "--device", "cpu", "--data", data_file, "--out", finished_run)
    assert_one_line_error(code, err, "already holds a run")
    other = finished_run.parent / "other.txt"
    other.write_text("a different text " * 100)
    code, _, err = cli(capsys, "--resume", finished_run, "--steps", 30, "--data", other, "--device", "cpu")
    assert_one_line_error(code, err, "differs from the data the run was trained on")


@pytest.mark.parametrize("damage,expected", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]), "truncated"),
    (lambda d: (d / "optimizer.safetensors").write_bytes(b"\x08"), "corrupt or truncated"),
    (lambda d: (d / "state.json").unlink(), "incomplete"),
    (lambda d: (d / "state.json").write_text("{"), "not valid JSON"),
    (lambda d: _flip_last_byte(d / "model.safetensors"), "does not match the sha256"),
])
def test_cli_corrupt_checkpoint(finished_run, capsys, damage, expected):
    damage(finished_run / "checkpoints" / "step-000020")
    code, _, err = cli(capsys, "--resume", finished_run, "--steps", 30, "--device", "cpu")
    assert_one_line_error(code, err, expected)


def _flip_last_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_cli_bad_input(tmp_path, data_file, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short for a window of 33 tokens, twice over" * 4)
    code, _, err = cli(capsys, "--preset", "tiny", "--device", "cpu", "--data", short, "--out", tmp_path / "a")
    assert_one_line_error(code, err, "fewer than the 321 tokens needed")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, _, err = cli(capsys, "--preset", "tiny", "--device", "cpu", "--data", data_file, "--out", a_file / "run")
    assert_one_line_error(code, err, f"'{a_file}' is a file, not a directory; choose another --out")
    code, _, err = cli(capsys, "--resume", tmp_path / "nowhere", "--device", "cpu")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = cli(capsys, "--resume", tmp_path, "--device", "cpu")
    assert_one_line_error(code, err, "has no checkpoints")
    code, _, err = cli(capsys, tmp_path, "--device", "cpu")
    assert_one_line_error(code, err, "not a bundle (no manifest.json)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "short.txt"]


@pytest.mark.parametrize("signum,code,said", [(signal.SIGINT, 130, "Ctrl-C: saving a checkpoint after this step"),
                                              (signal.SIGTERM, 143, "SIGTERM: saving a checkpoint after this step")])
def test_real_ctrl_c_and_sigterm(tmp_path, data_file, signum, code, said):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, `docker stop`) to `gptc train`: the step
    finishes, a checkpoint is saved, exit 128 + the signal, and the run resumes from it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPTC_CACHE_DIR": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gptc", "train", "--preset", "tiny", "--device", "cpu",
                             "--data", str(data_file), "--steps", "100000", "--out", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("step"):
                break
        time.sleep(0.3)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and said in err
    step = ckpt.list_checkpoints(run_dir)[-1][0]
    assert f"interrupted at step {step}: saved" in out and "--resume" in out
    assert [r["step"] for r in trainer.read_metrics(run_dir)] == list(range(1, step + 1))
    result, _ = run(None, data_file, resume=run_dir, steps=step + 3)
    assert result.step == step + 3


@pytest.fixture
def deadline():
    """deadline(seconds): fail the test (instead of hanging) if it runs longer."""
    def on_alarm(signum, frame):
        raise AssertionError("took too long")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    yield signal.alarm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_min_corpus_tokens_is_the_fewest_that_split_allows(deadline):
    from gptc.tools.data import Part, min_corpus_tokens, split_parts
    def shortest_split(n, fraction):
        train, val = split_parts([Part("x", np.zeros(n))], fraction)
        return min(sum(len(p.tokens) for p in parts) for parts in (train, val))

    for fraction in (0.1, 0.25, 0.5, 0.9):
        for seq_len in range(1, 200):
            n = min_corpus_tokens(seq_len, fraction)
            ok = [shortest_split(k, fraction) >= seq_len + 1 for k in (n - 1, n)]
            assert ok == [False, True], (fraction, seq_len, n)
    deadline(5)
    assert min_corpus_tokens(10**8) == 1_000_000_001  # 900,000,000 + 100,000,001


def test_a_huge_seq_len_is_refused_before_tokenizing(tmp_path, data_file, capsys, deadline):
    toml = tmp_path / "long.toml"
    toml.write_text("preset = 'tiny'\n[model]\nseq_len = 100000000\n")
    deadline(20)
    code, _, err = cli(capsys, toml, "--device", "cpu", "--data", data_file, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "fewer than the 1,000,000,001 tokens needed")
    assert "bytes (so at most as many tokens)" in err and not (tmp_path / "run").exists()


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resuming_an_older_checkpoint_is_an_explicit_fork(tmp_path, data_file, capsys):
    spec = tiny(steps=40)  # checkpoints at 20, 30, 40 (keep 3)
    straight, _ = run(spec, data_file, tmp_path / "run")
    before = tree(tmp_path / "run")
    older = tmp_path / "run" / "checkpoints" / "step-000030"
    code, _, err = cli(capsys, "--resume", older, "--steps", 50, "--device", "cpu")
    assert_one_line_error(code, err, f"is not the newest checkpoint of the run '{tmp_path / 'run'}' (step-000040 "
                                     f"is); going on from it there would fork the run's history; fork it into a new "
                                     f"run directory with: --resume {older} --out NEWDIR")
    assert tree(tmp_path / "run") == before
    forked, text = run(None, data_file, resume=older, out=tmp_path / "fork")
    assert f"forking {older} (step 30) into the new run {tmp_path / 'fork'}" in text
    assert forked.losses == straight.losses[30:]  # the fork retraces steps 31..40 exactly
    assert losses_of(tmp_path / "fork") == losses_of(tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "fork")] == [40]
    assert tree(tmp_path / "run") == before
    code, _, err = cli(capsys, "--resume", older, "--out", tmp_path / "fork", "--device", "cpu")
    assert_one_line_error(code, err, "cannot fork into")


def test_a_corrupt_newest_checkpoint_names_the_good_one_to_fork(tmp_path, data_file, capsys):
    run(tiny(steps=40), data_file, tmp_path / "run")
    _flip_last_byte(tmp_path / "run" / "checkpoints" / "step-000040" / "model.safetensors")
    code, _, err = cli(capsys, "--resume", tmp_path / "run", "--steps", 50, "--device", "cpu")
    good = tmp_path / "run" / "checkpoints" / "step-000030"
    assert_one_line_error(code, err, f"does not match the sha256 recorded in state.json; to go on from the newest "
                                     f"good checkpoint, fork it: --resume {good} --out NEWDIR")


def test_pruning_never_deletes_a_good_checkpoint_for_a_corrupt_one(tmp_path, data_file):
    kept = {}

    def corrupt_20(step, record):
        if step == 25:
            _flip_last_byte(tmp_path / "run" / "checkpoints" / "step-000020" / "model.safetensors")
        kept[step] = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")]
    run(tiny(steps=40, keep_checkpoints=2), data_file, tmp_path / "run", on_step=corrupt_20)
    assert kept[30] == [10, 20, 30]  # 20 fails its checksum: 10 is kept as the second good one
    assert kept[40] == [30, 40]


def test_a_step_too_large_for_the_memory_is_refused_at_once(tmp_path):
    """seq_len 4096 under a 3 GiB limit (ulimit -v): refused before any work, in one line
    naming what was too big and what to do (it ended in a NumPy traceback)."""
    import resource

    from gptc.tools.device import memory_limit
    toml = tmp_path / "long.toml"
    toml.write_text("preset = 'tiny'\n[model]\nseq_len = 4096\n")
    limit = 3 * 2**30
    result = subprocess.run([sys.executable, "-m", "gptc", "train", str(toml), "--device", "cpu", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    import re
    assert re.fullmatch(r"gptc: error: one training step of long \(batch 8 x seq_len 4096\) needs about "
                        r"[\d.]+ GiB on the CPU \(NumPy reference executor; its largest tensor 1\.0 GiB\), "
                        + re.escape(f"more than the {min(limit, memory_limit()) / 2**30:,.1f} GiB this process may "
                                    "use; lower --batch or model.seq_len, or train on a GPU (--device gpu)"),
                        result.stderr.strip()), result.stderr
    assert not (tmp_path / "run").exists()


def test_running_out_of_memory_is_one_line_and_leaves_nothing(tmp_path, data_file, capsys, monkeypatch):
    from gptc.runtime.reference import ReferenceExecutor

    def no_memory(self, inputs):
        raise MemoryError
    monkeypatch.setattr(ReferenceExecutor, "run", no_memory)
    code, _, err = cli(capsys, "--preset", "tiny", "--device", "cpu", "--data", data_file, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "one training step of tiny (batch 8 x seq_len 32) needs about 0.0 GiB on the "
                                     "CPU (NumPy reference executor; its largest tensor 0.0 GiB), and ran out of memory")
    assert not (tmp_path / "run").exists()


def test_a_model_vocabulary_larger_than_the_corpus_yields(tmp_path, data_file, capsys):
    """The tokenizer learns what the corpus yields; the model keeps its vocab_size rows
    (gpt2's 50,257 on the bundled corpus's 36,874 tokens used to be refused)."""
    code, out, err = cli(capsys, "--preset", "tiny", "--vocab-size", 20000, "--device", "cpu", "--data", data_file,
                         "--steps", 2, "--out", tmp_path / "run")
    assert code == 0, err
    from gptc.tools.tokenizer import Tokenizer
    tokens = Tokenizer.load(tmp_path / "run" / "tokenizer.json").vocab_size
    assert 256 < tokens < 20000
    assert (f"note: the tokenizer has {tokens:,} tokens (all this corpus yields); the model's 20,000 embedding rows "
            "stay (the rest are never used)") in out
    assert f"(BPE vocabulary {tokens}, " in out
    c = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002")
    assert c.spec.model.vocab_size == 20000 and c.params["wte"].shape == (20000, 32)
    code, _, err = cli(capsys, "--resume", tmp_path / "run", "--vocab-size", 300, "--steps", 3, "--device", "cpu")
    assert_one_line_error(code, err, "model.vocab_size is 300 in the given spec but 20000 in the run")
