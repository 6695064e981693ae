"""The trainer behind `gptc train`: a corpus in; checkpoints, metrics and a loss curve out.

One run, in order:
1. device: `auto` takes a GPU if there is one, else the NumPy reference executor on
   the CPU, and says which. On the CPU, a run whose step count the user did not give
   (--steps) is capped to about CPU_STEP_BUDGET_FLOP of work (a few minutes), and
   says so.
2. spec: the given one, or, with --resume, the one stored in the checkpoint (a given
   spec must match it in everything but train.steps, which may be raised). With
   --init-from HFDIR (a transformers model directory, gptc/tools/hf.py), the model
   section and the initial weights come from HFDIR and the train section from the
   given spec (or the defaults).
3. data (gptc/tools/data.py: open_data): a text (--data FILE, a directory or glob of
   text files, or the bundled corpus) is tokenized by --tokenizer, by the pretrained
   model's tokenizer (--init-from; resumed, the checkpoint's copy), or by a BPE trained on
   it up to model.vocab_size (fewer when the corpus yields fewer tokens: the model
   keeps its model.vocab_size embedding rows, the rest are never used; cached on disk)
   and split 90/10 into training and validation tokens. Token shards (a `gptc prepare`
   directory, or llm.c .bin files) are read a window at a time, with the tokenizer
   beside them (or --tokenizer; resuming, the run's); model.vocab_size grows to the
   tokenizer's vocabulary unless --vocab-size was given. Validation: the *_val_* shards, else the
   last 10% of the tokens. Training windows are drawn by a generator seeded with
   train.seed, validation uses the same evenly spread windows at every eval.
4. run directory (gptc/tools/checkpoint.py documents its layout): spec.toml,
   tokenizer.json, metrics.jsonl, checkpoints/step-NNNNNN/ every
   train.checkpoint_interval steps and at the end (the last train.keep_checkpoints
   kept), loss.png at the end (loss and learning rate, through matplotlib; without it,
   a one-line note says that no plot was written).
5. the loop: one training-graph step per batch (lr from the schedule, 1-based step),
   a live progress line, validation loss every train.eval_interval steps and at the end.

Resuming restores the parameters, AdamW moments, step and the data generator's
state, so a run that was stopped and resumed computes the same losses as one that
never stopped (bit for bit on the CPU). The learning-rate schedule depends on
train.steps: raising --steps on resume continues with the schedule of the new total.

Ctrl-C (SIGINT) and SIGTERM (what schedulers and `docker stop` send): the first one
lets the current step finish, saves a checkpoint at that step and exits with status 130
(SIGINT) or 143 (SIGTERM); a second one quits at once without saving.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TextIO

import numpy as np

from gptc.common import first_file_in
from gptc.tools import checkpoint as ckpt
from gptc.tools.console import Console, duration
from gptc.tools.data import (VALIDATION_FRACTION, Batches, DataError, Part, ShardData, TextData, Windows,
                             check_corpus_size, load_tokenizer, open_data, split_parts, tokenize_corpus,
                             validation_batches)
from gptc.tools.figure import PlotUnavailable, new_figure, save_png
from gptc.compiler.ir import Graph
from gptc.compiler.parallel import Parallel, shard_array, unshard
from gptc.models import build_graph, init_params
from gptc.spec import GptcError, Spec, describe_options, lr_at, spec_to_toml, validate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Work a CPU run does when the user gave no --steps: about 3 minutes at 25 GFLOP/s, which
# the NumPy executor reaches on a laptop (hipgpt: ~400 steps).
CPU_STEP_BUDGET_FLOP = 4e12


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM (`signum`); `checkpoint` is where it was saved
    (None: not saved)."""

    def __init__(self, step: int, checkpoint: Path | None, run_dir: Path, signum: int = signal.SIGINT):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint, self.run_dir, self.signum = step, checkpoint, run_dir, signum


@dataclass
class TrainResult:
    run_dir: Path
    step: int                                   # steps done in total
    losses: list[float] = field(default_factory=list)  # the losses of the steps this call ran
    val_loss: float | None = None
    checkpoint: Path | None = None


# ----- errors from the file system ------------------------------------------------------
def _not_a_directory(run_dir: Path) -> GptcError:
    return GptcError(f"cannot use '{run_dir}' as the run directory: '{first_file_in(run_dir)}' is a file, "
                     "not a directory; choose another --out")


