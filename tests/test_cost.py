"""The per-kernel cost model (gptc/compiler/planner/cost.py) on a small graph, against numbers worked
out by hand, and the roofline arithmetic."""
from __future__ import annotations

from dataclasses import replace

import pytest

from gptc import dsl
from gptc.compiler.planner.cost import KernelCost, bound, floor_seconds, node_flops, plan_costs
from gptc.compiler.ir import Graph
from gptc.models import build_graph
from gptc.compiler import planner
from gptc.compiler.planner import Plan, make_plan
from gptc.spec import preset


def small_graph() -> Graph:
    """tokens (2,3) -> embedding rows of a (10,4) table + the first 3 of 8 positions
    + a bias -> (6,4) @ (4,5) -> outputs tanh(z) and the row sums of z."""
    g = Graph()
    tok = g.input("tokens", (2, 3), "i32")
    table = g.param("table", (10, 4))
    pos = g.param("pos", (8, 4))
    bias = g.param("bias", (4,))
    w = g.param("w", (4, 5))
    x = dsl.embedding(table, tok) + pos.slice(0, 0, 3) + bias
    z = x.reshape(6, 4) @ w
    g.output("z", z.tanh())
    g.output("s", z.sum(-1))
    return g


def kernel_costs(plan: Plan) -> list[KernelCost]:
    """The cost of each kernel alone: the plan with every kernel in a launch of its own."""
    return plan_costs(replace(plan, launches=[[i] for i in range(len(plan.kernels))]))


def costs_by_ops(fuse: bool) -> dict[tuple[str, ...], tuple[int, int, int]]:
    g = small_graph()
    plan = make_plan(g, fuse)
    return {tuple(plan.graph.op(n) for n in k.nodes): (c.bytes_read, c.bytes_written, c.flops)
            for k, c in zip(plan.kernels, plan_costs(plan))}


def test_fused_small_graph_by_hand():
    costs = costs_by_ops(True)
    assert costs == {
        # reads: tokens 6*4 B, the 6 table rows looked up (not the table) 6*4*4 B, the first
        # 3 of 8 position rows 3*4*4 B, the bias once (not broadcast) 4*4 B = 24+96+48+16;
        # writes x (2,3,4) f32 = 96 B; FLOPs: two adds over 24 elements, the gather none.
        ("gather", "add", "add"): (184, 96, 48),
        # reads w 80 B and x 96 B; writes z (needed by the sum) and tanh(z), 120 B each;
        # FLOPs 2*M*N*K = 2*6*5*4 = 240, plus 30 tanh.
        ("matmul", "tanh"): (176, 240, 270),
        # reads z 120 B, writes 6 sums 24 B; one FLOP per element reduced.
        ("sum",): (120, 24, 30),
    }


def test_unfused_small_graph_by_hand():
    g = small_graph()
    plan = make_plan(g, False)
    costs = sorted((tuple(plan.graph.op(n) for n in k.nodes), (c.bytes_read, c.bytes_written, c.flops))
                   for k, c in zip(plan.kernels, plan_costs(plan)))
    assert costs == sorted([
        (("gather",), (24 + 96, 96, 0)),          # tokens + the rows looked up
        (("add",), (96 + 48, 96, 24)),            # x + the 3 position rows
        (("add",), (96 + 16, 96, 24)),            # ... + the bias, read once
        (("matmul",), (80 + 96, 120, 240)),
        (("tanh",), (120, 120, 30)),
        (("sum",), (120, 24, 30)),
    ])


def test_fusion_keeps_flops_and_saves_bytes(monkeypatch):
    g = build_graph(preset("tiny"), "train")
    fused, unfused = plan_costs(make_plan(g, True)), plan_costs(make_plan(build_graph(preset("tiny"), "train"), False))

    def flops(costs):
        return sum(c.flops for c in costs)
    # The backward recomputes a few cheap forward values (GELU's) instead of reading
    # them (fusion.recompute_in_backward): a little more arithmetic; without it, the
    # same arithmetic however it is grouped.
    assert flops(unfused) < flops(fused) < 1.02 * flops(unfused)
    monkeypatch.setattr(planner, "recompute_in_backward", lambda graph: None)
    assert flops(plan_costs(make_plan(g, True))) == flops(unfused)
    assert sum(c.bytes for c in fused) < sum(c.bytes for c in unfused) / 2
    assert len(fused) < len(unfused)


def test_in_place_update_counts_read_and_write():
    """AdamW overwrites a parameter in place: its buffer is read once and written once."""
    g = build_graph(preset("tiny"), "train")
    plan = make_plan(g, True)
    wte = plan.buffer_of(g.params["wte"])
    updates = [k for k in plan.kernels if g.params["wte"] in k.reads and g.updates["wte"] in k.roots]
    assert len(updates) == 1
    c = kernel_costs(plan)[plan.kernels.index(updates[0])]
    # reads: wte, its gradient, m, v (and small scalars); writes wte, m, v
    assert c.bytes_written == 3 * wte.nbytes
    assert 4 * wte.nbytes <= c.bytes_read < 4 * wte.nbytes + 4096


def test_matmul_flops_batched():
    g = Graph()
    a, b = g.input("a", (3, 7, 5)), g.input("b", (3, 5, 11))
    c = a @ b
    g.output("c", c)
    assert node_flops(g, c.id) == 2 * 3 * 7 * 11 * 5


def test_roofline_arithmetic():
    # 1 GB at 1 TB/s = 1 ms; 1 TFLOP at 100 TFLOP/s = 10 ms: compute-bound, floor 10 ms
    assert floor_seconds(1e9, 1e12, 1e12, 1e14) == pytest.approx(1e-2)
    assert bound(1e9, 1e12, 1e12, 1e14) == "compute"
    assert bound(1e9, 1e9, 1e12, 1e14) == "memory"


def test_launch_costs_add_up():
    """Kernels the planner batched into one launch: one cost per launch, FLOPs add up,
    and the launch moves no more bytes than its kernels apart."""
    g = build_graph(preset("tiny"), "train")
    plan = make_plan(g, True)
    per_launch = plan_costs(plan)
    per_kernel = kernel_costs(plan)
    assert len(per_launch) == len(plan.launches) < len(per_kernel)
    assert sum(c.flops for c in per_launch) == sum(c.flops for c in per_kernel)
    assert sum(c.bytes for c in per_launch) <= sum(c.bytes for c in per_kernel)
