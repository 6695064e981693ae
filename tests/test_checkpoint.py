"""safetensors files written and read through the `safetensors` package (and files written
by gptc's own writer before it), corruption and truncation as one-line errors, and
checkpoint directories: atomic saves, keep-last-K, verification."""
from __future__ import annotations

import errno
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gptc.tools import checkpoint as ckpt
from gptc.tools.checkpoint import CheckpointError, load_safetensors, save_safetensors
from gptc.models import build_graph, init_params
from gptc.spec import preset

DATA = Path(__file__).parent / "data"


def tensors():
    rng = np.random.default_rng(0)
    return {
        "wte": rng.standard_normal((7, 5)).astype(np.float32),
        "h.0.ln_1.bias": rng.standard_normal(5).astype(np.float32),
        "scalar": np.float32(3.5).reshape(()),
        "empty": np.zeros((0, 4), np.float32),
        "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # a view, not contiguous
    }


def metadata_of(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return f.metadata()


def test_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    digest = save_safetensors(path, tensors(), {"format": "gptc", "step": "3"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors())
    for name, value in tensors().items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].flags.writeable
    assert metadata_of(path) == {"format": "gptc", "step": "3"}
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_readable_by_the_safetensors_package(tmp_path):
    path = tmp_path / "ours.safetensors"
    save_safetensors(path, tensors(), {"format": "gptc"})
    theirs = load_file(str(path))
    assert set(theirs) == set(tensors())
    for name, value in tensors().items():
        assert theirs[name].dtype == value.dtype and theirs[name].shape == value.shape
        np.testing.assert_array_equal(theirs[name], value)
    other = tmp_path / "theirs.safetensors"
    save_file({"a": np.ones((3, 2), np.float32), "b": np.arange(4, dtype=np.int64)}, str(other),
              metadata={"k": "v"})
    loaded = load_safetensors(other)
    np.testing.assert_array_equal(loaded["a"], np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(loaded["b"], np.arange(4))


def test_checkpoint_files_load_with_the_safetensors_package(tmp_path):
    """The files of a checkpoint of a real model are what `safetensors` reads: every
    parameter and AdamW moment, bit for bit, with gptc's metadata."""
    graph = build_graph(preset("tiny"), "train")
    params = init_params(graph, 0)
    rng = np.random.default_rng(1)
    optimizer = {name: rng.standard_normal(graph.type(nid).shape).astype(np.float32) for name, nid in graph.states.items()}
    path = ckpt.save_checkpoint(tmp_path, 7, params, optimizer, rng.bit_generator.state, preset("tiny"), "{}")
    for name, expected in ((ckpt.MODEL_FILE, params), (ckpt.OPTIMIZER_FILE, optimizer)):
        theirs = load_file(str(path / name))
        assert set(theirs) == set(expected), name
        for key, value in expected.items():
            assert theirs[key].dtype == np.float32 and theirs[key].shape == value.shape, key
            np.testing.assert_array_equal(theirs[key], value)
        assert metadata_of(path / name) == {"format": ckpt.FORMAT, "step": "7"}


def test_files_of_gptcs_own_old_writer_still_load():
    """tests/data holds a file and a checkpoint written by the hand-written safetensors
    writer gptc had before it used the `safetensors` package."""
    old = load_safetensors(DATA / "old-writer.safetensors")
    expected = {"wte": np.arange(12, dtype=np.float32).reshape(4, 3) / 8,
                "h.0.ln_1.bias": np.array([-1.5, 0.25, 3.0], np.float32), "scalar": np.asarray(np.float32(3.5)),
                "empty": np.zeros((0, 4), np.float32), "ids": np.arange(6, dtype=np.int32).reshape(2, 3)}
    assert set(old) == set(expected)
    for name, value in expected.items():
        assert old[name].dtype == value.dtype and old[name].shape == value.shape, name
        np.testing.assert_array_equal(old[name], value)
    assert metadata_of(DATA / "old-writer.safetensors") == {"format": ckpt.FORMAT, "step": "7"}
    c = ckpt.load_checkpoint(ckpt.find_checkpoint(DATA / "old-run"))
    assert c.step == 7 and c.spec == preset("tiny") and c.tokenizer_json == '{"x": 1}\n'
    np.testing.assert_array_equal(c.params["w"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4)
    np.testing.assert_array_equal(c.optimizer["v.b"], np.array([3.0, 0.0, 2.5], np.float32))


def _header(entries, body=b"", pad=True):
    text = json.dumps(entries).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("data", [
    b"",
    b"\x10\x00\x00",
    struct.pack("<Q", 1 << 40) + b"{}",
    struct.pack("<Q", 64) + b"{}",
    struct.pack("<Q", 4) + b"{no}",
    struct.pack("<Q", 2) + b"[]",
    struct.pack("<Q", 2) + b"\xff\xfe",
    b"garbage, not a safetensors file at all",
    _header({"a": {"dtype": "F32", "shape": [2]}}),
    _header({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    _header({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
    _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)),
    _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
    _header({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, bytes(8)),
    _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    _header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(10)),
    _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(9)),
    _header({"__metadata__": {"a": 1}}),
])
def test_corrupt_files_are_one_line_errors(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path)
    message = str(info.value)
    assert message.startswith(f"'{path}' is corrupt or truncated (") and "\n" not in message


def test_a_dtype_numpy_lacks_is_a_one_line_error(tmp_path):
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(_header({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)))
    with pytest.raises(CheckpointError, match=r"^'.*bf16.safetensors' holds a tensor of dtype BF16, which NumPy "
                                              r"cannot hold$"):
        load_safetensors(path)


def test_every_truncation_is_detected(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_safetensors(whole, {"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), np.float32)}, {"step": "1"})
    data = whole.read_bytes()
    cut_file = tmp_path / "cut.safetensors"
    for cut in range(len(data)):
        cut_file.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="is corrupt or truncated"):
            load_safetensors(cut_file)
    with pytest.raises(CheckpointError, match="is missing"):
        load_safetensors(tmp_path / "nope.safetensors")


# ----- checkpoint directories -------------------------------------------------------------
def save(run_dir, step, keep=None, scale=1.0):
    params = {"w": np.full((2, 3), step * scale, np.float32), "b": np.zeros(3, np.float32)}
    optimizer = {f"{k}.{n}": v + 1 for n, v in params.items() for k in "mv"}
    rng = np.random.default_rng(step).bit_generator.state
    return ckpt.save_checkpoint(run_dir, step, params, optimizer, rng, preset("tiny"), '{"x": 1}\n',
                                {"data": {"sha256": "0" * 64}}, keep=keep)


def test_checkpoint_round_trip_and_keep(tmp_path):
    for step in (5, 10, 15, 20):
        path = save(tmp_path, step, keep=3)
    assert path == tmp_path / "checkpoints" / "step-000020"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 15, 20]
    c = ckpt.load_checkpoint(ckpt.find_checkpoint(tmp_path))
    assert c.step == 20 and c.spec == preset("tiny") and c.tokenizer_json == '{"x": 1}\n'
    np.testing.assert_array_equal(c.params["w"], np.full((2, 3), 20, np.float32))
    assert set(c.optimizer) == {"m.w", "v.w", "m.b", "v.b"}
    rng = np.random.default_rng(0)
    rng.bit_generator.state = c.rng_state
    assert rng.integers(0, 1 << 30) == np.random.default_rng(20).integers(0, 1 << 30)
    assert c.state["data"] == {"sha256": "0" * 64} and set(c.state["files"]) == {
        "model.safetensors", "optimizer.safetensors", "tokenizer.json"}
    assert ckpt.find_checkpoint(tmp_path / "checkpoints" / "step-000010") == tmp_path / "checkpoints" / "step-000010"
    assert ckpt.run_dir_of(c.path) == tmp_path


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, 7)
    save(tmp_path, 7, scale=2.0)
    c = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-000007")
    np.testing.assert_array_equal(c.params["w"], np.full((2, 3), 14, np.float32))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000007"]


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    stale = tmp_path / "checkpoints" / ".tmp-step-000002-crashed"
    stale.mkdir()
    calls = []

    def full_after_one(path, data):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    real = ckpt.write_atomic
    monkeypatch.setattr(ckpt, "write_atomic", full_after_one)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


@pytest.mark.parametrize("damage,expected", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:40]), "truncated"),
    (lambda d: (d / "optimizer.safetensors").unlink(), "is missing"),
    (lambda d: (d / "tokenizer.json").write_text("changed"), "tokenizer.json does not match the sha256"),
    (lambda d: (d / "state.json").write_text('{"format": "gptc-checkpoint", "version": 9}'), "format version 9"),
    (lambda d: (d / "state.json").write_text('{"format": "other"}'), "not a gptc checkpoint"),
])
def test_damaged_checkpoints(tmp_path, damage, expected):
    path = save(tmp_path, 3)
    damage(path)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_format_1_checkpoint_loads_with_lm_head_transposed(tmp_path):
    """Format 1 stored the untied lm_head.weight (d_model, vocab); it loads (vocab,
    d_model) as format 2 stores it, its AdamW moments with it, every other tensor as is."""
    spec = preset("tiny")
    params = init_params(build_graph(spec, "infer", 1), 3)
    assert params["lm_head.weight"].shape == (spec.model.vocab_size, spec.model.d_model)
    optimizer = {f"{k}.{n}": v * (2.0 if k == "m" else 3.0) for n, v in params.items() for k in "mv"}
    path = ckpt.save_checkpoint(tmp_path, 4, params, optimizer, {"s": 1}, spec, "{}\n")
    # the same checkpoint as format 1 wrote it
    old = {n: (v.T if n == "lm_head.weight" else v) for n, v in params.items()}
    old_opt = {n: (v.T if n.endswith(".lm_head.weight") else v) for n, v in optimizer.items()}
    state = json.loads((path / "state.json").read_text())
    state["version"] = 1
    state["files"]["model.safetensors"] = save_safetensors(path / "model.safetensors", old)
    state["files"]["optimizer.safetensors"] = save_safetensors(path / "optimizer.safetensors", old_opt)
    (path / "state.json").write_text(json.dumps(state))
    c = ckpt.load_checkpoint(path)
    for want, got in ((params, c.params), (optimizer, c.optimizer)):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            assert got[name].flags.c_contiguous


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.find_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        ckpt.find_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / ".tmp-step-000009-x").mkdir(parents=True)  # a save in progress is no checkpoint
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        ckpt.find_checkpoint(tmp_path)


