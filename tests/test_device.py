"""The Device logic without a GPU: a Device over a fake DriverTable whose driver keeps
device memory in Python bytearrays and records every call."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from gptc.runtime.device import Device, DriverError, DriverTable, Graph, f32, i32, ptr

OK, BAD = 0, 7  # the fake driver's error codes


class FakeDriver:
    """Device memory as bytearrays at made-up addresses; every call logged by name.
    A kernel is a Python function kernel(memory, grid, block, params) that reads its
    arguments from the packed `void* params[]` array, as a GPU would."""

    def __init__(self, kernels=None):
        self.kernels = kernels or {}
        self.memory: dict[int, bytearray] = {}
        self.calls: list[str] = []
        self.next_address = 0x10000
        self.live: dict[str, set] = {"streams": set(), "modules": set(), "graphs": set(), "contexts": set()}
        self.fail: set[str] = set()  # names of calls that return BAD
        self.free_bytes = 1 << 33

    def _log(self, name: str) -> int:
        self.calls.append(name)
        return BAD if name in self.fail else OK

    def buffer(self, address: int) -> tuple[bytearray, int]:
        """The allocation holding `address`, and the offset into it."""
        for base, mem in self.memory.items():
            if base <= address < base + len(mem):
                return mem, address - base
        raise AssertionError(f"address {address:#x} is in no allocation")

    # -- what a table holds
    def open_context(self, ordinal):
        self._log("open_context")
        self.live["contexts"].add(ordinal)
        return lambda: self.live["contexts"].discard(ordinal)

    def stream_create(self):
        self.live["streams"].add("s0")
        return self._log("stream_create"), "s0"

    def stream_destroy(self, stream):
        self.live["streams"].discard(stream)
        return (self._log("stream_destroy"),)

    def module_load(self, code):
        module = f"module:{code.decode()}"
        self.live["modules"].add(module)
        return self._log("module_load"), module

    def module_unload(self, module):
        self.live["modules"].discard(module)
        return (self._log("module_unload"),)

    def mem_alloc(self, nbytes):
        err = self._log("mem_alloc")
        if err != OK:
            return err, 0
        address = self.next_address
        self.next_address += (nbytes + 255) // 256 * 256 + 256
        self.memory[address] = bytearray(nbytes)
        return err, address

    def mem_free(self, address):
        del self.memory[address]
        return (self._log("mem_free"),)

    def memcpy_htod(self, dst, src, nbytes, stream):
        mem, at = self.buffer(dst)
        mem[at:at + nbytes] = ctypes.string_at(src, nbytes)
        return (self._log("memcpy_htod"),)

    def memcpy_dtoh(self, dst, src, nbytes, stream):
        mem, at = self.buffer(src)
        ctypes.memmove(dst, bytes(mem[at:at + nbytes]), nbytes)
        return (self._log("memcpy_dtoh"),)

    def memcpy_dtod(self, dst, src, nbytes, stream):
        (dmem, d), (smem, s) = self.buffer(dst), self.buffer(src)
        dmem[d:d + nbytes] = smem[s:s + nbytes]
        return (self._log("memcpy_dtod"),)

    def memset_d8(self, address, byte, nbytes, stream):
        mem, at = self.buffer(address)
        mem[at:at + nbytes] = bytes([byte]) * nbytes
        return (self._log("memset_d8"),)

    def bind_launch(self, function, grid, block, shared_bytes, stream, params):
        def launch():
            if block[0] > 1024:
                return (BAD,)
            self.kernels[function](self, grid, block, params)
            return (self._log(f"launch {function}"),)
        return launch

    def capture_end(self, stream):
        self.live["graphs"].add("g0")
        return self._log("capture_end"), "g0"

    def graph_destroy(self, graph):
        self.live["graphs"].discard(graph)
        return (self._log("graph_destroy"),)

    def table(self, upload_waits: bool = True) -> DriverTable:
        step = lambda name, *out: lambda *args: (self._log(name), *out)  # noqa: E731
        return DriverTable(
            kind="fake", vendor="nvidia", thread_safe=True, compiler_id=lambda: "fake-1.0",
            validate_arch=lambda arch: None, compile_source=lambda *a: b"",
            device_count=lambda: 1, device_info=lambda ordinal: ("Fake GPU", "sm_90"),
            open_context=self.open_context, upload_waits=upload_waits, bind_launch=self.bind_launch,
            error_text=lambda err: f"FAKE_ERROR ({err})", success=OK,
            stream_create=self.stream_create, stream_synchronize=step("stream_synchronize"),
            stream_destroy=self.stream_destroy,
            module_load=self.module_load, module_function=lambda module, name: (self._log("module_function"),
                                                                                name.decode()),
            module_unload=self.module_unload, mem_info=lambda: (self._log("mem_info"), self.free_bytes, 1 << 34),
            mem_alloc=self.mem_alloc, mem_free=self.mem_free,
            memcpy_htod=self.memcpy_htod, memcpy_dtoh=self.memcpy_dtoh, memcpy_dtod=self.memcpy_dtod,
            memset_d8=self.memset_d8,
            event_create=step("event_create", "ev"), event_record=step("event_record"),
            event_synchronize=step("event_synchronize"), event_elapsed=step("event_elapsed", 1.5),
            capture_begin=step("capture_begin"), capture_end=self.capture_end,
            graph_instantiate=step("graph_instantiate", "exec0"), graph_launch=step("graph_launch"),
            graph_exec_destroy=step("graph_exec_destroy"), graph_destroy=self.graph_destroy,
        )


def fill(driver: FakeDriver, grid, block, params) -> None:
    """fill(float* out, int n, float value): out[0:n] = value."""
    p = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
    out = ctypes.c_uint64.from_address(p[0]).value
    n = ctypes.c_int32.from_address(p[1]).value
    value = ctypes.c_float.from_address(p[2]).value
    mem, at = driver.buffer(out)
    mem[at:at + 4 * n] = np.full(n, value, np.float32).tobytes()


@pytest.fixture
def fake():
    driver = FakeDriver({"fill": fill})
    return driver, Device(driver.table())


def test_device_opens_on_the_table(fake):
    driver, dev = fake
    assert dev.name == "Fake GPU (cuda:sm_90)" and dev.target.arch == "sm_90"
    assert driver.calls == ["open_context", "stream_create"] and driver.live["contexts"] == {0}


def test_upload_copy_download_round_trip(fake):
    driver, dev = fake
    x = np.arange(10, dtype=np.float32)
    a, b = dev.alloc(x.nbytes), dev.alloc(x.nbytes)
    dev.upload(a, x)
    assert driver.calls[-2:] == ["memcpy_htod", "stream_synchronize"]  # this table's uploads wait
    dev.copy(b, a, x.nbytes)
    dev.memset(a, 0, x.nbytes)
    got, zeros = np.empty_like(x), np.ones_like(x)
    dev.download(b, got)
    dev.download(a, zeros)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(zeros, 0)
    with pytest.raises(ValueError, match="do not fit"):
        dev.upload(a, np.zeros(11, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        dev.download(a, np.zeros((4, 2), np.float32)[:, 0])


def test_upload_does_not_wait_when_the_driver_does_not_need_to():
    driver = FakeDriver()
    dev = Device(driver.table(upload_waits=False))
    dev.upload(dev.alloc(4), np.ones(1, np.float32))
    assert driver.calls[-1] == "memcpy_htod"


def test_launch_passes_packed_arguments(fake):
    driver, dev = fake
    out = dev.alloc(4 * 6)
    fn = dev.get_function(dev.load_module(b"code"), "fill")
    run = dev.prepare_launch(fn, 1, 32, 0, [ptr(out + 4), i32(4), f32(2.5)], name="fill")  # an interior pointer
    run.launch()
    got = np.empty(6, np.float32)
    dev.download(out, got)
    np.testing.assert_array_equal(got, [0, 2.5, 2.5, 2.5, 2.5, 0])


def test_launch_and_driver_errors_are_reported(fake):
    driver, dev = fake
    fn = dev.get_function(dev.load_module(b"code"), "fill")
    run = dev.prepare_launch(fn, (3, 2), 2048, 64, [ptr(dev.alloc(4)), i32(1), f32(0)], name="k007_fill")
    with pytest.raises(DriverError, match=r"launch of kernel 'k007_fill' \(grid \(3, 2, 1\), block \(2048, 1, 1\), "
                                          r"64 B shared\) failed: FAKE_ERROR \(7\)"):
        run.launch()
    driver.fail.add("mem_alloc")
    with pytest.raises(DriverError, match=r"fake mem_alloc\(64\) failed: FAKE_ERROR \(7\)"):
        dev.alloc(64)
    with pytest.raises(ValueError, match="block must be"):
        dev.prepare_launch(fn, 1, 0, 0, [])


def test_capture_replay_and_events(fake):
    driver, dev = fake
    dev.begin_capture()
    graph = dev.end_capture()
    assert isinstance(graph, Graph) and graph.exec == "exec0"
    dev.replay(graph)
    assert driver.calls[-4:] == ["capture_begin", "capture_end", "graph_instantiate", "graph_launch"]
    start, end = dev.event(), dev.event()
    dev.record(start)
    dev.record(end)
    assert dev.elapsed_ms(start, end) == 1.5
    graph.release()
    graph.release()  # a second release does nothing
    assert driver.live["graphs"] == set() and driver.calls.count("graph_exec_destroy") == 1


def test_close_frees_everything_once(fake):
    driver, dev = fake
    with dev:
        for n in (4, 100, 1 << 20):
            dev.alloc(n)
        freed = dev.alloc(8)
        dev.free(freed)
        dev.load_module(b"a")
        dev.load_module(b"b")
    assert driver.memory == {}
    assert all(not live for live in driver.live.values()), driver.live
    assert driver.calls.count("mem_free") == 4 and driver.calls.count("module_unload") == 2
    calls = len(driver.calls)
    dev.close()  # closing twice is harmless
    assert len(driver.calls) == calls


def test_close_frees_even_when_the_device_fails(fake):
    driver, dev = fake
    dev.alloc(16)
    driver.fail.add("stream_synchronize")
    with pytest.raises(DriverError, match="stream_synchronize"):
        dev.close()
    assert driver.memory == {} and all(not live for live in driver.live.values())


def test_arenas_that_do_not_fit_are_refused_before_allocating(fake):
    from gptc.runtime.executor import Arenas, DeviceMemoryError
    driver, dev = fake
    table = {"arena_bytes": {"persistent": 3 << 30, "activations": 2 << 30, "io": 1024}}
    driver.free_bytes = 4 << 30
    with pytest.raises(DeviceMemoryError, match=r"needs 5\.00 GiB .*parameters and optimizer state 3\.00 GiB, "
                                                r"activations 2\.00 GiB\), but Fake GPU \(cuda:sm_90\) has 4\.00 GiB "
                                                r"free of 16\.00 GiB; use a smaller batch"):
        Arenas(dev, [table])
    assert "mem_alloc" not in driver.calls
    driver.free_bytes = 6 << 30
    arenas = Arenas(dev, [table])
    assert driver.calls.count("mem_alloc") == 2
    arenas.close()


def test_tensor_maps_come_from_the_driver_or_a_one_line_error(fake):
    """A TMA tensor map is encoded by the driver table for the buffer's address and passed
    as a 16-word argument; a table without TMA (AMD's) refuses it in one line."""
    import dataclasses
    from gptc.runtime.drivers import DriverError as Refused
    driver, dev = fake
    calls = []
    encode = lambda address, dims, strides, box: calls.append((address, dims, strides, box)) or list(range(16))  # noqa: E731
    dev.driver = dataclasses.replace(dev.driver, tensor_map_encode=encode)
    arg = dev.tensor_map(0x1000, (768, 8192), (768,), (64, 128))
    assert arg.kind == "tensor_map" and arg.value == tuple(range(16)) and calls == [(0x1000, (768, 8192), (768,), (64, 128))]
    dev.driver = dataclasses.replace(dev.driver, tensor_map_encode=None)
    with pytest.raises(Refused, match="has no tensor memory accelerator"):
        dev.tensor_map(0x1000, (768, 8192), (768,), (64, 128))
