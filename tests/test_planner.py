"""Planner invariants on the presets: every compute node in exactly one kernel, an
acyclic kernel graph, a launch order that respects every dependency (in-place updates
included) with the kernels of one launch running at the same time, and no two
simultaneously live buffers sharing bytes (liveness computed by the test itself). Each
check is shown to fail on a plan corrupted on purpose."""
from __future__ import annotations

import re

import itertools
from dataclasses import replace

import networkx as nx
import numpy as np
import pytest

import gptc
from gptc.compiler.planner import Buffer, Plan, fusion_report, make_plan
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
def test_kernel_graph_is_acyclic(graph, fuse):
    plan = make_plan(graph, fuse)
    graph = plan.graph
    groups = [Group(k.family, k.anchor, set(k.nodes)) for k in plan.kernels]
    assert nx.is_directed_acyclic_graph(kernel_graph(graph, groups))


def launch_of(plan: Plan) -> dict[int, int]:
    return {k: i for i, launch in enumerate(plan.launches) for k in launch}


def launch_order_problems(plan: Plan) -> list[str]:
    """What breaks the launch order. The kernels of one launch run at the same time, so
    a kernel must run in a later launch than the kernel that stores each value it reads,
    and a kernel that overwrites a param or state in place in a later launch than every
    other kernel that reads the old value."""
    at = launch_of(plan)
    if sorted(k for launch in plan.launches for k in launch) != list(range(len(plan.kernels))):
        return ["the launches do not run every kernel exactly once"]
    graph, kernels = plan.graph, plan.kernels
    problems = []
    producer: dict[int, int] = {}
    for k, kern in enumerate(kernels):
        for r in kern.roots:
            if r in producer:
                problems.append(f"{kern.name} and {kernels[producer[r]].name} both store %{r}")
            producer[r] = k
    sources = {**graph.inputs, **graph.params, **graph.states}
    for k, kern in enumerate(kernels):
        for src in kern.reads:
            if src in producer:
                p = producer[src]
                if at[p] >= at[k]:
                    problems.append(f"{kern.name} (launch {at[k]}) reads %{src}, stored by {kernels[p].name} (launch {at[p]})")
            elif src not in sources.values():
                problems.append(f"{kern.name} reads %{src}, which no kernel stores")
    old_values = {**graph.params, **graph.states}
    for name, new in graph.updates.items():
        w = producer[new]
        for k, kern in enumerate(kernels):
            if k != w and old_values[name] in kern.reads and at[k] >= at[w]:
                problems.append(f"{kern.name} (launch {at[k]}) reads the old {name}, which {kernels[w].name} "
                                f"(launch {at[w]}) overwrites")
    return problems


def overlap_problems(plan: Plan) -> list[str]:
    """Buffers of one arena that share bytes while both are live, or that reach past the
    arena. Liveness is computed here, not taken from the allocator: params, states,
    inputs and outputs live through the whole step; an activation from the first to the
    last launch whose kernels store or read it."""
    at = launch_of(plan)
    live: dict[int, tuple[Buffer, int, int]] = {}  # id(buffer) -> (buffer, first, last launch)
    for k, kern in enumerate(plan.kernels):
        for nid in [*kern.roots, *kern.reads]:
            buf = plan.buffer_of(nid)
            _, first, last = live.get(id(buf), (buf, at[k], at[k]))
            live[id(buf)] = (buf, min(first, at[k]), max(last, at[k]))
    for buf in plan.buffers.values():
        if buf.arena != "activations":
            live[id(buf)] = (buf, 0, len(plan.launches) - 1)
    problems = []
    by_arena: dict[str, list[tuple[Buffer, int, int]]] = {}
    for entry in live.values():
        by_arena.setdefault(entry[0].arena, []).append(entry)
    for arena, entries in by_arena.items():
        for buf, _, _ in entries:
            if buf.offset + buf.nbytes > plan.arena_bytes[arena]:
                problems.append(f"{arena}: {buf.name} ends past the arena's {plan.arena_bytes[arena]} bytes")
        for (a, a0, a1), (b, b0, b1) in itertools.combinations(entries, 2):
            if a0 <= b1 and b0 <= a1 and a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes:
                problems.append(f"{arena}: {a.name} [{a.offset}, +{a.nbytes}) live in launches {a0}-{a1} overlaps "
                                f"{b.name} [{b.offset}, +{b.nbytes}) live in launches {b0}-{b1}")
    return problems


@pytest.mark.parametrize("graph,fuse", PLANS)
def test_launches_respect_every_dependency(graph, fuse):
    assert launch_order_problems(make_plan(graph, fuse)) == []


