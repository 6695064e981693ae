"""Sampling on the device (ops/sample.py, models/sampling.py): the op's reference keeps
the host sampler's semantics (generate.choose), the kernel's threshold searches pick what
the reference's sort picks, the same seed gives the same tokens, and the kernels
compile for sm_90 (NVRTC) and gfx90a (hiprtc). The GPU checks are in test_gpu_sampling.py."""
from __future__ import annotations

import numpy as np
import pytest

import gptc
from gptc.compiler.ir import Graph
from gptc.compiler.ops.random import philox4x32_10
from gptc.compiler.ops.sample import INTS, QUANTUM, SETTINGS, STREAM, sample_row, settings_arrays
from gptc.models import build_graph
from gptc.models.sampling import SEEN, seen_rows
from gptc.runtime.reference import run_graph
from gptc.tools.generate import SamplingParams, choose, cpu_model, generate_tokens
from test_generate import sampling_params


def sample_graph(rows: int, vocab: int, dtype: str = "f32") -> Graph:
    """sample_tokens alone, every operand an input."""
    g = Graph()
    logits, seen = g.input("logits", (rows, vocab), dtype), g.input("seen", (rows, vocab))
    settings, ints = g.input("settings", (len(SETTINGS),)), g.input("ints", (len(INTS),), "i32")
    index, sequence = g.input("index", (rows,), "i32"), g.input("sequence", (rows,), "i32")
    g.output("token", logits._new("sample_tokens", [logits, seen, settings, ints, index, sequence]))
    return g


def feeds_for(logits, seen=None, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, greedy=False, seed=0,
              limit=None, index=None, sequence=None) -> dict:
    """The operands; each row's sequence id defaults to its row number."""
    rows, vocab = logits.shape
    settings, ints = settings_arrays(temperature, top_k, top_p, penalty, greedy, seed, vocab if limit is None else limit)
    return {"logits": logits.astype(np.float32), "seen": np.zeros((rows, vocab), np.float32) if seen is None else seen,
            "settings": settings, "ints": ints,
            "index": np.zeros(rows, np.int32) if index is None else np.asarray(index, np.int32),
            "sequence": np.arange(rows, dtype=np.int32) if sequence is None else np.asarray(sequence, np.int32)}


def sample(feeds: dict) -> np.ndarray:
    rows, vocab = feeds["logits"].shape
    return run_graph(sample_graph(rows, vocab), feeds)["outputs"]["token"]


