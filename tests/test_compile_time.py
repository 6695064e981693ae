"""Compile time of large bundles, held by counts that do not depend on the machine
(benchmarks/compile_time.py measures the seconds):
- the distinct kernels of gpt2's bundle, one NVRTC or hiprtc compile each: repeated
  layers must render identical code;
- a batched launch holds one inlined copy of each shared device function (gpt2's AdamW
  launch with a copy per part took NVRTC 18 s, more than all other kernels together);
- the Python work of building, planning and rendering a model grows linearly with its
  depth (a walk of the graph per node made it quadratic)."""
from __future__ import annotations

import dataclasses
import re
import sys

import gptc
from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.planner import make_plan
from gptc.models import build_graph
from gptc.runtime.build import plan_table
from gptc.runtime.bundle import render_bundle
from gptc.target import parse_target

# Distinct kernels of the gpt2 bundle (train, eval, prefill, decode) for sm_90 when
# this test was written; 238 before, when row kernels named their reductions' results
# by node id. (+2: the sampling tail's kernel in prefill and decode.) 69 since the
# decode merge: the decode step's attention is kv_write (2: keys, values),
# decode_attention and decode_combine (4) instead of 2 matmuls, a row and 2 pointwise
# kernels (5). 70 since split-K: the attention projections' weight gradients sum their
# two partial products in a kernel of their own. 94 since prompts are prefilled at 256
# and 64 tokens too (gptc.models.prefill_lengths: 12 kernels of their own each).
GPT2_DISTINCT_KERNELS = 94


def test_gpt2_bundle_compiles_few_distinct_kernels():
    rendered = render_bundle(gptc.preset("gpt2"), parse_target("cuda:sm_90"), "nvrtc-test", log=lambda line: None)
    launches = [k for ks in rendered.kernels.values() for k in ks]
    distinct = {k.symbol: k for k in launches}
    per_step = {step: len({k.symbol for k in ks}) for step, ks in rendered.kernels.items()}
    assert len(distinct) <= GPT2_DISTINCT_KERNELS, f"{len(distinct)} distinct kernels ({per_step}) for {len(launches)} launches"
    for k in distinct.values():
        for fn in set(re.findall(r"__device__ __forceinline__ void (gptc_fn\d+)\(", k.code)):
            assert len(re.findall(rf"\b{fn}\(", k.code)) == 2, f"{k.name}: {fn} is called more than once"


def _python_calls(n_layers: int) -> int:
    """Python function calls made building, planning and rendering the training step of
    `tiny` with n_layers layers, and making its plan table."""
    spec = gptc.preset("tiny")
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, n_layers=n_layers))
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        plan = make_plan(build_graph(spec, "train"), True)
        plan_table(plan, render_plan(plan, parse_target("cuda:sm_90")))
    finally:
        sys.setprofile(None)
    return calls


def test_planning_work_grows_linearly_with_depth():
    _python_calls(2)  # first calls compile templates and fill caches
    small, large = _python_calls(4), _python_calls(16)
    # Four times the layers: 4.7x the calls when this test was written (linear would be
    # under 4x: the embedding and the head do not grow; the best-fit placement of the
    # activations and the fusion pass's merges with the optimizer's scalars grow faster
    # than the layers);
    # 10.2x when Graph.prune and autodiff walked the graph once per root or parameter
    # (nx.ancestors, nx.descendants) and fusion re-derived compute_users per question.
    assert large / small < 5.5, f"{large:,} calls at 16 layers, {small:,} at 4: {large / small:.2f}x"
