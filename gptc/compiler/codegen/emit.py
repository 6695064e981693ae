"""Expression emission: the C code that computes one graph node at one index.

Values are computed in float (bf16 is converted on load and store), int or bool.
Inside a kernel, a node it computes is emitted as a statement into the current block
(`float v12 = ...;  // %12 mul h.0/gelu`), cached by (node, index) so a value used
twice is computed once; views become index arithmetic (simplified expressions, see
symbolic.py); nodes stored by other kernels and sources become loads from their
buffers, cached by (buffer, offset): an element is loaded once per block, however many
nodes or views read it."""
from __future__ import annotations

import math
import re

from gptc.compiler.codegen import names
from gptc.compiler.codegen.indexing import Index, linearize, view_index
from gptc.compiler.codegen.symbolic import (ZERO, Expr, Var, add, atom, bounds, emit, in_range, lane_base, maximum,
                                            minimum, variables)
from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import ELEMENTWISE, GATHER, VIEW
from gptc.compiler.planner.schedule import Buffer, Plan

C_TYPE = {"f32": "float", "bf16": "float", "f64": "double", "i32": "int", "bool": "bool"}
STORAGE_TYPE = {"f32": "float", "bf16": "bf16", "f64": "double", "i32": "int", "bool": "bool"}


def c_literal(value: float, dtype: str) -> str:
    if dtype in ("i32",):
        return str(int(value))
    if dtype == "bool":
        return "true" if value else "false"
    if math.isinf(value):
        return "INFINITY" if value > 0 else "(-INFINITY)"
    if math.isnan(value):
        return "NAN"
    return f"{float(value)!r}f".replace("inf", "INFINITY")


