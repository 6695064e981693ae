"""Causal linear attention (model.attention = "linear"): dsl.linear_attention, its
recurrent state for sampling, and the GPT that uses them.

The chunked composite against an independent O(S²) NumPy formulation at several
sequence lengths and chunk sizes (chunk boundaries and padding hit), its VJPs against
float64 finite differences, causality, the whole model against the PyTorch twin in
float64 at 1e-9, prefill/decode state generation equal to full recomputation (also
with grouped key/value heads), 300 CPU training steps on the bundled corpus, and every
kernel of the linear spec's bundle compiled for sm_90 and gfx90a. The tests marked
gpu run the generated kernels against the reference."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Graph, Tensor
from gptc.models import build_graph, init_params
from gptc.runtime.reference import run_graph

from conftest import parity_parameters, require_torch

from test_ops_grad import Case, test_vjp_matches_finite_differences as check_vjp

RNG = np.random.default_rng(20261130)


def phi(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def naive(q: np.ndarray, k: np.ndarray, v: np.ndarray, eps: float = dsl.LINEAR_ATTENTION_EPS) -> np.ndarray:
    """The O(S²) definition, independent of the composite: q (..., H, S, d), k, v (..., G, S, d)."""
    reps = q.shape[-3] // k.shape[-3]
    k, v = (np.repeat(t, reps, axis=-3) for t in (k, v))
    seq = q.shape[-2]
    scores = phi(q) @ np.swapaxes(phi(k), -1, -2) * np.tril(np.ones((seq, seq)))
    return (scores @ v) / (scores.sum(-1, keepdims=True) + eps)


def composite_output(q: np.ndarray, k: np.ndarray, v: np.ndarray, chunk: int) -> np.ndarray:
    g = Graph()
    t = {n: g.input(n, a.shape) for n, a in (("q", q), ("k", k), ("v", v))}
    g.output("y", dsl.linear_attention(t["q"], t["k"], t["v"], chunk=chunk))
    return run_graph(g, {"q": q, "k": k, "v": v}, np.float64)["outputs"]["y"]


def linear_spec(base: gptc.Spec, **model) -> gptc.Spec:
    return replace(base, model=replace(base.model, attention="linear", **model))


# ----- the composite -----------------------------------------------------------------
@pytest.mark.parametrize("seq,chunk", [(1, 4), (4, 4), (5, 4), (9, 4), (13, 3), (37, 8), (37, 64), (130, 64)])
@pytest.mark.parametrize("groups", [3, 1], ids=["mha", "mqa"])
def test_chunked_equals_the_quadratic_form(seq, chunk, groups):
    q = RNG.standard_normal((2, 3, seq, 5)) * 2
    k, v = (RNG.standard_normal((2, groups, seq, 5)) * 2 for _ in range(2))
    y = composite_output(q, k, v, chunk)
    want = naive(q, k, v)
    assert np.max(np.abs(y - want)) < 1e-12 * np.max(np.abs(want))


def test_elu_plus_one_neither_overflows_nor_gives_nan():
    x = np.array([-1e4, -50.0, -1.0, 0.0, 0.5, 50.0, 1e4])
    g = Graph()
    t = g.input("x", x.shape)
    y = dsl.elu_plus_one(t)
    g.output("y", y)
    g.output("dx", gradients(y.sum(), [t])[0])
    for dtype in (np.float32, np.float64):
        out = run_graph(g, {"x": x}, dtype)["outputs"]
        np.testing.assert_allclose(out["y"], phi(x), rtol=1e-6)
        np.testing.assert_allclose(out["dx"], np.where(x > 0, 1.0, np.exp(np.minimum(x, 0))), rtol=1e-6)


LINEAR_CASES = [
    # several chunks, the last one partial (7 = 3 + 3 + 1)
    Case("linear-attention-chunks", lambda g, t: dsl.linear_attention(t["q"], t["k"], t["v"], chunk=3),
         {"q": RNG.standard_normal((2, 2, 7, 3)), "k": RNG.standard_normal((2, 2, 7, 3)),
          "v": RNG.standard_normal((2, 2, 7, 3))}),
    # one chunk (the sequence is shorter than it), two query heads per key/value head
    Case("linear-attention-grouped", lambda g, t: dsl.linear_attention(t["q"], t["k"], t["v"]),
         {"q": RNG.standard_normal((1, 4, 5, 3)), "k": RNG.standard_normal((1, 2, 5, 3)),
          "v": RNG.standard_normal((1, 2, 5, 3))}),
    # the sampling path: a masked state, one more step, read by grouped queries
    Case("linear-attention-state-read",
         lambda g, t: dsl.linear_attention_read(
             t["q"], dsl.linear_attention_state(t["k"], t["v"], g.iota((1, 2, 4, 1), 2) < 3)
             + dsl.linear_attention_state(t["k1"], t["v1"])),
         {"q": RNG.standard_normal((1, 4, 1, 3)), "k": RNG.standard_normal((1, 2, 4, 3)),
          "v": RNG.standard_normal((1, 2, 4, 3)), "k1": RNG.standard_normal((1, 2, 1, 3)),
          "v1": RNG.standard_normal((1, 2, 1, 3))}),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.id for c in LINEAR_CASES])
def test_vjp_matches_finite_differences(case):
    check_vjp(case)


def test_state_and_read_equal_the_sequence_form():
    """The state after positions < t, plus position t, read by q_t: output t."""
    seq = 6
    q, k, v = (RNG.standard_normal((2, 3, seq, 4)) for _ in range(3))
    want = naive(q, k, v)
    g = Graph()
    t = {n: g.input(n, (2, 3, seq, 4)) for n in "qkv"}
    for pos in range(seq):
        keep = g.iota((2, 3, seq, 1), 2) < pos
        state = dsl.linear_attention_state(t["k"], t["v"], keep)
        new = dsl.linear_attention_state(t["k"].slice(2, pos, pos + 1), t["v"].slice(2, pos, pos + 1))
        g.output(f"y{pos}", dsl.linear_attention_read(t["q"].slice(2, pos, pos + 1), state + new))
    out = run_graph(g, {"q": q, "k": k, "v": v}, np.float64)["outputs"]
    for pos in range(seq):
        np.testing.assert_allclose(out[f"y{pos}"], want[:, :, pos:pos + 1], rtol=1e-12)


def test_a_future_token_changes_no_earlier_output():
    spec = linear_spec(gptc.preset("tiny"), seq_len=70)  # two chunks of the 64 default
    graph = build_graph(spec, "infer", batch=1)
    params = init_params(graph, 3)
    params = {k: v * (8.0 if v.ndim == 2 else 1.0) for k, v in params.items()}
    tokens = RNG.integers(0, spec.model.vocab_size, (1, 70)).astype(np.int32)
    base = run_graph(graph, {"tokens": tokens, **params}, np.float64)["outputs"]["logits"]
    for t in (0, 30, 63, 64, 69):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % spec.model.vocab_size
        out = run_graph(graph, {"tokens": changed, **params}, np.float64)["outputs"]["logits"]
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert np.max(np.abs(out[0, t:] - base[0, t:]), axis=-1).min() > 0  # every later position sees it


# ----- the model against PyTorch in float64 ---------------------------------------------
# 70 positions: a full chunk of 64 and a partial one; head_dim 8; biases randomised.
PARITY = linear_spec(gptc.Spec(gptc.ModelSpec(vocab_size=97, seq_len=70, d_model=24, n_layers=2, n_heads=3, d_ff=40,
                                              init_std=0.2), gptc.TrainSpec(batch_size=2)))


def rel_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_model_matches_the_torch_twin_in_float64():
    torch = require_torch()
    from gptc.tools.bench.torch_twin import build_model, gptc_name
    spec = PARITY
    values = parity_parameters(spec)
    tokens = RNG.integers(0, spec.model.vocab_size, (2, 70)).astype(np.int32)
    targets = RNG.integers(0, spec.model.vocab_size, (2, 70)).astype(np.int32)
    model = build_model(spec.model, values, device="cpu", dtype=torch.float64)
    tok, tgt = (torch.from_numpy(a.astype(np.int64)) for a in (tokens, targets))
    loss = model.loss(tok, tgt)
    loss.backward()
    with torch.no_grad():
        ref_logits = model(tok).numpy()
    feeds = {"tokens": tokens, "targets": targets, **{n: v.astype(np.float64) for n, v in values.items()}}

    logits = run_graph(build_graph(spec, "infer", batch=2), feeds, np.float64)["outputs"]["logits"]
    assert rel_error(logits, ref_logits) < 1e-9
    graph = build_graph(spec, "eval", batch=2)
    names = sorted(graph.params)
    grads = gradients(Tensor(graph, graph.outputs["loss"]), [Tensor(graph, graph.params[n]) for n in names])
    for n, g in zip(names, grads):
        graph.output(f"grad.{n}", g)
    out = run_graph(graph, feeds, np.float64)["outputs"]
    assert rel_error(out["loss"], loss.item()) < 1e-9
    torch_grads = {gptc_name(n): p.grad.numpy() for n, p in model.named_parameters()}
    assert sorted(torch_grads) == names
    for n in names:
        assert rel_error(out[f"grad.{n}"], torch_grads[n]) < 1e-9, n


# ----- sampling: prefill and decode of the state -----------------------------------------
@pytest.fixture(scope="module", params=[0, 1], ids=["mha", "mqa"])
def linear_tiny(request):
    spec = linear_spec(gptc.preset("tiny"), n_kv_heads=request.param)
    params = init_params(build_graph(spec, "infer", 1), 7)
    # Larger weights than the init, so greedy decoding does not settle into a loop at once.
    return spec, {k: v * (8.0 if v.ndim == 2 else 1.0) for k, v in params.items()}


def test_decoding_keeps_a_state_not_a_cache(linear_tiny):
    """Decoding reads and writes one d x (d + 1) state per layer and KV head: O(1) per
    token (test_generate checks that it generates what recomputation does)."""
    spec, _ = linear_tiny
    decode = build_graph(spec, "decode", 1)
    assert set(decode.states) == {f"kv_state.{layer}" for layer in range(spec.model.n_layers)}
    d = spec.model.head_dim
    assert all(decode.type(n).shape == (1, spec.model.kv_heads, d, d + 1) for n in decode.states.values())


def test_prefill_state_leaves_out_the_padding(linear_tiny):
    """Two prompts of different lengths in one padded batch: each sequence's logits and
    state are those of its prompt alone, whatever fills the padding."""
    spec, params = linear_tiny
    s = spec.model.seq_len
    lengths = [3, 11]
    prompts = [RNG.integers(0, 256, n) for n in lengths]

    def prefill(tokens: np.ndarray, last: list[int]) -> dict:
        graph = build_graph(spec, "prefill", len(last))
        stale = {n: np.full(graph.type(i).shape, np.nan) for n, i in graph.states.items()}  # overwritten, not read
        result = run_graph(graph, {"tokens": tokens, "last": np.array(last, np.int32), **params, **stale}, np.float64)
        return {"logits": result["outputs"]["logits"], **result["updates"]}

    singles = []
    for prompt in prompts:
        padded = np.zeros((1, s), np.int32)
        padded[0, :len(prompt)] = prompt
        singles.append(prefill(padded, [len(prompt) - 1]))
    noisy = RNG.integers(0, 256, (2, s)).astype(np.int32)
    for b, prompt in enumerate(prompts):
        noisy[b, :len(prompt)] = prompt
    both = prefill(noisy, [b * s + n - 1 for b, n in enumerate(lengths)])
    for b in range(2):
        for name, value in singles[b].items():
            np.testing.assert_allclose(both[name][b], value[0], rtol=1e-12, atol=1e-300, err_msg=name)


# ----- training on the CPU ---------------------------------------------------------------

# ----- kernels: run on a GPU by the integrator, compiled for both targets here ------------
def linear_attention_graph(seq: int, dim: int, groups: int) -> Graph:
    """Forward and gradients of linear attention at awkward sizes."""
    g = Graph()
    q = g.param("q", (2, 4, seq, dim))
    k, v = (g.param(n, (2, groups, seq, dim)) for n in "kv")
    y = dsl.linear_attention(q, k, v)
    g.output("y", y)
    for name, grad in zip("qkv", gradients((y * g.input("r", y.shape)).sum(), [q, k, v])):
        g.output(f"d{name}", grad)
    return g


KERNEL_SIZES = [(37, 16, 4), (203, 24, 2), (517, 64, 1)]  # (seq, head_dim, key/value heads of 4)


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("seq,dim,groups", KERNEL_SIZES)
def test_linear_attention_kernels_match_the_reference(device, rng, seq, dim, groups, fuse):
    from test_gpu_kernels import random_feeds, run_both
    from conftest import rel_err
    graph = linear_attention_graph(seq, dim, groups)
    out, _, ref = run_both(device, graph, random_feeds(graph, rng), fuse)
    for key, value in ref["outputs"].items():
        assert rel_err(out[key], value) < 1e-4, f"{key}: {rel_err(out[key], value):.2e}"


GPU_SPECS = {
    # awkward sizes, two chunks (64 + 9), one chunk of 37 with grouped key/value heads
    "linear-awkward": linear_spec(gptc.Spec(gptc.ModelSpec(vocab_size=1003, seq_len=73, d_model=96, n_layers=2,
                                                           n_heads=3, d_ff=200), gptc.TrainSpec(batch_size=3, grad_clip=1.0))),
    "linear-gqa": linear_spec(gptc.Spec(gptc.ModelSpec(vocab_size=517, seq_len=37, d_model=128, n_layers=2, n_heads=4,
                                                       n_kv_heads=2, d_ff=300), gptc.TrainSpec(batch_size=5))),
}


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("spec_name", list(GPU_SPECS))
def test_linear_training_step(device, rng, spec_name, fuse):
    from test_gpu_kernels import check_training_step
    check_training_step(device, rng, GPU_SPECS[spec_name], fuse)




@pytest.mark.parametrize("target", ["hip:gfx90a", "cuda:sm_90"])
def test_every_linear_kernel_compiles(target):
    """Every kernel of the train, eval, prefill and decode steps (fused and unfused
    plans) of a linear spec with two chunks and grouped key/value heads, and of the
    fused plans of the GPU tests' graphs (GPU_SPECS, KERNEL_SIZES; their unfused plans
    are the same per-op kernels at other sizes, ~900 more to compile)."""
    from gptc.compiler.codegen.kernels import prelude, render_plan
    from gptc.compiler.planner import make_plan
    from gptc.runtime.bundle import render_bundle
    from gptc.runtime.device import compile_many
    from gptc.target import parse_target
    arch = parse_target(target)
    spec = linear_spec(gptc.preset("tiny"), seq_len=70, n_heads=4, n_kv_heads=2)
    graphs = [build_graph(s, "train") for s in GPU_SPECS.values()] + [linear_attention_graph(*n) for n in KERNEL_SIZES]
    kernels = []
    for fuse in (True, False):
        kernels += [k for step in render_bundle(spec, arch, "any", fuse, log=lambda line: None).kernels.values() for k in step]
    kernels += [k for g in graphs for k in render_plan(make_plan(g, True), arch)]
    distinct = sorted({k.code[len(prelude()):] for k in kernels})
    batches = [distinct[i:i + 16] for i in range(0, len(distinct), 16)]
    sources = [(prelude() + "".join(f"namespace batch_{j} {{\n{code}}}\n" for j, code in enumerate(batch)),
                f"linear_batch{i}") for i, batch in enumerate(batches)]
    objects = compile_many(sources, arch)
    assert len(objects) == len(batches) and all(len(o) > 0 for o in objects)
    # each kernel's source starts naming the graph nodes (and their scopes) it computes
    assert any("linear_attention" in k.source[:k.source.index(prelude())] for k in kernels)