@pytest.mark.parametrize("graph,fuse", PLANS)
def test_live_buffers_never_overlap(graph, fuse):
    assert overlap_problems(make_plan(graph, fuse)) == []


# ----- the checks above can fail: plans corrupted on purpose -------------------------------
def hipgpt_train_plan() -> Plan:
    return make_plan(gptc.build_graph(gptc.preset("hipgpt"), "train"), True)


def dependent_launches(plan: Plan) -> int:
    """i such that a kernel of launch i + 1 reads a value a kernel of launch i stores."""
    for i in range(len(plan.launches) - 1):
        stored = {r for k in plan.launches[i] for r in plan.kernels[k].roots}
        if any(stored & set(plan.kernels[k].reads) for k in plan.launches[i + 1]):
            return i
    raise AssertionError("no two consecutive launches depend on each other")


def test_launch_check_catches_dependent_kernels_in_one_launch():
    # the kernel indices stay in order, so a check by kernel index would pass this plan
    plan = hipgpt_train_plan()
    i = dependent_launches(plan)
    plan.launches[i:i + 2] = [plan.launches[i] + plan.launches[i + 1]]
    assert any("reads %" in p for p in launch_order_problems(plan))


def test_launch_check_catches_a_launch_before_its_inputs():
    plan = hipgpt_train_plan()
    i = dependent_launches(plan)
    plan.launches[i], plan.launches[i + 1] = plan.launches[i + 1], plan.launches[i]
    assert any("reads %" in p for p in launch_order_problems(plan))


def test_launch_check_catches_a_read_of_an_overwritten_value():
    plan = hipgpt_train_plan()
    graph = plan.graph
    old, new = graph.params["wte"], graph.updates["wte"]
    writer = next(k for k, kern in enumerate(plan.kernels) if new in kern.roots)
    reader = next(k for k, kern in enumerate(plan.kernels) if k != writer and old in kern.reads)
    for launch in plan.launches:  # run the reader in the writer's launch
        if reader in launch:
            launch.remove(reader)
        if writer in launch:
            launch.append(reader)
    plan.launches = [launch for launch in plan.launches if launch]
    assert any("reads the old wte" in p for p in launch_order_problems(plan))


def test_overlap_check_catches_live_buffers_sharing_bytes():
    """Two activations live at once moved onto the same bytes, with the allocator's own
    lifetimes made to say they never meet: a check that trusted those would pass."""
    plan = hipgpt_train_plan()
    at = launch_of(plan)
    kern = next(k for k in plan.kernels if any(plan.buffer_of(r).arena == "activations" for r in k.reads)
                and any(plan.buffer_of(r).arena == "activations" for r in k.roots))
    a = next(plan.buffer_of(r) for r in kern.reads if plan.buffer_of(r).arena == "activations")
    b = next(plan.buffer_of(r) for r in kern.roots if plan.buffer_of(r).arena == "activations")
    assert a is not b and overlap_problems(plan) == []
    b.offset = a.offset
    plan.lifetimes[a.node] = (-2, -2)
    plan.lifetimes[b.node] = (at[plan.kernels.index(kern)] + 10**6,) * 2
    assert plan.lifetimes[a.node][1] < plan.lifetimes[b.node][0]  # "never live at once", says the allocator
    assert any(f"{a.name} [" in p and f"{b.name} [" in p for p in overlap_problems(plan))


def test_overlap_check_catches_a_buffer_past_its_arena():
    plan = hipgpt_train_plan()
    buf = next(b for b in plan.buffers.values() if b.arena == "persistent")
    buf.offset = plan.arena_bytes["persistent"]
    assert any("ends past the arena" in p for p in overlap_problems(plan))


@pytest.mark.parametrize("name", ["hipgpt", "modular", "giantgpt", "llama"])
def test_fusion_report_of_presets(capsys, name):
    graph = gptc.build_graph(gptc.preset(name), "train")
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


def _row_kernel(plan: Plan, scope: str):
    g = plan.graph
    (kernel,) = [k for k in plan.kernels if k.family == "row" and any(g.node(n)["scope"] == scope for n in k.nodes)]
    return kernel


