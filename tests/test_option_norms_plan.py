"""The fused plans of RMSNorm, ScaleNorm, sinusoidal positions and SwiGLU: each norm is
one row kernel forward and fuses its backward as LayerNorm's does; SwiGLU's product
silu(gate) * up is computed in the loads of the matmuls that read it (the down
projection, and its weight gradient's matmul), never by a kernel of its own nor
stored, and so is the concatenation of its backward's gate and up gradients; plans
stay valid (test_planner.py's checks); a tiny spec with all options needs at most a
third of the unfused launches; and every kernel of the GPU tests' specs and bundle
(test_option_norms_gpu.py) compiles with NVRTC for sm_90 and hiprtc for gfx90a."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

import gptc
from gptc.compiler.codegen.kernels import prelude, render_plan
from gptc.compiler.planner import make_plan
from gptc.compiler.planner.fusion import is_free
from gptc.runtime.device import compile_many
from gptc.target import parse_target

from test_planner import launch_order_problems, overlap_problems
from test_generate import decode_spec
from test_option_norms_gpu import SPECS as GPU_SPECS

ALL_OPTIONS = dict(norm="rmsnorm", pos="sinusoidal", ffn="swiglu", tie_embeddings=True, attn_bias=False)


def tiny(**options) -> gptc.Spec:
    spec = gptc.preset("tiny")
    return replace(spec, model=replace(spec.model, **options))


def scope_kernels(plan, predicate) -> list:
    """The kernels holding a node whose scope satisfies `predicate`."""
    g = plan.graph
    return [k for k in plan.kernels if any(predicate(g.node(n)["scope"]) for n in k.nodes)]


def forward_scope(name: str):
    return lambda scope: scope.split("/")[-1] == name


def backward_scope(name: str):
    return lambda scope: scope.split("/")[-1] == f"{name}#bwd"


@pytest.mark.parametrize("norm", ["rmsnorm", "scalenorm"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_norm_forward_is_one_row_kernel(norm, mode):
    spec = tiny(norm=norm)
    plan = make_plan(gptc.build_graph(spec, mode), True)
    kernels = scope_kernels(plan, forward_scope(norm))
    assert {k.family for k in kernels} == {"row"}
    assert len(kernels) == 2 * spec.model.n_layers + 1  # ln_1, ln_2 per layer, ln_f: one kernel each
    g = plan.graph
    for k in kernels:  # the reduction and the normalisation in one pass over a row
        ops = Counter(g.op(n) for n in k.nodes if forward_scope(norm)(g.node(n)["scope"]))
        assert ops["sum"] == 1 and ops["rsqrt"] == 1


@pytest.mark.parametrize("norm,gains", [("layernorm", 2), ("rmsnorm", 1), ("scalenorm", 1)])
def test_norm_backward_fused_as_layernorm(norm, gains):
    """A norm's backward, as LayerNorm's: one row kernel per norm (the input gradient,
    with the row sums it needs), one column reduction per parameter of the norm (gain,
    and LayerNorm's bias) in two reduce kernels (sums of row chunks, then their sum: the
    planner's split_reductions), the rest in the epilogue of the matmul giving the norm's
    output gradient (RMSNorm's per-column gain); no pointwise kernel."""
    spec = tiny(norm=norm)
    norms = 2 * spec.model.n_layers + 1
    plan = make_plan(gptc.build_graph(spec, "train"), True)
    families = Counter(k.family for k in scope_kernels(plan, backward_scope(norm)))
    assert families["row"] == norms and families["reduce"] == 2 * norms * gains
    assert set(families) <= {"row", "reduce", "matmul"} and families["matmul"] <= norms


@pytest.mark.parametrize("mode", ["train", "infer", "prefill", "decode"])
@pytest.mark.parametrize("options", [dict(ffn="swiglu"), ALL_OPTIONS], ids=["swiglu", "all"])
def test_swiglu_product_is_computed_in_matmul_loads(mode, options):
    spec = tiny(**options)
    plan = make_plan(gptc.build_graph(spec, mode), True)
    g = plan.graph
    forward = lambda s: s.split("/")[-1] in ("swiglu", "silu") and "#bwd" not in s  # noqa: E731
    kernels = scope_kernels(plan, forward)
    assert kernels and {k.family for k in kernels} == {"matmul"}, "a standalone kernel computes SwiGLU"
    for k in kernels:
        assert not any(forward(g.node(r)["scope"]) for r in k.roots), f"{k.name} stores a SwiGLU value"
    # The down projection reads the product through its loads: no buffer of the
    # product's shape (B, S, d_ff) or (B*S, d_ff) exists in inference.
    m = spec.model
    if mode != "train":
        assert not any(b.shape[-1] == m.d_ff for b in plan.buffers.values())
    # The product itself is computed by the down projection's matmul, and in training
    # by its weight gradient's too (the backward's input-gradient matmul recomputes
    # silu(gate) in its epilogue).
    product = [k for k in kernels if any(g.node(n)["scope"].endswith("/swiglu") and g.op(n) == "mul" for n in k.nodes)]
    assert len(product) == m.n_layers * (2 if mode == "train" else 1)
    for k in product:  # an operand of the kernel's matmul is computed in the kernel itself
        bases = [g.view_base(operand) for operand in g.inputs_of(k.anchor)]
        assert g.op(k.anchor) == "matmul" and any(b in k.nodes for b in bases)
    # Backward: the gate's and the up's gradients are concatenated (pad + add) in the
    # loads of the matmuls and the bias reduction that read the projection's gradient.
    backward = scope_kernels(plan, lambda s: s.split("/")[-1] in ("swiglu#bwd", "silu#bwd"))
    assert (mode == "train") == bool(backward) and "pointwise" not in {k.family for k in backward}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("options", [dict(ffn="swiglu"), dict(norm="scalenorm"), ALL_OPTIONS],
                         ids=["swiglu", "scalenorm", "all"])
def test_plans_stay_valid(options, fuse):
    plan = make_plan(gptc.build_graph(tiny(**options), "train"), fuse)
    g = plan.graph
    free: dict = {}
    seen = [n for k in plan.kernels for n in k.nodes]
    assert len(seen) == len(set(seen))
    assert set(seen) == {n for n in g.nx.nodes if not is_free(g, n, free)}
    assert launch_order_problems(plan) == []
    assert overlap_problems(plan) == []


@pytest.mark.parametrize("norm", ["rmsnorm", "scalenorm"])
def test_fused_launches_are_at_most_a_third(norm):
    graph = gptc.build_graph(tiny(**{**ALL_OPTIONS, "norm": norm}), "train")
    fused, unfused = make_plan(graph, True), make_plan(graph, False)
    assert len(fused.launches) * 3 <= len(unfused.launches), (len(fused.launches), len(unfused.launches))


@pytest.fixture(scope="module")
def gpu_spec_codes():
    """target -> {kernel code without the prelude: symbol} over every plan the GPU tests run."""
    codes: dict[str, dict[str, str]] = {}
    graphs = [(gptc.build_graph(spec, "train", expose_gradients=True), fuse)
              for spec in GPU_SPECS.values() for fuse in (True, False)]
    # the steps of the bundle test_gpu_bundle's generation test compiles with these options
    tiny_all = decode_spec("rmsnorm-sinusoidal-swiglu")
    batch = tiny_all.train.batch_size
    graphs += [(gptc.build_graph(tiny_all, mode, b), True) for mode, b in
               (("train", batch), ("eval", batch), ("prefill", 1), ("decode", 1))]
    for graph, fuse in graphs:
        plan = make_plan(graph, fuse)
        for target in ("cuda:sm_90", "hip:gfx90a"):
            for k in render_plan(plan, parse_target(target)):
                codes.setdefault(target, {})[k.code[len(prelude()):]] = k.symbol
    return codes


@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_gpu_spec_kernels_compile(gpu_spec_codes, target):
    distinct = sorted(gpu_spec_codes[target])
    batch = 16
    sources = [(prelude() + "".join(f"namespace batch_{j} {{\n{code}}}\n" for j, code in enumerate(distinct[i:i + batch])),
                f"norms_batch{i // batch}") for i in range(0, len(distinct), batch)]
    objects = compile_many(sources, parse_target(target))
    assert len(objects) == len(sources) and all(len(o) > 0 for o in objects)


def test_iota_values_are_bracketed_in_c():
    """An iota's index expression (i % 37) is one operand in C: a cast or a product
    reads all of it ((float)i % 37 does not compile, 2 * i % 37 computes (2i) % 37).
    The sinusoidal table casts an iota of the positions."""
    g = gptc.Graph()
    x = g.input("x", (4, 37))
    column = g.iota((4, 37), 1)
    g.output("y", x * (2 * column).cast("f32") + column.cast("f32"))
    source = render_plan(make_plan(g, True), parse_target("cuda:sm_90"))[0].source
    assert "2 * (i % 37);" in source and "(float)(i % 37);" in source
