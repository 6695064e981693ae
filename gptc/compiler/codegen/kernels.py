"""Kernel sources: one rendered template per planned kernel, with its launch shape.

Block sizes and tiles are chosen here, per target and shape; the templates in
templates/ read them. Rendering is deterministic: the same plan and target give
byte-identical sources."""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import jinja2

from gptc.compiler.codegen import names
from gptc.compiler.codegen.emit import STORAGE_TYPE, Emitter, c_literal, philox_uniform
from gptc.compiler.codegen.indexing import ceil_div, linearize, unravel
from gptc.compiler.codegen.symbolic import ZERO, Var, add, emit, mul, var
from gptc.compiler.strides import strided
from gptc.common import PACKAGE_DIR
from gptc.target import Target
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import VIEW
from gptc.compiler.planner.attention import MAX_HEAD_DIM
from gptc.compiler.planner.schedule import KernelPlan, Plan, view_base

POINTWISE_THREADS = 256
MAX_GRID = 65535 * 32


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel and how to launch it.

    `source` is what a person reads (kernels/<name>.hip): it names the graph nodes it
    computes, and its parameters by their roles (names.py). `code` is what the compiler
    gets: the same code without comments and with positional parameter names, its
    entry point `symbol` named by a hash of that code, so kernels that differ only in
    the graph nodes they came from (the same layer, repeated) compile once. `args` are
    the node ids of the buffers passed, in parameter order."""
    name: str
    family: str
    source: str
    code: str
    symbol: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[int, ...]
    zero_init: tuple[int, ...]
    origin: str          # the graph nodes it computes, for error messages


def templates_dir() -> Path:
    """templates/ of a source checkout, or the copy installed inside the package."""
    for candidate in (PACKAGE_DIR.parent / "templates", PACKAGE_DIR / "templates"):
        if (candidate / "prelude.h").is_file():
            return candidate
    raise FileNotFoundError("gptc's templates/ folder is missing from this installation")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=False, lstrip_blocks=False)


def render_template(name: str, **context) -> str:
    """Render one of templates/ (kernel templates and the bundle's executor.py.j2)."""
    return _environment().get_template(name).render(**context)


@functools.lru_cache(maxsize=1)
def prelude() -> str:
    return (templates_dir() / "prelude.h").read_text()


def _index_type(plan: Plan, kernel: KernelPlan) -> str:
    g = plan.graph
    sizes = [g.type(n).size for n in kernel.nodes + kernel.reads]
    sizes += [g.type(i).size for n in kernel.nodes for i in g.inputs_of(n)]
    return "long long" if max(sizes, default=0) >= 2**31 - 1 else "int"


def _store_lines(em: Emitter, roots: list[int], index_of) -> list[str]:
    lines = []
    for r in roots:
        idx = index_of(r)
        v = em.value(r, idx)
        lines.append(em.store(r, idx, v))
    return lines


def _grid_1d(count: int, threads: int) -> tuple[int, int, int]:
    return (max(1, min(ceil_div(count, threads), MAX_GRID)), 1, 1)


@dataclass
class _Part:
    """One planned kernel's share of a launch: its body (parameters are placeholders,
    see names.py), grid, block, the shared memory it takes from the launch's pool
    gptc_smem (declared once per launch, sized to the largest part), and the values
    its body names (the element count of a pointwise part: batched parts that differ
    only in buffers and counts share one function)."""
    title: str
    text: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    pool_floats: int = 0
    consts: dict[str, int] = field(default_factory=dict)


def _render_part(plan: Plan, kernel: KernelPlan, target: Target, args: dict[int, str],
                 mm_threads: int | None, tuning: dict) -> _Part:
    """The part of one planned kernel; `args` names buffers (shared by the kernels of
    one launch); `mm_threads` fixes a matmul's block size (a batched launch: one block
    size for all parts); `tuning` overrides the choices below (see `tunings`)."""
    g = plan.graph
    family = kernel.family
    ctx: dict = {}
    consts: dict[str, int] = {}
    if family in ("pointwise", "scatter"):
        em = Emitter(plan, kernel.nodes, args=args)
        shape = g.type(kernel.roots[0]).shape if family == "pointwise" else g.type(g.inputs_of(kernel.anchor)[1]).shape
        count = max(1, _size(shape))
        idx = unravel(var("i", count), shape)
        if family == "pointwise":
            stores = _store_lines(em, kernel.roots, lambda r: idx)
            body = em.take() + stores
        else:
            ids, updates = g.inputs_of(kernel.anchor)
            row = em.value(ids, idx[:-1])
            value = em.value(updates, idx)
            offset = linearize((Var(f"(idx_t){row}"), idx[-1]), g.type(kernel.anchor).shape)
            body = em.take() + [f"atomicAdd(&{em.arg(kernel.anchor)}[{emit(offset)}], {value});"]
        threads = tuning.get("threads", POINTWISE_THREADS)
        consts["count"] = count
        ctx.update(body=body)
        grid, block = _grid_1d(count, threads), (threads, 1, 1)
    elif family == "row":
        grid, block, em = _row(plan, kernel, target, ctx, args, tuning)
    elif family == "reduce":
        grid, block, em = _reduce(plan, kernel, target, ctx, args, tuning)
    elif family == "matmul":
        grid, block, em = _matmul(plan, kernel, target, ctx, args, mm_threads, tuning.get("matmul"))
    elif family in ("attention", "attention_bwd"):
        return _attention(plan, kernel, target, args)
    elif family == "group_sort":
        grid, block, em = _group_sort(plan, kernel, ctx, args)
    elif family == "grouped_matmul":
        grid, block, em = _grouped_matmul(plan, kernel, ctx, args)
    else:
        raise AssertionError(family)
    text = _environment().get_template(f"{family}.hip.j2").render(target=target, block_threads=block[0], **ctx)
    return _Part(kernel.name, text, grid, block, ctx.get("smem_floats", 0), consts)


def render_launch(plan: Plan, kernels: list[KernelPlan], target: Target, tuning: dict | None = None) -> KernelSource:
    """One launch: a kernel, or several independent kernels of one family batched
    into one grid (each gets a range of blocks; parts whose code differs only in the
    buffers they touch, and the element count, share one device function). `tuning`
    overrides the block size or tile the codegen would choose (one of `tunings`, for
    the dev/ harness)."""
    g = plan.graph
    args: dict[int, str] = {}
    mm_threads = _mm_common_threads(plan, kernels, target) if len(kernels) > 1 and kernels[0].family == "matmul" else None
    parts = [_render_part(plan, kernel, target, args, mm_threads, tuning or {}) for kernel in kernels]
    block = parts[0].block
    assert all(p.block == block for p in parts)
    assert len(parts) == 1 or all(p.grid[1] == p.grid[2] == 1 for p in parts), "parts use a 1-D grid (block_id)"
    pool = max(p.pool_floats for p in parts)
    assert pool * 4 <= target.shared_mem, "a part's shared memory exceeds the target's"
    types = {ph: STORAGE_TYPE[plan.buffer_of(a).dtype] for a, ph in args.items()}
    functions, calls, leader = _share(parts, types)
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.grid[0])
    grid = (starts[-1], 1, 1) if len(parts) > 1 else parts[0].grid
    family = kernels[0].family
    name = kernels[0].name if len(kernels) == 1 else f"{kernels[0].name}+{len(kernels) - 1}"
    index_type = "long long" if any(_index_type(plan, k) == "long long" for k in kernels) else "int"
    template = _environment().get_template("kernel.hip.j2")

    def render(symbol: str, mapping: dict[str, str], fn_args: list[dict[str, str]], title: str = "",
               node_lines: Sequence[str] = (), with_prelude: bool = True) -> str:
        """The launch's text, its placeholders named by `mapping` (and by `fn_args` inside
        each function); those it does not name stay (the code)."""
        fns = []
        for f, local in zip(functions, fn_args):
            head = f"__device__ __forceinline__ void {names.substitute(f['name'], mapping)}"
            fns.append(dict(comment=f["comment"], body=names.substitute(f["body"], {**mapping, **local}),
                            signature=_signature(head, [f"{t} {names.substitute(p, local)}" for t, p in f["params"]])))
        blocks = []
        for p, start, call in zip(parts, starts, calls):
            if call is None:
                body = names.substitute(p.text, mapping)
            else:
                fn, values = names.substitute(call[0], mapping), [names.substitute(v, mapping) for v in call[1]]
                body = _signature(f"  {fn}", values) + ";\n"
            blocks.append(dict(title=p.title, start=start, end=start + p.grid[0], inline=call is None,
                               consts=p.consts, body=body))
        params = [f"{types[ph]}* {names.substitute(ph, mapping)}" for ph in args.values()]
        head = f'extern "C" __global__ void GPTC_LAUNCH_BOUNDS({block[0]}) {symbol}'
        return template.render(prelude=prelude() if with_prelude else "", family=family, target=target,
                               index_type=index_type, needs_reduce_helpers=family in ("row", "reduce"),
                               pool_f4=(pool + 3) // 4, functions=fns, parts=blocks, title=title,
                               signature=_signature(head, params), node_lines=node_lines)

    code = _strip_comments(render("KERNEL_SYMBOL", {}, [{} for _ in functions], with_prelude=False))
    symbol = f"gptc_{family}_{hashlib.sha256(code.encode()).hexdigest()[:12]}"
    code = prelude() + code.replace("KERNEL_SYMBOL", symbol)
    # Role names for the source a person reads (the code keeps the placeholders).
    avoid = names.taken_names(code[len(prelude()):], prelude())
    taken = set(avoid)
    mapping = {ph: names.unique(names.buffer_names(plan, a)[0], taken) for a, ph in args.items()}
    mapping.update({f["name"]: names.unique(names.sanitize(f["title"]), taken) for f in functions})
    node_of = {ph: a for a, ph in args.items()}
    fn_args = []
    for f in functions:  # a parameter is named by what the parts' buffers have in common
        local = avoid | {mapping[f["name"]]}
        fn_args.append({p: names.unique(names.agreed_name([names.buffer_names(plan, node_of[ph]) for ph in column]),
                                        local) for p, column in zip(f["fargs"], f["columns"])})
    node_lines = []
    for k, kernel in enumerate(kernels):
        if len(kernels) > 1:
            node_lines.append(f"{kernel.name}:")
        if leader[k] == k:
            node_lines += [("* " if n in kernel.roots else "  ") + g.describe(n) for n in kernel.nodes]
        else:
            scopes = ", ".join(sorted({g.node(n)["scope"] or "-" for n in kernel.nodes}))
            ids = [("*" if n in kernel.roots else "") + f"%{n}" for n in kernel.nodes]
            node_lines += names.wrap(ids, f"  as {kernels[leader[k]].name} ({scopes}): ", "    ", 96)
    node_lines += names.wrap([f"{mapping[ph]} = %{a}" for a, ph in args.items()], "parameters: ", "  ", 96)
    source = render(symbol, mapping, fn_args, name, node_lines)
    nodes = [n for k in kernels for n in k.nodes]
    origin = f"{name}: " + "; ".join(g.describe(n) for n in nodes[:8]) + (" ..." if len(nodes) > 8 else "")
    zero_init = tuple(n for k in kernels for n in k.zero_init)
    return KernelSource(name, family, source, code, symbol, grid, block, tuple(args), zero_init, origin)


