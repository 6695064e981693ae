"""CUDA backend: NVRTC compiles, the CUDA driver API loads and launches (cuda-python).

Mirrors gptc/runtime/hip.py line for line where the APIs allow. cuda-python is
imported lazily (first use), so gptc imports without it. Both import paths are
supported: `cuda.bindings.{driver,nvrtc}` (cuda-bindings >= 12.6, 13.x) and the older
`cuda.{cuda,nvrtc}` (cuda-python 12.0 - 12.5).

NVRTC comes from the `nvidia-cuda-nvrtc` wheel (found by cuda-bindings through
cuda-pathfinder) and compiles `-arch=sm_XX` straight to a cubin, without a GPU or a
driver. The driver library (libcuda.so) is only needed to run kernels.

The device uses the GPU's primary context (shared with PyTorch and others) and one
non-blocking stream. CUDA state is per thread: call Device.activate() before using
a device from a thread other than the one that opened it.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Sequence

from gptc.runtime.device import (INSTALL_HINT, CompileError, Device, DriverError, PackedArgs,
                                 PreparedLaunch, ToolchainMissingError, dim3, host_buffer,
                                 target_for)

COMPILER = "nvrtc"
THREAD_SAFE = True  # NVRTC: concurrent calls on distinct programs are safe
DEFAULT_SHARED_LIMIT = 48 * 1024  # above this a kernel must opt in (cuFuncSetAttribute)


# ------------------------------------------------------------------------ bindings

_load_lock = threading.Lock()
_loaded: tuple | None = None


def _bindings():
    """(driver, nvrtc) modules of cuda-python; raises ToolchainMissingError with a hint.

    The first caller opens libnvrtc here, under a lock, before any thread compiles
    (as in hip.py; the driver library is opened by cuInit, single-threaded, in _init)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _load_lock:
        if _loaded is None:
            try:
                from cuda.bindings import driver, nvrtc
            except ImportError:
                try:
                    from cuda import cuda as driver, nvrtc  # cuda-python < 12.6
                except ImportError as e:
                    raise ToolchainMissingError(
                        f"NVRTC is unavailable: cuda-python (cuda-bindings) is not installed ({e}); "
                        f"{INSTALL_HINT}") from e
            _nvrtc_call(nvrtc.nvrtcVersion)  # opens libnvrtc
            _loaded = (driver, nvrtc)
    return _loaded


def _nvrtc_call(fn, *args):
    """Call an NVRTC function; a library that cannot be loaded becomes ToolchainMissingError."""
    try:
        return fn(*args)
    except (RuntimeError, OSError) as e:  # cuda-pathfinder could not find libnvrtc
        raise ToolchainMissingError(f"NVRTC is unavailable: {e}; {INSTALL_HINT}") from e


def _check(result, what: str):
    """cuda-python returns (err, *outputs): raise on error, else return the outputs."""
    driver, _ = _bindings()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != driver.CUresult.CUDA_SUCCESS:
        raise DriverError(f"{what} failed: {_error_text(err)}")
    return rest[0] if len(rest) == 1 else rest


def _error_text(err) -> str:
    driver, _ = _bindings()
    try:
        s = driver.cuGetErrorString(err)
        s = s[1] if isinstance(s, tuple) else s
        s = s.decode() if isinstance(s, bytes) else s
    except Exception:
        s = ""
    return f"{getattr(err, 'name', err)} ({int(err)}){': ' + s if s else ''}"


def _check_rtc(result, what: str):
    _, nvrtc = _bindings()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise DriverError(f"{what} failed: {getattr(err, 'name', err)} ({int(err)})")
    return rest[0] if len(rest) == 1 else rest


def _enum(v) -> int:
    return int(getattr(v, "value", v))


# ------------------------------------------------------------------------- compile

@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    _, nvrtc = _bindings()
    return tuple(_check_rtc(_nvrtc_call(nvrtc.nvrtcVersion), "nvrtcVersion"))  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def compiler_id() -> str:
    """Compiler name + version, part of every cache key."""
    major, minor = nvrtc_version()
    return f"nvrtc-{major}.{minor}"


