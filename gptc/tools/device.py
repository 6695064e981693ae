"""The --device option of the tools (train, generate, compile): where they run, and
whether a step fits the memory of the CPU when it runs on the NumPy reference executor."""
from __future__ import annotations

import os
from pathlib import Path

from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import VIEW
from gptc.runtime.device import Device, open_device
from gptc.spec import GptcError


def resolve_device(device: str, ordinal: int = 0) -> Device | None:
    """'cpu' -> None; 'gpu'/'auto' -> an open Device, GPU number `ordinal` ('auto' falls
    back to None)."""
    if device not in ("auto", "cpu", "gpu", "cuda", "hip"):
        raise GptcError(f"unknown device '{device}'; use auto, cpu or gpu")
    if device == "cpu":
        return None
    kind = {"gpu": "auto"}.get(device, device)
    dev = open_device(kind, ordinal)
    if dev is None and device != "auto":
        raise GptcError(f"no {device.upper() if device != 'gpu' else 'GPU'} device found; use --device cpu")
    return dev


# ----- memory of the NumPy reference executor ---------------------------------------------
def reference_bytes(graph: Graph) -> tuple[int, int]:
    """(bytes, bytes of the largest tensor) that one run of `graph` holds on the NumPy
    reference executor, which keeps every value of a run until the run ends (views
    share their input's memory and are not counted)."""
    sizes = [graph.type(nid).size * 4 for nid in graph.topo_order() if OPS[graph.op(nid)].kind != VIEW]
    return sum(sizes), max(sizes, default=0)


def memory_limit() -> int | None:
    """The most memory this process may use: the smallest of the machine's physical
    memory, the address-space limit (ulimit -v) and the cgroup's limit (containers)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def cpu_memory_error(graph: Graph, what: str, advice: str, ran_out: bool = False) -> GptcError:
    """The one-line error for a step too large for this CPU: what it needs, against what
    there is (or that it ran out), and what to do."""
    need, largest = reference_bytes(graph)
    limit = memory_limit()
    gib = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
    there = ("and ran out of memory" if ran_out or limit is None
             else f"more than the {gib(limit)} this process may use")
    return GptcError(f"{what} needs about {gib(need)} on the CPU (NumPy reference executor; its largest tensor "
                     f"{gib(largest)}), {there}; {advice}")


def check_cpu_memory(graph: Graph, what: str, advice: str) -> None:
    """Refuse, before any work, a step that cannot fit this machine's memory on the CPU."""
    limit = memory_limit()
    if limit is not None and reference_bytes(graph)[0] > limit:
        raise cpu_memory_error(graph, what, advice)
