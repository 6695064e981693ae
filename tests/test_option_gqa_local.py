"""Grouped/multi-query attention (model.n_kv_heads) and local-window attention
(model.attention = "local"): the DSL composite against explicit NumPy, the whole model
against the PyTorch twin in float64, the flash matcher (which masks it accepts, that
K and V are never copied per query head), KV-cache decoding against recomputation,
the flash kernels compiled for sm_90 (NVRTC) and gfx90a (hiprtc); on a GPU (marked
gpu) the flash kernels and fused training steps against the reference."""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Graph, Tensor
from gptc.compiler.planner import make_plan
from gptc.models import build_graph, init_params
from gptc.runtime.reference import ReferenceExecutor, run_graph

from conftest import parity_parameters, require_torch

RNG = np.random.default_rng(20261130)


def numpy_attention(q, k, v, window: int = 0) -> np.ndarray:
    """The definition: query head h reads key/value head h // G; query i sees keys j
    with j <= i (and i - j < window)."""
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    seq = q.shape[-2]
    back = np.arange(seq)[:, None] - np.arange(seq)[None, :]
    visible = (back >= 0) & ((back < window) if window else True)
    scores = np.where(visible, q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def attention_graph(shape_q, kv_heads: int, window: int, grads: bool = False) -> Graph:
    *lead, heads, seq, dim = shape_q
    g = Graph()
    q = g.param("q", shape_q)
    k, v = (g.param(n, (*lead, kv_heads, seq, dim)) for n in "kv")
    y = dsl.causal_attention(q, k, v, window)
    g.output("y", y)
    if grads:
        for name, grad in zip("qkv", gradients((y * g.input("r", y.shape)).sum(), [q, k, v])):
            g.output(f"d{name}", grad)
    return g


# ----- the composite ---------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, 0), (4, 2, 0), (4, 1, 0), (6, 2, 3), (4, 4, 1), (4, 1, 4)])
def test_composite_equals_the_definition(heads, kv_heads, window):
    shape = (2, heads, 9, 5)
    g = attention_graph(shape, kv_heads, window)
    feeds = {"q": RNG.standard_normal(shape), "k": RNG.standard_normal((2, kv_heads, 9, 5)),
             "v": RNG.standard_normal((2, kv_heads, 9, 5))}
    out = run_graph(g, feeds, np.float64)["outputs"]["y"]
    np.testing.assert_allclose(out, numpy_attention(feeds["q"], feeds["k"], feeds["v"], window), rtol=1e-12, atol=1e-12)


def test_grouped_heads_are_views_not_copies():
    g = attention_graph((2, 4, 9, 8), 1, 0, grads=True)
    assert "copy" not in {g.op(n) for n in g.nx.nodes}
    broadcasts = [n for n in g.nx.nodes if g.op(n) == "broadcast" and g.type(n).shape == (2, 1, 4, 9, 8)]
    assert len(broadcasts) == 2  # k and v, stride 0 over the group


def test_a_window_as_long_as_the_sequence_is_causal():
    ops = lambda g: sorted(g.op(n) for n in g.nx.nodes)
    assert ops(attention_graph((1, 2, 9, 4), 2, 9)) == ops(attention_graph((1, 2, 9, 4), 2, 0))
    assert "logical_and" in ops(attention_graph((1, 2, 9, 4), 2, 8))


def test_query_heads_must_be_a_multiple_of_kv_heads():
    g = Graph()
    with pytest.raises(ValueError, match="do not fit"):
        dsl.causal_attention(g.param("q", (1, 3, 5, 4)), g.param("k", (1, 2, 5, 4)), g.param("v", (1, 2, 5, 4)))


# ----- the flash matcher --------------------------------------------------------------------
def matches(g: Graph):
    """The attention the planner matched (on its copy of the graph)."""
    return [k.attention for k in make_plan(g, True).kernels if k.family == "attention"]


@pytest.mark.parametrize("window,expected", [(0, 0), (1, 1), (3, 3), (8, 8), (9, 0), (30, 0)])
def test_matcher_reads_the_window(window, expected):
    found = matches(attention_graph((2, 4, 9, 8), 2, window, grads=True))
    assert len(found) == 1 and found[0].window == expected and found[0].backward


@pytest.mark.parametrize("shape_q,kv_heads", [((2, 4, 9, 8), 2), ((2, 4, 9, 8), 1), ((4, 9, 8), 1), ((3, 2, 4, 9, 8), 2)])
def test_matcher_sums_dk_dv_over_the_group_in_the_kernel(shape_q, kv_heads):
    (found,) = matches(attention_graph(shape_q, kv_heads, 0, grads=True))
    assert found.group == shape_q[-3] // kv_heads and found.dk_sum is not None and found.dv_sum is not None


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """causal_attention's decomposition, in its scope, with another mask."""
    g = q.graph
    with g.scope("causal_attention"):
        seq = q.shape[-2]
        scores = (q @ k.T) * (1.0 / math.sqrt(q.shape[-1]))
        row, col = g.iota((seq, seq), 0), g.iota((seq, seq), 1)
        return dsl.softmax(mask(row, col).where(scores, -math.inf)) @ v


MASKS = {
    "causal": lambda r, c: r >= c,  # the control: matched
    "anti-causal": lambda r, c: c >= r,
    "strict": lambda r, c: r >= c + 1,
    "window-backwards": lambda r, c: (r >= c).logical_and(c - r < 3),
    "window-only": lambda r, c: r - c < 3,
    "window-or": lambda r, c: (r >= c).logical_and((r - c < 3).logical_and(r >= 0)),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_a_mask_the_kernels_do_not_implement_is_not_matched(name):
    g = Graph()
    q, k, v = (g.param(n, (2, 3, 9, 8)) for n in "qkv")
    y = _masked_attention(q, k, v, MASKS[name])
    g.output("y", y)
    for n, grad in zip("qkv", gradients((y * g.input("r", y.shape)).sum(), [q, k, v])):
        g.output(f"d{n}", grad)
    families = {kernel.family for kernel in make_plan(g, True).kernels}
    if name == "causal":
        assert len(matches(g)) == 1 and {"attention", "attention_bwd"} <= families
    else:
        assert matches(g) == [] and not families & {"attention", "attention_bwd"}


GQA = gptc.Spec(gptc.ModelSpec(vocab_size=101, seq_len=13, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
                gptc.TrainSpec(batch_size=3))


@pytest.mark.parametrize("kv_heads,attention", [(2, "causal"), (1, "causal"), (1, "local")])
def test_no_launch_copies_keys_or_values_per_query_head(kv_heads, attention):
    """The flash kernels read q, K and V through views of the fused QKV projection's
    buffer, and no other kernel reads it: K and V never reach memory per query head;
    the backward stores dK and dV per key/value head (summed over the group in-kernel)."""
    spec = replace(GQA, model=replace(GQA.model, n_kv_heads=kv_heads, attention=attention, window=4))
    m = spec.model
    plan = make_plan(build_graph(spec, "train"), True)
    g = plan.graph
    found = [k.attention for k in plan.kernels if k.family == "attention"]
    assert len(found) == m.n_layers and all(a.window == (4 if attention == "local" else 0) for a in found)
    assert {k.family for k in plan.kernels} >= {"attention", "attention_bwd"}
    qkv_size = spec.train.batch_size * m.seq_len * (m.n_heads + 2 * kv_heads) * m.head_dim
    for a in found:
        bases = set()
        for operand in (a.q, a.k_t, a.v):
            while g.op(operand) in ("reshape", "permute", "broadcast", "slice"):
                operand = g.inputs_of(operand)[0]
            bases.add(operand)
        (qkv,) = bases
        assert g.type(qkv).size == qkv_size, "attention reads a copy, not the QKV projection"
        readers = {k.family for k in plan.kernels if qkv in k.reads}
        assert readers == {"attention", "attention_bwd"}, f"{g.describe(qkv)} is read by {readers}"
        # dK and dV are summed over the group in the backward kernel, not by reduces after it
        assert a.group == m.n_heads // kv_heads
        if a.group > 1:
            assert [g.type(n).shape[-4:] for n in a.stores()[1:]] == [(kv_heads, 1, m.seq_len, m.head_dim)] * 2
    assert "reduce" not in {k.family for k in plan.kernels if any("causal_attention" in g.node(n)["scope"] for n in k.nodes)}


# ----- the whole model against the PyTorch twin ------------------------------------------
PARITY = {
    "gqa2": dict(n_kv_heads=2), "mqa": dict(n_kv_heads=1),
    "local1": dict(attention="local", window=1), "local3": dict(attention="local", window=3),
    "local3-mqa": dict(attention="local", window=3, n_kv_heads=1),
    "local13": dict(attention="local", window=13), "local40": dict(attention="local", window=40),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_model_matches_the_torch_twin_in_float64(name):
    torch = require_torch()
    from gptc.tools.bench.torch_twin import build_model, gptc_name
    spec = replace(GQA, model=replace(GQA.model, **PARITY[name]))
    values = parity_parameters(spec)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, spec.model.vocab_size, (3, spec.model.seq_len)).astype(np.int32)
    targets = rng.integers(0, spec.model.vocab_size, (3, spec.model.seq_len)).astype(np.int32)
    model = build_model(spec.model, values, device="cpu", dtype=torch.float64)
    with torch.no_grad():  # build_model loads float32 values: load the float64 ones
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(values[gptc_name(n)]))
    tok, tgt = (torch.from_numpy(t.astype(np.int64)) for t in (tokens, targets))
    loss = model.loss(tok, tgt)
    loss.backward()

    def close(actual, expected, what):
        err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
        assert err < 1e-9, f"{name} {what}: relative error {err:.3g}"

    logits = run_graph(build_graph(spec, "infer"), {"tokens": tokens, **values}, np.float64)["outputs"]["logits"]
    close(logits, model(tok).detach().numpy(), "logits")
    graph = build_graph(spec, "eval")
    names = sorted(graph.params)
    for n, grad in zip(names, gradients(Tensor(graph, graph.outputs["loss"]), [Tensor(graph, graph.params[n]) for n in names])):
        graph.output(f"grad.{n}", grad)
    out = run_graph(graph, {"tokens": tokens, "targets": targets, **values}, np.float64)["outputs"]
    close(out["loss"], loss.item(), "loss")
    for n, p in model.named_parameters():
        close(out[f"grad.{gptc_name(n)}"], p.grad.numpy(), f"d loss / d {n}")


def test_a_window_of_the_context_or_more_equals_causal():
    causal = parity_parameters(GQA)
    tokens = np.random.default_rng(6).integers(0, 101, (2, 13)).astype(np.int32)
    run = lambda s: run_graph(build_graph(s, "infer", batch=2), {"tokens": tokens, **causal}, np.float64)["outputs"]["logits"]
    want = run(GQA)
    for window in (13, 50):
        assert np.array_equal(run(replace(GQA, model=replace(GQA.model, attention="local", window=window))), want)
    assert not np.allclose(run(replace(GQA, model=replace(GQA.model, attention="local", window=12))), want)


# ----- sampling: the KV cache ------------------------------------------------------------------
DECODE = {"gqa2": dict(n_heads=4, n_kv_heads=2), "mqa": dict(n_heads=4, n_kv_heads=1),
          "local3": dict(attention="local", window=3), "local5-gqa": dict(n_heads=4, n_kv_heads=2, attention="local", window=5)}


def decode_spec(name: str) -> gptc.Spec:
    spec = gptc.preset("tiny")
    return replace(spec, model=replace(spec.model, **DECODE[name]))


@pytest.mark.parametrize("name", list(DECODE))
def test_decode_steps_equal_the_full_sequence_in_float64(name):
    """Prefill 4 tokens, decode 6 more one at a time: each step's logits equal the
    full sequence's at that position; the cache has kv_heads heads."""
    spec = decode_spec(name)
    m = spec.model
    params = {k: v.astype(np.float64) for k, v in init_params(build_graph(spec, "infer", 1), 4).items()}
    tokens = np.random.default_rng(7).integers(0, m.vocab_size, (1, m.seq_len)).astype(np.int32)
    full = run_graph(build_graph(spec, "infer", batch=1), {"tokens": tokens, **params}, np.float64)["outputs"]["logits"][0]
    prefill = ReferenceExecutor(build_graph(spec, "prefill", 1), params, np.float64)
    decode = ReferenceExecutor(build_graph(spec, "decode", 1), params, np.float64)
    assert all(decode.graph.type(i).shape == (1, m.kv_heads, m.seq_len, m.head_dim) for i in decode.graph.states.values())
    padded = np.zeros_like(tokens)
    padded[0, :4] = tokens[0, :4]
    logits = prefill.run({"tokens": padded, "last": np.array([3], np.int32)})["logits"]
    np.testing.assert_allclose(logits[0], full[3], rtol=1e-10, atol=1e-12)
    names = list(decode.graph.states)
    decode.write({n: prefill.persistent[n] for n in names})  # read() would round to float32
    for pos in range(4, 10):
        logits = decode.run({"tokens": tokens[:, pos:pos + 1], "pos": np.array([pos], np.int32)})["logits"]
        np.testing.assert_allclose(logits[0], full[pos], rtol=1e-10, atol=1e-12, err_msg=f"position {pos}")





# ----- compiling the flash kernels ---------------------------------------------------------------
@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_flash_kernels_with_groups_and_windows_compile(target):
    from gptc.compiler.codegen.kernels import prelude, render_plan
    from gptc.runtime.device import compile_many
    from gptc.target import parse_target
    codes = {}
    for dim, group, window in itertools.product((32, 64, 128), (1, 2, 4), (0, 7)):
        g = attention_graph((2, 4, 45, dim), 4 // group, window, grads=True)
        kernels = [k for k in render_plan(make_plan(g, True), parse_target(target)) if k.family.startswith("attention")]
        assert sorted(k.family for k in kernels) == ["attention", "attention_bwd"]
        for k in kernels:
            code = k.code[len(prelude()):]
            assert ("i - j < 7" in code) == bool(window)
            codes.setdefault(code, f"d{dim}_g{group}_w{window}_{k.family}")
    source = prelude() + "".join(f"namespace {name} {{\n{code}}}\n" for code, name in codes.items())
    assert len(compile_many([(source, "attention_options")], parse_target(target))[0]) > 0


@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_every_kernel_of_a_local_gqa_model_compiles(target):
    """Training (fused), prefill and decode (fused and not) of local GQA: the decode's
    window in the flash-decoding kernel (the keys pos - window < j <= pos)."""
    from gptc.compiler.codegen.kernels import prelude, render_plan
    from gptc.runtime.device import compile_many
    from gptc.target import parse_target
    spec = decode_spec("local5-gqa")
    codes = {}
    for mode, fuse in (("train", True), ("prefill", True), ("decode", True), ("decode", False)):
        for k in render_plan(make_plan(build_graph(spec, mode, batch=2), fuse), parse_target(target)):
            codes.setdefault(k.code[len(prelude()):], k.symbol)
    assert any("max(p - 4, split * " in code for code in codes)  # the decode's window of 5
    batches = [list(codes)[i:i + 16] for i in range(0, len(codes), 16)]
    sources = [(prelude() + "".join(f"namespace k{j} {{\n{code}}}\n" for j, code in enumerate(batch)), f"local_gqa_{i}")
               for i, batch in enumerate(batches)]
    assert all(len(o) > 0 for o in compile_many(sources, parse_target(target)))


# ----- on a GPU ---------------------------------------------------------------------------------
# (seq, head_dim, heads, kv_heads, window): sequences past several tiles with a partial last
# one, windows that skip whole key tiles (forward, dQ) and query tiles (dK, dV), and that don't.
FLASH = {"gqa2-d64": (203, 64, 4, 2, 0), "mqa-d32": (77, 32, 4, 1, 0), "local-d64": (301, 64, 3, 3, 37),
         "local1-d32": (70, 32, 2, 2, 1), "local-gqa-d128": (203, 128, 4, 2, 50), "local-mqa-d96": (150, 96, 4, 1, 70)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FLASH))
def test_flash_kernels_against_the_reference(device, rng, name):
    from test_gpu_kernels import random_feeds, run_both
    from conftest import rel_err
    seq, dim, heads, kv_heads, window = FLASH[name]
    graph = attention_graph((2, heads, seq, dim), kv_heads, window, grads=True)
    assert {"attention", "attention_bwd"} <= {k.family for k in make_plan(graph, True).kernels}
    out, _, ref = run_both(device, graph, random_feeds(graph, rng), True)
    for key, value in ref["outputs"].items():
        if not value.any():  # window 1: a query sees only itself, p = 1, so dq and dk vanish exactly
            scale = np.abs(ref["outputs"]["dv"]).max()
            assert np.abs(out[key]).max() < 1e-5 * scale, f"{name}/{key}: {np.abs(out[key]).max():.2e}"
            continue
        assert rel_err(out[key], value) < 1e-4, f"{name}/{key}: {rel_err(out[key], value):.2e}"