def _share(parts: list[_Part], types: dict[str, str]):
    """(functions, calls, leader) of a launch's parts: parts whose bodies are equal once
    their buffers (and constants) are function parameters run one __forceinline__
    device function (inlined: the same machine code as the bodies themselves).
    calls[k] is part k's call, (function, arguments), or None where its body stays
    inline; leader[k] the index of the first part with its code."""
    groups: dict[tuple, list[int]] = {}
    used_of, abstract_of = [], []
    for part in parts:
        used = list(dict.fromkeys(names.ARG.findall(part.text)))
        abstract = names.substitute(part.text, {ph: names.farg(n) for n, ph in enumerate(used)})
        used_of.append(used)
        abstract_of.append(abstract)
        key = (_strip_comments(abstract), tuple(types[ph] for ph in used), tuple(part.consts))
        groups.setdefault(key, []).append(len(used_of) - 1)
    functions, calls, leader = [], [None] * len(parts), list(range(len(parts)))
    for members in groups.values():
        first = members[0]
        for k in members:
            leader[k] = first
        if len(members) == 1:
            continue
        fn = names.fn(len(functions))
        fargs = [names.farg(n) for n in range(len(used_of[first]))]
        params = [(f"{types[ph]}*", fa) for ph, fa in zip(used_of[first], fargs)]
        params += [("idx_t", c) for c in parts[first].consts] + [("idx_t", "block_id"), ("idx_t", "grid_blocks")]
        title = parts[first].title
        functions.append(dict(name=fn, title=title, params=params, fargs=fargs, body=abstract_of[first],
                              columns=list(zip(*[used_of[k] for k in members])),
                              comment=f"{title}'s code, run by the {len(members)} parts of this launch that compute the "
                                      f"same nodes\n// on other buffers (its comments name {title}'s nodes)."))
        for k in members:
            calls[k] = (fn, used_of[k] + [str(v) for v in parts[k].consts.values()] + ["block_id", "grid_blocks"])
    return functions, calls, leader


