#!/usr/bin/env python3
"""One kernel family at one shape, in the style of llm.c's dev/cuda: a tiny DSL graph
that the family's template computes, planned and rendered by gptc itself, checked
against the NumPy reference executor and timed with device events, for the codegen's
choice of block size or tile and for each alternative it could have made.

    python3 dev/kernel.py --family matmul --shape 8192,2304,768
    python3 dev/kernel.py --family row --shape 8192,768 --show
    python3 dev/kernel.py --family attention --compile-only --target cuda:sm_90

Without a GPU it says so and exits with status 1; --compile-only renders and compiles
for --target instead (hiprtc or NVRTC, no GPU needed) and prints each variant's
registers, shared and scratch memory where the code object tells them."""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gptc from this checkout

from gptc.compiler import dsl  # noqa: E402
from gptc.compiler.autodiff import gradients  # noqa: E402
from gptc.compiler.ops.numeric import round_to_bf16  # noqa: E402
from gptc.compiler.codegen.kernels import render_launch, render_plan, tunings  # noqa: E402
from gptc.compiler.ir import Graph  # noqa: E402
from gptc.compiler.planner import make_plan  # noqa: E402
from gptc.compiler.planner.cost import plan_costs  # noqa: E402
from gptc.runtime.build import plan_table  # noqa: E402
from gptc.runtime.device import compile_many, compiler_available, open_device  # noqa: E402
from gptc.runtime.executor import Arenas, GpuExecutor  # noqa: E402
from gptc.runtime.reference import run_graph  # noqa: E402
from gptc.target import parse_target  # noqa: E402


def pointwise(rows, cols):
    g = Graph(); x = g.input("x", (rows, cols)); b = g.param("b", (cols,))
    g.output("y", dsl.gelu(x + b))
    return g


def row(rows, cols):
    g = Graph(); x = g.input("x", (rows, cols)); w = g.param("w", (cols,)); b = g.param("b", (cols,))
    g.output("y", dsl.layernorm(x, w, b))
    return g


def reduce(rows, cols):  # column sums: a bias gradient
    g = Graph(); x = g.input("x", (rows, cols))
    g.output("y", x.sum(0))
    return g


def matmul(m, n, k):  # a linear layer with its epilogue
    g = Graph(); a = g.input("a", (m, k)); w = g.param("w", (k, n)); b = g.param("b", (n,))
    g.output("y", dsl.gelu(a @ w + b))
    return g


def matmul_bf16(m, n, k):  # bf16 operands (the matrix units where the target has them), f32 product
    g = Graph(); a = g.input("a", (m, k), "bf16"); w = g.input("w", (k, n), "bf16")
    g.output("y", a @ w)
    return g


def matmul_bf16_dx(m, n, k):  # a linear layer's input gradient dY Wᵀ, W stored (n, k): both operands k-contiguous
    g = Graph(); dy = g.input("dy", (m, k), "bf16"); w = g.input("w", (n, k), "bf16")
    g.output("y", dy @ w.T)
    return g


def matmul_bf16_gelu(m, n, k):  # bf16 operands, bias and GELU in the epilogue, bf16 result (an MLP's first layer)
    g = Graph(); a = g.input("a", (m, k), "bf16"); w = g.input("w", (k, n), "bf16"); b = g.param("b", (n,))
    g.output("y", dsl.gelu(a @ w + b).cast("bf16"))
    return g


def matmul_bf16_wgrad(m, n, k, parts):  # a weight gradient X^T dY, its sum over the tokens split in parts (a batch)
    g = Graph(); x = g.input("x", (parts, k, m), "bf16"); dy = g.input("dy", (parts, k, n), "bf16")
    g.output("y", x.T @ dy)
    return g


def attention(batch, heads, seq, head_dim):
    g = Graph(); q, k, v = (g.input(n, (batch, heads, seq, head_dim)) for n in "qkv")
    g.output("y", dsl.causal_attention(q, k, v))
    return g


