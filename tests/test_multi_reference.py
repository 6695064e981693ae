"""Data parallelism on the NumPy reference: the collective ops in a world of one rank
and in simulated worlds of several (each rank's reference executor in a thread of its
own, exchanging through gptc.compiler.ops.collective.SimulatedWorld), and whole
training steps: N ranks at batch B == one rank at batch N*B on the same windows, to
float32 rounding; ZeRO-1 == plain data parallelism."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import gptc
from gptc.compiler.ir import Graph
from gptc.compiler.parallel import Parallel, shard_array, unshard
from gptc.models import build_graph, init_params
from gptc.runtime.reference import ReferenceExecutor, run_graph, simulate_ranks

SPEC = gptc.Spec(gptc.ModelSpec(vocab_size=61, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=24),
                 gptc.TrainSpec(batch_size=2, grad_clip=0.5, weight_decay=0.1))


def _collective_graph(op: str, world: int, n: int) -> Graph:
    g = Graph()
    x = g.input("x", (n,))
    g.output("y", x._new(op, [x], world=world, bucket=0) * 1.0)
    return g


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather"])
def test_world_of_one_is_identity(op):
    x = np.arange(6, dtype=np.float32)
    assert np.array_equal(run_graph(_collective_graph(op, 1, 6), {"x": x})["outputs"]["y"], x)


def test_collective_outside_a_world_is_refused():
    with pytest.raises(RuntimeError, match="outside a world"):
        run_graph(_collective_graph("all_reduce", 2, 4), {"x": np.zeros(4, np.float32)})


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_collectives(world):
    n = 4 * world
    xs = [np.random.default_rng(r).standard_normal(n).astype(np.float32) for r in range(world)]
    total = sum(xs[1:], xs[0].copy())
    for op in ("all_reduce", "reduce_scatter", "all_gather"):
        g = _collective_graph(op, world, n)
        ys = simulate_ranks(world, lambda r: run_graph(g, {"x": xs[r]})["outputs"]["y"])
        for r, y in enumerate(ys):
            expected = {"all_reduce": total, "reduce_scatter": total[r * 4:(r + 1) * 4],
                        "all_gather": np.concatenate(xs)}[op]
            np.testing.assert_array_equal(y, expected)


def test_a_failing_rank_releases_the_others():
    g = _collective_graph("all_reduce", 2, 4)

    def step(rank):
        if rank == 1:
            raise ValueError("rank 1 broke")
        return run_graph(g, {"x": np.zeros(4, np.float32)})  # would wait for rank 1 forever

    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(ValueError, simulate_ranks, 2, step)))
    t.start()
    t.join(timeout=30)
    assert done and not t.is_alive()


def test_collective_shapes_are_checked():
    g = Graph()
    x = g.input("x", (5,))
    with pytest.raises(gptc.compiler.ops.ShapeError, match="equal parts"):
        g.add("reduce_scatter", [x.id], world=2, bucket=0)
    y = g.input("y", (2, 3))
    with pytest.raises(gptc.compiler.ops.ShapeError, match="1-D"):
        g.add("all_gather", [y.id], world=2, bucket=0)


def test_shard_round_trip():
    value = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    for world in (1, 2, 4, 5):
        parts = [shard_array(value, Parallel(world, r)) for r in range(world)]
        assert len({p.size for p in parts}) == 1
        np.testing.assert_array_equal(unshard(parts, value.shape), value)


def _windows(steps: int, rows: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, SPEC.model.vocab_size, (steps, rows, SPEC.model.seq_len + 1)).astype(np.int32)


def _feed(window: np.ndarray, step: int) -> dict:
    return {"tokens": window[:, :-1], "targets": window[:, 1:], "lr": np.float32(1e-2), "step": np.float32(step + 1)}


def _single(world: int, steps: int, batch: int):
    graph = build_graph(SPEC, "train", batch=world * batch)
    ex = ReferenceExecutor(graph, init_params(graph, 1))
    outs = [ex.run(_feed(w, t)) for t, w in enumerate(_windows(steps, world * batch))]
    return outs, ex.read()


def _parallel(world: int, steps: int, batch: int, zero1: bool, bucket_bytes: int = 3000):
    windows = _windows(steps, world * batch)
    params = init_params(build_graph(SPEC, "train", batch=batch), 1)

    def rank_run(rank: int):
        graph = build_graph(SPEC, "train", batch=batch, parallel=Parallel(world, rank, zero1, bucket_bytes))
        ex = ReferenceExecutor(graph, params)
        outs = [ex.run(_feed(w[rank * batch:(rank + 1) * batch], t)) for t, w in enumerate(windows)]
        return outs, ex.read(), graph

    return simulate_ranks(world, rank_run)


@pytest.mark.parametrize("world,zero1", [(2, False), (2, True), (3, True)])
def test_ranks_match_one_rank_at_the_whole_batch(world, zero1):
    steps, batch = 4, 2
    ref_outs, ref_state = _single(world, steps, batch)
    ranks = _parallel(world, steps, batch, zero1)
    for rank, (outs, state, graph) in enumerate(ranks):
        for t in range(steps):
            for key in ("loss", "grad_norm"):  # global on every rank: clipping matches one GPU
                np.testing.assert_allclose(outs[t][key], ref_outs[t][key], rtol=2e-6, err_msg=f"rank {rank} step {t} {key}")
        for name in graph.params:
            np.testing.assert_allclose(state[name], ref_state[name], rtol=0, atol=2e-5, err_msg=f"rank {rank} {name}")
        for name in graph.states:  # moments: whole, or this rank's slice (ZeRO-1)
            whole = ref_state[name]
            expected = shard_array(whole, Parallel(world, rank)) if zero1 else whole
            np.testing.assert_allclose(state[name].reshape(expected.shape), expected, rtol=1e-3, atol=1e-7,
                                       err_msg=f"rank {rank} {name}")
    assert any(ref_outs[t]["grad_norm"] > SPEC.train.grad_clip for t in range(steps)), "clipping must be exercised"


def test_zero1_matches_plain_data_parallelism():
    plain = _parallel(2, 3, 2, zero1=False)
    sharded = _parallel(2, 3, 2, zero1=True)
    for (p_outs, p_state, graph), (z_outs, z_state, _) in zip(plain, sharded):
        for a, b in zip(p_outs, z_outs):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
            np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=2e-6)
        for name in graph.params:
            np.testing.assert_allclose(p_state[name], z_state[name], rtol=0, atol=2e-5)


def test_world_of_one_builds_the_single_gpu_graph():
    a = build_graph(SPEC, "train")
    b = build_graph(SPEC, "train", parallel=Parallel(1, 0, zero1=True))
    assert [a.op(n) for n in a.topo_order()] == [b.op(n) for n in b.topo_order()]


def test_rank_batches_are_slices_of_the_whole_batch(tmp_path):
    from gptc.tools.data import Batches, Part, Windows
    tokens = np.arange(500, dtype=np.int32) % 50
    windows = Windows([Part("t", tokens)], 8, 50, "test")
    whole = Batches(windows, 6, 3)
    ranks = [Batches(windows, 2, 3, rank=r, world=3) for r in range(3)]
    for _ in range(3):
        x, y = whole.next()
        parts = [b.next() for b in ranks]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    assert all(b.state == whole.state for b in ranks)  # one generator state: rank 0's checkpoint resumes all


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather"])
def test_collective_vjps_are_transposes_across_ranks(op):
    """Each rank's loss is <op(x_r), y_r>; autodiff's gradient on rank r (built from the
    collectives' VJPs, collectives themselves) is d(sum of all ranks' losses)/dx_r, so
    for these linear ops sum_r <x_r, grad_r> == sum_r loss_r."""
    from gptc.compiler.autodiff import gradients
    world, n = 3, 6
    xs = [np.random.default_rng(r).standard_normal(n) for r in range(world)]

    def rank_run(rank):
        g = Graph()
        x = g.input("x", (n,))
        out = x._new(op, [x], world=world, bucket=0)
        y = g.input("y", out.shape)
        loss = (out * y).sum()
        g.output("loss", loss)
        g.output("grad", gradients(loss, [x])[0])
        ys = np.random.default_rng(100 + rank).standard_normal(out.shape)
        return run_graph(g, {"x": xs[rank], "y": ys}, np.float64)["outputs"]

    outs = simulate_ranks(world, rank_run)
    total = sum(float(o["loss"]) for o in outs)
    assert total == pytest.approx(sum(float(np.dot(xs[r], outs[r]["grad"])) for r in range(world)), rel=1e-12)
