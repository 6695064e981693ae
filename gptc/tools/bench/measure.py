"""Measuring on the device: timers over device events, statistics over the samples,
the ceilings of the GPU (copy bandwidth, matrix-product rate), and gptc's own fused and
unfused plans, each step replayed as one device graph and each kernel timed alone."""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gptc.compiler.ir import Graph
from gptc.compiler.planner.cost import plan_costs
from gptc.tools.bench.config import FRAMEWORKS, KERNEL_LAUNCHES, KERNEL_REPLAYS, BenchConfig
from gptc.tools.bench.report import fmt_loss, fmt_rate, kernel_rows, launch_labels, plan_summary

MAX_SAMPLES = 500      # the most timed steps of one figure
COPY_BYTES = 1 << 30   # each of the two buffers of the copy-bandwidth ceiling


# ----------------------------------------------------------------------------- statistics

def summarize(samples_ms: Sequence[float]) -> dict:
    xs = sorted(float(x) for x in samples_ms)
    if not xs:
        return {"median_ms": float("nan"), "p10_ms": float("nan"), "p90_ms": float("nan"), "samples": 0}
    q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(xs), "p10_ms": q(0.1), "p90_ms": q(0.9), "samples": len(xs)}


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of logits (..., V) against int targets, in float64."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
    t = np.asarray(targets).reshape(-1)
    top = x.max(axis=1)
    lse = np.log(np.exp(x - top[:, None]).sum(axis=1)) + top
    return float(np.mean(lse - x[np.arange(len(t)), t]))


def tokens_per_s(tokens: int, ms: float) -> float:
    return tokens / (ms / 1e3) if ms and ms > 0 and math.isfinite(ms) else float("nan")


# ----------------------------------------------------------------------------- timing

class Timer:
    """Device events on one stream: event(), record(ev), elapsed_ms(a, b), sync()."""

    def event(self): raise NotImplementedError
    def record(self, ev) -> None: raise NotImplementedError
    def elapsed_ms(self, a, b) -> float: raise NotImplementedError
    def sync(self) -> None: raise NotImplementedError


class DeviceTimer(Timer):
    """Events of a gptc Device (they are reused: the driver API has no cheap destroy here)."""

    def __init__(self, device):
        self.device = device
        self._pool: list = []
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def event(self):
        if self._next == len(self._pool):
            self._pool.append(self.device.event())
        ev = self._pool[self._next]
        self._next += 1
        return ev

    def record(self, ev) -> None:
        self.device.record(ev)

    def elapsed_ms(self, a, b) -> float:
        return self.device.elapsed_ms(a, b)

    def sync(self) -> None:
        self.device.synchronize()


_DEVICE_TIMERS: dict[int, DeviceTimer] = {}


def device_timer(device) -> DeviceTimer:
    """One DeviceTimer per device, so its events are reused across measurements."""
    timer = _DEVICE_TIMERS.get(id(device))
    if timer is None or timer.device is not device:
        timer = _DEVICE_TIMERS[id(device)] = DeviceTimer(device)
    return timer


class TorchTimer(Timer):
    def __init__(self, torch):
        self.torch = torch

    def reset(self) -> None:
        pass

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, ev) -> None:
        ev.record()

    def elapsed_ms(self, a, b) -> float:
        return float(a.elapsed_time(b))

    def sync(self) -> None:
        self.torch.cuda.synchronize()


def sample_count(estimate_ms: float, repeats: int, budget_ms: float) -> int:
    """At least `repeats` samples, more while they fit in `budget_ms`, at most MAX_SAMPLES."""
    if not (estimate_ms > 0 and math.isfinite(estimate_ms)):
        return repeats
    return max(repeats, min(MAX_SAMPLES, int(budget_ms / estimate_ms)))


def measure(timer: Timer, enqueue: Callable[[], Any], repeats: int = 20, budget_ms: float = 1000.0,
            warmup: int = 3) -> list[float]:
    """Per-call device times (ms) of `enqueue` after `warmup` calls: events recorded
    between consecutive calls queued back to back (interval i ends where i+1
    starts, so host gaps that starve the device count), then one synchronize."""
    timer.reset()
    for _ in range(warmup):
        enqueue()
    a, b = timer.event(), timer.event()
    timer.record(a)
    for _ in range(3):
        enqueue()
    timer.record(b)
    timer.sync()
    n = sample_count(timer.elapsed_ms(a, b) / 3, repeats, budget_ms)
    timer.reset()
    events = [timer.event() for _ in range(n + 1)]
    timer.record(events[0])
    for i in range(n):
        enqueue()
        timer.record(events[i + 1])
    timer.sync()
    return [timer.elapsed_ms(events[i], events[i + 1]) for i in range(n)]