def kernel_like(z_row, seen_row, settings, ints, row, index, threads: int = 8) -> int:
    """The kernel's algorithm (templates/sample_tokens.hip.j2) in NumPy: radix selections over
    counts and masses instead of a sort, then the draw placed by `threads` contiguous
    segments of the row."""
    inv_t, top_p, pen, inv_pen, greedy = (np.float32(s) for s in settings)
    top_k, limit, lo32, hi32 = (int(i) for i in np.asarray(ints, np.int32).view(np.uint32))
    n = min(max(limit, 1), z_row.shape[0])
    z = z_row[:n].astype(np.float32)
    z = np.where(seen_row[:n] != 0, np.where(z > 0, z * inv_pen, z * pen), z).astype(np.float32)
    u = z.view(np.uint32).astype(np.int64)
    key = np.where(u & 0x80000000, ~u & 0xFFFFFFFF, u | 0x80000000)
    best = int(np.max((key.astype(np.uint64) << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.arange(n, dtype=np.uint64))))
    if greedy:
        return 0xFFFFFFFF - (best & 0xFFFFFFFF)
    k_max = best >> 32
    z_max = np.array([(k_max & 0x7FFFFFFF) if k_max & 0x80000000 else (~k_max & 0xFFFFFFFF)], np.uint32).view(np.float32)[0]
    cut_k = 0 < top_k < n
    valid = np.ones(n, bool)
    if cut_k:
        prefix, mask, rest = 0, 0, top_k
        for shift in (24, 16, 8, 0):
            hist = np.bincount((key[(key & mask) == prefix] >> shift) & 255, minlength=256)
            above, d = 0, 255
            while d > 0 and above + hist[d] < rest:
                above += hist[d]
                d -= 1
            prefix, mask, rest = prefix | d << shift, mask | 255 << shift, rest - above
        cut = np.array([(prefix & 0x7FFFFFFF) if prefix & 0x80000000 else (~prefix & 0xFFFFFFFF)],
                       np.uint32).view(np.float32)[0]
        valid = z >= cut
    e = np.exp(((z - z_max) * inv_t).astype(np.float32)).astype(np.float32)
    q = np.where(valid, (e * np.float32(QUANTUM)).astype(np.int64), 0)
    total = int(q.sum())
    cut_p = top_p < 1
    kept_mass, t_star, keep = total, 0, 0
    if cut_p:
        p_mass = float(top_p) * float(total)
        prefix, mask, above = 0, 0, 0
        for shift in (24, 16, 8, 0):
            chosen = (q > 0) & ((q & mask) == prefix)
            hist = np.bincount((q[chosen] >> shift) & 255, weights=q[chosen], minlength=256).astype(np.int64)
            acc, digit, value = above, None, None
            for d in range(255, -1, -1):
                if hist[d] > 0:
                    if not acc < p_mass:
                        break
                    digit, value = d, acc
                acc += int(hist[d])
            members_mass = int(hist[digit])
            prefix, mask, above = prefix | digit << shift, mask | 255 << shift, value
        t_star = prefix
        members = members_mass // t_star
        m = int((p_mass - float(above)) / float(t_star))
        while m > 0 and float(above + m * t_star) >= p_mass:
            m -= 1
        while float(above + (m + 1) * t_star) < p_mass:
            m += 1
        keep = min(m + 1, members)
        kept_mass = above + keep * t_star
    w = philox4x32_10((index % 2**32, row, STREAM, 0), (lo32, hi32))
    r = ((int(w[0]) | int(w[1]) << 32) * int(kept_mass)) >> 64
    segment = -(-n // threads)
    bounds = [(min(n, t * segment), min(n, t * segment + segment)) for t in range(threads)]

    def kept(i: int, before: int) -> tuple[int, int]:
        x = int(q[i])
        if not cut_p or x > t_star:
            return x, before
        if x < t_star:
            return 0, before
        return (x if before < keep else 0), before + 1
    ranks, masses = [], []
    rank = 0
    for b, e_ in bounds:
        ranks.append(rank)
        rank += sum(1 for i in range(b, e_) if cut_p and q[i] == t_star)
        mass, before = 0, ranks[-1]
        for i in range(b, e_):
            x, before = kept(i, before)
            mass += x
        masses.append(mass)
    start = 0
    for (b, e_), rank, mass in zip(bounds, ranks, masses):
        if start <= r < start + mass:
            run = start
            for i in range(b, e_):
                x, rank = kept(i, rank)
                run += x
                if r < run:
                    return i
        start += mass
    return n - 1


def awkward_rows(rng, rows: int, vocab: int) -> np.ndarray:
    """Logits with ties (a few distinct values), plateaus at the top and wide ranges."""
    z = rng.standard_normal((rows, vocab)).astype(np.float32) * rng.uniform(0.1, 8, (rows, 1)).astype(np.float32)
    z[::3] = np.round(z[::3])           # many ties
    z[1::5, : vocab // 2] = z[1::5, :1]  # a plateau of equal logits
    return z


@pytest.mark.parametrize("vocab", [1, 2, 7, 100, 613])
def test_threshold_search_picks_what_the_sort_picks(vocab):
    rng = np.random.default_rng(vocab)
    z = awkward_rows(rng, 48, vocab)
    seen = (rng.random((48, vocab)) < 0.2).astype(np.float32)
    for case in range(12):
        settings, ints = settings_arrays(float(rng.choice([0.3, 1.0, 1.7])), int(rng.integers(0, vocab + 1)),
                                         float(rng.choice([1.0, 0.9, 0.5, 1e-4, 0.999])),
                                         float(rng.choice([1.0, 1.3, 0.7])), bool(case == 0), case, vocab)
        for b in range(z.shape[0]):
            want = sample_row(z[b], seen[b], settings, ints, b, case)
            assert want == kernel_like(z[b], seen[b], settings, ints, b, case, threads=1 + b % 9)


def test_greedy_is_argmax_and_equals_the_host():
    rng = np.random.default_rng(0)
    z = awkward_rows(rng, 64, 50)
    assert (sample(feeds_for(z, greedy=True)) == np.argmax(z, axis=1)).all()  # the first of ties
    seen = (rng.random(z.shape) < 0.3).astype(np.float32)
    tokens = sample(feeds_for(z, seen, penalty=1.8, greedy=True))
    host = [choose(z[b], np.flatnonzero(seen[b]), SamplingParams(greedy=True, repetition_penalty=1.8), rng)
            for b in range(z.shape[0])]
    assert tokens.tolist() == host


def test_top_k_one_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((200, 97)).astype(np.float32) * 3  # no ties
    greedy = np.argmax(z, axis=1)
    for seed in range(3):
        index = rng.integers(0, 2**31 - 1, 200)
        assert (sample(feeds_for(z, top_k=1, seed=seed, index=index)) == greedy).all()
        assert (sample(feeds_for(z, top_p=1e-6, seed=seed, index=index)) == greedy).all()
    ties = np.zeros((4, 9), np.float32)  # every token tied: tiny top-p keeps the first only
    assert (sample(feeds_for(ties, top_p=1e-6, top_k=0)) == 0).all()


def frequencies(logits_row: np.ndarray, draws: int, **options) -> np.ndarray:
    """How often each token is drawn from one row of logits over `draws` token indices."""
    z = np.repeat(logits_row[None], draws, 0)
    tokens = sample(feeds_for(z, index=np.arange(draws) // 7, seed=11, **options))
    return np.bincount(tokens, minlength=z.shape[1]) / draws


def host_probabilities(z: np.ndarray, history=(), **options) -> np.ndarray:
    """The distribution generate.choose draws from (its steps before the draw)."""
    p = SamplingParams(**options)
    counts = np.zeros(z.shape[0])
    rng = np.random.default_rng(5)
    for _ in range(20000):
        counts[choose(z, list(history), p, rng)] += 1
    return counts / counts.sum()


@pytest.mark.parametrize("options", [dict(temperature=1.0, top_k=0), dict(temperature=0.5, top_k=0),
                                     dict(temperature=2.0, top_k=0), dict(top_k=3), dict(top_k=0, top_p=0.7),
                                     dict(top_k=5, top_p=0.8, temperature=1.5),
                                     dict(top_k=0, repetition_penalty=2.0)])
def test_distribution_matches_the_host_sampler(options):
    z = np.array([2.0, 1.5, 1.5, 0.3, -0.4, -1.0, 0.9, -3.0], np.float32)
    history = [1, 5] if "repetition_penalty" in options else []
    seen = np.zeros((1, z.size), np.float32)
    seen[0, history] = 1.0
    draws = 20000
    zz = np.repeat(z[None], draws, 0)
    tokens = sample(feeds_for(zz, np.repeat(seen, draws, 0), index=np.arange(draws), seed=3,
                              temperature=options.get("temperature", 1.0), top_k=options.get("top_k", 50),
                              top_p=options.get("top_p", 1.0), penalty=options.get("repetition_penalty", 1.0)))
    got = np.bincount(tokens, minlength=z.size) / draws
    want = host_probabilities(z, history, **options)
    assert set(np.flatnonzero(got)) == set(np.flatnonzero(want))  # the same support (cuts)
    assert np.abs(got - want).max() < 0.02
    # and the exact distribution of the op: softmax of the penalised, scaled, cut logits
    if options.get("top_p", 1.0) == 1.0:
        zp = np.where(seen[0] != 0, np.where(z > 0, z / options.get("repetition_penalty", 1.0),
                                             z * options.get("repetition_penalty", 1.0)), z)
        k = options.get("top_k", 50)
        zp = np.where(zp >= np.sort(zp)[-k], zp, -np.inf) if 0 < k < z.size else zp
        exact = np.exp((zp - zp.max()) / options.get("temperature", 1.0))
        assert np.abs(got - exact / exact.sum()).max() < 0.015


def test_vocab_limit_and_seed_bits():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((300, 40)).astype(np.float32)
    z[:, 30:] = 50.0  # rows past the limit would win everything
    assert (sample(feeds_for(z, limit=30, seed=1, index=np.arange(300))) < 30).all()
    assert (sample(feeds_for(z, limit=30, greedy=True)) < 30).all()
    low = sample(feeds_for(z, seed=7, index=np.arange(300)))
    high = sample(feeds_for(z, seed=7 + 2**32, index=np.arange(300)))
    assert (low != high).any()  # the seed's high word keys the draws too
    again = sample(feeds_for(z, seed=7, index=np.arange(300)))
    assert (low == again).all()


def test_decode_graph_marks_the_drawn_token_seen():
    spec = gptc.preset("tiny")
    assert "next_token" not in build_graph(spec, "decode", 2).outputs  # the tail is asked for
    g = build_graph(spec, "decode", 2, sample=True)
    assert "next_token" in g.outputs and SEEN in g.updates
    params = sampling_params(spec)
    feeds = {**params, **{n: np.zeros(g.type(i).shape, np.float32) for n, i in g.states.items()}}
    settings, ints = settings_arrays(1.0, 0, 1.0, 1.0, False, 3, spec.model.vocab_size)
    feeds.update(tokens=np.array([[3], [4]], np.int32), pos=np.array([0, 0], np.int32), sample_settings=settings,
                 sample_ints=ints, sample_index=np.array([0, 0], np.int32), sample_sequence=np.array([0, 1], np.int32))
    feeds[SEEN] = seen_rows([[1, 2], [3]], spec.model.vocab_size)
    out = run_graph(g, feeds)
    token = out["outputs"]["next_token"]
    want = np.array([sample_row(out["outputs"]["logits"][b], feeds[SEEN][b], settings, ints, b, 0) for b in range(2)])
    assert (token == want).all()
    updated = out["updates"][SEEN]
    assert updated[0, [1, 2, token[0]]].all() and updated[1, [3, token[1]]].all()
    assert updated.sum() == len({1, 2, int(token[0])}) + len({3, int(token[1])})


def test_same_seed_same_tokens_with_and_without_the_cache():
    spec = gptc.preset("tiny")
    params = sampling_params(spec)
    p = SamplingParams(num_tokens=45, temperature=1.2, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=9)
    first = list(generate_tokens(cpu_model(spec, params), [5, 6, 7], p))
    assert first == list(generate_tokens(cpu_model(spec, params), [5, 6, 7], p))
    assert first == list(generate_tokens(cpu_model(spec, params), [5, 6, 7], p, use_cache=False))
    other = SamplingParams(num_tokens=45, temperature=1.2, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=10)
    assert first != list(generate_tokens(cpu_model(spec, params), [5, 6, 7], other))
    assert len(set(first)) > 5


def test_repetition_penalty_reaches_the_prompt_and_the_drawn_tokens():
    """With a huge penalty and greedy choice, no token repeats until every token was
    used (the host's semantics: the history is the prompt and everything drawn)."""
    spec = gptc.preset("tiny")
    params = sampling_params(spec)
    p = SamplingParams(num_tokens=30, greedy=True, repetition_penalty=1e6)
    prompt = [1, 2, 3]
    tokens = list(generate_tokens(cpu_model(spec, params), prompt, p))
    assert len(set(tokens) | set(prompt)) == len(tokens) + len(prompt)


@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_sampling_kernels_compile(target):
    from gptc.compiler.codegen.kernels import render_plan
    from gptc.compiler.planner import make_plan
    from gptc.runtime.device import compile_many
    from gptc.target import parse_target
    t = parse_target(target)
    tiny = gptc.preset("tiny")
    graphs = [sample_graph(3, 50257), sample_graph(1, 7, "bf16"), build_graph(tiny, "decode", 2, sample=True),
              build_graph(tiny, "prefill", 1, sample=True)]
    kernels = [k for g in graphs for k in render_plan(make_plan(g), t) if k.family == "sample_tokens" or "sample" in k.origin]
    assert sum(k.family == "sample_tokens" for k in kernels) == len(graphs)
    compile_many([(k.code, k.symbol, (), k.origin) for k in kernels], t)
