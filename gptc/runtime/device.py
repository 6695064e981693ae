"""One Device over a table of driver functions, and the compile entry points.

The vendors' tables: gptc/runtime/hip.py (hip-python: hiprtc + HIP module API) and
gptc/runtime/cuda.py (cuda-python: NVRTC + CUDA driver API) each fill a
gptc.runtime.drivers.DriverTable; the device logic below is written once over it.
Their Python bindings are imported lazily, so this module (and all of gptc) imports
on machines that have neither.

Compiling needs no GPU:

    code = compile_for_target(source, "my_kernel", parse_target("hip:gfx90a"),
                              origin="nodes: add_3, gelu_4")
    codes = compile_many([KernelSource(src, "k1"), KernelSource(src2, "k2")], "cuda:sm_90")

compile_for_target adds, in front of the caller's options, -std=c++17 and
-DWARP_SIZE=<target.wavefront> (unless the caller names them), then the arch flag
of the compiler. Results are cached on disk (gptc/runtime/cache.py).

Running needs a Device (open_device("auto"|"hip"|"cuda")). All its work goes, in
order, to one non-default stream that the device owns. Use a device from the thread
that opened it (HIP and CUDA keep the current device per thread):

    dev = open_device("auto")                      # None when there is no GPU
    fn = dev.get_function(dev.load_module(dev.compile(src, "k")), "k")
    x = dev.alloc(n * 4); dev.upload(x, host_array)
    run = dev.prepare_launch(fn, grid=(g, 1, 1), block=(256, 1, 1), shared_bytes=0,
                             args=[ptr(x), i32(n), f32(0.5)])
    run.launch()                                   # one driver call; arguments pre-packed
    dev.download(x, host_array)                    # waits for the stream, fills host_array

Device pointers are plain ints. Kernel arguments are typed: Arg(kind, value) with
kind one of ptr, i32, u32, i64, u64, f32, f64 (plain (kind, value) tuples work too).
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from gptc.common import usable_cpus
from gptc.target import Target, parse_target, target_for
from gptc.runtime import cuda, hip
from gptc.runtime.cache import KernelCache, cache_key, default_cache
from gptc.runtime.drivers import (ARG_KINDS, Arg, CompileError, DriverError, DriverTable, PackedArgs,
                                  ToolchainMissingError, f32, f64, i32, i64, ptr, tensor_map, u32, u64)

__all__ = ["ARG_KINDS", "Arg", "CompileError", "Device", "DriverError", "DriverTable", "Graph", "KernelSource",
           "PackedArgs", "PreparedLaunch", "ToolchainMissingError", "compile_for_target", "compile_many",
           "compiler_available", "detect_devices", "driver_for", "f32", "f64", "full_options", "i32", "i64",
           "open_device", "ptr", "tensor_map", "u32", "u64"]

# The vendors in the order "auto" tries them: AMD first.
TABLES: dict[str, Callable[[], DriverTable]] = {"amd": hip.driver_table, "nvidia": cuda.driver_table}
KINDS = {"hip": "amd", "cuda": "nvidia"}


def driver_for(vendor: str) -> DriverTable:
    """The driver table of a vendor ("amd" or "nvidia"); raises ToolchainMissingError
    when its bindings are not installed."""
    if vendor not in TABLES:
        raise ValueError(f"unknown vendor {vendor!r}")
    return TABLES[vendor]()


# ------------------------------------------------------------------------- launches

class PreparedLaunch:
    """One kernel launch with everything resolved: launch() is a single driver call."""

    __slots__ = ("name", "grid", "block", "shared_bytes", "args", "_call", "_driver")

    def __init__(self, name: str, grid: tuple, block: tuple, shared_bytes: int,
                 args: PackedArgs, call: Callable[[], Any], driver: DriverTable):
        self.name, self.grid, self.block, self.shared_bytes, self.args = name, grid, block, shared_bytes, args
        self._call, self._driver = call, driver

    def launch(self) -> None:
        err = self._call()[0]
        if err != self._driver.success:
            raise DriverError(f"launch of kernel '{self.name}' (grid {self.grid}, block {self.block}, "
                              f"{self.shared_bytes} B shared) failed: {self._driver.error_text(err)}")

    __call__ = launch


def host_buffer(array, alloc_size: int | None, what: str, out: bool = False):
    """array as a C-contiguous numpy array, checked against the allocation size (if known).
    out=True: the array itself must be writeable and C-contiguous (it is filled in place)."""
    import numpy as np

    if out:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"{what}: destination must be a writeable C-contiguous numpy array")
        a = array
    else:
        a = np.ascontiguousarray(array)
    if alloc_size is not None and a.nbytes > alloc_size:
        raise ValueError(f"{what}: {a.nbytes} bytes do not fit the {alloc_size}-byte allocation")
    return a


def dim3(v: int | Sequence[int], what: str) -> tuple[int, int, int]:
    t = (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)
    if not 1 <= len(t) <= 3 or any(x < 1 for x in t):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {v!r}")
    return t + (1,) * (3 - len(t))  # type: ignore[return-value]


# -------------------------------------------------------------------------- device

class Graph:
    """A captured, instantiated graph; replay with Device.replay()."""

    def __init__(self, driver: DriverTable, graph: Any, exec_: Any):
        self.driver, self.graph, self.exec = driver, graph, exec_

    def release(self) -> None:
        if self.exec is not None:
            self.driver.graph_exec_destroy(self.exec)
            self.driver.graph_destroy(self.graph)
            self.exec = self.graph = None


class Device:
    """A GPU and one stream on it, driven through a DriverTable. See the module docstring.

    name:   human readable, e.g. "NVIDIA H100 80GB HBM3 (cuda:sm_90)"
    target: the gptc.target.Target kernels must be compiled for
    """

    def __init__(self, driver: DriverTable, ordinal: int = 0):
        self.driver, self.ordinal = driver, ordinal
        self._release_context = driver.open_context(ordinal)
        self.name, self.target = describe_device(driver, ordinal)
        self.stream = driver.check(driver.stream_create(), "stream_create")
        self._allocs: dict[int, int] = {}  # pointer -> bytes, to check copies and free all on close
        self._modules: list[Any] = []
        self._side_stream: Any = None

    # -- compile and load
    def compile(self, source: str, name: str, options: Sequence[str] = (), origin: str = "") -> bytes:
        """source -> code object for this device's target (disk-cached)."""
        return compile_for_target(source, name, self.target, options, origin)

    def load_module(self, code: bytes) -> Any:
        module = self.driver.check(self.driver.module_load(code), "module_load")
        self._modules.append(module)
        return module

    def get_function(self, module: Any, name: str) -> Any:
        return self.driver.check(self.driver.module_function(module, name.encode()), f"module_function({name})")

    # -- memory (device pointers are ints; every copy is ordered on the device's stream)
    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        free, total = self.driver.check(self.driver.mem_info(), "mem_info")
        return int(free), int(total)

    def alloc(self, nbytes: int) -> int:
        p = int(self.driver.check(self.driver.mem_alloc(max(1, int(nbytes))), f"mem_alloc({nbytes})"))
        self._allocs[p] = int(nbytes)
        return p

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr, None)
        self.driver.check(self.driver.mem_free(ptr), "mem_free")

    def upload(self, ptr: int, array) -> None:
        """Copy a host array (C-contiguous) to ptr; the array may be reused on return."""
        a = host_buffer(array, self._allocs.get(ptr), "upload")
        self.driver.check(self.driver.memcpy_htod(ptr, a.ctypes.data, a.nbytes, self.stream), "memcpy_htod")
        if self.driver.upload_waits:
            self.synchronize()

    def download(self, ptr: int, array) -> None:
        """Fill the given C-contiguous host array from ptr; waits for the stream."""
        a = host_buffer(array, self._allocs.get(ptr), "download", out=True)
        self.driver.check(self.driver.memcpy_dtoh(a.ctypes.data, ptr, a.nbytes, self.stream), "memcpy_dtoh")
        self.synchronize()

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        self.driver.check(self.driver.memset_d8(ptr, byte & 0xFF, nbytes, self.stream), "memset_d8")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy."""
        self.driver.check(self.driver.memcpy_dtod(dst, src, nbytes, self.stream), "memcpy_dtod")

    # -- launch
    def prepare_launch(self, function: Any, grid: int | Sequence[int], block: int | Sequence[int],
                       shared_bytes: int, args: Sequence[Any], name: str = "") -> PreparedLaunch:
        g, b = dim3(grid, "grid"), dim3(block, "block")
        packed = PackedArgs(args)
        call = self.driver.bind_launch(function, g, b, int(shared_bytes), self.stream, packed.address)
        return PreparedLaunch(name or "kernel", g, b, int(shared_bytes), packed, call, self.driver)

    def tensor_map(self, address: int, dims: Sequence[int], strides: Sequence[int], box: Sequence[int]) -> Arg:
        """A kernel parameter: the TMA tensor map of the bf16 elements at `address`
        (DriverTable.tensor_map_encode); only a target with TMA compiles kernels that take one."""
        if self.driver.tensor_map_encode is None:
            raise DriverError(f"{self.name} has no tensor memory accelerator (TMA): a kernel compiled for "
                              f"another target takes a tensor map")
        return tensor_map(self.driver.tensor_map_encode(address, dims, strides, box))

    def launch(self, function: Any, grid: int | Sequence[int], block: int | Sequence[int],
               shared_bytes: int, args: Sequence[Any]) -> None:
        self.prepare_launch(function, grid, block, shared_bytes, args).launch()

    def synchronize(self) -> None:
        """Wait until everything queued on the device's stream has finished."""
        self.driver.check(self.driver.stream_synchronize(self.stream), "stream_synchronize")

    # -- timing
    def event(self) -> Any:
        return self.driver.check(self.driver.event_create(), "event_create")

    def record(self, ev: Any) -> None:
        self.driver.check(self.driver.event_record(ev, self.stream), "event_record")

    def side_stream(self) -> Any:
        """A second stream (made on first use): multi-GPU training's communication
        stream. Work on it is ordered against the device's stream by `handoff`."""
        if self._side_stream is None:
            self._side_stream = self.driver.check(self.driver.stream_create(), "stream_create")
        return self._side_stream

    def record_on(self, ev: Any, stream: Any) -> None:
        """Mark the work queued on `stream` so far (for `wait_for`)."""
        self.driver.check(self.driver.event_record(ev, stream), "event_record")

    def wait_for(self, stream: Any, ev: Any) -> None:
        """Work queued on `stream` from now on waits for the work `ev` marks (inside a
        capture this forks or joins the captured graph's branches)."""
        self.driver.check(self.driver.stream_wait_event(stream, ev), "stream_wait_event")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events (waits for `end`)."""
        self.driver.check(self.driver.event_synchronize(end), "event_synchronize")
        return float(self.driver.check(self.driver.event_elapsed(start, end), "event_elapsed"))

    # -- graphs
    def begin_capture(self) -> None:
        """Start recording the stream's work into a graph instead of running it."""
        self.driver.check(self.driver.capture_begin(self.stream), "capture_begin")

    def end_capture(self) -> Graph:
        """Stop recording; returns an instantiated graph for replay()."""
        graph = self.driver.check(self.driver.capture_end(self.stream), "capture_end")
        exec_ = self.driver.check(self.driver.graph_instantiate(graph), "graph_instantiate")
        return Graph(self.driver, graph, exec_)

    def replay(self, graph: Graph) -> None:
        self.driver.check(self.driver.graph_launch(graph.exec, self.stream), "graph_launch")

    def close(self) -> None:
        """Free every allocation and module, destroy the stream, release the device."""
        if self.stream is None:
            return
        try:
            self.synchronize()
        finally:  # unchecked: free all even when the device is in an error state
            for p in list(self._allocs):
                self.driver.mem_free(p)
            self._allocs.clear()
            for m in self._modules:
                self.driver.module_unload(m)
            self._modules.clear()
            if self._side_stream is not None:
                self.driver.stream_synchronize(self._side_stream)
                self.driver.stream_destroy(self._side_stream)
                self._side_stream = None
            self.driver.stream_destroy(self.stream)
            self.stream = None
            self._release_context()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


