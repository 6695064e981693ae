"""The GPT of gptc against the same GPT written in plain PyTorch, in float64.

Both run from identical weights (gptc's init_params, with random values for the
gains and biases so that their zero/one init cannot hide a bug). Checked to a
relative error below 1e-9: the logits, the loss, the gradient of every parameter,
and the parameters and Adam moments over three steps of gptc's training graph
against torch.optim.AdamW (weight decay on matrices only) with
torch.nn.utils.clip_grad_norm_.

PyTorch is a test dependency (`pip install -e '.[test]'`): without it these tests
FAIL, as a silently skipped parity test is a defect, unless GPTC_ALLOW_NO_TORCH=1
(machines that only run the GPU tests), where they are skipped.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Tensor
from gptc.runtime.reference import ReferenceExecutor, run_graph

from conftest import parity_parameters, require_torch

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - exercised only without torch
    torch = None
    _TORCH_ERROR = str(e)

TOLERANCE = 1e-9


@pytest.fixture(autouse=True)
def _require_torch():
    require_torch()


def rel_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def assert_close(actual, expected, what: str) -> None:
    err = rel_error(actual, expected)
    assert err < TOLERANCE, f"{what}: relative error {err:.3g}"


# ----- configurations ------------------------------------------------------------------
def _awkward() -> gptc.Spec:
    model = gptc.ModelSpec(vocab_size=1003, seq_len=37, d_model=96, n_layers=3, n_heads=3, d_ff=200,
                           init_std=0.05)
    train = gptc.TrainSpec(batch_size=5, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    return gptc.Spec(model, train)


def config(name: str, tied: bool, grad_clip: float) -> gptc.Spec:
    spec = gptc.preset("tiny") if name == "tiny" else _awkward()
    return replace(spec, model=replace(spec.model, tie_embeddings=tied),
                   train=replace(spec.train, grad_clip=grad_clip))


# (id, preset, tied, grad_clip, does the clip trigger in the three steps?)
# grad_clip 0 disables clipping; 1e3 is never reached; the small ones always are.
CONFIGS = [
    ("tiny-untied", "tiny", False, 1e-2, True),
    ("tiny-tied", "tiny", True, 0.0, False),
    ("awkward-untied", "awkward", False, 1e3, False),
    ("awkward-tied", "awkward", True, 5e-2, True),
]
CONFIG_IDS = [c[0] for c in CONFIGS]


def batch(spec: gptc.Spec, seed: int, seq: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    shape = (spec.train.batch_size, seq or spec.model.seq_len)
    tokens = rng.integers(0, spec.model.vocab_size, shape).astype(np.int32)
    targets = rng.integers(0, spec.model.vocab_size, shape).astype(np.int32)
    return tokens, targets


# ----- the same GPT in PyTorch -----------------------------------------------------------
def torch_params(values: dict[str, np.ndarray]) -> dict[str, "torch.Tensor"]:
    return {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in values.items()}


def torch_logits(P: dict, m: gptc.ModelSpec, tokens: np.ndarray) -> "torch.Tensor":
    tok = torch.from_numpy(tokens.astype(np.int64))
    B, S = tok.shape
    E, H = m.d_model, m.n_heads
    hd = E // H

    def ln(x, name):
        return F.layer_norm(x, (E,), P[f"{name}.weight"], P[f"{name}.bias"], eps=m.norm_eps)

    def lin(x, name):  # gptc stores weights (in, out): y = x @ W + b
        return x @ P[f"{name}.weight"] + P[f"{name}.bias"]

    x = F.embedding(tok, P["wte"]) + P["wpe"][:S]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for layer in range(m.n_layers):
        pre = f"h.{layer}"
        h = ln(x, f"{pre}.ln_1")
        q, k, v = lin(h, f"{pre}.attn.c_attn").split(E, dim=-1)
        q, k, v = (t.reshape(B, S, H, hd).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, S, E)
        x = x + lin(y, f"{pre}.attn.c_proj")
        h = ln(x, f"{pre}.ln_2")
        x = x + lin(F.gelu(lin(h, f"{pre}.mlp.c_fc"), approximate="tanh"), f"{pre}.mlp.c_proj")
    x = ln(x, "ln_f")
    w = P["wte"] if m.tie_embeddings else P["lm_head.weight"]  # (V, E), as torch.nn.Linear stores it
    return x @ w.T + P["lm_head.bias"]


def torch_loss(P: dict, m: gptc.ModelSpec, tokens: np.ndarray, targets: np.ndarray) -> "torch.Tensor":
    logits = torch_logits(P, m, tokens)
    return F.cross_entropy(logits.reshape(-1, m.vocab_size), torch.from_numpy(targets.astype(np.int64)).reshape(-1))


# ----- the tests ---------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_param_names_and_shapes(cfg) -> None:
    _, name, tied, clip, _ = cfg
    spec = config(name, tied, clip)
    values = parity_parameters(spec)
    m = spec.model
    assert ("lm_head.weight" in values) == (not tied)
    P = torch_params(values)
    logits = torch_logits(P, m, batch(spec, 0)[0])  # every parameter is used
    logits.sum().backward()
    unused = [n for n, p in P.items() if p.grad is None]
    assert not unused, f"parameters the PyTorch model does not use: {unused}"
    assert gptc.param_count(spec) == sum(v.size for v in values.values())


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_logits_and_loss(cfg) -> None:
    _, name, tied, clip, _ = cfg
    spec = config(name, tied, clip)
    values = parity_parameters(spec)
    tokens, targets = batch(spec, 0)
    P = torch_params(values)
    with torch.no_grad():
        ref_logits = torch_logits(P, spec.model, tokens).numpy()
        ref_loss = torch_loss(P, spec.model, tokens, targets).item()

    infer = gptc.build_graph(spec, "infer")
    logits = run_graph(infer, {"tokens": tokens, **values}, np.float64)["outputs"]["logits"]
    assert_close(logits, ref_logits, "logits")

    ev = gptc.build_graph(spec, "eval")
    loss = run_graph(ev, {"tokens": tokens, "targets": targets, **values}, np.float64)["outputs"]["loss"]
    assert_close(loss, ref_loss, "loss")


def test_logits_of_a_shorter_sequence() -> None:
    """A graph built for fewer positions than the context reads the first rows of wpe."""
    spec = config("awkward", True, 1.0)
    values = parity_parameters(spec)
    tokens, _ = batch(spec, 3, seq=20)
    P = torch_params(values)
    with torch.no_grad():
        ref = torch_logits(P, spec.model, tokens).numpy()
    graph = gptc.build_graph(spec, "infer", batch=tokens.shape[0], seq_len=tokens.shape[1])
    out = run_graph(graph, {"tokens": tokens, **values}, np.float64)["outputs"]["logits"]
    assert_close(out, ref, "logits (seq 20 of 37)")


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_parameter_gradients(cfg) -> None:
    _, name, tied, clip, _ = cfg
    spec = config(name, tied, clip)
    values = parity_parameters(spec)
    tokens, targets = batch(spec, 1)

    P = torch_params(values)
    torch_loss(P, spec.model, tokens, targets).backward()

    graph = gptc.build_graph(spec, "eval")
    names = sorted(graph.params)
    loss = Tensor(graph, graph.outputs["loss"])
    grads = gradients(loss, [Tensor(graph, graph.params[n]) for n in names])
    for n, g in zip(names, grads):
        assert g is not None, f"gptc gives no gradient for {n}"
        graph.output(f"grad.{n}", g)
    out = run_graph(graph, {"tokens": tokens, "targets": targets, **values}, np.float64)["outputs"]
    assert sorted(P) == names
    for n in names:
        assert_close(out[f"grad.{n}"], P[n].grad.numpy(), f"d loss / d {n}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_three_adamw_steps(cfg) -> None:
    _, name, tied, clip, clips = cfg
    spec = config(name, tied, clip)
    t = spec.train
    values = parity_parameters(spec)
    lrs = [t.lr, 0.7 * t.lr, 0.4 * t.lr]  # a schedule's changing values, fed per step

    graph = gptc.build_graph(spec, "train")
    assert set(graph.states) == {f"{p}.{n}" for n in graph.params for p in ("m", "v")}
    executor = ReferenceExecutor(graph, values, np.float64)

    P = torch_params(values)
    matrices = [p for p in P.values() if p.ndim >= 2]
    vectors = [p for p in P.values() if p.ndim < 2]
    assert matrices and vectors
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}],
                            lr=t.lr, betas=t.betas, eps=t.eps)

    for step, lr in enumerate(lrs, start=1):
        tokens, targets = batch(spec, 10 + step)
        out = executor.run({"tokens": tokens, "targets": targets,
                            "lr": np.array(lr), "step": np.array(float(step))})

        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = torch_loss(P, spec.model, tokens, targets)
        loss.backward()
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(P.values()), clip).item()
        else:
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in P.values())).item()
        opt.step()

        assert (clip > 0 and norm > clip) == clips, f"step {step}: grad norm {norm} vs clip {clip}"
        assert_close(out["loss"], loss.item(), f"step {step}: loss")
        assert_close(out["grad_norm"], norm, f"step {step}: grad_norm")
        for n, p in P.items():
            assert_close(executor.persistent[n], p.detach().numpy(), f"step {step}: {n}")
            state = opt.state[p]
            assert_close(executor.persistent[f"m.{n}"], state["exp_avg"].numpy(), f"step {step}: m.{n}")
            assert_close(executor.persistent[f"v.{n}"], state["exp_avg_sq"].numpy(), f"step {step}: v.{n}")

    # The parameters did move, and decay reached the matrices only: a gptc that decayed
    # vectors too would differ from torch by lr * wd * p, far above the tolerance.
    for n, v in values.items():
        assert rel_error(executor.persistent[n], v) > 1e-4, f"{n} did not change"
