"""The KV-cache decode: ragged batches, the flash-decoding ops, and a decode step that
touches only what it must (the new rows of the cache, the keys up to the position)."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc.compiler import dsl
from gptc.compiler.codegen.kernels import prelude, render_plan
from gptc.compiler.planner import make_plan
from gptc.compiler.planner.cost import plan_costs
from gptc.models import build_graph
from gptc.runtime.reference import run_graph
from gptc.target import parse_target
from gptc.tools.generate import SamplingParams, cpu_model, generate_batch
from test_generate import DECODE_OPTIONS, RAGGED_PROMPTS, check_generation, decode_spec, sampling_params


@pytest.mark.parametrize("name", list(DECODE_OPTIONS))
def test_ragged_batch_equals_full_recomputation_of_each_sequence(name):
    """Prompts of 5, 1, 12 and 2 tokens decode together, each at its own position, and
    every sequence's greedy text equals recomputing it alone without a cache."""
    spec = decode_spec(name)
    params = sampling_params(spec)
    check_generation(spec, cpu_model(spec, params, batch=4), params, RAGGED_PROMPTS)


@pytest.mark.parametrize("name", ["causal", "rope", "gqa", "local-gqa", "linear"])
def test_bf16_ragged_batch_equals_full_recomputation_of_each_sequence(name):
    """The same in bf16 mixed precision (compiler/precision.py runs on the prefill, decode
    and infer graphs alike): the cached greedy text equals the bf16 recomputation."""
    spec = decode_spec(name)
    spec = replace(spec, train=replace(spec.train, precision="bf16"))
    params = sampling_params(spec)
    check_generation(spec, cpu_model(spec, params, batch=4), params, RAGGED_PROMPTS)


def test_a_batch_larger_than_the_prompts_leaves_dummy_rows():
    spec = decode_spec("gqa")
    params = sampling_params(spec)
    check_generation(spec, cpu_model(spec, params, batch=3), params, RAGGED_PROMPTS[:2])


