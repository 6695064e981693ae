"""HIP's DriverTable: hiprtc compiles, the HIP module API loads and launches (hip-python).

hip-python is imported lazily (first use), so gptc imports without it.

Finding hiprtc (ROCM_PATH and the bridge directory)
---------------------------------------------------
hip-python loads `$ROCM_PATH/lib/libhiprtc.so` and `$ROCM_PATH/lib/libamdhip64.so`
(ROCM_PATH defaults to /opt/rocm). Debian 12 packages ROCm 5.2 in /usr/lib, exports
the hiprtc API from libamdhip64.so.5, and ships no libhiprtc.so at all. The script
.ci/install-compilers.sh therefore makes a bridge directory

    $GPTC_ROCM_BRIDGE (default ~/.cache/gptc/rocm-bridge)/lib/libhiprtc.so   -> libamdhip64.so.5
                                                          /lib/libamdhip64.so -> libamdhip64.so.5

and, before hip-python's first call, this module sets ROCM_PATH to that directory
when ROCM_PATH (or ROCM_HOME) is unset and /opt/rocm has no libhiprtc.so. A user
with a real ROCm install is unaffected; nobody has to export anything by hand.

With Debian's ROCm 5.2, hiprtc compiles for gfx906, gfx908, gfx90a and gfx1030
without a GPU; newer archs need a newer ROCm, and hiprtc 5.2 crashes the process
(SIGSEGV) on an arch it does not know, so validate_arch() refuses them first.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from gptc.runtime.drivers import (INSTALL_HINT, DriverError, DriverTable, RuntimeCompiler, ToolchainMissingError,
                                  compile_program, error_text, unpack)

THREAD_SAFE = False  # hiprtc 5.2: concurrent compiles in one process abort or segfault
BRIDGE_DIR = Path(os.environ.get("GPTC_ROCM_BRIDGE", "~/.cache/gptc/rocm-bridge")).expanduser()

# Archs hiprtc can compile for, by the ROCm release that provides it. A ROCm release
# supports the archs of the releases before it too.
ARCHS_BY_ROCM: list[tuple[tuple[int, int], set[str]]] = [
    ((5, 0), {"gfx906", "gfx908", "gfx90a", "gfx1030"}),
    ((5, 5), {"gfx940", "gfx941", "gfx942", "gfx1100", "gfx1101", "gfx1102"}),
    ((6, 3), {"gfx1200", "gfx1201"}),
    ((6, 4), {"gfx950"}),
]


# ------------------------------------------------------------------------ bindings

def _default_rocm_path() -> None:
    if os.environ.get("ROCM_PATH") or os.environ.get("ROCM_HOME"):
        return
    if Path("/opt/rocm/lib/libhiprtc.so").exists():
        return
    if (BRIDGE_DIR / "lib" / "libhiprtc.so").exists():
        os.environ["ROCM_PATH"] = str(BRIDGE_DIR)


_load_lock = threading.Lock()
_compile_lock = threading.Lock()
_loaded: tuple | None = None


def _bindings():
    """(hip, hiprtc) modules of hip-python; raises ToolchainMissingError with a hint.

    hip-python opens its libraries on first call, unguarded: two threads racing there
    dlopen a freed path (seen: "failed to dlopen b'\\xe4'"). So the first caller opens
    both libraries here, under a lock, before any thread compiles."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _load_lock:
        if _loaded is None:
            _default_rocm_path()
            try:
                from hip import hip, hiprtc  # hip-python (>= 10 aliases rocm.bindings as hip)
            except ImportError as e:
                raise ToolchainMissingError(
                    f"hiprtc is unavailable: hip-python is not installed ({e}); {INSTALL_HINT}") from e
            _hiprtc_call(hiprtc.hiprtcVersion)      # opens libhiprtc.so
            _hiprtc_call(hip.hipRuntimeGetVersion)  # opens libamdhip64.so
            _loaded = (hip, hiprtc)
    return _loaded


def _hiprtc_call(fn, *args):
    """Call a hiprtc function; a library that cannot be loaded becomes ToolchainMissingError."""
    try:
        return fn(*args)
    except RuntimeError as e:  # hip-python raises RuntimeError when dlopen/dlsym fails
        raise ToolchainMissingError(
            f"hiprtc is unavailable: {e}. ROCM_PATH={os.environ.get('ROCM_PATH', '(unset)')}; "
            f"{INSTALL_HINT}") from e


def _error_text(err) -> str:
    hip, _ = _bindings()
    return error_text(err, hip.hipGetErrorString)


def _check(result, what: str):
    """hip-python returns (err, *outputs): raise on error, else return the outputs."""
    hip, _ = _bindings()
    return unpack(result, hip.hipError_t.hipSuccess, what, _error_text)


def _check_rtc(result, what: str):
    _, hiprtc = _bindings()
    return unpack(result, hiprtc.hiprtcResult.HIPRTC_SUCCESS, what)


# ------------------------------------------------------------------------- compile

