"""The executor's side of a multi-GPU step, without a GPU (a device that records what it
is asked): each collective launch forks the communication stream from the step's
stream after the kernels before it, issues its bucket as one library group with the
right buffers and counts, and is joined back before the first launch that reads its
results; the step ends joined (so the captured graph holds the whole step)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import gptc
from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.parallel import Parallel
from gptc.compiler.planner import make_plan
from gptc.runtime.build import plan_table
from gptc.runtime.executor import Arenas, GpuExecutor
from gptc.spec import GptcError
from gptc.target import parse_target

SPEC = gptc.Spec(gptc.ModelSpec(vocab_size=61, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=24),
                 gptc.TrainSpec(batch_size=2, grad_clip=0.5))


class RecordingDevice:
    name = "recording device"
    stream, side = "main", "side"

    def __init__(self):
        self.log: list[tuple] = []
        self._next = itertools.count(1 << 20, 1 << 20)
        self._events = itertools.count()

    def memory_info(self):
        return 1 << 40, 1 << 40

    def alloc(self, nbytes):
        return next(self._next)

    def free(self, address):
        pass

    def memset(self, address, byte, nbytes):
        self.log.append(("memset", address))

    def load_module(self, code):
        return code

    def get_function(self, module, symbol):
        return symbol

    def prepare_launch(self, function, grid, block, shared, args, name=""):
        log = self.log

        class Launch:
            def launch(self):
                log.append(("kernel", name))
        return Launch()

    def event(self):
        return f"ev{next(self._events)}"

    def side_stream(self):
        return self.side

    def record_on(self, ev, stream):
        self.log.append(("record", ev, stream))

    def wait_for(self, stream, ev):
        self.log.append(("wait", stream, ev))

    def begin_capture(self):
        self.log.append(("begin_capture",))

    def synchronize(self):
        self.log.append(("synchronize",))

    def end_capture(self):
        self.log.append(("end_capture",))
        return "graph"

    def replay(self, graph):
        self.log.append(("replay",))


class RecordingComm:
    def __init__(self, log):
        self.log = log

    def group(self, calls, stream):
        self.log.append(("group", stream, tuple(calls)))


@pytest.fixture(params=[False, True], ids=["dp", "zero1"])
def step(request):
    plan = make_plan(gptc.build_graph(SPEC, "train", parallel=Parallel(2, 0, request.param, 2000)))
    kernels = render_plan(plan, parse_target("cuda:sm_90"))
    table = plan_table(plan, kernels)
    dev = RecordingDevice()
    code = {k.symbol: b"code" for k in kernels if k.code}
    ex = GpuExecutor(table, dev, code, Arenas(dev, [table]), comm=RecordingComm(dev.log))
    return table, dev, ex


def test_collectives_fork_and_join_the_communication_stream(step):
    table, dev, ex = step
    dev.log.clear()  # (the arenas' clearing)
    ex.launch()
    log = [e for e in dev.log if e[0] != "memset"]  # (scatter targets' clearing)
    # First, outside the capture, every collective once, in launch order (NCCL connects)
    start = log.index(("begin_capture",))
    warm = [e for e in log[:start] if e[0] == "group"]
    assert [e[2] for e in warm] == [tuple(ex.collectives[i]) for i in sorted(ex.collectives)]
    assert log[start - 1] == ("synchronize",) and all(e[0] in ("group", "record", "wait", "synchronize")
                                                      for e in log[:start])
    log = log[start:]
    assert log[0] == ("begin_capture",) and log[-2:] == [("end_capture",), ("replay",)]
    kernel_names = [e[1] for e in log if e[0] == "kernel"]
    assert kernel_names == [e["kernel"] for e in table["launches"] if e["family"] != "collective"]
    entries = table["launches"]
    position = {}  # launch index -> where in the log it was issued
    k = 0
    for at, e in enumerate(log):
        if e[0] in ("kernel", "group"):
            while entries[k]["family"] == "collective" and e[0] == "kernel":
                k += 1
            position[k] = at
            k += 1
    for i, entry in enumerate(entries):
        if entry["family"] != "collective":
            continue
        fork, done = ex.events[i]
        at = position[i]
        group = log[at]
        assert log[at - 2:at] == [("record", fork, "main"), ("wait", "side", fork)]
        assert log[at + 1] == ("record", done, "side")
        assert group[1] == "side"
        calls = group[2]
        assert [c[0] for c in calls] == [c["op"] for c in entry["collective"]]
        for (op, send, recv, count, dtype), c in zip(calls, entry["collective"]):
            assert send == ex.address(c["send"]) and recv == ex.address(c["recv"]) and dtype == "f32"
            assert count == table["buffers"][c["send"]]["nbytes"] // 4
        # joined once, before the first launch that reads what it wrote, or at the end
        joins = [j for j, e in enumerate(log) if e == ("wait", "main", done)]
        assert len(joins) == 1
        readers = [j for j, e in enumerate(entries) if j > i and set(e["reads"]) & set(entry["writes"])]
        assert joins[0] < position[readers[0]]
        assert joins[0] > at


def test_a_step_with_collectives_needs_a_communicator(step):
    table, dev, _ = step
    with pytest.raises(GptcError, match="multi-GPU run"):
        GpuExecutor(table, dev, {}, Arenas(dev, [table]))


def test_replays_issue_nothing_more(step):
    table, dev, ex = step
    ex.launch()
    n = len(dev.log)
    ex.launch()
    assert dev.log[n:] == [("replay",)]
    assert np.isfinite(n)
