"""Batched launches whose parts share a device function: the branch of the function
picks the block's part (its range of blocks, its buffers, its element count) and calls
the function once. Independent kernels of one level (pointwise, column reductions,
small matmuls) with the same code on other buffers and sizes are batched with parts of
their own code between them; the GPU run must match the reference with every output
poisoned before the launch. The CPU test checks the plan has that shape."""
from __future__ import annotations

import re

import numpy as np
import pytest

from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.ir import Graph
from gptc.compiler.planner import make_plan
from gptc.target import parse_target

from conftest import rel_err
from test_gpu_kernels import random_feeds, run_both


def batched_graph() -> Graph:
    """Independent outputs on one level: the same pointwise code over 4 sizes, with
    other code (exp(x * x), twice) among them in the plan's order, and a scalar (code of
    its own: no index); column sums of 3 equal shapes and one other; small matmuls of 3
    equal shapes and one other."""
    g = Graph()
    for i, shape in enumerate([(37,), (1000,), (3, 129), (7, 7, 7), (1,)]):
        x = g.input(f"x{i}", shape)
        g.output(f"p{i}", (x * 0.5).tanh() * 2.0 + 1.0)
        if i in (1, 3):
            g.output(f"q{i}", (x * x).exp())
    for i, shape in enumerate([(517, 33), (517, 33), (517, 33), (45, 7)]):
        g.output(f"c{i}", g.input(f"y{i}", shape).sum(0))
    for i, (m, k, n) in enumerate([(19, 45, 23), (19, 45, 23), (19, 45, 23), (5, 3, 70)]):
        g.output(f"m{i}", g.input(f"a{i}", (m, k)) @ g.input(f"b{i}", (k, n)))
    return g


@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_batched_launches_call_shared_functions_once(target):
    kernels = render_plan(make_plan(batched_graph(), True), parse_target(target))
    families = set()
    for k in kernels:
        fns = set(re.findall(r"__device__ __forceinline__ void (gptc_fn\d+)\(", k.code))
        for fn in fns:
            assert len(re.findall(rf"\b{fn}\(", k.code)) == 2, f"{k.name}: {fn} called more than once"
        if fns and re.search(r"parts run", k.source):
            families.add(k.family)
    assert families == {"pointwise", "reduce", "matmul"}, families
    pointwise = next(k for k in kernels if k.family == "pointwise" and "parts run" in k.source)
    # parts reordered so that each function's parts are side by side; the scalar inline
    assert "4 parts run" in pointwise.source and "2 parts run" in pointwise.source
    assert pointwise.source.count("const idx_t count") == 1


@pytest.mark.gpu
def test_batched_launches_match_the_reference(device):
    graph = batched_graph()
    feeds = random_feeds(graph, np.random.default_rng(3))
    out, _, ref = run_both(device, graph, feeds, True)
    for key, value in ref["outputs"].items():
        assert rel_err(out[key], value) < 1e-5, f"{key}: {rel_err(out[key], value):.2e}"
