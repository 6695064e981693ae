"""The KV-cache decode on a GPU: the flash-decoding kernels (partial sums over key
chunks, then the combine) and the in-place cache write against the NumPy reference, at
positions 0, 1, S-1 and ragged ones, head dims 32/64/128 and awkward ones, GQA/MQA and
windows, outputs and activations poisoned (NaN) before the launch; and greedy
generation of a ragged batch through a bundle equal to the CPU reference's. Run on a
GPU machine with:
    PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu_decode.py"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.ir import Graph
from gptc.runtime.bundle import Bundle, compile_bundle
from gptc.tools.generate import gpu_model

from conftest import rel_err
from test_generate import DECODE_OPTIONS, RAGGED_PROMPTS, check_generation, decode_spec, sampling_params
from test_gpu_kernels import run_both

pytestmark = pytest.mark.gpu

# (batch, heads, kv_heads, seq, head_dim, window, splits): positions 0, 1, S-1 and others
# in every case (the batch is 5 and more); one chunk, a few, and one key per chunk.
CASES = [(5, 4, 4, 45, 32, 0, 1), (5, 4, 2, 45, 64, 0, 3), (6, 8, 1, 130, 128, 0, 5), (5, 6, 3, 37, 24, 0, 37),
         (5, 4, 2, 45, 80, 7, 4), (7, 2, 2, 301, 96, 0, 16), (5, 4, 1, 64, 40, 1, 2), (5, 12, 12, 1024, 64, 0, 22)]


def decode_graph(batch, heads, kv_heads, seq, dim, window, splits) -> Graph:
    """Attention of one query per sequence over caches that kv_write first extends at pos."""
    g = Graph()
    q = g.input("q", (batch, heads, 1, dim))
    pos = g.input("pos", (batch,), "i32", bound=seq)
    caches = []
    for name in ("k", "v"):
        cache = dsl.kv_write(g.state(f"{name}_cache", (batch, kv_heads, seq, dim)),
                             g.input(f"new_{name}", (batch, kv_heads, 1, dim)), pos)
        g.updates[f"{name}_cache"] = cache.id
        caches.append(cache)
    g.output("y", dsl.decode_attention(q, *caches, pos, 1.0 / np.sqrt(dim), window, splits))
    return g


@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}h{c[1]}kv{c[2]}s{c[3]}d{c[4]}w{c[5]}x{c[6]}" for c in CASES])
def test_flash_decoding_and_the_cache_write_match_the_reference(device, rng, case):
    batch, heads, kv_heads, seq, dim, window, splits = case
    g = decode_graph(*case)
    pos = np.concatenate([[0, 1, seq - 1], rng.integers(0, seq, batch - 3)]).astype(np.int32)
    feeds = {"pos": pos, "q": rng.standard_normal((batch, heads, 1, dim)).astype(np.float32) * 2}
    for name in ("k", "v"):
        feeds[f"{name}_cache"] = rng.standard_normal((batch, kv_heads, seq, dim)).astype(np.float32)
        feeds[f"new_{name}"] = rng.standard_normal((batch, kv_heads, 1, dim)).astype(np.float32)
    out, updates, ref = run_both(device, g, feeds, fuse=True)
    assert np.isfinite(out["y"]).all()
    assert rel_err(out["y"], ref["outputs"]["y"]) < 1e-5
    for name in ("k_cache", "v_cache"):  # row pos[b] replaced, every other row as it was
        np.testing.assert_array_equal(updates[name], ref["updates"][name].astype(np.float32))


@pytest.mark.parametrize("name", ["causal", "rope", "gqa", "mqa", "local-gqa", "linear", "moe",
                                  "rmsnorm-sinusoidal-swiglu"])
def test_greedy_generation_of_a_ragged_batch_on_gpu_equals_the_reference(device, tmp_path, name):
    """Prompts of 5, 1, 12 and 2 tokens prefilled and decoded together by a bundle of
    batch 4: each sequence's greedy text equals the CPU reference recomputing it alone."""
    spec = decode_spec(name)
    bundle = Bundle(compile_bundle(spec, tmp_path / name, device.target, log=lambda s: None, sample_batch=4))
    params = sampling_params(spec)
    runtime = bundle.open(device, params)
    try:
        model = gpu_model(runtime)
        assert model.batch == 4
        check_generation(spec, model, params, RAGGED_PROMPTS)
    finally:
        runtime.close()


@pytest.mark.parametrize("name", ["causal", "gqa", "linear"])
def test_bf16_greedy_generation_of_a_ragged_batch_on_gpu_equals_the_reference(device, tmp_path, name):
    """The same with a bf16 bundle, against the CPU reference's bf16 graphs."""
    spec = decode_spec(name)
    spec = replace(spec, train=replace(spec.train, precision="bf16"))
    bundle = Bundle(compile_bundle(spec, tmp_path / name, device.target, log=lambda s: None, sample_batch=4))
    params = sampling_params(spec)
    runtime = bundle.open(device, params)
    try:
        check_generation(spec, gpu_model(runtime), params, RAGGED_PROMPTS)
    finally:
        runtime.close()


