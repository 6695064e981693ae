"""Running a plan on a GPU: arenas, buffers, launches, graph capture and replay."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from gptc.codegen.kernels import KernelSource, render_plan
from gptc.codegen.target import Target
from gptc.planner.schedule import Plan
from gptc.runtime.device import Device, compile_many, ptr

HOST_DTYPE = {"f32": np.float32, "i32": np.int32, "bool": np.bool_, "f64": np.float64}


def to_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """Host array in the layout of a device buffer of `dtype` (bf16: upper 16 bits)."""
    if dtype == "bf16":
        from gptc.ops.numeric import round_to_bf16
        return (round_to_bf16(np.asarray(array, np.float32)).view(np.uint32) >> 16).astype(np.uint16)
    return np.ascontiguousarray(array, dtype=HOST_DTYPE[dtype])


def from_storage(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


class GpuExecutor:
    """Owns the device memory of one plan and runs its kernels in order. The first
    run() records the launches into a device graph; later runs replay it."""

    def __init__(self, plan: Plan, device: Device, kernels: Sequence[KernelSource], code: Sequence[bytes],
                 params: Mapping[str, np.ndarray], use_graph: bool = True) -> None:
        self.plan, self.device = plan, device
        self.arenas = {name: device.alloc(max(size, 256)) for name, size in plan.arena_bytes.items()}
        self.device.memset(self.arenas["persistent"], 0, max(plan.arena_bytes["persistent"], 256))
        graph = plan.graph
        for name, nid in graph.params.items():
            self.upload(nid, params[name])
        self.launches = []
        for k, obj in zip(kernels, code):
            function = device.get_function(device.load_module(obj), k.symbol)
            clears = [(self.address(n), plan.buffer_of(n).nbytes) for n in k.zero_init]
            launch = device.prepare_launch(function, k.grid, k.block, 0, [ptr(self.address(a)) for a in k.args], name=k.name)
            self.launches.append((clears, launch))
        self.use_graph = use_graph
        self.captured = None

    def address(self, nid: int) -> int:
        buf = self.plan.buffer_of(nid)
        return self.arenas[buf.arena] + buf.offset

    def upload(self, nid: int, array: np.ndarray) -> None:
        buf = self.plan.buffer_of(nid)
        host = to_storage(array, buf.dtype)
        if host.shape != tuple(buf.shape) and host.size != int(np.prod(buf.shape)):
            raise ValueError(f"{buf.role or buf.name}: got shape {host.shape}, the plan needs {buf.shape}")
        self.device.upload(self.address(nid), host)

    def download(self, nid: int) -> np.ndarray:
        buf = self.plan.buffer_of(nid)
        storage = np.uint16 if buf.dtype == "bf16" else HOST_DTYPE[buf.dtype]
        raw = np.empty(buf.shape, dtype=storage)
        self.device.download(self.address(nid), raw)
        return from_storage(raw, buf.dtype).reshape(self.plan.graph.type(nid).shape)

    def _launch_all(self) -> None:
        for clears, launch in self.launches:
            for address, nbytes in clears:
                self.device.memset(address, 0, nbytes)
            launch.launch()

    def launch(self) -> None:
        """Queue one execution of every kernel (graph replay after the first)."""
        if not self.use_graph:
            self._launch_all()
            return
        if self.captured is None:
            self.device.begin_capture()
            try:
                self._launch_all()
            finally:
                self.captured = self.device.end_capture()
        self.device.replay(self.captured)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph = self.plan.graph
        for name, nid in graph.inputs.items():
            self.upload(nid, np.asarray(inputs[name]))
        self.launch()
        return {name: self.download(nid) for name, nid in graph.outputs.items()}

    def read(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of params and states."""
        graph = self.plan.graph
        table = {**graph.params, **graph.states}
        return {n: self.download(table[n]) for n in (names or table)}

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        table = {**self.plan.graph.params, **self.plan.graph.states}
        for name, value in values.items():
            self.upload(table[name], value)

    def poison(self) -> None:
        """Fill activations and outputs with NaN bytes, so a value read before it is
        written shows up (tests call this before a launch)."""
        self.device.memset(self.arenas["activations"], 0xFF, max(self.plan.arena_bytes["activations"], 256))
        for nid in self.plan.graph.outputs.values():
            self.device.memset(self.address(nid), 0xFF, self.plan.buffer_of(nid).nbytes)

    def close(self) -> None:
        for address in self.arenas.values():
            self.device.free(address)
        self.arenas = {}


def compile_plan(plan: Plan, target: Target) -> tuple[list[KernelSource], list[bytes]]:
    """Render every kernel of `plan` and compile them (in parallel, disk-cached)."""
    kernels = render_plan(plan, target)
    unique = {k.code: k for k in kernels}  # repeated layers share code
    compiled = dict(zip(unique, compile_many([(k.code, k.symbol, (), k.origin) for k in unique.values()], target)))
    return kernels, [compiled[k.code] for k in kernels]


def load_executor(plan: Plan, device: Device, params: Mapping[str, np.ndarray], use_graph: bool = True) -> GpuExecutor:
    kernels, code = compile_plan(plan, device.target)
    return GpuExecutor(plan, device, kernels, code, params, use_graph)
