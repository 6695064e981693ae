"""One interface over the two executors: the NumPy reference on the CPU
(gptc.runtime.reference.ReferenceExecutor) and the generated kernels on a GPU (the
steps of a bundle, gptc.runtime.executor.GpuExecutor). The trainer and sampler talk only to a
Session; `resolve_device` picks where they run."""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

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