def attention_bwd(batch, heads, seq, head_dim):  # (the planner matches it when out is an output too)
    g = Graph(); q, k, v = (g.param(n, (batch, heads, seq, head_dim)) for n in "qkv")
    r = g.input("r", (batch, heads, seq, head_dim))
    y = dsl.causal_attention(q, k, v)
    g.output("y", y)
    for name, grad in zip("qkv", gradients((y * r).sum(), [q, k, v])):
        g.output(f"d{name}", grad)
    return g


def cross_entropy(rows, vocab):  # the loss and its gradient, stored bf16 for the lm_head's backward
    g = Graph(); logits = g.param("logits", (rows, vocab)); targets = g.input("targets", (rows,), "i32", bound=vocab)
    loss = dsl.cross_entropy(logits, targets)
    g.output("loss", loss)
    g.output("dlogits", gradients(loss, [logits])[0].cast("bf16"))
    return g


def scatter(vocab, rows, width):  # the embedding gradient
    g = Graph(); d = g.input("d", (rows, width)); ids = g.input("ids", (rows,), "i32", bound=vocab)
    g.output("table", d.scatter_add(ids, vocab))
    return g


# family -> (graph builder, default shape, what the shape means); the kernel family it
# times is its own name unless KERNEL_FAMILY names another
FAMILIES = {
    "pointwise": (pointwise, (8192, 768), "rows,cols"),
    "row": (row, (8192, 768), "rows,cols"),
    "reduce": (reduce, (8192, 768), "rows,cols"),
    "matmul": (matmul, (8192, 2304, 768), "m,n,k"),
    "matmul_bf16": (matmul_bf16, (8192, 2304, 768), "m,n,k"),
    "matmul_bf16_dx": (matmul_bf16_dx, (8192, 768, 50264), "m,n,k"),
    "matmul_bf16_gelu": (matmul_bf16_gelu, (8192, 3072, 768), "m,n,k"),
    "matmul_bf16_wgrad": (matmul_bf16_wgrad, (768, 768, 4096, 2), "m,n,k,parts"),
    "attention": (attention, (4, 12, 1024, 64), "batch,heads,seq,head_dim"),
    "attention_bwd": (attention_bwd, (4, 12, 1024, 64), "batch,heads,seq,head_dim"),
    "cross_entropy": (cross_entropy, (8192, 50257), "rows,vocab"),
    "scatter": (scatter, (50257, 8192, 768), "vocab,rows,width"),
}
KERNEL_FAMILY = {"matmul_bf16": "matmul", "matmul_bf16_dx": "matmul", "matmul_bf16_gelu": "matmul",
                 "matmul_bf16_wgrad": "matmul", "cross_entropy": "row"}
TOLERANCE = 1e-4  # fp32 after long reductions (DESIGN.md, Testing)
# A bf16 result: where the kernel's f32 value differs from the reference's by rounding (the
# order of a long sum), the bf16 rounding of a few elements in 10^4 flips by one ulp (2^-8):
# 1.3e-4 for the GELU family at k = 3072, on every tile.
BF16_TOLERANCE = 5e-4


def variants(plan, index, target):
    """[(label, tuning, KernelSource)] of launch `index`: the codegen's choice first,
    then the alternatives that give other code."""
    kernels = [plan.kernels[i] for i in plan.launches[index]]
    seen, found = set(), []
    for tuning in [{}] + tunings(plan, kernels[0], target):
        source = render_launch(plan, kernels, target, tuning)
        if source.symbol not in seen:
            seen.add(source.symbol)
            label = " ".join(f"{k}={v}".replace(" ", "") for k, v in tuning.items())
            found.append((label or "codegen's choice", tuning, source))
    return found


