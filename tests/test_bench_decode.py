"""`gptc bench --what decode` without a GPU: the smoke mode runs the whole path on the
CPU (gptc's reference executor, the PyTorch peers on the CPU where importable), every
framework generates gptc's greedy tokens, and the report renders; the twin's KV-cache
decoding equals its full recomputation."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gptc
from gptc.tools.bench import decode
from gptc.tools.cli import main


def test_floor_counts_weights_and_the_kv_cache():
    spec = gptc.preset("tiny")
    m = spec.model
    base = decode.floor_ms(spec, 1, 0, 1e12)
    from gptc.models import param_count
    assert base == pytest.approx(param_count(spec) * 4 / 1e12 * 1e3)
    kv = 2 * m.n_layers * m.kv_heads * m.head_dim * 4 * 8 * 10
    assert decode.floor_ms(spec, 8, 10, 1e12) == pytest.approx(base + kv / 1e12 * 1e3)
    assert decode.floor_ms(spec, 8, 10, None) is None


def test_lengths_must_fit_the_context():
    spec = gptc.preset("tiny")
    assert decode.DecodeConfig(spec).lengths() == (spec.model.seq_len // 4, min(64, spec.model.seq_len * 3 // 4))
    with pytest.raises(gptc.spec.GptcError, match="do not fit the context"):
        decode.DecodeConfig(spec, prompt_len=spec.model.seq_len - 1).lengths()


def test_twin_kv_cache_decoding_equals_recomputation():
    torch = pytest.importorskip("torch")
    from gptc.models import build_graph, init_params
    from gptc.tools.bench import torch_twin as tm
    from dataclasses import replace
    for options in ({}, dict(pos="rope", n_kv_heads=1), dict(attention="local", window=5)):
        spec = gptc.preset("tiny")
        spec = replace(spec, model=replace(spec.model, **options))
        params = {k: v * (8.0 if v.ndim >= 2 else 1.0) for k, v in init_params(build_graph(spec, "infer", 1), 1).items()}
        model = tm.build_model(spec.model, params, "cpu")
        tokens = torch.from_numpy(np.random.default_rng(0).integers(0, spec.model.vocab_size, (2, 20)))
        cache = tm.KVCache(spec.model, 2, "cpu")
        with torch.no_grad():
            full = model(tokens)
            first = tm.forward_cached(model, tokens[:, :12], torch.arange(12), cache)
            assert torch.allclose(first, full[:, 11], atol=1e-4)
            for p in range(12, 20):
                step = tm.forward_cached(model, tokens[:, p:p + 1], torch.tensor([p]), cache)
                assert torch.allclose(step, full[:, p], atol=1e-4), (options, p)


def test_smoke_run_and_report(tmp_path):
    cfg = decode.DecodeConfig(gptc.preset("tiny"), "tiny", batches=(1, 3), repeats=2, budget_ms=1, smoke=True,
                              prompt_len=5, new_tokens=6)
    result = decode.run_decode_bench(cfg, None, log=lambda line: None)
    rows = result["rows"]
    assert [r["batch"] for r in rows if r["framework"] == "gptc"] == [1, 3]
    try:
        import torch  # noqa: F401
        peers = {"torch-eager", "torch-static"}
        try:
            import transformers  # noqa: F401
            peers.add("hf-generate")
        except ImportError:
            pass
    except ImportError:
        peers = set()
    assert {r["framework"] for r in rows} == {"gptc", "gptc-step"} | peers
    for r in rows:
        assert "error" not in r, r
        assert np.asarray(r["tokens"]).shape == (r["batch"], 6)
        assert r["same_tokens"], r["framework"]  # every framework generates gptc's greedy tokens
        assert r["step_ms"] > 0 and r["ttft_ms"] > 0 and r["tokens_per_s"] > 0
    paths = decode.write_decode_outputs(result, tmp_path / "out")
    md = (tmp_path / "out" / "decode.md").read_text()
    assert "| batch | framework | TTFT ms |" in md and result["meta"]["commit"] in md and "smoke" in md
    assert json.loads(paths[0].read_text())["rows"][0]["framework"] == "gptc"


def test_cli_decode_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "tiny", "--what", "decode", "--smoke", "--batches", "2", "--repeats", "2",
                 "--compare", "torch-eager", "--out", str(out)]) == 0
    assert (out / "decode.md").is_file() and (out / "decode.json").is_file()
    assert "tokens/s" in capsys.readouterr().out
    assert main(["bench", "--preset", "tiny", "--what", "decode", "--batches", "0,2", "--smoke"]) == 2
    assert "--batches takes positive integers" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--what", "infer", "--smoke"]) == 2
    assert "go with --what decode" in capsys.readouterr().err
