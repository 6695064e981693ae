"""The tiny preset with each of RMSNorm, ScaleNorm, sinusoidal positions and SwiGLU
(and all of them with tied embeddings and no attention biases) trains on the CPU for
its 300 steps on the bundled corpus, the loss falling by at least 30%. About two
minutes per option on two cores (the NumPy reference runs every step)."""
from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest

from gptc.spec import preset
from gptc.tools import train as trainer

OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "scalenorm": dict(norm="scalenorm"),
    "sinusoidal": dict(pos="sinusoidal"),
    "swiglu": dict(ffn="swiglu"),
    "combined": dict(norm="rmsnorm", pos="sinusoidal", ffn="swiglu", tie_embeddings=True, attn_bias=False),
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    # one cache for the module: the bundled corpus is tokenized once
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "norms-train-cache"))


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_tiny_trains_300_steps_on_the_bundled_corpus(options):
    spec = preset("tiny")
    assert spec.train.steps == 300
    spec = replace(spec, model=replace(spec.model, **options),
                   train=replace(spec.train, eval_interval=300, eval_batches=1, checkpoint_interval=300))
    result = trainer.train(spec, None, device="cpu", out_dir=None, stdout=io.StringIO())
    assert len(result.losses) == 300
    first, last = result.losses[0], float(np.mean(result.losses[-10:]))
    assert np.all(np.isfinite(result.losses))
    assert last <= 0.7 * first, f"loss {first:.3f} -> {last:.3f}"
