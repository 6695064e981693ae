"""Any valid spec plans, renders and compiles: a fuzz over the options the GPT builder
implements (gradient clipping on/off; weight decay on matrices, on every param, off;
tied or untied embeddings; biases on/off) at odd sizes, in every mode (train, eval,
infer, prefill, decode), fused and unfused. Every kernel is rendered for sm_90 and
gfx90a; a deduplicated sample of them is compiled for each; every training spec takes
two steps on the CPU reference executor."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

import gptc
from gptc.compiler.codegen.kernels import prelude, render_plan
from gptc.compiler.planner import make_plan
from gptc.models import MODES, init_params
from gptc.runtime.device import compile_many
from gptc.runtime.reference import ReferenceExecutor
from gptc.spec import validate
from gptc.target import parse_target

TARGETS = ("cuda:sm_90", "hip:gfx90a")
# No dimension a multiple of a tile: head_dim 16 and 13, d_ff 100 and 7, one layer and two;
# head_dim 100 takes the flash kernels' large-head tiles, 136 the generic kernels.
SIZES = (gptc.Spec(gptc.ModelSpec(vocab_size=517, seq_len=13, d_model=48, n_layers=2, n_heads=3, d_ff=100),
                   gptc.TrainSpec(batch_size=3)),
         gptc.Spec(gptc.ModelSpec(vocab_size=67, seq_len=5, d_model=26, n_layers=1, n_heads=2, d_ff=7),
                   gptc.TrainSpec(batch_size=1)),
         gptc.Spec(gptc.ModelSpec(vocab_size=131, seq_len=11, d_model=200, n_layers=1, n_heads=2, d_ff=36),
                   gptc.TrainSpec(batch_size=2)),
         gptc.Spec(gptc.ModelSpec(vocab_size=29, seq_len=7, d_model=136, n_layers=1, n_heads=1, d_ff=9),
                   gptc.TrainSpec(batch_size=2)))
MODEL_OPTIONS = [dict(tie_embeddings=tie, bias=bias) for tie in (False, True) for bias in (True, False)]
TRAIN_OPTIONS = [dict(grad_clip=clip, weight_decay=wd, decay=decay)
                 for clip in (1.0, 0.0) for wd, decay in ((0.1, "matrices"), (0.1, "all"), (0.0, "matrices"))]
SAMPLE_PER_FAMILY = 8  # kernels of each family compiled per target (all would take minutes)


def _spec(size: gptc.Spec, model: dict, train: dict) -> gptc.Spec:
    return validate(gptc.Spec(replace(size.model, **model), replace(size.train, **train)))


def _name(spec: gptc.Spec) -> str:
    m, t = spec.model, spec.train
    return (f"d{m.d_model}h{m.n_heads}-{'tied' if m.tie_embeddings else 'untied'}-{'bias' if m.bias else 'nobias'}"
            f"-clip{t.grad_clip:g}-wd{t.weight_decay:g}{t.decay}")


# Every training option with every model option, the sizes alternating (so each option
# meets both); the other modes do not read the training options: each model option at
# each size.
TRAIN_SPECS = [_spec(SIZES[(i + j) % len(SIZES)], model, train)
               for (i, model), (j, train) in itertools.product(enumerate(MODEL_OPTIONS), enumerate(TRAIN_OPTIONS))]
CASES = [(spec, "train") for spec in TRAIN_SPECS] + [
    (_spec(size, model, {}), mode) for model in MODEL_OPTIONS for size in SIZES for mode in MODES if mode != "train"]


@pytest.fixture(scope="module")
def rendered():
    """(case name -> error text or None, target -> {kernel code: KernelSource})."""
    errors, codes = {}, {t: {} for t in TARGETS}
    for spec, mode in CASES:
        name = f"{_name(spec)}-{mode}"
        try:
            graph = gptc.build_graph(spec, mode)
            for fuse in (True, False):
                plan = make_plan(graph, fuse)
                for target in TARGETS:
                    kernels = render_plan(plan, parse_target(target))
                    assert len(kernels) == len(plan.launches)
                    codes[target].update((k.code, k) for k in kernels)
            errors[name] = None
        except Exception as e:  # reported by the test of this case
            errors[name] = f"{type(e).__name__}: {e}"
    return errors, codes


@pytest.mark.parametrize("spec,mode", CASES, ids=[f"{_name(s)}-{m}" for s, m in CASES])
def test_spec_plans_and_renders(rendered, spec, mode):
    error = rendered[0][f"{_name(spec)}-{mode}"]
    assert error is None, error


@pytest.mark.parametrize("target", TARGETS)
def test_sample_of_kernels_compiles(rendered, target):
    by_family: dict[str, list] = {}
    for k in sorted(rendered[1][target].values(), key=lambda k: k.symbol):  # symbols are hashes: a fair draw
        by_family.setdefault(k.family, []).append(k)
    sample = [k for family in sorted(by_family) for k in by_family[family][:SAMPLE_PER_FAMILY]]
    assert {"pointwise", "row", "reduce", "matmul", "scatter", "attention", "attention_bwd"} <= set(by_family)
    # several kernels per translation unit, each in a namespace of its own (as test_compile_presets)
    batches = [sample[i:i + 8] for i in range(0, len(sample), 8)]
    sources = [(prelude() + "".join(f"namespace k{j} {{\n{k.code[len(prelude()):]}}}\n" for j, k in enumerate(batch)),
                f"fuzz_batch{i}", (), "; ".join(k.origin[:200] for k in batch)) for i, batch in enumerate(batches)]
    objects = compile_many(sources, parse_target(target))
    assert all(len(o) > 0 for o in objects)


@pytest.mark.parametrize("spec", TRAIN_SPECS, ids=[_name(s) for s in TRAIN_SPECS])
def test_spec_trains_on_cpu(spec):
    graph = gptc.build_graph(spec, "train")
    params = init_params(graph, 0)
    ex = ReferenceExecutor(graph, params)
    rng = np.random.default_rng(0)
    shape = (spec.train.batch_size, spec.model.seq_len)
    for step in (1, 2):
        out = ex.run({"tokens": rng.integers(0, spec.model.vocab_size, shape).astype(np.int32),
                      "targets": rng.integers(0, spec.model.vocab_size, shape).astype(np.int32),
                      "lr": np.float32(1e-3), "step": np.float32(step)})
        assert np.isfinite(out["loss"]) and np.isfinite(out["grad_norm"]) and out["grad_norm"] > 0
    after = ex.read(list(params))
    assert all(np.isfinite(v).all() for v in after.values())
    assert not np.array_equal(after["wte"], params["wte"])


def test_without_clipping_adamw_stays_pointwise():
    """With grad_clip = 0 nothing orders the update after the gradient norm, and AdamW
    used to join the weight-gradient matmul's epilogue, which cannot update in place."""
    spec = gptc.preset("hipgpt")
    graph = gptc.build_graph(replace(spec, train=replace(spec.train, grad_clip=0.0)), "train")
    plan = make_plan(graph, True)
    writer = {n: k for k in plan.kernels for n in k.nodes}
    assert {writer[n].family for n in graph.updates.values()} == {"pointwise"}