# ----- prefill at the prompts' length ----------------------------------------------------
@pytest.mark.parametrize("name", ["causal", "rope", "gqa", "local-gqa", "linear", "moe", "rmsnorm-sinusoidal-swiglu"])
def test_a_shorter_prefill_equals_the_whole_context_prefill(name):
    """A prefill of L < S tokens (gptc.models.prefill_lengths) gives the same logits of
    each sequence's last token, and the same cache rows (or linear attention state), as
    the prefill over the whole context, for prompts of up to L tokens (float64)."""
    from gptc.models import prefill_lengths
    spec = decode_spec(name)
    params = sampling_params(spec)
    s, short = spec.model.seq_len, prefill_lengths(spec)[-1]
    assert short < s
    prompts = [p for p in RAGGED_PROMPTS if len(p) <= short]
    results = []
    for n in (s, short):
        graph = build_graph(spec, "prefill", len(prompts), n)
        tokens = np.zeros((len(prompts), n), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        last = np.array([b * n + len(p) - 1 for b, p in enumerate(prompts)], np.int32)
        states = {k: np.zeros(graph.type(v).shape) for k, v in graph.states.items()}
        results.append(run_graph(graph, {"tokens": tokens, "last": last, **params, **states}, np.float64))
    whole, part = results
    np.testing.assert_allclose(part["outputs"]["logits"], whole["outputs"]["logits"], rtol=1e-9, atol=1e-9)
    assert whole["updates"].keys() == part["updates"].keys() and whole["updates"]
    for key, value in whole["updates"].items():
        if key.startswith(("k_cache", "v_cache")):  # the rows the prompts fill
            for b, p in enumerate(prompts):
                np.testing.assert_allclose(part["updates"][key][b, :, :len(p)], value[b, :, :len(p)], rtol=1e-9, atol=1e-9)
        else:
            np.testing.assert_allclose(part["updates"][key], value, rtol=1e-9, atol=1e-9)


def test_generation_prefills_at_the_shortest_length_that_holds_the_prompts():
    spec = decode_spec("gqa")
    model = cpu_model(spec, sampling_params(spec), batch=4)
    assert sorted(model.prefill_steps) == [8, 32]
    runs = {n: [] for n in model.prefill_steps}
    for n, step in model.prefill_steps.items():
        step.run = (lambda run, n=n: lambda feeds: runs[n].append(feeds["tokens"].shape) or run(feeds))(step.run)
    p = SamplingParams(num_tokens=3, greedy=True)
    list(generate_batch(model, [p[:8] for p in RAGGED_PROMPTS], p))  # longest 8 tokens
    list(generate_batch(model, RAGGED_PROMPTS, p))                   # longest 12 tokens
    assert runs == {8: [(4, 8)], 32: [(4, 32)]}


# ----- past the context: the streaming cache (--past-context stream) ---------------------
SINK = 4


def stream_spec(name: str, **model) -> gptc.Spec:
    spec = decode_spec(name)
    return replace(spec, model=replace(spec.model, **model))


def streaming_window(tokens: list[int], seq: int, sink: int = SINK) -> list[int]:
    """What a StreamingLLM cache holds before the next token: the first `sink` tokens and
    the most recent ones, at positions 0..seq-1 in that order."""
    return tokens if len(tokens) <= seq else tokens[:sink] + tokens[-(seq - sink):]


@pytest.mark.parametrize("name,model", [("rope", dict(n_layers=1)), ("local-gqa", dict(n_layers=1, pos="rope")),
                                        ("rope-half", dict(n_layers=1, n_heads=4, n_kv_heads=1))])
def test_streaming_cache_equals_recomputing_the_streaming_window(name, model):
    """A one-layer RoPE model (its keys and values depend on the token only, RoPE on the
    position within the cache): decoding 40 tokens past prompts of a ragged batch with the
    ring cache gives, at every step, what recomputing the cache's window (the first 4
    tokens and the most recent ones, positions 0..S-1) gives."""
    spec = stream_spec(name, **model)
    params = sampling_params(spec)
    p = SamplingParams(num_tokens=40, greedy=True)
    got = [list(seq) for seq in zip(*generate_batch(cpu_model(spec, params, 4, sink=SINK), RAGGED_PROMPTS, p))]
    alone = cpu_model(spec, params)
    for prompt, tokens in zip(RAGGED_PROMPTS, got):
        text = list(prompt)
        alone.start([text], p, spec.model.vocab_size)
        for token in tokens:  # greedy: the first largest logit of the window recomputed
            assert token == alone.prefill([streaming_window(text, spec.model.seq_len)], 0)[0]
            text.append(token)
        assert len(text) > spec.model.seq_len + 8 and len(set(tokens)) > 1


@pytest.mark.parametrize("name", [n for n in DECODE_OPTIONS if not n.startswith("linear")])
def test_streaming_cache_equals_the_exact_decode_within_the_context(name):
    """Every decoding option: until a sequence outgrows the context, the streaming cache
    decodes exactly as the default; past it, it keeps decoding (no prefill)."""
    spec = decode_spec(name)
    params = sampling_params(spec)
    p = SamplingParams(num_tokens=40, greedy=True)
    exact = [list(seq) for seq in zip(*generate_batch(cpu_model(spec, params, 4), RAGGED_PROMPTS, p))]
    model = cpu_model(spec, params, 4, sink=SINK)
    prefills = []
    model.prefill_step.run = (lambda run: lambda feeds: prefills.append(1) or run(feeds))(model.prefill_step.run)
    stream = [list(seq) for seq in zip(*generate_batch(model, RAGGED_PROMPTS, p))]
    assert len(prefills) == 1
    for prompt, a, b in zip(RAGGED_PROMPTS, exact, stream):
        fits = spec.model.seq_len - len(prompt) + 1  # tokens chosen while the text fits the context
        assert a[:fits] == b[:fits] and len(b) == 40


def test_streaming_cache_refusals():
    with pytest.raises(gptc.SpecError, match="keeps 1 to 30 first tokens"):
        build_graph(decode_spec("causal"), "decode", 1, sink=31)
    with pytest.raises(gptc.SpecError, match="linear attention keeps a state"):
        build_graph(decode_spec("linear"), "decode", 1, sink=4)


# ----- the ops against a direct float64 computation ------------------------------------
def masked_attention(q, k, v, pos, window):
    """Softmax attention of q (B, H, 1, D) over keys j <= pos[b] (and pos[b] - j < window)."""
    batch, heads, _, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(batch):
        j = np.arange(k.shape[2])
        seen = (j <= pos[b]) & ((pos[b] - j < window) if window else True)
        for h in range(heads):
            s = k[b, h // group] @ q[b, h, 0] / np.sqrt(dim)
            s = np.where(seen, s, -np.inf)
            p = np.exp(s - s.max())
            out[b, h, 0] = (p / p.sum()) @ v[b, h // group]
    return out


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 45])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, 0), (4, 2, 0), (6, 1, 0), (4, 2, 5), (2, 2, 1)])
def test_decode_attention_equals_masked_softmax(splits, heads, kv_heads, window):
    rng = np.random.default_rng(splits * 31 + heads)
    batch, seq, dim = 5, 45, 24
    q = rng.standard_normal((batch, heads, 1, dim))
    k, v = (rng.standard_normal((batch, kv_heads, seq, dim)) for _ in range(2))
    pos = np.array([0, 1, 44, 17, 30], np.int32)
    g = gptc.Graph()
    ins = {n: g.input(n, x.shape) for n, x in (("q", q), ("k", k), ("v", v))}
    p = g.input("pos", (batch,), "i32", bound=seq)
    g.output("y", dsl.decode_attention(ins["q"], ins["k"], ins["v"], p, 1 / np.sqrt(dim), window, splits))
    got = run_graph(g, {"q": q, "k": k, "v": v, "pos": pos}, np.float64)["outputs"]["y"]
    np.testing.assert_allclose(got, masked_attention(q, k, v, pos, window), rtol=1e-12, atol=1e-12)


