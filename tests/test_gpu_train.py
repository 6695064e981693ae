"""The trainer on a GPU, through the generated kernels: the same losses as the NumPy
reference, and resume equal to an uninterrupted run (within fp32 rounding: the
embedding gradient's scatter adds with atomics, so the order of additions varies)."""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptc.tools import train as trainer
from gptc.spec import preset

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path / "cache"))


def run(spec, device, out, **kw):
    return trainer.train(spec, None, device=device, out_dir=out, stdout=io.StringIO(), **kw)


def test_hipgpt_100_gpu_steps_equal_100_reference_steps(tmp_path):
    spec = preset("hipgpt")
    spec = replace(spec, train=replace(spec.train, steps=100, eval_interval=50, eval_batches=2, checkpoint_interval=100))
    gpu = run(spec, "gpu", tmp_path / "gpu")
    cpu = run(spec, "cpu", tmp_path / "cpu")
    rel = np.abs(np.array(gpu.losses) - cpu.losses) / np.array(cpu.losses)
    assert rel.max() < 1e-3, rel.max()
    assert gpu.losses[-1] < gpu.losses[0] - 1.0


def stop_at(n):
    def on_step(step, record):
        if step == n:
            raise KeyboardInterrupt
    return on_step


def test_resume_on_gpu_equals_uninterrupted(tmp_path):
    """200 steps straight equal 100 steps, Ctrl-C (a checkpoint), resume, 100 steps."""
    spec = preset("tiny")
    spec = replace(spec, train=replace(spec.train, steps=200, eval_interval=100, eval_batches=2,
                                       checkpoint_interval=50))
    straight = run(spec, "gpu", tmp_path / "straight")
    with pytest.raises(trainer.Interrupted):
        run(spec, "gpu", tmp_path / "split", on_step=stop_at(100))
    resumed = run(None, "gpu", None, resume=tmp_path / "split")
    assert len(resumed.losses) == 100
    np.testing.assert_allclose(resumed.losses, straight.losses[100:], rtol=1e-5)
