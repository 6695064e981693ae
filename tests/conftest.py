"""Shared test fixtures and checks: gptc's cache in a temporary directory for the whole
run, the GPU device, a seeded random generator whose seed a failing test reports, the
relative error and the update check of the GPU tests, a hand-written kernel that
exercises the prelude (bf16, warp shuffles, math built-ins, INFINITY, int64_t), and the
size of a PNG file."""
from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path
from typing import Mapping

import numpy as np
import pytest

PRELUDE = (Path(__file__).resolve().parents[1] / "templates" / "prelude.h").read_text()

# A row logsumexp over bf16 input: grid-stride loads, bf16 -> float, warp-shuffle max and
# sum reductions across the block, float math built-ins, INFINITY, int64_t, and a bf16 store.
ROW_LOGSUMEXP = r"""
extern "C" __global__ void GPTC_LAUNCH_BOUNDS(256)
row_logsumexp(const bf16* __restrict__ x, float* __restrict__ out, bf16* __restrict__ out_bf16, int64_t n) {
  __shared__ float partial[256 / WARP_SIZE];
  const bf16* row = x + (int64_t)blockIdx.x * n;
  const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
  const int nwarps = (blockDim.x + WARP_SIZE - 1) / WARP_SIZE;

  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, bf16_to_float(row[i]));
  for (int o = WARP_SIZE / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor(m, o));
  if (lane == 0) partial[warp] = m;
  __syncthreads();
  m = -INFINITY;
  for (int w = 0; w < nwarps; ++w) m = fmaxf(m, partial[w]);
  __syncthreads();

  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += __expf(bf16_to_float(row[i]) - m);
  for (int o = WARP_SIZE / 2; o > 0; o >>= 1) s += __shfl_xor(s, o);
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < nwarps; ++w) total += partial[w];
    float r = m + logf(total);
    out[blockIdx.x] = r;
    out_bf16[blockIdx.x] = float_to_bf16(r);
  }
}
"""


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """$GPTC_CACHE_DIR for the whole run (subprocesses inherit it): a session temporary
    directory, so tests never write into the user's ~/.cache/gptc; a GPTC_CACHE_DIR the
    developer set (e.g. a warm kernel cache) is kept. The ROCm bridge directory that
    .ci/install-compilers.sh makes is found through GPTC_ROCM_BRIDGE (default
    ~/.cache/gptc/rocm-bridge), not through GPTC_CACHE_DIR, so hiprtc keeps working."""
    if os.environ.get("GPTC_CACHE_DIR"):
        yield Path(os.environ["GPTC_CACHE_DIR"])
        return
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("gptc-cache")
        mp.setenv("GPTC_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def device():
    """The GPU (AMD first, then NVIDIA); the gpu tests fail, not skip, without one."""
    from gptc.runtime.device import open_device
    dev = open_device("auto")
    if dev is None:
        pytest.fail("no GPU found: the gpu tests need an AMD or NVIDIA GPU")
    yield dev
    dev.close()


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Random inputs, fresh on every run (a new seed each time) unless $GPTC_TEST_SEED
    names one; a failing test's report shows the seed that reproduces its inputs."""
    seed = int(os.environ.get("GPTC_TEST_SEED") or secrets.randbits(32))
    request.node.add_report_section("setup", "seed", f"GPTC_TEST_SEED={seed} reproduces these inputs\n")
    return np.random.default_rng(seed)


def parity_parameters(spec, seed: int = 0) -> dict[str, np.ndarray]:
    """A model's initial weights for the parity tests against the PyTorch twin, with
    random gains (ones and constants scaled by 1 + 0.2 N(0, 1)) and biases (zeros plus
    0.1 N(0, 1)), so that no term of the model hides; float32 values (the twin loads
    float32) held in float64."""
    from gptc.models import build_graph, init_params
    graph = build_graph(spec, "infer", batch=1)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, v in init_params(graph, seed).items():
        init = graph.node(graph.params[name])["attrs"]["init"]
        if init in ("ones", "constant"):
            v = v * (1 + 0.2 * rng.standard_normal(v.shape))
        elif init == "zeros":
            v = v + 0.1 * rng.standard_normal(v.shape)
        out[name] = v.astype(np.float32).astype(np.float64)
    return out


def require_torch():
    """PyTorch, for the parity tests against the PyTorch twin. It is a test dependency:
    missing, the test fails, unless GPTC_ALLOW_NO_TORCH=1 (a machine that only runs the
    GPU tests), where it skips."""
    try:
        import torch
    except ImportError as e:
        if os.environ.get("GPTC_ALLOW_NO_TORCH") == "1":
            pytest.skip("PyTorch is not installed (GPTC_ALLOW_NO_TORCH=1)")
        pytest.fail(f"PyTorch is needed for the parity tests ({e}): install the test dependencies with "
                    "pip install -e '.[test]'", pytrace=False)
    return torch


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref||, in float64; NaN in `out` fails."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(out).any(), "NaN in the output (an element was not written, or a read of poison)"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


# The largest relative error allowed in the change a training step makes to a param or
# state. AdamW's weight decay (lr * wd * p) is ~1e-4 of a parameter, as large as the
# error allowed in the new values themselves, but ~2e-3 of the change: comparing
# changes catches a missing decay term (test_gpu_kernels shows it on the CPU).
UPDATE_TOLERANCE = 5e-4


def update_errors(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                  ref: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per param or state of `ref`: the relative error of the change a step made
    (new - old) against the reference's change (ref - old, with ref rounded to float32
    as the device stores it, so that float32's spacing near a value of 1 is no error).
    The device rounds its own float32 arithmetic, so a new value one float32 spacing
    from the rounded reference is no error either: only what lies beyond counts (a
    norm gain near 1 that moves by 1e-5 would otherwise show a last-bit difference as
    an error of 1e-2 in that element)."""
    errors = {}
    for name, want in ref.items():
        before = np.asarray(old[name], np.float64)
        want = np.asarray(want, np.float32)
        expected = want.astype(np.float64) - before
        off = np.asarray(new[name], np.float64) - want
        off = np.sign(off) * np.maximum(np.abs(off) - np.spacing(np.abs(want)).astype(np.float64), 0.0)
        errors[name] = rel_err(expected + off, expected)
    return errors


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, after checking its signature and that its first
    chunk is the header (IHDR)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert kind == b"IHDR" and length == 13, f"{path} does not start with an IHDR chunk"
    return width, height


# llm.c's token files, as its dev/data/data_common.py (write_datafile, HEADERS_INFO)
# describes them: 256 int32 of header (magic, version, token count, zeros), then the
# tokens, uint16 in the "gpt-2" format and uint32 in the "llama-3" one. Written here
# from that description, independently of gptc/tools/shards.py, to check gptc reads
# llm.c's files; `count`, `magic` and `version` override the header (damaged files).
LLMC_FORMATS = {"gpt-2": (20240520, 1, np.uint16), "llama-3": (20240801, 7, np.uint32)}


def llmc_datafile(tokens, model_desc: str = "gpt-2", count: int | None = None, magic: int | None = None,
                  version: int | None = None) -> bytes:
    default_magic, default_version, dtype = LLMC_FORMATS[model_desc]
    header = np.zeros(256, dtype=np.int32)
    header[0] = default_magic if magic is None else magic
    header[1] = default_version if version is None else version
    header[2] = len(tokens) if count is None else count
    return header.tobytes() + np.array(tokens, dtype=dtype).tobytes()
