"""What a GPU vendor's bindings give the rest of gptc: errors, the kernel-argument ABI,
and the DriverTable that gptc/runtime/cuda.py (cuda-python) and gptc/runtime/hip.py
(hip-python) each fill, over which gptc/runtime/device.py implements one Device.

Driver functions in a table follow the bindings' convention: a call returns
(error, *outputs), and the call worked when error == table.success."""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

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


def error_name(err: Any) -> str:
    """An error code as the bindings name it, with its number: "CUDA_ERROR_INVALID_VALUE (1)"."""
    return f"{getattr(err, 'name', err)} ({int(err)})"


def error_text(err: Any, get_string: Callable[[Any], Any]) -> str:
    """error_name(err) and the driver's own description (get_string: cuGetErrorString or
    hipGetErrorString, which return (error, text) or text, as bytes or str)."""
    try:
        s = get_string(err)
        s = s[1] if isinstance(s, tuple) else s
        s = s.decode() if isinstance(s, bytes) else s
    except Exception:
        s = ""
    return f"{error_name(err)}{': ' + s if s else ''}"


def unpack(result: Any, success: Any, what: str, describe: Callable[[Any], str] = error_name) -> Any:
    """The outputs of a binding call that returned (error, *outputs): one output bare,
    several as a tuple; raises DriverError naming `what` unless error == success."""
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != success:
        raise DriverError(f"{what} failed: {describe(err)}")
    return rest[0] if len(rest) == 1 else rest


# ------------------------------------------------------------------- run-time compilers

@dataclass(frozen=True)
class RuntimeCompiler:
    """The calls of NVRTC or hiprtc that compile one program, as the bindings name them
    (each returns (error, *outputs); `success` is the error of a call that worked)."""
    name: str                 # "nvrtc" | "hiprtc", for messages
    success: Any
    create: Callable          # (source, file name, 0, [], []) -> program
    compile: Callable         # (program, n, options) -> ()
    log_size: Callable        # (program) -> bytes of the log, its NUL included
    log: Callable             # (program, buffer)
    code_size: Callable       # (program) -> bytes of the code object
    code: Callable            # (program, buffer)
    destroy: Callable         # (program)


def compile_program(rtc: RuntimeCompiler, source: str, file_name: str, options: Sequence[str], *,
                    name: str, arch: str, compiler: str, origin: str) -> bytes:
    """Compile `source` to a code object; CompileError with the log and the source lines it names."""
    check = lambda result, what: unpack(result, rtc.success, f"{rtc.name} {what}")  # noqa: E731
    program = check(rtc.create(source.encode(), file_name.encode(), 0, [], []), "create")
    try:
        encoded = [o.encode() for o in options]
        err, = rtc.compile(program, len(encoded), encoded)
        size = check(rtc.log_size(program), "log size")
        log = b""
        if size > 1:
            buf = bytearray(size)
            check(rtc.log(program, buf), "log")
            log = bytes(buf).rstrip(b"\0")
        if err != rtc.success:
            raise CompileError(name, log.decode(errors="replace") or error_name(err), origin=origin,
                               compiler=compiler, arch=arch, options=options, source=source)
        code = bytearray(check(rtc.code_size(program), "code size"))
        check(rtc.code(program, code), "code")
        return bytes(code)
    finally:
        rtc.destroy(program)


# ---------------------------------------------------------------------- kernel args

ARG_KINDS: dict[str, type] = {
    "ptr": ctypes.c_uint64,   # device pointers are 64-bit on every target we support
    "i32": ctypes.c_int32,
    "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64,
    "u64": ctypes.c_uint64,
    "f32": ctypes.c_float,
    "f64": ctypes.c_double,
    "tensor_map": ctypes.c_uint64 * 16,  # a CUtensorMap's 128 bytes, passed by value (its 16 words)
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
def tensor_map(words: Sequence[int]) -> Arg: return Arg("tensor_map", tuple(int(w) for w in words))


class PackedArgs:
    """Kernel arguments packed once into the `void* kernelParams[]` array that
    hipModuleLaunchKernel / cuLaunchKernel take. `address` is that array's address;
    `values` keeps the ctypes objects it points at alive."""

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
            values.append(ctype(*value) if kind == "tensor_map" else ctype(value))
        self.kinds = tuple(kinds)
        self.values = values
        self.array = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.addressof(v) for v in values])
        self.address = ctypes.addressof(self.array)


