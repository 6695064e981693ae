"""HIP backend: hiprtc compiles, the HIP module API loads and launches (hip-python).

Mirrors gptc/runtime/cuda.py line for line where the APIs allow. hip-python is
imported lazily (first use), so gptc imports without it.

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
from typing import Any, Sequence

from gptc.runtime.device import (INSTALL_HINT, CompileError, Device, DriverError, PackedArgs,
                                 PreparedLaunch, ToolchainMissingError, dim3, host_buffer,
                                 target_for)

COMPILER = "hiprtc"
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


def _check(result, what: str):
    """hip-python returns (err, *outputs): raise on error, else return the outputs."""
    hip, _ = _bindings()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != hip.hipError_t.hipSuccess:
        raise DriverError(f"{what} failed: {_error_text(err)}")
    return rest[0] if len(rest) == 1 else rest


def _error_text(err) -> str:
    hip, _ = _bindings()
    try:
        s = hip.hipGetErrorString(err)
        s = s[1] if isinstance(s, tuple) else s
        s = s.decode() if isinstance(s, bytes) else s
    except Exception:
        s = ""
    return f"{getattr(err, 'name', err)} ({int(err)}){': ' + s if s else ''}"


def _check_rtc(result, what: str):
    _, hiprtc = _bindings()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != hiprtc.hiprtcResult.HIPRTC_SUCCESS:
        raise DriverError(f"{what} failed: {getattr(err, 'name', err)} ({int(err)})")
    return rest[0] if len(rest) == 1 else rest


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
    opts = [f"--offload-arch={arch}", "-O3", *options]
    prog = _check_rtc(_hiprtc_call(hiprtc.hiprtcCreateProgram, source.encode(), f"{name}.hip".encode(), 0, [], []),
                      "hiprtcCreateProgram")
    try:
        bopts = [o.encode() for o in opts]
        err, = hiprtc.hiprtcCompileProgram(prog, len(bopts), bopts)
        log = _program_log(prog)
        if err != hiprtc.hiprtcResult.HIPRTC_SUCCESS:
            raise CompileError(name, log or f"{getattr(err, 'name', err)}", origin=origin, compiler=compiler_id(),
                               arch=arch, options=opts, source=source)
        size = _check_rtc(hiprtc.hiprtcGetCodeSize(prog), "hiprtcGetCodeSize")
        code = bytearray(size)
        _check_rtc(hiprtc.hiprtcGetCode(prog, code), "hiprtcGetCode")
        return bytes(code)
    finally:
        hiprtc.hiprtcDestroyProgram(prog.createRef())


def _program_log(prog) -> str:
    _, hiprtc = _bindings()
    n = _check_rtc(hiprtc.hiprtcGetProgramLogSize(prog), "hiprtcGetProgramLogSize")
    if n <= 1:
        return ""
    buf = bytearray(n)
    _check_rtc(hiprtc.hiprtcGetProgramLog(prog, buf), "hiprtcGetProgramLog")
    return bytes(buf).rstrip(b"\0").decode(errors="replace")


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


def describe_device(ordinal: int) -> str:
    p = _properties(ordinal)
    return f"{_text(p.name)} ({target_for('amd', _text(p.gcnArchName)).name})"


def open(ordinal: int = 0) -> "HipDevice":  # noqa: A001 - mirrors cuda.open
    return HipDevice(ordinal)


class Graph:
    """A captured, instantiated graph; replay with Device.replay()."""

    def __init__(self, graph, exec_):
        self.graph, self.exec = graph, exec_

    def release(self) -> None:
        hip, _ = _bindings()
        if self.exec is not None:
            hip.hipGraphExecDestroy(self.exec)
            hip.hipGraphDestroy(self.graph)
            self.exec = self.graph = None


class HipDevice(Device):
    def __init__(self, ordinal: int = 0):
        hip, _ = _bindings()
        self._hip = hip
        self.ordinal = ordinal
        _check(hip.hipSetDevice(ordinal), f"hipSetDevice({ordinal})")
        props = _properties(ordinal)
        self.target = target_for("amd", _text(props.gcnArchName))
        self.name = f"{_text(props.name)} ({self.target.name})"
        self.stream = _check(hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking), "hipStreamCreateWithFlags")
        self._allocs: dict[int, int] = {}
        self._modules: list[Any] = []

    def activate(self) -> None:
        """Make this device current in the calling thread (HIP state is per thread)."""
        _check(self._hip.hipSetDevice(self.ordinal), "hipSetDevice")

    # -- compile and load
    def load_module(self, code: bytes) -> Any:
        module = _check(self._hip.hipModuleLoadData(code), "hipModuleLoadData")
        self._modules.append(module)
        return module

    def get_function(self, module: Any, name: str) -> Any:
        return _check(self._hip.hipModuleGetFunction(module, name.encode()), f"hipModuleGetFunction({name})")

    # -- memory
    def alloc(self, nbytes: int) -> int:
        p = int(_check(self._hip.hipMalloc(max(1, int(nbytes))), f"hipMalloc({nbytes})"))
        self._allocs[p] = int(nbytes)
        return p

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr, None)
        _check(self._hip.hipFree(ptr), "hipFree")

    def upload(self, ptr: int, array) -> None:
        a = host_buffer(array, self._allocs.get(ptr), "upload")
        _check(self._hip.hipMemcpyHtoDAsync(ptr, a.ctypes.data, a.nbytes, self.stream), "hipMemcpyHtoDAsync")
        # ROCm does not promise that an async copy from pageable memory has read the
        # host buffer on return (CUDA does), and `a` may be a temporary: wait.
        self.synchronize()

    def download(self, ptr: int, array) -> None:
        a = host_buffer(array, self._allocs.get(ptr), "download", out=True)
        _check(self._hip.hipMemcpyDtoHAsync(a.ctypes.data, ptr, a.nbytes, self.stream), "hipMemcpyDtoHAsync")
        self.synchronize()

    def memset(self, ptr: int, byte: int, nbytes: int) -> None:
        _check(self._hip.hipMemsetD8Async(ptr, byte & 0xFF, nbytes, self.stream), "hipMemsetD8Async")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        _check(self._hip.hipMemcpyDtoDAsync(dst, src, nbytes, self.stream), "hipMemcpyDtoDAsync")

    # -- launch
    def prepare_launch(self, function, grid, block, shared_bytes, args, name="") -> PreparedLaunch:
        g, b = dim3(grid, "grid"), dim3(block, "block")
        packed = PackedArgs(args)
        call = functools.partial(self._hip.hipModuleLaunchKernel, function, *g, *b, int(shared_bytes),
                                 self.stream, packed.address, None)
        return PreparedLaunch(name or "kernel", g, b, int(shared_bytes), packed, call,
                              self._hip.hipError_t.hipSuccess, _error_text)

    def synchronize(self) -> None:
        _check(self._hip.hipStreamSynchronize(self.stream), "hipStreamSynchronize")

    # -- timing
    def event(self) -> Any:
        return _check(self._hip.hipEventCreate(), "hipEventCreate")

    def record(self, ev: Any) -> None:
        _check(self._hip.hipEventRecord(ev, self.stream), "hipEventRecord")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        _check(self._hip.hipEventSynchronize(end), "hipEventSynchronize")
        return float(_check(self._hip.hipEventElapsedTime(start, end), "hipEventElapsedTime"))

    # -- graphs
    def begin_capture(self) -> None:
        mode = self._hip.hipStreamCaptureMode.hipStreamCaptureModeThreadLocal
        _check(self._hip.hipStreamBeginCapture(self.stream, mode), "hipStreamBeginCapture")

    def end_capture(self) -> Graph:
        graph = _check(self._hip.hipStreamEndCapture(self.stream), "hipStreamEndCapture")
        exec_ = _check(self._hip.hipGraphInstantiateWithFlags(graph, 0), "hipGraphInstantiateWithFlags")
        return Graph(graph, exec_)

    def replay(self, graph: Graph) -> None:
        _check(self._hip.hipGraphLaunch(graph.exec, self.stream), "hipGraphLaunch")

    def close(self) -> None:
        if getattr(self, "stream", None) is None:
            return
        try:
            self.synchronize()
        finally:
            for p in list(self._allocs):
                self._hip.hipFree(p)
            self._allocs.clear()
            for m in self._modules:
                self._hip.hipModuleUnload(m)
            self._modules.clear()
            self._hip.hipStreamDestroy(self.stream)
            self.stream = None

