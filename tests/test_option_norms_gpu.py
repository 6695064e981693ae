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
from gptc.models import build_graph, init_params
from gptc.runtime.bundle import Bundle, compile_bundle
from gptc.runtime.reference import run_graph
from gptc.tools.generate import SamplingParams, cpu_model, generate_tokens, gpu_model

from conftest import UPDATE_TOLERANCE, rel_err, update_errors
from test_gpu_kernels import AWKWARD, run_both, training_feeds

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
# The tiny preset with every option: its bundle (train, eval, prefill, decode) samples on the GPU.
TINY_ALL = replace(gptc.preset("tiny"), model=replace(gptc.preset("tiny").model, **OPTIONS["combined"]))


def check_step(out: dict, updates: dict, feeds: dict, ref: dict) -> None:
    assert rel_err(out["loss"], ref["outputs"]["loss"]) < 1e-5
    worst = max((rel_err(out[k], v), k) for k, v in ref["outputs"].items() if k.startswith("grad."))
    assert worst[0] < 1e-4, f"gradient {worst[1]}: {worst[0]:.2e}"
    worst = max((e, k) for k, e in update_errors(feeds, updates, ref["updates"]).items())
    assert worst[0] < UPDATE_TOLERANCE, f"update {worst[1]}: {worst[0]:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_training_step(device, rng, spec_name, fuse):
    spec = SPECS[spec_name]
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    feeds = training_feeds(spec, graph, rng)
    out, updates, ref = run_both(device, graph, feeds, fuse)
    check_step(out, updates, feeds, ref)


@pytest.mark.parametrize("spec_name", ["combined"])
def test_float32_reference_step_passes_the_checks(spec_name):
    """The tolerances hold for a float32 step (what the GPU computes, up to order)."""
    spec = SPECS[spec_name]
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    feeds = training_feeds(spec, graph, np.random.default_rng(0))
    ref = run_graph(graph, feeds, np.float64)
    f32 = run_graph(graph, feeds, np.float32)
    check_step(f32["outputs"], f32["updates"], feeds, ref)


def sampling_params(spec: gptc.Spec) -> dict:
    """Much larger weights than the init (32x: RMSNorm undoes smaller scales), so greedy
    decoding does not settle into a loop at once."""
    return {k: v * (32.0 if v.ndim == 2 else 1.0) for k, v in init_params(build_graph(spec, "infer", 1), 7).items()}


@pytest.mark.gpu
def test_kv_cache_generation_with_every_option_on_gpu(device, tmp_path):
    """The fused prefill and decode steps (sinusoidal rows at explicit positions, SwiGLU's
    prologue at one row) sample what the reference samples, past the context window."""
    bundle = Bundle(compile_bundle(TINY_ALL, tmp_path / "tiny_all", device.target, log=lambda s: None))
    params = sampling_params(TINY_ALL)
    runtime = bundle.open(device, params)
    try:
        p = SamplingParams(num_tokens=40, greedy=True)
        prompt = [72, 101, 108, 108, 111]
        cached = list(generate_tokens(gpu_model(runtime), prompt, p, use_cache=True))
        assert cached == list(generate_tokens(cpu_model(TINY_ALL, params), prompt, p))
        assert cached == list(generate_tokens(gpu_model(runtime), prompt, p, use_cache=False))
    finally:
        runtime.close()


def test_kv_cache_generation_with_every_option_equals_recomputation():
    """On the CPU: decode's sinusoidal rows at position `pos` are the full sequence's."""
    params = sampling_params(TINY_ALL)
    model = cpu_model(TINY_ALL, params)
    p = SamplingParams(num_tokens=40, greedy=True)
    prompt = [72, 101, 108, 108, 111]
    cached = list(generate_tokens(model, prompt, p, use_cache=True))
    assert len(prompt) + 40 > TINY_ALL.model.seq_len  # runs past the context window
    assert cached == list(generate_tokens(model, prompt, p, use_cache=False))
    assert len(set(cached)) > 3
