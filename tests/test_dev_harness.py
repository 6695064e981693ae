"""dev/kernel.py, the per-family kernel harness, on a machine without a GPU: every
family renders and compiles with each of its variants (--compile-only), and without
--compile-only it says in one line that it needs a GPU and exits with status 1."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"pointwise": "37,53", "row": "13,129", "reduce": "517,33", "matmul": "67,131,45", "matmul_bf16": "67,131,45", "matmul_bf16_dx": "67,131,45",
          "matmul_bf16_gelu": "67,131,48", "matmul_bf16_wgrad": "67,131,45,2",
          "attention": "2,3,37,16", "attention_bwd": "2,3,37,16", "cross_entropy": "13,1031", "scatter": "97,23,19"}


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("dev_kernel", ROOT / "dev" / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.FAMILIES) == set(SHAPES)
    return module


@pytest.mark.parametrize("target", ["hip:gfx90a", "cuda:sm_90"])
@pytest.mark.parametrize("family", sorted(SHAPES))
def test_every_family_compiles(harness, capsys, family, target):
    assert harness.main(["--family", family, "--shape", SHAPES[family], "--compile-only", "--target", target]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"{family} ") and "codegen's choice" in lines[1]
    assert ("registers" if target.startswith("cuda") else "VGPRs") in lines[1] or "llvm-readelf not found" in lines[1], out


def test_without_a_gpu_it_says_so():
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1", "ROCR_VISIBLE_DEVICES": "-1"}
    run = subprocess.run([sys.executable, str(ROOT / "dev" / "kernel.py"), "--family", "row"],
                         capture_output=True, text=True, env=hidden, timeout=300)
    assert run.returncode == 1
    assert run.stdout == "" and run.stderr.startswith("no GPU found") and len(run.stderr.splitlines()) == 1