def test_row_reductions_share_a_pass_and_the_softmax_sum_runs_online():
    """Cross-entropy's max, sum of exponentials (online: rescaled as the max grows, once
    a chunk of the row's elements) and target logit take one pass over the row, then one
    loop stores the gradient, a few
    elements a thread a step, all computed (their loads in flight) before any store. A
    reduction that reads another takes a pass of its own: layernorm's variance after
    its mean, and its backward's second sum (autodiff's, through the variance's
    gradient) after the first."""
    from gptc.compiler.codegen.kernels import render_launch
    from gptc.target import parse_target
    plan = make_plan(gptc.build_graph(gptc.preset("hipgpt"), "train"), True)
    loops = {}
    for scope in ("cross_entropy", "layernorm#bwd", "layernorm"):
        kernel = _row_kernel(plan, scope)
        code = render_launch(plan, [kernel], parse_target("cuda:sm_90")).code
        # passes (an element or a chunk of elements a thread-step), then the stores' loops
        loops[scope] = len(re.findall(r"for \(idx_t jc? = lane[;* ]", code)), len(re.findall(r"for \(idx_t j0 = lane", code))
        stores = code[code.index("for (idx_t j0 = lane"):]
        assert stores.index("out0[u] = ") < min(stores.find(s) % len(stores) for s in ("= out0[u];", "gptc_store"))
        if scope == "cross_entropy":
            assert "acc1 *= expf(acc0 - x0_max)" in code and code.count("gptc_row_reduce<") == 3
    assert loops == {"cross_entropy": (1, 1), "layernorm#bwd": (2, 1), "layernorm": (2, 1)}


def test_padded_bf16_copy_is_cast_in_the_row_kernel(monkeypatch):
    """A bf16 copy stored with padded rows (precision.py) of a row kernel's value (the
    logits' gradient) is cast by that kernel, over the padded row; the f32 gradient is
    not stored (the bias's gradient sums the bf16 copy)."""
    from gptc.compiler import precision
    monkeypatch.setattr(precision, "PAD_MIN_SIZE", 1)
    spec = gptc.preset("hipgpt")
    spec = gptc.Spec(replace(spec.model, vocab_size=1031), replace(spec.train, precision="bf16"))
    plan = make_plan(gptc.build_graph(spec, "train"), True)
    g = plan.graph
    kernel = _row_kernel(plan, "cross_entropy")
    rows = spec.train.batch_size * spec.model.seq_len
    stored = {g.type(r).shape: g.type(r).dtype for r in kernel.roots}
    assert stored[(rows, 1032)] == "bf16" and (rows, 1031) not in stored
    assert not any(g.op(n) == "cast" and "cross_entropy" in g.node(n)["scope"]
                   for k in plan.kernels if k.family == "pointwise" for n in k.nodes)


def test_bf16_weight_copies_share_one_launch():
    """A bf16 training step makes the bf16 copies of its weights in one launch (they are
    read by the forward and the backward matmuls alike); an inference graph makes each
    before its first use (no backward keeps them alive)."""
    spec = gptc.preset("hipgpt")
    spec = gptc.Spec(spec.model, replace(spec.train, precision="bf16"))
    for mode, launches_wanted in (("train", 1), ("infer", spec.model.n_layers)):
        plan = make_plan(gptc.build_graph(spec, mode), True)
        params = set(plan.graph.params.values())
        copies = {k for k, kern in enumerate(plan.kernels) if kern.family == "pointwise" and set(kern.reads) <= params}
        assert len(copies) >= 4 * spec.model.n_layers
        launches = {i for i, launch in enumerate(plan.launches) if copies & set(launch)}
        assert len(launches) == 1 if mode == "train" else len(launches) >= launches_wanted


