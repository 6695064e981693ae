"""gptc's model options RMSNorm, ScaleNorm, sinusoidal positions, SwiGLU and
attn_bias = false against the PyTorch twin (gptc/tools/bench/torch_twin.py), alone
and combined, in float64: logits, loss and the gradient of every parameter to a
relative error below 1e-9, from identical weights (gptc's init, gains and biases
perturbed so that their 1/0 init cannot hide a bug; rounded to float32 first, as the
twin loads float32 values).

PyTorch is a test dependency: as in test_torch_parity.py these tests fail without it
unless GPTC_ALLOW_NO_TORCH=1."""
from __future__ import annotations


import numpy as np
import pytest

import gptc
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Tensor
from gptc.runtime.reference import run_graph
from gptc.spec import validate

from conftest import parity_parameters, require_torch

try:
    import torch
    import torch.nn.functional as F
    from gptc.tools.bench import torch_twin
except ImportError:  # pragma: no cover - exercised only without torch: require_torch fails or skips
    torch = None

TOLERANCE = 1e-9


@pytest.fixture(autouse=True)
def _require_torch():
    require_torch()

# id -> model options over an awkward small base (odd sizes, 3 heads, d_ff not a power of 2)
OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "scalenorm": dict(norm="scalenorm"),
    "sinusoidal": dict(pos="sinusoidal"),
    "swiglu": dict(ffn="swiglu"),
    "no-attn-bias": dict(attn_bias=False),
    "combined": dict(norm="rmsnorm", pos="sinusoidal", ffn="swiglu", tie_embeddings=True, attn_bias=False),
}


def spec_with(options: dict) -> gptc.Spec:
    model = gptc.ModelSpec(vocab_size=101, seq_len=13, d_model=30, n_layers=2, n_heads=3, d_ff=22,
                           init_std=0.1, **options)
    return validate(gptc.Spec(model, gptc.TrainSpec(batch_size=3)))


def rel_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual))
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_twin_parity_float64(options: dict) -> None:
    spec = spec_with(options)
    m = spec.model
    values = parity_parameters(spec)
    rng = np.random.default_rng(7)
    shape = (spec.train.batch_size, m.seq_len)
    tokens = rng.integers(0, m.vocab_size, shape).astype(np.int32)
    targets = rng.integers(0, m.vocab_size, shape).astype(np.int32)

    model = torch_twin.build_model(m, values, device="cpu", dtype=torch.float64)
    tok = torch.from_numpy(tokens.astype(np.int64))
    logits_ref = model(tok)
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), torch.from_numpy(targets.astype(np.int64)).flatten())
    loss_ref.backward()
    ref_grads = {torch_twin.gptc_name(n): p.grad.numpy() for n, p in model.named_parameters()}

    graph = gptc.build_graph(spec, "eval")
    names = sorted(graph.params)
    assert names == sorted(ref_grads), "the twin and gptc hold different parameters"
    loss = Tensor(graph, graph.outputs["loss"])
    for n, grad in zip(names, gradients(loss, [Tensor(graph, graph.params[n]) for n in names])):
        assert grad is not None, f"gptc gives no gradient for {n}"
        graph.output(f"grad.{n}", grad)
    out = run_graph(graph, {"tokens": tokens, "targets": targets, **values}, np.float64)["outputs"]
    infer = gptc.build_graph(spec, "infer")
    logits = run_graph(infer, {"tokens": tokens, **values}, np.float64)["outputs"]["logits"]

    assert rel_error(logits, logits_ref.detach().numpy()) < TOLERANCE, "logits"
    assert rel_error(out["loss"], loss_ref.item()) < TOLERANCE, "loss"
    for n in names:
        err = rel_error(out[f"grad.{n}"], ref_grads[n])
        assert err < TOLERANCE, f"d loss / d {n}: relative error {err:.3g}"


def test_options_change_the_model() -> None:
    """Each option really changes what is computed (a twin that ignored one would agree
    with a gptc that ignored it too): parameters differ, or the logits do."""
    base = spec_with({})
    base_names = {n: v.shape for n, v in parity_parameters(base).items()}
    tokens = np.random.default_rng(3).integers(0, 101, (3, 13)).astype(np.int32)
    for name, options in OPTIONS.items():
        spec = spec_with(options)
        values = parity_parameters(spec)
        if {n: v.shape for n, v in values.items()} != base_names:
            continue
        model = torch_twin.build_model(spec.model, values, device="cpu", dtype=torch.float64)
        base_model = torch_twin.build_model(base.model, values, device="cpu", dtype=torch.float64)
        tok = torch.from_numpy(tokens.astype(np.int64))
        with torch.no_grad():
            assert rel_error(model(tok).numpy(), base_model(tok).numpy()) > 1e-3, name


def test_attn_bias_false_drops_only_attention_biases() -> None:
    names = set(parity_parameters(spec_with({"attn_bias": False})))
    assert not any(n.startswith("h.") and ".attn." in n and n.endswith(".bias") for n in names)
    assert {"h.0.mlp.c_fc.bias", "h.0.mlp.c_proj.bias", "lm_head.bias"} <= names
