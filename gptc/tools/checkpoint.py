"""Checkpoints: safetensors files (through the `safetensors` package) and run
directories that resume exactly.

Layout of a run directory (`gptc train --out RUNDIR`)::

    RUNDIR/
      spec.toml                 the spec the run trains (steps included)
      tokenizer.json            the BPE tokenizer of the run (gptc/tools/tokenizer.py format)
      metrics.jsonl             one JSON object per step (eval steps add val_loss, val_ppl)
      loss.png                  training and validation loss and the learning rate, written at the end
      checkpoints/
        step-000500/            one directory per checkpoint, the last train.keep_checkpoints kept
          model.safetensors     the parameters
          optimizer.safetensors AdamW moments: "m.<param>" and "v.<param>" for every parameter
          tokenizer.json        the tokenizer (so a checkpoint directory stands on its own)
          state.json            step, data RNG state, spec, gptc version, sha256 of each file

A checkpoint is written into a hidden temporary directory next to its final place
(`checkpoints/.tmp-step-000500-*`) and renamed into place with one os.replace, so a
crash or a full disk never leaves a half checkpoint under a `step-*` name; leftover
temporary directories are removed by the next save.

A run's history is its checkpoints in step order, and a run goes on only from its
newest one: `--resume RUNDIR` continues the newest in RUNDIR. Continuing an older
checkpoint would fork the history (the newest would then be a step of another line of
training), so it needs a new run directory, named explicitly: `--resume
RUNDIR/checkpoints/step-000100 --out NEWDIR` (see resume_point). Pruning keeps the
newest train.keep_checkpoints checkpoints that pass their checksums; one that fails
them is left in place but not counted, so a good checkpoint is never deleted in favour
of a corrupt one.

Tensor names in model.safetensors are gptc's parameter names, which follow GPT-2's
checkpoints; every tensor is float32 ("F32"), row-major. With E = d_model,
F = d_ff, V = vocab_size, S = seq_len and l = 0 .. n_layers-1:

    wte                     (V, E)     token embedding
    wpe                     (S, E)     learned position embedding
    h.l.ln_1.weight/.bias   (E,)       LayerNorm before attention
    h.l.attn.c_attn.weight  (E, 3E)    fused Q, K, V projection (columns: q | k | v, heads
                                       contiguous inside each); y = x @ W + b
    h.l.attn.c_attn.bias    (3E,)
    h.l.attn.c_proj.weight  (E, E)     attention output projection
    h.l.attn.c_proj.bias    (E,)
    h.l.ln_2.weight/.bias   (E,)       LayerNorm before the MLP
    h.l.mlp.c_fc.weight     (E, F)     MLP up projection (GELU, tanh approximation)
    h.l.mlp.c_fc.bias       (F,)
    h.l.mlp.c_proj.weight   (F, E)     MLP down projection
    h.l.mlp.c_proj.bias     (E,)
    ln_f.weight/.bias       (E,)       final LayerNorm
    lm_head.weight          (V, E)     output projection, logits = x @ Wᵀ + b; absent with
                                       tie_embeddings (wte is used)
    lm_head.bias            (V,)       absent with bias = false (as are all biases) or lm_head_bias = false

Weights are stored (in, out), as in the original GPT-2 (TensorFlow / Hugging Face
Conv1D) checkpoints, not (out, in) as torch.nn.Linear stores them; the exception is
lm_head.weight, stored (vocab, in) as wte is (and as torch.nn.Linear keeps it): its
gradient's product dLogits @ W then reads W along its rows, which the matrix units
read faster at k = vocab (benchmarks/results/h200-2026-12-01-tile192). Format 1 stored
it (E, V); such checkpoints load with that weight and its AdamW moments transposed.

Both files are written and read by the `safetensors` package
(https://github.com/huggingface/safetensors), with metadata {"format": "gptc-checkpoint",
"step": "N"}, so they load anywhere safetensors does (`safetensors.numpy.load_file`,
`safetensors.torch.load_file`). gptc adds its own checks on top: the sha256 of every file
in state.json, the tensor names and shapes against the model (check_tensors), and a
one-line CheckpointError for a file that is missing, unreadable, corrupt or truncated.
Two saves of the same tensors may differ in the order of the metadata keys (the
package writes them from a hash map, safetensors issue #584), which is why a file is
checked against the sha256 recorded when it was written, never against a new save.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from gptc.common import VERSION, make_temp_dir, write_atomic
from gptc.spec import GptcError, Spec, SpecError, spec_from_dict

FORMAT = "gptc-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: lm_head.weight (and its moments) stored (d_model, vocab)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(GptcError):
    """A checkpoint or safetensors file that cannot be used (one-line message)."""


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write a safetensors file atomically; return the sha256 of its bytes."""
    # safetensors (0.8) copies each array's memory as it lies, so a view (a transpose) must be made contiguous
    arrays = {name: np.asarray(t, order="C") for name, t in tensors.items()}
    data = safetensors.numpy.save(arrays, dict(metadata) if metadata else None)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file; CheckpointError (one line) when the file is
    missing, unreadable, corrupt or truncated, or holds a dtype NumPy lacks."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {e.strerror}") from None
    try:
        return safetensors.numpy.load(data)
    except SafetensorError as e:
        raise CheckpointError(f"'{path}' is corrupt or truncated ({' '.join(str(e).split())})") from None
    except KeyError as e:  # safetensors.numpy has no NumPy type for this dtype (BF16, F8_*)
        raise CheckpointError(f"'{path}' holds a tensor of dtype {e.args[0]}, which NumPy cannot hold") from None