@pytest.mark.parametrize("width", [129, 128])
def test_online_sums_pair_with_one_max_each(width):
    """Two softmaxes in one row kernel keep both sums online in one pass (an element at
    a time in rows of 129, not 16-byte aligned; a chunk of 4 at a time in rows of 128);
    a second sum of exp(x - max) over a max that already has one is a pass of its own."""
    from gptc import dsl
    from gptc.compiler.codegen.kernels import render_launch
    from gptc.compiler.ir import Graph
    from gptc.target import parse_target
    g = Graph()
    x, y = g.input("x", (5, width)), g.input("y", (5, width))
    g.output("product", dsl.softmax(x) * dsl.softmax(y * 2.0))
    m = y.max(-1, keepdims=True)
    g.output("two_sums", (y - m.broadcast_to(y.shape)).exp().sum(-1, keepdims=True) * 3.0
             + (y - m.broadcast_to(y.shape)).exp().sum(-1, keepdims=True))
    plan = make_plan(g, True)
    codes = [render_launch(plan, [k], parse_target("cuda:sm_90")).code for k in plan.kernels]
    (product,) = [c for c in codes if "2.0f" in c]
    update = "acc3 *= expf(acc2 - x1_max)" if width == 128 else "acc3 = acc3 * expf(acc2 - "
    assert product.count("gptc_row_reduce<") == 4 and update in product
    (two,) = [c for c in codes if "3.0f" in c]
    loop = "for (idx_t jc = lane * 4;" if width == 128 else "for (idx_t j = lane;"
    assert two.count(loop) == 2 and two.count(" expf(acc0 - ") == 2  # update + rescale


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flash_kernels_store_where_their_readers_read(precision):
    """The gradients of q, k and v, sliced out of one QKV projection, are read only as
    their concatenation (the slices' VJP: pads and adds; in bf16 cast for the
    projection's backward matmuls): the flash backward stores each at its place in it
    and no other kernel assembles it. In bf16 the forward stores out's cast too. The
    places, applied to the reference's values of dq, dk, dv (out), rebuild the
    concatenation (the cast) it computes."""
    from gptc.models import init_params
    from gptc.runtime.reference import run_graph
    spec = gptc.preset("tiny")
    spec = gptc.Spec(replace(spec.model, n_heads=4), replace(spec.train, precision=precision))
    plan = make_plan(gptc.build_graph(spec, "train"), True)
    g = plan.graph
    backward = [k for k in plan.kernels if k.family == "attention_bwd"]
    assert len(backward) == spec.model.n_layers
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, spec.model.vocab_size, (2,) + g.type(g.inputs["tokens"]).shape, dtype=np.int32)
    feeds = {**init_params(g, 0), **{name: np.zeros(g.type(n).shape, np.float32) for name, n in g.states.items()},
             "tokens": tokens[0], "targets": tokens[1], "lr": np.float32(1e-3), "step": np.float32(1)}
    values = run_graph(g, feeds, keep=True)["values"]
    for kernel in backward:
        a = kernel.attention
        assert kernel.roots == [a.concat] and g.type(a.concat).shape[-1] == 3 * spec.model.d_model
        assert g.type(a.concat).dtype == ("bf16" if precision == "bf16" else "f32")
        assert not {*a.gradients()} & set(plan.buffers)   # never stored on their own
        assembled = np.full(g.type(a.concat).shape, np.nan)
        for grad, (offset, strides) in a.places.items():
            place = np.lib.stride_tricks.as_strided(assembled.reshape(-1)[offset:], g.type(grad).shape,
                                                    [s * assembled.itemsize for s in strides])
            place[...] = values[grad]
        np.testing.assert_allclose(assembled, values[a.concat], rtol=2 ** -8)
        assert a.concat_nodes <= set(kernel.nodes)   # the adds (and cast) that assembled it
    # The forward stores out's bf16 copy (for the projection after it) at out's place in it.
    for kernel in [k for k in plan.kernels if k.family == "attention"]:
        a = kernel.attention
        assert (a.copy is not None) == (precision == "bf16")
        if a.copy is None:
            continue
        assert a.copy in kernel.roots and g.type(a.copy).dtype == "bf16"
        assert not [k for k in plan.kernels if k is not kernel and a.copy in k.nodes]
        offset, strides = a.copy_place
        copy = np.full(g.type(a.copy).shape, np.nan)
        np.lib.stride_tricks.as_strided(copy.reshape(-1)[offset:], g.type(a.out).shape,
                                        [st * copy.itemsize for st in strides])[...] = values[a.out]
        np.testing.assert_allclose(copy, values[a.copy], rtol=2 ** -8)


@pytest.mark.parametrize("gap,at_end", [(0, False), (8, False), (8, True)], ids=["none", "between", "at_end"])
def test_qkv_gradients_that_do_not_tile_their_tensor_are_stored_on_their_own(gap, at_end):
    """q, k, v sliced out of one (B, S, 3E + gap) tensor, `gap` columns left between k and
    v (or after v): with no gap their gradients' sum is a concatenation, which the flash
    backward stores into; with one, the sum has zeros the pieces do not cover, and the
    gradients are stored as they are (another kernel adds them)."""
    from gptc.compiler.autodiff import gradients
    from gptc.compiler.ir import Graph
    batch, seq, heads, dim = 2, 37, 2, 16
    width = heads * dim
    g = Graph()
    qkv = g.param("qkv", (batch, seq, 3 * width + gap))
    parts = [qkv.slice(2, start, start + width) for start in (0, width, 2 * width + (0 if at_end else gap))]
    q, k, v = (p.reshape(batch, seq, heads, dim).permute(0, 2, 1, 3) for p in parts)
    y = gptc.dsl.causal_attention(q, k, v)
    loss = (y * g.input("r", (batch, heads, seq, dim))).sum()
    g.output("loss", loss)
    g.output("dqkv", gradients(loss, [qkv])[0])
    plan = make_plan(g, True)
    (backward,) = [k for k in plan.kernels if k.family == "attention_bwd"]
    a = backward.attention
    if gap:
        assert a.concat is None and set(backward.roots) == set(a.gradients())
    else:
        assert a.concat is not None and backward.roots == [a.concat]
        assert sorted(offset for offset, _ in a.places.values()) == [0, width, 2 * width]
