"""Planner invariants on the presets: every compute node in exactly one kernel, an
acyclic kernel graph, a launch order that respects every dependency (in-place updates
included), and no two simultaneously live buffers sharing bytes."""
from __future__ import annotations

import itertools

import networkx as nx
import pytest

import gptc
from gptc.compiler.planner import fusion_report, make_plan
from gptc.compiler.planner.fusion import is_free, kernel_graph, Group


def _plans():
    for name in ("hipgpt", "gpt2"):
        for mode in ("train", "infer"):
            graph = gptc.build_graph(gptc.preset(name), mode)
            for fuse in (True, False):
                yield pytest.param(graph, fuse, id=f"{name}-{mode}-{'fused' if fuse else 'unfused'}")


PLANS = list(_plans())


@pytest.mark.parametrize("graph,fuse", PLANS)
def test_every_compute_node_in_exactly_one_kernel(graph, fuse):
    plan = make_plan(graph, fuse)
    graph = plan.graph  # the copy that was planned (with the nodes planning adds)
    free: dict = {}
    compute = [n for n in graph.nx.nodes if not is_free(graph, n, free)]
    owners = [k for k in plan.kernels for _ in k.nodes]
    seen = [n for k in plan.kernels for n in k.nodes]
    assert len(seen) == len(set(seen)) == len(owners)
    assert set(seen) == set(compute)
    if not fuse:
        assert all(len(k.nodes) == 1 for k in plan.kernels)


@pytest.mark.parametrize("graph,fuse", PLANS)
def test_kernel_graph_is_acyclic_and_order_respects_it(graph, fuse):
    plan = make_plan(graph, fuse)
    graph = plan.graph
    groups = [Group(k.family, k.anchor, set(k.nodes)) for k in plan.kernels]
    kg = kernel_graph(graph, groups)
    assert nx.is_directed_acyclic_graph(kg)
    assert all(a < b for a, b in kg.edges), "a kernel is launched before one it reads from"
    # In-place updates: every other reader of an old param/state value runs before the writer.
    position = {n: i for i, k in enumerate(plan.kernels) for n in k.nodes}
    sources = {**graph.params, **graph.states}
    for name, new in graph.updates.items():
        writer = position[new]
        for i, k in enumerate(plan.kernels):
            if sources[name] in k.reads and i != writer:
                assert i < writer, f"{k.name} reads the old {name} after it is overwritten"


@pytest.mark.parametrize("graph,fuse", PLANS)
def test_live_buffers_never_overlap(graph, fuse):
    plan = make_plan(graph, fuse)
    by_arena: dict[str, list] = {}
    for buf in {id(b): b for b in plan.buffers.values()}.values():
        by_arena.setdefault(buf.arena, []).append(buf)
    for arena, bufs in by_arena.items():
        for a, b in itertools.combinations(bufs, 2):
            if arena == "activations":
                (a0, a1), (b0, b1) = plan.lifetimes[a.node], plan.lifetimes[b.node]
                if a1 < b0 or b1 < a0:
                    continue  # never live at the same time
            assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset, \
                f"{arena}: {a.name} [{a.offset}, +{a.nbytes}) overlaps {b.name} [{b.offset}, +{b.nbytes})"
            assert max(a.offset + a.nbytes, b.offset + b.nbytes) <= plan.arena_bytes[arena]


def test_every_value_read_is_written_earlier():
    graph = gptc.build_graph(gptc.preset("hipgpt"), "train")
    for fuse in (True, False):
        plan = make_plan(graph, fuse)
        g = plan.graph
        written = set(g.inputs.values()) | set(g.params.values()) | set(g.states.values())
        for k in plan.kernels:
            missing = [r for r in k.reads if r not in written]
            assert not missing, f"{k.name} reads {missing} before any kernel stores them"
            written |= set(k.roots)


def test_fusion_report_hipgpt(capsys):
    graph = gptc.build_graph(gptc.preset("hipgpt"), "train")
    fused, unfused = make_plan(graph, True), make_plan(graph, False)
    report = fusion_report(fused, unfused)
    print(report)
    assert len(fused.launches) * 3 <= len(unfused.launches), "fused should need at most a third of the launches"
    assert fused.peak_activation_bytes < unfused.peak_activation_bytes
    assert "launches per step" in report and fused.kernels[0].name in report


def test_plans_are_deterministic():
    from gptc.compiler.codegen.kernels import render_plan
    from gptc.target import parse_target
    sources = []
    for _ in range(2):
        graph = gptc.build_graph(gptc.preset("hipgpt"), "train")
        sources.append([k.source for k in render_plan(make_plan(graph, True), parse_target("gfx90a"))])
    assert sources[0] == sources[1]