@functools.lru_cache(maxsize=None)
def supported_archs() -> set[str]:
    _, nvrtc = _bindings()
    try:
        archs = _check_rtc(_nvrtc_call(nvrtc.nvrtcGetSupportedArchs), "nvrtcGetSupportedArchs")
    except DriverError:
        return set()
    return {f"sm_{a}" for a in archs}


def validate_arch(arch: str) -> None:
    ok = supported_archs()
    base = arch.rstrip("af") if arch.endswith(("a", "f")) and arch[-2].isdigit() else arch  # sm_90a -> sm_90
    if ok and base not in ok:
        major, minor = nvrtc_version()
        raise ValueError(f"NVRTC {major}.{minor} cannot compile for {arch}; it supports "
                         f"{', '.join(sorted(ok, key=lambda s: int(s[3:])))}.")


def compile_source(source: str, name: str, arch: str, options: Sequence[str], origin: str = "") -> bytes:
    """Compile with NVRTC to a cubin for arch (sm_XX). Uncached: use compile_for_target."""
    _, nvrtc = _bindings()
    opts = [f"-arch={arch}", *options]
    prog = _check_rtc(_nvrtc_call(nvrtc.nvrtcCreateProgram, source.encode(), f"{name}.cu".encode(), 0, [], []),
                      "nvrtcCreateProgram")
    try:
        bopts = [o.encode() for o in opts]
        err, = nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts)
        log = _program_log(prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(name, log or f"{getattr(err, 'name', err)}", origin=origin, compiler=compiler_id(),
                               arch=arch, options=opts, source=source)
        size = _check_rtc(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        code = b" " * size
        _check_rtc(nvrtc.nvrtcGetCUBIN(prog, code), "nvrtcGetCUBIN")
        return bytes(code)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _program_log(prog) -> str:
    _, nvrtc = _bindings()
    n = _check_rtc(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    if n <= 1:
        return ""
    buf = b" " * n
    _check_rtc(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return buf.rstrip(b"\0").decode(errors="replace")


# ------------------------------------------------------------------------- devices

@functools.lru_cache(maxsize=None)
def _init() -> None:
    driver, _ = _bindings()
    _check(driver.cuInit(0), "cuInit")


def device_count() -> int:
    driver, _ = _bindings()
    _init()
    return _check(driver.cuDeviceGetCount(), "cuDeviceGetCount")


def _device_info(ordinal: int):
    driver, _ = _bindings()
    _init()
    dev = _check(driver.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    name = _check(driver.cuDeviceGetName(256, dev), "cuDeviceGetName")
    attr = driver.CUdevice_attribute
    major = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    minor = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    return dev, _text(name), f"sm_{major}{minor}"


def _text(v) -> str:
    return (bytes(v).split(b"\0")[0].decode(errors="replace") if isinstance(v, (bytes, bytearray)) else str(v))


def describe_device(ordinal: int) -> str:
    _, name, arch = _device_info(ordinal)
    return f"{name} ({target_for('nvidia', arch).name})"


def open(ordinal: int = 0) -> "CudaDevice":  # noqa: A001 - mirrors hip.open
    return CudaDevice(ordinal)


class Graph:
    """A captured, instantiated graph; replay with Device.replay()."""

    def __init__(self, graph, exec_):
        self.graph, self.exec = graph, exec_

    def release(self) -> None:
        driver, _ = _bindings()
        if self.exec is not None:
            driver.cuGraphExecDestroy(self.exec)
            driver.cuGraphDestroy(self.graph)
            self.exec = self.graph = None


class CudaDevice(Device):
    def __init__(self, ordinal: int = 0):
        driver, _ = _bindings()
        self._cu = driver
        self.ordinal = ordinal
        self._dev, name, arch = _device_info(ordinal)
        self._ctx = _check(driver.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
        _check(driver.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        self.target = target_for("nvidia", arch)
        self.name = f"{name} ({self.target.name})"
        self.stream = _check(driver.cuStreamCreate(_enum(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
        self._allocs: dict[int, int] = {}
        self._modules: list[Any] = []

    def activate(self) -> None:
        """Make this device current in the calling thread (CUDA state is per thread)."""
        _check(self._cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    # -- compile and load
    def load_module(self, code: bytes) -> Any:
        module = _check(self._cu.cuModuleLoadData(code), "cuModuleLoadData")
        self._modules.append(module)
        return module

    def get_function(self, module: Any, name: str) -> Any:
        return _check(self._cu.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")

    # -- memory
    def alloc(self, nbytes: int) -> int:
        p = int(_check(self._cu.cuMemAlloc(max(1, int(nbytes))), f"cuMemAlloc({nbytes})"))
        self._allocs[p] = int(nbytes)
        return p

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr, None)
        _check(self._cu.cuMemFree(ptr), "cuMemFree")

    def upload(self, ptr: int, array) -> None:
        a = host_buffer(array, self._allocs.get(ptr), "upload")
        _check(self._cu.cuMemcpyHtoDAsync(ptr, a.ctypes.data, a.nbytes, self.stream), "cuMemcpyHtoDAsync")
        # CUDA copies pageable host memory to a staging buffer before returning, so
        # `a` may be freed now; the device-side copy stays ordered on the stream.

    def download(self, ptr: int, array) -> None:
        a = host_buffer(array, self._allocs.get(ptr), "download", out=True)
        _check(self._cu.cuMemcpyDtoHAsync(a.ctypes.data, ptr, a.nbytes, self.stream), "cuMemcpyDtoHAsync")
        self.synchronize()

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        _check(self._cu.cuMemsetD8Async(ptr, byte & 0xFF, nbytes, self.stream), "cuMemsetD8Async")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        _check(self._cu.cuMemcpyDtoDAsync(dst, src, nbytes, self.stream), "cuMemcpyDtoDAsync")

    # -- launch
    def prepare_launch(self, function, grid, block, shared_bytes, args, name="") -> PreparedLaunch:
        g, b = dim3(grid, "grid"), dim3(block, "block")
        packed = PackedArgs(args)
        if shared_bytes > DEFAULT_SHARED_LIMIT:  # opt in to large dynamic shared memory
            attr = self._cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(self._cu.cuFuncSetAttribute(function, attr, int(shared_bytes)), "cuFuncSetAttribute")
        call = functools.partial(self._cu.cuLaunchKernel, function, *g, *b, int(shared_bytes),
                                 self.stream, packed.address, 0)
        return PreparedLaunch(name or "kernel", g, b, int(shared_bytes), packed, call,
                              self._cu.CUresult.CUDA_SUCCESS, _error_text)

    def synchronize(self) -> None:
        _check(self._cu.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    # -- timing
    def event(self) -> Any:
        return _check(self._cu.cuEventCreate(_enum(self._cu.CUevent_flags.CU_EVENT_DEFAULT)), "cuEventCreate")

    def record(self, ev: Any) -> None:
        _check(self._cu.cuEventRecord(ev, self.stream), "cuEventRecord")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        _check(self._cu.cuEventSynchronize(end), "cuEventSynchronize")
        return float(_check(self._cu.cuEventElapsedTime(start, end), "cuEventElapsedTime"))

    # -- graphs
    def begin_capture(self) -> None:
        mode = self._cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        _check(self._cu.cuStreamBeginCapture(self.stream, mode), "cuStreamBeginCapture")

    def end_capture(self) -> Graph:
        graph = _check(self._cu.cuStreamEndCapture(self.stream), "cuStreamEndCapture")
        exec_ = _check(self._cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        return Graph(graph, exec_)

    def replay(self, graph: Graph) -> None:
        _check(self._cu.cuGraphLaunch(graph.exec, self.stream), "cuGraphLaunch")

    def close(self) -> None:
        if getattr(self, "stream", None) is None:
            return
        try:
            self.synchronize()
        finally:
            for p in list(self._allocs):
                self._cu.cuMemFree(p)
            self._allocs.clear()
            for m in self._modules:
                self._cu.cuModuleUnload(m)
            self._modules.clear()
            self._cu.cuStreamDestroy(self.stream)
            self.stream = None
            self._cu.cuDevicePrimaryCtxRelease(self._dev)