# ------------------------------------------------------------------------- compile

def _as_target(target: Target | str) -> Target:
    return parse_target(target) if isinstance(target, str) else target


def full_options(target: Target, options: Sequence[str]) -> list[str]:
    """The options compile_for_target passes, arch flag excluded."""
    opts = list(options)
    pre = []
    if not any(o.startswith("-std") for o in opts):
        pre.append("-std=c++17")
    if not any(o.replace(" ", "").startswith("-DWARP_SIZE") for o in opts):
        pre.append(f"-DWARP_SIZE={target.wavefront}")
    return pre + opts


def compile_for_target(source: str, name: str, target: Target | str, options: Sequence[str] = (),
                       origin: str = "", cache: KernelCache | None = None) -> bytes:
    """Compile kernel source for a target without any GPU: hiprtc for amd (a code
    object), NVRTC for nvidia (a cubin). Disk-cached; raises CompileError with the log."""
    target = _as_target(target)
    driver = driver_for(target.vendor)
    driver.validate_arch(target.arch)
    cache = default_cache() if cache is None else cache
    code = cache.get(cache_key(source, target.arch, driver.compiler_id(), full_options(target, options)))
    return code if code is not None else _compile_and_store(KernelSource(source, name, tuple(options), origin),
                                                            target, cache)


