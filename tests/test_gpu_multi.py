"""Data-parallel training on 2 GPUs through NCCL (RCCL), with `gptc train --gpus 2`:
50 steps on 2 GPUs at batch B per GPU equal 50 single-GPU steps at batch 2B on the
same windows (the ranks take the halves of the single run's batches: tools/data.py
Batches), loss and parameters to fp32 rounding; ZeRO-1 equals plain data parallelism;
a run forked from a 2-GPU checkpoint equals the uninterrupted run. Skipped unless 2
GPUs and the collective library's bindings are here."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gptc.spec import preset, spec_to_toml
from gptc.tools import checkpoint as ckpt
from gptc.tools import train as trainer

ROOT = Path(__file__).resolve().parent.parent
B, STEPS = 4, 50


def _gpus() -> int:
    from gptc.runtime.device import KINDS, driver_for
    counts = [0]
    for vendor in KINDS.values():
        try:
            counts.append(driver_for(vendor).device_count())
        except Exception:
            continue
    return max(counts)


def _bindings() -> bool:
    return importlib.util.find_spec("nccl") is not None or _has_rccl()


def _has_rccl() -> bool:
    try:
        from hip import rccl  # noqa: F401
        return True
    except ImportError:
        return False


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (_bindings() and _gpus() >= 2), reason="needs 2 GPUs and nccl4py (or hip.rccl)")]

SPEC = replace(preset("tiny"), train=replace(preset("tiny").train, batch_size=B, steps=STEPS, eval_interval=STEPS,
                                             eval_batches=2, checkpoint_interval=25, keep_checkpoints=5))


def _gptc_train(*argv: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "gptc", "train", *argv], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    spec_file = tmp / "spec.toml"
    spec_file.write_text(spec_to_toml(SPEC))
    single = replace(SPEC, train=replace(SPEC.train, batch_size=2 * B))
    trainer.train(single, None, device="gpu", out_dir=tmp / "single", stdout=io.StringIO())
    _gptc_train(str(spec_file), "--gpus", "2", "--out", str(tmp / "dp"))
    _gptc_train(str(spec_file), "--gpus", "2", "--zero1", "--out", str(tmp / "zero1"))
    _gptc_train("--resume", str(tmp / "dp" / "checkpoints" / ckpt.step_dir_name(25)), "--gpus", "2",
                "--out", str(tmp / "forked"))
    return tmp


def _losses(run: Path) -> np.ndarray:
    return np.array([r["loss"] for r in trainer.read_metrics(run)])


def _final(run: Path) -> ckpt.Checkpoint:
    return ckpt.load_checkpoint(ckpt.list_checkpoints(run)[-1][1])


def _close_params(a: ckpt.Checkpoint, b: ckpt.Checkpoint, atol: float) -> None:
    assert a.step == b.step == STEPS
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-3, atol=atol, err_msg=name)


def test_two_gpus_at_b_equal_one_gpu_at_2b(runs):
    dp, single = _losses(runs / "dp"), _losses(runs / "single")
    assert len(dp) == len(single) == STEPS
    # fp32 rounding: the two runs sum the batch's gradients in another order (a wrong
    # scale, batch or window would be off by far more)
    np.testing.assert_allclose(dp, single, rtol=5e-4)
    assert dp[-1] < dp[0] - 0.5
    _close_params(_final(runs / "dp"), _final(runs / "single"), atol=5e-4)
    grad_norms = [r["grad_norm"] for r in trainer.read_metrics(runs / "dp")]
    np.testing.assert_allclose(grad_norms, [r["grad_norm"] for r in trainer.read_metrics(runs / "single")], rtol=1e-3)


def test_zero1_equals_plain_data_parallelism(runs):
    np.testing.assert_allclose(_losses(runs / "zero1"), _losses(runs / "dp"), rtol=5e-4)
    z, d = _final(runs / "zero1"), _final(runs / "dp")
    _close_params(z, d, atol=5e-4)
    for name in d.optimizer:  # the moments, gathered whole from the ranks' slices
        np.testing.assert_allclose(z.optimizer[name], d.optimizer[name], rtol=1e-2, atol=1e-6, err_msg=name)


def test_resume_from_a_two_gpu_checkpoint_equals_uninterrupted(runs):
    forked, straight = _losses(runs / "forked"), _losses(runs / "dp")
    np.testing.assert_allclose(forked[-25:], straight[25:], rtol=2e-5)
    _close_params(_final(runs / "forked"), _final(runs / "dp"), atol=2e-5)


def test_only_rank_zero_wrote_the_run(runs):
    names = sorted(p.name for p in (runs / "dp").iterdir())
    assert "metrics.jsonl" in names and "checkpoints" in names
    assert [s for s, _ in ckpt.list_checkpoints(runs / "dp")] == [25, 50]
