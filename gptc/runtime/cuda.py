"""CUDA's DriverTable: NVRTC compiles, the CUDA driver API loads and launches (cuda-python).

cuda-python is imported lazily (first use), so gptc imports without it. Both import
paths are supported: `cuda.bindings.{driver,nvrtc}` (cuda-bindings >= 12.6, 13.x) and
the older `cuda.{cuda,nvrtc}` (cuda-python 12.0 - 12.5).

NVRTC comes from the `nvidia-cuda-nvrtc` wheel (found by cuda-bindings through
cuda-pathfinder) and compiles `-arch=sm_XX` straight to a cubin, without a GPU or a
driver. The driver library (libcuda.so) is only needed to run kernels.

A device uses the GPU's primary context (shared with PyTorch and others), made current
in the thread that opens the device: CUDA state is per thread, so use a Device from
the thread that opened it.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

from gptc.runtime.drivers import (INSTALL_HINT, DriverError, DriverTable, RuntimeCompiler, ToolchainMissingError,
                                  compile_program, error_text, unpack)

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


def _error_text(err) -> str:
    driver, _ = _bindings()
    return error_text(err, driver.cuGetErrorString)


def _check(result, what: str):
    """cuda-python returns (err, *outputs): raise on error, else return the outputs."""
    driver, _ = _bindings()
    return unpack(result, driver.CUresult.CUDA_SUCCESS, what, _error_text)


def _check_rtc(result, what: str):
    _, nvrtc = _bindings()
    return unpack(result, nvrtc.nvrtcResult.NVRTC_SUCCESS, what)


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


# A cubin for sm_90 runs on sm_90 devices only, so it may use that chip's arch-specific
# instructions (wgmma: templates/matmul_wgmma.hip.j2): it is compiled for sm_90a (NVRTC 12+).
_ARCH_SPECIFIC = {"sm_90": "sm_90a"}


def validate_arch(arch: str) -> None:
    ok = supported_archs()
    major, minor = nvrtc_version()
    base = arch.rstrip("af") if arch.endswith(("a", "f")) and arch[-2].isdigit() else arch  # sm_90a -> sm_90
    if ok and base not in ok:
        raise ValueError(f"NVRTC {major}.{minor} cannot compile for {arch}; it supports "
                         f"{', '.join(sorted(ok, key=lambda s: int(s[3:])))}.")
    if base in _ARCH_SPECIFIC and (major, minor) < (12, 0):
        raise ValueError(f"NVRTC {major}.{minor} cannot compile for {_ARCH_SPECIFIC[base]} (wgmma), which gptc's "
                         f"{base} kernels need; install NVRTC 12.0 or later (pip install nvidia-cuda-nvrtc)")


def compile_source(source: str, name: str, arch: str, options: Sequence[str], origin: str = "") -> bytes:
    """Compile with NVRTC to a cubin for arch (sm_XX). Uncached: use compile_for_target."""
    _, nvrtc = _bindings()
    arch = _ARCH_SPECIFIC.get(arch, arch)
    rtc = RuntimeCompiler("nvrtc", nvrtc.nvrtcResult.NVRTC_SUCCESS,
                          functools.partial(_nvrtc_call, nvrtc.nvrtcCreateProgram), nvrtc.nvrtcCompileProgram,
                          nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, nvrtc.nvrtcGetCUBINSize,
                          nvrtc.nvrtcGetCUBIN, nvrtc.nvrtcDestroyProgram)
    return compile_program(rtc, source, f"{name}.cu", [f"-arch={arch}", *options], name=name, arch=arch,
                           compiler=compiler_id(), origin=origin)


# ------------------------------------------------------------------------- devices

@functools.lru_cache(maxsize=None)
def _init() -> None:
    driver, _ = _bindings()
    _check(driver.cuInit(0), "cuInit")


def device_count() -> int:
    driver, _ = _bindings()
    _init()
    return _check(driver.cuDeviceGetCount(), "cuDeviceGetCount")


def _device(ordinal: int):
    driver, _ = _bindings()
    _init()
    return _check(driver.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")


def device_info(ordinal: int) -> tuple[str, str]:
    """(name, sm_XX) of CUDA device `ordinal`."""
    driver, _ = _bindings()
    dev = _device(ordinal)
    name = _check(driver.cuDeviceGetName(256, dev), "cuDeviceGetName")
    attr = driver.CUdevice_attribute
    major = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    minor = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    return _text(name), f"sm_{major}{minor}"


def _text(v) -> str:
    return (bytes(v).split(b"\0")[0].decode(errors="replace") if isinstance(v, (bytes, bytearray)) else str(v))


def open_context(ordinal: int) -> Callable[[], None]:
    """Retain the device's primary context and make it current in this thread; returns
    what releases it."""
    driver, _ = _bindings()
    dev = _device(ordinal)
    ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return lambda: driver.cuDevicePrimaryCtxRelease(dev)


def _bind_launch(function: Any, grid: tuple, block: tuple, shared_bytes: int, stream: Any,
                 params: int) -> Callable[[], Any]:
    driver, _ = _bindings()
    if shared_bytes > DEFAULT_SHARED_LIMIT:  # opt in to large dynamic shared memory
        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(driver.cuFuncSetAttribute(function, attr, int(shared_bytes)), "cuFuncSetAttribute")
    return functools.partial(driver.cuLaunchKernel, function, *grid, *block, shared_bytes, stream, params, 0)


def tensor_map_encode(address: int, dims: Sequence[int], strides: Sequence[int], box: Sequence[int]) -> list[int]:
    """A TMA tensor map of bf16 elements at `address` (16-byte aligned), `dims` and `box`
    in elements (innermost first), `strides` in elements of dims 1.. (16-byte
    multiples); read with the 128-byte swizzle (the layout wgmma's descriptors name),
    zeros past the extents. Its 16 words, for a kernel parameter."""
    driver, _ = _bindings()
    u64, u32 = driver.cuuint64_t, driver.cuuint32_t
    tensor_map = _check(driver.cuTensorMapEncodeTiled(
        driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, len(dims), address,
        [u64(d) for d in dims], [u64(2 * s) for s in strides], [u32(b) for b in box], [u32(1)] * len(dims),
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
        f"cuTensorMapEncodeTiled(dims {list(dims)}, strides {list(strides)}, box {list(box)})")
    return [int(w) for w in tensor_map.opaque]


@functools.lru_cache(maxsize=None)
def driver_table() -> DriverTable:
    """The table gptc/runtime/device.py runs on; raises ToolchainMissingError without cuda-python."""
    driver, _ = _bindings()
    return DriverTable(
        kind="cuda", vendor="nvidia", thread_safe=THREAD_SAFE, compiler_id=compiler_id,
        validate_arch=validate_arch, compile_source=compile_source,
        device_count=device_count, device_info=device_info, open_context=open_context,
        # CUDA copies pageable host memory to a staging buffer before an async copy
        # returns, so the host array may be freed at once.
        upload_waits=False,
        bind_launch=_bind_launch, error_text=_error_text, success=driver.CUresult.CUDA_SUCCESS,
        stream_create=functools.partial(driver.cuStreamCreate, _enum(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)),
        stream_synchronize=driver.cuStreamSynchronize, stream_destroy=driver.cuStreamDestroy,
        module_load=driver.cuModuleLoadData, module_function=driver.cuModuleGetFunction,
        module_unload=driver.cuModuleUnload,
        mem_info=driver.cuMemGetInfo, mem_alloc=driver.cuMemAlloc, mem_free=driver.cuMemFree,
        memcpy_htod=driver.cuMemcpyHtoDAsync, memcpy_dtoh=driver.cuMemcpyDtoHAsync,
        memcpy_dtod=driver.cuMemcpyDtoDAsync, memset_d8=driver.cuMemsetD8Async,
        event_create=functools.partial(driver.cuEventCreate, _enum(driver.CUevent_flags.CU_EVENT_DEFAULT)),
        event_record=driver.cuEventRecord, event_synchronize=driver.cuEventSynchronize,
        event_elapsed=driver.cuEventElapsedTime,
        capture_begin=lambda stream: driver.cuStreamBeginCapture(
            stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        capture_end=driver.cuStreamEndCapture,
        graph_instantiate=lambda graph: driver.cuGraphInstantiate(graph, 0),
        graph_launch=driver.cuGraphLaunch, graph_exec_destroy=driver.cuGraphExecDestroy,
        graph_destroy=driver.cuGraphDestroy,
        stream_wait_event=lambda stream, event: driver.cuStreamWaitEvent(stream, event, 0),
        tensor_map_encode=tensor_map_encode,
    )