# ----- checkpoints ------------------------------------------------------------------------
def spec_to_dict(spec: Spec) -> dict:
    d = dataclasses.asdict(spec)
    d["train"]["betas"] = list(d["train"]["betas"])
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Checkpoint:
    path: Path
    step: int
    spec: Spec
    params: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    rng_state: dict
    state: dict                      # the whole state.json
    tokenizer_json: str


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint directories of a run, oldest first (complete ones
    only: temporary directories of a save in progress are skipped)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, step: int, params: Mapping[str, np.ndarray],
                    optimizer: Mapping[str, np.ndarray], rng_state: dict, spec: Spec, tokenizer_json: str,
                    extra: Mapping[str, Any] | None = None, keep: int | None = None) -> Path:
    """Write RUNDIR/checkpoints/step-NNNNNN atomically (temporary directory + rename) and
    keep only the newest `keep` checkpoints. Raises OSError as the file system does."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = make_temp_dir(root, f".tmp-{final.name}-")
    try:
        meta = {"format": FORMAT, "step": str(step)}
        files = {
            MODEL_FILE: save_safetensors(tmp / MODEL_FILE, params, meta),
            OPTIMIZER_FILE: save_safetensors(tmp / OPTIMIZER_FILE, optimizer, meta),
        }
        tok = tokenizer_json.encode("utf-8")
        write_atomic(tmp / TOKENIZER_FILE, tok)
        files[TOKENIZER_FILE] = hashlib.sha256(tok).hexdigest()
        state = {"format": FORMAT, "version": FORMAT_VERSION, "gptc_version": VERSION, "step": step,
                 "rng": rng_state, "spec": spec_to_dict(spec), **(extra or {}), "files": files}
        write_atomic(tmp / STATE_FILE, json.dumps(state, indent=1) + "\n")
        if final.exists():  # saving the same step again (e.g. Ctrl-C right after a resume)
            old = make_temp_dir(root, f".tmp-{final.name}-old-")
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


_verified: dict[Path, tuple] = {}  # checkpoint -> the stat of its files when it last passed verify_checkpoint


def _passes(path: Path) -> bool:
    """Whether a checkpoint passes verify_checkpoint; not hashed again while its files are unchanged."""
    try:
        signature = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()))
        if _verified.get(path) != signature:
            verify_checkpoint(path)
            _verified[path] = signature
        return True
    except (CheckpointError, OSError):
        return False


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete the checkpoints older than the newest `keep` that pass their checksums. One
    that fails them is not counted, and is left for the user to look at."""
    good = 0
    for _, path in reversed(list_checkpoints(run_dir)):
        if good >= keep:
            shutil.rmtree(path, ignore_errors=True)
        elif _passes(path):
            good += 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_state(path: Path) -> dict:
    """The checked state.json of a checkpoint directory."""
    where = f"checkpoint '{path}'"
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{where} is incomplete: {STATE_FILE} is missing")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{where} is corrupt: {STATE_FILE} is not valid JSON") from None
    except OSError as e:
        raise CheckpointError(f"cannot read '{state_path}': {e.strerror}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a gptc checkpoint ({STATE_FILE} has no format '{FORMAT}')")
    if state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{where} has format version {state.get('version')!r}; this gptc reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))} (a newer gptc wrote it: upgrade gptc)")
    step, files = state.get("step"), state.get("files")
    if not isinstance(step, int) or step < 0 or not isinstance(files, dict) or not isinstance(state.get("rng"), dict):
        raise CheckpointError(f"{where} is corrupt: {STATE_FILE} lacks step, rng or files")
    for name in (MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE):
        if name not in files:
            raise CheckpointError(f"{where} is corrupt: {STATE_FILE} lists no sha256 for {name}")
    # What the trainer writes besides (extra): the data it read and the device it ran on.
    data = state.get("data", {})
    if not (isinstance(data, dict) and all(isinstance(data.get(k), (str, type(None))) for k in ("path", "sha256"))
            and isinstance(state.get("device", ""), str)):
        raise CheckpointError(f"{where} is corrupt: {STATE_FILE} has an invalid 'data' or 'device'")
    return state


