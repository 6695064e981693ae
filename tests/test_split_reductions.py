"""The planner's split reductions (planner/__init__.py split_reductions): the planned
graph computes the same values, and the reductions that would starve the GPU become two
steps whose first one has many threads; reductions that need no split, or whose rows
have no divisor to split them by, are left as they are."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import gptc
from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.ir import Graph
from gptc.compiler.planner import make_plan
from gptc.runtime.build import plan_table
from gptc.runtime.reference import run_graph
from gptc.spec import load_spec
from gptc.target import parse_target


def _graph(shape, axes, keepdims=False, square=False) -> Graph:
    g = Graph()
    x = g.input("x", shape)
    y = (x * x) if square else x
    g.output("y", y.sum(axes, keepdims=keepdims))
    return g


def _reduce_launches(graph: Graph) -> list[dict]:
    plan = make_plan(graph)
    table = plan_table(plan, render_plan(plan, parse_target("sm_90")))
    return [e for e in table["launches"] if e["family"] == "reduce"], plan


@pytest.mark.parametrize("shape,axes,keepdims", [
    ((8192, 768), (0,), False),         # a bias's gradient over a batch's rows
    ((8, 1024, 96), (0, 1), True),      # a norm gain's, keeping dims
    ((3, 4000, 7), (0, 1), False),      # outputs far fewer than a warp
])
def test_column_sums_split_and_equal(shape, axes, keepdims):
    graph = _graph(shape, axes, keepdims)
    launches, plan = _reduce_launches(graph)
    assert len(launches) == 2
    rows = int(np.prod([shape[a] for a in axes]))
    outputs = int(np.prod(shape)) // rows
    first = launches[0]["grid"][0] * launches[0]["block"][0]
    assert first >= 16 * outputs            # many threads for the rows, not one per output
    x = np.random.default_rng(0).standard_normal(shape)
    want = x.sum(axis=axes, keepdims=keepdims)
    got = run_graph(plan.graph, {"x": x}, np.float64)["outputs"]["y"]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,axes", [
    ((4099, 768), (0,)),       # a prime number of rows: no split
    ((64, 2048), (0,)),        # few rows: chunks of 16
    ((512, 65536), (0,)),      # as many outputs as threads wanted: no split
])
def test_split_only_where_it_helps(shape, axes):
    launches, _ = _reduce_launches(_graph(shape, axes))
    rows, outputs = shape[0], shape[1]
    split = outputs < 65536 and any(rows % c == 0 for c in range(2, rows))
    assert len(launches) == (2 if split else 1)


def test_bf16_column_sums_keep_f32_partials():
    """A bias's gradient in bf16 sums the bf16 copy of the output gradient in f32
    (compiler/precision.py): its partial sums are f32 too, not rounded to bf16."""
    spec = gptc.preset("tiny")
    spec = replace(spec, train=replace(spec.train, precision="bf16"))
    graph = gptc.build_graph(spec, "train")
    assert not [n for n in graph.nx.nodes if graph.op(n) == "sum" and graph.type(n).dtype == "bf16"]
    plan = make_plan(graph)
    g = plan.graph
    sums = [n for n in g.nx.nodes if g.op(n) == "sum"]
    assert len(sums) > len([n for n in graph.nx.nodes if graph.op(n) == "sum"])  # some were split
    assert all(g.type(n).dtype == "f32" for n in sums)


# ----------------------------------------------------------------------------- split-K

def _weight_gradient(tokens: int, m: int, n: int, dtype: str = "f32") -> Graph:
    """dW = X^T dY of an (m -> n) linear layer over `tokens` rows, as autodiff builds it."""
    g = Graph()
    x, dy = g.input("x", (tokens, m), dtype), g.input("dy", (tokens, n), dtype)
    g.output("dw", x.T @ dy)
    return g


def _matmul_launches(plan) -> list[dict]:
    table = plan_table(plan, render_plan(plan, parse_target("sm_90")))
    return [e for e in table["launches"] if e["family"] == "matmul"]


@pytest.mark.parametrize("tokens,m,n,parts", [
    (8192, 512, 512, 4),      # the mid model's attention projection: 64 tiles alone
    (8192, 768, 768, 2),      # gpt2's
    (5000, 96, 64, 4),        # 4 parts of 1250 (K // 1024 = 4 divides 5000)
])
def test_small_long_matmuls_split_along_k_and_equal(tokens, m, n, parts):
    plan = make_plan(_weight_gradient(tokens, m, n))
    g = plan.graph
    (mm,) = [nid for nid in g.nx.nodes if g.op(nid) == "matmul"]
    assert g.type(mm).shape == (parts, m, n)           # P products of K/P each
    assert not [nid for nid in g.nx.nodes if g.op(nid) == "copy"]  # operands read as strided views
    (launch,) = _matmul_launches(plan)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((tokens, m)), rng.standard_normal((tokens, n))
    got = run_graph(g, {"x": x, "dy": dy}, np.float64)["outputs"]["dw"]
    np.testing.assert_allclose(got, x.T @ dy, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tokens,m,n", [
    (8192, 1024, 1024),       # outputs enough to fill the GPU
    (1536, 512, 512),         # a short sum: no part of at least 1024 products
    (4099, 64, 64),           # K prime: no divisor gives two parts
    (8192, 1, 768),           # a matrix-vector product (codegen's own kernel)
    (8192, 512, 32),          # narrower than a tile
])
def test_split_k_only_where_it_helps(tokens, m, n):
    g = make_plan(_weight_gradient(tokens, m, n)).graph
    (mm,) = [nid for nid in g.nx.nodes if g.op(nid) == "matmul"]
    assert g.type(mm).shape == (m, n)


def test_split_k_bf16_partials_are_f32():
    """bf16 operands: the partial products are f32 (ops/matmul.py), summed in f32."""
    g = make_plan(_weight_gradient(8192, 512, 512, "bf16")).graph
    (mm,) = [nid for nid in g.nx.nodes if g.op(nid) == "matmul"]
    (total,) = g.users(mm)
    assert g.type(mm).dtype == "f32" and g.op(total) == "sum" and g.type(total).dtype == "f32"


def test_split_weight_gradients_of_layers_share_a_launch():
    """The mid model's eight 512 x 512 weight gradients, split in four, still run in one
    launch (schedule.py batches matmuls by the size of each product)."""
    spec = load_spec(Path(__file__).resolve().parents[1] / "benchmarks" / "mid.toml")
    plan = make_plan(gptc.build_graph(spec, "train"))
    g = plan.graph
    shapes = [[g.type(plan.kernels[i].anchor).shape for i in launch] for launch in plan.launches
              if plan.kernels[launch[0]].family == "matmul"]
    assert [(4, 512, 512)] * 8 in shapes
