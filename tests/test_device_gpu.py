"""The Device layer on a real GPU (AMD through hip-python, NVIDIA through cuda-python).

Run on a machine with a GPU:  PYTHONPATH=. python3 -m pytest -m gpu tests/test_device_gpu.py -q
Outputs are poisoned (0xFF bytes: NaN) before every launch and checked element by
element at awkward sizes, with guard bytes past the end that must stay poisoned."""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import PRELUDE, ROW_LOGSUMEXP
from gptc.runtime.device import DriverError, detect_devices, f32, i64, open_device, ptr

pytestmark = pytest.mark.gpu


SOURCE = PRELUDE + r"""
// nodes: test.axpb, test.row_logsumexp (hand-written)
extern "C" __global__ void GPTC_LAUNCH_BOUNDS(256)
axpb(const float* __restrict__ x, float* __restrict__ y, bf16* __restrict__ yb, float a, float b, int64_t n) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float v = fmaf(a, x[i], b);
    y[i] = v;
    yb[i] = float_to_bf16(v);
  }
}

""" + ROW_LOGSUMEXP

GUARD = 64  # elements past the end of every output that must stay poisoned
BLOCK = 256


def bf16_bits(f: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (the prelude's rule)."""
    u = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module")
def dev():
    d = open_device("auto")
    if d is None:
        pytest.fail(f"no GPU found (detect_devices() = {detect_devices()}); gpu tests need one", pytrace=False)
    print(f"\n[gpu] device: {d.name}")
    yield d
    d.close()


@pytest.fixture(scope="module")
def kernels(dev, tmp_path_factory):
    import os

    os.environ["GPTC_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    t = time.perf_counter()
    code = dev.compile(SOURCE, "gpu_test", origin="tests/test_device_gpu.py")
    print(f"[gpu] compiled {len(code)} B for {dev.target.name} in {time.perf_counter() - t:.2f} s")
    module = dev.load_module(code)
    return {n: dev.get_function(module, n) for n in ("axpb", "row_logsumexp")}


class Buf:
    """A device buffer of n elements plus GUARD, poisoned with 0xFF."""

    def __init__(self, dev, n, dtype):
        self.dev, self.n, self.dtype = dev, n, np.dtype(dtype)
        self.nbytes = (n + GUARD) * self.dtype.itemsize
        self.ptr = dev.alloc(self.nbytes)
        self.poison()

    def poison(self):
        self.dev.memset(self.ptr, 0xFF, self.nbytes)

    def get(self):
        a = np.empty(self.n + GUARD, self.dtype)
        self.dev.download(self.ptr, a)
        assert np.all(a[self.n:].view(np.uint8) == 0xFF), "write past the end of the buffer"
        return a[: self.n]

    def free(self):
        self.dev.free(self.ptr)


@pytest.mark.parametrize("n", [1, 31, 33, 255, 257, 1000, 65537, 1_000_003])
def test_axpb_awkward_sizes(dev, kernels, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    xd, y, yb = Buf(dev, n, np.float32), Buf(dev, n, np.float32), Buf(dev, n, np.uint16)
    dev.upload(xd.ptr, x)
    a, b = np.float32(1.7), np.float32(-0.3)
    dev.launch(kernels["axpb"], ((n + BLOCK - 1) // BLOCK,), (BLOCK,), 0,
               [ptr(xd.ptr), ptr(y.ptr), ptr(yb.ptr), f32(a), f32(b), i64(n)])
    got, got_b = y.get(), yb.get()
    assert not np.isnan(got).any(), "some outputs were never written"
    ref = (a.astype(np.float64) * x + b).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_b, bf16_bits(got))
    for buf in (xd, y, yb):
        buf.free()


def test_bf16_rounding_special_values(dev, kernels):
    """y = 1*x + 0 is exact, so yb must be exactly the RNE bf16 of x, specials included."""
    specials = np.array([0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.3961e38, -3.3961e38,
                         3.3895e38, 1.00390625, 1.01171875, 1.0078125, 65504.0, 2.0 ** -126], np.float32)
    halfway = bf16_to_f32(np.arange(0, 1 << 16, 37, dtype=np.uint32).astype(np.uint16))
    halfway = (halfway.view(np.uint32) | 0x8000).view(np.float32)  # exact ties
    rng = np.random.default_rng(0)
    x = np.concatenate([specials, halfway, rng.standard_normal(999).astype(np.float32)])
    n = x.size
    xd, y, yb = Buf(dev, n, np.float32), Buf(dev, n, np.float32), Buf(dev, n, np.uint16)
    dev.upload(xd.ptr, x)
    dev.launch(kernels["axpb"], ((n + BLOCK - 1) // BLOCK,), (BLOCK,), 0,
               [ptr(xd.ptr), ptr(y.ptr), ptr(yb.ptr), f32(1.0), f32(0.0), i64(n)])
    got_b = yb.get()
    ok = ~np.isnan(x)
    np.testing.assert_array_equal(got_b[ok], bf16_bits(x)[ok])
    assert np.isnan(bf16_to_f32(got_b[~ok])).all()
    for buf in (xd, y, yb):
        buf.free()


@pytest.mark.parametrize("rows,n", [(1, 1), (37, 33), (5, 1000), (3, 4099)])
def test_row_logsumexp_warp_shuffles(dev, kernels, rows, n):
    rng = np.random.default_rng(rows * n)
    xb = bf16_bits((rng.standard_normal((rows, n)) * 3).astype(np.float32))
    xd, out, outb = Buf(dev, rows * n, np.uint16), Buf(dev, rows, np.float32), Buf(dev, rows, np.uint16)
    dev.upload(xd.ptr, xb)
    dev.launch(kernels["row_logsumexp"], (rows,), (BLOCK,), 0, [ptr(xd.ptr), ptr(out.ptr), ptr(outb.ptr), i64(n)])
    got = out.get()
    xf = bf16_to_f32(xb).astype(np.float64)
    mx = xf.max(axis=1)
    ref = mx + np.log(np.exp(xf - mx[:, None]).sum(axis=1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outb.get(), bf16_bits(got))
    for buf in (xd, out, outb):
        buf.free()


def test_prepared_launch_and_timing(dev, kernels):
    n = 1 << 22
    x = np.linspace(-1, 1, n, dtype=np.float32)
    xd, y, yb = Buf(dev, n, np.float32), Buf(dev, n, np.float32), Buf(dev, n, np.uint16)
    dev.upload(xd.ptr, x)
    run = dev.prepare_launch(kernels["axpb"], (n + BLOCK - 1) // BLOCK, BLOCK, 0,
                             [ptr(xd.ptr), ptr(y.ptr), ptr(yb.ptr), f32(2.0), f32(0.0), i64(n)], name="axpb")
    run.launch()
    np.testing.assert_allclose(y.get(), 2 * x, rtol=1e-6)
    y.poison()
    run.launch()  # a prepared launch runs again, with the same arguments
    np.testing.assert_allclose(y.get(), 2 * x, rtol=1e-6)

    start, end = dev.event(), dev.event()
    for _ in range(3):
        run.launch()
    dev.record(start)
    reps = 50
    for _ in range(reps):
        run.launch()
    dev.record(end)
    ms = dev.elapsed_ms(start, end) / reps
    assert 0 < ms < 100
    gbs = n * (4 + 4 + 2) / (ms * 1e-3) / 1e9
    print(f"[gpu] axpb on {n} elements: {ms * 1e3:.1f} us, {gbs:.0f} GB/s")

    # host-side cost of one prepared launch (what the executor pays per kernel)
    dev.synchronize()
    t = time.perf_counter()
    small = dev.prepare_launch(kernels["axpb"], 1, BLOCK, 0,
                               [ptr(xd.ptr), ptr(y.ptr), ptr(yb.ptr), f32(1.0), f32(0.0), i64(BLOCK)])
    k = 2000
    for _ in range(k):
        small.launch()
    host_us = (time.perf_counter() - t) / k * 1e6
    dev.synchronize()
    print(f"[gpu] prepared launch: {host_us:.2f} us host time per launch")
    for buf in (xd, y, yb):
        buf.free()


def test_graph_capture_and_replay(dev, kernels):
    n = 100_003
    xd, y, yb, z = (Buf(dev, n, np.float32), Buf(dev, n, np.float32), Buf(dev, n, np.uint16),
                    Buf(dev, n, np.float32))
    grid = (n + BLOCK - 1) // BLOCK
    step = [dev.prepare_launch(kernels["axpb"], grid, BLOCK, 0,
                               [ptr(xd.ptr), ptr(y.ptr), ptr(yb.ptr), f32(0.5), f32(1.0), i64(n)]),
            dev.prepare_launch(kernels["axpb"], grid, BLOCK, 0,
                               [ptr(y.ptr), ptr(z.ptr), ptr(yb.ptr), f32(2.0), f32(0.0), i64(n)])]
    dev.synchronize()
    dev.begin_capture()
    dev.memset(z.ptr, 0xFF, n * 4)
    for s in step:
        s.launch()
    dev.copy(y.ptr, z.ptr, n * 4)  # y <- z: graph copies too
    graph = dev.end_capture()
    assert np.isnan(z.get()).all(), "work was executed during capture"

    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal(n).astype(np.float32)
        dev.upload(xd.ptr, x)  # inputs go to fixed buffers, then the graph replays
        dev.replay(graph)
        ref = 2 * (0.5 * x.astype(np.float64) + 1.0)
        np.testing.assert_allclose(z.get(), ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y.get(), ref, rtol=1e-6, atol=1e-6)

    # replay cost vs launching the same work directly
    start, end = dev.event(), dev.event()
    dev.record(start)
    for _ in range(100):
        dev.replay(graph)
    dev.record(end)
    print(f"[gpu] graph replay: {dev.elapsed_ms(start, end) * 10:.1f} us per step of 4 operations")
    graph.release()
    for buf in (xd, y, yb, z):
        buf.free()


def test_bad_arguments_are_reported(dev, kernels):
    p = dev.alloc(16)
    with pytest.raises(ValueError, match="do not fit"):
        dev.upload(p, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        dev.download(p, np.zeros((4, 2), np.float32)[:, 0])
    with pytest.raises(DriverError, match="launch of kernel"):
        dev.launch(kernels["axpb"], 1, 4096, 0, [ptr(p), ptr(p), ptr(p), f32(1), f32(0), i64(1)])  # block too big
    dev.synchronize()
    dev.free(p)