def test_kv_write_replaces_only_row_pos_of_each_sequence():
    rng = np.random.default_rng(0)
    cache, value = rng.standard_normal((3, 2, 9, 4)), rng.standard_normal((3, 2, 1, 4))
    pos = np.array([0, 8, 3], np.int32)
    g = gptc.Graph()
    g.output("c", dsl.kv_write(g.input("cache", cache.shape), g.input("value", value.shape),
                               g.input("pos", (3,), "i32", bound=9)))
    got = run_graph(g, {"cache": cache, "value": value, "pos": pos}, np.float64)["outputs"]["c"]
    want = cache.copy()
    for b, p in enumerate(pos):
        want[b, :, p] = value[b, :, 0]
    np.testing.assert_array_equal(got, want)


# ----- the plan: what a decode step touches ----------------------------------------------
def decode_plan(name: str, seq: int, batch: int = 2):
    spec = decode_spec(name)
    spec = replace(spec, model=replace(spec.model, seq_len=seq))
    return make_plan(build_graph(spec, "decode", batch), True)


@pytest.mark.parametrize("name", ["causal", "rope", "gqa", "local-gqa", "mqa"])
def test_no_launch_of_a_decode_step_writes_or_copies_a_whole_cache(name):
    plan = decode_plan(name, 64)
    g = plan.graph
    caches = {g.states[n] for n in g.states}
    cache_buffers = {(plan.buffer_of(c).arena, plan.buffer_of(c).offset) for c in caches}
    writers = []
    for kern in plan.kernels:
        for r in kern.roots:
            buf = plan.buffer_of(r)
            if (buf.arena, buf.offset) in cache_buffers:
                writers.append(kern)
        assert not (kern.family == "kv_write" and set(kern.reads) & caches)  # never loads the cache
    assert sorted(k.family for k in writers) == ["kv_write"] * len(caches)
    assert all(len(k.nodes) == 1 for k in writers)
    # the generated store indexes the cache by the position input, one row per (b, head)
    for source in render_plan(plan, parse_target("cuda:sm_90")):
        if source.family == "kv_write":
            assert re.search(r"\[\(\(b \* \d+ \+ h\) \* 64 \+ p\) \* \d+ \+ d\] = ", source.source)