@functools.lru_cache(maxsize=None)
def rocm_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the HIP runtime that provides hiprtc (5.2.21153 on Debian 12)."""
    hip, _ = _bindings()
    v = _check(_hiprtc_call(hip.hipRuntimeGetVersion), "hipRuntimeGetVersion")
    return v // 10_000_000, v // 100_000 % 100, v % 100_000


@functools.lru_cache(maxsize=None)
def compiler_id() -> str:
    """Compiler name + version, part of every cache key."""
    _, hiprtc = _bindings()
    major, minor = _check_rtc(_hiprtc_call(hiprtc.hiprtcVersion), "hiprtcVersion")
    return f"hiprtc-{major}.{minor}-rocm-{'.'.join(map(str, rocm_version()))}"


def supported_archs() -> set[str]:
    v = rocm_version()[:2]
    return set().union(*(archs for since, archs in ARCHS_BY_ROCM if v >= since))


def validate_arch(arch: str) -> None:
    base = arch.split(":")[0]
    ok = supported_archs()
    if base not in ok:
        v = ".".join(map(str, rocm_version()[:2]))
        raise ValueError(f"hiprtc from ROCm {v} cannot compile for {arch}; it supports "
                         f"{', '.join(sorted(ok))}. A newer ROCm (and matching hip-python) is needed for {arch}.")


def compile_source(source: str, name: str, arch: str, options: Sequence[str], origin: str = "") -> bytes:
    """Compile with hiprtc to an AMDGPU code object (ELF). Uncached: use compile_for_target."""
    with _compile_lock:  # hiprtc 5.2 is not thread-safe: concurrent compiles abort or segfault
        return _compile_locked(source, name, arch, options, origin)


def _compile_locked(source: str, name: str, arch: str, options: Sequence[str], origin: str) -> bytes:
    _, hiprtc = _bindings()
    rtc = RuntimeCompiler("hiprtc", hiprtc.hiprtcResult.HIPRTC_SUCCESS,
                          functools.partial(_hiprtc_call, hiprtc.hiprtcCreateProgram), hiprtc.hiprtcCompileProgram,
                          hiprtc.hiprtcGetProgramLogSize, hiprtc.hiprtcGetProgramLog, hiprtc.hiprtcGetCodeSize,
                          hiprtc.hiprtcGetCode, lambda program: hiprtc.hiprtcDestroyProgram(program.createRef()))
    return compile_program(rtc, source, f"{name}.hip", [f"--offload-arch={arch}", "-O3", *options], name=name,
                           arch=arch, compiler=compiler_id(), origin=origin)


# ------------------------------------------------------------------------- devices

def device_count() -> int:
    hip, _ = _bindings()
    err, n = hip.hipGetDeviceCount()
    return n if err == hip.hipError_t.hipSuccess else 0


def _properties(ordinal: int):
    hip, _ = _bindings()
    try:
        return _check(hip.hipGetDeviceProperties(ordinal), "hipGetDeviceProperties")
    except RuntimeError as e:  # e.g. hip-python 6+ asks for hipGetDevicePropertiesR0600, absent from ROCm 5
        raise DriverError(f"cannot read properties of HIP device {ordinal} ({e}); install the hip-python "
                          f"release matching this ROCm ({'.'.join(map(str, rocm_version()))})") from e


def _text(v) -> str:
    return (bytes(v).split(b"\0")[0].decode(errors="replace") if isinstance(v, (bytes, bytearray)) else str(v))


def device_info(ordinal: int) -> tuple[str, str]:
    """(name, gcnArchName, e.g. "gfx90a:sramecc+:xnack-") of HIP device `ordinal`."""
    p = _properties(ordinal)
    return _text(p.name), _text(p.gcnArchName)


def open_context(ordinal: int) -> Callable[[], None]:
    """Make the device current in this thread (HIP state is per thread); nothing to release."""
    hip, _ = _bindings()
    _check(hip.hipSetDevice(ordinal), f"hipSetDevice({ordinal})")
    return lambda: None


def _bind_launch(function: Any, grid: tuple, block: tuple, shared_bytes: int, stream: Any,
                 params: int) -> Callable[[], Any]:
    hip, _ = _bindings()
    return functools.partial(hip.hipModuleLaunchKernel, function, *grid, *block, shared_bytes, stream, params, None)


@functools.lru_cache(maxsize=None)
def driver_table() -> DriverTable:
    """The table gptc/runtime/device.py runs on; raises ToolchainMissingError without hip-python."""
    hip, _ = _bindings()
    return DriverTable(
        kind="hip", vendor="amd", thread_safe=THREAD_SAFE, compiler_id=compiler_id,
        validate_arch=validate_arch, compile_source=compile_source,
        device_count=device_count, device_info=device_info, open_context=open_context,
        # ROCm does not promise that an async copy from pageable memory has read the
        # host buffer on return (CUDA does), and it may be a temporary: wait.
        upload_waits=True,
        bind_launch=_bind_launch, error_text=_error_text, success=hip.hipError_t.hipSuccess,
        stream_create=functools.partial(hip.hipStreamCreateWithFlags, hip.hipStreamNonBlocking),
        stream_synchronize=hip.hipStreamSynchronize, stream_destroy=hip.hipStreamDestroy,
        module_load=hip.hipModuleLoadData, module_function=hip.hipModuleGetFunction,
        module_unload=hip.hipModuleUnload,
        mem_info=hip.hipMemGetInfo, mem_alloc=hip.hipMalloc, mem_free=hip.hipFree,
        memcpy_htod=hip.hipMemcpyHtoDAsync, memcpy_dtoh=hip.hipMemcpyDtoHAsync,
        memcpy_dtod=hip.hipMemcpyDtoDAsync, memset_d8=hip.hipMemsetD8Async,
        event_create=hip.hipEventCreate, event_record=hip.hipEventRecord,
        event_synchronize=hip.hipEventSynchronize, event_elapsed=hip.hipEventElapsedTime,
        capture_begin=lambda stream: hip.hipStreamBeginCapture(
            stream, hip.hipStreamCaptureMode.hipStreamCaptureModeThreadLocal),
        capture_end=hip.hipStreamEndCapture,
        graph_instantiate=lambda graph: hip.hipGraphInstantiateWithFlags(graph, 0),
        graph_launch=hip.hipGraphLaunch, graph_exec_destroy=hip.hipGraphExecDestroy,
        graph_destroy=hip.hipGraphDestroy,
        stream_wait_event=lambda stream, event: hip.hipStreamWaitEvent(stream, event, 0),
    )
