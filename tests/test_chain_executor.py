"""Chained decode steps (GpuExecutor.run_chain) without a GPU, on a device that records
what it is asked: each step of the chain gets its own inputs and read-back outputs, the
token ids a step reads are the previous step's drawn ids (fed on the device), the other
buffers are the step's own, and a chain costs one upload, one graph and one read-back."""
from __future__ import annotations

import numpy as np
import pytest

import gptc
from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.planner import make_plan
from gptc.runtime.build import plan_table
from gptc.runtime.executor import Arenas, GpuExecutor
from gptc.target import parse_target

from test_multi_executor import RecordingDevice

LINK = {"tokens": "next_token"}


class ChainDevice(RecordingDevice):
    """Also records each launch's argument addresses, and the copies (a download of a
    chain's outputs fills row i, every byte of it, with i)."""

    def prepare_launch(self, function, grid, block, shared, args, name=""):
        log, addresses = self.log, [int(a.value) for a in args]

        class Launch:
            def launch(self):
                log.append(("kernel", name, addresses))
        return Launch()

    def upload(self, address, array):
        self.log.append(("upload", address, np.asarray(array).nbytes))

    def download(self, address, array):
        self.log.append(("download", address, array.nbytes))
        array[...] = np.arange(len(array)).reshape(-1, *[1] * (array.ndim - 1))


@pytest.fixture
def decode():
    spec = gptc.preset("tiny")
    plan = make_plan(gptc.build_graph(spec, "decode", 3, sample=True))
    kernels = render_plan(plan, parse_target("cuda:sm_90"))
    table = plan_table(plan, kernels)
    dev = ChainDevice()
    ex = GpuExecutor(table, dev, {k.symbol: b"code" for k in kernels if k.code}, Arenas(dev, [table]))
    feeds = {"tokens": np.ones((3, 1), np.int32), "pos": np.array([4, 0, 9], np.int32),
             "sample_settings": np.ones(5, np.float32), "sample_ints": np.array([0, 256, 1, 2], np.int32),
             "sample_index": np.zeros(3, np.int32), "sample_sequence": np.arange(3, dtype=np.int32)}
    return table, dev, ex, feeds


def stacked(feeds, steps):
    """A chain's feeds: each step's values along a leading axis (positions counting up)."""
    out = {name: np.stack([value] * steps) for name, value in feeds.items()}
    out["pos"] = out["pos"] + np.arange(steps)[:, None]
    return out


def kernels_of(log):
    return [e for e in log if e[0] == "kernel"]


def test_each_step_reads_the_previous_steps_tokens_and_its_own_inputs(decode):
    table, dev, ex, feeds = decode
    ex.launch()  # the step alone: its own buffer addresses
    alone = kernels_of(dev.log)
    dev.log.clear()
    steps = 4
    ex.run_chain(stacked(feeds, steps), LINK, ("next_token",))
    chained = kernels_of(dev.log)
    n = len(alone)
    assert n == len(table["launches"]) and len(chained) == steps * n
    assert [e[1] for e in chained] == [e[1] for e in alone] * steps  # the whole step, in order, each time
    io = {name: ex.address(buffer) for name, buffer in {**table["inputs"], **table["outputs"]}.items()}
    moved = {}  # buffer name -> its address in each step of the chain
    for name, address in io.items():
        for j in range(steps):
            where = {y for a, c in zip(alone, chained[j * n:(j + 1) * n]) for x, y in zip(a[2], c[2]) if x == address}
            assert len(where) <= 1, f"{name} of step {j} at several addresses"
            moved.setdefault(name, []).append(where.pop() if where else None)
    drawn = moved["next_token"]
    assert len(set(drawn)) == steps  # each step its own drawn ids
    assert moved["tokens"][1:] == drawn[:-1]  # ... which the next step reads
    for name in ("pos", "sample_index", "sample_settings"):
        assert len(set(moved[name])) == steps and io[name] not in moved[name]  # rows of the chain
    assert set(moved["logits"]) == {io["logits"]}  # not read back: shared
    # Every other argument (weights, cache, activations) is the step's own.
    for j in range(steps):
        for a, c in zip(alone, chained[j * n:(j + 1) * n]):
            assert [y for x, y in zip(a[2], c[2]) if x not in io.values()] == \
                   [x for x in a[2] if x not in io.values()]


def test_a_chain_is_one_upload_one_graph_and_one_read_back(decode):
    table, dev, ex, feeds = decode
    for _ in range(2):
        dev.log.clear()
        out = ex.run_chain(stacked(feeds, 5), LINK, ("next_token",))
        copies = [e[0] for e in dev.log if e[0] in ("upload", "download", "begin_capture", "replay")]
        assert copies in (["upload", "begin_capture", "replay", "download"], ["upload", "replay", "download"])
    assert copies == ["upload", "replay", "download"]  # the second time, the graph is replayed
    assert out.keys() == {"next_token"} and out["next_token"].shape == (5, 3)
    rows = out["next_token"].view(np.uint8)  # step i's drawn ids: row i of the read-back
    assert all((row == i).all() for i, row in enumerate(rows))


def test_a_link_must_be_read_back_and_of_the_inputs_size(decode):
    table, dev, ex, feeds = decode
    with pytest.raises(ValueError, match="cannot be fed from output next_token"):
        ex.run_chain(stacked(feeds, 2), LINK, ("logits",))
    with pytest.raises(ValueError, match="cannot be fed from output logits"):
        ex.run_chain(stacked(feeds, 2), {"tokens": "logits"}, ("logits",))
    with pytest.raises(ValueError, match="logit: not an input of this step"):
        ex.run_chain(stacked(feeds, 2), {"logit": "next_token"}, ("next_token",))
    with pytest.raises(ValueError, match=r"tokens: got shape \(3, 3, 1\), a chain of 2 steps needs \(2, 3, 1\)"):
        ex.run_chain({**stacked(feeds, 2), "tokens": np.zeros((3, 3, 1), np.int32)}, LINK, ("next_token",))
    with pytest.raises(ValueError, match=r"pos: got shape \(2, 4\), a chain of 2 steps needs \(2, 3\)"):
        ex.run_chain({**stacked(feeds, 2), "pos": np.zeros((2, 4), np.int32)}, LINK, ("next_token",))