# --------------------------------------------------------------------- driver table

Call = Callable[..., Any]  # a binding function: returns (error, *outputs)


@dataclass(frozen=True)
class DriverTable:
    """One vendor's compiler and driver, as the functions a Device and the compile
    entry points need. The fields after `success` are binding functions (or the
    bindings' functions with vendor flags bound), each returning (error, *outputs);
    the fields before are the vendor module's own and raise on failure."""

    # -- the vendor and its compiler (no GPU needed)
    kind: str                                    # "hip" | "cuda": what open_device takes
    vendor: str                                  # "amd" | "nvidia": the Target vendor
    thread_safe: bool                            # False: compile_many compiles in worker processes
    compiler_id: Callable[[], str]               # name + version, part of every cache key
    validate_arch: Callable[[str], None]         # raises ValueError before the compiler can crash on it
    compile_source: Callable[..., bytes]         # (source, name, arch, options, origin) -> code object

    # -- devices
    device_count: Callable[[], int]
    device_info: Callable[[int], tuple[str, str]]       # ordinal -> (name, arch as the device reports it)
    open_context: Callable[[int], Callable[[], None]]   # make the device current here; returns its release
    upload_waits: bool                           # upload must wait for the copy to read the host buffer
    bind_launch: Callable[..., Callable[[], Any]]  # (function, grid, block, shared, stream, params) -> a
                                                   # launch: one binding call, returning (error,)
    error_text: Callable[[Any], str]             # an error code with the driver's description
    success: Any                                 # the error code of a call that worked

    stream_create: Call                          # () -> stream (non-blocking)
    stream_synchronize: Call                     # (stream)
    stream_destroy: Call                         # (stream)
    module_load: Call                            # (code) -> module
    module_function: Call                        # (module, name: bytes) -> function
    module_unload: Call                          # (module)
    mem_info: Call                               # () -> (free bytes, total bytes)
    mem_alloc: Call                              # (nbytes) -> pointer
    mem_free: Call                               # (pointer)
    memcpy_htod: Call                            # (device dst, host src, nbytes, stream)
    memcpy_dtoh: Call                            # (host dst, device src, nbytes, stream)
    memcpy_dtod: Call                            # (device dst, device src, nbytes, stream)
    memset_d8: Call                              # (pointer, byte, nbytes, stream)
    event_create: Call                           # () -> event
    event_record: Call                           # (event, stream)
    event_synchronize: Call                      # (event)
    event_elapsed: Call                          # (start, end) -> milliseconds
    capture_begin: Call                          # (stream): thread-local capture mode
    capture_end: Call                            # (stream) -> graph
    graph_instantiate: Call                      # (graph) -> executable graph
    graph_launch: Call                           # (executable graph, stream)
    graph_exec_destroy: Call                     # (executable graph)
    graph_destroy: Call                          # (graph)
    # (stream, event): later work on stream waits for the event (multi-GPU training's
    # communication stream forks from and joins the step's stream through events)
    stream_wait_event: Call | None = None
    # (address, dims, strides, box) -> the 16 words of a TMA tensor map of bf16 elements
    # with the 128-byte swizzle (dims and box innermost first, in elements; strides in
    # elements, of dims 1..); None where the vendor has no TMA (kernels.TensorMap)
    tensor_map_encode: Callable[[int, Sequence[int], Sequence[int], Sequence[int]], list[int]] | None = None

    def check(self, result: Any, what: str) -> Any:
        """The outputs of a driver call; raises DriverError with the driver's description."""
        return unpack(result, self.success, f"{self.kind} {what}", self.error_text)
