"""Expression emission: the C code that computes one graph node at one index.

Values are computed in float (bf16 is converted on load and store), int or bool.
Inside a kernel, a node it computes is emitted as a statement into the current block
(`float v12_3 = ...;  // %12 mul  h.0/gelu`), cached by (node, index) so a value used
twice is computed once; views become index arithmetic; nodes stored by other kernels
and sources become loads from their buffers."""
from __future__ import annotations

import math

from gptc.compiler.codegen.indexing import Index, add, linearize, paren, view_index
from gptc.compiler.ir import Graph
from gptc.compiler.ops import OPS
from gptc.compiler.ops.registry import ELEMENTWISE, GATHER, VIEW
from gptc.compiler.planner.schedule import Plan

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
                 args: dict[int, str] | None = None) -> None:
        self.plan = plan
        self.graph: Graph = plan.graph
        self.nodes = set(nodes)
        # Nodes whose value is a variable of the template: the matmul accumulator, the
        # result of a row reduction.
        self.special = dict(special or {})
        self.lines: list[str] = []
        self.cache: dict[tuple[int, Index], str] = {}
        self.counter = 0
        # buffer node -> kernel parameter name, in order of first use (shared by the
        # kernels batched into one launch)
        self.args: dict[int, str] = {} if args is None else args

    # ----- blocks -------------------------------------------------------------
    def begin_block(self) -> None:
        """Start a fresh block of statements (a loop body): cached values from other
        blocks are not visible in it."""
        self.lines = []
        self.cache = {}

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    # ----- buffers ------------------------------------------------------------
    def arg(self, nid: int) -> str:
        # Positional names, so kernels that differ only in which buffers they read
        # have identical code (and compile once).
        buf = self.plan.buffer_of(nid)
        return self.args.setdefault(buf.node, f"p{len(self.args)}")

    def load(self, nid: int, index: Index) -> str:
        buf = self.plan.buffer_of(nid)
        ptr = self.arg(nid)
        offset = linearize(index, buf.shape) if buf.shape else "0"
        raw = f"{ptr}[{offset}]"
        return f"bf16_to_float({raw})" if buf.dtype == "bf16" else raw

    def store(self, nid: int, index: Index, value: str) -> str:
        buf = self.plan.buffer_of(nid)
        ptr = self.arg(nid)
        offset = linearize(index, buf.shape) if buf.shape else "0"
        if buf.dtype == "bf16":
            value = f"float_to_bf16({value})"
        return f"{ptr}[{offset}] = {value};"

    # ----- values -------------------------------------------------------------
    def value(self, nid: int, index: Index) -> str:
        if nid in self.special:
            return self.special[nid]
        key = (nid, index)
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
            return axis_index if dtype == "i32" else f"(({C_TYPE[dtype]}){paren(axis_index)})"
        if kind == VIEW:
            return self._view(nid, node, index)
        if nid not in self.nodes and (op in ("input", "param", "state") or nid in self.plan.buffers or nid in self.plan.aliases):
            expr = self.load(nid, index)
        elif kind == ELEMENTWISE:
            expr = self._elementwise(node, index)
        elif kind == GATHER:
            table, ids = node["inputs"]
            row = self.value(ids, index[:-1])
            expr = self.value(table, (row, index[-1]))
        else:
            raise AssertionError(f"cannot inline {g.describe(nid)}")
        name = f"v{self.counter}"
        self.counter += 1
        where = f"  // %{nid} {op} {node['scope']}".rstrip()
        self.lines.append(f"{C_TYPE[dtype]} {name} = {expr};{where}")
        self.cache[key] = name
        return name

    def _elementwise(self, node: dict, index: Index) -> str:
        args = [self.value(i, index) for i in node["inputs"]]
        if node["op"] == "cast":
            target = node["attrs"]["dtype"]
            if target == "bf16":
                return f"bf16_to_float(float_to_bf16((float){args[0]}))"
            return f"(({C_TYPE[target]}){args[0]})"
        return OPS[node["op"]].c_expr.format(*args)

    def _view(self, nid: int, node: dict, index: Index) -> str:
        g = self.graph
        (src,) = node["inputs"]
        in_shape = g.type(src).shape
        out_shape = node["type"].shape
        if node["op"] == "pad":
            ax, before = node["attrs"]["axis"], node["attrs"]["before"]
            n = in_shape[ax]
            pos = paren(index[ax])
            inside = f"({pos} >= {before} && {pos} < {before + n})"
            # The clamped index keeps the (discarded) load in bounds.
            clamped = f"min(max({add([pos, str(-before)])}, 0), {n - 1})"
            inner = self.value(src, index[:ax] + (clamped,) + index[ax + 1:])
            zero = c_literal(0.0, node["type"].dtype)
            return f"({inside} ? {inner} : {zero})"
        return self.value(src, view_index(node["op"], node["attrs"], in_shape, out_shape, index))
