"""hiprtc (gfx90a, gfx1030) and NVRTC (sm_90) compile prelude-using kernels without a GPU;
the on-disk code-object cache; compile errors. These run in CI and must not skip: when a
toolchain is missing they fail, saying to run .ci/install-compilers.sh."""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import struct

import pytest

from gptc.target import parse_target
from gptc.runtime import device
from gptc.runtime.cache import KernelCache, cache_key
from conftest import PRELUDE, ROW_LOGSUMEXP
from gptc.runtime.device import (Arg, CompileError, KernelSource, PackedArgs, compile_for_target,
                                 compile_many, compiler_available, detect_devices, f32, i32, i64,
                                 open_device, ptr, tensor_map)

KERNEL = PRELUDE + "// nodes: test.row_logsumexp (hand-written)" + ROW_LOGSUMEXP

AMD_ARCHS = ["gfx90a", "gfx1030"]
NV_ARCHS = ["sm_90"]
EM_AMDGPU, EM_CUDA = 224, 190
EF_AMDGPU_MACH = {"gfx906": 0x2F, "gfx908": 0x30, "gfx90a": 0x3F, "gfx1030": 0x36}


def require(vendor: str) -> None:
    ok, why = compiler_available(vendor)
    if not ok:
        pytest.fail(f"{why}\nThe kernel compilers are missing: run .ci/install-compilers.sh", pytrace=False)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test compiles into its own empty cache."""
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def elf_header(code: bytes) -> tuple[int, int]:
    """(e_machine, e_flags) of a 64-bit little-endian ELF."""
    assert code[:4] == b"\x7fELF", code[:16]
    assert code[4] == 2 and code[5] == 1, "expected ELF64, little endian"
    e_machine = struct.unpack_from("<H", code, 18)[0]
    e_flags = struct.unpack_from("<I", code, 48)[0]
    return e_machine, e_flags


# ------------------------------------------------------------------------- compilers

@pytest.mark.parametrize("vendor", ["amd", "nvidia"])
def test_toolchain_installed(vendor):
    require(vendor)


@pytest.mark.parametrize("arch", AMD_ARCHS)
def test_hiprtc_compiles_prelude_kernel(arch):
    require("amd")
    code = compile_for_target(KERNEL, "row_logsumexp", parse_target(f"hip:{arch}"), origin="test")
    machine, flags = elf_header(code)
    assert machine == EM_AMDGPU
    assert flags & 0xFF == EF_AMDGPU_MACH[arch], hex(flags)  # really built for that arch
    assert b"row_logsumexp" in code


@pytest.mark.parametrize("arch", NV_ARCHS)
def test_nvrtc_compiles_prelude_kernel_to_cubin(arch):
    require("nvidia")
    code = compile_for_target(KERNEL, "row_logsumexp", parse_target(f"cuda:{arch}"), origin="test")
    machine, _ = elf_header(code)
    assert machine == EM_CUDA  # a cubin (SASS), not PTX text
    assert b"row_logsumexp" in code


def test_hiprtc_wavefront_must_match_warp_size():
    require("amd")
    with pytest.raises(CompileError, match="WARP_SIZE does not match"):
        compile_for_target(KERNEL, "row_logsumexp", parse_target("hip:gfx90a"), options=["-DWARP_SIZE=32"])


def test_hiprtc_refuses_arch_unknown_to_installed_rocm():
    """hiprtc 5.2 would crash the process on gfx942: gptc must refuse before calling it."""
    require("amd")
    from gptc.runtime import hip

    if "gfx942" in hip.supported_archs():
        pytest.skip("this ROCm supports gfx942")  # only on a newer ROCm than Debian 12's
    with pytest.raises(ValueError, match="cannot compile for gfx942"):
        compile_for_target(KERNEL, "row_logsumexp", parse_target("hip:gfx942"))


@pytest.mark.parametrize("target,needle", [("hip:gfx90a", "undeclared identifier"),
                                           ("cuda:sm_90", "is undefined")])
def test_compile_error_reports_log_and_origin(target, needle):
    require(parse_target(target).vendor)
    bad = KERNEL + '\nextern "C" __global__ void broken(float* y) { y[0] = not_a_variable; }\n'
    origin = "nodes: add_17, gelu_18 (block 3 mlp)"
    with pytest.raises(CompileError) as info:
        compile_for_target(bad, "broken_kernel", parse_target(target), origin=origin)
    msg = str(info.value)
    assert "broken_kernel" in msg
    assert origin in msg
    assert needle in msg and "not_a_variable" in msg  # the compiler's own log
    assert info.value.log and needle in info.value.log
    assert "y[0] = not_a_variable" in msg  # the offending source line is quoted


def test_compile_many_matches_single_compiles():
    require("amd")
    require("nvidia")
    items = [KernelSource(KERNEL.replace("row_logsumexp", f"k{i}"), f"k{i}", origin=f"kernel {i}")
             for i in range(4)]
    for target in ("hip:gfx90a", "cuda:sm_90"):
        many = compile_many(items, target, jobs=2)
        single = [compile_for_target(k.source, k.name, parse_target(target)) for k in items]
        assert many == single
        assert all(f"k{i}".encode() in c for i, c in enumerate(many))


@pytest.mark.parametrize("target", ["hip:gfx1030", "cuda:sm_90"])
def test_compile_many_raises_the_compile_error(target, monkeypatch):
    """hiprtc compiles in worker processes: the CompileError must cross back whole."""
    require(parse_target(target).vendor)
    monkeypatch.setattr(device, "MIN_KERNELS_PER_PROCESS", 1)  # use workers even for 3 kernels
    items = [(KERNEL, "row_logsumexp"), (KERNEL + "\n#error boom\n", "bad", (), "the bad one"),
             (KERNEL.replace("row_logsumexp", "k2"), "k2")]
    with pytest.raises(CompileError, match="the bad one") as info:
        compile_many(items, target, jobs=2)
    # (the arch compiled for: sm_90 kernels compile as sm_90a)
    assert info.value.name == "bad" and "boom" in info.value.log and info.value.arch.startswith(parse_target(target).arch)


def test_compile_many_reads_hits_and_stores_misses(tmp_path, monkeypatch):
    require("amd")
    monkeypatch.setattr(device, "MIN_KERNELS_PER_PROCESS", 1)
    pools = []

    class CountingPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *a, **kw):
            pools.append(self)
            super().__init__(*a, **kw)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountingPool)
    cache = KernelCache(tmp_path / "c")
    items = [KernelSource(KERNEL.replace("row_logsumexp", f"k{i}"), f"k{i}") for i in range(3)]
    first = compile_many(items[:2], "hip:gfx90a", jobs=2, cache=cache)  # two misses: worker processes
    assert len(list((tmp_path / "c").glob("*/*.co"))) == 2  # the workers wrote the shared cache
    again = compile_many(items, "hip:gfx90a", jobs=2, cache=cache)  # two hits, one miss
    assert again[:2] == first and b"k2" in again[2]
    assert cache.hits == 2
    assert len(pools) == 1  # hiprtc ran in worker processes once; the single miss in-process


# ----------------------------------------------------------------------------- cache

@pytest.mark.parametrize("target", ["hip:gfx90a", "cuda:sm_90"])
def test_cache_hit_returns_identical_bytes(target, tmp_path):
    require(parse_target(target).vendor)
    cache = KernelCache(tmp_path / "c")
    a = compile_for_target(KERNEL, "row_logsumexp", target, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    b = compile_for_target(KERNEL, "row_logsumexp", target, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert a == b
    assert len(list((tmp_path / "c").glob("*/*.co"))) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_cache_entry_is_recompiled(damage, tmp_path):
    require("amd")
    cache = KernelCache(tmp_path / "c")
    good = compile_for_target(KERNEL, "row_logsumexp", "hip:gfx90a", cache=cache)
    [entry] = list((tmp_path / "c").glob("*/*.co"))
    blob = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        entry.write_bytes(blob[:-100] + bytes([blob[-100] ^ 0x01]) + blob[-99:])
    else:
        entry.write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = compile_for_target(KERNEL, "row_logsumexp", "hip:gfx90a", cache=cache)
    assert again == good
    assert cache.corrupt == 1
    assert entry.read_bytes() == blob  # rewritten whole
    assert compile_for_target(KERNEL, "row_logsumexp", "hip:gfx90a", cache=cache) == good
    assert cache.hits == 1


def test_cache_key_covers_source_arch_compiler_and_options():
    base = cache_key("src", "gfx90a", "hiprtc-9.0", ["-O3"])
    assert base == cache_key("src", "gfx90a", "hiprtc-9.0", ["-O3"])
    others = [cache_key("src2", "gfx90a", "hiprtc-9.0", ["-O3"]),
              cache_key("src", "gfx1030", "hiprtc-9.0", ["-O3"]),
              cache_key("src", "gfx90a", "hiprtc-9.1", ["-O3"]),
              cache_key("src", "gfx90a", "hiprtc-9.0", ["-O2"]),
              cache_key("src", "gfx90a", "hiprtc-9.0", []),
              cache_key("src", "gfx90a", "hiprtc-9.0", ["-O", "3"])]
    assert len({base, *others}) == 1 + len(others)


def test_cache_can_be_disabled(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTC_CACHE_DIR", "off")
    for cache in (KernelCache(), KernelCache(None)):
        assert not cache.enabled
        cache.put("ab" * 32, b"x")
        assert cache.get("ab" * 32) is None
    monkeypatch.setenv("GPTC_CACHE_DIR", str(tmp_path))
    assert KernelCache().root == tmp_path / "kernels"  # GPTC_CACHE_DIR is the root of all of gptc's caches


def test_cache_put_is_atomic_and_leaves_no_temp_files(tmp_path):
    cache = KernelCache(tmp_path)
    key = cache_key("s", "a", "c", [])
    cache.put(key, b"payload" * 1000)
    cache.put(key, b"other")  # replacing an entry
    assert cache.get(key) == b"other"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{key}.co"]


# ------------------------------------------------------------------- device layer

def test_packed_args_layout():
    packed = PackedArgs([ptr(0x1234_5678_9ABC), i32(-7), i64(1 << 40), f32(0.5), ("u32", 3)])
    params = ctypes.cast(packed.address, ctypes.POINTER(ctypes.c_void_p))
    assert ctypes.c_uint64.from_address(params[0]).value == 0x1234_5678_9ABC
    assert ctypes.c_int32.from_address(params[1]).value == -7
    assert ctypes.c_int64.from_address(params[2]).value == 1 << 40
    assert ctypes.c_float.from_address(params[3]).value == 0.5
    assert ctypes.c_uint32.from_address(params[4]).value == 3
    words = [(1 << 63) + w for w in range(16)]  # a TMA tensor map: its 128 bytes passed by value
    packed = PackedArgs([ptr(1), tensor_map(words)])
    params = ctypes.cast(packed.address, ctypes.POINTER(ctypes.c_void_p))
    assert list((ctypes.c_uint64 * 16).from_address(params[1])) == words
    with pytest.raises(TypeError, match="kernel argument 0"):
        PackedArgs([("f16", 1.0)])
    with pytest.raises(TypeError):
        PackedArgs([5])
    assert Arg("i32", 1) == ("i32", 1)


@pytest.mark.parametrize("vendor", ["amd", "nvidia"])
def test_driver_table_is_filled_from_the_bindings(vendor):
    """Every driver function a Device calls exists in the installed bindings."""
    require(vendor)
    table = device.driver_for(vendor)
    assert table.vendor == vendor and table.compiler_id() == compiler_available(vendor)[1]
    for field in dataclasses.fields(table):
        value = getattr(table, field.name)
        if field.name == "tensor_map_encode" and vendor == "amd":  # TMA is NVIDIA's (sm_90)
            assert value is None
            continue
        assert value is not None and (callable(value) or field.name in ("kind", "vendor", "thread_safe",
                                                                        "upload_waits", "success")), field.name


def test_device_discovery_never_raises():
    assert isinstance(detect_devices(), list)
    dev = open_device("auto")
    assert dev is None or dev.target.vendor in ("amd", "nvidia")
    if dev is not None:
        dev.close()
    with pytest.raises(ValueError):
        open_device("tpu")


def test_an_unusable_cache_warns_once_per_kind_in_one_line(tmp_path):
    """A kernel cache at a path that is a file: every kernel compiles, and the user is
    told once that the cache cannot be read and once that it cannot be written."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("x")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "gptc", "compile", "--preset", "tiny", "-o", str(tmp_path / "b"),
                             "--target", "cuda:sm_90"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(root), "GPTC_CACHE_DIR": str(not_a_dir)})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line]
    assert len(warnings) == 2, result.stderr
    assert warnings[0].startswith("gptc: warning: gptc kernel cache: cannot read ")
    assert warnings[1].startswith("gptc: warning: gptc kernel cache: cannot write ")


def test_sm90_needs_an_nvrtc_that_knows_sm90a(monkeypatch):
    """sm_90's kernels compile as sm_90a (wgmma): an NVRTC before 12.0 is named in one line."""
    from gptc.runtime import cuda
    monkeypatch.setattr(cuda, "supported_archs", lambda: {"sm_80", "sm_90"})
    monkeypatch.setattr(cuda, "nvrtc_version", lambda: (11, 8))
    with pytest.raises(ValueError, match=r"NVRTC 11.8 cannot compile for sm_90a \(wgmma\).*NVRTC 12.0 or later"):
        cuda.validate_arch("sm_90")
    cuda.validate_arch("sm_80")  # mma.sync: any NVRTC that knows the arch
    monkeypatch.setattr(cuda, "nvrtc_version", lambda: (12, 0))
    cuda.validate_arch("sm_90")
