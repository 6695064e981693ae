"""The --device option of the tools (train, generate, compile): where they run."""
from __future__ import annotations

from gptc.runtime.device import Device, open_device
from gptc.spec import GptcError


def resolve_device(device: str) -> Device | None:
    """'cpu' -> None; 'gpu'/'auto' -> an open Device ('auto' falls back to None)."""
    if device not in ("auto", "cpu", "gpu", "cuda", "hip"):
        raise GptcError(f"unknown device '{device}'; use auto, cpu or gpu")
    if device == "cpu":
        return None
    kind = {"gpu": "auto"}.get(device, device)
    dev = open_device(kind)
    if dev is None and device != "auto":
        raise GptcError(f"no {device.upper() if device != 'gpu' else 'GPU'} device found; use --device cpu")
    return dev
