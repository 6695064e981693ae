"""Mixture of experts (model.ffn = "moe"): the dispatch ops (ops/grouped.py) against
brute force, top-k ties, the layer against a direct NumPy formula (output and
load-balancing loss), its VJP against float64 finite differences, the whole model
against the PyTorch twin in float64 (loss, aux_loss, every gradient), the planner
(grouped launches do k/E of the dense FLOPs), compilation for sm_90 and gfx90a, CPU
training, KV-cache decoding. GPU tests (marked gpu) check the new kernels at awkward
sizes (empty experts, one expert taking every row) and fused training steps."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Graph
from gptc.compiler.planner import make_plan
from gptc.compiler.planner.cost import plan_costs
from gptc.runtime.reference import run_graph

from conftest import rel_err, require_torch
from test_ops_grad import Case, make_graph, numeric_gradient, projection


def moe_spec(expert_ffn: str = "gelu", **model) -> gptc.Spec:
    """Awkward sizes: 5 experts, top-2, nothing a multiple of a tile."""
    m = gptc.ModelSpec(vocab_size=101, seq_len=13, d_model=24, n_layers=2, n_heads=2, d_ff=20, ffn="moe",
                       n_experts=5, moe_top_k=2, expert_ffn=expert_ffn, moe_aux_weight=0.1, init_std=0.2)
    return gptc.Spec(replace(m, **model), gptc.TrainSpec(batch_size=3, grad_clip=0.0))


# ----- the dispatch ops ----------------------------------------------------------------
@pytest.mark.parametrize("ids", [[2, 0, 2, 2, 0, 2, 0], [3] * 9, list(np.random.default_rng(1).integers(0, 6, 300))],
                         ids=["empty-groups", "one-group", "random"])
def test_group_rank_and_offsets_are_a_stable_counting_sort(ids):
    ids = np.array(ids, dtype=np.int32)
    groups = 6
    g = Graph()
    t = g.input("ids", ids.shape, "i32")
    g.output("rank", dsl.group_rank(t, groups))
    g.output("offsets", dsl.group_offsets(t, groups))
    out = run_graph(g, {"ids": ids})["outputs"]
    expected = [int(np.sum(ids < i) + np.sum(ids[:r] == i)) for r, i in enumerate(ids)]
    np.testing.assert_array_equal(out["rank"], expected)
    np.testing.assert_array_equal(out["offsets"], [np.sum(ids < e) for e in range(groups + 1)])


def test_grouped_matmul_multiplies_each_segment_by_its_group():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((7, 4)), rng.standard_normal((3, 4, 5))
    offsets = np.array([0, 3, 3, 7], dtype=np.int32)
    g = Graph()
    tx, tw, to = g.input("x", x.shape, "f64"), g.input("w", w.shape, "f64"), g.input("o", (4,), "i32")
    g.output("y", dsl.grouped_matmul(tx, tw, to))
    y = run_graph(g, {"x": x, "w": w, "o": offsets}, np.float64)["outputs"]["y"]
    group = [0, 0, 0, 2, 2, 2, 2]
    np.testing.assert_allclose(y, [x[r] @ w[group[r]] for r in range(7)], rtol=1e-12)


def test_group_ids_out_of_range_are_refused():
    g = Graph()
    g.output("rank", dsl.group_rank(g.input("ids", (3,), "i32"), 2))
    with pytest.raises(ValueError, match="group ids must lie in"):
        run_graph(g, {"ids": np.array([0, 2, 1], dtype=np.int32)})


# ----- top-k -----------------------------------------------------------------------------
def top_k_graph(shape, k):
    g = Graph()
    s = g.input("s", shape, "f64")
    ids, chosen, picks = dsl.top_k(s, k)
    g.output("ids", ids)
    g.output("chosen", chosen)
    g.output("picks", picks)
    return g


def test_top_k_breaks_ties_by_the_lowest_index():
    scores = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [5, -1, 5, 5], [0, 0, 1, 1]], dtype=np.float64)
    for k, expected in ((2, [[1, 2], [0, 1], [0, 2], [2, 3]]), (3, [[1, 2, 0], [0, 1, 2], [0, 2, 3], [2, 3, 0]])):
        out = run_graph(top_k_graph(scores.shape, k), {"s": scores}, np.float64)["outputs"]
        np.testing.assert_array_equal(out["ids"], expected)
        np.testing.assert_array_equal(out["chosen"], np.take_along_axis(scores, np.array(expected), 1))
        picks = np.zeros_like(scores)
        np.put_along_axis(picks, np.array(expected), 1.0, 1)
        np.testing.assert_array_equal(out["picks"], picks)


def test_top_k_equals_a_stable_descending_sort():
    scores = np.random.default_rng(3).integers(-3, 4, (50, 7)).astype(np.float64)  # many ties
    out = run_graph(top_k_graph(scores.shape, 3), {"s": scores}, np.float64)["outputs"]
    np.testing.assert_array_equal(out["ids"], np.argsort(-scores, axis=1, kind="stable")[:, :3])


# ----- the layer -------------------------------------------------------------------------
def moe_layer(g: Graph, t: dict, k: int, expert_ffn: str):
    return dsl.moe(t["x"], t["router"], t["w_in"], t["w_out"], k, expert_ffn)


def layer_inputs(rng, rows=9, width=4, experts=3, ff=5, swiglu=False):
    return {"x": rng.standard_normal((rows, width)), "router": rng.standard_normal((width, experts)),
            "w_in": rng.standard_normal((experts, width, ff * (2 if swiglu else 1))) * 0.5,
            "w_out": rng.standard_normal((experts, ff, width)) * 0.5}


def numpy_moe(x, router, w_in, w_out, k, expert_ffn):
    """The layer by its definition, one token at a time."""
    logits = x @ router
    experts = router.shape[1]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = np.zeros_like(x)
    counts = np.zeros(experts)
    for t in range(x.shape[0]):
        chosen = sorted(range(experts), key=lambda e: (-logits[t, e], e))[:k]
        gates = np.exp(logits[t, chosen] - logits[t, chosen].max())
        gates /= gates.sum()
        for gate, e in zip(gates, chosen):
            h = x[t] @ w_in[e]
            if expert_ffn == "gelu":
                h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
            else:
                gate_h, up = np.split(h, 2)
                h = gate_h / (1 + np.exp(-gate_h)) * up
            y[t] += gate * (h @ w_out[e])
            counts[e] += 1
    aux = experts * np.sum(counts / counts.sum() * probs.mean(0))
    return y, aux


@pytest.mark.parametrize("expert_ffn", ["gelu", "swiglu"])
def test_layer_and_aux_loss_equal_the_formula(expert_ffn):
    rng = np.random.default_rng(5)
    inputs = layer_inputs(rng, swiglu=expert_ffn == "swiglu")
    g = Graph()
    t = {n: g.input(n, v.shape, "f64") for n, v in inputs.items()}
    y, aux = moe_layer(g, t, 2, expert_ffn)
    g.output("y", y)
    g.output("aux", aux)
    out = run_graph(g, inputs, np.float64)["outputs"]
    ref_y, ref_aux = numpy_moe(*inputs.values(), 2, expert_ffn)
    np.testing.assert_allclose(out["y"], ref_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["aux"], ref_aux, rtol=1e-12)


@pytest.mark.parametrize("expert_ffn,k", [("gelu", 2), ("swiglu", 2), ("gelu", 1), ("gelu", 3)])
def test_layer_vjp_matches_finite_differences(expert_ffn, k):
    """d/d(x, router, experts) of sum(y * R) + 0.7 aux, in float64 (the routing does
    not change within the finite-difference step)."""
    inputs = layer_inputs(np.random.default_rng(11 + k), swiglu=expert_ffn == "swiglu")

    def build(g, t):
        y, aux = moe_layer(g, t, k, expert_ffn)
        return y + (aux * 0.7).reshape(1, 1).broadcast_to(y.shape) * (1.0 / y.type.size)

    case = Case(f"moe-{expert_ffn}-{k}", build, {n: (v, "f64") for n, v in inputs.items()})
    forward, _, _ = make_graph(case, with_grads=False)
    graph, _, grads = make_graph(case, with_grads=True)
    feeds = {**{n: v.copy() for n, v in case.inputs.items()}, "R": projection(case)}
    result = run_graph(graph, feeds, np.float64)["outputs"]
    for name in inputs:
        numeric = numeric_gradient(forward, feeds, name)
        error = np.linalg.norm(result[f"grad.{name}"] - numeric) / np.linalg.norm(numeric)
        assert error < 1e-6, f"d/d{name}: relative error {error:.3g}"


# ----- the model against PyTorch ---------------------------------------------------------
def model_params(spec: gptc.Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 values (exact in float64 and in the twin, which loads float32), with
    random gains and biases."""
    graph = gptc.build_graph(spec, "infer", batch=1)
    rng = np.random.default_rng(seed + 1)
    values = {}
    for name, v in gptc.init_params(graph, seed).items():
        if graph.node(graph.params[name])["attrs"]["init"] != "normal":
            v = v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
        values[name] = v.astype(np.float32)
    return values