def test_pruning_keeps_good_checkpoints_before_corrupt_ones(tmp_path):
    save(tmp_path, 10, keep=2)
    save(tmp_path, 20, keep=2)
    _flip_a_byte(tmp_path / "checkpoints" / "step-000020" / "model.safetensors")
    save(tmp_path, 30, keep=2)  # 30 and 10 are the two newest good ones; 20 stays, for the user to look at
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 20, 30]
    save(tmp_path, 40, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]


def test_resume_point_continues_only_the_newest_in_place(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    older = tmp_path / "checkpoints" / "step-000020"
    assert ckpt.resume_point(tmp_path)[0].step == 30
    assert ckpt.resume_point(tmp_path / "checkpoints" / "step-000030")[1] == tmp_path
    with pytest.raises(CheckpointError, match=r"not the newest checkpoint .* \(step-000030 is\); .*fork the run's "
                                              rf"history; .* --resume {older} --out NEWDIR"):
        ckpt.resume_point(older)
    with pytest.raises(CheckpointError, match="fork the run's history"):
        ckpt.resume_point(older, tmp_path)
    checkpoint, target = ckpt.resume_point(older, tmp_path / "fork")
    assert checkpoint.step == 20 and target == tmp_path / "fork" and not target.exists()
    save(tmp_path / "fork", 25)
    with pytest.raises(CheckpointError, match="cannot fork into .* already holds a run"):
        ckpt.resume_point(older, tmp_path / "fork")
    _flip_a_byte(tmp_path / "checkpoints" / "step-000030" / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=r"step-000030' is corrupt: optimizer.safetensors does not match the "
                                              rf"sha256 .*; to go on from the newest good checkpoint, fork it: "
                                              rf"--resume {older} --out NEWDIR"):
        ckpt.resume_point(tmp_path)


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
