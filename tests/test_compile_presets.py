"""Every kernel of the hipgpt and gpt2 presets (training and inference graphs, fused
and unfused plans) rendered and compiled with hiprtc for gfx90a and gfx1030 and with
NVRTC for sm_90, on a machine without a GPU.

Repeated layers give byte-identical kernel code (the compiler never sees node ids),
so each distinct kernel is compiled once. To keep CI fast, distinct kernels are
compiled in batches: one translation unit holds several kernels, each in a namespace
of its own, so every kernel's code goes through the target's compiler. A missing
toolchain fails these tests (run .ci/install-compilers.sh), never skips them.
The flash-attention kernels at head_dims above the presets' (80, 96, 128: tiles of
their own) are compiled too; both compilers refuse a kernel whose static shared
memory exceeds the arch's."""
from __future__ import annotations

import re

import pytest

import gptc
from gptc.compiler.codegen.kernels import prelude, render_plan
from gptc.target import parse_target
from gptc.compiler.planner import make_plan
from gptc.runtime.device import compile_many

TARGETS = ["hip:gfx90a", "hip:gfx1030", "cuda:sm_90"]
BATCH = 16


@pytest.fixture(scope="module")
def kernel_codes():
    """preset -> (number of kernels, distinct kernel codes without the prelude)."""
    result = {}
    for name in ("hipgpt", "gpt2"):
        codes: dict[str, dict[str, str]] = {}
        count = 0
        for mode in ("train", "infer"):
            graph = gptc.build_graph(gptc.preset(name), mode)
            for fuse in (True, False):
                plan = make_plan(graph, fuse)
                for target in TARGETS:
                    kernels = render_plan(plan, parse_target(target))
                    count += len(kernels)
                    assert len(kernels) == len(plan.launches)
                    for k, launch in zip(kernels, plan.launches):
                        # each launch's source starts naming the graph nodes it computes
                        header = k.source[:k.source.index(prelude())]
                        assert all(re.search(rf"%{n}\b", header) for i in launch for n in plan.kernels[i].nodes)
                        codes.setdefault(target, {})[k.code[len(prelude()):]] = k.symbol
        result[name] = (count, codes)
    return result


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("preset", ["hipgpt", "gpt2"])
def test_every_kernel_compiles(kernel_codes, preset, target):
    count, codes = kernel_codes[preset]
    distinct = sorted(codes[target])
    batches = [distinct[i:i + BATCH] for i in range(0, len(distinct), BATCH)]
    sources = [(prelude() + "".join(f"namespace batch_{j} {{\n{code}}}\n" for j, code in enumerate(batch)),
                f"{preset}_batch{i}") for i, batch in enumerate(batches)]
    objects = compile_many(sources, parse_target(target))
    assert len(objects) == len(batches) and all(len(o) > 0 for o in objects)
    symbols = set(codes[target].values())
    print(f"{preset} {target}: {len(distinct)} distinct kernels compiled ({count} rendered for all targets)")
    assert len(symbols) == len(distinct)


@pytest.mark.parametrize("target", TARGETS)
def test_attention_kernels_for_large_head_dims_compile(target):
    from gptc.compiler.autodiff import gradients
    codes = []
    for dim in (80, 96, 128):
        g = gptc.Graph()
        q, k, v = (g.param(n, (2, 3, 45, dim)) for n in "qkv")
        y = gptc.dsl.causal_attention(q, k, v)
        g.output("y", y)
        for name, grad in zip("qkv", gradients((y * g.input("r", y.shape)).sum(), [q, k, v])):
            g.output(f"d{name}", grad)
        kernels = [k for k in render_plan(make_plan(g, True), parse_target(target)) if k.family.startswith("attention")]
        assert sorted(k.family for k in kernels) == ["attention", "attention_bwd"]
        codes += [k.code[len(prelude()):] for k in kernels]
    source = prelude() + "".join(f"namespace head_dim_{j} {{\n{code}}}\n" for j, code in enumerate(codes))
    assert len(compile_many([(source, "attention_head_dims")], parse_target(target))[0]) > 0
