"""Dropout (model.dropout > 0) with a counter-based RNG, Philox4x32-10.

The NumPy Philox against Random123's published known-answer vectors; the C Philox of
templates/prelude.h (what every kernel calls) against the NumPy one, bit for bit,
compiled by the host C++ compiler; the masks' rate and independence across steps and
sites; the VJP of dropout against finite differences; dropout only in training graphs;
the whole model against the PyTorch twin in float64 with gptc's masks; every kernel of
a dropout model compiles for sm_90 and gfx90a; a tiny model trains with dropout on the
CPU. The GPU runs (a training step with dropout against the reference, bit-identical
masks) are in tests/test_gpu_kernels.py (spec "dropout", family "dropout")."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Graph
from gptc.compiler.ops.random import dropout_threshold, philox4x32_10, uniform
from gptc.models import init_params
from gptc.runtime.reference import run_graph

from conftest import require_torch

ROOT = Path(__file__).resolve().parents[1]

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter (4 words), key
# (2 words) -> output (4 words).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


def dropout_spec(p: float = 0.1, **model) -> gptc.Spec:
    m = gptc.ModelSpec(vocab_size=103, seq_len=13, d_model=24, n_layers=2, n_heads=2, d_ff=40, dropout=p)
    return gptc.Spec(replace(m, **model), gptc.TrainSpec(batch_size=3, seed=4242))


# ----- the generator -----------------------------------------------------------------------
@pytest.mark.parametrize("counter, key, expected", KAT)
def test_numpy_philox_matches_known_answers(counter, key, expected) -> None:
    assert [int(w) for w in philox4x32_10(counter, key)] == list(expected)


def test_numpy_philox_is_vectorised_per_element() -> None:
    counters = np.array([k[0] for k in KAT], dtype=np.uint64).T  # (4, 3): three counters at once
    out = philox4x32_10(tuple(counters), (0, 0))
    for i, (counter, _, _) in enumerate(KAT):
        assert list(out[:, i]) == list(philox4x32_10(counter, (0, 0)))
    assert out[:, 0].tolist() == list(KAT[0][2])


HARNESS = r"""
#include <cstdint>
#include <cstdio>
#define __device__
#define __forceinline__ inline
%s
int main() {
  philox4 c;
  unsigned int k0, k1;
  while (std::scanf("%%x %%x %%x %%x %%x %%x", &c.w[0], &c.w[1], &c.w[2], &c.w[3], &k0, &k1) == 6) {
    c = philox4x32_10(c, k0, k1);
    std::printf("%%08x %%08x %%08x %%08x\n", c.w[0], c.w[1], c.w[2], c.w[3]);
  }
  return 0;
}
"""


def _philox_c_source() -> str:
    """The Philox section of the prelude (plain C, compiled by the host compiler here)."""
    text = (ROOT / "templates" / "prelude.h").read_text()
    start = text.index("// ---- Philox4x32-10")
    return text[start:text.index("// ---- end of Philox", start)]


@pytest.fixture(scope="module")
def host_philox(tmp_path_factory):
    """A host binary of the prelude's philox4x32_10 (counter, key -> output, hex)."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler: the GPU tests cover the C Philox (family 'dropout')")
    where = tmp_path_factory.mktemp("philox")
    (where / "philox.cpp").write_text(HARNESS % _philox_c_source().replace("%", "%%"))
    subprocess.run([compiler, "-O1", "-o", str(where / "philox"), str(where / "philox.cpp")], check=True)

    def run(rows: np.ndarray) -> np.ndarray:  # rows (N, 6) of uint32 -> (N, 4)
        text = "\n".join(" ".join(f"{int(w):x}" for w in r) for r in rows)
        out = subprocess.run([str(where / "philox")], input=text, capture_output=True, text=True, check=True).stdout
        return np.array([[int(w, 16) for w in line.split()] for line in out.splitlines()], dtype=np.uint64)
    return run


def test_c_philox_matches_known_answers(host_philox) -> None:
    out = host_philox(np.array([c + k for c, k, _ in KAT], dtype=np.uint64))
    assert out.tolist() == [list(e) for _, _, e in KAT]