def _check_digests(path: Path, files: dict) -> None:
    for name in (MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE):
        digest = files[name]
        try:
            actual = _sha256(path / name)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint '{path}' is incomplete: {name} is missing") from None
        except OSError as e:
            raise CheckpointError(f"cannot read '{path / name}': {e.strerror}") from None
        if actual != digest:
            raise CheckpointError(f"checkpoint '{path}' is corrupt: {name} does not match the sha256 recorded in "
                                  f"{STATE_FILE}")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check a checkpoint directory's state.json and the sha256 of every file it lists
    (without parsing the tensors); CheckpointError says what is wrong."""
    path = Path(path)
    _check_digests(path, _read_state(path)["files"])


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify one checkpoint directory: structure of both safetensors files,
    the sha256 of every file against state.json, and the stored spec."""
    path = Path(path)
    where = f"checkpoint '{path}'"
    state = _read_state(path)
    params = load_safetensors(path / MODEL_FILE)
    optimizer = load_safetensors(path / OPTIMIZER_FILE)
    try:
        tokenizer_json = (path / TOKENIZER_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{where} is incomplete: {TOKENIZER_FILE} is missing") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{where} is corrupt: {TOKENIZER_FILE} is not UTF-8") from None
    except OSError as e:
        raise CheckpointError(f"cannot read '{path / TOKENIZER_FILE}': {e.strerror}") from None
    _check_digests(path, state["files"])
    try:
        spec = spec_from_dict(state.get("spec"))
    except (SpecError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where} holds an invalid spec: {e}") from None
    if state["version"] == 1:
        _upgrade_from_v1(params, optimizer)
    return Checkpoint(path, state["step"], spec, params, optimizer, state["rng"], state, tokenizer_json)


def _upgrade_from_v1(params: dict[str, np.ndarray], optimizer: dict[str, np.ndarray]) -> None:
    """Format 1 stored the untied lm_head.weight (d_model, vocab); format 2 stores it
    (vocab, d_model). Its AdamW moments are elementwise, so they transpose with it."""
    for store, name in ((params, "lm_head.weight"), (optimizer, "m.lm_head.weight"), (optimizer, "v.lm_head.weight")):
        if name in store:
            store[name] = np.ascontiguousarray(store[name].T)


def check_tensors(tensors: Mapping[str, np.ndarray], names: Mapping[str, int], graph: Any, what: str,
                  where: Path) -> None:
    """Refuse a checkpoint whose tensors (of file `what`) are not exactly the graph's
    `names` (its params or states: name -> node) with their shapes."""
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        detail = f"lacks '{missing[0]}'" if missing else f"has an unknown tensor '{extra[0]}'"
        raise CheckpointError(f"checkpoint '{where}' does not match the model: {what} {detail}")
    for name, nid in names.items():
        shape = tuple(graph.type(nid).shape)
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"checkpoint '{where}' does not match the model: '{name}' has shape "
                                  f"{tuple(tensors[name].shape)}, the model needs {shape}")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory `--resume PATH` names: PATH itself if it is one (holds
    state.json), else the newest checkpoint of the run directory PATH."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"run directory '{path}' does not exist")
    if not p.is_dir():
        raise CheckpointError(f"'{path}' is not a run directory")
    if (p / STATE_FILE).is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"'{path}' has no checkpoints to resume from (expected {path}/{CHECKPOINTS}/step-*)")
    return found[-1][1]


def resume_point(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Checkpoint, Path]:
    """(the checkpoint `--resume PATH [--out OUT]` continues, the run directory it goes on
    in). In place (no OUT, or OUT is the checkpoint's run) only the run's newest checkpoint
    continues; an older one is a fork, which needs a new run directory OUT. When the
    checkpoint is damaged, the error names the newest good one to fork from."""
    found = find_checkpoint(path)
    source = run_dir_of(found)
    target = Path(out_dir) if out_dir is not None else source
    history = list_checkpoints(source)
    fork = target.resolve() != source.resolve()
    if not fork and history and history[-1][1].resolve() != found.resolve():
        raise CheckpointError(f"'{found}' is not the newest checkpoint of the run '{source}' ({history[-1][1].name} "
                              f"is); going on from it there would fork the run's history; fork it into a new run "
                              f"directory with: --resume {found} --out NEWDIR")
    if fork and list_checkpoints(target):
        raise CheckpointError(f"cannot fork into '{target}': it already holds a run with checkpoints; "
                              "choose another --out")
    try:
        return load_checkpoint(found), target
    except CheckpointError as e:
        at = next((step for step, p in history if p.resolve() == found.resolve()), -1)
        older = [p for step, p in reversed(history) if step < at and _passes(p)]
        if not older:
            raise
        raise CheckpointError(f"{e}; to go on from the newest good checkpoint, fork it: --resume {older[0]} "
                              "--out NEWDIR") from None


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run directory a checkpoint directory belongs to."""
    return checkpoint_path.parent.parent if checkpoint_path.parent.name == CHECKPOINTS else checkpoint_path.parent
