"""From a plan to what a GPU executor runs: kernel sources rendered for a target, code
objects compiled (in parallel, disk-cached), and the plan *table* (buffers with arena
offsets, named inputs/outputs/params/states, launches with their costs), plain
JSON-serialisable data that a bundle's manifest stores."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from gptc.compiler.codegen.kernels import KernelSource, TensorMap, collective_calls, render_plan
from gptc.compiler.planner.cost import plan_costs
from gptc.compiler.planner.schedule import Plan
from gptc.runtime.device import Device, compile_many
from gptc.runtime.executor import Arenas, GpuExecutor
from gptc.target import Target


def plan_table(plan: Plan, kernels: Sequence[KernelSource]) -> dict:
    """The data an executor needs to run `plan`, by buffer name."""
    g = plan.graph
    buffers = {}
    for buf in {b.name: b for b in plan.buffers.values()}.values():
        buffers[buf.name] = {"dtype": buf.dtype, "shape": list(buf.shape), "nbytes": buf.nbytes,
                             "arena": buf.arena, "offset": buf.offset, "role": buf.role}
    name_of = lambda nid: plan.buffer_of(nid).name  # noqa: E731
    arg_of = lambda a: name_of(a.node if isinstance(a, TensorMap) else a)  # noqa: E731
    launches = []
    for k, launch, cost in zip(kernels, plan.launches, plan_costs(plan)):
        parts = [plan.kernels[i] for i in launch]
        nodes = [n for p in parts for n in p.nodes]
        scopes = sorted({g.node(n)["scope"] or "-" for n in nodes})
        launches.append({"kernel": k.name, "family": k.family, "symbol": k.symbol, "grid": list(k.grid),
                         "block": list(k.block), "shared": k.shared_bytes, "args": [arg_of(a) for a in k.args],
                         # parameters that are tensor maps of their buffer, by position
                         "tensor_maps": {str(i): {"offset": a.offset, "dims": list(a.dims), "strides": list(a.strides),
                                                  "box": list(a.box)}
                                         for i, a in enumerate(k.args) if isinstance(a, TensorMap)},
                         "clear": [name_of(n) for n in k.zero_init], "nodes": len(nodes),
                         "kernels": [p.name for p in parts],
                         "reads": sorted({name_of(n) for p in parts for n in p.reads}),
                         "writes": sorted({name_of(n) for p in parts for n in p.roots}),
                         "bytes": cost.bytes, "flops": cost.flops,
                         "scopes": ", ".join(scopes)})
        if k.family == "collective":
            launches[-1]["collective"] = [{**c, "send": name_of(c["send"]), "recv": name_of(c["recv"])}
                                          for c in collective_calls(plan, parts)]
    # A collective runs on the communication stream: the first launch that reads what
    # it writes waits for it first (its index in "waits").
    pending: dict[str, int] = {}
    for index, entry in enumerate(launches):
        entry["waits"] = sorted({pending.pop(b) for b in entry["reads"] if b in pending})
        if entry["family"] == "collective":
            pending.update({b: index for b in entry["writes"]})
    return {
        "arena_bytes": dict(plan.arena_bytes),
        "buffers": buffers,
        "inputs": {n: name_of(i) for n, i in sorted(g.inputs.items())},
        "bounds": g.input_bounds(),
        "outputs": {n: name_of(i) for n, i in sorted(g.outputs.items())},
        # An output that is a reshape of another value shares its buffer, laid out in that
        # value's shape: the shape the graph gives the output is read from here.
        "output_shapes": {n: list(g.type(i).shape) for n, i in sorted(g.outputs.items())},
        "persistent": {n: name_of(i) for n, i in sorted({**g.params, **g.states}.items())},
        "params": sorted(g.params),
        "launches": launches,
    }


def share_persistent(tables: Sequence[dict]) -> None:
    """Give every table the same persistent layout (by param/state name, over the
    union of their names) and the same arena sizes, so they can share arenas."""
    layout: dict[str, tuple[int, int]] = {}
    offset = 0
    for t in tables:
        for name, buf in sorted(t["persistent"].items()):
            nbytes = t["buffers"][buf]["nbytes"]
            if name in layout:
                if layout[name][1] != nbytes:
                    raise ValueError(f"'{name}' has different sizes in two plans")
                continue
            layout[name] = (offset, nbytes)
            offset += (nbytes + 255) // 256 * 256
    for t in tables:
        for name, buf in t["persistent"].items():
            t["buffers"][buf]["offset"] = layout[name][0]
        t["arena_bytes"]["persistent"] = offset
    largest = max(t["arena_bytes"]["activations"] for t in tables)
    for t in tables:
        t["arena_bytes"]["activations"] = largest


def compile_kernels(kernels: Sequence[KernelSource], target: Target,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, bytes]:
    """Compile each distinct kernel (in parallel, disk-cached): code objects by symbol.
    progress(done, total) follows the kernels that were not in the cache."""
    unique = {k.symbol: k for k in kernels if k.code}  # repeated layers share code; collectives have none
    objects = compile_many([(k.code, k.symbol, (), k.origin) for k in unique.values()], target, progress=progress)
    return dict(zip(unique, objects))


class OwnedExecutor(GpuExecutor):
    """A GpuExecutor with arenas of its own, started from `params`: renders `plan` for the
    device and compiles each distinct kernel."""

    def __init__(self, plan: Plan, device: Device, params: Mapping[str, np.ndarray], use_graph: bool = True) -> None:
        kernels = render_plan(plan, device.target)
        table = plan_table(plan, kernels)
        super().__init__(table, device, compile_kernels(kernels, device.target), Arenas(device, [table]), use_graph)
        self.write({n: params[n] for n in table["params"]})

    def close(self) -> None:
        super().close()
        self.arenas.close()


def load_executor(plan: Plan, device: Device, params: Mapping[str, np.ndarray], use_graph: bool = True) -> GpuExecutor:
    return OwnedExecutor(plan, device, params, use_graph)