def test_c_philox_matches_numpy_bit_for_bit(host_philox) -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 1 << 32, (1000, 6), dtype=np.uint64)   # counter (4 words), key (2 words)
    rows[:4, :4] = [[0, 0, 0, 0], [2 ** 32 - 1, 0, 1, 0], [5, 2 ** 31, 0, 2 ** 32 - 1], [1, 1, 1, 1]]
    got = host_philox(rows)
    for r, row in enumerate(rows):
        expected = philox4x32_10(tuple(row[:4]), tuple(int(k) for k in row[4:]))
        assert got[r].tolist() == expected.tolist(), f"counter/key {row.tolist()}"


def test_c_uniform_is_the_numpy_uniform() -> None:
    """philox_uniform's counter layout and float conversion, as the prelude writes them,
    read back against uniform(): (index lo, index hi, step, stream), key (seed lo, hi),
    top 24 bits of word 0 times 2^-24."""
    source = _philox_c_source()
    assert "{{(uint32_t)index, (uint32_t)(index >> 32), step, stream}}" in source
    assert "(float)(philox4x32_10(counter, seed_lo, seed_hi).w[0] >> 8) * 5.9604644775390625e-08f" in source
    assert 2.0 ** -24 == 5.9604644775390625e-08
    seed, stream, step = (1 << 40) + 12345, 7, 3
    u = uniform((5, 6), seed, stream, step).reshape(-1)
    for i in (0, 13, 29):
        word = philox4x32_10((i, 0, step, stream), (seed & 0xFFFFFFFF, seed >> 32))[0]
        assert u[i] == np.float32(int(word) >> 8) * np.float32(2.0 ** -24)


def test_uniform_range_and_grid() -> None:
    u = uniform((64, 1000), seed=1, stream=2, step=3)
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert np.all((u * 2.0 ** 24) == np.floor(u * 2.0 ** 24))  # multiples of 2^-24
    assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / u.size)


# ----- dropout masks -----------------------------------------------------------------------
def _mask_graph(shape, p: float, stream: int, seed: int = 5) -> Graph:
    g = Graph()
    x = g.input("x", shape)
    g.output("y", dsl.dropout(x, p, g.input("step", ()), seed, stream))
    return g


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_rate_within_binomial_bounds(p: float) -> None:
    n = 200_000
    y = run_graph(_mask_graph((n,), p, 3), {"x": np.ones(n, np.float32), "step": np.float32(1)})["outputs"]["y"]
    dropped = np.count_nonzero(y == 0)
    assert abs(dropped - n * p) < 6 * np.sqrt(n * p * (1 - p)), (dropped, n * p)
    assert np.allclose(y[y != 0], 1 / (1 - p))   # kept elements scaled, expectation unchanged
    assert dropout_threshold(p) - p < 2.0 ** -24


def test_masks_differ_across_steps_and_sites_and_repeat_otherwise() -> None:
    n, p = 50_000, 0.5
    ones = np.ones(n, np.float32)

    def keep(stream: int, step: int, seed: int = 5) -> np.ndarray:
        g = _mask_graph((n,), p, stream, seed)
        return run_graph(g, {"x": ones, "step": np.float32(step)})["outputs"]["y"] != 0

    base = keep(1, 1)
    assert np.array_equal(base, keep(1, 1))  # a pure function of (seed, stream, step, element)
    for other in (keep(1, 2), keep(2, 1), keep(1, 1, seed=6)):
        agree = np.mean(base == other)      # independent masks agree on half the elements
        assert abs(agree - 0.5) < 6 * np.sqrt(0.25 / n), agree


def test_dropout_values_follow_the_uniforms() -> None:
    x = np.random.default_rng(1).standard_normal((7, 11)).astype(np.float32)
    p = 0.3
    y = run_graph(_mask_graph(x.shape, p, 9, seed=77), {"x": x, "step": np.float32(4)}, np.float64)["outputs"]["y"]
    keep = uniform(x.shape, 77, 9, 4) >= dropout_threshold(p)
    assert np.array_equal(y, np.where(keep, x.astype(np.float64) * (1 / (1 - p)), 0.0))


