"""Kernel sources: one rendered template per planned kernel, with its launch shape.

Block sizes and tiles are chosen here, per target and shape; the templates in
templates/ read them. Rendering is deterministic: the same plan and target give
byte-identical sources."""
from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jinja2

from gptc.compiler.codegen import names
from gptc.compiler.codegen.emit import C_TYPE, STORAGE_TYPE, Emitter, c_literal, philox_uniform
from gptc.compiler.codegen.indexing import ceil_div, linearize, unravel
from gptc.compiler.codegen.symbolic import ZERO, Expr, Var, add, emit, mul, var
from gptc.compiler.strides import contiguous, strided
from gptc.common import PACKAGE_DIR
from gptc.target import Target
from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.decode import chunk_of
from gptc.compiler.ops.registry import VIEW
from gptc.compiler.ops.sample import STREAM
from gptc.compiler.planner import fusion
from gptc.compiler.planner.attention import MAX_HEAD_DIM
from gptc.compiler.planner.schedule import KernelPlan, Plan

POINTWISE_THREADS = 256
POINTWISE_UNROLL = 4  # elements a thread computes before storing them (loads in flight)
ROW_UNROLL = 4  # the same in a row kernel's loops over the row (steps of a pass unrolled, loads in flight)
MAX_GRID = 65535 * 32


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel and how to launch it.

    `source` is what a person reads (kernels/<name>.hip): it names the graph nodes it
    computes, and its parameters by their roles (names.py). `code` is what the compiler
    gets: the same code without comments and with positional parameter names, its
    entry point `symbol` named by a hash of that code, so kernels that differ only in
    the graph nodes they came from (the same layer, repeated) compile once. `args` are
    the node ids of the buffers passed, in parameter order (a TensorMap for a parameter
    that is a tensor map of a buffer)."""
    name: str
    family: str
    source: str
    code: str
    symbol: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[int | TensorMap, ...]
    zero_init: tuple[int, ...]
    origin: str          # the graph nodes it computes, for error messages
    shared_bytes: int = 0  # dynamic shared memory the launch needs (0: its pool is static, within target.shared_mem)


class TensorMap(NamedTuple):
    """A TMA tensor map that a launch takes by value (templates/matmul_wgmma.hip.j2 stages
    its operands with it): the bf16 view of buffer `node` from element `offset`, of
    extents `dims` (innermost first), `strides` (elements, of dims 1..), read in boxes
    of `box` elements with the 128-byte swizzle. A key of a launch's `args`, beside the
    buffer nodes; the executor encodes it for the buffer's address."""
    node: int
    offset: int
    dims: tuple[int, ...]
    strides: tuple[int, ...]
    box: tuple[int, ...]


TENSOR_MAP_TYPE = "gptc_tensor_map"  # its C type, templates/mma_fragments.h
TMA_MAX_RANK = 5  # dimensions a tensor map names: a matrix's 2 and 3 of batch


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


@functools.lru_cache(maxsize=1)
def mma_fragments() -> str:
    """templates/mma_fragments.h: pasted (as text, not a Jinja template: its inline PTX
    has braces) into the launches that run on the matrix units."""
    return (templates_dir() / "mma_fragments.h").read_text()


