"""The one small interface every GPU backend implements, and the compile entry points.

Backends: gptc/runtime/hip.py (hip-python: hiprtc + HIP module API) and
gptc/runtime/cuda.py (cuda-python: NVRTC + CUDA driver API). They mirror each other.
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
order, to one non-default stream that the device owns:

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

import abc
import concurrent.futures
import ctypes
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from gptc.target import Target, parse_target, target_for
from gptc.runtime.cache import KernelCache, cache_key, default_cache

INSTALL_HINT = "run .ci/install-compilers.sh (it installs hiprtc, NVRTC and their Python bindings)"


# ---------------------------------------------------------------------------- errors

class ToolchainMissingError(RuntimeError):
    """A compiler or its Python binding is not installed or cannot be loaded."""


class DriverError(RuntimeError):
    """A HIP/CUDA driver or compiler call returned an error code."""


class CompileError(RuntimeError):
    """A kernel failed to compile. The message shows the kernel name, what it was
    generated from (origin: e.g. the graph nodes it computes), the compiler, arch and
    options, the compiler log, and the source lines the log points at."""

    def __init__(self, name: str, log: str, *, origin: str = "", compiler: str = "",
                 arch: str = "", options: Sequence[str] = (), source: str | None = None):
        self.name, self.log, self.origin = name, log, origin
        self.compiler, self.arch, self.options, self.source = compiler, arch, tuple(options), source
        lines = [f"{compiler or 'compiler'} failed to compile kernel '{name}' for {arch or '?'}"]
        if origin:
            lines.append(f"  generated from: {origin}")
        if options:
            lines.append(f"  options: {' '.join(options)}")
        lines.append("--- compiler log ---")
        lines.append(log.strip() or "(empty log)")
        excerpt = _source_excerpt(source, log) if source else ""
        if excerpt:
            lines.append("--- source lines named in the log ---")
            lines.append(excerpt)
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keyword-only fields: pickle them (compile_many's workers raise these)
        return (_rebuild_compile_error, (self.name, self.log, dict(
            origin=self.origin, compiler=self.compiler, arch=self.arch, options=self.options, source=self.source)))


def _rebuild_compile_error(name: str, log: str, kw: dict) -> CompileError:
    return CompileError(name, log, **kw)


def _source_excerpt(source: str, log: str, limit: int = 6) -> str:
    # hiprtc: "<file>:LINE:COL: error", NVRTC: "<file>(LINE): error"
    nums: list[int] = []
    for m in re.finditer(r"(?::(\d+):\d+: |\((\d+)\): )(?:error|fatal|catastrophic)", log):
        n = int(m.group(1) or m.group(2))
        if n not in nums:
            nums.append(n)
    src_lines = source.splitlines()
    out = [f"{n:5d} | {src_lines[n - 1]}" for n in nums[:limit] if 0 < n <= len(src_lines)]
    return "\n".join(out)


# ---------------------------------------------------------------------- kernel args

ARG_KINDS: dict[str, type] = {
    "ptr": ctypes.c_uint64,   # device pointers are 64-bit on every target we support
    "i32": ctypes.c_int32,
    "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64,
    "u64": ctypes.c_uint64,
    "f32": ctypes.c_float,
    "f64": ctypes.c_double,
}


class Arg(NamedTuple):
    kind: str   # one of ARG_KINDS
    value: Any


def ptr(v: int) -> Arg: return Arg("ptr", int(v))
def i32(v: int) -> Arg: return Arg("i32", int(v))
def u32(v: int) -> Arg: return Arg("u32", int(v))
def i64(v: int) -> Arg: return Arg("i64", int(v))
def u64(v: int) -> Arg: return Arg("u64", int(v))
def f32(v: float) -> Arg: return Arg("f32", float(v))
def f64(v: float) -> Arg: return Arg("f64", float(v))


class PackedArgs:
    """Kernel arguments packed once into the `void* kernelParams[]` array that
    hipModuleLaunchKernel / cuLaunchKernel take. `address` is that array's address.
    set(i, v) changes one argument in place (e.g. a decode position) for later launches
    (a graph captured earlier keeps the values it was captured with)."""

    __slots__ = ("kinds", "values", "array", "address")

    def __init__(self, args: Sequence[Any]):
        kinds, values = [], []
        for i, a in enumerate(args):
            try:
                kind, value = a
                ctype = ARG_KINDS[kind]
            except (TypeError, ValueError, KeyError):
                raise TypeError(f"kernel argument {i} must be Arg(kind, value) with kind in "
                                f"{sorted(ARG_KINDS)}, got {a!r}") from None
            kinds.append(kind)
            values.append(ctype(value))
        self.kinds = tuple(kinds)
        self.values = values
        self.array = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.addressof(v) for v in values])
        self.address = ctypes.addressof(self.array)

    def set(self, index: int, value: Any) -> None:
        self.values[index].value = value


class PreparedLaunch:
    """One kernel launch with everything resolved: launch() is a single driver call."""

    __slots__ = ("name", "grid", "block", "shared_bytes", "args", "_call", "_ok", "_describe")

    def __init__(self, name: str, grid: tuple, block: tuple, shared_bytes: int,
                 args: PackedArgs, call: Callable[[], tuple], ok: Any,
                 describe: Callable[[Any], str]):
        self.name, self.grid, self.block, self.shared_bytes, self.args = name, grid, block, shared_bytes, args
        self._call, self._ok, self._describe = call, ok, describe

    def launch(self) -> None:
        err = self._call()[0]
        if err != self._ok:
            raise DriverError(f"launch of kernel '{self.name}' (grid {self.grid}, block {self.block}, "
                              f"{self.shared_bytes} B shared) failed: {self._describe(err)}")

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


# ------------------------------------------------------------------------- devices

class Device(abc.ABC):
    """A GPU and one stream on it. See the module docstring for an example.

    name:   human readable, e.g. "NVIDIA H100 80GB HBM3 (cuda:sm_90)"
    target: the gptc.target.Target kernels must be compiled for
    """

    name: str
    target: Target

    # -- compile and load
    def compile(self, source: str, name: str, options: Sequence[str] = (), origin: str = "") -> bytes:
        """source -> code object for this device's target (disk-cached)."""
        return compile_for_target(source, name, self.target, options, origin)

    @abc.abstractmethod
    def load_module(self, code: bytes) -> Any: ...

    @abc.abstractmethod
    def get_function(self, module: Any, name: str) -> Any: ...

    # -- memory (device pointers are ints; every copy is ordered on the device's stream)
    @abc.abstractmethod
    def alloc(self, nbytes: int) -> int: ...

    @abc.abstractmethod
    def free(self, ptr: int) -> None: ...

    @abc.abstractmethod
    def upload(self, ptr: int, array) -> None:
        """Copy a host array (C-contiguous) to ptr; the array may be reused on return."""

    @abc.abstractmethod
    def download(self, ptr: int, array) -> None:
        """Fill the given C-contiguous host array from ptr; waits for the stream."""

    @abc.abstractmethod
    def memset(self, ptr: int, byte: int, nbytes: int) -> None: ...

    @abc.abstractmethod
    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy."""

    # -- launch
    @abc.abstractmethod
    def prepare_launch(self, function: Any, grid: int | Sequence[int], block: int | Sequence[int],
                       shared_bytes: int, args: Sequence[Any], name: str = "") -> PreparedLaunch: ...

    def launch(self, function: Any, grid: int | Sequence[int], block: int | Sequence[int],
               shared_bytes: int, args: Sequence[Any]) -> None:
        self.prepare_launch(function, grid, block, shared_bytes, args).launch()

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait until everything queued on the device's stream has finished."""

    # -- timing
    @abc.abstractmethod
    def event(self) -> Any: ...

    @abc.abstractmethod
    def record(self, ev: Any) -> None: ...

    @abc.abstractmethod
    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events (waits for `end`)."""

    # -- graphs
    @abc.abstractmethod
    def begin_capture(self) -> None:
        """Start recording the stream's work into a graph instead of running it."""

    @abc.abstractmethod
    def end_capture(self) -> Any:
        """Stop recording; returns an instantiated graph for replay()."""

    @abc.abstractmethod
    def replay(self, graph: Any) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