@pytest.mark.parametrize("name", ["causal", "gqa"])
def test_chained_decode_steps_draw_what_steps_one_at_a_time_draw(device, tmp_path, name):
    """k decode steps queued at once (GpuExecutor.run_chain: one device graph, each drawn
    token fed to the next step on the device) draw the tokens that k steps run one at a
    time through the host draw (GpuExecutor.run, the step's own graph): a ragged batch,
    sampling with a seed (the draws' counter is each step's token index), the chain's
    buffers poisoned first; k = 1, 5 and 16."""
    from gptc.tools.generate import SamplingParams
    spec = decode_spec(name)
    bundle = Bundle(compile_bundle(spec, tmp_path / name, device.target, log=lambda s: None, sample_batch=4))
    runtime = bundle.open(device, sampling_params(spec))
    p = SamplingParams(temperature=0.8, top_k=40, seed=11)
    vocab = spec.model.vocab_size
    try:
        model = gpu_model(runtime)

        def draw(k: int, chained: bool) -> np.ndarray:
            model.start(RAGGED_PROMPTS, p, vocab)
            first = model.prefill(RAGGED_PROMPTS, 0)
            positions = [[len(t) + j for t in RAGGED_PROMPTS] for j in range(k)]
            if chained:
                runtime.steps["decode"].poison()
                return np.concatenate([[first], model.decode(first, positions, 1)])
            rows, n = [first], len(RAGGED_PROMPTS)
            for j in range(k):
                feed = {**model.sampling, "tokens": np.zeros((4, 1), np.int32), "pos": np.zeros(4, np.int32),
                        "sample_index": np.zeros(4, np.int32)}
                feed["tokens"][:n, 0], feed["pos"][:n], feed["sample_index"][:n] = rows[-1], positions[j], 1 + j
                rows.append(runtime.steps["decode"].run(feed, outputs=("next_token",))["next_token"][:n])
            return np.stack(rows)

        for k in (1, 5, 16):
            draw(k, True)  # makes the chain, so that poison() reaches its buffers
            chained, alone = draw(k, True), draw(k, False)
            assert chained.shape == (k + 1, 4) and ((chained >= 0) & (chained < vocab)).all()
            np.testing.assert_array_equal(chained, alone)
        assert len(set(chained.ravel().tolist())) > 8  # sampled, not stuck
    finally:
        runtime.close()


@pytest.mark.parametrize("name,model", [("rope", dict(n_layers=1)), ("local-gqa", dict(pos="rope")), ("causal", {})])
def test_streaming_generation_on_gpu_equals_the_reference(device, tmp_path, name, model):
    """--past-context stream: a bundle of batch 4 with the streaming cache (RoPE in the
    flash-decoding kernel, the ring of slots) decodes 40 tokens past the context of a
    ragged batch as the CPU reference's streaming cache does."""
    from gptc.tools.generate import SamplingParams, cpu_model, generate_batch
    spec = decode_spec(name)
    spec = replace(spec, model=replace(spec.model, **model))
    bundle = Bundle(compile_bundle(spec, tmp_path / name, device.target, log=lambda s: None, sample_batch=4, sink=4))
    params = sampling_params(spec)
    runtime = bundle.open(device, params)
    p = SamplingParams(num_tokens=40, greedy=True)
    try:
        model = gpu_model(runtime)
        assert (model.batch, model.sink) == (4, 4)
        got = list(generate_batch(model, RAGGED_PROMPTS, p))
    finally:
        runtime.close()
    assert got == list(generate_batch(cpu_model(spec, params, 4, sink=4), RAGGED_PROMPTS, p))


@pytest.mark.parametrize("window,rope_dims", [(0, 0), (0, 16), (9, 32)])
def test_flash_decoding_over_a_streaming_cache_matches_the_reference(device, rng, window, rope_dims):
    """The ring's positions (full ring: pos = S-1, slots behind the newest), RoPE on the
    keys in the kernel, a window over positions, at head_dim 32 with GQA."""
    batch, heads, kv_heads, seq, dim, sink = 6, 4, 2, 67, 32, 4
    g = Graph()
    q = g.input("q", (batch, heads, 1, dim))
    k, v = (g.input(n, (batch, kv_heads, seq, dim)) for n in "kv")
    pos, slot = (g.input(n, (batch,), "i32", bound=seq) for n in ("pos", "slot"))
    g.output("y", dsl.decode_attention(q, k, v, pos, 0.17, window, 3, slot=slot, sink=sink,
                                       rope=(rope_dims, 500.0) if rope_dims else None))
    # full rings (newest at slots sink, 40, S-1) and two not yet full (pos = slot)
    feeds = {"pos": np.array([seq - 1, seq - 1, seq - 1, 0, 30, seq - 1], np.int32),
             "slot": np.array([sink, 40, seq - 1, 0, 30, 5], np.int32),
             "q": rng.standard_normal((batch, heads, 1, dim)).astype(np.float32),
             "k": rng.standard_normal((batch, kv_heads, seq, dim)).astype(np.float32),
             "v": rng.standard_normal((batch, kv_heads, seq, dim)).astype(np.float32)}
    out, _, ref = run_both(device, g, feeds, fuse=True)
    assert rel_err(out["y"], ref["outputs"]["y"]) < 1e-5


def test_a_decode_step_of_gpt2_is_as_fast_at_position_10_as_at_1000(device):
    """Time per token flat in the position: no O(S) cache rewrite (the attention reads
    keys up to pos, a small part of a gpt2 step at batch 1)."""
    import time

    from gptc.compiler.planner import make_plan
    from gptc.models import build_graph, init_params
    from gptc.runtime.build import load_executor
    spec = gptc.preset("gpt2")
    graph = build_graph(spec, "decode", 1)
    ex = load_executor(make_plan(graph), device, init_params(graph, 0))
    try:
        def per_step(pos: int) -> float:
            feeds = {"tokens": np.zeros((1, 1), np.int32), "pos": np.array([pos], np.int32)}
            for _ in range(3):
                ex.run(feeds)
            start = time.perf_counter()
            for _ in range(20):
                ex.run(feeds)
            return (time.perf_counter() - start) / 20
        early, late = per_step(10), per_step(1000)
        print(f"gpt2 decode step at batch 1: {early * 1e3:.3f} ms at position 10, {late * 1e3:.3f} ms at 1000")
        assert late < 1.5 * early
    finally:
        ex.close()
