"""The planner's rematerialization (fusion.recompute_in_backward): the backward
recomputes GELU's intermediates and LayerNorm's normalised input from values it reads
anyway instead of reading them stored, so the forward kernels store fewer tensors; the
planned graph computes the same values (the NumPy reference on it, float64)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc.compiler import planner
from gptc.compiler.planner import make_plan
from gptc.runtime.reference import run_graph

from test_gpu_kernels import training_feeds

SPEC = gptc.Spec(gptc.ModelSpec(vocab_size=97, seq_len=24, d_model=48, n_layers=2, n_heads=4, d_ff=96),
                 gptc.TrainSpec(batch_size=3))


def _stored_forward(plan) -> set[str]:
    """The ops of the forward values some kernel stores (activation buffers)."""
    g = plan.graph
    return {g.op(n) for n, buf in plan.buffers.items() if buf.arena == "activations" and "#bwd" not in g.node(n)["scope"]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backward_recomputes_and_the_values_stay(precision, monkeypatch):
    spec = replace(SPEC, train=replace(SPEC.train, precision=precision))
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    plan = make_plan(graph, True)
    assert "tanh" not in _stored_forward(plan)          # GELU's tanh(...) recomputed, not stored
    monkeypatch.setattr(planner, "recompute_in_backward", lambda g: None)
    plain = make_plan(graph, True)
    assert "tanh" in _stored_forward(plain)
    assert plan.arena_bytes["activations"] < plain.arena_bytes["activations"]
    feeds = training_feeds(spec, graph, np.random.default_rng(0))
    want = run_graph(graph, feeds, np.float64)
    got = run_graph(plan.graph, feeds, np.float64)
    for name, value in want["outputs"].items():
        np.testing.assert_allclose(got["outputs"][name], value, rtol=1e-9, atol=1e-12, err_msg=name)
    for name, value in want["updates"].items():
        np.testing.assert_allclose(got["updates"][name], value, rtol=1e-9, atol=1e-12, err_msg=name)
