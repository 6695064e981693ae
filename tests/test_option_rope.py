"""RoPE (model.pos = "rope"): dsl.rope against finite differences and against a
complex-number formulation, the whole model against the PyTorch twin in float64,
KV-cache decoding, and the attention prologue: the plan evaluates rope inside the flash
attention kernels (forward and backward) and never stores the rotated q and k; those
kernels compile for sm_90 (NVRTC) and gfx90a (hiprtc). The tests marked gpu run the
fused kernels against the NumPy reference (PYTHONPATH=. python3 -m pytest -m gpu)."""
from __future__ import annotations


import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.codegen.kernels import prelude, render_plan
from gptc.compiler.ir import Graph, Tensor
from gptc.compiler.planner import make_plan
from gptc.models import build_graph
from gptc.runtime.reference import run_graph
from gptc.target import parse_target

from conftest import parity_parameters, require_torch

from test_ops_grad import Case, make_graph, numeric_gradient, projection, TOLERANCE as FD_TOLERANCE


def rope_spec(fraction: float = 1.0, d_model: int = 96, n_heads: int = 3, seq_len: int = 37, batch: int = 5,
              **model) -> gptc.Spec:
    """The awkward model of the GPU and parity tests with RoPE."""
    m = gptc.ModelSpec(vocab_size=1003, seq_len=seq_len, d_model=d_model, n_layers=2, n_heads=n_heads, d_ff=200,
                       pos="rope", rope_fraction=fraction, init_std=0.05, **model)
    return gptc.Spec(m, gptc.TrainSpec(batch_size=batch, grad_clip=1.0))


# ----- dsl.rope on the reference ---------------------------------------------------------
@pytest.mark.parametrize("width,dims,base", [(8, 8, 10000.0), (10, 6, 500.0)], ids=["full", "partial"])
def test_rope_vjp_matches_finite_differences(width, dims, base):
    rng = np.random.default_rng(3)
    case = Case(f"rope-{width}-{dims}", lambda g, t: dsl.rope(t["x"], t["pos"], dims, base),
                {"x": rng.standard_normal((2, 3, 5, width)), "pos": np.array([0, 3, 1, 17, 4], np.int32)})
    forward, _, _ = make_graph(case, with_grads=False)
    graph, _, grads = make_graph(case, with_grads=True)
    feeds = {name: a.copy() for name, a in case.inputs.items()}
    feeds["R"] = projection(case)
    analytic = run_graph(graph, feeds, np.float64)["outputs"]["grad.x"]
    numeric = numeric_gradient(forward, feeds, "x")
    assert grads["pos"] is None
    assert np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric) < FD_TOLERANCE


