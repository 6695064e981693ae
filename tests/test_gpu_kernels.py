"""Every kernel family against the NumPy reference on a GPU, at awkward sizes (no
dimension a multiple of any tile), with activations and outputs poisoned (NaN) before
each launch so an unwritten element fails; whole training steps, their updates compared
by the change they make. Run on a GPU machine with:
    PYTHONPATH=. python3 -m pytest -m gpu
One test runs on the CPU: it shows that the update check catches a missing weight decay."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc import dsl
from gptc.compiler.ir import Graph
from gptc.compiler.ops.numeric import round_to_bf16
from gptc.compiler.optim import decays
from gptc.compiler.planner import make_plan
from gptc.models import init_params
from gptc.runtime.build import load_executor
from gptc.runtime.reference import ReferenceExecutor, run_graph

from conftest import UPDATE_TOLERANCE, rel_err, update_errors


def run_both(device, graph: Graph, feeds: dict, fuse: bool):
    """(gpu outputs, reference outputs) of one run of `graph` with fresh inputs."""
    plan = make_plan(graph, fuse)
    params = {n: feeds[n] for n in graph.params}
    ex = load_executor(plan, device, params, use_graph=False)
    try:
        ex.write({n: feeds[n] for n in graph.states})
        ex.poison()
        out = ex.run({n: feeds[n] for n in graph.inputs})
        updates = ex.read(list(graph.updates)) if graph.updates else {}
    finally:
        ex.close()
    ref = run_graph(graph, feeds, np.float64)
    return out, updates, ref


def random_feeds(graph: Graph, rng, int_high: dict | None = None) -> dict:
    feeds = {}
    for table in (graph.inputs, graph.params, graph.states):
        for name, nid in table.items():
            t = graph.type(nid)
            if t.dtype == "i32":
                feeds[name] = rng.integers(0, (int_high or {}).get(name, 7), t.shape).astype(np.int32)
            else:
                feeds[name] = rng.standard_normal(t.shape).astype(np.float32)
                if t.dtype == "bf16":  # the values the device holds, so the reference sees them too
                    feeds[name] = round_to_bf16(feeds[name])
    return feeds


def family_graphs():
    """(name, graph builder, tolerance) covering each kernel family."""
    def pointwise():
        g = Graph(); x = g.input("x", (37, 53)); b = g.param("b", (53,))
        g.output("y", dsl.gelu(x + b) * x.tanh()); g.output("z", (x * 0.5).exp() - b)
        return g

    def row():
        g = Graph(); x = g.input("x", (13, 7, 129)); w = g.param("w", (129,)); b = g.param("b", (129,))
        g.output("softmax", dsl.softmax(x)); g.output("ln", dsl.layernorm(x, w, b))
        wide = g.input("wide", (5, 1031)); g.output("wide_softmax", dsl.softmax(wide * 3.0))
        # masked rows (the row kernels keep softmax's sum online, rescaled as the max
        # grows): row r's first 7 r + 3 elements are -inf, so a thread's first elements
        # are all -inf, then its running max rises (a ramp) and jumps (x * 9)
        masked = g.input("masked", (6, 1500))
        ramp = g.iota((6, 1500), 1).cast("f32") * 0.01 + masked * 9.0
        g.output("masked_softmax", dsl.softmax((g.iota((6, 1500), 1) >= g.iota((6, 1500), 0) * 7 + 3).where(ramp, -math.inf)))
        # two softmaxes in one row kernel (max, sum, max, sum in one pass), and two sums of
        # exp(x - max) over one max (one kept online, the other a pass of its own)
        y = g.input("y", (13, 7, 129))
        g.output("softmax_product", dsl.softmax(x) * dsl.softmax(y * 2.0))
        m = y.max(-1, keepdims=True)
        e = (y - m.broadcast_to(y.shape)).exp()
        g.output("two_sums", e.sum(-1, keepdims=True) * 3.0 + (y - m.broadcast_to(y.shape)).exp().sum(-1, keepdims=True))
        return g

    def row_chunks():
        # rows read and written in chunks (codegen _row_lanes): f32 rows of 768 (chunks of 4);
        # bf16 rows padded to 1008, read through a slice of 1003 (chunks of 8, the last one
        # partial), their softmax stored bf16 over the padded rows (the padding zeros); the
        # same over rows of 20,003 (ten chunks a thread a pass)
        g = Graph(); x = g.input("x768", (10, 768)); w = g.param("w768", (768,)); b = g.param("b768", (768,))
        g.output("ln", dsl.layernorm(x, w, b))
        logits = g.input("padded_logits", (9, 1008), "bf16").slice(1, 0, 1003).cast("f32")
        g.output("padded_softmax", dsl.softmax(logits * 2.0).pad(1, 0, 5).cast("bf16"))
        long = g.input("long_logits", (5, 20008), "bf16").slice(1, 0, 20003).cast("f32")
        g.output("long_softmax", dsl.softmax(long * 2.0).pad(1, 0, 5).cast("bf16"))
        return g

    def cross_entropy():
        g = Graph(); logits = g.input("logits", (3, 11, 1003)); t = g.input("t", (3, 11), "i32")
        g.output("loss", dsl.cross_entropy(logits, t))
        return g

    def reduce():
        g = Graph(); x = g.input("x", (517, 33)); y = g.input("y", (1000, 37))
        g.output("col", x.sum(0)); g.output("total", (y * y).sum()); g.output("colmax", x.max(0, keepdims=True))
        big = g.input("big", (3, 2051, 5)); g.output("mid", big.sum(1))
        return g

    def matmul():
        g = Graph(); a = g.input("a", (3, 67, 45)); b = g.input("b", (3, 71, 45)); c = g.input("c", (45, 131))
        bias = g.param("bias", (131,)); r = g.input("r", (67, 131))
        g.output("bt", (a @ b.T) * 0.5); g.output("mlp", dsl.gelu(a.slice(0, 1, 2).reshape(67, 45) @ c + bias) + r)
        g.output("at", a.T @ a.slice(2, 0, 45))
        return g

    def embedding():
        g = Graph(); table = g.param("table", (97, 19)); ids = g.input("ids", (5, 23), "i32")
        pos = g.param("pos", (23, 19))
        h = dsl.embedding(table, ids) + pos
        g.output("h", h); g.output("grad", (h * h).scatter_add(ids, 97))
        return g

    def attention():
        g = Graph(); q = g.input("q", (2, 3, 37, 16)); k = g.input("k", (2, 3, 37, 16)); v = g.input("v", (2, 3, 37, 16))
        g.output("y", dsl.causal_attention(q, k, v))
        return g

    def attention_grad():
        from gptc.compiler.autodiff import gradients
        g = Graph()
        q, k, v = (g.param(n, (2, 3, 37, 16)) for n in "qkv")
        r = g.input("r", (2, 3, 37, 16))
        y = dsl.causal_attention(q, k, v)
        loss = (y * r).sum()
        g.output("y", y)
        for name, grad in zip("qkv", gradients(loss, [q, k, v])):
            g.output(f"d{name}", grad)
        return g

    def attention_long(seq: int, dim: int, dropout: float = 0.0):
        # a long, awkward sequence: many query and key tiles, a partial last tile,
        # forward and gradients. head_dim 64: 64-row tiles; 96 and 128: 32-row tiles
        # (at 128 on NVIDIA, 16-key forward and 8-row backward tiles); 100: zero-padded to 128.
        # With `dropout`, the flash kernels' Philox mask on the probabilities, across tiles.
        def build():
            from gptc.compiler.autodiff import gradients
            g = Graph()
            q, k, v = (g.param(n, (2, 3, seq, dim)) for n in "qkv")
            r = g.input("r", (2, 3, seq, dim))
            drop = (lambda p: dsl.dropout(p, dropout, g.input("step", ()), 1234, 3)) if dropout else None
            y = dsl.causal_attention(q, k, v, drop=drop)
            g.output("y", y)
            for name, grad in zip("qkv", gradients((y * r).sum(), [q, k, v])):
                g.output(f"d{name}", grad)
            return g
        return build

    def dropout():
        # Dropout masks drawn in a row kernel, a matmul epilogue and on causal attention
        # probabilities (fused: inside the flash kernels; unfused: generic kernels), and
        # recomputed by the backward kernels: the kernels' philox_uniform must give the
        # reference's bits (a different mask is an O(1) error). The step is a random
        # float here: both sides truncate it to an int.
        from gptc.compiler.autodiff import gradients
        g = Graph()
        x, w = g.param("x", (37, 53)), g.param("w", (53, 29))
        q, k, v = (g.param(n, (2, 3, 29, 16)) for n in "qkv")
        r, r_att, step = g.input("r", (37, 29)), g.input("r_att", (2, 3, 29, 16)), g.input("step", ())
        z = dsl.dropout(dsl.dropout(dsl.softmax(x), 0.3, step, 99, 5) @ w, 0.2, step, 99, 6)
        att = dsl.causal_attention(q, k, v, drop=lambda p: dsl.dropout(p, 0.1, step, 99, 7))
        g.output("z", z); g.output("att", att)
        params = [x, w, q, k, v]
        for name, grad in zip(("dx", "dw", "dq", "dk", "dv"), gradients((z * r).sum() + (att * r_att).sum(), params)):
            g.output(name, grad)
        return g

    return [("attention_grad", attention_grad, 1e-5), ("attention_long", attention_long(517, 64), 1e-4),
            ("attention_d96", attention_long(301, 96), 1e-4), ("attention_d128", attention_long(517, 128), 1e-4),
            ("attention_d100", attention_long(203, 100), 1e-4),
            ("attention_dropout", attention_long(517, 64, 0.2), 1e-4),
            ("attention_dropout_d128", attention_long(203, 128, 0.3), 1e-4),
            ("pointwise", pointwise, 1e-5), ("row", row, 1e-5),
            ("row_chunks", row_chunks, 1e-3),  # a bf16 store's rounding flips where the f32 sums' order differs
            ("cross_entropy", cross_entropy, 1e-5),
            ("reduce", reduce, 1e-5), ("matmul", matmul, 1e-5), ("embedding", embedding, 1e-5),
            ("attention", attention, 1e-5), ("dropout", dropout, 1e-5)]


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name,build,tol", family_graphs(), ids=[f[0] for f in family_graphs()])
def test_kernel_family(device, rng, name, build, tol, fuse):
    graph = build()
    feeds = random_feeds(graph, rng, {"t": 1003, "ids": 97})
    if fuse and name.startswith("attention"):  # the flash kernels, not the generic fusion
        assert {"attention"} <= {k.family for k in make_plan(graph, fuse).kernels}
    out, _, ref = run_both(device, graph, feeds, fuse)
    for key, value in ref["outputs"].items():
        assert rel_err(out[key], value) < tol, f"{name}/{key}: {rel_err(out[key], value):.2e}"


AWKWARD = gptc.Spec(gptc.ModelSpec(vocab_size=1003, seq_len=37, d_model=96, n_layers=3, n_heads=3, d_ff=200),
                    gptc.TrainSpec(batch_size=5, grad_clip=1.0))
SPECS = {
    "hipgpt": gptc.preset("hipgpt"),
    "awkward": AWKWARD,
    # head_dim 128: the flash kernels on strided views of the fused QKV projection
    "head_dim128": gptc.Spec(gptc.ModelSpec(vocab_size=517, seq_len=45, d_model=256, n_layers=2, n_heads=2, d_ff=300),
                             gptc.TrainSpec(batch_size=3)),
    # no clipping (AdamW fed by the stored gradients), decay on every param, tied embeddings
    "no_clip": gptc.Spec(replace(AWKWARD.model, tie_embeddings=True),
                         replace(AWKWARD.train, grad_clip=0.0, decay="all")),
    # dropout on embeddings, attention probabilities (in the flash kernels when fused)
    # and residual branches: the kernels' Philox masks equal the reference's bit for bit
    "dropout": gptc.Spec(replace(AWKWARD.model, dropout=0.1), AWKWARD.train),
    # multi-query (4 query heads over 1 kv head, head_dim 32) and local attention (a window
    # of 5; one that skips key and query tiles, with 4 query heads over 2 kv heads)
    "mqa": gptc.Spec(replace(AWKWARD.model, d_model=128, n_heads=4, n_kv_heads=1, seq_len=45), AWKWARD.train),
    "local": gptc.Spec(replace(AWKWARD.model, attention="local", window=5), AWKWARD.train),
    "local_gqa": gptc.Spec(gptc.ModelSpec(vocab_size=517, seq_len=150, d_model=256, n_layers=2, n_heads=4,
                                          n_kv_heads=2, d_ff=300, attention="local", window=40),
                           gptc.TrainSpec(batch_size=2)),
}


def training_feeds(spec: gptc.Spec, graph: Graph, rng: np.random.Generator) -> dict:
    """Step 3 of a run: initial params, small random AdamW moments, a random batch."""
    feeds = {**init_params(graph, int(rng.integers(1 << 30))),
             **{n: (rng.standard_normal(graph.type(i).shape) * 1e-3).astype(np.float32) ** 2 for n, i in graph.states.items()}}
    b, s = spec.train.batch_size, spec.model.seq_len
    feeds.update(tokens=rng.integers(0, spec.model.vocab_size, (b, s)).astype(np.int32),
                 targets=rng.integers(0, spec.model.vocab_size, (b, s)).astype(np.int32),
                 lr=np.float32(1e-3), step=np.float32(3))
    return feeds


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_training_step(device, rng, spec_name, fuse):
    check_training_step(device, rng, SPECS[spec_name], fuse)


def check_training_step(device, rng, spec: gptc.Spec, fuse: bool) -> None:
    """One training step of `spec` on the GPU against the float64 reference: the loss
    (and a mixture of experts' aux_loss), every gradient, every updated param and state."""
    graph = gptc.build_graph(spec, "train", expose_gradients=True)
    feeds = training_feeds(spec, graph, rng)
    out, updates, ref = run_both(device, graph, feeds, fuse)
    assert_step_matches(out, updates, feeds, ref, lambda: run_graph(graph, feeds, np.float32))


def assert_step_matches(out: dict, updates: dict, feeds: dict, ref: dict, float32_step=None) -> None:
    """The outputs and updates of a step against the reference's (run_graph's result).
    A gradient's error is below 1e-4 and an update's below UPDATE_TOLERANCE, or, where
    one is not (`float32_step`: the float32 reference step, run_graph's result, computed
    only then), below 10 times the float32 step's own error: where a gradient nearly
    cancels (ScaleNorm's scalar weight sums dy * x / |x| over every element: 2.8e-7 from
    terms around 1e-4 for one seed, 9.3e-4 off in float32, its AdamW moment 7.7e-3),
    float32 in any order is that far from float64."""
    for key in ("loss", "aux_loss"):
        if key in ref["outputs"]:
            assert rel_err(out[key], ref["outputs"][key]) < 1e-5, key
    grads = {k: rel_err(out[k], v) for k, v in ref["outputs"].items() if k.startswith("grad.")}
    steps = update_errors(feeds, updates, ref["updates"])
    if float32_step is not None and (max(grads.values()) >= 1e-4 or max(steps.values()) >= UPDATE_TOLERANCE):
        f32 = float32_step()
        grads = {k: e / max(1.0, 10 * rel_err(f32["outputs"][k], ref["outputs"][k]) / 1e-4) for k, e in grads.items()}
        own = update_errors(feeds, f32["updates"], ref["updates"])
        steps = {k: e / max(1.0, 10 * own[k] / UPDATE_TOLERANCE) for k, e in steps.items()}
    scaled = " (scaled to 10x the float32 step's error)" if float32_step is not None else ""
    worst = max((e, k) for k, e in grads.items())
    assert worst[0] < 1e-4, f"gradient {worst[1]}: {worst[0]:.2e}{scaled}"
    worst = max((e, k) for k, e in steps.items())
    assert worst[0] < UPDATE_TOLERANCE, f"update {worst[1]}: {worst[0]:.2e}{scaled}"


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_update_check_catches_a_missing_weight_decay(spec_name):
    """On the CPU, the update check of test_training_step: a float32 step passes it
    against the float64 reference; a step with the weight decay missing, or half as
    strong, fails it on every decayed matrix. Comparing the new values at 1e-4 (the
    check before) passed half the decay, and saw a missing one as an error of
    lr * wd = 1e-4: its own tolerance."""
    spec = SPECS[spec_name]

    def updates(weight_decay: float, float_dtype: type = np.float64) -> dict[str, np.ndarray]:
        train = replace(spec.train, weight_decay=weight_decay)
        return run_graph(gptc.build_graph(replace(spec, train=train), "train"), feeds, float_dtype)["updates"]

    graph = gptc.build_graph(spec, "train")
    feeds = training_feeds(spec, graph, np.random.default_rng(0))
    wd = spec.train.weight_decay
    ref = updates(wd)
    assert max(update_errors(feeds, updates(wd, np.float32), ref).values()) < UPDATE_TOLERANCE
    decayed = [n for n, nid in graph.params.items()  # decay moves a parameter that is not zero
               if decays(spec.train, graph.type(nid).shape) and np.any(feeds[n] != 0)]
    missing, half = updates(0.0), updates(wd / 2)
    for wrong in (missing, half):
        errors = update_errors(feeds, wrong, ref)
        assert decayed and min(errors[n] for n in decayed) > UPDATE_TOLERANCE
    assert max(rel_err(half[n], ref[n]) for n in ref) < 1e-4
    assert max(rel_err(missing[n], ref[n]) for n in ref) == pytest.approx(float(feeds["lr"]) * wd, rel=1e-3)


@pytest.mark.gpu
def test_fifty_steps_track_reference(device):
    spec = gptc.preset("hipgpt")
    graph = gptc.build_graph(spec, "train")
    params = init_params(graph, 0)
    gpu = load_executor(make_plan(graph, True), device, params)
    ref = ReferenceExecutor(gptc.build_graph(spec, "train"), params)
    rng = np.random.default_rng(0)
    text = rng.integers(0, 300, 20000).astype(np.int32)  # a Zipf-free but learnable stream
    text[1::2] = (text[::2] * 7 + 3) % spec.model.vocab_size
    gpu_losses, ref_losses = [], []
    for step in range(50):
        starts = rng.integers(0, len(text) - 33, spec.train.batch_size)
        rows = np.stack([text[s:s + 33] for s in starts])
        feeds = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "lr": np.float32(1e-3), "step": np.float32(step + 1)}
        gpu_losses.append(float(gpu.run(feeds)["loss"]))
        ref_losses.append(float(ref.run(feeds)["loss"]))
    gpu.close()
    assert np.max(np.abs(np.array(gpu_losses) - ref_losses) / np.array(ref_losses)) < 1e-3, (gpu_losses, ref_losses)
    assert gpu_losses[-1] < gpu_losses[0] - 1.0
