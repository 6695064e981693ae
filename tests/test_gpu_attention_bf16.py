"""bf16 flash attention on a GPU (issue 9, section 3): the bf16 flash kernels, forward
and backward, against the bf16-emulating NumPy reference at head_dim 32/64/128 and
awkward ones, awkward sequence lengths, local windows and dropout (tests/
test_attention_bf16.py's CASES), with outputs poisoned before launch; and bf16 training
steps whose attention runs in them (hipgpt, a gpt2-small layout, grouped-query and local
heads) against the bf16 reference. Run on a GPU machine with:
    PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu_attention_bf16.py"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc.compiler import precision
from gptc.compiler.codegen import kernels
from gptc.compiler.planner import make_plan
from gptc.runtime.reference import run_graph

from conftest import rel_err
from test_attention_bf16 import CASES, attention_graph
from test_gpu_kernels import SPECS, random_feeds, run_both
from test_gpu_precision import check_bf16_step
from test_precision import with_precision

pytestmark = pytest.mark.gpu

# Tolerances from bf16 rounding (u = 2^-9 relative). The kernels round P and dS to bf16
# where the graph does, as float32 computations where the reference's are float64, so a
# value near a rounding boundary can land one bf16 step away; and two places differ from
# the graph by design: the backward's delta is dO·O where the graph sums P·dP (with P
# unrounded: the kernels' comment), and the SIMT forward rounds exp(s - m_running) before
# dividing by the row sum, as one-pass flash kernels do, where the graph rounds the
# quotient (the matrix-unit forward takes two passes and rounds the graph's value). These
# errors are independent per element and average over a row's keys: in norm a fraction of
# u, far below a wrong element, a layout or a missing mask (O(1)). q, k, v and dO are the
# same bf16 values on both sides. Each error is bounded by a fraction of the distance
# between the bf16 and the fp32 reference (the effect of all the rounding, 2e-3..4e-3
# here). Measured on an H200 (2026-11-30): y 0.62-0.65 of it with the one-pass forward,
# dq and dk 0.22-0.40 (through delta), dv <= 0.01.
RATIO = {"y": 0.8, "dq": 0.6, "dk": 0.6, "dv": 0.1}
RATIO_Y_TWO_PASS = 0.1
TOLERANCE = 4 * 2.0 ** -9   # and never above 4u, in norm


@pytest.mark.parametrize("path", ["mma", "simt"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_flash_kernels_match_the_bf16_reference(device, case, path, monkeypatch):
    """path "mma": the kernels the device's target gets (on NVIDIA sm_80+ the matrix
    units); "simt": the SIMT kernels with bf16 operands (AMD's path) on any GPU."""
    if path == "simt":
        monkeypatch.setattr(kernels, "_mma_kind", lambda target: None)
    graph = attention_graph(**CASES[case])
    assert {"attention", "attention_bwd"} <= {k.family for k in make_plan(graph, True).kernels}
    feeds = random_feeds(graph, np.random.default_rng(7))
    out, _, ref = run_both(device, graph, feeds, True)
    fp32 = run_graph(attention_graph(**CASES[case], precision="fp32"), feeds, np.float64)["outputs"]
    for key, want in ref["outputs"].items():
        err, distance = rel_err(out[key], want), rel_err(fp32[key], want)
        print(f"{case}/{key}: error {err:.2e}, bf16-fp32 distance {distance:.2e}")
        if not np.any(want):   # one key (T = 1): dq and dk vanish; the kernels' are float32 noise
            assert np.abs(out[key]).max() < 1e-5, f"{case}/{key}: {np.abs(out[key]).max():.2e}"
            continue
        assert err < TOLERANCE, f"{case}/{key}: {err:.2e}"
        bound = RATIO_Y_TWO_PASS if key == "y" and path == "mma" else RATIO[key]
        assert err < bound * distance, f"{case}/{key}: error {err:.2e} vs bf16-fp32 distance {distance:.2e}"


# gpt2-small's layout (d_model 768, 12 heads of 64, GELU MLP 4x, no lm_head bias) at a
# length and depth the reference runs in seconds; hipgpt (head_dim 32); grouped-query
# and local attention (test_gpu_kernels' mqa, local_gqa: head_dim 32 and 64).
GPT2_SMALL = gptc.Spec(gptc.ModelSpec(vocab_size=1031, seq_len=96, d_model=768, n_layers=2, n_heads=12, d_ff=3072,
                                      lm_head_bias=False),
                       gptc.TrainSpec(batch_size=2))
# On an H200 the gpt2 layout's step is further from the bf16 reference than the others:
# median gradient error 0.54 of the bf16-fp32 distance at 77bea5f (hipgpt, mqa, local_gqa,
# and test_gpu_precision's tiny, hipgpt, llama: below 0.5), and at ee445e2 the update of
# h.0.mlp.c_fc.weight 0.115 from the reference's (bound 0.05). The suspect was the flash
# backward's delta = dO·O against the graph's sum P·dP with P unrounded; since df6e728 the
# graph's delta reads P rounded as the kernels' does, and the median is still 0.54 (H200,
# 2026-12-01), so the cause is elsewhere and not yet known. Until it is found (or the
# bounds are derived for this layout), it is a known failure, not a loosened bound.
KNOWN_FAILURES = {"gpt2_small_layout": "median gradient error 0.54 of the bf16-fp32 distance, cause unknown "
                                       "(see above); issue 9"}
STEP_SPECS = {"gpt2_small_layout": GPT2_SMALL, "hipgpt": gptc.preset("hipgpt"),
              "mqa": SPECS["mqa"], "local_gqa": SPECS["local_gqa"]}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[n], strict=True))
                                  if n in KNOWN_FAILURES else n for n in sorted(STEP_SPECS)])
def test_bf16_training_step_with_flash_attention(device, name):
    spec = STEP_SPECS[name]
    g16 = gptc.build_graph(with_precision(spec, "bf16"), "train")
    plan = make_plan(g16, True)
    flash = [k for k in plan.kernels if k.family in ("attention", "attention_bwd")]
    assert len(flash) == 2 * spec.model.n_layers and all(k.attention.bf16 for k in flash)
    check_bf16_step(device, spec, fuse=True)


def test_bf16_step_with_padded_rows(device, monkeypatch):
    """bf16 copies whose rows are not 16-byte aligned stored padded and read through a
    slice (compiler/precision.py; gpt2's 50,257-wide lm_head): hipgpt with an odd
    vocabulary, padding every such copy, against the bf16 reference."""
    monkeypatch.setattr(precision, "PAD_MIN_SIZE", 1)
    spec = gptc.preset("hipgpt")
    spec = gptc.Spec(replace(spec.model, vocab_size=1031), spec.train)
    g16 = gptc.build_graph(with_precision(spec, "bf16"), "train")
    assert "pad" in {g16.op(n) for n in g16.nx.nodes}
    check_bf16_step(device, spec, fuse=True)