def _strip_comments(text: str) -> str:
    """Drop // comments (generated code has no string literals) and blank lines."""
    lines = (re.sub(r"\s*//.*$", "", line) for line in text.splitlines())
    return "\n".join(line for line in lines if line.strip()) + "\n"


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _signature(head: str, params: list[str]) -> str:
    """`head(params)`, the parameters wrapped at 100 columns."""
    return "\n".join(names.wrap(params, f"{head}(", "    ")) + ")"


def _row(plan: Plan, kernel: KernelPlan, target: Target, ctx: dict, args: dict[int, str], tuning: dict):
    g = plan.graph
    reduces = [n for n in kernel.nodes if g.op(n) in ("sum", "max")]
    space = g.type(g.inputs_of(reduces[0])[0]).shape
    lead, row_len = space[:-1], space[-1]
    rows = max(1, _size(lead))
    wave = target.wavefront
    tpr = tuning.get("tpr", wave if row_len <= 1024 else 256)
    rows_per_block = max(1, 128 // tpr) if tpr == wave else 1
    special = {r: f"r{r}" for r in reduces}
    em = Emitter(plan, kernel.nodes, special, args)
    lead_idx = unravel(var("row", rows), lead)
    full_idx = lead_idx + (var("j", row_len),)
    row_idx = lead_idx + (ZERO,)
    stages = []
    for r in reduces:
        em.begin_block()
        del em.special[r]  # not yet computed while its own stage runs
        v = em.value(g.inputs_of(r)[0], full_idx)
        is_max = g.op(r) == "max"
        stages.append(dict(var=f"r{r}", node=r, op=g.op(r), body=em.take(), is_max="true" if is_max else "false",
                           init="-INFINITY" if is_max else "0.0f",
                           combine=f"fmaxf(acc, {v})" if is_max else f"acc + {v}"))
        em.special[r] = f"r{r}"
    reduced_shape = lead + (1,)
    em.begin_block()
    row_body = _store_lines(em, [r for r in kernel.roots if g.type(r).shape == reduced_shape], lambda r: row_idx)
    row_body = em.take() + row_body
    em.begin_block()
    full_body = _store_lines(em, [r for r in kernel.roots if g.type(r).shape == space], lambda r: full_idx)
    full_body = em.take() + full_body
    ctx.update(rows=rows, row_len=row_len, tpr=tpr, rows_per_block=rows_per_block, stages=stages,
               row_body=row_body, full_body=full_body)
    return (ceil_div(rows, rows_per_block), 1, 1), (tpr * rows_per_block, 1, 1), em


def _reduce(plan: Plan, kernel: KernelPlan, target: Target, ctx: dict, args: dict[int, str], tuning: dict):
    g = plan.graph
    r = kernel.anchor
    attrs = g.node(r)["attrs"]
    (src,) = g.inputs_of(r)
    in_shape = g.type(src).shape
    axes = attrs["axes"]
    kept = [a for a in range(len(in_shape)) if a not in axes]
    out_shape = tuple(in_shape[a] for a in kept)
    outputs, reduced = max(1, _size(out_shape)), max(1, _size(tuple(in_shape[a] for a in axes)))
    leading = axes == tuple(range(len(axes)))
    thread_per_output = tuning.get("thread_per_output", leading and outputs >= 2048)
    assert leading or not thread_per_output, "a thread per output walks leading axes only"
    em = Emitter(plan, kernel.nodes, {r: "acc"}, args)
    out_idx = unravel(var("o", outputs), out_shape)
    em.begin_block()
    red_idx = unravel(var("r", reduced), tuple(in_shape[a] for a in axes))
    full = [ZERO] * len(in_shape)
    for a, e in zip(kept, out_idx):
        full[a] = e
    for a, e in zip(axes, red_idx):
        full[a] = e
    v = em.value(src, tuple(full))
    is_max = g.op(r) == "max"
    body = em.take()
    em.begin_block()
    r_shape = g.type(r).shape
    store_idx = tuple(full[a] if a in kept else ZERO for a in range(len(in_shape))) if attrs["keepdims"] else out_idx
    store = [em.store(r, store_idx if r_shape else (), "acc")]
    threads = 256
    ctx.update(thread_per_output=thread_per_output, outputs=outputs, reduced=reduced,
               init="-INFINITY" if is_max else "0.0f", combine=f"fmaxf(acc, {v})" if is_max else f"acc + {v}",
               body=body, store=store, is_max="true" if is_max else "false")
    grid = (ceil_div(outputs, threads), 1, 1) if thread_per_output else (outputs, 1, 1)
    return grid, (threads, 1, 1), em


def _operand_layout(plan: Plan, nid: int):
    """(buffer node, offset, strides) of a matmul operand read through views."""
    g = plan.graph
    chain = []
    while OPS[g.op(nid)].kind == VIEW:
        (src,) = g.inputs_of(nid)
        chain.append((g.op(nid), g.node(nid)["attrs"], g.type(src).shape, g.type(nid).shape))
        nid = src
    layout = strided(chain[::-1], g.type(nid).shape)
    if layout is None:
        raise AssertionError(f"matmul operand %{nid} is not a strided view (the planner should have copied it)")
    return nid, layout[0], layout[1]


# Matmul tiles (bm, bn, tm, tn): a group of (bm/tm)*(bn/tn) threads computes a bm x bn
# tile of C, each thread a tm x tn block read from shared memory in 16-byte vectors.
_MM_TILES = ((128, 128, 8, 8), (128, 64, 8, 4), (64, 128, 4, 8), (64, 64, 8, 8), (64, 64, 4, 4),
             (64, 32, 8, 8), (32, 64, 8, 8), (64, 32, 4, 4), (32, 64, 4, 4), (32, 32, 8, 8), (32, 32, 4, 4))
# (compute units, shared memory per unit in bytes) by arch, for the tile choice.
_MM_UNITS = {"sm_80": (108, 167936), "sm_86": (84, 102400), "sm_89": (128, 102400), "sm_90": (132, 233472),
             "gfx906": (60, 65536), "gfx908": (120, 65536), "gfx90a": (110, 65536), "gfx942": (304, 65536),
             "gfx1030": (80, 65536), "gfx1100": (96, 65536)}
# Fraction of a unit's peak FMA rate that a thread's tm*tn block reaches with 8 warps
# resident (fp32; shared-memory reads bound the small blocks). With _mm_cost's other
# constants, fitted to sweeps of every legal configuration on an H200 (hipgpt shapes at
# batch 32 and 256): the cost model ranks configurations, it does not predict times.
_MM_EFF = {16: 0.4, 32: 0.4, 64: 0.55}
# The configurations that measured fastest (or within 3%) for some of those shapes.
# _mm_config chooses among these only, so every choice is code measured to be good.
_MM_MENU = ((64, 64, 8, 8, 1, 8, 1), (64, 64, 8, 8, 1, 8, 2), (64, 64, 8, 8, 2, 32, 1), (64, 64, 8, 8, 2, 16, 1),
            (32, 64, 8, 8, 2, 16, 1), (32, 64, 4, 4, 1, 8, 2), (32, 32, 4, 4, 2, 16, 2), (32, 32, 4, 4, 2, 32, 2),
            (32, 32, 4, 4, 4, 16, 2), (32, 32, 4, 4, 4, 64, 2), (32, 32, 4, 4, 4, 32, 2), (32, 32, 4, 4, 4, 16, 1),
            (32, 32, 8, 8, 16, 64, 2), (32, 32, 8, 8, 8, 32, 2), (32, 64, 8, 8, 4, 16, 2), (64, 32, 8, 8, 4, 16, 1))


def _mm_smem_floats(bm: int, bn: int, bk: int, kg: int) -> int:
    """Two staging buffers As[bk][bm+4], Bs[bk][bn+4] (rows padded to 16 bytes, 4 banks
    apart), reused after the k loop for the partial tiles (kg/2 of them at once) and
    the summed tile C[bm][bn+1]."""
    return max(2 * bk * (bm + 4 + bn + 4), (kg // 2) * bm * bn, bm * (bn + 1) if kg > 1 else 0)


def _mm_configs(target: Target):
    """Every legal (bm, bn, tm, tn, kg, bk, depth): kg groups of threads split each slab
    of bk along k (bk/kg rows each), at most 256 threads, shared memory within the
    target's; global loads run `depth` slabs ahead of the compute."""
    for bm, bn, tm, tn in _MM_TILES:
        group = (bm // tm) * (bn // tn)
        for kg in (1, 2, 4, 8, 16):
            threads = group * kg
            if threads > 256 or threads % target.wavefront:
                continue
            for bks in (4, 8, 16):
                bk = kg * bks
                if bk % 8 or bk > 64 or (bm * bk) % threads or (bn * bk) % threads:
                    continue
                # Groups of 16 threads share a warp: their rows must fall 16 banks apart.
                if group < 32 and (bks * (bm + 4)) % 32 != 16:
                    continue
                if _mm_smem_floats(bm, bn, bk, kg) * 4 > target.shared_mem:
                    continue
                for depth in (1, 2):
                    if depth * (bm + bn) * bk // threads <= 32:  # staging registers a thread holds
                        yield bm, bn, tm, tn, kg, bk, depth


def _mm_cost(m: int, n: int, k: int, batch: int, cfg, target: Target) -> float:
    """Estimated cycles of the busiest compute unit: its blocks run in rounds of `occ`
    resident blocks; a slab costs about the larger of a global-load round trip (shared
    by `depth` slabs in flight) and the FMAs of the resident blocks at the rate their
    thread blocks reach, at least their L2 bytes; then the k groups' tree sum."""
    bm, bn, tm, tn, kg, bk, depth = cfg
    units, smem_unit = _MM_UNITS.get(target.arch, (100, 65536))
    threads = (bm // tm) * (bn // tn) * kg
    tiles = ceil_div(m, bm) * ceil_div(n, bn) * batch
    slabs = max(1, ceil_div(k, bk))
    per_unit = ceil_div(tiles, units)
    regs = tm * tn + 2 * (tm + tn) + depth * (bm + bn) * bk // threads + 16 + (32 if kg > 1 else 0)
    occ = max(1, min(per_unit, 2048 // threads, smem_unit // (4 * _mm_smem_floats(bm, bn, bk, kg)),
                     65536 // (threads * regs)))
    warps8 = occ * threads / 256  # resident warps / 8: fewer leave schedulers idle, more hide latency
    eff = _MM_EFF[tm * tn] * (warps8 ** 0.7 if warps8 < 1 else min(2.0, warps8 ** 0.3))
    fmas, latency = occ * bm * bn * bk / (128 * eff), 1500.0 / depth
    slab = max((fmas ** 8 + latency ** 8) ** 0.125, occ * (bm + bn) * bk * 4 / 16)
    reduce = 1000 * (kg.bit_length() - 1) + (bm * bn * 4 / threads) * 20 if kg > 1 else 0.0
    return ceil_div(per_unit, occ) * (slabs * slab + 2000 + reduce)


def _mm_threads(cfg) -> int:
    bm, bn, tm, tn, kg = cfg[:5]
    return (bm // tm) * (bn // tn) * kg


def _mm_menu(target: Target, threads: int | None = None):
    """The menu configurations the target admits (all legal ones if none), of `threads`
    threads if given (then all legal ones of that block size if the menu has none)."""
    legal = list(_mm_configs(target))
    menu = [cfg for cfg in _MM_MENU if cfg in legal] or legal
    if threads is not None:
        menu = [cfg for cfg in menu if _mm_threads(cfg) == threads] or [cfg for cfg in legal if _mm_threads(cfg) == threads]
    return menu


def _mm_config(m: int, n: int, k: int, batch: int, target: Target, threads: int | None = None):
    """The cheapest configuration of the menu by _mm_cost (first of equals, so
    deterministic); all legal ones if the target admits none of the menu. `threads`
    restricts the choice to one block size (the parts of a batched launch)."""
    return min(_mm_menu(target, threads), key=lambda cfg: _mm_cost(m, n, k, batch, cfg, target))


def _mm_shape(plan: Plan, kernel: KernelPlan) -> tuple[int, int, int, int]:
    """(m, n, k, batch) of a matmul kernel."""
    g = plan.graph
    out_shape = g.type(kernel.anchor).shape
    k = g.type(g.inputs_of(kernel.anchor)[0]).shape[-1]
    return out_shape[-2], out_shape[-1], k, max(1, _size(out_shape[:-2]))


def _mm_common_threads(plan: Plan, kernels: list[KernelPlan], target: Target) -> int:
    """The block size of a batched matmul launch: the thread count (among those of the
    menu) whose best configurations have the least summed cost over the parts (the
    smallest of equals)."""
    shapes = [_mm_shape(plan, kern) for kern in kernels]
    counts = sorted({_mm_threads(cfg) for cfg in _mm_menu(target)})

    def total(threads: int) -> float:
        return sum(_mm_cost(*shape, _mm_config(*shape, target, threads), target) for shape in shapes)

    return min(counts, key=total)


def _matmul(plan: Plan, kernel: KernelPlan, target: Target, ctx: dict, args: dict[int, str],
            threads: int | None = None, config: tuple | None = None):
    g = plan.graph
    mm = kernel.anchor
    a_in, b_in = g.inputs_of(mm)
    out_shape = g.type(mm).shape
    batch_shape, (m, n) = out_shape[:-2], out_shape[-2:]
    k = g.type(a_in).shape[-1]
    em = Emitter(plan, kernel.nodes, {mm: "acc"}, args)
    batch = max(1, _size(batch_shape))
    batch_idx = unravel(var("batch", batch), batch_shape)
    # Each operand is a buffer read through strided views (its batch offset from the
    # batch index, the block's tile along z), or computed while loading it (a prologue,
    # see planner/fusion.py gated_operand): a lambda of the element wanted. Either way
    # the template's staging loads name the element by its row and column variables.
    batch_lines, loads, prologues, strides_of = [], {}, [], {}
    for name, operand, axes in (("A", a_in, (("gm", m), ("gk", k))), ("B", b_in, (("gk", k), ("gn", n)))):
        base, offset, strides = _operand_layout(plan, operand)
        strides_of[name] = strides
        if base in kernel.nodes:
            prologues.append((name, operand, axes))
            continue
        batch_offset = add(offset, *[mul(z, s) for z, s in zip(batch_idx, strides[:-2])])
        batch_lines += [f"const idx_t {name.lower()}_base = {emit(batch_offset)};",
                        f"const float* {name} = {em.arg(base)} + {name.lower()}_base;"]
        at = add(mul(Var(axes[0][0]), strides[-2]), mul(Var(axes[1][0]), strides[-1]))
        loads[name] = f"{name}[{emit(at)}]"
    em.begin_block()
    body = []
    # The element of C at (batch, gm, gn) (the template's variables).
    element = add(mul(var("batch", batch), m * n), mul(var("gm", m), n), var("gn", n))
    for r in kernel.roots:
        idx = unravel(element, g.type(r).shape)
        v = em.value(r, idx)
        body += em.take() + [em.store(r, idx, v)]
    for name, operand, axes in prologues:
        em.begin_block()
        v = em.value(operand, tuple(batch_idx) + tuple(var(x, size) for x, size in axes))
        batch_lines += [f"auto {name}_at = [&](idx_t {axes[0][0]}, idx_t {axes[1][0]}) -> float {{  "
                        f"// operand {name}, %{operand} computed here",
                        *[f"  {line}" for line in em.take()], f"  return {v};", "};"]
        loads[name] = f"{name}_at({axes[0][0]}, {axes[1][0]})"
    bm, bn, tm, tn, kg, bk, depth = config or _mm_config(m, n, k, batch, target, threads)
    ty_count, tx_count = bm // tm, bn // tn
    threads = ty_count * tx_count * kg
    (a_sm, a_sk), (b_sk, b_sn) = strides_of["A"][-2:], strides_of["B"][-2:]
    # Staging loads: consecutive threads walk the operand's contiguous dimension;
    # "k" reads runs of 8 along k (one 32-byte sector) from 4 rows per 32 threads.
    a_mode = "m" if a_sk != 1 and a_sm == 1 else "k"
    b_mode = "k" if b_sn != 1 and b_sk == 1 else "n"
    ctx.update(m=m, n=n, k=k, batch=batch, bm=bm, bn=bn, bk=bk, bks=bk // kg, kg=kg, tm=tm, tn=tn, depth=depth,
               tx_count=tx_count, ty_count=ty_count, group_threads=tx_count * ty_count,
               halves=[kg >> r for r in range(1, kg.bit_length())], slabs=max(1, ceil_div(k, bk)),
               pa=bm + 4, pb=bn + 4, smem_floats=_mm_smem_floats(bm, bn, bk, kg),
               la=bm * bk // threads, lb=bn * bk // threads, a_mode=a_mode, b_mode=b_mode,
               check_m=m % bm != 0, check_n=n % bn != 0, check_k=k % bk != 0 or k == 0,
               batch_lines=batch_lines, a_load=loads["A"], b_load=loads["B"],
               body=body, n_tiles=ceil_div(n, bn), m_tiles=ceil_div(m, bm))
    # A 1-D grid: block_id runs over the tiles, n fastest, then m, then the batch
    # (the order a (n, m, batch) grid would dispatch them).
    grid = (ceil_div(n, bn) * ceil_div(m, bm) * batch, 1, 1)
    return grid, (threads, 1, 1), em


def _operand_access(em: Emitter, plan: Plan, nid: int, indices: Sequence[str]) -> str:
    """A C expression loading the element of operand `nid` (a strided view of a buffer)
    at the C index expressions `indices`, as a float (int for i32)."""
    buf, offset, strides = _operand_layout(plan, nid)
    terms = ([str(offset)] if offset else []) + [f"({i}) * {st}" if st != 1 else f"({i})"
                                                 for i, st in zip(indices, strides) if st != 0]
    raw = f"{em.arg(buf)}[{' + '.join(terms) or '0'}]"
    return f"bf16_to_float({raw})" if plan.buffer_of(buf).dtype == "bf16" else raw


GROUP_SORT_THREADS = 256


def _group_sort(plan: Plan, kernel: KernelPlan, ctx: dict, args: dict[int, str]):
    """group_rank / group_offsets in one block: a histogram of the ids in shared
    memory, its exclusive scan, then (for the rank) the ids in chunks of one per thread,
    each placed after the earlier ids of its group. Ids outside [0, G) are clamped (the
    reference refuses them; the router never makes one)."""
    g = plan.graph
    node = kernel.anchor
    (ids,) = g.inputs_of(node)
    em = Emitter(plan, kernel.nodes, args=args)
    ctx.update(mode=g.op(node).removeprefix("group_"), count=g.type(ids).size,
               groups=g.node(node)["attrs"]["num_groups"], id_at=_operand_access(em, plan, ids, ["r"]),
               out=em.arg(node))
    return (1, 1, 1), (GROUP_SORT_THREADS, 1, 1), em


GROUPED_TILE, GROUPED_BK, GROUPED_THREADS = 64, 16, 256


def _grouped_matmul(plan: Plan, kernel: KernelPlan, ctx: dict, args: dict[int, str]):
    """C = A B over the row segments of the groups, 64 x 64 tiles of C per block (256
    threads, 4 x 4 elements each, slabs of 16 along the summed axis staged in shared
    memory).
    grouped_matmul (rows): C = out rows of group e, A = x rows, B = w[e]; the blocks
    walk the tiles of every segment (at most ceil(R/64) + G of them along m: each
    segment adds at most one partial tile); blocks past the last tile do nothing.
    grouped_weight_grad (weights): C = out[e] (K, N), A = x rows of group eᵀ, B = y
    rows of group e; a block per (group, tile), summing over the group's rows
    (an empty group stores zeros)."""
    g = plan.graph
    node = kernel.anchor
    a_in, b_in, offsets = g.inputs_of(node)
    em = Emitter(plan, kernel.nodes, args=args)
    groups = g.type(offsets).shape[0] - 1
    tile = GROUPED_TILE
    rows = g.type(a_in).shape[0]
    out = em.arg(node)
    out_bf16 = plan.buffer_of(node).dtype == "bf16"
    if g.op(node) == "grouped_matmul":
        m, n = rows, g.type(node).shape[1]
        k = g.type(a_in).shape[1]
        a_at = _operand_access(em, plan, a_in, ["gm", "gk"])
        b_at = _operand_access(em, plan, b_in, ["e", "gk", "gn"])
        c_at = f"(gm) * {n} + (gn)"
        m_slots = ceil_div(rows, tile) + groups
    else:
        m, n = g.type(node).shape[1:]
        k = rows
        a_at = _operand_access(em, plan, a_in, ["gk", "gm"])
        b_at = _operand_access(em, plan, b_in, ["gk", "gn"])
        c_at = f"(idx_t)e * {m * n} + (gm) * {n} + (gn)"
        m_slots = groups * ceil_div(m, tile)
    store = "float_to_bf16(acc[i][j])" if out_bf16 else "acc[i][j]"
    ctx.update(mode="rows" if g.op(node) == "grouped_matmul" else "weights", groups=groups, m=m, n=n, k=k,
               tile=tile, bk=GROUPED_BK, n_tiles=ceil_div(n, tile), m_tiles=ceil_div(m, tile),
               offsets=em.arg(offsets), a_at=a_at, b_at=b_at, c_at=c_at, out=out, store=store)
    return (m_slots * ceil_div(n, tile), 1, 1), (GROUPED_THREADS, 1, 1), em


def _attention_tiles(dim: int, target: Target):
    """(dp, ri, rows, bk, bqk, bkq, forward floats, backward floats) of the attention
    kernels for head_dim `dim`: dp is head_dim padded (with zeros) to whole 8-lane x
    4-float groups; a thread owns ri rows of a tile of rows = 16 * ri (queries forward
    and in the backward's queries half, keys in its keys half); the other side's tiles
    are bk keys forward, bqk queries (keys half) and bkq keys (queries half), the largest
    (up to 32, 16, 16) whose static shared memory fits the target's (48 KiB on NVIDIA
    without opting in, 64 KiB LDS on AMD). Up to dp 64: 64 x 32 forward, 64 x 16
    backward. Above, 32-row tiles: a backward half stages two row tiles (2 * rows * dp
    floats) and keeps two accumulators (2 * ri * dp / 8 floats a thread); at dp 128 and
    48 KiB the backward's other tiles shrink to 8."""
    dp = ceil_div(dim, 32) * 32
    ri = 4 if dp <= 64 else 2
    rows = 16 * ri

    def fwd(t: int) -> int:  # floats of the forward's Q; K, V; P with key tiles of t
        return rows * dp + 2 * t * (dp + 4) + t * (rows + 4)

    def keys(t: int) -> int:  # the keys half's K, V; Q, dO; P (then dS); row max, sum, delta
        return 2 * rows * dp + 2 * t * (dp + 4) + t * (rows + 4) + 3 * t

    def queries(t: int) -> int:  # the queries half's Q, dO; K, V; dS
        return 2 * rows * dp + 2 * t * (dp + 4) + t * (rows + 4)

    def largest(tiles: tuple[int, ...], floats) -> int:
        fits = [t for t in tiles if floats(t) * 4 <= target.shared_mem]
        assert fits, f"attention tiles for head_dim {dim} exceed the shared memory of {target.name}"
        return fits[0]

    bk, bqk, bkq = largest((32, 16, 8), fwd), largest((16, 8), keys), largest((16, 8), queries)
    # The backward halves share one buffer; sizes in whole 16-byte vectors.
    return dp, ri, rows, bk, bqk, bkq, ceil_div(fwd(bk), 4) * 4, ceil_div(max(keys(bqk), queries(bkq)), 4) * 4


def _attention(plan: Plan, kernel: KernelPlan, target: Target, args: dict[int, str]) -> _Part:
    """Flash-style causal attention (FlashAttention-2 order, SIMT fp32): 128-thread
    blocks own tiles of queries (forward, dQ) or keys (dK, dV), stage the other side's
    tiles in shared memory and keep their accumulators in registers. The backward is
    one part whose two halves (keys, queries) share one shared-memory buffer."""
    g = plan.graph
    a = kernel.attention
    em = Emitter(plan, sorted(set(kernel.nodes) | a.prologue), args=args)
    *batch_shape, seq, dim = g.type(a.q).shape
    assert dim <= MAX_HEAD_DIM, f"the attention templates handle head_dim <= {MAX_HEAD_DIM}"
    bhn = max(1, _size(tuple(batch_shape)))
    dp, ri, rows, bk, bqk, bkq, fwd_floats, bwd_floats = _attention_tiles(dim, target)
    bq = bkb = bqq = rows
    nqb, nkb = ceil_div(seq, bq), ceil_div(seq, bkb)
    batch_lines: list[str] = []
    z = unravel(var("bh", bhn), tuple(batch_shape))
    # The backward's key blocks run over key/value heads: bhn / group of them.
    group = a.group
    ctx = dict(s=seq, d=dim, dp=dp, dt=dp // 8, bhn=bhn, bq=bq, bk=bk, bkb=bkb, bqk=bqk, bqq=bqq, bkq=bkq,
               nqb=nqb, kb_blocks=bhn // group * nkb, group=group, fwd_floats=fwd_floats, bwd_floats=bwd_floats,
               ri=ri, rv="at_f4" if ri == 4 else "at_f2", lanes="xyzw"[:ri],
               scale=repr(float(a.scale)) + "f", window=a.window, batch_lines=batch_lines)

    def operand(name: str, nid: int, transpose: bool = False) -> None:
        if view_base(g, nid) in a.prologue:
            prologue_operand(name, nid, transpose)
            return
        buf, offset, strides = _operand_layout(plan, nid)
        if transpose:
            strides = strides[:-2] + [strides[-1], strides[-2]]
        base = add(offset, *[mul(zi, st) for zi, st in zip(z, strides[:-2])])
        batch_lines.append(f"const idx_t {name}_base = {emit(base)};")
        ctx.update({name: em.arg(buf), f"{name}_s": strides[-2], f"{name}_d": strides[-1]})
        ctx[f"{name}_at"] = f"{em.arg(buf)}[{name}_base + {rows[name]} * {strides[-2]} + c * {strides[-1]}]"

    def prologue_operand(name: str, nid: int, transpose: bool) -> None:
        """q or k computed by its prologue (dsl.rope) at each element the kernel loads:
        a lambda of (row, column) evaluating the prologue's nodes, which read its inputs
        (the unrotated q or k, a view of the QKV projection) from their buffers."""
        row = rows[name]
        position = (var(row, seq), var("c", dim))
        em.begin_block()
        value = em.value(nid, tuple(z) + (position[::-1] if transpose else position))
        body = [f"  {line}" for line in em.take()] + [f"  return {value};"]
        batch_lines.extend([f"auto {name}_at = [&](const idx_t {row}, const int c) -> float {{"] + body + ["};"])
        ctx[f"{name}_at"] = f"{name}_at({row}, c)"

    rows = dict(q="i", k="j", v="j", g="i")  # the templates' row variable of each operand
    operand("q", a.q)
    operand("k", a.k_t, transpose=True)
    operand("v", a.v)
    batch_lines += [f"const idx_t o_base = bh * {seq * dim};", f"const idx_t r_base = bh * {seq};"]
    ctx["dropout"] = None
    if a.dropout:
        # The probabilities' dropout mask, recomputed wherever p is: element (bh, i, j)
        # of the (.., S, S) probabilities, as the random_uniform node draws it.
        d = a.dropout
        batch_lines.append(f"const uint32_t drop_step = (uint32_t)(int){em.arg(d.step)}[0];")
        keep = philox_uniform(d.seed, d.stream, "drop_step", f"((uint64_t)(bh * {seq} + i) * {seq} + j)")
        ctx["dropout"] = dict(keep=f"{keep} >= {c_literal(d.threshold, 'f32')}", scale=c_literal(d.scale, "f32"))
    env = _environment()
    if kernel.family == "attention":
        stats = a.m in kernel.roots
        ctx.update(out=em.arg(a.out), store_stats=stats)
        if stats:
            ctx.update(m_ptr=em.arg(a.m), s_ptr=em.arg(a.s))
        return _Part(kernel.name, env.get_template("attention.hip.j2").render(**ctx), (bhn * nqb, 1, 1), (128, 1, 1))
    operand("g", a.d_out)  # the gradient of out
    dq, dk, dv = a.stores()
    ctx.update(out=em.arg(a.out), m_ptr=em.arg(a.m), s_ptr=em.arg(a.s), dq_ptr=em.arg(dq),
               dk_ptr=em.arg(dk), dv_ptr=em.arg(dv))
    if group > 1:  # dK, dV summed over the group: (.., Hkv, 1, S, D) at key/value head bhk
        ctx.update(dk_at=f"kv_base + j * {dim} + c", dv_at=f"kv_base + j * {dim} + c")
    else:  # per head; dK as the matmul dkᵀ stores it, (.., D, S)
        ctx.update(dk_at=f"o_base + c * {seq} + j", dv_at=f"o_base + j * {dim} + c")
    # attention_dkdv.hip.j2 is the whole backward body; it includes attention_dq.hip.j2
    # for the queries half.
    return _Part(f"{kernel.name} keys+queries", env.get_template("attention_dkdv.hip.j2").render(**ctx),
                 (bhn // group * nkb + bhn * nqb, 1, 1), (128, 1, 1))


def tunings(plan: Plan, kernel: KernelPlan, target: Target) -> list[dict]:
    """The alternatives to the codegen's choice of block size or tile for `kernel`, as
    `tuning` overrides for render_launch (the dev/ harness times them): pointwise and
    scatter block sizes, threads per row, a thread or a block per reduced output, the
    matmul configurations the target admits (attention tiles are fixed)."""
    g = plan.graph
    wave = target.wavefront
    if kernel.family in ("pointwise", "scatter"):
        return [{"threads": t} for t in (64, 128, 256, 512, 1024) if t % wave == 0]
    if kernel.family == "row":
        return [{"tpr": t} for t in (wave, 128, 256, 512, 1024) if t >= wave and t % wave == 0]
    if kernel.family == "reduce":
        axes = g.node(kernel.anchor)["attrs"]["axes"]
        return [{"thread_per_output": False}] + ([{"thread_per_output": True}] if axes == tuple(range(len(axes))) else [])
    if kernel.family == "matmul":
        return [{"matmul": cfg} for cfg in _mm_menu(target)]
    return []


def render_plan(plan: Plan, target: Target) -> list[KernelSource]:
    """One source per launch of the plan."""
    return [render_collective(plan, [plan.kernels[i] for i in launch]) if plan.kernels[launch[0]].family == "collective"
            else render_launch(plan, [plan.kernels[i] for i in launch], target) for launch in plan.launches]


def collective_calls(plan: Plan, kernels: Sequence[KernelPlan]) -> list[dict]:
    """The library calls of a collective launch (one bucket, issued as one group): the
    op, the operand's and the result's buffer nodes, the element count sent per rank
    and the dtype."""
    g = plan.graph
    calls = []
    for k in kernels:
        (src,) = k.reads
        calls.append({"op": g.op(k.anchor), "send": src, "recv": k.anchor, "count": g.type(src).size,
                      "dtype": g.type(k.anchor).dtype, "world": g.node(k.anchor)["attrs"]["world"]})
    return calls


def render_collective(plan: Plan, kernels: Sequence[KernelPlan]) -> KernelSource:
    """A collective launch has no device code: the executor calls NCCL/RCCL
    (gptc/runtime/comm.py). Its "source" says what it calls, for a person reading the
    bundle; `args` are the send and receive buffers of each call, in order."""
    g = plan.graph
    name = kernels[0].name if len(kernels) == 1 else f"{kernels[0].name}+{len(kernels) - 1}"
    calls = collective_calls(plan, kernels)
    lines = [f"// {name}: one group of {len(calls)} collective call(s) on the communication stream (NCCL/RCCL)"]
    for c, k in zip(calls, kernels):
        lines.append(f"//   {c['op']}(%{c['send']} -> %{c['recv']}, {c['count']} x {c['dtype']}, "
                     f"world {c['world']})  # {g.node(k.anchor)['scope']}")
    args = tuple(n for c in calls for n in (c["send"], c["recv"]))
    origin = f"{name}: " + "; ".join(g.describe(k.anchor) for k in kernels[:8])
    return KernelSource(name, "collective", "\n".join(lines) + "\n", "", "", (1, 1, 1), (1, 1, 1), args, (), origin)
