"""bf16 causal attention on the CPU (issue 9, section 3): the precision pass casts q, k,
v, dO, P and dS; the flash matcher looks through the casts (AttentionMatch.bf16) and the
flash kernels read bf16 and round P and dS; the bf16 reference against the fp32 one
within bf16 error; the bf16 flash kernels compile for sm_90 (NVRTC; on the matrix units,
templates/attention_mma.hip.j2 and attention_mma_bwd.hip.j2) and gfx90a (hiprtc; SIMT).
The GPU half is tests/test_gpu_attention_bf16.py."""
from __future__ import annotations

import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.codegen.kernels import prelude, render_plan
from gptc.compiler.ir import Graph
from gptc.compiler.planner import make_plan
from gptc.compiler.precision import apply_precision
from gptc.runtime.reference import run_graph
from gptc.target import parse_target

from test_precision import small, with_precision

TARGETS = ["cuda:sm_90", "hip:gfx90a"]


def matches(g: Graph) -> list:
    """The attention matches the planner makes in `g` (one a forward kernel)."""
    return [k.attention for k in make_plan(g, True).kernels if k.family == "attention"]


def attention_graph(seq: int, dim: int, heads: int = 3, kv_heads: int = 0, window: int = 0,
                    dropout: float = 0.0, precision: str = "bf16", batch: int = 2) -> Graph:
    """Causal (or local, `window`) attention over (batch, heads, seq, dim) queries, with
    `kv_heads` key/value heads (grouped-query; 0: as many as heads) and dropout on the
    probabilities, its output and the gradients of q, k, v (loss sum(y * r)), in
    `precision`. The GPU tests run the same graphs."""
    g = Graph()
    q = g.param("q", (batch, heads, seq, dim))
    k, v = (g.param(n, (batch, kv_heads or heads, seq, dim)) for n in "kv")
    r = g.input("r", (batch, heads, seq, dim))
    drop = (lambda p: dsl.dropout(p, dropout, g.input("step", ()), 1234, 3)) if dropout else None
    y = dsl.causal_attention(q, k, v, window=window, drop=drop)
    g.output("y", y)
    for name, grad in zip("qkv", gradients((y * r).sum(), [q, k, v])):
        g.output(f"d{name}", grad)
    apply_precision(g, precision)
    return g