@pytest.mark.parametrize("name", ["causal", "rope", "gqa", "local-gqa"])
def test_bytes_of_a_decode_step_do_not_grow_with_the_context_but_the_attention_reads(name):
    """The same model at contexts of 2048 and 8192 (both long enough for the most key
    chunks the flash-decoding kernel takes): every launch moves the same bytes, except
    the flash-decoding kernel, which reads the keys and values (up to pos)."""
    small, large = (plan_costs(decode_plan(name, seq)) for seq in (2048, 8192))
    assert [c.family for c in small] == [c.family for c in large]
    for a, b in zip(small, large):
        if a.family == "decode_attention":
            assert b.bytes_read > 3 * a.bytes_read and b.bytes_written == a.bytes_written
        else:
            assert (a.family, a.bytes) == (b.family, b.bytes)


def test_flash_decoding_splits_the_keys_when_the_batch_is_small():
    spec = gptc.preset("gpt2")

    def splits(batch: int) -> int:
        g = build_graph(spec, "decode", batch)
        (n,) = {g.node(i)["attrs"]["splits"] for i in g.nx.nodes if g.op(i) == "decode_attention"}
        return n
    assert splits(1) > 8 and splits(64) == 1


# ----- compiling ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_decode_kernels_compile(target):
    """The decode step's kernels for head_dim 8 and 16 (tiny), 24, 32, 64, 80, 128, with GQA,
    MQA, a window, RoPE, several key chunks, and with the streaming cache (RoPE in the
    kernel, a window over positions): every distinct kernel compiles."""
    sink = dict(sink=SINK)
    from gptc.runtime.device import compile_many
    codes = {}
    cases = [("causal", 1, {}), ("local-gqa", 3, {}), ("rope", 2, {}), ("mqa", 1, {}),
             ("gqa", 1, dict(n_heads=2, d_model=48)), ("rope", 1, dict(n_heads=2, d_model=64)),
             ("local-gqa", 2, dict(n_heads=4, n_kv_heads=2, d_model=256)), ("gqa", 1, dict(n_heads=2, d_model=160)),
             ("rope", 2, dict(n_heads=2, d_model=256)), ("causal", 1, dict(seq_len=1024))]
    cases += [("rope", 2, dict(sink)), ("local-gqa", 1, dict(sink, pos="rope")), ("causal", 3, dict(sink)),
              ("local", 2, dict(sink, n_heads=2, d_model=160)), ("rope-half", 1, dict(sink, n_heads=1, d_model=128))]
    for name, batch, model in cases:
        spec = decode_spec(name)
        sink_slots = model.pop("sink", 0)
        spec = replace(spec, model=replace(spec.model, **model))
        for fuse in (True, False):
            graph = build_graph(spec, "decode", batch, sink=sink_slots)
            for k in render_plan(make_plan(graph, fuse), parse_target(target)):
                if k.family in ("kv_write", "decode_attention", "decode_combine", "matmul"):
                    codes.setdefault(k.code[len(prelude()):], k.symbol)
    assert len(codes) > 10 and any("cosf(angle)" in code for code in codes)
    source = prelude() + "".join(f"namespace k{j} {{\n{code}}}\n" for j, code in enumerate(codes))
    assert len(compile_many([(source, "decode_kernels")], parse_target(target))[0]) > 0