class Emitter:
    def __init__(self, plan: Plan, nodes: list[int], special: dict[int, str] | None = None,
                 args: dict[int, str] | None = None, exp: str = "expf") -> None:
        self.plan = plan
        self.exp = exp  # the C function computing exp (a row kernel of bf16 rows takes __expf)
        self.graph: Graph = plan.graph
        self.nodes = set(nodes)
        # Nodes whose value is a variable of the template: the matmul accumulator, the
        # result of a row reduction.
        self.special = dict(special or {})
        self.lines: list[str] = []
        self.cache: dict[tuple[int, Index, str | None], str] = {}
        self.loads: dict[tuple[int, Expr, str | None], str] = {}
        # Inside a pad, the condition under which its source is read at all: loads there
        # read nothing elsewhere (a concatenation by pads reads each element once).
        self.guard: str | None = None
        self.counter = 0
        # buffer node -> kernel parameter (a placeholder, see names.py), in order of
        # first use (shared by the kernels batched into one launch)
        self.args: dict[int, str] = {} if args is None else args
        # Lanes (set_lanes): the element variable, the chunk variable and the lanes a chunk;
        # the chunk's vector loads, hoisted out of the lane loop (chunk_lines), by (buffer, offset).
        self.lanes: tuple[Var, Var, int] | None = None
        # an access that moves with the lane but is not a chunk's (each lane's element
        # alone, `width` elements apart across a warp): set_lanes did not pay for it
        self.scattered = False
        self.chunk_lines: list[str] = []
        self.chunk_loads: dict[tuple[int, Expr], str] = {}

    def set_lanes(self, lane: Var, chunk: Var, width: int) -> None:
        """Values are computed for one lane `lane` = `chunk` + l (0 <= l < width (4 or 8),
        the C variable l) of a chunk of `width` consecutive elements along `lane`: a load
        whose offset moves with the lane one element at a time reads the chunk's
        elements at once (gptc_load4/8 in templates/prelude.h: buffers are 256-byte
        aligned) in a line of chunk_lines, and the lane takes its element."""
        # a chunk starts at a multiple of width: its bound says so (the last chunk's start)
        self.lanes = (lane, Var(chunk.name, (lane.bound - 1) // width * width + 1), width)

    # ----- blocks -------------------------------------------------------------
    def begin_block(self) -> None:
        """Start a fresh block of statements (a loop body): cached values from other
        blocks are not visible in it."""
        self.lines = []
        self.cache = {}
        self.loads = {}
        self.chunk_lines = []
        self.chunk_loads = {}

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    # ----- buffers ------------------------------------------------------------
    def arg(self, nid: int) -> str:
        buf = self.plan.buffer_of(nid)
        return self.args.setdefault(buf.node, names.arg(len(self.args)))

    def offset(self, nid: int, index: Index) -> Expr:
        buf = self.plan.buffer_of(nid)
        return linearize(index, buf.shape) if buf.shape else ZERO

    def load(self, nid: int, index: Index) -> str:
        """The local holding the element of `nid`'s buffer at `index` (loaded once, or
        once under each pad's condition: see `guard`)."""
        buf = self.plan.buffer_of(nid)
        key = (buf.node, self.offset(nid, index), self.guard)
        if key not in self.loads:
            chunk = self.chunk_offset(key[1], buf) if buf.dtype in ("f32", "bf16") else None
            self.scattered |= chunk is None and self._moves(key[1])
            if chunk is not None:
                raw = f"{self._chunk_load(nid, chunk)}.v[l]"
            else:
                raw = f"{self.arg(nid)}[{emit(key[1])}]"
                raw = f"bf16_to_float({raw})" if buf.dtype == "bf16" else raw
            if self.guard is not None:
                raw = f"{self.guard} ? {raw} : {c_literal(0, buf.dtype)}"
            self.loads[key] = self._local(nid, raw)
        return self.loads[key]

    def chunk_offset(self, offset: Expr, buf: Buffer, whole: bool = False) -> Expr | None:
        """The offset of the chunk's first element in `buf`, where `offset` moves with the
        lane one element at a time from an aligned chunk start and every chunk starts
        inside the buffer (`whole`: lies inside it; a chunk that starts inside lies in the
        buffer's 16-byte-aligned slot all the same: buffers are 256-byte aligned, their sizes
        rounded up), else None: not in lanes, or it depends on a value the lane computes
        (a gathered row, `(idx_t)v4`)."""
        if self.lanes is None or any(not re.fullmatch(r"\w+", v.name) for v in variables(offset)):
            return None
        chunk = lane_base(offset, *self.lanes)
        lo, hi = bounds(chunk) if chunk is not None else (None, None)
        if lo is None or hi is None or lo < 0 or hi + (self.lanes[2] if whole else 1) > math.prod(buf.shape):
            return None
        return chunk

    def _moves(self, offset: Expr) -> bool:
        return self.lanes is not None and self.lanes[0].name in {v.name for v in variables(offset)}

    def _chunk_load(self, nid: int, offset: Expr) -> str:
        buf = self.plan.buffer_of(nid)
        key = (buf.node, offset)
        if key not in self.chunk_loads:
            name = self.chunk_loads[key] = f"w{len(self.chunk_loads)}"
            node = self.graph.node(buf.node)
            width = self.lanes[2]
            self.chunk_lines.append(f"const gptc_lanes{width} {name} = gptc_load{width}({self.arg(nid)} + {atom(offset)});"
                                    f"  // %{buf.node} {node['op']} {node['scope']}".rstrip())
        return self.chunk_loads[key]

    def store(self, nid: int, index: Index, value: str) -> str:
        buf = self.plan.buffer_of(nid)
        if buf.dtype == "bf16":
            value = f"float_to_bf16({value})"
        return f"{self.arg(nid)}[{emit(self.offset(nid, index))}] = {value};"

    def store_chunk(self, nid: int, index: Index, values: str) -> str | None:
        """The line storing the chunk's values (`values`: a float* to its lanes' values)
        at once where the lane's offset moves one element at a time and the chunk lies in
        the buffer (see set_lanes), else None (store each lane's value)."""
        buf = self.plan.buffer_of(nid)
        offset = self.offset(nid, index)
        chunk = self.chunk_offset(offset, buf, whole=True) if buf.dtype in ("f32", "bf16") else None
        self.scattered |= chunk is None and self._moves(offset)
        return None if chunk is None else f"gptc_store{self.lanes[2]}({self.arg(nid)} + {atom(chunk)}, {values});"

    # ----- values -------------------------------------------------------------
    def value(self, nid: int, index: Index) -> str:
        if nid in self.special:
            return self.special[nid]
        key = (nid, index, self.guard)
        if key in self.cache:
            return self.cache[key]
        g = self.graph
        node = g.node(nid)
        op = node["op"]
        kind = OPS[op].kind
        dtype = node["type"].dtype
        if op == "const":
            return c_literal(node["attrs"]["value"], dtype)
        if op == "iota":
            axis_index = index[node["attrs"]["axis"]]
            # Bracketed: an operand of any C expression (a cast of `row % 37`, 2 * it).
            return atom(axis_index) if dtype == "i32" else f"(({C_TYPE[dtype]}){atom(axis_index)})"
        if kind == VIEW:
            return self._view(nid, node, index)
        if op == "random_uniform":
            name = self._local(nid, self._random_uniform(node, index))
        elif nid not in self.nodes and (op in ("input", "param", "state") or nid in self.plan.buffers or nid in self.plan.aliases):
            name = self.load(nid, index)
        elif kind == ELEMENTWISE:
            name = self._local(nid, self._elementwise(node, index))
        elif kind == GATHER:
            table, ids = node["inputs"]
            row = self.value(ids, index[:-1])
            name = self.value(table, (Var(f"(idx_t){row}"), index[-1]))
        else:
            raise AssertionError(f"cannot inline {g.describe(nid)}")
        self.cache[key] = name
        return name

    def _local(self, nid: int, expr: str) -> str:
        """A new local holding `expr`, the value of node `nid`."""
        node = self.graph.node(nid)
        name = f"v{self.counter}"
        self.counter += 1
        where = f"  // %{nid} {node['op']} {node['scope']}".rstrip()
        self.lines.append(f"{C_TYPE[node['type'].dtype]} {name} = {unwrap(expr)};{where}")
        return name

    def _random_uniform(self, node: dict, index: Index) -> str:
        """Philox at the element's flat index (ops/random.py, prelude.h philox_uniform)."""
        attrs = node["attrs"]
        step = self.value(node["inputs"][0], ())
        return philox_uniform(attrs["seed"], attrs["stream"], f"(uint32_t)(int){step}",
                              atom(linearize(index, attrs["shape"])))

    def _elementwise(self, node: dict, index: Index) -> str:
        args = [self.value(i, index) for i in node["inputs"]]
        if node["op"] == "cast":
            target = node["attrs"]["dtype"]
            if target == "bf16":
                return f"bf16_to_float(float_to_bf16((float){args[0]}))"
            return f"(({C_TYPE[target]}){_operand(args[0])})"
        if node["op"] == "exp":
            return f"{self.exp}({args[0]})"
        return OPS[node["op"]].c_expr.format(*args)

    def _view(self, nid: int, node: dict, index: Index) -> str:
        g = self.graph
        (src,) = node["inputs"]
        in_shape = g.type(src).shape
        out_shape = node["type"].shape
        if node["op"] == "pad":
            ax, before = node["attrs"]["axis"], node["attrs"]["before"]
            n = in_shape[ax]
            inside = in_range(index[ax], before, before + n)
            # The clamped index keeps the (discarded) load in bounds. In lanes the index
            # moves with the lane unclamped, so the source's chunk can be read at once
            # (chunk_offset checks that it lies in the buffer); its lanes outside the pad's
            # source are discarded and a lane's own loads stay under the guard.
            shifted = add(index[ax], -before)
            if self.lanes and before == 0 and index[ax] == self.lanes[0]:
                shifted = Var(self.lanes[0].name, n)  # below n where the guard holds
            clamped = shifted if self.lanes else minimum(maximum(shifted, 0), n - 1)
            zero = c_literal(0.0, node["type"].dtype)
            if inside == "false":
                return zero
            if inside == "true":
                return self.value(src, index[:ax] + (clamped,) + index[ax + 1:])
            outer, cond = self.guard, f"({inside})" if "&&" in inside else inside
            self.guard = cond if outer is None else f"{outer} && {cond}"
            inner = self.value(src, index[:ax] + (clamped,) + index[ax + 1:])
            self.guard = outer
            return f"({cond} ? {inner} : {zero})"
        return self.value(src, view_index(node["op"], node["attrs"], in_shape, out_shape, index))


def _operand(expr: str) -> str:
    """`expr` bracketed unless it is a name, a number or bracketed already: a cast's
    operand, where (float)(i / 8) % 13 would cast before the %."""
    return expr if re.fullmatch(r"[\w.]+", expr) or unwrap(expr) != expr else f"({expr})"


def philox_uniform(seed: int, stream: int, step: str, index: str) -> str:
    """The C call drawing element `index` (an expression) of a random_uniform tensor;
    `step` is a uint32_t expression."""
    return f"philox_uniform({seed & 0xFFFFFFFF}u, {(seed >> 32) & 0xFFFFFFFF}u, {stream}u, {step}, (uint64_t){index})"


def unwrap(expr: str) -> str:
    """`expr` without brackets around all of it: (a + b) -> a + b, not (a) + (b)."""
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for pos, ch in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0 and pos < len(expr) - 1:
                return expr  # the first bracket closes before the end
        expr = expr[1:-1]
    return expr