def model_batch(spec: gptc.Spec, seed: int = 0):
    rng = np.random.default_rng(100 + seed)
    shape = (spec.train.batch_size, spec.model.seq_len)
    return (rng.integers(0, spec.model.vocab_size, shape).astype(np.int32),
            rng.integers(0, spec.model.vocab_size, shape).astype(np.int32))


@pytest.mark.parametrize("expert_ffn,k", [("gelu", 2), ("swiglu", 2), ("gelu", 1)])
def test_model_equals_the_torch_twin_in_float64(expert_ffn, k):
    torch = require_torch()
    from gptc.tools.bench.torch_twin import build_model, gptc_name
    spec = moe_spec(expert_ffn, moe_top_k=k)
    values = model_params(spec)
    tokens, targets = model_batch(spec)
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    feeds = {"tokens": tokens, "targets": targets, "lr": 1e-3, "step": 1.0, **values,
             **{n: np.zeros(graph.type(i).shape) for n, i in graph.states.items()}}
    out = run_graph(graph, feeds, np.float64)["outputs"]

    model = build_model(spec.model, values, device="cpu", dtype=torch.float64)
    objective = model.loss(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets.astype(np.int64)))
    objective.backward()
    aux = model.aux_loss().item()
    assert 1.0 <= aux < spec.model.n_experts  # E * sum f P >= 1 when P equals f; never E unless all on one
    assert rel_err(out["aux_loss"], aux) < 1e-9
    assert rel_err(out["loss"] + spec.model.moe_aux_weight * out["aux_loss"], objective.item()) < 1e-9
    checked = 0
    for name, p in model.named_parameters():
        key = f"grad.{gptc_name(name)}"
        assert key in out, f"gptc has no gradient for {name}"
        error = rel_err(out[key], p.grad.numpy())
        assert error < 1e-9, f"{name}: {error:.3g}"
        checked += 1
    assert checked == len(values)