# ------------------------------------------------------------------------- compile

def _backend(vendor: str):
    if vendor == "amd":
        from gptc.runtime import hip as backend
    elif vendor == "nvidia":
        from gptc.runtime import cuda as backend
    else:
        raise ValueError(f"unknown vendor {vendor!r}")
    return backend


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
    backend = _backend(target.vendor)
    backend.validate_arch(target.arch)
    opts = full_options(target, options)
    cache = default_cache() if cache is None else cache
    return cache.get_or_compile(
        source, target.arch, backend.compiler_id(), opts,
        lambda: backend.compile_source(source, name, target.arch, opts, origin))


MIN_KERNELS_PER_PROCESS = 8


@dataclass(frozen=True)
class KernelSource:
    source: str
    name: str
    options: tuple[str, ...] = ()
    origin: str = ""


def compile_many(items: Iterable[KernelSource | tuple], target: Target | str, jobs: int | None = None,
                 cache: KernelCache | None = None) -> list[bytes]:
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
    The first failure raises its CompileError once all kernels have finished."""
    target = _as_target(target)
    ks = [it if isinstance(it, KernelSource) else KernelSource(it[0], it[1], tuple(it[2]) if len(it) > 2 else (),
                                                                *it[3:4]) for it in items]
    cache = default_cache() if cache is None else cache
    backend = _backend(target.vendor)
    backend.validate_arch(target.arch)
    compiler = backend.compiler_id()
    results: list[bytes | None] = [
        cache.get(cache_key(k.source, target.arch, compiler, full_options(target, k.options))) for k in ks]
    misses = [i for i, r in enumerate(results) if r is None]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(misses)))
    if not backend.THREAD_SAFE:  # a worker process must have enough kernels to pay for its start
        jobs = max(1, min(jobs, len(misses) // MIN_KERNELS_PER_PROCESS))

    if jobs == 1:
        for i in misses:
            k = ks[i]
            results[i] = compile_for_target(k.source, k.name, target, k.options, k.origin, cache)
        return results  # type: ignore[return-value]

    if backend.THREAD_SAFE:
        pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(
            jobs, thread_name_prefix="gptc-compile")
        submit = lambda k: pool.submit(compile_for_target, k.source, k.name, target, k.options, k.origin, cache)  # noqa: E731
    else:
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        root = None if cache.root is None else str(cache.root)
        submit = lambda k: pool.submit(_compile_in_worker, k, target.to_dict(), root)  # noqa: E731
    with pool:
        futures = {i: submit(ks[i]) for i in misses}
        concurrent.futures.wait(futures.values())
    for i, f in futures.items():
        results[i] = f.result()  # raises the first failure in order
    return results  # type: ignore[return-value]


def _compile_in_worker(k: KernelSource, target: dict, cache_root: str | None) -> bytes:
    """compile_many's worker process: compiles one kernel, stores it in the shared cache."""
    return compile_for_target(k.source, k.name, Target(**target), k.options, k.origin, KernelCache(cache_root))