@pytest.mark.parametrize("width,dims,base", [(16, 16, 10000.0), (16, 8, 10000.0), (12, 6, 77.0)])
def test_rope_is_a_complex_rotation(width, dims, base):
    """Pair (i, i + dims/2) as the complex number x_i + j x_{i+dims/2}, rotated by
    e^{j p base^(-2i/dims)} at position p; the dimensions past `dims` pass unchanged."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 7, width))
    pos = np.array([0, 1, 2, 5, 11, 40, 1000], np.int32)
    g = Graph()
    g.output("y", dsl.rope(g.input("x", x.shape), g.input("pos", pos.shape, "i32"), dims, base))
    got = run_graph(g, {"x": x, "pos": pos}, np.float64)["outputs"]["y"]
    half = dims // 2
    z = (x[..., :half] + 1j * x[..., half:dims]) * np.exp(1j * pos[:, None] * base ** (-2.0 * np.arange(half) / dims))
    want = np.concatenate([z.real, z.imag, x[..., dims:]], axis=-1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # float32, as the kernels compute it: angles float32(p) * exp(i * (-2 ln(base) / dims))
    got32 = run_graph(g, {"x": x.astype(np.float32), "pos": pos}, np.float32)["outputs"]["y"]
    assert np.max(np.abs(got32 - want)) < 1e-4


# ----- the model against PyTorch, in float64 -----------------------------------------------
FRACTIONS = [1.0, 0.5, 0.4]   # head_dim 32: 32, 16 and 12 rotated dimensions


def _parity_inputs(spec: gptc.Spec, seed: int):
    values = parity_parameters(spec, seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, spec.model.vocab_size, (spec.train.batch_size, spec.model.seq_len)).astype(np.int32)
    targets = rng.integers(0, spec.model.vocab_size, tokens.shape).astype(np.int32)
    return values, tokens, targets


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_rope_model_matches_pytorch_in_float64(fraction):
    torch = require_torch()
    from gptc.tools.bench.torch_twin import build_model
    spec = rope_spec(fraction)
    assert spec.model.rope_dims == {1.0: 32, 0.5: 16, 0.4: 12}[fraction]
    values, tokens, targets = _parity_inputs(spec, 1)
    model = build_model(spec.model, values, device="cpu", dtype=torch.float64)
    tok = torch.from_numpy(tokens.astype(np.int64))
    loss = model.loss(tok, torch.from_numpy(targets.astype(np.int64)))
    loss.backward()
    with torch.no_grad():
        ref_logits = model(tok).numpy()

    logits = run_graph(build_graph(spec, "infer"), {"tokens": tokens, **values}, np.float64)["outputs"]["logits"]
    assert _rel(logits, ref_logits) < 1e-9
    graph = build_graph(spec, "eval")
    names = sorted(graph.params)
    for n, grad in zip(names, gradients(Tensor(graph, graph.outputs["loss"]), [Tensor(graph, graph.params[n]) for n in names])):
        graph.output(f"grad.{n}", grad)
    out = run_graph(graph, {"tokens": tokens, "targets": targets, **values}, np.float64)["outputs"]
    assert abs(out["loss"] - loss.item()) < 1e-9 * abs(loss.item())
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    assert sorted(torch_grads) == names
    for n in names:
        assert _rel(out[f"grad.{n}"], torch_grads[n]) < 1e-9, n


def test_rope_model_has_no_position_table():
    graph = build_graph(rope_spec(), "infer")
    assert "wpe" not in graph.params


# ----- KV-cache decoding -----------------------------------------------------------------------



# ----- the plan: rope inside the flash kernels --------------------------------------------------
def _rope_nodes(graph: Graph) -> set[int]:
    """The compute nodes of the forward dsl.rope calls."""
    from gptc.compiler.planner.fusion import is_free
    free: dict[int, bool] = {}
    return {n for n in graph.nx.nodes if graph.node(n)["scope"].endswith("/rope") and not is_free(graph, n, free)}


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_is_fused_into_the_flash_attention_kernels(fraction):
    spec = rope_spec(fraction)
    plan = make_plan(build_graph(spec, "train"), True)
    g = plan.graph
    families = [k.family for k in plan.kernels]
    assert families.count("attention") == families.count("attention_bwd") == spec.model.n_layers
    rope = _rope_nodes(g)
    assert rope
    owner = {n: k for k in plan.kernels for n in k.nodes}
    assert {owner[n].family for n in rope} == {"attention"}   # no pointwise pass rotates q or k
    assert not rope & set(plan.buffers)                       # and no buffer holds them
    assert not any(n in k.roots for k in plan.kernels for n in rope)
    for k in plan.kernels:
        if k.family.startswith("attention"):
            # the prologue reads the QKV projection (q, k and v are views of it) and
            # nothing else: no buffer of (B, H, S, head_dim) rotated values
            qkv = {b for b in k.reads if g.type(b).shape[-1] == 3 * spec.model.d_model}
            assert len(qkv) == 1 and k.attention.prologue
            assert not k.attention.prologue & set(k.reads)


def test_prefill_fuses_the_query_rotation():
    """Prefill stores the rotated keys into the KV cache, so only q's rope joins the
    attention kernel (k's is computed once, by the kernel that writes the cache)."""
    plan = make_plan(build_graph(rope_spec(0.5), "prefill", batch=2), True)
    attention = [k for k in plan.kernels if k.family == "attention"]
    assert len(attention) == 2
    for k in attention:
        q_rope, k_rope = (plan.graph.view_base(o) for o in (k.attention.q, k.attention.k_t))
        assert q_rope in k.attention.prologue and q_rope not in plan.buffers
        assert k_rope not in k.attention.prologue and k_rope in k.reads


def test_plain_attention_operands_render_as_before():
    """Without a prologue, q and k are plain loads (no lambda)."""
    plan = make_plan(build_graph(gptc.preset("tiny"), "train"), True)
    sources = [k.source for k in render_plan(plan, parse_target("cuda:sm_90")) if k.family.startswith("attention")]
    assert sources and not any("q_at" in s or "k_at" in s for s in sources)


def test_rope_attention_source_names_the_rope_nodes():
    plan = make_plan(build_graph(rope_spec(0.5), "train"), True)
    for k in render_plan(plan, parse_target("cuda:sm_90")):
        if k.family.startswith("attention"):
            body = k.source[k.source.index(prelude()) + len(prelude()):]
            assert "auto q_at = [&](const idx_t i, const int c)" in body
            assert "auto k_at = [&](const idx_t j, const int c)" in body
            assert "cosf(" in body and "sinf(" in body and "rope" in body


def _rope_codes(target: str) -> list[str]:
    """The attention kernels of rope models with head_dim 32, 64 and 128, rotating all or
    half of the dimensions, and every other kernel of one of them (the pointwise kernel
    that rotates the gradients back), with its prefill and decode kernels (rotation at
    the position fed)."""
    codes = []
    for head_dim in (32, 64, 128):
        for fraction in (1.0, 0.5):
            spec = rope_spec(fraction, d_model=2 * head_dim, n_heads=2, seq_len=45, batch=2)
            plan = make_plan(build_graph(spec, "train"), True)
            kernels = render_plan(plan, parse_target(target))
            attention = [k for k in kernels if k.family.startswith("attention")]
            assert sorted({k.family for k in attention}) == ["attention", "attention_bwd"]
            if (head_dim, fraction) != (64, 0.5):
                kernels = attention
            else:
                for mode in ("prefill", "decode"):
                    kernels += render_plan(make_plan(build_graph(spec, mode, batch=1), True), parse_target(target))
            codes += [k.code[len(prelude()):] for k in kernels]
    return sorted(set(codes))


@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_rope_kernels_compile(target):
    from gptc.runtime.device import compile_many
    codes = _rope_codes(target)
    assert sum("auto q_at = [&]" in c for c in codes) == 13   # 6 forward, 6 backward, prefill's forward
    batches = [codes[i:i + 16] for i in range(0, len(codes), 16)]   # one translation unit each
    sources = [(prelude() + "".join(f"namespace rope_{j} {{\n{code}}}\n" for j, code in enumerate(batch)),
                f"rope_batch{i}") for i, batch in enumerate(batches)]
    assert all(len(o) > 0 for o in compile_many(sources, parse_target(target)))


# ----- on the GPU ---------------------------------------------------------------------------------
GPU_SPECS = {
    "rope_full": rope_spec(1.0),                                         # head_dim 32, all rotated
    "rope_half": rope_spec(0.5),                                         # 16 of 32 rotated
    "rope_d64_frac0.75": rope_spec(0.75, d_model=128, n_heads=2),        # 48 of 64
    "rope_d128_half": rope_spec(0.5, d_model=256, n_heads=2, seq_len=45, batch=3, rope_base=500.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("spec_name", list(GPU_SPECS))
def test_rope_training_step(device, rng, spec_name, fuse):
    """Loss, every gradient and every update of a training step against the reference."""
    from test_gpu_kernels import check_training_step
    spec = GPU_SPECS[spec_name]
    if fuse:
        plan = make_plan(build_graph(spec, "train", expose_gradients=True), True)
        assert {"attention", "attention_bwd"} <= {k.family for k in plan.kernels}
    check_training_step(device, rng, spec, fuse)


@pytest.mark.gpu
@pytest.mark.parametrize("seq,dim,dims", [(517, 64, 32), (301, 128, 128), (37, 16, 16)])
def test_rope_attention_kernels(device, rng, seq, dim, dims):
    """The flash kernels with the rope prologue, at long awkward sequences (positions up
    to 516: large angles), forward and the gradients of the unrotated q, k and v, with
    the outputs poisoned before the launch."""
    from conftest import rel_err
    from test_gpu_kernels import random_feeds, run_both
    g = Graph()
    q, k, v = (g.param(n, (2, 3, seq, dim)) for n in "qkv")
    positions = g.iota((seq,), 0)
    y = dsl.causal_attention(dsl.rope(q, positions, dims), dsl.rope(k, positions, dims), v)
    g.output("y", y)
    for name, grad in zip("qkv", gradients((y * g.input("r", y.shape)).sum(), [q, k, v])):
        g.output(f"d{name}", grad)
    plan = make_plan(g, True)
    assert {"attention", "attention_bwd"} <= {kern.family for kern in plan.kernels}
    assert all(kern.attention.prologue for kern in plan.kernels if kern.family.startswith("attention"))
    out, _, ref = run_both(device, g, random_feeds(g, rng), True)
    for key, value in ref["outputs"].items():
        assert rel_err(out[key], value) < 1e-4, f"{key}: {rel_err(out[key], value):.2e}"



def test_a_cast_of_an_index_expression_keeps_its_brackets():
    """Positions are i32 iota values cast to float: (float)(i / 6), not (float)i / 6 (a
    float division) nor (float)(i / 6) % 4 without brackets (which does not compile)."""
    g = Graph()
    x = g.input("x", (4, 6))
    g.output("y", g.iota((4, 6), 0).cast("f32") * x + g.iota((4, 6), 1).cast("f32"))
    (kernel,) = render_plan(make_plan(g, True), parse_target("cuda:sm_90"))
    assert "(float)(i / 6)" in kernel.source and "(float)(i % 6)" in kernel.source


def test_the_inverse_rotation_of_the_gradients_is_one_pass():
    """rope's VJP (dq, dk rotated back) reads the attention gradients through pads (a pad
    reads each element once), so it fuses with the assembly of the QKV projection's
    gradient: one pointwise kernel a layer, storing only that gradient."""
    spec = rope_spec(0.5)
    plan = make_plan(build_graph(spec, "train"), True)
    g = plan.graph
    inverse = [k for k in plan.kernels if any(g.node(n)["scope"].endswith("/rope#bwd") for n in k.nodes)]
    assert len(inverse) == spec.model.n_layers
    for k in inverse:
        assert k.family == "pointwise"
        assert [g.type(r).shape for r in k.roots] == [(spec.train.batch_size, spec.model.seq_len, 3 * spec.model.d_model)]