def _os_error(e: OSError, what: str, run_dir: Path | None = None, resumable: bool = False) -> GptcError:
    hint = f" and continue with: gptc train --resume {run_dir}" if resumable and run_dir else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return GptcError(f"no space left on the device while {what}; free some disk space{hint or ' and run again'}")
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and run_dir is not None and first_file_in(run_dir):
        return _not_a_directory(run_dir)
    reason = e.strerror or str(e)
    return GptcError(f"cannot write while {what}: {reason}" + (f" ({e.filename})" if e.filename else "")
                     + ("; choose another --out" if not hint else f"; fix it{hint}"))


# ----- spec helpers ---------------------------------------------------------------------
def step_flops(spec: Spec, n_params: int) -> float:
    """Rough FLOPs of one training step: 6 per parameter per token (forward + backward)
    plus attention's scores and weighted sums."""
    m, t = spec.model, spec.train
    tokens = t.batch_size * m.seq_len
    return 6.0 * n_params * tokens + 12.0 * m.n_layers * tokens * m.seq_len * m.d_model


def cpu_step_cap(spec: Spec, n_params: int) -> int:
    cap = int(CPU_STEP_BUDGET_FLOP / step_flops(spec, n_params))
    if cap >= 100:
        return cap // 50 * 50
    return max(1, cap // 10 * 10 if cap >= 10 else cap)


def _shards_summary(data: ShardData) -> str:
    def shards(n: int) -> str:
        return f"{n} shard{'s' if n != 1 else ''}"
    n_train, n_val = (sum(len(p.tokens) for p in parts) for parts in (data.train, data.val))
    if data.val_named:
        return (f"{shards(len(data.train))} for training ({n_train:,} tokens), {shards(len(data.val))} for validation "
                f"({n_val:,} tokens)")
    return (f"{shards(len(data.opened))} of {n_train + n_val:,} tokens (none named *_val_*): {n_train:,} for training, "
            f"the last {n_val:,} for validation")


def _spec_mismatch(given: Spec, stored: Spec) -> str | None:
    for section in ("model", "train"):
        a, b = getattr(given, section), getattr(stored, section)
        for f in fields(a):
            if section == "train" and f.name == "steps":
                continue
            if getattr(a, f.name) != getattr(b, f.name):
                return (f"{section}.{f.name} is {getattr(a, f.name)!r} in the given spec but "
                        f"{getattr(b, f.name)!r} in the run")
    return None


# ----- the trainer ------------------------------------------------------------------------
class _NotRankZero(Exception):
    """Rank > 0 of a multi-GPU run: the run directory is rank 0's to write."""


def shard_states(states: Mapping[str, np.ndarray], par: Parallel) -> dict[str, np.ndarray]:
    """This rank's slices (ZeRO-1) of whole optimizer moments."""
    return {n: shard_array(v, par) for n, v in states.items()}


def gather_states(env, states: Mapping[str, np.ndarray], whole: Graph) -> dict[str, np.ndarray] | None:
    """The whole moments on rank 0 from every rank's slices (None on the other ranks)."""
    from gptc.runtime.comm import gather_bytes
    buf = io.BytesIO()
    np.savez(buf, **states)
    parts = gather_bytes(env, buf.getvalue())
    if parts is None:
        return None
    slices = [np.load(io.BytesIO(p)) for p in parts]
    return {n: unshard([s[n] for s in slices], whole.type(whole.states[n]).shape) for n in states}


def train(spec: Spec | None, data: str | None = None, device: str = "auto", out_dir: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, *, steps: int | None = None, lr: float | None = None,
          batch: int | None = None, vocab_size: int | None = None, name: str = "run",
          bundle: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
          init_from: str | os.PathLike | None = None, stdout: TextIO | None = None, tty: bool | None = None,
          on_step: Callable[[int, dict], None] | None = None, cache_dir="default",
          precision: str | None = None, zero1: bool = False) -> TrainResult:
    """Train and return a TrainResult. `spec` may be None only with `resume` (the run's own
    spec is used) or `init_from` (a transformers model directory to start from: its model,
    weights and tokenizer; `spec` then gives only the train section, default TrainSpec).
    `steps`, `lr`, `batch`, `vocab_size`, `precision` are the user's explicit overrides (None: not
    given); `data` is what --data names (see step 3 above), `tokenizer` a tokenizer.json to
    use. `on_step(step, record)` is called after every completed step (tests raise
    KeyboardInterrupt from it). Raises GptcError for bad input; Interrupted on Ctrl-C or
    SIGTERM, after saving a checkpoint.

    Started by a launcher (RANK, WORLD_SIZE, ...: gptc/runtime/comm.py) it is one rank
    of a data-parallel run on several GPUs: batch_size is then each GPU's batch, rank 0
    alone prints and writes the run directory, and `zero1` shards the optimizer state."""
    from gptc.runtime.comm import launch_env
    env = launch_env()
    if env.rank > 0:  # rank 0 speaks for the run
        stdout, tty = open(os.devnull, "w", encoding="utf-8"), False
    console = Console(stdout, tty)
    note = lambda text: console.line(f"note: {text}")  # noqa: E731
    # Everything the caller gave is checked before anything is opened, read or built.
    overrides = {k: v for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch),
                                                 ("precision", precision)) if v is not None}

    def overridden(s: Spec) -> Spec:
        model = s.model if vocab_size is None else replace(s.model, vocab_size=vocab_size)
        return replace(s, model=model, train=replace(s.train, **overrides))

    if bundle is not None and spec is not None:
        raise GptcError("give either a bundle or a spec/--preset, not both")
    if init_from is not None:
        for given, what in ((resume, "--resume"), (bundle, "a bundle"), (vocab_size, "--vocab-size")):
            if given is not None:
                raise GptcError(f"--init-from starts a new run with the pretrained model's own spec and vocabulary; "
                                f"give it without {what}")
        spec = spec if spec is not None else Spec()
    if spec is None and resume is None and bundle is None:
        raise GptcError("give a spec file or --preset (or --resume RUNDIR)")
    if spec is not None:
        spec = validate(overridden(spec))

    # 1. device -------------------------------------------------------------------------
    from gptc.runtime.reference import ReferenceExecutor
    from gptc.tools.device import check_cpu_memory, cpu_memory_error, resolve_device
    if zero1 and env.world == 1:
        raise GptcError("--zero1 shards the optimizer state across GPUs; train on several (--gpus N, or under a "
                        "launcher)")
    if env.world > 1:
        if device == "cpu" or bundle is not None:
            raise GptcError(f"a run on {env.world} ranks trains on GPUs from the spec (no --device cpu, no bundle)")
        if out_dir is None and resume is None:
            raise GptcError(f"a run on {env.world} ranks needs --out DIR, the run directory every rank names")
    dev = resolve_device(device, env.local_rank)
    if dev is None and env.world > 1:
        raise GptcError(f"rank {env.rank}: no GPU {env.local_rank} (LOCAL_RANK) found")
    if dev is None:
        where = "cpu (no GPU found)" if device == "auto" else "cpu"
        device_name = "cpu (NumPy reference executor)"
        console.line(f"device: {device} -> {where}, NumPy reference executor" if device == "auto"
                     else "device: cpu, NumPy reference executor")
    else:
        device_name = dev.name if env.world == 1 else f"{dev.name} x {env.world}"
        console.line(f"device: {device} -> {device_name}" if device == "auto" else f"device: {device_name}")
        if env.world > 1:
            console.line(f"data parallel: {env.world} ranks (this is rank {env.rank}), "
                         + ("ZeRO-1 optimizer sharding" if zero1 else "optimizer state on every rank"))

    runtime = None  # on a GPU: the steps of a bundle, sharing the parameters in device memory
    comm = None  # a multi-GPU run's communicator
    if bundle is not None:
        if dev is None:
            raise GptcError(f"a bundle runs on a GPU, and none is in use; use --device gpu, or train the bundle's "
                            f"spec on the CPU: gptc train {Path(bundle) / 'spec.toml'} --device cpu")
        from gptc.runtime.bundle import Bundle
        loaded = Bundle(bundle)
        for option, value, compiled in (("--batch", batch, loaded.spec.train.batch_size),
                                        ("--vocab-size", vocab_size, loaded.spec.model.vocab_size),
                                        ("--precision", precision, loaded.spec.train.precision)):
            if value is not None and value != compiled:
                raise GptcError(f"bundle '{bundle}' is compiled for {option} {compiled}; compile it again for "
                                f"another {option}")
        spec = validate(overridden(loaded.spec))
        runtime = loaded.open(dev)

    # 2. spec (and the checkpoint to resume, or the pretrained model to start from) ---------
    pretrained = None
    if init_from is not None:
        from gptc.tools.hf import load_pretrained
        pretrained = load_pretrained(init_from, note)
        spec = validate(replace(spec, model=pretrained.model))
        console.line(f"init: {init_from}: {pretrained.describe()}")
    checkpoint = None
    fork = False  # resuming a checkpoint into a new run directory (checkpoint.py: a run's history)
    if resume is not None:
        checkpoint, run_dir = ckpt.resume_point(resume, out_dir)
        fork = run_dir.resolve() != ckpt.run_dir_of(checkpoint.path).resolve()
        stored = checkpoint.spec
        given = spec if spec is not None else overridden(stored)
        why = _spec_mismatch(given, stored)
        if why:
            raise GptcError(f"cannot resume '{resume}': {why}; resume without a spec, --preset, --lr, --batch or "
                            "--vocab-size (the run keeps its own spec), or start a new run without --resume")
        total = steps if steps is not None else stored.train.steps
        if total < checkpoint.step or (fork and total == checkpoint.step):
            raise GptcError(f"the run is already at step {checkpoint.step}; give --steps greater than that to continue")
        spec = validate(replace(stored, train=replace(stored.train, steps=total)))
        if fork and first_file_in(run_dir):
            raise _not_a_directory(run_dir)
    else:
        if out_dir is not None:
            run_dir = Path(out_dir)
        else:
            run_dir = base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            for n in range(2, 1000):
                if not run_dir.exists():
                    break
                run_dir = base.with_name(f"{base.name}-{n}")
        if first_file_in(run_dir):
            raise _not_a_directory(run_dir)
        if ckpt.list_checkpoints(run_dir):
            raise GptcError(f"'{run_dir}' already holds a run with checkpoints; continue it with --resume {run_dir} "
                            "or choose another --out")
    m, t = spec.model, spec.train

    # 3. data (opened and checked here; a text is tokenized below) --------------------------
    data_info = checkpoint.state.get("data", {}) if checkpoint is not None else {}
    if data is None and data_info.get("path"):
        data = data_info["path"]
    try:
        source = open_data(data)
    except DataError as e:
        if data is None or data_info.get("path") != data:
            raise
        raise DataError(f"cannot read the run's data: {e}; if it moved, pass it with --data") from None
    if checkpoint is not None and data_info.get("sha256") not in (None, source.fingerprint):
        raise GptcError(f"cannot resume '{resume}': the data ({source.source}) differs from the data the run was "
                        "trained on; pass the run's data with --data"
                        + (f" ({data_info['path']})" if data_info.get("path") else ""))
    # The tokenizer: a pretrained model's own (resuming such a run, the checkpoint's copy),
    # --tokenizer, else the shards' own (or, resuming, the run's); a text without any gets
    # one trained on it below.
    init_origin = str(Path(init_from).resolve()) if init_from is not None else (
        checkpoint.state.get("init_from") if checkpoint is not None else None)
    if init_origin is not None and not isinstance(init_origin, str):
        raise ckpt.CheckpointError(f"checkpoint '{checkpoint.path}' is corrupt: state.json has an invalid 'init_from'")
    given, tokenizer_name = None, ""
    if init_origin is not None:
        if tokenizer is not None:
            raise GptcError("a run started from a pretrained model uses that model's tokenizer; give it without "
                            "--tokenizer")
        given = pretrained.tokenizer if pretrained is not None else _checkpoint_tokenizer(checkpoint)
        tokenizer_name = "the pretrained model's tokenizer"
    elif tokenizer is not None:
        given, tokenizer_name = load_tokenizer(tokenizer), f"the tokenizer '{tokenizer}'"
    elif isinstance(source, ShardData) and source.tokenizer_file is not None:
        given, tokenizer_name = load_tokenizer(source.tokenizer_file), f"the tokenizer '{source.tokenizer_file}'"
    elif isinstance(source, ShardData) and checkpoint is not None:
        from gptc.tools.tokenizer import Tokenizer
        given, tokenizer_name = Tokenizer.from_json(checkpoint.tokenizer_json), "the run's tokenizer"
    elif isinstance(source, ShardData):
        raise DataError(f"the token shards of {source.source} come without a tokenizer (no tokenizer.json beside "
                        "them); pass the one they were made with: --tokenizer FILE")
    if given is not None:
        if checkpoint is not None and checkpoint.tokenizer_json != given.to_json():
            raise ckpt.CheckpointError(f"cannot resume '{resume}': {tokenizer_name} is not the one the run was "
                                       "trained with; resume without --tokenizer")
        if given.vocab_size > m.vocab_size:
            if vocab_size is not None or checkpoint is not None or bundle is not None or init_origin is not None:
                raise GptcError(f"{tokenizer_name} has {given.vocab_size:,} tokens, more than the "
                                f"model's {m.vocab_size:,} embedding rows; give --vocab-size {given.vocab_size} (or "
                                "more)" + (" and compile the bundle again" if bundle is not None else ""))
            note(f"model.vocab_size {m.vocab_size:,} -> {given.vocab_size:,}, the vocabulary of {tokenizer_name} "
                 "(--vocab-size N chooses)")
            spec = validate(replace(spec, model=replace(m, vocab_size=given.vocab_size)))
            m = spec.model
    if isinstance(source, TextData):
        check_corpus_size(len(source.text.encode("utf-8")), m.seq_len, VALIDATION_FRACTION,
                          "bytes (so at most as many tokens)")
    else:
        train_windows = Windows(source.train, m.seq_len, given.vocab_size, "training split")
        val_windows = Windows(source.val, m.seq_len, given.vocab_size, "validation split")

    par = Parallel(env.world, env.rank, zero1 and env.world > 1)
    train_graph = build_graph(spec, "train", parallel=par)
    # The tensors of a checkpoint: ZeRO-1 ranks hold slices of the moments, the run's
    # checkpoints hold them whole (resumable at any world size).
    whole_graph = build_graph(spec, "train") if par.zero1 else train_graph
    n_params = sum(train_graph.type(nid).size for nid in train_graph.params.values())
    if dev is None and steps is None and checkpoint is None:
        cap = cpu_step_cap(spec, n_params)
        if t.steps > cap:
            note(f"on the CPU, training {cap} steps instead of the spec's {t.steps} so that the run ends in a "
                 "few minutes; pass --steps N to choose" + (" (this model is too large to train usefully on a "
                                                          "CPU; use --device gpu)" if cap < 20 else ""))
            spec = replace(spec, train=replace(t, steps=cap))
            t = spec.train
    memory_what = f"one training step of {name} (batch {t.batch_size} x seq_len {m.seq_len})"
    memory_advice = "lower --batch or model.seq_len, or train on a GPU (--device gpu)"
    if dev is None:
        check_cpu_memory(train_graph, memory_what, memory_advice)

    def out_of_memory(e: MemoryError) -> BaseException:
        return cpu_memory_error(train_graph, memory_what, memory_advice, ran_out=True) if dev is None else e

    if isinstance(source, TextData):
        started = time.perf_counter()
        tok, ids, cached = tokenize_corpus(source.text, m.vocab_size, cache_dir, warn=note, tokenizer=given)
        how = "cached" if cached else f"tokenized in {time.perf_counter() - started:.1f}s"
        check_corpus_size(len(ids), m.seq_len, VALIDATION_FRACTION)
        if checkpoint is not None and checkpoint.tokenizer_json != tok.to_json():
            raise ckpt.CheckpointError(f"cannot resume '{resume}': the run's tokenizer differs from the one trained "
                                       "on this data now (another gptc version?); start a new run")
        train_part, val_part = split_parts([Part("the corpus", ids)], VALIDATION_FRACTION)
        train_windows = Windows(train_part, m.seq_len, tok.vocab_size, "training split")
        val_windows = Windows(val_part, m.seq_len, tok.vocab_size, "validation split")
        n_tokens = len(ids)
        console.line(f"data: {source.source}, {len(source.text):,} characters -> {n_tokens:,} tokens (BPE "
                     f"vocabulary {tok.vocab_size}" + (f" of {tokenizer_name}" if given is not None else "")
                     + f", {how}); {len(train_part[0].tokens):,} for training, {len(val_part[0].tokens):,} for "
                     "validation")
    else:
        tok, n_tokens = given, sum(len(p.tokens) for p in source.opened)
        console.line(f"data: {source.source}{' (gptc prepare)' if source.prepared else ''}, {_shards_summary(source)}"
                     f", read a window at a time; BPE vocabulary {tok.vocab_size} of {tokenizer_name}")
    batches = Batches(train_windows, t.batch_size, t.seed, env.rank, env.world)
    if checkpoint is not None:
        batches.state = checkpoint.rng_state
    val_batches = validation_batches(val_windows, t.eval_batches, t.batch_size)
    if tok.vocab_size < m.vocab_size and init_origin is None:
        note(f"the tokenizer has {tok.vocab_size:,} tokens" + (" (all this corpus yields)" if given is None else "")
             + f"; the model's {m.vocab_size:,} embedding rows stay (the rest are never used)")

    # 4. run directory --------------------------------------------------------------------
    written: list[Path] = []
    created = env.rank == 0 and not run_dir.exists()

    def discard() -> None:
        """Leave nothing behind from a new run (or fork) that never started."""
        if checkpoint is None or fork:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                for p in written:
                    p.unlink(missing_ok=True)

    try:
        try:
            if env.rank > 0:  # rank 0 alone writes the run directory
                raise _NotRankZero
            run_dir.mkdir(parents=True, exist_ok=True)
            for fname, content in (("spec.toml", spec_to_toml(spec)), ("tokenizer.json", tok.to_json())):
                ckpt.write_atomic(run_dir / fname, content)
                written.append(run_dir / fname)
            metrics_path = run_dir / "metrics.jsonl"
            if checkpoint is not None:  # drop the steps after the checkpoint (and a line cut by a crash)
                kept = [r for r in read_metrics(ckpt.run_dir_of(checkpoint.path)) if r["step"] <= checkpoint.step]
                ckpt.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            metrics = open(metrics_path, "a" if checkpoint is not None else "w", encoding="utf-8")
            written.append(metrics_path)
        except OSError as e:
            raise _os_error(e, f"setting up the run directory '{run_dir}'", run_dir) from None
        except _NotRankZero:
            metrics = open(os.devnull, "w", encoding="utf-8")
    except BaseException:
        discard()
        raise

    # 5. executors ------------------------------------------------------------------------
    try:
        params = init_params(train_graph, t.seed)
        state_names = sorted(train_graph.states)
        if checkpoint is not None:
            ckpt.check_tensors(checkpoint.params, train_graph.params, train_graph, ckpt.MODEL_FILE, checkpoint.path)
            ckpt.check_tensors(checkpoint.optimizer, whole_graph.states, whole_graph, ckpt.OPTIMIZER_FILE,
                               checkpoint.path)
            params = checkpoint.params
        elif pretrained is not None:
            ckpt.check_tensors(pretrained.params, train_graph.params, train_graph, "the pretrained weights",
                               pretrained.path)
            params = pretrained.params
        if runtime is None and dev is not None:
            from gptc.runtime.bundle import cached_bundle
            from gptc.runtime.comm import open_communicator
            if env.world > 1 and env.rank > 0:  # waits for rank 0, which compiles the shared bundle first
                comm = open_communicator(env, dev.target.vendor)
            compiled = cached_bundle(spec, dev, note, parallel=par)
            if env.world > 1 and env.rank == 0:
                comm = open_communicator(env, dev.target.vendor)
                console.line(f"data parallel: the {env.world} ranks joined through "
                             f"{'NCCL' if dev.target.vendor == 'nvidia' else 'RCCL'}")
            runtime = compiled.open(dev, comm=comm)
        if runtime is not None:
            train_sess, eval_sess = runtime.steps["train"], runtime.steps["eval"]
            train_sess.write({**params, **{n: np.zeros(train_graph.type(train_graph.states[n]).shape, np.float32)
                                           for n in state_names}})
        else:
            train_sess = ReferenceExecutor(train_graph, params)
            eval_sess = ReferenceExecutor(build_graph(spec, "eval"), params)
        if checkpoint is not None:
            train_sess.write(shard_states(checkpoint.optimizer, par) if par.zero1 else checkpoint.optimizer)
    except BaseException as e:
        metrics.close()
        discard()
        if isinstance(e, MemoryError):
            raise out_of_memory(e) from None
        raise
    param_names = sorted(train_graph.params)

    start = checkpoint.step if checkpoint is not None else 0
    if fork:
        console.line(f"forking {checkpoint.path} (step {start}) into the new run {run_dir} ({t.steps} steps)")
    elif checkpoint is not None:
        console.line(f"resuming {run_dir} from {checkpoint.path.name} (step {start} of {t.steps})")
        before = checkpoint.state.get("device")
        if before and before != device_name:
            note(f"the run was trained on {before} until now; on {device_name} its losses will differ from an "
                 "uninterrupted run's by rounding")
    options = describe_options(m)
    console.line(f"model: {name}{' (' + options + ')' if options else ''}, {n_params:,} parameters; {t.steps} steps of {t.batch_size}x{m.seq_len} tokens; "
                 f"run directory: {run_dir}")
    if start >= t.steps:
        metrics.close()
        console.line(f"the run is already at step {start} of {t.steps}; nothing to do (raise --steps to continue)")
        return TrainResult(run_dir, start, checkpoint=checkpoint.path)

    # 6. the loop -------------------------------------------------------------------------
    result = TrainResult(run_dir, start, checkpoint=checkpoint.path if checkpoint and not fork else None)
    extra = {"data": {"path": os.path.abspath(data) if data is not None else None, "sha256": source.fingerprint,
                      "tokens": int(n_tokens)}, "device": device_name}
    if init_origin is not None:
        extra["init_from"] = init_origin
    width = len(str(t.steps))
    every = max(1, (t.steps - start) // 20)
    times: deque[float] = deque(maxlen=50)
    last_print = 0.0
    last_saved = start if checkpoint is not None and not fork else -1
    tokens_per_step = t.batch_size * m.seq_len * env.world

    def save(step: int) -> Path:
        nonlocal last_saved
        states = train_sess.read(state_names)
        if par.zero1:  # every rank sends its slices of the moments; rank 0 writes them whole
            states = gather_states(env, states, whole_graph)
        if env.rank > 0:
            last_saved = step
            return run_dir
        try:
            path = ckpt.save_checkpoint(run_dir, step, train_sess.read(param_names), states,
                                        batches.state, spec, tok.to_json(), extra, keep=t.keep_checkpoints)
        except OSError as e:
            newest = ckpt.list_checkpoints(run_dir)
            raise _os_error(e, f"writing the checkpoint of step {step} in '{run_dir}'", run_dir,
                            resumable=bool(newest)) from None
        last_saved, result.checkpoint = step, path
        return path

    def evaluate() -> float:
        if runtime is None:  # on a GPU the steps share the parameters already
            eval_sess.write(train_sess.read(param_names))
        losses = [float(eval_sess.run({"tokens": x, "targets": y})["loss"]) for x, y in val_batches]
        return float(np.mean(losses))

    interrupt = {"signum": 0, "hard": False}  # the first stop signal received, and whether a second came

    def on_signal(signum, frame):
        if interrupt["signum"]:
            interrupt["hard"] = True
            raise KeyboardInterrupt
        interrupt["signum"] = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        try:
            os.write(sys.__stderr__.fileno(), f"\ngptc: {what}: saving a checkpoint after this step (another "
                                              f"{what} quits without saving)\n".encode())
        except (OSError, AttributeError, ValueError):
            pass

    handler_installed = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS} if handler_installed else {}
    done, in_step = start, False
    run_started = time.perf_counter()
    try:
        for step in range(start, t.steps):
            if interrupt["signum"]:
                raise KeyboardInterrupt
            in_step = True
            began = time.perf_counter()
            x, y = batches.next()
            rate = lr_at(t, step)
            out = train_sess.run({"tokens": x, "targets": y, "lr": np.float32(rate), "step": np.float32(step + 1)})
            done, in_step = step + 1, False
            loss = float(out["loss"])
            if not math.isfinite(loss):
                raise GptcError(f"the loss became {loss} at step {done}; lower train.lr (or --lr) and start again"
                                + (" or resume from an earlier checkpoint" if ckpt.list_checkpoints(run_dir) else ""))
            elapsed = time.perf_counter() - began
            times.append(elapsed)
            result.losses.append(loss)
            record = {"step": done, "loss": loss, "lr": rate, "grad_norm": float(out["grad_norm"]),
                      "tokens_per_s": tokens_per_step / elapsed}
            # A mixture of experts' load-balancing loss (not part of "loss"; 1 = balanced).
            aux = f"  aux {float(out['aux_loss']):.4f}" if "aux_loss" in out else ""
            if aux:
                record["aux_loss"] = float(out["aux_loss"])
            # progress line
            now = time.perf_counter()
            mean = sum(times) / len(times)
            text = (f"step {done:>{width}}/{t.steps}  loss {loss:.4f}{aux}  lr {rate:.2e}  "
                    f"{tokens_per_step / mean:,.0f} tokens/s  ETA {duration(mean * (t.steps - done))}")
            if console.tty:
                if now - last_print > 0.1 or done == t.steps:
                    console.status(text)
                    last_print = now
            elif done == start + 1 or done % every == 0 or done == t.steps or now - last_print > 30:
                console.line(text)
                last_print = now
            if done % t.eval_interval == 0 or done == t.steps:
                val = evaluate()
                result.val_loss = val
                record["val_loss"], record["val_ppl"] = val, math.exp(min(val, 700.0))
                console.line(f"step {done:>{width}}/{t.steps}  validation loss {val:.4f}  "
                             f"perplexity {record['val_ppl']:.2f}")
            try:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            except OSError as e:
                raise _os_error(e, f"writing {run_dir / 'metrics.jsonl'}", run_dir,
                                resumable=bool(ckpt.list_checkpoints(run_dir))) from None
            if done % t.checkpoint_interval == 0 or done == t.steps:
                save(done)
            if on_step is not None:
                on_step(done, record)
        result.step = done
    except (MemoryError, GptcError) as e:  # GptcError: e.g. a token id outside the vocabulary in a shard
        if done == start:  # a new run (or fork) that never finished a step leaves nothing behind
            metrics.close()
            discard()
        if isinstance(e, MemoryError):
            raise out_of_memory(e) from None
        raise
    except KeyboardInterrupt as e:
        console.end()
        signum = interrupt["signum"] or getattr(e, "signum", signal.SIGINT)
        if interrupt["hard"] or in_step:
            newest = ckpt.list_checkpoints(run_dir)
            console.line(f"interrupted during step {done + 1}; not saved"
                         + (f" (newest checkpoint: {newest[-1][1]})" if newest else ""))
            raise Interrupted(done, None, run_dir, signum) from None
        path = save(done) if last_saved != done else result.checkpoint
        metrics.close()
        if env.rank == 0:
            write_plot(run_dir, name, device_name, console)
        console.line(f"interrupted at step {done}: saved {path}; continue with: gptc train --resume {run_dir}")
        raise Interrupted(done, path, run_dir, signum) from None
    finally:
        for sig, handler in previous.items():  # None: a handler not installed from Python
            signal.signal(sig, handler if handler is not None else
                          {signal.SIGINT: signal.default_int_handler}.get(sig, signal.SIG_DFL))
        metrics.close()
        if runtime is not None:
            runtime.close()
            if comm is not None:
                comm.close()
        else:
            for sess in (train_sess, eval_sess):
                sess.close()

    console.end()
    plot = write_plot(run_dir, name, device_name, console) if env.rank == 0 else None
    wall = time.perf_counter() - run_started
    summary = f"done: step {done} of {t.steps} in {duration(wall)}, loss {result.losses[-1]:.4f}"
    if result.val_loss is not None:
        summary += f", validation loss {result.val_loss:.4f} (perplexity {math.exp(min(result.val_loss, 700)):.2f})"
    console.line(summary)
    console.line(f"saved: {result.checkpoint}, {run_dir / 'metrics.jsonl'}" + (f", {plot}" if plot else ""))
    return result


