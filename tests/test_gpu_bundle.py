"""Bundles on a GPU: compile, load (no re-planning), run every step through the
generated executor.py with graph capture (losses and parameter changes against the
reference); KV-cache generation equals recomputation."""
from __future__ import annotations

import numpy as np
import pytest

import gptc
from gptc.target import parse_target
from gptc.runtime.bundle import Bundle, BundleError, compile_bundle
from gptc.tools.generate import gpu_model
from gptc.models import build_graph, init_params
from gptc.runtime.reference import ReferenceExecutor

from conftest import UPDATE_TOLERANCE, update_errors
from test_generate import DECODE_OPTIONS, check_generation, decode_spec, sampling_params

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_bundle(device, tmp_path_factory):
    return Bundle(compile_bundle(gptc.preset("tiny"), tmp_path_factory.mktemp("b") / "tiny", device.target, log=lambda s: None))


def test_bundle_training_steps_match_reference(device, rng, tiny_bundle):
    spec = tiny_bundle.spec
    graph = build_graph(spec, "train")
    params = init_params(graph, 1)
    runtime = tiny_bundle.open(device, params)
    ref = ReferenceExecutor(graph, params)
    try:
        for step in range(1, 6):
            rows = rng.integers(0, spec.model.vocab_size, (spec.train.batch_size, spec.model.seq_len + 1)).astype(np.int32)
            feeds = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "lr": np.float32(1e-3), "step": np.float32(step)}
            got = runtime.steps["train"].run(feeds)["loss"]
            want = ref.run(feeds)["loss"]
            assert abs(float(got) - float(want)) < 1e-4 * abs(float(want))
        names = list(graph.params)  # what the five steps changed, weight decay included
        worst = max((e, k) for k, e in update_errors(params, runtime.steps["train"].read(names), ref.read(names)).items())
        assert worst[0] < UPDATE_TOLERANCE, f"update {worst[1]}: {worst[0]:.2e}"
        # eval shares the params the train step just updated
        ev = runtime.steps["eval"].run({"tokens": rows[:, :-1], "targets": rows[:, 1:]})["loss"]
        ref_eval = ReferenceExecutor(build_graph(spec, "eval"), ref.read(list(graph.params)))
        assert abs(float(ev) - float(ref_eval.run({"tokens": rows[:, :-1], "targets": rows[:, 1:]})["loss"])) < 1e-4
    finally:
        runtime.close()


@pytest.mark.parametrize("name", list(DECODE_OPTIONS))
def test_kv_cache_generation_on_gpu_equals_recomputation(device, tmp_path, name):
    """Every attention kind and decoding option: the fused prefill and decode steps
    generate what full recomputation generates, and what the CPU reference does."""
    spec = decode_spec(name)
    bundle = Bundle(compile_bundle(spec, tmp_path / name, device.target, log=lambda s: None))
    params = sampling_params(spec)
    runtime = bundle.open(device, params)
    try:
        check_generation(spec, gpu_model(runtime), params)
    finally:
        runtime.close()


def test_bundle_for_another_target_is_refused(device, tiny_bundle):
    class Other:
        target = parse_target("hip:gfx90a" if device.target.vendor == "nvidia" else "cuda:sm_90")
    with pytest.raises(BundleError, match="compiled for"):
        tiny_bundle.open(Other())