@pytest.mark.parametrize("batch", [1, 8, 9])
def test_decode_products_are_matrix_vector(batch):
    """A decode step's linear layers (batch rows) run as matrix-vector products up to 8
    rows: a block per 8 columns (every weight read once, by many blocks), not 32-row
    tiles; the training step's products stay tiled."""
    from gptc.compiler.codegen.kernels import GEMV_COLUMNS
    spec = gptc.preset("gpt2")
    decode = [k for k in render_plan(make_plan(build_graph(spec, "decode", batch, sample=True)),
                                     parse_target("cuda:sm_90")) if k.family == "matmul"]
    gemv = ["a matrix-vector product" in k.source for k in decode]
    assert all(gemv) if batch <= 8 else not any(gemv)
    if batch <= 8:  # the lm_head (tied: the embedding read transposed) over 50,257 columns
        assert max(k.grid[0] for k in decode) == -(-spec.model.vocab_size // GEMV_COLUMNS)
    train = render_plan(make_plan(build_graph(gptc.preset("tiny"), "train")), parse_target("cuda:sm_90"))
    assert not any("a matrix-vector product" in k.source for k in train)


# ----- gptc generate --prompt-file --batch ----------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import io

    from gptc.tools.train import train
    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 200)
    spec = gptc.preset("tiny")
    spec = replace(spec, train=replace(spec.train, steps=2, checkpoint_interval=2, eval_interval=2, eval_batches=1))
    return train(spec, str(data), device="cpu", out_dir=tmp / "run", stdout=io.StringIO()).run_dir


def test_generate_a_prompt_file_in_ragged_batches(trained_run, tmp_path, capsys):
    """Three prompts of different lengths, two at a time: each text is what the prompt
    gives alone, each written after its header line, the first of each batch streamed."""
    import io

    from gptc.tools.cli import main
    from gptc.tools.generate import SamplingParams, run_generate
    prompts = ["To be", "question", "or not to be, that is the question. To be"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")  # a blank line is skipped
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt-file", str(path), "--batch", "2",
                 "--num-tokens", "12", "--greedy", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    alone = [run_generate(str(trained_run), prompt, SamplingParams(num_tokens=12, greedy=True), "cpu",
                          out=io.StringIO(), log=lambda line: None) for prompt in prompts]
    assert shown == "".join(f"--- prompt {i + 1} of 3 ---\n{text}\n" for i, text in enumerate(alone))
    # sampled, not greedy: prompt i draws with id i (not its row), so the same seed
    # gives each prompt the same text whatever --batch; the first one's is its text alone
    p = SamplingParams(num_tokens=12, seed=4, top_k=0)
    from gptc.tools.generate import run_generate_batch
    texts = [run_generate_batch(str(trained_run), prompts, p, "cpu", out=io.StringIO(), log=lambda l: None, batch=b)
             for b in (1, 2, 3)]
    assert texts[0] == texts[1] == texts[2] and len(set(texts[0])) == 3
    assert texts[0][0] == run_generate(str(trained_run), prompts[0], p, "cpu", out=io.StringIO(), log=lambda l: None)


@pytest.mark.parametrize("args,message", [
    (["--prompt-file", "missing.txt"], "cannot read the prompt file 'missing.txt'"),
    (["--prompt-file", "empty.txt"], "the prompt file 'empty.txt' has no prompt; give one per line"),
    (["--prompt-file", "latin1.txt"], "the prompt file 'latin1.txt' is not UTF-8 text (byte 3)"),
    (["--prompt", "x", "--batch", "0"], "--batch must be at least 1, got 0"),
])
def test_bad_prompt_files_and_batches_are_one_line(trained_run, tmp_path, monkeypatch, capsys, args, message):
    from gptc.tools.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes(b"ab\xe9\n")
    assert main(["generate", "--checkpoint", str(trained_run), *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"gptc: error: {message}")


def test_generate_past_the_context_with_the_streaming_cache(trained_run, capsys):
    """--past-context stream decodes past the context (32 tokens) without a prefill per
    token; before the context is full it gives what the default gives."""
    import io

    from gptc.tools.cli import main
    from gptc.tools.generate import run_generate_batch
    p = SamplingParams(num_tokens=40, greedy=True)
    kwargs = dict(device_name="cpu", out=io.StringIO(), log=lambda line: None)
    exact = run_generate_batch(str(trained_run), ["To be", "or"], p, **kwargs)
    stream = run_generate_batch(str(trained_run), ["To be", "or"], p, batch=2, past_context="stream", sink=2, **kwargs)
    assert len(stream) == 2 and stream != exact
    assert all(s[:25] == e[:25] for s, e in zip(stream, exact))
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "To be", "--num-tokens", "40",
                 "--past-context", "stream", "--sink", "2", "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == stream[0] + "\n"