def _checkpoint_tokenizer(checkpoint: ckpt.Checkpoint):
    """The tokenizer a checkpoint holds (resuming a run whose tokenizer came with its model)."""
    from gptc.tools.tokenizer import Tokenizer
    try:
        return Tokenizer.from_json(checkpoint.tokenizer_json)
    except ValueError as e:
        raise ckpt.CheckpointError(f"checkpoint '{checkpoint.path}': {e}") from None


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The step records of RUNDIR/metrics.jsonl (a line cut short by a crash is skipped)."""
    records = []
    for line in _read_lines(Path(run_dir) / "metrics.jsonl"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "loss" in record:
            records.append(record)
    return records


def loss_figure(records: Sequence[dict], title: str) -> Figure:
    """Two panels over the steps of metrics.jsonl records: the training loss (and the
    validation loss at the eval steps) above, the learning rate below."""
    figure = new_figure(900, 640)
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    figure.suptitle(title)
    loss_ax.plot([r["step"] for r in records], [r["loss"] for r in records], color="C0", linewidth=0.8,
                 label="training loss (each step's batch)")
    evals = [r for r in records if "val_loss" in r]
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="C1", markersize=4,
                     label="validation loss")
    loss_ax.set_ylabel("loss (cross-entropy, nats)")
    loss_ax.legend()
    rates = [r for r in records if "lr" in r]
    lr_ax.plot([r["step"] for r in rates], [r["lr"] for r in rates], color="C2")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    return figure


def write_plot(run_dir: Path, name: str, device_name: str, console: Console) -> Path | None:
    """RUNDIR/loss.png from metrics.jsonl (every step of the run, resumed parts included);
    None, after a one-line note when something stood in the way, when none is written."""
    records = read_metrics(run_dir)
    if not records:
        return None
    try:
        figure = loss_figure(records, f"{run_dir.name}: {name} on {device_name}")
        return save_png(figure, run_dir / "loss.png")
    except PlotUnavailable as e:
        console.line(f"note: {e}")
    except OSError as e:
        console.line(f"note: loss.png not written ({e.strerror or e})")
    return None
