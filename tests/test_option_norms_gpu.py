"""Whole training steps (loss, every gradient, every updated parameter) of small awkward
specs with RMSNorm, ScaleNorm, sinusoidal positions, SwiGLU and attn_bias = false, each
alone and combined, fused and unfused, on a GPU against the NumPy reference, with
test_gpu_kernels.py's machinery (activations and outputs poisoned before each launch).
Run on a GPU machine with:  PYTHONPATH=. python3 -m pytest -m gpu tests/test_option_norms_gpu.py
test_option_norms_plan.py compiles every kernel of these specs for sm_90 and gfx90a on
any machine. One test runs on the CPU: the float32 reference step passes the same checks."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc.runtime.reference import run_graph

from conftest import rel_err
from test_gpu_kernels import AWKWARD, assert_step_matches, check_training_step, training_feeds

# AWKWARD (vocab 1003, seq 37, d_model 96, 3 heads, d_ff 200: no size a multiple of a tile), 2 layers
BASE = replace(AWKWARD, model=replace(AWKWARD.model, n_layers=2))
OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "scalenorm": dict(norm="scalenorm"),
    "sinusoidal": dict(pos="sinusoidal"),
    "swiglu": dict(ffn="swiglu"),
    "combined": dict(norm="rmsnorm", pos="sinusoidal", ffn="swiglu", tie_embeddings=True, attn_bias=False),
}
SPECS = {name: replace(BASE, model=replace(BASE.model, **options)) for name, options in OPTIONS.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_training_step(device, rng, spec_name, fuse):
    check_training_step(device, rng, SPECS[spec_name], fuse)


@pytest.mark.parametrize("spec_name", ["combined"])
def test_float32_reference_step_passes_the_checks(spec_name):
    """The tolerances hold for a float32 step (what the GPU computes, up to order)."""
    spec = SPECS[spec_name]
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    feeds = training_feeds(spec, graph, np.random.default_rng(0))
    ref = run_graph(graph, feeds, np.float64)
    f32 = run_graph(graph, feeds, np.float32)
    assert_step_matches(f32["outputs"], f32["updates"], feeds, ref)


def test_step_check_allows_float32_error_where_a_gradient_cancels():
    """For this seed ScaleNorm's scalar weight gradient in layer 1 nearly cancels (7.6e-8,
    a sum over every element of the layer's input): float32 NumPy is 3.0e-3 from float64
    there, above the step
    check's 1e-4, so the check allows each gradient ten times the float32 step's own
    error, and its updates likewise (test_gpu_kernels.assert_step_matches), and still
    catches a gradient 1% off."""
    spec = SPECS["scalenorm"]
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    feeds = training_feeds(spec, graph, np.random.default_rng(1383))
    ref = run_graph(graph, feeds, np.float64)
    f32 = run_graph(graph, feeds, np.float32)
    key = "grad.h.1.ln_1.weight"
    assert rel_err(f32["outputs"][key], ref["outputs"][key]) > 1e-4
    with pytest.raises(AssertionError, match=key):
        assert_step_matches(f32["outputs"], f32["updates"], feeds, ref)
    assert_step_matches(f32["outputs"], f32["updates"], feeds, ref, lambda: f32)
    off = dict(f32["outputs"], **{"grad.h.0.attn.c_attn.weight": f32["outputs"]["grad.h.0.attn.c_attn.weight"] * 1.01})
    with pytest.raises(AssertionError, match="grad.h.0.attn.c_attn.weight"):
        assert_step_matches(off, f32["updates"], feeds, ref, lambda: f32)