def resource_usage(code: bytes, vendor: str, symbol: str) -> str:
    """Registers, shared and scratch memory of `symbol` in a code object, as far as the
    object says without a GPU (an AMD object needs llvm-readelf)."""
    if vendor == "nvidia":
        sections = _elf_sections(code)
        regs = frame = 0
        info = sections.get(".nv.info", b"")
        p = 0
        while p + 4 <= len(info):  # records: format, attribute, then a sized value or 2 bytes
            fmt, attr = info[p], info[p + 1]
            size = struct.unpack_from("<H", info, p + 2)[0] if fmt == 4 else 0
            if attr == 0x2F:  # EIATTR_REGCOUNT (function, registers)
                regs = struct.unpack_from("<II", info, p + 4)[1]
            elif attr == 0x11:  # EIATTR_FRAME_SIZE (function, bytes): local memory, spills included
                frame = struct.unpack_from("<II", info, p + 4)[1]
            p += 4 + size
        shared = len(sections.get(f".nv.shared.{symbol}", b""))
        return f"{regs} registers, {shared} B static shared, {frame} B stack frame"
    tool = shutil.which("llvm-readelf")
    if tool is None:
        return "(llvm-readelf not found: no resource usage)"
    with tempfile.NamedTemporaryFile(suffix=".hsaco") as f:
        f.write(code)
        f.flush()
        notes = subprocess.run([tool, "--notes", f.name], capture_output=True, text=True).stdout
    field = {k: v for k, v in re.findall(r"\.(\w+):\s+(\d+)", notes)}
    return (f"{field.get('vgpr_count', '?')} VGPRs, {field.get('agpr_count', '?')} AGPRs, "
            f"{field.get('sgpr_count', '?')} SGPRs, {field.get('group_segment_fixed_size', '?')} B LDS, "
            f"{field.get('private_segment_fixed_size', '?')} B scratch, "
            f"{field.get('vgpr_spill_count', '?')} VGPR spills")


def _elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a 64-bit little-endian ELF file (NOBITS: zeros)."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    strtab = headers[names][4]
    out = {}
    for name, kind, _, _, offset, size, *_ in headers:
        label = data[strtab + name:data.index(b"\0", strtab + name)].decode()
        out[label] = bytes(size) if kind == 8 else data[offset:offset + size]
    return out


def random_feeds(graph: Graph, rng) -> dict:
    feeds = {}
    for table in (graph.inputs, graph.params, graph.states):
        for name, nid in table.items():
            t = graph.type(nid)
            if t.dtype == "i32":  # ids below the input's bound (a table's rows, a vocabulary)
                feeds[name] = rng.integers(0, graph.input_bounds()[name], t.shape).astype(np.int32)
            else:
                feeds[name] = rng.standard_normal(t.shape).astype(np.float32)
                if t.dtype == "bf16":  # the values the device holds, so the reference sees them too
                    feeds[name] = round_to_bf16(feeds[name])
    return feeds


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if np.isnan(out).any():
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def compile_only(plan, index, target, show: bool) -> int:
    ok, message = compiler_available(target.vendor)
    if not ok:
        print(message.splitlines()[0], file=sys.stderr)
        return 1
    found = variants(plan, index, target)
    objects = compile_many([(s.code, s.symbol, (), s.origin) for _, _, s in found], target)
    for (label, _, source), code in zip(found, objects):
        print(f"  {label:<40} grid {source.grid[0]:>7} x {source.block[0]:<5} {len(source.source.splitlines()):>5} lines  "
              f"{resource_usage(code, target.vendor, source.symbol)}, {source.shared_bytes} B dynamic shared")
    if show:
        print(found[0][2].source)
    return 0