def compiler_available(vendor: str) -> tuple[bool, str]:
    """(True, compiler id) if the compiler of that vendor can be used here, else (False, why)."""
    try:
        return True, _backend(vendor).compiler_id()
    except ToolchainMissingError as e:
        return False, str(e)


# ------------------------------------------------------------------ device choice

def detect_devices() -> list[tuple[str, int, str]]:
    """[(kind, ordinal, description)] of the GPUs usable here, AMD first. Never raises."""
    found = []
    for kind, vendor in (("hip", "amd"), ("cuda", "nvidia")):
        try:
            backend = _backend(vendor)
            for i in range(backend.device_count()):
                found.append((kind, i, backend.describe_device(i)))
        except Exception:  # no binding, no driver, no device: nothing of this kind
            continue
    return found


def open_device(kind: str = "auto", ordinal: int = 0) -> Device | None:
    """A Device of the given kind ("auto" prefers AMD, then NVIDIA), or None if none is
    usable. An explicit "hip"/"cuda" that exists but fails to open raises."""
    if kind not in ("auto", "hip", "cuda"):
        raise ValueError(f"device kind must be auto, hip or cuda, not {kind!r}")
    for k, vendor in (("hip", "amd"), ("cuda", "nvidia")):
        if kind not in ("auto", k):
            continue
        try:
            backend = _backend(vendor)
            n = backend.device_count()
        except Exception:
            n = 0
        if n > ordinal:
            return backend.open(ordinal)
    return None
