"""Shared test fixtures: the GPU device, and a hand-written kernel that exercises the
prelude (bf16, warp shuffles, math built-ins, INFINITY, int64_t)."""
from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="module")
def device():
    """The GPU (AMD first, then NVIDIA); the gpu tests fail, not skip, without one."""
    from gptc.runtime.device import open_device
    dev = open_device("auto")
    if dev is None:
        pytest.fail("no GPU found: the gpu tests need an AMD or NVIDIA GPU")
    yield dev
    dev.close()