def check_and_time(graph, plan, index, device, repeat: int, show: bool) -> int:
    rng = np.random.default_rng(0)
    feeds = random_feeds(graph, rng)
    reference = run_graph(graph, feeds, np.float64)["outputs"]
    cost = plan_costs(plan)[index]
    kernels = render_plan(plan, device.target)
    print(f"  {cost.flops / 1e9:.3f} GFLOP, {cost.bytes / 1e6:.1f} MB moved at least")
    print(f"  {'variant':<40} {'median us':>10} {'TFLOP/s':>8} {'GB/s':>8} {'err/tol':>9}")
    events = [(device.event(), device.event()) for _ in range(repeat)]  # reused: the Device API frees none
    failed = False
    for label, _, source in variants(plan, index, device.target):
        launch = kernels[:index] + [source] + kernels[index + 1:]
        unique = {k.symbol: k for k in launch}
        code = dict(zip(unique, compile_many([(k.code, k.symbol, (), k.origin) for k in unique.values()], device.target)))
        table = plan_table(plan, launch)
        arenas = Arenas(device, [table])
        ex = GpuExecutor(table, device, code, arenas, use_graph=False)
        try:
            ex.write({n: feeds[n] for n in [*graph.params, *graph.states]})
            ex.poison()
            out = ex.run({n: feeds[n] for n in graph.inputs})
            err = max(rel_err(out[k], v) / (BF16_TOLERANCE if graph.type(graph.outputs[k]).dtype == "bf16" else TOLERANCE)
                      for k, v in reference.items())  # relative to its tolerance
            for _ in range(10):  # warm-up
                ex.run_kernel(index)
            for start, end in events:
                device.record(start)
                ex.run_kernel(index)
                device.record(end)
            ms = statistics.median(device.elapsed_ms(start, end) for start, end in events)
        finally:
            ex.close()
            arenas.close()
        failed |= not err < 1
        print(f"  {label:<40} {ms * 1e3:>10.1f} {cost.flops / ms / 1e9:>8.2f} {cost.bytes / ms / 1e6:>8.0f} "
              f"{err:>9.2f}{'' if err < 1 else '  FAIL'}")
    if show:
        print(kernels[index].source)
    return 1 if failed else 0


def main(argv=None) -> int:
    shapes = "; ".join(f"{name}: {meaning} (default {','.join(map(str, shape))})"
                       for name, (_, shape, meaning) in FAMILIES.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--shape", help=f"comma-separated sizes: {shapes}")
    parser.add_argument("--compile-only", action="store_true", help="render and compile for --target, without a GPU")
    parser.add_argument("--target", default="hip:gfx90a", help="with --compile-only (default hip:gfx90a)")
    parser.add_argument("--repeat", type=int, default=100, help="timed launches per variant")
    parser.add_argument("--show", action="store_true", help="print the source of the codegen's choice")
    args = parser.parse_args(argv)
    build, default, meaning = FAMILIES[args.family]
    shape = tuple(int(d) for d in args.shape.split(",")) if args.shape else default
    if len(shape) != len(default):
        parser.error(f"--family {args.family} takes --shape {meaning}")
    device = None if args.compile_only else open_device("auto")
    if device is None and not args.compile_only:
        print("no GPU found: dev/kernel.py checks and times kernels on an AMD or NVIDIA GPU "
              "(--compile-only renders and compiles without one)", file=sys.stderr)
        return 1
    graph = build(*shape)
    plan = make_plan(graph, fuse=True)
    family = KERNEL_FAMILY.get(args.family, args.family)
    index = next((i for i, launch in enumerate(plan.launches) if plan.kernels[launch[0]].family == family), None)
    if index is None:
        print(f"the planner made no {args.family} kernel at this shape (families: "
              f"{', '.join(plan.kernels[launch[0]].family for launch in plan.launches)})", file=sys.stderr)
        return 1
    target = device.target if device else parse_target(args.target)
    print(f"{args.family} {meaning} = {','.join(map(str, shape))}: {plan.kernels[plan.launches[index][0]].name} "
          f"of {len(plan.launches)} launches, on {device.name if device else target.name}")
    try:
        if device is None:
            return compile_only(plan, index, target, args.show)
        return check_and_time(graph, plan, index, device, args.repeat, args.show)
    finally:
        if device is not None:
            device.close()


if __name__ == "__main__":
    sys.exit(main())
