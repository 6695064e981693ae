"""Sampling: KV-cache generation equals full recomputation, sampling options, seeds."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc.tools.generate import SamplingParams, choose, cpu_model, generate_batch, generate_tokens
from gptc.models import build_graph, init_params
from gptc.runtime.reference import run_graph
from gptc.spec import GptcError


# Every attention kind and every option that changes decoding, at the tiny preset's sizes.
DECODE_OPTIONS = {
    "causal": {}, "rope": dict(pos="rope"), "rope-half": dict(pos="rope", rope_fraction=0.5),
    "mqa": dict(n_kv_heads=1), "gqa": dict(n_heads=4, n_kv_heads=2),
    "local": dict(attention="local", window=5), "local-gqa": dict(n_heads=4, n_kv_heads=2, attention="local", window=5),
    "linear": dict(attention="linear"), "linear-mqa": dict(attention="linear", n_kv_heads=1),
    "moe": dict(ffn="moe", expert_ffn="swiglu", n_experts=3),
    "rmsnorm-sinusoidal-swiglu": dict(norm="rmsnorm", pos="sinusoidal", ffn="swiglu", tie_embeddings=True,
                                      attn_bias=False),
    "scalenorm": dict(norm="scalenorm"), "dropout": dict(dropout=0.1),
}


def decode_spec(name: str) -> gptc.Spec:
    tiny = gptc.preset("tiny")
    return replace(tiny, model=replace(tiny.model, **DECODE_OPTIONS[name]))


def sampling_params(spec: gptc.Spec) -> dict[str, np.ndarray]:
    """Larger weights than the init, so greedy decoding does not settle into a loop at
    once (32x under RMSNorm and ScaleNorm, which undo smaller scales)."""
    scale = 8.0 if spec.model.norm == "layernorm" else 32.0
    return {k: v * (scale if v.ndim >= 2 else 1.0) for k, v in init_params(build_graph(spec, "infer", 1), 7).items()}


# A ragged batch: prompts of 5, 1, 12 and 2 tokens.
RAGGED_PROMPTS = [[72, 101, 108, 108, 111], [3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12], [40, 41]]


# bf16 greedy texts may part where the top two logits are this close: rounding to bf16 at
# other places (the cache's rows, a batch's or a kernel's order) can flip such a near tie.
BF16_TIE = 2.0 ** -10


def last_logits(spec: gptc.Spec, params: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """The reference's logits (vocab,) after `tokens` (their last seq_len), in the spec's precision."""
    window = tokens[-spec.model.seq_len:]
    graph = build_graph(spec, "prefill", 1, len(window))
    states = {k: np.zeros(graph.type(v).shape, np.float32) for k, v in graph.states.items()}
    feeds = {"tokens": np.array([window], np.int32), "last": np.array([len(window) - 1], np.int32), **params, **states}
    return np.asarray(run_graph(graph, feeds, np.float32)["outputs"]["logits"]).reshape(-1)


def assert_same_texts(spec: gptc.Spec, params: dict[str, np.ndarray] | None, prompts: list[list[int]],
                      texts: list[list[int]], others: list[list[int]]) -> None:
    """texts == others; in bf16 with `params`, each pair may instead part at a near tie:
    where the reference's top two logits after the common part are within BF16_TIE and
    the two texts took those two tokens."""
    if texts == others or spec.train.precision != "bf16" or params is None:
        assert texts == others
        return
    for prompt, a, b in zip(prompts, texts, others, strict=True):
        if a == b:
            continue
        n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = last_logits(spec, params, [*prompt, *a[:n]])
        first, second = np.argsort(logits)[::-1][:2]
        gap = float(logits[first] - logits[second])
        assert gap <= BF16_TIE and {a[n], b[n]} == {first, second}, \
            f"texts part at token {n} ({a[n]} against {b[n]}) where the top two logits are {gap:.3g} apart"


def check_generation(spec: gptc.Spec, model, params: dict[str, np.ndarray] | None = None,
                     prompts: list[list[int]] | None = None) -> None:
    """Greedy generation with the KV cache (or state) equals full recomputation, 40 tokens
    past the prompts (default one 5-token prompt; past the context window), for every
    sequence of the batch; with `params`, it also equals the CPU reference's recomputing
    each sequence alone (for a GPU model, or a batch). In bf16, up to a near tie
    (assert_same_texts)."""
    prompts = prompts or [RAGGED_PROMPTS[0]]
    p = SamplingParams(num_tokens=40, greedy=True)
    cached = [list(seq) for seq in zip(*generate_batch(model, prompts, p, use_cache=True))]
    assert len(cached) == len(prompts) and all(len(c) == 40 for c in cached)
    assert all(len(prompt) + 40 > spec.model.seq_len for prompt in prompts)
    recomputed = [list(seq) for seq in zip(*generate_batch(model, prompts, p, use_cache=False))]
    assert_same_texts(spec, params, prompts, cached, recomputed)
    assert len(set(cached[0])) > 3 and all(len(set(c)) > 1 for c in cached)  # not stuck on one token
    if params is not None:
        alone = cpu_model(spec, params)
        assert_same_texts(spec, params, prompts, cached,
                          [list(generate_tokens(alone, prompt, p, use_cache=False)) for prompt in prompts])


def test_a_bf16_text_that_parts_without_a_near_tie_fails():
    """assert_same_texts accepts a parting only at a near tie: a text changed where the
    top two logits are far apart fails, as does one that takes neither of them."""
    spec = decode_spec("rope")
    spec = replace(spec, train=replace(spec.train, precision="bf16"))
    params = sampling_params(spec)
    prompt = RAGGED_PROMPTS[0]
    text = list(generate_tokens(cpu_model(spec, params), prompt, SamplingParams(num_tokens=12, greedy=True)))
    logits = last_logits(spec, params, [*prompt, *text[:6]])
    second = int(np.argsort(logits)[::-1][1])
    assert np.sort(logits)[-1] - np.sort(logits)[-2] > BF16_TIE and int(np.argmax(logits)) == text[6]
    assert_same_texts(spec, params, [prompt], [text], [text])
    with pytest.raises(AssertionError, match="top two logits"):
        assert_same_texts(spec, params, [prompt], [text], [text[:6] + [second] + text[7:]])


@pytest.mark.parametrize("name", list(DECODE_OPTIONS))
def test_kv_cache_equals_full_recomputation(name):
    spec = decode_spec(name)
    check_generation(spec, cpu_model(spec, sampling_params(spec)))


@pytest.fixture(scope="module")
def tiny_model():
    spec = gptc.preset("tiny")
    return spec, sampling_params(spec)


def test_same_seed_same_text(tiny_model):
    spec, params = tiny_model
    model = cpu_model(spec, params)
    p = SamplingParams(num_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=5)
    assert list(generate_tokens(model, [1, 2, 3], p)) == list(generate_tokens(model, [1, 2, 3], p))
    other = SamplingParams(num_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=6)
    assert list(generate_tokens(model, [1, 2, 3], p)) != list(generate_tokens(model, [1, 2, 3], other))


def test_choose_respects_top_k_top_p_and_penalty():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, 3.0, -1.0, -2.0])
    picks = {choose(logits, [], SamplingParams(top_k=2), rng) for _ in range(200)}
    assert picks == {0, 1}
    picks = {choose(logits, [], SamplingParams(top_k=0, top_p=0.5), rng) for _ in range(200)}
    assert picks == {0}
    assert choose(logits, [], SamplingParams(greedy=True), rng) == 0
    assert choose(logits, [0], SamplingParams(greedy=True, repetition_penalty=10.0), rng) == 1


@pytest.mark.parametrize("kwargs,expected", [
    ({"temperature": 0.0}, "--temp"), ({"top_k": -1}, "--top-k"), ({"top_p": 0.0}, "--top-p"),
    ({"top_p": 1.5}, "--top-p"), ({"repetition_penalty": 0.0}, "--repetition-penalty"), ({"num_tokens": 0}, "--num-tokens"),
])
def test_out_of_range_sampling_parameters(kwargs, expected):
    with pytest.raises(GptcError, match=expected):
        SamplingParams(**kwargs).validate(256)


def test_generate_from_a_checkpoint_streams_and_warns_on_a_long_prompt(tmp_path, monkeypatch, capsys):
    import io
    from dataclasses import replace

    from gptc.tools.generate import run_generate
    from gptc.tools.train import train
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 200)
    spec = gptc.preset("tiny")
    spec = replace(spec, train=replace(spec.train, steps=5, checkpoint_interval=5, eval_interval=5, eval_batches=1))
    result = train(spec, str(data), device="cpu", out_dir=tmp_path / "run", stdout=io.StringIO())
    out, warnings = io.StringIO(), []
    prompt = "question " * 20  # longer than the 32-token context
    text = run_generate(str(result.run_dir), prompt, SamplingParams(num_tokens=10, seed=3), "cpu", out=out,
                        log=warnings.append)
    assert out.getvalue().startswith(prompt) and out.getvalue().rstrip("\n") == text
    assert any("more than the context of 32" in w for w in warnings)
    again = run_generate(str(result.run_dir), prompt, SamplingParams(num_tokens=10, seed=3), "cpu",
                         out=io.StringIO(), log=lambda line: None)
    assert again == text
    with pytest.raises(GptcError, match="prompt is empty"):
        run_generate(str(result.run_dir), "", SamplingParams(num_tokens=1), "cpu", out=io.StringIO(), log=lambda l: None)

    # a tokenizer that does not match the model: its ids are refused in one line, not read out of bounds
    from gptc.tools.cli import main
    from gptc.tools.tokenizer import Tokenizer
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: np.array([1, spec.model.vocab_size + 5], np.int32))
    assert main(["generate", "--checkpoint", str(result.run_dir), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"gptc: error: tokens: id {spec.model.vocab_size + 5} at [0, 1] is outside "
                                    f"[0, {spec.model.vocab_size})")

def test_running_out_of_memory_while_sampling_is_one_line(tmp_path, monkeypatch):
    import io
    from dataclasses import replace

    from gptc.runtime.reference import ReferenceExecutor
    from gptc.tools.generate import run_generate
    from gptc.tools.train import train
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 200)
    spec = gptc.preset("tiny")
    spec = replace(spec, train=replace(spec.train, steps=2, checkpoint_interval=2, eval_interval=2, eval_batches=1))
    train(spec, str(data), device="cpu", out_dir=tmp_path / "run", stdout=io.StringIO())

    def no_memory(self, inputs):
        raise MemoryError
    monkeypatch.setattr(ReferenceExecutor, "run", no_memory)
    with pytest.raises(GptcError, match=r"^sampling with a context of 32 tokens needs about .* GiB on the CPU .*, and "
                                        r"ran out of memory; sample on a GPU \(--device gpu\)$"):
        run_generate(str(tmp_path / "run"), "x", SamplingParams(num_tokens=3), "cpu", out=io.StringIO(),
                     log=lambda line: None)


def test_rows_past_the_tokenizer_are_never_sampled(tmp_path):
    """A model with more embedding rows than its tokenizer has tokens: even when those
    rows' logits are the largest, sampling stays inside the tokenizer's vocabulary."""
    import io
    from dataclasses import replace

    from gptc.tools import checkpoint as ckpt
    from gptc.tools.generate import run_generate
    from gptc.tools.tokenizer import Tokenizer
    from gptc.tools.train import train
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 200)
    spec = gptc.preset("tiny")
    spec = replace(spec, model=replace(spec.model, vocab_size=400),
                   train=replace(spec.train, steps=2, checkpoint_interval=2, eval_interval=2, eval_batches=1))
    train(spec, str(data), device="cpu", out_dir=tmp_path / "run", stdout=io.StringIO())
    c = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002")
    n = Tokenizer.from_json(c.tokenizer_json).vocab_size
    assert n < 400
    c.params["lm_head.bias"][n:] = 100.0  # the padded rows win every argmax and nearly all probability
    ckpt.save_checkpoint(tmp_path / "edited", 2, c.params, c.optimizer, c.rng_state, c.spec, c.tokenizer_json)
    for params in (SamplingParams(num_tokens=20, greedy=True), SamplingParams(num_tokens=20, top_k=0, seed=1)):
        text = run_generate(str(tmp_path / "edited"), "To be", params, "cpu", out=io.StringIO(), log=lambda l: None)
        assert text.startswith("To be") and len(text) > len("To be")


def test_a_checkpoint_of_the_former_tokenizer_is_refused_in_one_line(tmp_path, capsys):
    """gptc's former hand-written BPE wrote its own tokenizer.json format: generating from
    such a checkpoint says so in one line (its pre-tokenizer cannot be carried over)."""
    import io
    from dataclasses import replace

    from gptc.tools import checkpoint as ckpt
    from gptc.tools.cli import main
    from gptc.tools.train import train
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 200)
    spec = gptc.preset("tiny")
    spec = replace(spec, train=replace(spec.train, steps=2, checkpoint_interval=2, eval_interval=2, eval_batches=1))
    train(spec, str(data), device="cpu", out_dir=tmp_path / "run", stdout=io.StringIO())
    c = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002")
    old = '{\n"format": "gptc-bpe",\n"version": 1,\n"pretokenizer": "gptc-re-v1",\n"vocab_size": 256,\n"merges": []\n}\n'
    ckpt.save_checkpoint(tmp_path / "old", 2, c.params, c.optimizer, c.rng_state, c.spec, old)
    assert main(["generate", "--checkpoint", str(tmp_path / "old"), "--prompt", "To be", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"gptc: error: checkpoint '{tmp_path / 'old'}': invalid tokenizer: it is a file of gptc's former hand-written "
        "BPE (format 'gptc-bpe'), which this gptc no longer reads (its pre-tokenizer differs from GPT-2's); train "
        "the run again\n")


@pytest.mark.parametrize("sink", [0, 4], ids=["recompute", "stream"])
def test_chained_decode_steps_generate_what_single_steps_do(monkeypatch, sink):
    """generate_batch queues up to model.chain_steps decode steps at once (their
    positions, slots and token indices worked out ahead, each drawn token fed to the
    next step): a ragged batch sampled with a seed draws what one step at a time draws,
    past the context; chains stop where the longest sequence fills the context. (GPU
    models chain CHAIN_STEPS; the CPU reference, one step at a time, streams each token.)"""
    from gptc.tools import generate
    spec = decode_spec("causal")
    model = cpu_model(spec, sampling_params(spec), 4, sink=sink)
    assert model.chain_steps == 1
    p = SamplingParams(num_tokens=40, temperature=0.8, top_k=40, seed=3)
    lengths = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda tokens, positions, *a: (lengths.append(len(positions)),
                                                                        decode(tokens, positions, *a))[1])
    alone = list(generate_batch(model, RAGGED_PROMPTS, p))
    assert set(lengths) == {1}
    lengths.clear()
    model.chain_steps = generate.CHAIN_STEPS
    assert list(generate_batch(model, RAGGED_PROMPTS, p)) == alone
    # The longest prompt has 12 tokens: 16 steps, then 4 until it holds 32; streaming goes on.
    assert lengths == ([16, 4] if not sink else [16, 16, 4, 2, 1])
    assert list(generate_batch(model, RAGGED_PROMPTS, replace(p, num_tokens=0))) == []
    with pytest.raises(ValueError):
        generate.chain_length(0)
    assert [generate.chain_length(n, 1) for n in (1, 2, 3, 7, 16, 17, 100)] == [1, 1, 1, 1, 1, 1, 1]
    assert [generate.chain_length(n, 16) for n in (1, 2, 3, 7, 16, 17, 100)] == [1, 2, 2, 4, 16, 16, 16]