def _index_type(plan: Plan, kernel: KernelPlan) -> str:
    g = plan.graph
    sizes = [g.type(n).size for n in kernel.nodes + kernel.reads]
    sizes += [g.type(i).size for n in kernel.nodes for i in g.inputs_of(n)]
    # (a grid-stride loop's index reaches count + its stride, up to about twice count)
    return "long long" if max(sizes, default=0) >= 2**30 - 4096 else "int"


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
    min_blocks: int = 0  # resident blocks per unit the compiler must allow (registers), 0: no bound
    mma: bool = False    # runs on the matrix units: the launch pastes templates/mma_fragments.h


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
        threads = tuning.get("threads", POINTWISE_THREADS)
        unroll = 1
        if family == "pointwise":
            # POINTWISE_UNROLL elements a thread a step, all loaded before any is stored:
            # a step's loads in flight together (one element a thread leaves HBM idle)
            unroll = tuning.get("unroll", POINTWISE_UNROLL)
            deferred = _deferred_stores(em, kernel.roots, lambda r: idx)
            body = deferred["body"]
            ctx.update(stores=deferred["lane_stores"], out_types=deferred["out_types"])
        else:
            ids, updates = g.inputs_of(kernel.anchor)
            row = em.value(ids, idx[:-1])
            value = em.value(updates, idx)
            offset = linearize((Var(f"(idx_t){row}"), idx[-1]), g.type(kernel.anchor).shape)
            body = em.take() + [f"atomicAdd(&{em.arg(kernel.anchor)}[{emit(offset)}], {value});"]
        consts["count"] = count
        ctx.update(body=body, unroll=unroll)
        grid, block = _grid_1d(count, threads * unroll), (threads, 1, 1)
    elif family == "row":
        grid, block, em = _row(plan, kernel, target, ctx, args, tuning)
    elif family == "reduce":
        grid, block, em = _reduce(plan, kernel, target, ctx, args, tuning)
    elif family == "matmul":
        grid, block, em = _matmul(plan, kernel, target, ctx, args, mm_threads, tuning.get("matmul"), tuning.get("mma"),
                                  tuning.get("group"), tuning.get("tma", True))
    elif family in ("attention", "attention_bwd"):
        return _attention(plan, kernel, target, args)
    elif family == "group_sort":
        grid, block, em = _group_sort(plan, kernel, ctx, args)
    elif family == "grouped_matmul":
        grid, block, em = _grouped_matmul(plan, kernel, ctx, args)
    elif family == "sample_tokens":
        grid, block, em = _sample(plan, kernel, ctx, args)
    elif family in ("kv_write", "decode_attention", "decode_combine"):
        grid, block, em = _decode(plan, kernel, target, ctx, args, tuning)
    else:
        raise AssertionError(family)
    template = ctx.pop("template", f"{family}.hip.j2")
    text = _environment().get_template(template).render(target=target, block_threads=block[0], **ctx)
    return _Part(kernel.name, text, grid, block, ctx.get("smem_floats", 0), consts, ctx.get("min_blocks", 0),
                 template in ("matmul_mma.hip.j2", "matmul_wgmma.hip.j2"))


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
    assert pool * 4 <= target.max_shared, "a part's shared memory exceeds the target's"
    # Beyond what a block may take without opting in, the pool is dynamic (sized at launch).
    shared_bytes = 16 * ((pool + 3) // 4) if pool * 4 > target.shared_mem else 0
    types = {ph: TENSOR_MAP_TYPE if isinstance(a, TensorMap) else STORAGE_TYPE[plan.buffer_of(a).dtype]
             for a, ph in args.items()}
    functions, branches, leader = _share(parts, types)
    # Parts run in the order of the branches (a function's parts side by side), each on
    # its own range of blocks.
    order = [k for kind, x in branches for k in ([x] if kind == "inline" else functions[x]["members"])]
    starts: dict[int, int] = {}
    total = 0
    for k in order:
        starts[k], total = total, total + parts[k].grid[0]
    grid = (total, 1, 1) if len(parts) > 1 else parts[0].grid
    family = kernels[0].family
    name = kernels[0].name if len(kernels) == 1 else f"{kernels[0].name}+{len(kernels) - 1}"
    index_type = "long long" if any(_index_type(plan, k) == "long long" for k in kernels) else "int"
    template = _environment().get_template("kernel.hip.j2")

    def render(symbol: str, mapping: dict[str, str], fn_args: list[dict[str, str]], sel_args: list[dict[str, str]],
               title: str = "", node_lines: Sequence[str] = (), with_prelude: bool = True) -> str:
        """The launch's text, its placeholders named by `mapping` (and by `fn_args` inside
        each function, `sel_args` in the branch that calls it); those it does not name
        stay (the code)."""
        fns = []
        for f, local in zip(functions, fn_args):
            head = f"__device__ __forceinline__ void {names.substitute(f['name'], mapping)}"
            fns.append(dict(comment=f["comment"], body=names.substitute(f["body"], {**mapping, **local}),
                            signature=_signature(head, [f"{t} {names.substitute(p, local)}" for t, p in f["params"]])))
        blocks = []
        for kind, x in branches:
            if kind == "inline":
                p = parts[x]
                blocks.append(dict(title=p.title, start=starts[x], end=starts[x] + p.grid[0], inline=True,
                                   consts=p.consts, body=names.substitute(p.text, mapping)))
                continue
            f, members = functions[x], functions[x]["members"]
            last = members[-1]
            local = {**mapping, **sel_args[x]}
            body = _dispatch(f, parts, starts, lambda text: names.substitute(text, local))
            blocks.append(dict(title=f"{len(members)} parts run {names.substitute(f['name'], mapping)}",
                               start=starts[members[0]], end=starts[last] + parts[last].grid[0], inline=False,
                               consts={}, body=body))
        params = [(f"const __grid_constant__ {types[ph]} " if types[ph] == TENSOR_MAP_TYPE else f"{types[ph]}* ")
                  + names.substitute(ph, mapping) for ph in args.values()]
        min_blocks = max(p.min_blocks for p in parts)
        bounds = f"GPTC_LAUNCH_BOUNDS_MIN({block[0]}, {min_blocks})" if min_blocks else f"GPTC_LAUNCH_BOUNDS({block[0]})"
        head = f'extern "C" __global__ void {bounds} {symbol}'
        return template.render(prelude=prelude() if with_prelude else "", family=family, target=target,
                               index_type=index_type, needs_reduce_helpers=family in ("row", "reduce"),
                               mma_fragments=mma_fragments() if any(p.mma for p in parts) else "",
                               pool_f4=(pool + 3) // 4, dynamic_pool=bool(shared_bytes), functions=fns, parts=blocks, title=title,
                               signature=_signature(head, params), node_lines=node_lines)

    code = _strip_comments(render("KERNEL_SYMBOL", {}, [{} for _ in functions], [{} for _ in functions],
                                  with_prelude=False))
    symbol = f"gptc_{family}_{hashlib.sha256(code.encode()).hexdigest()[:12]}"
    code = prelude() + code.replace("KERNEL_SYMBOL", symbol)
    # Role names for the source a person reads (the code keeps the placeholders).
    avoid = names.taken_names(code[len(prelude()):], prelude())
    taken = set(avoid)
    mapping = {ph: names.unique(_arg_names(plan, a)[0], taken) for a, ph in args.items()}
    mapping.update({f["name"]: names.unique(names.sanitize(f["title"]), taken) for f in functions})
    node_of = {ph: a for a, ph in args.items()}
    fn_args, sel_args = [], []
    for f in functions:  # a parameter is named by what the parts' buffers have in common
        agreed = [names.agreed_name([_arg_names(plan, node_of[ph]) for ph in column])
                  for column in f["columns"]]
        local = avoid | {mapping[f["name"]]}
        fn_args.append({p: names.unique(a, local) for p, a in zip(f["fargs"], agreed)})
        # the calling branch's locals also live beside the kernel's parameters
        local = set(taken)
        sel_args.append({p: names.unique(a, local) for p, a in zip(f["fargs"], agreed)})
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
    node_lines += names.wrap([f"{mapping[ph]} = %{a.node} (tensor map)" if isinstance(a, TensorMap) else f"{mapping[ph]} = %{a}"
                              for a, ph in args.items()], "parameters: ", "  ", 96)
    source = render(symbol, mapping, fn_args, sel_args, name, node_lines)
    nodes = [n for k in kernels for n in k.nodes]
    origin = f"{name}: " + "; ".join(g.describe(n) for n in nodes[:8]) + (" ..." if len(nodes) > 8 else "")
    zero_init = tuple(n for k in kernels for n in k.zero_init)
    return KernelSource(name, family, source, code, symbol, grid, block, tuple(args), zero_init, origin, shared_bytes)


def _arg_names(plan: Plan, arg: int | TensorMap) -> tuple[str, ...]:
    """Names of a launch parameter: its buffer's (names.buffer_names), a tensor map's with _map."""
    if isinstance(arg, TensorMap):
        return tuple(f"{name}_map" for name in names.buffer_names(plan, arg.node))
    return names.buffer_names(plan, arg)


def _share(parts: list[_Part], types: dict[str, str]):
    """(functions, branches, leader) of a launch's parts: parts whose bodies are equal
    once their buffers (and constants) are function parameters run one __forceinline__
    device function, called once (see _dispatch): one inlined copy of its code however
    many parts run it (150 inlined copies of AdamW took NVRTC 18 s).
    branches: ("inline", k) for a part whose body is its own, ("call", f) for function
    f, in the order of their first parts; functions[f]["members"] are its parts.
    leader[k] is the index of the first part with part k's code."""
    groups: dict[tuple, list[int]] = {}
    used_of, abstract_of = [], []
    for part in parts:
        used = list(dict.fromkeys(names.ARG.findall(part.text)))
        abstract = names.substitute(part.text, {ph: names.farg(n) for n, ph in enumerate(used)})
        used_of.append(used)
        abstract_of.append(abstract)
        # (a tensor map is passed on by reference, never chosen per part: parts share a
        # function only where they read the same maps)
        key = (_strip_comments(abstract), tuple(types[ph] for ph in used), tuple(part.consts),
               tuple(ph for ph in used if types[ph] == TENSOR_MAP_TYPE))
        groups.setdefault(key, []).append(len(used_of) - 1)
    functions, branches, leader = [], [], list(range(len(parts)))
    for members in groups.values():
        first = members[0]
        for k in members:
            leader[k] = first
        if len(members) == 1:
            branches.append(("inline", first))
            continue
        branches.append(("call", len(functions)))
        fargs = [names.farg(n) for n in range(len(used_of[first]))]
        params = [(f"const {types[ph]}&" if types[ph] == TENSOR_MAP_TYPE else f"{types[ph]}*", fa)
                  for ph, fa in zip(used_of[first], fargs)]
        params += [("idx_t", c) for c in parts[first].consts] + [("idx_t", "block_id"), ("idx_t", "grid_blocks")]
        title = parts[first].title
        functions.append(dict(name=names.fn(len(functions)), title=title, params=params, fargs=fargs,
                              body=abstract_of[first], members=members, used=[used_of[k] for k in members],
                              columns=list(zip(*[used_of[k] for k in members])),
                              comment=f"{title}'s code, run by the {len(members)} parts of this launch that compute the "
                                      f"same nodes\n// on other buffers (its comments name {title}'s nodes)."))
    return functions, branches, leader


def _dispatch(f: dict, parts: list[_Part], starts: dict[int, int], name: Callable[[str], str]) -> str:
    """The branch of a launch that runs function `f` for its parts: a chain picks the
    block's part (its range of blocks, its buffers and constants), then one call runs
    it. Arguments all parts agree on are passed as they are. `name` names placeholders."""
    members = f["members"]
    consts = list(parts[members[0]].consts)
    varying = [fa for fa, column in zip(f["fargs"], f["columns"]) if len(set(column)) > 1]
    varying_consts = [c for c in consts if len({parts[k].consts[c] for k in members}) > 1]
    by_type: dict[str, list[str]] = {}
    for t, fa in f["params"]:
        if fa in varying:
            by_type.setdefault(t, []).append(fa)
    decls = [f"idx_t block_id, grid_blocks{''.join(', ' + c for c in varying_consts)};"]
    decls += [name(f"{t.rstrip('*')} {', '.join('*' + v for v in vs)};") for t, vs in by_type.items()]
    lines = _packed(decls, "  ")
    for i, (k, used) in enumerate(zip(members, f["used"])):
        end = starts[k] + parts[k].grid[0]
        test = "} else {" if i == len(members) - 1 else f"{'} else ' if i else ''}if (blockIdx.x < {end}) {{"
        lines.append(f"  {test}  // {parts[k].title}")
        sets = [f"block_id = (idx_t)blockIdx.x - {starts[k]};", f"grid_blocks = {parts[k].grid[0]};"]
        sets += [f"{c} = {parts[k].consts[c]};" for c in varying_consts]
        sets += [name(f"{fa} = {ph};") for fa, ph in zip(f["fargs"], used) if fa in varying]
        lines += _packed(sets, "    ")
    lines.append("  }")
    first = members[0]
    values = [fa if fa in varying else ph for fa, ph in zip(f["fargs"], f["used"][0])]
    values += [c if c in varying_consts else str(parts[first].consts[c]) for c in consts] + ["block_id", "grid_blocks"]
    return "\n".join(lines) + "\n" + _signature(f"  {name(f['name'])}", [name(v) for v in values]) + ";\n"


def _packed(statements: list[str], indent: str, width: int = 100) -> list[str]:
    """Statements joined by spaces into lines of at most `width` characters."""
    lines, line = [], ""
    for st in statements:
        if line and len(indent) + len(line) + 1 + len(st) > width:
            lines.append(indent + line)
            line = ""
        line = f"{line} {st}" if line else st
    return lines + ([indent + line] if line else [])


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
    """Reductions over the last axis (the row) with the pointwise work around them: one
    loop over the row a pass, each pass computing every reduction that needs none of
    the others in it (so cross-entropy's max, sum of exponentials and target logit
    take one pass: the sum of exp(x - max) is kept online, rescaled as the running max
    grows), then the stores of the full-row values, padded rows last (see
    fusion.padded_row). Each loop takes chunks of _row_lanes elements a thread-step,
    read and written 16 bytes at a time, unless some access of the row cannot be (rows
    not 16-byte aligned, a gathered row): then one element a thread-step, as a warp's
    accesses are then contiguous."""
    g = plan.graph
    lead, row_len = _row_space(g, kernel)
    rows = max(1, _size(lead))
    wave = target.wavefront
    tpr = tuning.get("tpr", wave if row_len <= 1024 else 256)
    rows_per_block = max(1, 128 // tpr) if tpr == wave else 1
    lanes = tuning.get("lanes", _row_lanes(plan, kernel))
    em, lines = _row_lines(plan, kernel, args, tpr, lanes)
    if em.scattered and "lanes" not in tuning:
        lanes = 1
        em, lines = _row_lines(plan, kernel, args, tpr, lanes)
    ctx.update(rows=rows, row_len=row_len, tpr=tpr, rows_per_block=rows_per_block,
               unroll=tuning.get("unroll", ROW_UNROLL), lanes=lanes, **lines)
    return (ceil_div(rows, rows_per_block), 1, 1), (tpr * rows_per_block, 1, 1), em


def _row_lines(plan: Plan, kernel: KernelPlan, args: dict[int, str], tpr: int, lanes: int) -> tuple[Emitter, dict]:
    """The emitter and the lines of a row kernel (_row) in chunks of `lanes`: its passes,
    the stores of its reduced values (row_body) and the loops storing full rows."""
    g = plan.graph
    reduces = [n for n in kernel.nodes if g.op(n) in ("sum", "max")]
    lead, row_len = _row_space(g, kernel)
    # Stage results are named by position (the template's comment names the node): code
    # that differs only in node ids (a repeated layer) stays identical and compiles once.
    special = {r: f"r{s}" for s, r in enumerate(reduces)}
    exp = "__expf" if _row_floats(plan, kernel) == {"bf16"} else "expf"
    em = Emitter(plan, kernel.nodes, special, args, exp=exp)
    if lanes > 1:
        em.set_lanes(var("j", row_len), var("jc", row_len), lanes)
    lead_idx = unravel(var("row", max(1, _size(lead))), lead)
    full_idx = lead_idx + (var("j", row_len),)
    row_idx = lead_idx + (ZERO,)
    groups: list[list[int]] = []
    online: dict[int, int] = {}  # sum -> the max of its pass it is kept online with (one sum a max)
    for r in reduces:
        top = _online_sum(g, r, groups[-1]) if groups else None
        if top is not None and top not in online.values():
            online[r] = top
            groups[-1].append(r)
        elif groups and not _reads_reduces(g, r, set(kernel.nodes)) & set(groups[-1]):
            groups[-1].append(r)
        else:
            groups.append([r])
    passes = []
    for group in groups:
        em.begin_block()
        for r in group:
            del em.special[r]  # not yet computed while its own pass runs
        decls, inits, combines, finals, online_inputs, chunk_combines = [], [], [], [], [], []
        for r in group:
            acc, is_max = f"acc{group.index(r)}", g.op(r) == "max"
            decls.append(f"float {special[r]};  // %{r} {g.op(r)} over the row")
            inits.append(f"float {acc} = {'-INFINITY' if is_max else '0.0f'};")
            if r not in online:
                v = em.value(g.inputs_of(r)[0], full_idx)
                combines.append(f"{acc} = fmaxf({acc}, {v});" if is_max else f"{acc} += {v};")
                finals.append(f"{special[r]} = gptc_row_reduce<{tpr}, {'true' if is_max else 'false'}>({acc}, scratch);")
                continue
            # sum(exp(x - max x)), online: the max's update (its line, earlier in the
            # pass) rescales it; -inf elements add nothing, a NaN propagates, and a row of
            # -inf alone sums to NaN, as exp(-inf - -inf) does in the sum over the row
            top = online[r]
            m_acc, x = f"acc{group.index(top)}", em.value(g.inputs_of(top)[0], full_idx)
            if lanes > 1:  # a chunk at a time: its lanes' values kept, then one update (_online_chunk)
                xs = f"x{len(online_inputs)}"
                online_inputs.append(xs)
                combines[group.index(top)] = f"{xs}[l] = {x};"
                chunk_combines += _online_chunk(xs, m_acc, acc, lanes, exp)
            else:
                combines[group.index(top)] = (f"if ({x} > {m_acc}) {{ {acc} = {acc} * {exp}({m_acc} - {x}) + 1.0f; "
                                              f"{m_acc} = {x}; }} else if ({x} != -INFINITY) {{ {acc} += {exp}({x} - {m_acc}); }}")
            finals.append(f"{special[r]} = gptc_row_reduce<{tpr}, false>({m_acc} == -INFINITY ? {acc} : "
                          f"{acc} * {exp}({m_acc} - {special[top]}), scratch);")
            finals.append(f"if ({special[top]} == -INFINITY) {special[r]} = NAN;")
            combines.append("")  # (the max's line updates it)
        passes.append(dict(decls=decls, inits=inits, body=em.take(), combines=combines, finals=finals,
                           chunk_loads=em.chunk_lines, online_inputs=online_inputs, chunk_combines=chunk_combines))
        for r in group:
            em.special[r] = special[r]
    reduced_shape = lead + (1,)
    em.begin_block()
    row_body = _store_lines(em, [r for r in kernel.roots if g.type(r).shape == reduced_shape], lambda r: row_idx)
    row_body = em.take() + row_body
    # The stores of full rows, then of padded rows: ROW_UNROLL elements (or chunks) a thread
    # a step, all computed (their loads in flight) before any is stored, as in pointwise kernels.
    loops = []
    for shape in sorted({g.type(r).shape for r in kernel.roots} - {reduced_shape}):
        idx = lead_idx + (var("j", shape[-1]),)
        if lanes > 1:  # the padded rows' loop: its own bound
            em.set_lanes(var("j", shape[-1]), var("jc", shape[-1]), lanes)
        em.begin_block()
        loops.append(dict(_deferred_stores(em, [r for r in kernel.roots if g.type(r).shape == shape], lambda r: idx,
                                           chunk_stores=shape[-1] % lanes == 0), length=shape[-1]))
    return em, dict(passes=passes, row_body=row_body, loops=loops)


def _row_space(g: Graph, kernel: KernelPlan) -> tuple[tuple[int, ...], int]:
    """(the leading axes, the row's length) of a row kernel: its first reduction's input."""
    first = next(n for n in kernel.nodes if g.op(n) in ("sum", "max"))
    space = g.type(g.inputs_of(first)[0]).shape
    return space[:-1], space[-1]


def _online_chunk(xs: str, m: str, s: str, lanes: int, exp: str) -> list[str]:
    """softmax's online sum s = sum(exp(x - m)) updated by a chunk of `lanes` values xs[l]
    (-inf past the row's end): the chunk's max, one rescale where it raises the running
    max m, then the exps, with no branch an element. -inf adds nothing (exp(-inf - -inf)
    would be NaN); a NaN propagates into the sum."""
    return [f"float {xs}_max = {xs}[0];",
            "#pragma unroll",
            f"for (int l = 1; l < {lanes}; ++l) {xs}_max = fmaxf({xs}_max, {xs}[l]);",
            f"if ({xs}_max > {m}) {{ {s} *= {exp}({m} - {xs}_max); {m} = {xs}_max; }}",
            "#pragma unroll",
            f"for (int l = 0; l < {lanes}; ++l) {s} += {xs}[l] == -INFINITY ? 0.0f : {exp}({xs}[l] - {m});"]


def _row_floats(plan: Plan, kernel: KernelPlan) -> set[str]:
    """The float dtypes of a row kernel's full-row buffers (read or stored). Where all
    are bf16, exp takes __expf: its error (a few float ulps) is far below bf16's 2^-9."""
    g = plan.graph
    lead, _ = _row_space(g, kernel)
    touched = [r for r in kernel.roots if g.type(r).shape != lead + (1,)]
    touched += [x for x in kernel.reads if g.type(x).shape[-1:] not in ((), (1,))]
    return {plan.buffer_of(x).dtype for x in touched} & {"f32", "bf16", "f64"}


def _row_lanes(plan: Plan, kernel: KernelPlan) -> int:
    """Consecutive elements of a row a row kernel's thread takes at a time (its loops in
    chunks, Emitter.set_lanes): 16 bytes of its full-row buffers, so that a warp's loads
    and stores are whole sectors and each thread has more bytes in flight: 4 where one
    is f32, else 8 (bf16). Buffers whose rows are not 16-byte aligned are read and
    written an element at a time all the same (the emitter checks each offset)."""
    return 4 if "f32" in _row_floats(plan, kernel) else 8


def _reads_reduces(g, nid: int, nodes: set[int]) -> set[int]:
    """The sum/max nodes of `nodes` that `nid` reads, directly or through other nodes of
    `nodes` (not through a reduction: its own inputs are its business)."""
    found, seen, stack = set(), set(), list(g.inputs_of(nid))
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in nodes and g.op(n) in ("sum", "max"):
            found.add(n)
        elif n in nodes or OPS[g.op(n)].kind == VIEW:
            stack.extend(g.inputs_of(n))
    return found


def _online_sum(g, r: int, group: list[int]) -> int | None:
    """The max node m of `group` when `r` is sum(exp(x - m)) over the row and m = max(x)
    (softmax's denominator), else None."""
    if g.op(r) != "sum" or g.op(e := g.inputs_of(r)[0]) != "exp" or g.op(d := g.inputs_of(e)[0]) != "sub":
        return None
    x, b = g.inputs_of(d)
    if g.op(b) != "broadcast":
        return None
    (m,) = g.inputs_of(b)
    return m if m in group and g.op(m) == "max" and _same_value(g, g.inputs_of(m)[0], x) else None


def _same_value(g, a: int, b: int) -> bool:
    """`a` and `b` are one value: the same node, or casts of one node to one dtype (the
    precision pass gives each reader of a bf16 copy its own widening cast)."""
    return a == b or (g.op(a) == g.op(b) == "cast" and g.inputs_of(a) == g.inputs_of(b) and g.type(a) == g.type(b))


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
    if all(_gemv_shape(m, batch) for m, _, _, batch in shapes):
        return GEMV_THREADS
    if all(_mma_operands(plan, kern, target) for kern in kernels):
        return min(sorted({_mma_threads(t, target) for t in _mma_tiles(target)}),
                   key=lambda threads: sum(_mma_cost(*shape, _mma_config(*shape, target, threads), target)
                                           for shape in shapes))
    counts = sorted({_mm_threads(cfg) for cfg in _mm_menu(target)})

    def total(threads: int) -> float:
        return sum(_mm_cost(*shape, _mm_config(*shape, target, threads), target) for shape in shapes)

    return min(counts, key=total)


def _matmul_epilogue(em: Emitter, plan: Plan, kernel: KernelPlan, batch: int, m: int, n: int) -> list[str]:
    """The lines that compute and store the kernel's roots at the element of C at
    (batch, gm, gn) (the matmul templates' variables): the fused epilogue."""
    em.begin_block()
    element = add(mul(var("batch", batch), m * n), mul(var("gm", m), n), var("gn", n))
    body = []
    for r in kernel.roots:
        idx = _epilogue_index(plan, kernel, element, r)
        v = em.value(r, idx)
        body += em.take() + [em.store(r, idx, v)]
    return body


def _chunk_epilogue(em: Emitter, plan: Plan, kernel: KernelPlan, batch: int, m: int, n: int, lanes: int) -> dict:
    """The wgmma epilogue's lines (_deferred_stores) for a chunk of `lanes` (8, 4 or 1:
    _epilogue_lanes) consecutive columns a thread: gn = gc + l
    (templates/matmul_wgmma.hip.j2)."""
    if lanes > 1:
        em.set_lanes(var("gn", n), var("gc", n), lanes)
    em.begin_block()
    element = add(mul(var("batch", batch), m * n), mul(var("gm", m), n), var("gn", n))
    return dict(_deferred_stores(em, kernel.roots, lambda r: _epilogue_index(plan, kernel, element, r),
                                 chunk_stores=True),
                lanes=lanes)


def _epilogue_index(plan: Plan, kernel: KernelPlan, element: Expr, root: int) -> tuple[Expr, ...]:
    """The index of root `root` at the element of C `element` (its linear index): C's
    own index in a root whose rows are C's padded at their end (fusion._epilogue_legal:
    the padding is neither written nor read)."""
    g = plan.graph
    space, shape = g.type(kernel.anchor).shape, g.type(root).shape
    return unravel(element, space if fusion.padded_row(shape, space) else shape)


def _epilogue_lanes(plan: Plan, kernel: KernelPlan, n: int, bn: int) -> int:
    """Consecutive columns a wgmma epilogue thread takes at a time: up to 16 bytes of each
    root, so that a warp's stores are contiguous (whole 32-byte sectors): 4 where a root is
    stored f32, else 8 (bf16); fewer where n is no multiple of that (a chunk would straddle
    the matrix's edge): 4, else 1. The tile's rows hold whole chunks (bn % 64 == 0)."""
    widest = 4 if any(plan.buffer_of(r).dtype == "f32" for r in kernel.roots) else 8
    assert bn % 64 == 0
    return next(lanes for lanes in (8, 4, 1) if lanes <= widest and n % lanes == 0)


def _deferred_stores(em: Emitter, roots: list[int], index_of, chunk_stores: bool = False) -> dict:
    """The lines of a loop over several elements a thread (u), each root's value kept in
    out<i>[u] between its loads and its stores, so that the loop issues all its loads
    before any store (which the compiler cannot move loads past: buffers may alias for
    all it knows): `body` computes them (after `chunk_loads`, the vector loads of a
    chunk's inputs where the emitter is in lanes: Emitter.set_lanes), `chunk_stores`
    store a chunk of a root at once (where `chunk_stores` allows: every chunk whole),
    `lane_stores` the other roots an element at a time; `out_types` the roots' C types.
    A root cast to bf16 and stored bf16 keeps its input's value: the store rounds it (the
    same bits, one conversion)."""
    g = em.graph
    body, chunked, by_lane, types = [], [], [], []
    for i, r in enumerate(roots):
        idx = index_of(r)
        rounded = g.op(r) == "cast" and g.type(r).dtype == "bf16" and em.plan.buffer_of(r).dtype == "bf16"
        v = em.value(g.inputs_of(r)[0] if rounded else r, idx)
        body += em.take() + [f"out{i}[u] = {v};"]
        chunk = em.store_chunk(r, idx, f"out{i} + c * {em.lanes[2]}") if em.lanes and chunk_stores else None
        if chunk:
            chunked.append(chunk)
        else:
            by_lane.append(em.store(r, idx, f"out{i}[u]"))
        types.append(C_TYPE[g.type(r).dtype])
    return dict(body=body, chunk_loads=em.chunk_lines, chunk_stores=chunked, lane_stores=by_lane, out_types=types)


def _matmul_io(plan: Plan, kernel: KernelPlan, em: Emitter, m: int, n: int, k: int, batch: int):
    """(batch_lines, loads, epilogue, strides) of a matmul kernel for the templates.
    Each operand is a buffer read through strided views (its batch offset from the
    batch index, the block's tile along z), or computed while loading it (a prologue,
    see planner/fusion.py gated_operand): a lambda of the element wanted. Either way
    the template's loads name the element by its row and column variables (gm, gk for
    A, gk, gn for B); the epilogue's lines compute the roots at (batch, gm, gn) from acc."""
    g = plan.graph
    a_in, b_in = g.inputs_of(kernel.anchor)
    batch_shape = g.type(kernel.anchor).shape[:-2]
    batch_idx = unravel(var("batch", batch), batch_shape)
    batch_lines, loads, prologues, strides_of = [], {}, [], {}
    for name, operand, axes in (("A", a_in, (("gm", m), ("gk", k))), ("B", b_in, (("gk", k), ("gn", n)))):
        base, offset, strides = _operand_layout(plan, operand)
        strides_of[name] = strides
        if base in kernel.nodes:
            prologues.append((name, operand, axes))
            continue
        batch_offset = add(offset, *[mul(z, s) for z, s in zip(batch_idx, strides[:-2])])
        ctype = STORAGE_TYPE[plan.buffer_of(base).dtype]
        batch_lines += [f"const idx_t {name.lower()}_base = {emit(batch_offset)};",
                        f"const {ctype}* {name} = {em.arg(base)} + {name.lower()}_base;"]
        at = add(mul(Var(axes[0][0]), strides[-2]), mul(Var(axes[1][0]), strides[-1]))
        loads[name] = f"bf16_to_float({name}[{emit(at)}])" if ctype == "bf16" else f"{name}[{emit(at)}]"
    body = _matmul_epilogue(em, plan, kernel, batch, m, n)
    for name, operand, axes in prologues:
        em.begin_block()
        v = em.value(operand, tuple(batch_idx) + tuple(var(x, size) for x, size in axes))
        batch_lines += [f"auto {name}_at = [&](idx_t {axes[0][0]}, idx_t {axes[1][0]}) -> float {{  "
                        f"// operand {name}, %{operand} computed here",
                        *[f"  {line}" for line in em.take()], f"  return {v};", "};"]
        loads[name] = f"{name}_at({axes[0][0]}, {axes[1][0]})"
    return batch_lines, loads, body, strides_of


# Matrix-vector products (a decode step's M = batch rows, templates/matmul_gemv.hip.j2):
# a tiled matmul would spend 32+ rows of each tile on M <= 8 and give a few dozen blocks.
# Instead each block takes GEMV_COLUMNS columns of C and GEMV_LANES threads split the
# sum along k for each: every weight is read once, by N / 8 blocks.
GEMV_MAX_M, GEMV_THREADS, GEMV_COLUMNS = 8, 256, 8
GEMV_LANES = GEMV_THREADS // GEMV_COLUMNS


def _gemv_shape(m: int, batch: int) -> bool:
    return m <= GEMV_MAX_M and batch == 1


def _gemv(plan: Plan, kernel: KernelPlan, ctx: dict, args: dict[int, str], m: int, n: int, k: int):
    em = Emitter(plan, kernel.nodes, {kernel.anchor: "acc"}, args)
    batch_lines, loads, body, strides = _matmul_io(plan, kernel, em, m, n, k, 1)
    # Consecutive threads along B's contiguous dimension: columns (8 x 4 bytes, a
    # sector, from 4 rows per warp) when B is laid out along n, else k (32 lanes of one
    # column, 128 bytes).
    b_sk, b_sn = strides["B"][-2:]
    ctx.update(template="matmul_gemv.hip.j2", m=m, n=n, k=k, columns=GEMV_COLUMNS, lanes=GEMV_LANES,
               k_fastest=b_sk == 1 and b_sn != 1, check_n=n % GEMV_COLUMNS != 0,
               halves=[GEMV_LANES >> r for r in range(1, GEMV_LANES.bit_length())],
               batch_lines=batch_lines, a_load=loads["A"], b_load=loads["B"], body=body,
               smem_floats=m * GEMV_THREADS)
    return (ceil_div(n, GEMV_COLUMNS), 1, 1), (GEMV_THREADS, 1, 1), em


def _tile_group(m: int, n: int) -> int:
    """Rows of tiles the blocks walk as a group, m fastest inside it
    (templates/matmul_tiles.hip.j2, which caps it at the rows there are): all of them
    where B (k x n) is over twice A (m x k), so the blocks in flight share B's panels
    and B is read from memory once while A stays in L2 (gpt2's lm_head: 1.79 -> 1.44
    ms, and its weight gradient); else 1, n fastest (B, the smaller, stays in L2).
    Groups of 4 to 32 measured slower than both on an H200 (benchmarks/results/
    h200x2-2026-11-30-5149e0a-tile-order)."""
    return m if n > 2 * m else 1


def _matmul(plan: Plan, kernel: KernelPlan, target: Target, ctx: dict, args: dict[int, str],
            threads: int | None = None, config: tuple | None = None, mma: tuple | None = None,
            group: int | None = None, tma: bool = True):
    m, n, k, batch = _mm_shape(plan, kernel)
    ctx.update(tile_group=group or _tile_group(m, n))
    if _gemv_shape(m, batch) and config is None and mma is None and threads in (None, GEMV_THREADS):
        return _gemv(plan, kernel, ctx, args, m, n, k)
    operands = _mma_operands(plan, kernel, target)
    if operands and config is None and (mma is not None or threads is None
                                        or any(_mma_threads(t, target) == threads for t in _mma_tiles(target))):
        return _matmul_mma(plan, kernel, target, ctx, args, operands, threads, mma, tma)
    em = Emitter(plan, kernel.nodes, {kernel.anchor: "acc"}, args)
    batch_lines, loads, body, strides_of = _matmul_io(plan, kernel, em, m, n, k, batch)
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
    # A 1-D grid: block_id runs over the tiles of a batch (in groups of rows of tiles,
    # templates/matmul_tiles.hip.j2), then the batch.
    grid = (ceil_div(n, bn) * ceil_div(m, bm) * batch, 1, 1)
    return grid, (threads, 1, 1), em


# Matrix units (templates/matmul_mma.hip.j2, matmul_wgmma.hip.j2). The fragment kind by
# target: "wgmma" is Hopper's warpgroup MMA (sm_90, compiled as sm_90a), "nv" mma.sync
# m16n8k16 (sm_80+), "mfma" the CDNA 32x32 MFMA (gfx908: the x4 form, gfx90a and gfx94x:
# x8 "_1k"). hiprtc aborts on an intrinsic its arch lacks, so this table, not a trial
# compile, decides. gfx1100's WMMA: ROCm 5.2's hiprtc cannot compile for gfx11 at all,
# so RDNA3 (and gfx906, gfx1030) stay on the SIMT template.
_MMA_FRAGMENTS = {"nv": (16, 8, 16), "wgmma": (64, 8, 16), "mfma": (32, 32, 8), "mfma_x4": (32, 32, 4)}
# (bm, bn, warps along m, warps along n) (wavefronts on AMD), and the relative rate of
# each: the fastest warp layout of each tile and the rates measured on an H200
# (2026-11-30, dev/kernel.py --family matmul_bf16 at 4096^3, 8192x2304x768 and
# 8192x768x768; benchmarks/results/h200-2026-11-30-mma-tiles.log). wgmma: a producer
# warpgroup (4 warps), and a consumer warpgroup per 64 rows of the tile; its rates the
# mean of the sweeps at 4096^3 and 8192x2304x768
# (benchmarks/results/h200x2-2026-11-30-b00cab9-wgmma/dev-kernel-matmul-bf16-7448038.txt);
# 128x192's (0.89 and 0.95 at 4 stages) from benchmarks/results/h200-2026-12-01-tile192. Its
# 96 tiles of 768x3072 fill 96 of an H200's 132 units where 128x256's 72 fill 72 (a weight
# gradient of the MLP: 82 -> 64 us), its 256 of 8192x768 two waves of 0.75 the work.
_MMA_TILES = ((128, 128, 2, 4), (128, 64, 2, 2), (64, 128, 2, 2), (64, 64, 2, 2))
_MMA_EFF = {(128, 128): 1.0, (128, 64): 0.95, (64, 128): 0.88, (64, 64): 0.8}
_WGMMA_TILES = ((128, 256, 12, 1), (128, 192, 12, 1), (128, 128, 12, 1), (64, 256, 8, 1), (64, 128, 8, 1), (64, 64, 8, 1))
_WGMMA_EFF = {(128, 256): 1.0, (128, 192): 0.92, (128, 128): 0.71, (64, 256): 0.77, (64, 128): 0.72, (64, 64): 0.58}
# From k = WGMMA_LONG_K on, a block streams its operands from L2 for most of its time and
# the narrow tiles (fewer FLOPs a byte of L2 traffic) fall further behind: the rates of
# gpt2's lm_head dX, 8192x768x50264 with B k-contiguous (benchmarks/results/
# h200x2-2026-11-30-5149e0a-tile-order; the codegen's 64x256 took 2.14 ms, 128x256 1.45);
# 128x192's from the same product with B n-contiguous (h200-2026-12-01-tile192: 0.88 ms
# against 128x256's 0.99).
WGMMA_LONG_K = 16384
_WGMMA_EFF_LONG_K = {(128, 256): 1.0, (128, 192): 0.85, (128, 128): 0.67, (64, 256): 0.52, (64, 128): 0.43, (64, 64): 0.34}
# Elements a consumer thread takes at a time in the wgmma epilogue: their loads are issued together,
# one round trip to memory a batch (16: the GELU backward waited on them 40% of its time; 32: half
# the trips, no spills; 64 spills. benchmarks/results/h200x2-2026-11-30-ed99e11-epilogue).
WGMMA_EPILOGUE_BATCH = 32


def _mma_kind(target: Target) -> str | None:
    if target.vendor == "nvidia":
        digits = re.sub(r"\D", "", target.arch)
        if digits[:2] == "90":
            return "wgmma"
        return "nv" if digits and int(digits[:2]) >= 80 else None
    if target.arch == "gfx908":
        return "mfma_x4"
    if target.arch == "gfx90a" or target.arch.startswith("gfx94"):
        return "mfma"
    return None


def _mma_sync(target: Target) -> bool:
    """mma.sync (with ldmatrix and cp.async) is there: sm_80 and later, Hopper too (the
    matrix-unit attention kernels run on it)."""
    return _mma_kind(target) in ("nv", "wgmma")


def _mma_tiles(target: Target) -> tuple:
    return _WGMMA_TILES if _mma_kind(target) == "wgmma" else _MMA_TILES


def _mma_bk(target: Target) -> int:
    """k of a pipeline stage: 64 for wgmma (one 128-byte swizzle atom of k), else 32."""
    return 64 if _mma_kind(target) == "wgmma" else 32


def _mma_threads(tile, target: Target) -> int:
    return tile[2] * tile[3] * target.wavefront


def _mma_operands(plan: Plan, kernel: KernelPlan, target: Target):
    """((buffer, offset, strides) of A, of B) when the matmul runs on the matrix units
    of `target`: two bf16 buffers read through strided views with a unit stride along
    one of the two matrix dimensions (not computed in the loads); else None."""
    if _mma_kind(target) is None:
        return None
    g = plan.graph
    result = []
    for operand in g.inputs_of(kernel.anchor):
        base, offset, strides = _operand_layout(plan, operand)
        if base in kernel.nodes or plan.buffer_of(base).dtype != "bf16" or 1 not in strides[-2:]:
            return None
        result.append((base, offset, strides))
    return tuple(result)


def _mma_smem_bytes(bm: int, bn: int, stages: int, target: Target) -> int:
    """A block's shared memory: its stages (wgmma's aligned to 1024 bytes within the pool,
    then two mbarriers a stage)."""
    wgmma = _mma_kind(target) == "wgmma"
    return stages * (bm + bn) * _mma_bk(target) * 2 + (1024 + 16 * stages if wgmma else 0)


def _mma_shared_limit(target: Target) -> int:
    """Shared memory a matrix-unit block may take: wgmma's stages are dynamic shared
    memory (opted in), the other templates' a static pool."""
    return target.max_shared if _mma_kind(target) == "wgmma" else target.shared_mem


def _mma_stages(bm: int, bn: int, target: Target) -> int:
    """Pipeline depth: as deep as shared memory allows, up to 4 (wgmma's 64x256: 5), at
    least 2. Without cp.async (AMD) copies are synchronous, so 2 (double buffering) is
    enough. wgmma's depths are the sweeps' (benchmarks/results/h200-2026-12-01-tile192,
    dev-kernel-sweeps.txt, 8 shapes): its TMA-fed pipelines gain nothing past 4 stages and
    64x128 and 128x192 lose (64x128 at 8192x768x3072: 68 us at 4, 87 at 5, 80 at 6), but
    64x256 was faster at 5 for 5 of the shapes (c_attn's weight gradient 46.7 us against 49.2)."""
    kind = _mma_kind(target)
    if kind not in ("nv", "wgmma"):
        return 2
    deepest = 5 if kind == "wgmma" and (bm, bn) == (64, 256) else 4
    return max(s for s in range(2, deepest + 1)
               if s == 2 or _mma_smem_bytes(bm, bn, s, target) <= _mma_shared_limit(target))


def _mma_legal(tile, target: Target, stages: int) -> bool:
    """The tile's warps cover whole fragments, and its stages fit in shared memory."""
    fm, fn, _ = _MMA_FRAGMENTS[_mma_kind(target)]
    bm, bn, wm, wn = tile
    fits = _mma_smem_bytes(bm, bn, stages, target) <= _mma_shared_limit(target)
    if _mma_kind(target) == "wgmma":  # a producer warpgroup, then one per 64 rows
        return fits and bm == 64 * (wm // 4 - 1) and wn == 1 and bn % fn == 0
    return fits and (bm // wm) % fm == 0 and (bn // wn) % fn == 0


def _mma_cost(m: int, n: int, k: int, batch: int, tile, target: Target) -> float:
    """Estimated time of the busiest compute unit: its tiles' products at the tile's
    relative rate, slowed when it holds fewer than two resident blocks (one block
    cannot hide its own latency; not so for wgmma, whose producer warpgroup and
    asynchronous MMAs keep one block's unit busy)."""
    units, smem_unit = _MM_UNITS.get(target.arch, (100, 65536))
    bm, bn = tile[:2]
    bk = _mma_bk(target)
    per_unit = ceil_div(ceil_div(m, bm) * ceil_div(n, bn) * batch, units)
    work = per_unit * bm * bn * max(1, ceil_div(k, bk)) * bk
    if _mma_kind(target) == "wgmma":
        return work / (_WGMMA_EFF_LONG_K if k >= WGMMA_LONG_K else _WGMMA_EFF)[(bm, bn)]
    resident = min(per_unit, smem_unit // _mma_smem_bytes(bm, bn, _mma_stages(bm, bn, target), target))
    return work / (_MMA_EFF[(bm, bn)] * min(resident, 2) / 2)


@functools.lru_cache(maxsize=4096)
def _mma_config(m: int, n: int, k: int, batch: int, target: Target,
                threads: int | None = None) -> tuple[int, int, int, int]:
    """The cheapest tile for a shape by _mma_cost (first of equals; cached), of
    `threads` threads if given (the parts of a batched launch share a block size)."""
    legal = [t for t in _mma_tiles(target) if _mma_legal(t, target, _mma_stages(t[0], t[1], target))
             and threads in (None, _mma_threads(t, target))]
    return min(legal, key=lambda tile: _mma_cost(m, n, k, batch, tile, target))


def _mma_variants(target: Target):
    """(bm, bn, warps_m, warps_n, stages, min_blocks) worth timing (the dev/ harness):
    4 or 8 warps, the deepest pipeline that fits, 8 warps with and without a register
    bound for 2 resident blocks (NVIDIA's __launch_bounds__ minimum); wgmma: each tile
    at 3 to 6 stages (a bound for 2 resident blocks measured no faster: benchmarks/results/
    h200x2-2026-12-01-458dba0-tma)."""
    fm, fn, _ = _MMA_FRAGMENTS[_mma_kind(target)]
    if _mma_kind(target) == "wgmma":
        for tile in _WGMMA_TILES:
            for stages in (3, 4, 5, 6):
                if _mma_legal(tile, target, stages):
                    yield (*tile, stages, 0)
        return
    for bm, bn in ((128, 128), (128, 64), (64, 128), (64, 64)):
        for wm, wn in ((2, 2), (2, 4), (4, 2)):
            if (bm // wm) % fm or (bn // wn) % fn:
                continue
            stages = _mma_stages(bm, bn, target)
            for min_blocks in ((0, 2) if _mma_kind(target) == "nv" and wm * wn == 8 else (0,)):
                yield bm, bn, wm, wn, stages, min_blocks


def _mma_vector(offset: int, strides: Sequence[int], contiguous: int) -> int:
    """bf16 per global -> shared copy: 8 (16 bytes) when every row (and batch) start is
    16-byte aligned (buffers are 256-byte aligned), else 4, 2 or 1."""
    others = [s for i, s in enumerate(strides) if i != contiguous] + [offset]
    return next(v for v in (8, 4, 2, 1) if all(x % v == 0 for x in others))


def _tensor_map(base: int, offset: int, strides: Sequence[int], batch_idx, batch_shape, kc: bool,
                k_axis: int, mn_axis: int, k: int, mn_ext: int, rows: int):
    """(map, batch coordinates) of a wgmma operand whose rows and batches are 16-byte
    aligned, staged by TMA, or None where TMA cannot read it: more dimensions than a
    tensor map names. The map's dims: the contiguous axis (k or m/n), the other, then
    the batch axes that move the operand (stride 0 or extent 1 ones are left out); its
    box: 64 elements (one 128-byte swizzle atom) by the tile's rows (k-contiguous) or
    64 k (m/n-contiguous: one box an atom of 64 columns). Not for rows broadcast along the
    other matrix axis (stride 0)."""
    batch = [(z, size, st) for z, size, st in zip(batch_idx, batch_shape, strides[:-2]) if st and size > 1]
    if 2 + len(batch) > TMA_MAX_RANK:
        return None
    inner, outer = (k, mn_ext) if kc else (mn_ext, k)
    dims = (inner, outer, *[size for _, size, _ in batch])
    map_strides = (strides[mn_axis] if kc else strides[k_axis], *[st for _, _, st in batch])
    if not map_strides[0]:  # rows broadcast along m or n: cp.async reads them (a map's strides are not 0)
        return None
    box = (64, rows if kc else 64, *[1] * len(batch))
    return TensorMap(base, offset, dims, map_strides, box), [emit(z) for z, _, _ in batch]


def _matmul_mma(plan: Plan, kernel: KernelPlan, target: Target, ctx: dict, args: dict[int, str], operands,
                threads: int | None = None, tuning: tuple | None = None, tma: bool = True):
    """A bf16 x bf16 matmul on the matrix units (templates/matmul_wgmma.hip.j2 on sm_90,
    else templates/matmul_mma.hip.j2): the same epilogue and batch handling as the SIMT
    template, operands copied to shared memory in their own layout (either dimension
    contiguous). wgmma stages each operand by TMA where a tensor map can describe it
    (`tma` False: never, the dev/ harness's comparison), else by cp.async."""
    g = plan.graph
    mm = kernel.anchor
    out_shape = g.type(mm).shape
    batch_shape, (m, n) = out_shape[:-2], out_shape[-2:]
    k = g.type(g.inputs_of(mm)[0]).shape[-1]
    em = Emitter(plan, kernel.nodes, {mm: "acc"}, args)
    batch = max(1, _size(batch_shape))
    batch_idx = unravel(var("batch", batch), batch_shape)
    kind = _mma_kind(target)
    fm, fn, fk = _MMA_FRAGMENTS[kind]
    bm, bn, warps_m, warps_n = tuning[:4] if tuning else _mma_config(m, n, k, batch, target, threads)
    stages = tuning[4] if tuning else _mma_stages(bm, bn, target)
    bk = _mma_bk(target)
    min_blocks = tuning[5] if tuning else 0
    threads = warps_m * warps_n * target.wavefront
    batch_lines, ops, smem_off = [], [], 0
    for name, (base, offset, strides), mn, mn_tile, mn0, mn_ext in (
            ("A", operands[0], "m", bm, "m0", m), ("B", operands[1], "n", bn, "n0", n)):
        # A is (.., m, k), B (.., k, n): the k axis of each, and whether it is contiguous
        k_axis = len(strides) - (1 if name == "A" else 2)
        mn_axis = len(strides) - (2 if name == "A" else 1)
        kc = strides[k_axis] == 1
        contiguous = k_axis if kc else mn_axis
        rows, width = (mn_tile, bk) if kc else (bk, mn_tile)
        vec = _mma_vector(offset, strides, contiguous)
        staged = (_tensor_map(base, offset, strides, batch_idx, batch_shape, kc, k_axis, mn_axis, k, mn_ext, rows)
                  if kind == "wgmma" and tma and vec == 8 else None)
        if staged:
            tensor_map, batch_coords = staged
            ops.append(dict(name=name, kc=kc, rows=rows, width=width, smem_off=smem_off, tma=True,
                            map=args.setdefault(tensor_map, names.arg(len(args))), rank=len(tensor_map.dims),
                            boxes=width // 64, batch_coords=batch_coords,
                            coords=("(int)(KT) * 64", mn0) if kc else
                            (f"(int){mn0}" + (" + a * 64" if width > 64 else ""), "(int)(KT) * 64")))
            smem_off += rows * width
            continue
        batch_offset = add(offset, *[mul(z, st) for z, st in zip(batch_idx, strides[:-2])])
        batch_lines += [f"const idx_t {name.lower()}_base = {emit(batch_offset)};",
                        f"const unsigned short* const {name} = "
                        f"reinterpret_cast<const unsigned short*>({em.arg(base)}) + {name.lower()}_base;"]
        # wgmma's producer copies 8 bf16 a thread-step whatever the alignment (gptc_copy_chunk8
        # where it is under 16 bytes): its 128 threads alone stage every operand
        step = 8 if kind == "wgmma" else vec
        copier = f"gptc_copy_chunk8<{vec}>" if step > vec else f"gptc_copy_async<{vec}>"
        chunks = rows * width // step
        loaders = 128 if kind == "wgmma" else threads  # wgmma: the producer warpgroup
        # stage_whole (wgmma) wants a thread's chunks whole rows apart: the loaders a multiple of a row's chunks
        row_step = loaders // (width // step) if loaders % (width // step) == 0 else 0
        slab = f"(idx_t)(KT) * {bk}"
        ops.append(dict(name=name, kc=kc, mn=mn, rows=rows, width=width, vec=vec, step=step, copier=copier, ptr=name,
                        atoms=kind == "wgmma", tma=False,
                        rd=(max(1, 8 // (width // 8))).bit_length() - 1, rm=min(width // 8, 8) - 1,
                        smem_off=smem_off,
                        chunks=chunks, loops=ceil_div(chunks, loaders), row_step=row_step,
                        outer0=mn0 if kc else slab, inner0=slab if kc else mn0,
                        outer_ext=mn_ext if kc else k, inner_ext=k if kc else mn_ext,
                        outer_stride=strides[mn_axis] if kc else strides[k_axis]))
        smem_off += rows * width
    if kind == "wgmma":
        epilogue = _chunk_epilogue(em, plan, kernel, batch, m, n, _epilogue_lanes(plan, kernel, n, bn))
        body = epilogue.pop("body")
        ctx.update(epilogue)
    else:
        body = _matmul_epilogue(em, plan, kernel, batch, m, n)
    common = dict(m=m, n=n, k=k, batch=batch, bm=bm, bn=bn, stages=stages, stage_elems=smem_off,
                  k_tiles=ceil_div(k, bk), ops=ops, batch_lines=batch_lines, body=body,
                  check_m=m % bm != 0, check_n=n % bn != 0, n_tiles=ceil_div(n, bn), m_tiles=ceil_div(m, bm),
                  smem_floats=_mma_smem_bytes(bm, bn, stages, target) // 4)
    if kind == "wgmma":
        # the epilogue stages each consumer's 64 rows of f32 through the (then free) stages
        assert 2 * smem_off * stages >= (warps_m // 4 - 1) * 64 * (bn + 8) * 4, "the epilogue's rows fit in the stages"
        ctx.update(template="matmul_wgmma.hip.j2", wgs=warps_m // 4 - 1, loaders=128, epilogue_batch=WGMMA_EPILOGUE_BATCH,
                   all_tma=all(op["tma"] for op in ops),
                   tma_bytes=sum(2 * op["rows"] * op["width"] for op in ops if op["tma"]), **common)
        return (ceil_div(n, bn) * ceil_div(m, bm) * batch, 1, 1), (threads, 1, 1), em
    wtm, wtn = bm // warps_m, bn // warps_n
    assert kind != "nv" or (wtn // fn) % 2 == 0, "B fragments are loaded in pairs (ldmatrix .x4)"
    ctx.update(template="matmul_mma.hip.j2", frag="nv" if kind == "nv" else "mfma", bk=bk, fm=fm, fn=fn, fk=fk,
               warps_m=warps_m, warps_n=warps_n, wtm=wtm, wtn=wtn, mi=wtm // fm, ni=wtn // fn,
               wave=target.wavefront, min_blocks=min_blocks if kind == "nv" else 0, loaders=threads, **common)
    return (ceil_div(n, bn) * ceil_div(m, bm) * batch, 1, 1), (threads, 1, 1), em


def _operand_access(em: Emitter, plan: Plan, nid: int, indices: Sequence[str]) -> str:
    """A C expression loading the element of operand `nid` (a strided view of a buffer)
    at the C index expressions `indices`, as a float (int for i32)."""
    buf, offset, strides = _operand_layout(plan, nid)
    paren = lambda i: i if re.fullmatch(r"\w+", i) else f"({i})"  # noqa: E731
    terms = ([str(offset)] if offset else []) + [f"{paren(i)} * {st}" if st != 1 else paren(i)
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


SAMPLE_THREADS = 256


def _sample(plan: Plan, kernel: KernelPlan, ctx: dict, args: dict[int, str]):
    """sample_tokens (ops/sample.py): a block per row; radix selections (histograms of
    8 bits at a time, of counts for top-k and of masses for top-p) instead of a sort,
    then the draw placed by contiguous per-thread segments of the row. About 13
    passes over the row when sampling, 1 when greedy."""
    g = plan.graph
    node = kernel.anchor
    logits, seen, settings, ints, index, sequence = g.inputs_of(node)
    em = Emitter(plan, kernel.nodes, args=args)
    rows, vocab = g.type(logits).shape
    ctx.update(rows=rows, vocab=vocab, stream=STREAM, out=em.arg(node),
               logit_at=_operand_access(em, plan, logits, ["row", "i"]),
               seen_at=_operand_access(em, plan, seen, ["row", "i"]),
               settings=[_operand_access(em, plan, settings, [str(j)]) for j in range(g.type(settings).shape[0])],
               ints=[_operand_access(em, plan, ints, [str(j)]) for j in range(g.type(ints).shape[0])],
               index_at=_operand_access(em, plan, index, ["row"]),
               sequence_at=_operand_access(em, plan, sequence, ["row"]))
    return (min(rows, MAX_GRID), 1, 1), (SAMPLE_THREADS, 1, 1), em


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


DECODE_THREADS = 128
DECODE_LANE_DIMS = 16


def _strided_at(em: Emitter, plan: Plan, nid: int, index: Sequence[tuple[str, int]]) -> str:
    """The element of operand `nid` (a strided view of a buffer) at `index`: per axis the
    C variable and its bound (bound 1: the only index is 0), as a float (int for i32)."""
    buf, offset, strides = _operand_layout(plan, nid)
    at = add(offset, *[mul(var(name, bound), st) for (name, bound), st in zip(index, strides)])
    raw = f"{em.arg(buf)}[{emit(at)}]"
    return f"bf16_to_float({raw})" if plan.buffer_of(buf).dtype == "bf16" else raw


def _decode(plan: Plan, kernel: KernelPlan, target: Target, ctx: dict, args: dict[int, str], tuning: dict):
    """The KV-cache decode's kernels (ops/decode.py), each reading its operands as
    strided views of buffers:
    kv_write: a thread per element of the new rows (B, Hkv, 1, D), stored at row pos[b]
    of the cache (the state's own buffer; nothing else of it is touched);
    decode_attention: a block per (sequence, head, chunk of keys); groups of a few lanes
    take the chunk's visible keys in turn (a group per key: its lanes split head_dim, a
    shuffle sum gives the score) with an online softmax each, then the block merges them and
    stores [sum e v, m, l] (one chunk: the output itself, sum e v / l). Chunks past
    pos[b] (or before the window) return at once and store nothing: the combine never
    reads them;
    decode_combine: a thread per output element, over the chunks holding visible keys."""
    g = plan.graph
    node = kernel.anchor
    em = Emitter(plan, kernel.nodes, args=args)
    out_bf16 = plan.buffer_of(node).dtype == "bf16"
    ctx.update(out=em.arg(node), store=(lambda v: f"float_to_bf16({v})") if out_bf16 else (lambda v: v))
    threads = tuning.get("threads", DECODE_THREADS)
    if g.op(node) == "kv_write":
        _, value, pos = g.inputs_of(node)
        batch, heads, seq, dim = g.type(node).shape
        count = batch * heads * dim
        ctx.update(count=count, heads=heads, seq=seq, dim=dim,
                   value_at=_strided_at(em, plan, value, [("b", batch), ("h", heads), ("0", 1), ("d", dim)]),
                   pos_at=_strided_at(em, plan, pos, [("b", batch)]))
        return _grid_1d(count, threads), (threads, 1, 1), em
    attrs = g.node(node)["attrs"]
    if g.op(node) == "decode_attention":
        q, k, v, pos = g.inputs_of(node)[:4]
        batch, heads, splits = *g.type(node).shape[:2], attrs["splits"]
        kv_heads, seq, dim = g.type(k).shape[1:]
        wave = target.wavefront
        # Lanes per key: a power of two giving each lane at most DECODE_LANE_DIMS dimensions
        # (64 -> 4 lanes), so that a warp holds several keys at once.
        lanes = min(wave, 1 << max(0, ceil_div(dim, DECODE_LANE_DIMS) - 1).bit_length())
        # The streaming cache: slots' positions from the new key's slot; keys before RoPE.
        sink, dims = attrs.get("sink", 0), attrs.get("rope_dims", 0)
        kv_index = [("b", batch), ("hk", kv_heads), ("j", seq)]
        ctx.update(sink=sink, ring=seq - sink, rope_dims=dims, half=dims // 2,
                   slot_at=_strided_at(em, plan, g.inputs_of(node)[4], [("b", batch)]) if sink else "",
                   k_pair_at=_strided_at(em, plan, k, kv_index + [("cp", dim)]) if dims else "",
                   freq=c_literal(-2.0 * math.log(attrs["rope_base"]) / dims, "f32") if dims else "")
        ctx.update(heads=heads, group=heads // kv_heads, seq=seq, dim=dim, splits=splits, whole="dtype" in attrs,
                   chunk=chunk_of(seq, splits), window=attrs["window"], scale=c_literal(attrs["scale"], "f32"),
                   wave=wave, lanes=lanes, groups=threads // lanes, dt=ceil_div(dim, lanes),
                   dp=ceil_div(dim, lanes) * lanes, shuffles=[lanes >> r for r in range(1, lanes.bit_length())],
                   q_at=_strided_at(em, plan, q, [("b", batch), ("h", heads), ("0", 1), ("c", dim)]),
                   k_at=_strided_at(em, plan, k, [("b", batch), ("hk", kv_heads), ("j", seq), ("c", dim)]),
                   v_at=_strided_at(em, plan, v, [("b", batch), ("hk", kv_heads), ("j", seq), ("c", dim)]),
                   pos_at=_strided_at(em, plan, pos, [("b", batch)]))
        return (batch * heads * splits, 1, 1), (threads, 1, 1), em
    partial, pos = g.inputs_of(node)
    batch, heads, splits, width = g.type(partial).shape
    count = batch * heads * (width - 2)
    ctx.update(count=count, heads=heads, dim=width - 2, seq=attrs["seq"], splits=splits,
               chunk=chunk_of(attrs["seq"], splits), window=attrs["window"], partial=em.arg(partial),
               pos_at=_strided_at(em, plan, pos, [("b", batch)]))
    return _grid_1d(count, threads), (threads, 1, 1), em


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


def _attention_bwd_layout(dp: int, bt: int) -> dict[str, int]:
    """Byte offsets in the pool of the matrix-unit attention backward (head_dim padded
    to dp, tiles of bt rows; bf16 rows of dp + 8, f32 rows of dp + 8: ldmatrix's and the
    row statistics' reads spread over the banks). Both halves start with their own 64
    rows A0, A1 (bf16). Keys half: two buffers of the query tiles (Q, dO, O, m and l),
    then St (lse2, delta a query). Queries half: the block's O, m and l, two buffers of
    the key tiles (K, V), St."""
    own, tile, o_rows = 64 * (dp + 8) * 2, bt * (dp + 8) * 2, (dp + 8) * 4
    kstride = 2 * tile + bt * o_rows + 2 * bt * 4
    qo = 2 * own
    qml = qo + 64 * o_rows
    qbuf = qml + 2 * 64 * 4
    layout = dict(a1=own, t1=tile, o=2 * tile, ml=2 * tile + bt * o_rows, kbuf=2 * own, kstride=kstride,
                  kst=2 * own + 2 * kstride, qo=qo, qml=qml, qbuf=qbuf, qstride=2 * tile, qst=qbuf + 4 * tile)
    layout["bytes"] = max(layout["kst"] + bt * 8, layout["qst"] + 64 * 8)
    return layout


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
               scale=repr(float(a.scale)) + "f", window=a.window, batch_lines=batch_lines, bf16=a.bf16,
               rnd=lambda x: f"bf16_to_float(float_to_bf16({x}))" if a.bf16 else x)
    # bf16 (a.bf16): the operands are bf16 buffers, read as floats; P and dS are rounded
    # to bf16 where the graph casts them (rnd), the rest (scores, softmax statistics,
    # accumulators) is fp32. The backward's delta_i = dO_i·O_i = sum_j round(P_ij) dP_ij
    # while the graph's softmax VJP sums P_ij dP_ij with P unrounded: the two differ by
    # bf16 rounding of P (relative 2^-9 a term, averaging out over j), the same order as
    # the rounding of dS itself, so the reference stays the kernels' oracle within bf16
    # tolerance (and delta needs neither P nor a second pass over the keys).

    def operand(name: str, nid: int, transpose: bool = False) -> None:
        if g.view_base(nid) in a.prologue:
            prologue_operand(name, nid, transpose)
            return
        buf, offset, strides = _operand_layout(plan, nid)
        if transpose:
            strides = strides[:-2] + [strides[-1], strides[-2]]
        base = add(offset, *[mul(zi, st) for zi, st in zip(z, strides[:-2])])
        batch_lines.append(f"const idx_t {name}_base = {emit(base)};")
        ctx.update({name: em.arg(buf), f"{name}_s": strides[-2], f"{name}_d": strides[-1]})
        at = f"{em.arg(buf)}[{name}_base + {rows[name]} * {strides[-2]} + c * {strides[-1]}]"
        bf16 = plan.buffer_of(buf).dtype == "bf16"
        ctx[f"{name}_at"] = f"bf16_to_float({at})" if bf16 else at
        # Whole 16-byte rows of 8 bf16 for the matrix-unit kernels' staging: head_dim
        # contiguous, every other stride and the offset multiples of 8 (buffers start
        # 256-byte aligned).
        ctx["addr"][name] = at
        aligned[name] = bf16 and strides[-1] == 1 and offset % 8 == 0 and all(st % 8 == 0 for st in strides[:-1])

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
    ctx.update(addr={})
    aligned: dict[str, bool] = {}
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
    def stored_at(name: str, place: tuple[int, list[int]], row: str, transposed: bool = False) -> tuple[str, bool]:
        """The index of element (row, c) of a per-head output stored at `place` (offset,
        strides over its (.., S, D) axes, or (.., D, S) `transposed`) in its buffer, whose
        base the batch lines compute; and whether columns c, c + 1 (c even) lie side by
        side at an even element, so one store takes both (gptc_store_pair)."""
        offset, strides = place
        batch_lines.append(f"const idx_t {name}_base = {emit(add(offset, *[mul(zi, st) for zi, st in zip(z, strides[:-2])]))};")
        first, second = ("c", row) if transposed else (row, "c")
        column, other = (strides[-2], strides[-1]) if transposed else (strides[-1], strides[-2])
        pair = column == 1 and dim % 2 == 0 and all(x % 2 == 0 for x in [offset, *strides[:-2], other])
        return f"{name}_base + {first} * {strides[-2]} + {second} * {strides[-1]}", pair

    env = _environment()
    log2_scale = repr(float(a.scale) * math.log2(math.e)) + "f"  # the matrix-unit kernels' scores in log2 units (exp2)
    if kernel.family == "attention":
        stats = a.m in kernel.roots
        ctx.update(out=em.arg(a.out), store_stats=stats, copy=None, pair=dim % 2 == 0)
        if a.copy is not None:  # out's bf16 copy too, at out's place in it (planner/attention.py)
            at, pair = stored_at("copy", a.copy_place, "i")
            ctx.update(copy=dict(ptr=em.arg(a.copy), at=at), pair=pair)
        if stats:
            ctx.update(m_ptr=em.arg(a.m), s_ptr=em.arg(a.s))
        if a.bf16 and not a.prologue and _mma_sync(target):
            # On the matrix units (attention_mma.hip.j2): 64 queries a block (16 a warp);
            # double-buffered key tiles of 64, 32 above head_dim 64 (the registers of S),
            # in the launch's pool (dynamic beyond 48 KiB).
            dp16 = ceil_div(dim, 16) * 16
            bk = 64 if dp16 <= 64 else 32
            ctx.update(dp=dp16, ld=dp16 + 8, bq=64, bk=bk, nqb=ceil_div(seq, 64), scale2=log2_scale,
                       vec=8 if dim % 8 == 0 and all(aligned[n] for n in "qkv") else 1)
            return _Part(kernel.name, env.get_template("attention_mma.hip.j2").render(**ctx),
                         (bhn * ceil_div(seq, 64), 1, 1), (128, 1, 1), pool_floats=(64 + 4 * bk) * (dp16 + 8) // 2,
                         mma=True)
        return _Part(kernel.name, env.get_template("attention.hip.j2").render(**ctx), (bhn * nqb, 1, 1), (128, 1, 1))
    operand("g", a.d_out)  # the gradient of out
    dq, dk, dv = a.gradients()
    ctx.update(out=em.arg(a.out), m_ptr=em.arg(a.m), s_ptr=em.arg(a.s), dk_transposed=dk == a.dk_t,
               store=lambda x: f"float_to_bf16({x})" if a.concat is not None and plan.buffer_of(a.concat).dtype == "bf16" else x)
    grads = {}  # name -> where the kernels store it: ptr, at (element c), pair (two columns a store)
    if group > 1:  # dK, dV summed over the group: (.., Hkv, 1, S, D) at key/value head bhk
        for name, node, at in (("dq", dq, f"o_base + i * {dim} + c"), ("dk", dk, f"kv_base + j * {dim} + c"),
                               ("dv", dv, f"kv_base + j * {dim} + c")):
            grads[name] = dict(ptr=em.arg(node), at=at, pair=dim % 2 == 0)
    for name, node, row in (("dq", dq, "i"), ("dk", dk, "j"), ("dv", dv, "j")) if group == 1 else ():
        # Each gradient per head, in its own buffer or at its place in the concatenation the
        # kernel stores instead (planner/attention.py); dK as dkᵀ, (.., D, S), unless
        # planning transposed that product (planner.transpose_products).
        buffer, place = (a.concat, a.places[node]) if a.concat is not None else (node, (0, contiguous(g.type(node).shape)))
        at, pair = stored_at(name, place, row, transposed=node == a.dk_t)
        grads[name] = dict(ptr=em.arg(buffer), at=at, pair=pair)
    ctx["grads"] = grads
    if a.bf16 and not a.prologue and _mma_sync(target):
        # On the matrix units (attention_mma_bwd.hip.j2): 64 keys (dK, dV) or 64 queries
        # (dQ) a block, the other side in double-buffered tiles of 64 (16 above head_dim
        # 64: the registers of dK and dV), in the launch's pool (dynamic beyond 48 KiB).
        assert plan.buffer_of(_operand_layout(plan, a.out)[0]).dtype == "f32", "the flash backward reads O in f32"
        dp16 = ceil_div(dim, 16) * 16
        blocks = ceil_div(seq, 64)
        bt = 64 if dp16 <= 64 else 16
        sm = _attention_bwd_layout(dp16, bt)
        assert sm["bytes"] <= target.max_shared, f"the flash backward's tiles exceed the shared memory of {target.name}"
        ctx.update(dp=dp16, ld=dp16 + 8, ldo=dp16 + 8, bt=bt, sm=sm, kb_blocks=bhn // group * blocks, nqb=blocks,
                   scale2=log2_scale, vo=4 if dim % 4 == 0 else 1,
                   vec=8 if dim % 8 == 0 and all(aligned[n] for n in "qkvg") else 1)
        return _Part(f"{kernel.name} keys+queries", env.get_template("attention_mma_bwd.hip.j2").render(**ctx),
                     (bhn // group * blocks + bhn * blocks, 1, 1), (128, 1, 1), pool_floats=sm["bytes"] // 4, mma=True)
    # attention_dkdv.hip.j2 is the whole backward body; it includes attention_dq.hip.j2
    # for the queries half.
    return _Part(f"{kernel.name} keys+queries", env.get_template("attention_dkdv.hip.j2").render(**ctx),
                 (bhn // group * nkb + bhn * nqb, 1, 1), (128, 1, 1))


def tunings(plan: Plan, kernel: KernelPlan, target: Target) -> list[dict]:
    """The alternatives to the codegen's choice of block size or tile for `kernel`, as
    `tuning` overrides for render_launch (the dev/ harness times them): pointwise and
    scatter block sizes, threads per row, a row kernel's unrolling (elements a thread
    a step of its loops) and its chunks (one element a thread-step, 4, 8), a thread or a
    block per reduced output, the matmul configurations the target admits (attention
    tiles are fixed)."""
    g = plan.graph
    wave = target.wavefront
    if kernel.family in ("pointwise", "scatter", "kv_write", "decode_attention", "decode_combine"):
        # (decode_attention merges up to DECODE_LANE_DIMS floats a thread in static shared memory)
        floats = DECODE_LANE_DIMS if kernel.family == "decode_attention" else 0
        return [{"threads": t} for t in (64, 128, 256, 512, 1024)
                if t % wave == 0 and t * floats * 4 < target.shared_mem]
    if kernel.family == "row":
        tprs = [{"tpr": t} for t in (wave, 128, 256, 512, 1024) if t >= wave and t % wave == 0]
        lanes = _row_lanes(plan, kernel)
        return (tprs + [{"unroll": u} for u in (1, 2, 8, 16) if u != ROW_UNROLL]
                + [{"lanes": n} for n in (1, 4, 8) if n != lanes])
    if kernel.family == "reduce":
        axes = g.node(kernel.anchor)["attrs"]["axes"]
        return [{"thread_per_output": False}] + ([{"thread_per_output": True}] if axes == tuple(range(len(axes))) else [])
    if kernel.family == "matmul":
        mma = [{"mma": t} for t in _mma_variants(target)] if _mma_operands(plan, kernel, target) else []
        if mma and _mma_kind(target) == "wgmma":
            mma.insert(0, {"tma": False})  # the codegen's tile, its operands staged by cp.async
        return mma + [{"matmul": cfg} for cfg in _mm_menu(target)]
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