def test_dropout_vjp_matches_finite_differences() -> None:
    """With the mask fixed (the same step), dropout is linear: its VJP equals central
    differences of sum(dropout(x) * R) in float64."""
    rng = np.random.default_rng(2)
    shape, p = (4, 9), 0.4
    g = Graph()
    x, r = g.input("x", shape), g.input("R", shape)
    loss = (dsl.dropout(x, p, g.input("step", ()), 11, 2) * r).sum()
    g.output("loss", loss)
    g.output("grad", gradients(loss, [x])[0])
    feeds = {"x": rng.standard_normal(shape), "R": rng.standard_normal(shape), "step": np.float64(3)}
    analytic = run_graph(g, feeds, np.float64)["outputs"]["grad"]
    numeric = np.zeros(shape)
    for i in np.ndindex(*shape):
        loss_at = []
        for sign in (1, -1):
            moved = feeds["x"].copy()
            moved[i] += sign * 1e-6
            loss_at.append(run_graph(g, {**feeds, "x": moved}, np.float64)["outputs"]["loss"])
        numeric[i] = (loss_at[0] - loss_at[1]) / 2e-6
    assert np.linalg.norm(numeric - analytic) / np.linalg.norm(numeric) < 1e-6
    assert np.count_nonzero(analytic == 0) > 0 and np.count_nonzero(analytic) > 0


def test_dropout_rejects_a_bad_probability() -> None:
    g = Graph()
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        dsl.dropout(g.input("x", (3,)), 1.0, g.input("step", ()), 0, 0)


# ----- the model -----------------------------------------------------------------------------
def _random_uniforms(graph: Graph) -> list[dict]:
    return [graph.node(n)["attrs"] for n in graph.nx.nodes if graph.op(n) == "random_uniform"]


def test_dropout_only_in_training_graphs() -> None:
    spec = dropout_spec()
    train = gptc.build_graph(spec, "train")
    sites = _random_uniforms(train)
    assert len(sites) == 1 + 3 * spec.model.n_layers                # embedding + 3 per layer
    assert sorted(a["stream"] for a in sites) == list(range(1 + 3 * spec.model.n_layers))  # all distinct
    assert {a["seed"] for a in sites} == {spec.train.seed}
    b, s, m = spec.train.batch_size, spec.model.seq_len, spec.model
    assert sorted(a["shape"] for a in sites) == sorted([(b, s, m.d_model)] * (1 + 2 * m.n_layers)
                                                       + [(b, m.n_heads, s, s)] * m.n_layers)
    for mode in ("eval", "infer", "prefill", "decode"):
        assert not _random_uniforms(gptc.build_graph(spec, mode, batch=2)), mode
    # dropout 0 builds the graph of before, node for node
    off = gptc.build_graph(dropout_spec(0.0), "train")
    assert not _random_uniforms(off) and len(off) < len(train)


def test_the_step_input_keys_the_masks() -> None:
    """The training graph's one "step" input (fed 1, 2, ... by the trainer) feeds both
    Adam's bias correction and every dropout mask."""
    graph = gptc.build_graph(dropout_spec(), "train")
    step = graph.inputs["step"]
    assert sorted(graph.inputs) == ["lr", "step", "targets", "tokens"]
    assert all(graph.inputs_of(n) == (step,) for n in graph.nx.nodes if graph.op(n) == "random_uniform")


@pytest.fixture(scope="module")
def torch_twin():
    torch = require_torch()
    from gptc.tools.bench import torch_twin
    return torch, torch_twin


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_model_with_dropout_matches_pytorch_twin_in_float64(torch_twin, p: float) -> None:
    """gptc's training graph with dropout on against the PyTorch twin fed gptc's masks:
    loss and every gradient at 1e-9, over two steps (two different masks)."""
    torch, twin = torch_twin
    spec = dropout_spec(p)
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    params = init_params(graph, 3)
    model = twin.build_model(spec.model, params, device="cpu", dtype=torch.float64)
    rng = np.random.default_rng(4)
    b, s = spec.train.batch_size, spec.model.seq_len
    losses = []
    for step in (1, 2):
        tokens, targets = (rng.integers(0, spec.model.vocab_size, (b, s)).astype(np.int32) for _ in range(2))
        feeds = {"tokens": tokens, "targets": targets, "lr": np.float32(0.0), "step": np.float32(step),
                 **params, **{n: np.zeros(graph.type(i).shape) for n, i in graph.states.items()}}
        out = run_graph(graph, feeds, np.float64)["outputs"]
        model.masks = twin.dropout_masks(spec, b, s, step)
        model.zero_grad()
        loss = model.loss(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets.astype(np.int64)))
        loss.backward()
        assert abs(out["loss"] - loss.item()) / loss.item() < 1e-9
        for name, tp in model.named_parameters():
            ref = tp.grad.numpy()
            err = np.linalg.norm(out[f"grad.{twin.gptc_name(name)}"] - ref) / np.linalg.norm(ref)
            assert err < 1e-9, f"step {step} grad.{name}: {err:.2e}"
        losses.append(loss.item())
        model.masks = {}
        with torch.no_grad():  # without the masks the twin is the model without dropout
            plain = model.loss(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets.astype(np.int64)))
        assert abs(plain.item() - loss.item()) > 1e-6
    masks = [twin.dropout_masks(spec, b, s, step) for step in (1, 2)]
    assert all(not np.array_equal(masks[0][k], masks[1][k]) for k in masks[0])


