"""The batched Model samples on the device: each sequence's draws are keyed by
(seed, token index, sequence id), not by the row it occupies, and its repetition
penalty sees its own history only; dummy rows change nothing."""
from __future__ import annotations

import numpy as np
import pytest

from gptc.tools.generate import SamplingParams, cpu_model, generate_batch
from test_generate import RAGGED_PROMPTS, decode_spec, sampling_params

SAMPLED = SamplingParams(num_tokens=24, temperature=1.3, top_k=0, top_p=0.95, repetition_penalty=1.5, seed=9)


def texts(model, prompts, ids=None, p=SAMPLED):
    return [list(seq) for seq in zip(*generate_batch(model, prompts, p, sequences=ids))]


@pytest.mark.parametrize("name", ["causal", "gqa"])
def test_a_sequence_draws_the_same_tokens_in_any_row_of_any_batch(name):
    spec = decode_spec(name)
    params = sampling_params(spec)
    batched = texts(cpu_model(spec, params, batch=5), RAGGED_PROMPTS, [7, 3, 0, 12])  # a dummy row too
    for prompt, seq_id, got in zip(RAGGED_PROMPTS, [7, 3, 0, 12], batched):
        assert texts(cpu_model(spec, params), [prompt], [seq_id]) == [got]
    # placement moves nothing: the same ids in another order give the same texts
    order = [2, 0, 3, 1]
    moved = texts(cpu_model(spec, params, batch=4), [RAGGED_PROMPTS[i] for i in order], [[7, 3, 0, 12][i] for i in order])
    assert moved == [batched[i] for i in order]


def test_sequence_ids_key_the_draws():
    """One prompt under two ids draws differently (the id is in the Philox counter);
    without ids a batch's rows get 0, 1, ...; one prompt gets id 0 (the text of gptc
    generate --prompt, as before batching)."""
    spec = decode_spec("causal")
    params = sampling_params(spec)
    prompt = RAGGED_PROMPTS[0]
    a, b = texts(cpu_model(spec, params, batch=2), [prompt, prompt], [0, 1])
    assert a != b
    assert texts(cpu_model(spec, params, batch=2), [prompt, prompt]) == [a, b]
    assert texts(cpu_model(spec, params), [prompt]) == [a]


def test_the_repetition_penalty_sees_each_sequence_s_own_history():
    """Greedy with a huge penalty: a sequence never repeats a token of its own history
    (while unseen tokens remain), whatever the other rows hold."""
    spec = decode_spec("causal")
    params = sampling_params(spec)
    p = SamplingParams(num_tokens=12, greedy=True, repetition_penalty=1e6)
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9, 10]]
    batched = texts(cpu_model(spec, params, batch=2), prompts, p=p)
    for prompt, got in zip(prompts, batched):
        assert len(set(prompt + got)) == len(prompt + got)
        assert texts(cpu_model(spec, params), [prompt], p=p) == [got]


def test_only_next_token_is_read_back_on_the_gpu_model():
    """gpu_model fetches next_token alone (the host never reads the logits)."""
    from gptc.tools.generate import gpu_model

    class Step:
        def __init__(self, rows):
            self.rows, self.fetched = rows, []
            self.table = {"inputs": {"pos": 0}, "buffers": {0: {"shape": [rows]}}}

        def run(self, feeds, outputs=None):
            self.fetched.append(outputs)
            assert feeds["sample_index"].shape == feeds["sample_sequence"].shape == (self.rows,)
            return {"next_token": np.arange(self.rows, dtype=np.int32) + 1}

        def run_chain(self, feeds, link, outputs):
            assert link == {"tokens": "next_token"}
            steps = [self.run({name: value[i] for name, value in feeds.items()}, outputs)
                     for i in range(len(feeds["pos"]))]
            return {"next_token": np.stack([step["next_token"] for step in steps])}

        def write(self, values):
            pass

    class Runtime:
        class bundle:
            spec = decode_spec("causal")
            manifest = {}
        steps = {"prefill": Step(3), "decode": Step(3)}

    model = gpu_model(Runtime)
    assert model.batch == 3
    out = list(generate_batch(model, [[1, 2], [3]], SamplingParams(num_tokens=3, greedy=True)))
    assert out == [[1, 2]] * 3
    assert set(Runtime.steps["prefill"].fetched + Runtime.steps["decode"].fetched) == {("next_token",)}
