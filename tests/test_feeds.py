"""Ids fed to a step that index a table (token ids, positions, rows) are refused with a
one-line error when they lie outside the table, on both executors, before any kernel
reads or writes out of bounds."""
from __future__ import annotations

import numpy as np
import pytest

import gptc
from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.planner import make_plan
from gptc.models import build_graph, init_params
from gptc.runtime.build import plan_table
from gptc.runtime.executor import check_inputs
from gptc.runtime.feeds import InputError
from gptc.runtime.reference import ReferenceExecutor
from gptc.spec import GptcError
from gptc.target import parse_target

SPEC = gptc.preset("tiny")
V, S = SPEC.model.vocab_size, SPEC.model.seq_len


def train_feeds(batch: int) -> dict[str, np.ndarray]:
    ids = np.arange(batch * S, dtype=np.int32).reshape(batch, S) % V
    return {"tokens": ids, "targets": ids, "lr": np.array(1e-3, np.float32), "step": np.array(1, np.float32)}


def test_reference_executor_refuses_token_ids_outside_the_vocabulary():
    graph = build_graph(SPEC, "eval", 2)
    ex = ReferenceExecutor(graph, init_params(graph, 0))
    feeds = {"tokens": np.zeros((2, S), np.int32), "targets": np.zeros((2, S), np.int32)}
    feeds["tokens"][1, 7] = V + 3
    with pytest.raises(InputError, match=rf"^tokens: id {V + 3} at \[1, 7\] is outside \[0, {V}\)$"):
        ex.run(feeds)
    feeds["tokens"][1, 7] = -1  # NumPy would read the last row
    with pytest.raises(InputError, match=r"tokens: id -1 at \[1, 7\]"):
        ex.run(feeds)
    feeds["tokens"][1, 7] = 0
    feeds["targets"][0, 0] = V
    with pytest.raises(InputError, match=r"targets: id \d+ at \[0, 0\]"):
        ex.run(feeds)
    feeds["targets"][0, 0] = V - 1
    assert np.isfinite(ex.run(feeds)["loss"])
    assert issubclass(InputError, GptcError)  # the CLI prints it in one line


def test_reference_decode_refuses_a_position_past_the_context():
    graph = build_graph(SPEC, "decode", 1)
    ex = ReferenceExecutor(graph, init_params(graph, 0))
    with pytest.raises(InputError, match=rf"pos: id {S} at \[0\] is outside \[0, {S}\)"):
        ex.run({"tokens": np.zeros((1, 1), np.int32), "pos": np.array([S], np.int32)})


@pytest.mark.parametrize("mode,batch", [("train", 2), ("prefill", 1), ("decode", 1)])
def test_gpu_executor_check_uses_the_bounds_of_the_plan_table(mode, batch):
    graph = build_graph(SPEC, mode, batch)
    plan = make_plan(graph, True)
    table = plan_table(plan, render_plan(plan, parse_target("cuda:sm_90")))
    feeds = {"train": train_feeds(batch),
             "prefill": {"tokens": np.zeros((1, S), np.int32), "last": np.array([S - 1], np.int32)},
             "decode": {"tokens": np.zeros((1, 1), np.int32), "pos": np.array([S - 1], np.int32)}}[mode]
    check_inputs(table, feeds)  # all in range
    bad, bound = {"train": ("tokens", V), "prefill": ("last", S), "decode": ("pos", S)}[mode]
    feeds[bad] = feeds[bad].copy()
    feeds[bad].flat[-1] = bound
    with pytest.raises(InputError, match=rf"^{bad}: id {bound} at \[.*\] is outside \[0, {bound}\)$"):
        check_inputs(table, feeds)
    with pytest.raises(KeyError, match=f"no value fed for {bad}"):
        check_inputs(table, {k: v for k, v in feeds.items() if k != bad})