def test_eval_graph_reports_loss_and_aux_loss_apart():
    spec = moe_spec()
    values = model_params(spec)
    tokens, targets = model_batch(spec)
    out = run_graph(gptc.build_graph(spec, "eval"), {"tokens": tokens, "targets": targets, **values},
                    np.float64)["outputs"]
    dense = replace(spec, model=replace(spec.model, ffn="gelu"))
    assert set(out) == {"loss", "aux_loss"}
    assert "aux_loss" not in gptc.build_graph(dense, "eval").outputs
    assert 0 < out["loss"] < 2 * math.log(spec.model.vocab_size) and out["aux_loss"] >= 1.0


# ----- the plan ----------------------------------------------------------------------------
@pytest.mark.parametrize("expert_ffn", ["gelu", "swiglu"])
def test_experts_run_on_their_tokens_only(expert_ffn):
    """The grouped launches do k/E of the FLOPs of every expert on every token, and no
    other matmul reads an expert's weights."""
    spec = moe_spec(expert_ffn)
    m = spec.model
    graph = gptc.build_graph(spec, "train")
    plan = make_plan(graph, True)
    costs = {c.name: c for c in plan_costs(plan)}
    grouped = [k for k in plan.kernels if k.family == "grouped_matmul"]
    # Per layer: 2 forward (c_fc, c_proj), and per weight one input and one weight gradient
    # (the first layer's input gradient of c_fc is needed too: it feeds the residual).
    assert len(grouped) == 6 * m.n_layers
    tokens = spec.train.batch_size * m.seq_len
    hidden = m.d_ff * (2 if expert_ffn == "swiglu" else 1)
    dense = 2 * tokens * m.n_experts * m.d_model * (hidden + m.d_ff)  # one layer's forward, every expert
    assert sum(costs[k.name].flops for k in grouped) == 3 * m.n_layers * dense * m.moe_top_k // m.n_experts
    experts = {graph.params[n] for n in graph.params if ".experts." in n}
    for kernel in plan.kernels:  # (AdamW, a pointwise kernel, reads them to update them)
        if kernel.family == "matmul":
            assert not experts & set(kernel.reads), f"{kernel.name} reads expert weights"
    assert {k.family for k in plan.kernels} >= {"group_sort", "grouped_matmul", "scatter"}