def _snapshot(graph) -> tuple:
    nodes = {n: (d["op"], repr(d["attrs"]), d["type"], d["inputs"], d["scope"]) for n, d in graph.nx.nodes(data=True)}
    edges = {(a, b): list(d["args"]) for a, b, d in graph.nx.edges(data=True)}
    tables = [dict(t) for t in (graph.inputs, graph.params, graph.states, graph.outputs, graph.updates)]
    return nodes, edges, tables


def test_planning_leaves_the_graph_unchanged():
    """make_plan plans a copy: pruning, the copies lay_out inserts (an output view, a
    matmul operand that is no strided view) and split reductions never reach the caller."""
    g = gptc.Graph()
    x, w, big = g.input("x", (4, 8)), g.input("w", (2, 4, 8)), g.input("big", (64, 1100))
    x.exp()  # read by nothing: pruned
    g.output("xt", x.T)
    g.output("mm", w.permute(1, 0, 2).reshape(4, 16) @ g.input("y", (16, 3)))
    g.output("ss", (big * big).sum())
    for graph in (g, gptc.build_graph(gptc.preset("tiny"), "train")):
        before = _snapshot(graph)
        for fuse in (True, False):
            plan = make_plan(graph, fuse)
            assert plan.graph is not graph and len(plan.graph) != len(graph)
            assert _snapshot(graph) == before


def test_planning_reads_through_stop_gradient():
    """stop_gradient costs no kernel: its readers (one reading both it and its operand)
    and outputs read the operand."""
    g = gptc.Graph()
    a = g.input("x", (3, 4)).exp()
    prod = a * a.stop_gradient()
    g.output("y", prod)
    g.output("s", a.stop_gradient())
    plan = make_plan(g, False)
    pg = plan.graph
    assert "stop_gradient" not in {pg.op(n) for n in pg.nx.nodes}
    assert pg.inputs_of(prod.id) == (a.id, a.id) and pg.nx.edges[a.id, prod.id]["args"] == [0, 1]
    assert pg.outputs["s"] == a.id
    assert sorted(pg.op(n) for k in plan.kernels for n in k.nodes) == ["exp", "mul"]


@pytest.mark.parametrize("composite", ["softmax", "cross_entropy"])
def test_stability_max_costs_no_gradient_passes(composite):
    """The max that keeps softmax and cross-entropy stable is a constant to autodiff
    (stop_gradient), so the fused row kernel of forward and backward makes three passes
    over a row (max, sum of exp, then the gradient's sum or the picked logit), not five
    (the max's own gradient: the ties count and the sum of what reaches the max)."""
    from gptc.compiler.autodiff import gradients
    g = gptc.Graph()
    x = g.param("x", (6, 29))
    if composite == "softmax":
        loss = (gptc.dsl.softmax(x) * g.input("r", (6, 29))).sum()
    else:
        loss = gptc.dsl.cross_entropy(x, g.input("t", (6,), "i32"))
    g.output("loss", loss)
    g.output("dx", gradients(loss, [x])[0])
    plan = make_plan(g, True)
    rows = [k for k in plan.kernels if k.family == "row"]
    assert len(rows) == 1
    assert [plan.graph.op(n) for n in rows[0].nodes if plan.graph.op(n) in ("max", "sum")] == ["max", "sum", "sum"]
    assert "stop_gradient" not in {plan.graph.op(n) for n in plan.graph.nx.nodes}  # read through


@pytest.mark.parametrize("d_model,heads", [(384, 4), (512, 4), (400, 5)], ids=["head_dim96", "head_dim128", "head_dim80"])
def test_large_head_dims_stay_on_the_flash_path(d_model, heads):
    """head_dim 96 and 128 (and 80, padded to 96) use the flash kernels, which never
    store the S x S matrix, in training and in prefill."""
    spec = gptc.Spec(gptc.ModelSpec(vocab_size=67, seq_len=13, d_model=d_model, n_layers=1, n_heads=heads, d_ff=32),
                     gptc.TrainSpec(batch_size=2))
    for mode, families in (("train", {"attention", "attention_bwd"}), ("prefill", {"attention"})):
        plan = make_plan(gptc.build_graph(spec, mode), True)
        assert families <= {k.family for k in plan.kernels}, mode
        seq = spec.model.seq_len
        assert not any(b.shape[-2:] == (seq, seq) for b in plan.buffers.values()), f"{mode} stores an S x S matrix"