# ----------------------------------------------------------------------------- ceilings

def measure_copy(device, nbytes: int = COPY_BYTES) -> tuple[float, str]:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    timer = device_timer(device)
    src, dst = device.alloc(nbytes), device.alloc(nbytes)
    try:
        device.memset(src, 0x5A, nbytes)
        samples = measure(timer, lambda: device.copy(dst, src, nbytes), repeats=20, budget_ms=300, warmup=3)
    finally:
        device.synchronize()
        device.free(src)
        device.free(dst)
    ms = summarize(samples)["median_ms"]
    return 2 * nbytes / (ms / 1e3), f"copy of {nbytes >> 20} MiB on the device, bytes read + written, median of {len(samples)}"


def measure_gemm_torch(torch, n: int = 8192) -> dict[str, tuple[float, str]]:
    """fp32 (TF32 off), tf32 and bf16 rates of torch.matmul n^3 on random data."""
    timer = TorchTimer(torch)
    out = {}
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            gen = torch.Generator(device="cuda").manual_seed(0)
            a = torch.randn(n, n, device="cuda", generator=gen).to(dtype)
            b = torch.randn(n, n, device="cuda", generator=gen).to(dtype)
            c = torch.empty(n, n, device="cuda", dtype=dtype)
            samples = measure(timer, lambda: torch.matmul(a, b, out=c), repeats=10, budget_ms=200, warmup=3)
            ms = summarize(samples)["median_ms"]
            out[name] = (2 * n ** 3 / (ms / 1e3),
                         f"torch.matmul {n}x{n}x{n} {name}{' (TF32 off)' if name == 'fp32' else ''}, random data, "
                         f"median of {len(samples)}")
            del a, b, c
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        torch.cuda.empty_cache()
    return out