# ----- kernels -------------------------------------------------------------------------------
def test_every_dropout_kernel_compiles(tmp_path, monkeypatch) -> None:
    """The training graph of a dropout model (fused and unfused plans) rendered for
    sm_90 and gfx90a and compiled by NVRTC and hiprtc (no GPU needed); the masks are
    computed per element by philox_uniform in the kernels that read them."""
    from gptc.compiler.codegen.kernels import prelude, render_plan
    from gptc.compiler.planner import make_plan
    from gptc.runtime.device import compiler_available, compile_many
    from gptc.target import parse_target
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path / "kernels"))
    graph = gptc.build_graph(dropout_spec(0.1), "train")
    for target in ("cuda:sm_90", "hip:gfx90a"):
        ok, why = compiler_available("nvidia" if target.startswith("cuda") else "amd")
        if not ok:
            pytest.fail(f"{why}\nThe kernel compilers are missing: run .ci/install-compilers.sh", pytrace=False)
        codes: dict[str, str] = {}
        for fuse in (True, False):
            for k in render_plan(make_plan(graph, fuse), parse_target(target)):
                codes.setdefault(k.code[len(prelude()):], k.symbol)
        with_rng = [c for c in codes if "philox_uniform(" in c]
        assert with_rng, "no kernel draws the masks"
        assert all(re.search(r"philox_uniform\(4242u, 0u, \d+u, (\(uint32_t\)\(int\)|drop_step)", c) for c in with_rng)
        assert any("drop_step" in c for c in with_rng)  # the flash kernels' masks
        distinct = sorted(codes)
        batches = [distinct[i:i + 16] for i in range(0, len(distinct), 16)]
        sources = [(prelude() + "".join(f"namespace batch_{j} {{\n{code}}}\n" for j, code in enumerate(batch)),
                    f"dropout_batch{i}") for i, batch in enumerate(batches)]
        compile_many(sources, parse_target(target))


def test_flash_attention_kernels_take_the_dropout() -> None:
    """The planner's attention matcher sees through dropout on the probabilities: the
    flash kernels apply the mask (forward after the row statistics; backward on p for
    dV and on dP for dS), with the seed, stream, threshold and scale of the graph."""
    from gptc.compiler.codegen.kernels import render_plan
    from gptc.compiler.planner import make_plan
    from gptc.target import parse_target
    spec = dropout_spec(0.25)
    graph = gptc.build_graph(spec, "train")
    plan = make_plan(graph, True)
    attention = [k for k in plan.kernels if k.family.startswith("attention")]
    assert len(attention) == 2 * spec.model.n_layers
    streams = {k.attention.dropout.stream for k in attention}
    assert streams == {3 * layer + 1 for layer in range(spec.model.n_layers)}
    for k in attention:
        d = k.attention.dropout
        assert (d.seed, d.threshold, d.scale) == (4242, dropout_threshold(0.25), 1 / 0.75)
        assert graph.inputs["step"] in k.reads
    # every random_uniform of the probabilities is read only by the flash kernels
    probs = [n for n in graph.nx.nodes if graph.op(n) == "random_uniform" and len(graph.type(n).shape) == 4]
    in_attention = set().union(*(k.nodes for k in attention))
    for n in probs:
        keep = graph.users(n)
        assert all(set(graph.users(u)) <= in_attention for u in keep)
    sources = render_plan(plan, parse_target("cuda:sm_90"))
    fwd = [s.code for s in sources if "drop_step" in s.code and "kept" not in s.code]
    bwd = [s.code for s in sources if "kept" in s.code]
    assert len(fwd) == len(bwd) == spec.model.n_layers
    assert all(c.count("sc[ii][jj] *= philox_uniform(4242u, 0u,") == 1 for c in fwd)
    assert all(c.count("const float kept = philox_uniform(4242u, 0u,") == 2 for c in bwd)  # dK/dV and dQ halves
