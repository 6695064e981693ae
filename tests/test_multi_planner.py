"""Where the planner puts the collectives of a data-parallel training step: each a
launch of its own (one library group per gradient bucket) reading computed buffers;
gradient buckets issued during the backward, as soon as their gradients exist; every
reader of a collective's result waiting for it (the table's "waits"); the buffers a
collective reads staying alive until then; and every kernel of such a plan compiling
for sm_90 (NVRTC) and gfx90a (hiprtc)."""
from __future__ import annotations

import pytest

import gptc
from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import COLLECTIVE, VIEW
from gptc.compiler.parallel import Parallel
from gptc.compiler.planner import make_plan
from gptc.runtime.build import plan_table
from gptc.runtime.device import compile_many
from gptc.target import parse_target

# Awkward sizes: parameters whose sizes do not divide by the world (ZeRO-1 pads them).
SPEC = gptc.Spec(gptc.ModelSpec(vocab_size=1003, seq_len=37, d_model=96, n_layers=3, n_heads=3, d_ff=200),
                 gptc.TrainSpec(batch_size=5, grad_clip=1.0))
CASES = {"dp": Parallel(2, 1, False, 200_000), "zero1": Parallel(3, 2, True, 200_000)}


@pytest.fixture(scope="module", params=list(CASES))
def planned(request):
    par = CASES[request.param]
    plan = make_plan(gptc.build_graph(SPEC, "train", parallel=par))
    return par, plan


def _launch_of(plan):
    return {k: i for i, launch in enumerate(plan.launches) for k in launch}


def test_collectives_are_launches_of_their_own(planned):
    par, plan = planned
    g = plan.graph
    collectives = [n for n in g.nx.nodes if OPS[g.op(n)].kind == COLLECTIVE]
    assert collectives
    for k, kern in enumerate(plan.kernels):
        kinds = {OPS[g.op(n)].kind for n in kern.nodes}
        if COLLECTIVE in kinds:
            assert kern.family == "collective" and kern.nodes == [kern.anchor]
            (src,) = kern.reads  # a computed value's buffer, never a view or a source
            assert OPS[g.op(src)].kind not in (VIEW, COLLECTIVE) and g.op(src) not in ("param", "input", "state")
            assert plan.buffer_of(src).nbytes == g.type(g.inputs_of(kern.anchor)[0]).nbytes
        else:
            assert kern.family != "collective"
    for launch in plan.launches:
        parts = [plan.kernels[i] for i in launch]
        if parts[0].family == "collective":  # one bucket per launch (one library group)
            assert len({g.node(p.anchor)["attrs"]["bucket"] for p in parts}) == 1
            assert all(p.family == "collective" for p in parts)


def test_gradient_buckets_overlap_the_backward(planned):
    par, plan = planned
    g = plan.graph
    op = "reduce_scatter" if par.zero1 else "all_reduce"
    grad_launches = sorted({i for i, launch in enumerate(plan.launches) for k in launch
                            if plan.kernels[k].family == "collective" and g.op(plan.kernels[k].anchor) == op
                            and g.type(plan.kernels[k].anchor).shape != ()})
    backward = [i for i, launch in enumerate(plan.launches)
                if any("#bwd" in g.node(n)["scope"] for k in launch for n in plan.kernels[k].nodes)]
    assert len(grad_launches) >= 3
    # The first buckets go out while backward kernels are still to come ...
    assert grad_launches[0] < backward[-1] and grad_launches[1] < backward[-1]
    # ... and each goes out right after the kernels producing its gradients.
    launch_of = _launch_of(plan)
    for i in grad_launches:
        producers = [launch_of[k] for k in range(len(plan.kernels)) for c in plan.launches[i]
                     if set(plan.kernels[c].reads) & set(plan.kernels[k].roots)]
        assert max(producers) < i
        assert not any(plan.kernels[k].family not in ("collective",) and launch_of[k] > max(producers)
                       and launch_of[k] < i and _feeds_bucket(plan, k, plan.launches[i]) for k in range(len(plan.kernels)))


def _feeds_bucket(plan, k, bucket) -> bool:
    return any(set(plan.kernels[c].reads) & set(plan.kernels[k].roots) for c in bucket)


def test_readers_wait_and_operands_stay_alive(planned):
    par, plan = planned
    kernels = render_plan(plan, parse_target("cuda:sm_90"))
    table = plan_table(plan, kernels)
    entries = table["launches"]
    for i, entry in enumerate(entries):
        if entry["family"] != "collective":
            continue
        assert entry["collective"] and all(c["op"] in ("all_reduce", "reduce_scatter", "all_gather")
                                           for c in entry["collective"])
        readers = [j for j, e in enumerate(entries) if j > i and set(e["reads"]) & set(entry["writes"])]
        assert readers, "a collective's result is read"
        assert i in entries[readers[0]]["waits"]  # the first reader joins the communication stream
        assert all(i not in e["waits"] for e in entries[:i + 1])
        # What the collective reads is alive (its memory unshared) until that join.
        for k in plan.launches[i]:
            (src,) = plan.kernels[k].reads
            if src in plan.lifetimes:
                assert plan.lifetimes[src][1] >= readers[0]
    # every wait names a collective launch
    assert all(entries[c]["family"] == "collective" for e in entries for c in e["waits"])


def test_gradient_bucket_sizes(planned):
    par, plan = planned
    g = plan.graph
    sizes: dict[int, int] = {}
    for n in g.nx.nodes:  # (ZeRO-1's all_gathers of the updated slices go out together at the end)
        if g.op(n) in ("all_reduce", "reduce_scatter"):
            b = g.node(n)["attrs"]["bucket"]
            sizes.setdefault(b, []).append(g.type(g.inputs_of(n)[0]).nbytes)
    for b, parts in sizes.items():
        assert len(parts) == 1 or sum(parts) <= par.bucket_bytes


def test_single_gpu_plans_hold_no_collectives():
    plan = make_plan(gptc.build_graph(SPEC, "train"))
    assert all(k.family != "collective" for k in plan.kernels)


@pytest.mark.parametrize("target", ["cuda:sm_90", "hip:gfx90a"])
def test_parallel_plans_compile(planned, target):
    par, plan = planned
    kernels = [k for k in render_plan(plan, parse_target(target)) if k.code]
    assert len(kernels) < len(plan.launches)  # the collective launches have no device code
    unique = {k.symbol: k for k in kernels}
    objects = compile_many([(k.code, k.symbol, (), k.origin) for k in unique.values()], target)
    assert all(objects)
