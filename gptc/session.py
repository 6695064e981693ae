"""One interface over the two executors: the NumPy reference (CPU) and generated
kernels on a GPU. The trainer, sampler and benchmarks talk only to a Session."""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

from gptc.ir import Graph
from gptc.spec import GptcError


class Session(Protocol):
    device_name: str

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step: feed inputs, return outputs; params/states are updated in place."""

    def read(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Current float32 values of params and states."""

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite params and/or states."""

    def close(self) -> None: ...


def resolve_device(device: str):
    """'cpu' -> None; 'gpu'/'auto' -> an open Device ('auto' falls back to None)."""
    if device not in ("auto", "cpu", "gpu", "cuda", "hip"):
        raise GptcError(f"unknown device '{device}'; use auto, cpu or gpu")
    if device == "cpu":
        return None
    from gptc.runtime.device import open_device
    kind = {"gpu": "auto"}.get(device, device)
    dev = open_device(kind)
    if dev is None and device != "auto":
        raise GptcError(f"no {device.upper() if device != 'gpu' else 'GPU'} device found; use --device cpu")
    return dev


def open_session(graph: Graph, params: Mapping[str, np.ndarray], device=None, fuse: bool = True) -> Session:
    """A session running `graph` on `device` (a Device from resolve_device, or None
    for the CPU reference executor), starting from `params` (optimizer state zero)."""
    if device is None:
        from gptc.runtime.reference import ReferenceExecutor
        ex = ReferenceExecutor(graph, params)
        ex.device_name = "cpu (NumPy reference executor)"
        return ex
    from gptc.executor import load_executor
    from gptc.planner import make_plan
    ex = load_executor(make_plan(graph, fuse), device, params)
    ex.device_name = device.name
    return ex