def stored_shapes(m: int, n: int, k: int, a_layout: str, b_layout: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The stored shapes of A and B: A (m, k) or, m-contiguous, (k, m); B (k, n) or (n, k)."""
    return ((m, k) if a_layout == "k" else (k, m)), ((k, n) if b_layout == "n" else (n, k))


def gptc_gemm_graph(m: int, n: int, k: int, a_layout: str, b_layout: str, dtype: str = "bf16") -> Graph:
    """C = A @ B stored in `dtype`, A and B `dtype` inputs in the given layouts."""
    g = Graph()
    sa, sb = stored_shapes(m, n, k, a_layout, b_layout)
    a, b = g.input("a", sa, dtype), g.input("b", sb, dtype)
    c = (a if a_layout == "k" else a.T) @ (b if b_layout == "n" else b.T)
    g.output("c", c if c.dtype == dtype else c.cast(dtype))
    return g


def measure_gemm_gptc(device, n: int = 4096) -> dict[str, tuple[float, str]]:
    """fp32 and bf16 rates of gptc's own matmul kernel on n^3 (lower bounds of the
    device's), bf16 from bf16 operands to a bf16 product as torch.matmul's."""
    from gptc.runtime.build import load_executor
    from gptc.compiler.planner import make_plan
    out = {}
    rng = np.random.default_rng(0)
    for name, dtype in (("fp32", "f32"), ("bf16", "bf16")):
        ex = load_executor(make_plan(gptc_gemm_graph(n, n, n, "k", "n", dtype), True), device, {})
        try:
            ex.run({"a": rng.standard_normal((n, n), np.float32), "b": rng.standard_normal((n, n), np.float32)})
            samples = measure(device_timer(device), ex.launch, repeats=10, budget_ms=300, warmup=2)
        finally:
            ex.close()
        ms = summarize(samples)["median_ms"]
        out[name] = (2 * n ** 3 / (ms / 1e3), f"gptc's own {name} matmul kernel {n}x{n}x{n} (PyTorch not available: "
                                              f"a lower bound of the device's rate), median of {len(samples)}")
    return out


def measure_ceilings(device, torch, log: Callable[[str], None] = print) -> dict:
    """The copy bandwidth and the matrix-product rate of each precision (`matrix`:
    name -> (FLOP/s, how)); ceilings_for picks the one a run's floor uses."""
    bw, bw_how = measure_copy(device)
    log(f"  copy bandwidth {bw / 1e12:.2f} TB/s")
    rates = measure_gemm_torch(torch) if torch is not None else measure_gemm_gptc(device)
    log("  matrix product " + ", ".join(f"{k} {v[0] / 1e12:.1f} TFLOP/s" for k, v in rates.items()))
    return {"copy_bytes_per_s": bw, "copy_how": bw_how, "matrix": rates}


def ceilings_for(ceilings: dict, precision: str) -> dict:
    """The ceilings of a run in `precision`: the floor's matrix-product rate is that of
    the precision the matmuls ran in (bf16 runs are held to the bf16 rate, not fp32's);
    the others are noted."""
    rates = dict(ceilings["matrix"])
    rate, how = rates.pop(precision)
    return {"copy_bytes_per_s": ceilings["copy_bytes_per_s"], "copy_how": ceilings["copy_how"],
            "gemm_name": precision, "gemm_flops_per_s": rate, "gemm_how": how, "noted": rates}


# ----------------------------------------------------------------------------- gptc's plans


def time_kernels(device, ex, count: int, launches: int = KERNEL_LAUNCHES, replays: int = KERNEL_REPLAYS) -> list[float]:
    """Each kernel in isolation: `launches` launches captured in one device graph,
    replayed `replays` times after one warm replay; median replay time / launches.
    Kernels run on the executor's current buffers; in-place updates (AdamW) change
    its parameters, so the executor is not used for anything after this."""
    timer = device_timer(device)
    times = []
    for i in range(count):
        device.begin_capture()
        try:
            for _ in range(launches):
                ex.run_kernel(i)
        finally:
            graph = device.end_capture()
        try:
            device.replay(graph)
            timer.reset()
            events = [timer.event() for _ in range(replays + 1)]
            timer.record(events[0])
            for r in range(replays):
                device.replay(graph)
                timer.record(events[r + 1])
            timer.sync()
            times.append(statistics.median(timer.elapsed_ms(events[r], events[r + 1]) for r in range(replays)) / launches)
        finally:
            if hasattr(graph, "release"):
                graph.release()
    return times


def bench_gptc(device, cfg: BenchConfig, what: str, fuse: bool, params: Mapping[str, np.ndarray],
               tokens: np.ndarray, targets: np.ndarray, ceilings: dict, log: Callable[[str], None]) -> tuple[dict, dict | None]:
    """One gptc plan: (step result, plan result with per-kernel rows)."""
    from gptc.runtime.build import load_executor
    from gptc.models import build_graph
    from gptc.compiler.planner import make_plan
    key = "gptc-fused" if fuse else "gptc-unfused"
    t0 = time.perf_counter()
    graph = build_graph(cfg.spec, what)
    plan = make_plan(graph, fuse)
    ex = load_executor(plan, device, params)
    try:
        losses = []
        if what == "train":
            for step in (1, 2):
                out = ex.run({"tokens": tokens, "targets": targets, "lr": np.float32(cfg.spec.train.lr),
                              "step": np.float32(step)})
                losses.append(float(out["loss"]))
        else:
            out = ex.run({"tokens": tokens})
            losses.append(cross_entropy(out["logits"], targets))
        setup_s = time.perf_counter() - t0
        samples = measure(device_timer(device), ex.launch, cfg.repeats, cfg.budget_ms)
        stats = summarize(samples)
        costs = plan_costs(plan)  # one per launch
        step = {"what": what, "framework": key, **stats, "tokens_per_s": tokens_per_s(tokens.size, stats["median_ms"]),
                "losses": losses, "setup_s": setup_s, "kernels": len(plan.kernels), "launches": len(costs)}
        log(f"  {FRAMEWORKS[key]:<28} {stats['median_ms']:9.3f} ms  {fmt_rate(step['tokens_per_s']):>9} tokens/s  "
            f"loss {fmt_loss(losses, 0)}  ({len(costs)} launches, first call {setup_s:.1f} s)")
        plan_result = None
        if cfg.per_kernel:
            times = time_kernels(device, ex, len(costs))
            rows = kernel_rows(costs, times, ceilings["copy_bytes_per_s"], ceilings["gemm_flops_per_s"],
                               launch_labels(plan))
            plan_result = {**plan_summary(rows, stats["median_ms"]), "rows": rows}
        return step, plan_result
    finally:
        ex.close()