def _compile_and_store(k: "KernelSource", target: Target, cache: KernelCache) -> bytes:
    """Compile one kernel that the cache does not hold, and store it there."""
    driver = driver_for(target.vendor)
    opts = full_options(target, k.options)
    code = driver.compile_source(k.source, k.name, target.arch, opts, k.origin)
    cache.put(cache_key(k.source, target.arch, driver.compiler_id(), opts), code)
    return code


MIN_KERNELS_PER_PROCESS = 8


@dataclass(frozen=True)
class KernelSource:
    source: str
    name: str
    options: tuple[str, ...] = ()
    origin: str = ""


def compile_many(items: Iterable[KernelSource | tuple], target: Target | str, jobs: int | None = None,
                 cache: KernelCache | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[bytes]:
    """Compile many kernels for one target in parallel, in the order given. No GPU needed.

    items: KernelSource or (source, name[, options[, origin]]) tuples.
    Cache hits are read here; only misses are compiled, on `jobs` workers (default:
    one per core). Both bindings release the GIL, and threads scale (8 kernels on 2
    cores: NVRTC 0.43 s -> 0.27 s, hiprtc 1.26 s -> 0.65 s), but hiprtc 5.2 is not
    thread-safe (concurrent compiles abort or segfault the process), so NVRTC compiles
    on threads and hiprtc in spawned worker processes. A worker costs ~0.5 s to start
    (import, hiprtc's first compile) against ~0.2 s a kernel, so hiprtc uses one worker
    per MIN_KERNELS_PER_PROCESS misses and compiles in-process below that. Spawned
    workers re-import the caller's main module: scripts calling this need the usual
    `if __name__ == "__main__":` guard.
    Misses are compiled longest source first, so that no long kernel starts last.
    progress(done, misses) is called as each miss finishes.
    The first failure raises its CompileError once all kernels have finished."""
    target = _as_target(target)
    ks = [it if isinstance(it, KernelSource) else KernelSource(it[0], it[1], tuple(it[2]) if len(it) > 2 else (),
                                                                *it[3:4]) for it in items]
    cache = default_cache() if cache is None else cache
    driver = driver_for(target.vendor)
    driver.validate_arch(target.arch)
    compiler = driver.compiler_id()
    results: list[bytes | None] = [
        cache.get(cache_key(k.source, target.arch, compiler, full_options(target, k.options))) for k in ks]
    misses = sorted((i for i, r in enumerate(results) if r is None), key=lambda i: -len(ks[i].source))
    report = progress or (lambda done, total: None)
    jobs = max(1, min(jobs or usable_cpus(), len(misses)))
    if not driver.thread_safe:  # a worker process must have enough kernels to pay for its start
        jobs = max(1, min(jobs, len(misses) // MIN_KERNELS_PER_PROCESS))

    if jobs == 1:
        for done, i in enumerate(misses, 1):
            k = ks[i]
            results[i] = _compile_and_store(k, target, cache)
            report(done, len(misses))
        return results  # type: ignore[return-value]

    if driver.thread_safe:
        pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(
            jobs, thread_name_prefix="gptc-compile")
        submit = lambda k: pool.submit(_compile_and_store, k, target, cache)  # noqa: E731
    else:
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        root = None if cache.root is None else str(cache.root)
        submit = lambda k: pool.submit(_compile_in_worker, k, target.to_dict(), root)  # noqa: E731
    with pool:
        futures = {i: submit(ks[i]) for i in misses}
        for done, _ in enumerate(concurrent.futures.as_completed(futures.values()), 1):
            report(done, len(misses))
    for i, f in futures.items():
        results[i] = f.result()  # raises the first failure in order
    return results  # type: ignore[return-value]


def _compile_in_worker(k: KernelSource, target: dict, cache_root: str | None) -> bytes:
    """compile_many's worker process: compiles one kernel, stores it in the shared cache."""
    return _compile_and_store(k, Target(**target), KernelCache(cache_root))


def compiler_available(vendor: str) -> tuple[bool, str]:
    """(True, compiler id) if the compiler of that vendor can be used here, else (False, why)."""
    try:
        return True, driver_for(vendor).compiler_id()
    except ToolchainMissingError as e:
        return False, str(e)


# ------------------------------------------------------------------ device choice

def describe_device(driver: DriverTable, ordinal: int) -> tuple[str, Target]:
    """A device's name with its target, e.g. "NVIDIA H100 80GB HBM3 (cuda:sm_90)", and the target."""
    name, arch = driver.device_info(ordinal)
    target = target_for(driver.vendor, arch)
    return f"{name} ({target.name})", target


def detect_devices() -> list[tuple[str, int, str]]:
    """[(kind, ordinal, description)] of the GPUs usable here, AMD first. Never raises."""
    found = []
    for vendor in TABLES:
        try:
            driver = driver_for(vendor)
            for i in range(driver.device_count()):
                found.append((driver.kind, i, describe_device(driver, i)[0]))
        except Exception:  # no binding, no driver, no device: nothing of this kind
            continue
    return found


def open_device(kind: str = "auto", ordinal: int = 0) -> Device | None:
    """A Device of the given kind ("auto" prefers AMD, then NVIDIA), or None if none is
    usable. An explicit "hip"/"cuda" that exists but fails to open raises."""
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"device kind must be auto, hip or cuda, not {kind!r}")
    for k, vendor in KINDS.items():
        if kind not in ("auto", k):
            continue
        try:
            driver = driver_for(vendor)
            n = driver.device_count()
        except Exception:
            n = 0
        if n > ordinal:
            return Device(driver, ordinal)
    return None