@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_moe_kernels_compile(target):
    from gptc.compiler.codegen.kernels import prelude, render_plan
    from gptc.runtime.device import compile_many
    from gptc.target import parse_target
    codes = set()
    for expert_ffn in ("gelu", "swiglu"):
        spec = moe_spec(expert_ffn)
        for mode in ("train", "infer", "decode"):
            graph = gptc.build_graph(spec, mode, batch=2)
            for fuse in (True, False):
                codes |= {k.code[len(prelude()):] for k in render_plan(make_plan(graph, fuse), parse_target(target))}
    source = prelude() + "".join(f"namespace k{j} {{\n{c}}}\n" for j, c in enumerate(sorted(codes)))
    assert len(compile_many([(source, "moe")], parse_target(target))[0]) > 0


# ----- sampling on the CPU -----------------------------------------------------------------



# ----- on a GPU --------------------------------------------------------------------------------
def dispatch_graph(rows: int, k_dim: int, n_dim: int, groups: int) -> Graph:
    """Sort rows by their ids, the grouped product, back to row order; and its
    gradients (the transposed grouped product and the per-group weight gradient)."""
    g = Graph()
    ids = g.input("ids", (rows,), "i32", bound=groups)
    x, w, r = g.input("x", (rows, k_dim)), g.param("w", (groups, k_dim, n_dim)), g.input("r", (rows, n_dim))
    rank, offsets = dsl.group_rank(ids, groups), dsl.group_offsets(ids, groups)
    y = dsl.grouped_matmul(x.scatter_add(rank, rows), w, offsets).gather(rank)
    g.output("rank", rank)
    g.output("offsets", offsets)
    g.output("y", y)
    dx, dw = gradients((y * r).sum(), [x, w])
    g.output("dx", dx)
    g.output("dw", dw)
    return g


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("layout", ["random", "empty-groups", "one-group", "single-row"])
def test_dispatch_kernels(device, rng, layout, fuse):
    from test_gpu_kernels import run_both
    rows, groups = (1, 5) if layout == "single-row" else (1037, 7)  # several 256-id chunks, partial tiles
    graph = dispatch_graph(rows, 45, 70, groups)
    ids = {"random": rng.integers(0, groups, rows), "empty-groups": rng.choice([1, 4, 6], rows),
           "one-group": np.full(rows, groups - 1), "single-row": np.array([3])}[layout]
    feeds = {"ids": ids.astype(np.int32), **{n: rng.standard_normal(graph.type(i).shape).astype(np.float32)
                                              for n, i in {**graph.inputs, **graph.params}.items() if n != "ids"}}
    out, _, ref = run_both(device, graph, feeds, fuse)
    np.testing.assert_array_equal(out["rank"], ref["outputs"]["rank"])
    np.testing.assert_array_equal(out["offsets"], ref["outputs"]["offsets"])
    for key in ("y", "dx", "dw"):
        assert rel_err(out[key], ref["outputs"][key]) < 1e-5, f"{key}: {rel_err(out[key], ref['outputs'][key]):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("expert_ffn", ["gelu", "swiglu"])
def test_moe_training_step(device, rng, expert_ffn, fuse):
    """A training step on the GPU against the float64 reference. Routing is decided by
    comparisons of float32 logits; the init (std 0.2) keeps the top-k choices far from
    ties, so both make the same choices."""
    from test_gpu_kernels import check_training_step
    check_training_step(device, rng, moe_spec(expert_ffn), fuse)
