"""Batched generation sampled on the GPU: a bundle of batch 4 draws every sequence's
token on the device (the host reads back next_token only) and gives, for a fixed seed,
the CPU reference's tokens; a sequence alone (a bundle of batch 1) draws what it draws
in a batch under the same sequence id. Run on a GPU machine with:
    PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu_batch_sampling.py"""
from __future__ import annotations

import pytest

from gptc.runtime.bundle import Bundle, compile_bundle
from gptc.tools.generate import SamplingParams, cpu_model, generate_batch, gpu_model
from test_generate import RAGGED_PROMPTS, decode_spec, sampling_params

pytestmark = pytest.mark.gpu

IDS = [7, 3, 0, 12]


@pytest.mark.parametrize("name,sink", [("causal", 0), ("gqa", 0), ("rope", 4)])
def test_gpu_batch_sampling_equals_the_reference_and_the_sequence_alone(device, tmp_path, name, sink):
    spec = decode_spec(name)
    params = sampling_params(spec)
    p = SamplingParams(num_tokens=40, temperature=1.1, top_k=30, top_p=0.9, repetition_penalty=1.3, seed=5)
    got = {}
    for batch in (4, 1):
        bundle = Bundle(compile_bundle(spec, tmp_path / f"{name}{batch}", device.target, log=lambda s: None,
                                       sample_batch=batch, sink=sink))
        runtime = bundle.open(device, params)
        try:
            model = gpu_model(runtime)
            assert (model.batch, model.sink) == (batch, sink)
            if batch == 4:
                got[4] = [list(s) for s in zip(*generate_batch(model, RAGGED_PROMPTS, p, sequences=IDS))]
            else:
                got[1] = [list(generate_batch(model, [prompt], p, sequences=[i]))
                          for prompt, i in zip(RAGGED_PROMPTS, IDS)]
                got[1] = [[new[0] for new in tokens] for tokens in got[1]]
        finally:
            runtime.close()
    assert got[4] == got[1]
    want = [list(s) for s in zip(*generate_batch(cpu_model(spec, params, 4, sink), RAGGED_PROMPTS, p, sequences=IDS))]
    assert got[4] == want