# The shapes the GPU tests check: head_dim 32, 64, 128 and awkward ones (padded), awkward
# sequence lengths (partial tiles), local windows, dropout. (Grouped-query heads: in the
# models, test_models_match_bf16_attention and the GPU step tests; a standalone graph's
# dO reaches the scope through a view of it, which the matcher, fp32 or bf16, refuses.)
CASES = {
    "d32": dict(seq=77, dim=32),
    "d64": dict(seq=517, dim=64),
    "d128": dict(seq=203, dim=128),
    "d100": dict(seq=131, dim=100),
    "d24_t1": dict(seq=1, dim=24),
    "local": dict(seq=301, dim=64, window=40),
    "local_d128": dict(seq=97, dim=128, window=17),
    "dropout": dict(seq=203, dim=64, dropout=0.2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_attention_is_matched_through_the_casts(case):
    """Forward and backward matched with bf16 set; the casts of P and dS, and without
    dropout the widening of P's cast that softmax's delta reads (and nothing else the
    precision pass added), inside the match; the planner gives the flash kernels; q, k,
    v and dO are bf16 buffers."""
    plan = make_plan(attention_graph(**CASES[case]), True)
    g = plan.graph
    (match,) = [k.attention for k in plan.kernels if k.family == "attention"]
    assert match.bf16 and match.backward
    inner = {n for n in match.forward | match.backward if g.op(n) == "cast"}
    rounded = {n for n in inner if g.type(n).dtype == "bf16"}
    assert len(rounded) == 2   # P, dS
    assert {g.node(n)["scope"].rpartition("/")[0].rpartition("causal_attention")[2] for n in rounded} == {"/softmax", "#bwd"} \
        or CASES[case].get("dropout")
    widened = inner - rounded   # delta = sum(dP * P) reads P rounded, as the kernels' dO·O does
    assert len(widened) == (0 if CASES[case].get("dropout") else 1)
    assert all(g.inputs_of(n)[0] in rounded and g.node(n)["scope"].endswith("/softmax#bwd") for n in widened)
    families = [k.family for k in plan.kernels]
    assert families.count("attention") == 1 and families.count("attention_bwd") == 1
    for operand in (match.q, match.k_t, match.v, match.d_out):
        assert g.type(operand).dtype == "bf16"
    fp32 = attention_graph(**CASES[case], precision="fp32")
    (match32,) = matches(fp32)
    assert not match32.bf16 and match32.backward


@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_models_match_bf16_attention(name):
    """Every layer's attention of the bf16 training graph is matched, forward and
    backward (llama: grouped-query heads; RoPE's q and k are stored as bf16 casts, so its
    prologue is not fused in bf16)."""
    spec = with_precision(small(name), "bf16")
    g = gptc.build_graph(spec, "train")
    found = matches(g)
    assert len(found) == spec.model.n_layers
    assert all(m.bf16 and m.backward for m in found)
    if name == "llama":
        assert all(m.group == spec.model.n_heads // spec.model.kv_heads for m in found)


@pytest.mark.parametrize("case", ["d64", "local", "dropout"])
def test_bf16_reference_is_the_fp32_one_within_bf16_error(case):
    """The bf16 graph on the reference against the fp32 one: within bf16 error (P and
    dS rounded to 2^-9 relative, q, k, v and dO too: a few 2^-9 at most, relative, in
    norm), but not equal (the casts round)."""
    g16, g32 = attention_graph(**CASES[case]), attention_graph(**CASES[case], precision="fp32")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(g32.type(i).shape).astype(np.float32)
             for table in (g32.inputs, g32.params) for n, i in table.items()}
    r16, r32 = run_graph(g16, feeds, np.float64)["outputs"], run_graph(g32, feeds, np.float64)["outputs"]
    for key in ("y", "dq", "dk", "dv"):
        err = np.linalg.norm(r16[key] - r32[key]) / np.linalg.norm(r32[key])
        assert 1e-4 < err < 8 * 2.0 ** -9, (key, err)


def bf16_attention_sources(target: str) -> list[str]:
    """The distinct flash kernel launches (without the prelude) of CASES and of bf16
    models: with grouped-query heads (llama; mqa: 4 query heads over 1), and GPT-2's
    layout (hipgpt: the backward stores into the QKV concatenation) for `target`."""
    codes = {}
    mqa = gptc.Spec(gptc.ModelSpec(vocab_size=101, seq_len=45, d_model=128, n_heads=4, n_kv_heads=1, n_layers=1),
                    gptc.TrainSpec(batch_size=2))
    graphs = [attention_graph(**case) for case in CASES.values()] + \
        [gptc.build_graph(with_precision(spec, "bf16"), "train") for spec in (small("llama"), mqa, small("hipgpt"))]
    for graph in graphs:
        plan = make_plan(graph, True)
        launches = render_plan(plan, parse_target(target))
        for k in launches:
            if "attention" in k.symbol or "Causal attention" in k.code:
                codes[k.code[len(prelude()):]] = k.symbol
    return sorted(codes)


@pytest.mark.parametrize("target", TARGETS)
def test_bf16_flash_kernels_compile(target):
    from gptc.runtime.device import compile_many
    codes = bf16_attention_sources(target)
    assert len(codes) >= 2 * len(CASES)
    assert all("bf16_to_float(float_to_bf16(" in c or "at_pack(" in c for c in codes), "P / dS rounded"
    # Forward and backward run on the matrix units on NVIDIA sm_80+ (mma.sync), SIMT elsewhere.
    assert all(("gptc_mma(" in c) == target.startswith("cuda") for c in codes)
    # hipgpt's backward stores dq, dk, dv into its bf16 QKV concatenation, pairs of columns at once on the matrix units
    assert any("gptc_store_pair(" in c for c in codes) == target.startswith("cuda")
    assert any("= float_to_bf16(dq[" in c for c in codes) == target.startswith("hip")
    # and its forward stores out's bf16 copy for the projection after it, beside out
    assert any(c.count("o[dn][2 * h], o[dn][2 * h + 1]") == 2 for c in codes) == target.startswith("cuda")
    assert any("= float_to_bf16(y);" in c for c in codes) == target.startswith("hip")
    sources = [(prelude() + "".join(f"namespace batch_{j} {{\n{code}}}\n" for j, code in enumerate(codes[i:i + 6])),
                f"attn_bf16_{i}") for i in range(0, len(codes), 6)]
    objects = compile_many(sources, parse_target(target))
    assert len(objects) == len(sources) and all(len(o) > 0 for o in objects)
