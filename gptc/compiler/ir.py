"""The IR: a networkx DiGraph of primitive ops with static shapes and dtypes.

Nodes are integers. Each node carries `op`, `attrs`, `type` (TensorType), `inputs`
(tuple of node ids, in argument order: the source of truth for operand order, since
one tensor may feed several arguments of one op) and `scope` (the DSL function that
created it, e.g. "h.0/attn/causal_attention", so kernels can be traced back to the
model source). Edges mirror `inputs` and carry the argument indices in `args`.

`Tensor` is the handle user code and VJPs build graphs with: `x @ w + b`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import networkx as nx
import numpy as np

from gptc.compiler.ops import OPS, ShapeError, TensorType
from gptc.compiler.ops.registry import FLOAT_DTYPES, VIEW

__all__ = ["Graph", "Tensor", "TensorType", "broadcast_shapes"]


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        raise ShapeError(f"shapes {' and '.join(map(str, shapes))} do not broadcast") from None


class Graph:
    """A graph of primitive ops. Sources are `input` (fed every step), `param`
    (trainable, persistent), `state` (persistent, e.g. optimizer moments), `const`,
    `iota` and `random_uniform`. `outputs` names results; `updates` maps a param/state name to the
    node holding its new value after one step."""

    def __init__(self) -> None:
        self.nx = nx.DiGraph()
        self.inputs: dict[str, int] = {}
        self.params: dict[str, int] = {}
        self.states: dict[str, int] = {}
        self.outputs: dict[str, int] = {}
        self.updates: dict[str, int] = {}
        self._next_id = 0
        self._scopes: list[str] = []
        self._consts: dict[tuple, int] = {}

    # ----- construction -------------------------------------------------------
    def add(self, op: str, inputs: Sequence[int] = (), **attrs: Any) -> int:
        opdef = OPS.get(op)
        if opdef is None:
            raise ShapeError(f"unknown op '{op}'")
        in_types = [self.type(i) for i in inputs]
        out_type = opdef.infer(in_types, attrs)
        nid = self._next_id
        self._next_id += 1
        self.nx.add_node(nid, op=op, attrs=attrs, type=out_type, inputs=tuple(inputs),
                         scope="/".join(self._scopes))
        for arg, src in enumerate(inputs):
            if self.nx.has_edge(src, nid):
                self.nx.edges[src, nid]["args"].append(arg)
            else:
                self.nx.add_edge(src, nid, args=[arg])
        return nid

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Tag the nodes created inside with `name` (nested scopes join with '/')."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    @contextlib.contextmanager
    def replace_scope(self, scope: str) -> Iterator[None]:
        saved, self._scopes = self._scopes, [scope] if scope else []
        try:
            yield
        finally:
            self._scopes = saved

    def input(self, name: str, shape: Sequence[int], dtype: str = "f32", bound: int | None = None) -> "Tensor":
        """A value fed every step. `bound`: the input holds ids that index something
        (token ids, positions, rows), each in [0, bound); executors refuse others."""
        if bound is None:
            return self._source("input", self.inputs, name, shape, dtype)
        if dtype != "i32" or bound < 1:
            raise ShapeError(f"input '{name}': only i32 inputs take a bound, and it must be positive")
        return self._source("input", self.inputs, name, shape, dtype, bound=int(bound))

    def param(self, name: str, shape: Sequence[int], dtype: str = "f32",
              init: str = "normal", std: float = 0.02, value: float = 0.0) -> "Tensor":
        """A trainable parameter, initialised by `init`: "normal" (mean 0, `std`),
        "zeros", "ones" or "constant" (every element `value`)."""
        if init not in ("normal", "zeros", "ones", "constant"):
            raise ShapeError(f"param '{name}': unknown init '{init}' (normal, zeros, ones or constant)")
        extra = {"value": float(value)} if init == "constant" else {}
        return self._source("param", self.params, name, shape, dtype, init=init, std=float(std), **extra)

    def state(self, name: str, shape: Sequence[int], dtype: str = "f32") -> "Tensor":
        return self._source("state", self.states, name, shape, dtype)

    def _source(self, op: str, table: dict[str, int], name: str, shape: Sequence[int], dtype: str,
                **extra: Any) -> "Tensor":
        if name in self.inputs or name in self.params or name in self.states:
            raise ShapeError(f"a graph source named '{name}' exists already")
        table[name] = self.add(op, name=name, shape=tuple(int(d) for d in shape), dtype=dtype, **extra)
        return Tensor(self, table[name])

    def const(self, value: float, dtype: str = "f32") -> "Tensor":
        """A scalar constant; one node per distinct (value, dtype)."""
        key = (float(value), dtype)
        if key not in self._consts:
            with self.replace_scope(""):
                self._consts[key] = self.add("const", value=float(value), dtype=dtype)
        return Tensor(self, self._consts[key])

    def iota(self, shape: Sequence[int], axis: int, dtype: str = "i32") -> "Tensor":
        return Tensor(self, self.add("iota", shape=tuple(shape), axis=axis, dtype=dtype))

    def random_uniform(self, shape: Sequence[int], step: "Tensor", seed: int, stream: int) -> "Tensor":
        """Uniform float32s in [0, 1) drawn by Philox from (seed, stream, step, element
        index): see gptc/compiler/ops/random.py. `step` is a scalar tensor."""
        return Tensor(self, self.add("random_uniform", [step.id], shape=tuple(int(d) for d in shape),
                                     seed=int(seed), stream=int(stream)))

    def output(self, name: str, t: "Tensor") -> None:
        self.outputs[name] = t.id

    def insert_between(self, src: int, dst: int, op: str, **attrs: Any) -> int:
        """Insert a new unary node `op` on the edge src -> dst (every argument of dst
        that reads src reads the new node instead)."""
        with self.replace_scope(self.node(dst)["scope"]):
            new = self.add(op, [src], **attrs)
        self.rewire(src, new, dst)
        return new

    def rewire(self, old: int, new: int, dst: int) -> None:
        """Make every argument of `dst` that reads `old` read `new` instead."""
        args = self.nx.edges[old, dst]["args"]
        self.nx.remove_edge(old, dst)
        self.nx.add_edge(new, dst, args=list(args))
        node = self.node(dst)
        node["inputs"] = tuple(new if i == old else i for i in node["inputs"])

    def bypass(self, nid: int) -> None:
        """Remove the unary node `nid`: its users, and outputs and updates naming it, read
        its operand instead."""
        (src,) = self.inputs_of(nid)
        self.replace(nid, src)

    def replace(self, old: int, new: int) -> None:
        """Remove node `old`: its users, and outputs and updates naming it, read `new`
        (of the same type) instead."""
        for user in self.users(old):
            args = self.nx.edges[old, user]["args"]
            if self.nx.has_edge(new, user):
                self.nx.edges[new, user]["args"] = sorted(self.nx.edges[new, user]["args"] + args)
            else:
                self.nx.add_edge(new, user, args=list(args))
            node = self.node(user)
            node["inputs"] = tuple(new if i == old else i for i in node["inputs"])
        for table in (self.outputs, self.updates):
            for name, value in table.items():
                if value == old:
                    table[name] = new
        self.nx.remove_node(old)

    def copy(self) -> "Graph":
        """An independent copy with the same node ids, for passes that change a graph.
        Op attributes are shared: no pass changes them."""
        new = Graph()
        new.nx = self.nx.copy()  # fresh attribute dicts for every node and edge
        for _, _, data in new.nx.edges(data=True):
            data["args"] = list(data["args"])
        new.inputs, new.params, new.states = dict(self.inputs), dict(self.params), dict(self.states)
        new.outputs, new.updates = dict(self.outputs), dict(self.updates)
        new._next_id, new._consts = self._next_id, dict(self._consts)
        return new

    # ----- inspection ---------------------------------------------------------
    def input_bounds(self) -> dict[str, int]:
        """{name: bound} of the inputs whose ids must lie in [0, bound)."""
        return {name: self.node(nid)["attrs"]["bound"] for name, nid in sorted(self.inputs.items())
                if "bound" in self.node(nid)["attrs"]}

    def node(self, nid: int) -> dict:
        return self.nx.nodes[nid]

    def type(self, nid: int) -> TensorType:
        return self.nx.nodes[nid]["type"]

    def op(self, nid: int) -> str:
        return self.nx.nodes[nid]["op"]

    def inputs_of(self, nid: int) -> tuple[int, ...]:
        return self.nx.nodes[nid]["inputs"]

    def users(self, nid: int) -> list[int]:
        return sorted(self.nx.successors(nid))

    def view_base(self, nid: int) -> int:
        """The node a chain of views reads (`nid` itself if it is no view)."""
        while OPS[self.op(nid)].kind == VIEW:
            nid = self.inputs_of(nid)[0]
        return nid

    def topo_order(self) -> list[int]:
        # Ties broken by node id, so the order (and all generated code) is deterministic.
        return list(nx.lexicographical_topological_sort(self.nx))

    def roots(self) -> list[int]:
        """Nodes whose values leave the graph: outputs and updates."""
        return list(dict.fromkeys([*self.outputs.values(), *self.updates.values()]))

    def reachable(self, starts: Iterable[int], forward: bool = True,
                  through: Callable[[int], bool] = lambda n: True) -> set[int]:
        """The nodes `starts` reach (themselves included) along edges (forward: to the
        users, else to the inputs), entering only nodes for which `through` holds: one
        walk for all starts, where a walk per start (nx.ancestors) is quadratic."""
        step = self.nx.successors if forward else self.nx.predecessors
        seen = set(starts)
        stack = list(seen)
        while stack:
            for m in step(stack.pop()):
                if m not in seen and through(m):
                    seen.add(m)
                    stack.append(m)
        return seen

    def prune(self) -> None:
        """Remove nodes that no output or update depends on (sources are kept)."""
        live = self.reachable(self.roots(), forward=False)
        keep_sources = {*self.inputs.values(), *self.params.values(), *self.states.values()}
        dead = [n for n in self.nx.nodes if n not in live and n not in keep_sources]
        self.nx.remove_nodes_from(dead)
        self._consts = {k: v for k, v in self._consts.items() if v in self.nx}

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def describe(self, nid: int) -> str:
        n = self.node(nid)
        attrs = ", ".join(f"{k}={v}" for k, v in n["attrs"].items() if k not in ("shape", "dtype") or n["op"] in ("reshape", "broadcast"))
        args = ", ".join(f"%{i}" for i in n["inputs"])
        where = f"  # {n['scope']}" if n["scope"] else ""
        return f"%{nid} = {n['op']}({args}{', ' if args and attrs else ''}{attrs}) : {n['type']}{where}"


class Tensor:
    """A handle to one node of a Graph, with the operators of the DSL."""

    __slots__ = ("graph", "id")
    __array_priority__ = 1000  # so numpy scalars on the left defer to Tensor

    def __init__(self, graph: Graph, nid: int) -> None:
        self.graph = graph
        self.id = nid

    @property
    def type(self) -> TensorType:
        return self.graph.type(self.id)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Tensor(%{self.id}: {self.type})"

    # ----- helpers ------------------------------------------------------------
    def _new(self, op: str, inputs: Sequence["Tensor"], **attrs: Any) -> "Tensor":
        return Tensor(self.graph, self.graph.add(op, [t.id for t in inputs], **attrs))

    def _lift(self, other: "Tensor | float | int") -> "Tensor":
        if isinstance(other, Tensor):
            if other.graph is not self.graph:
                raise ShapeError("tensors from two different graphs")
            return other
        if isinstance(other, (int, float, np.floating, np.integer)):
            return self.graph.const(float(other), self.dtype)
        raise TypeError(f"cannot combine a Tensor with {type(other).__name__}")

    def _elementwise(self, op: str, *others: "Tensor | float") -> "Tensor":
        operands = [self] + [self._lift(o) for o in others]
        shape = broadcast_shapes(*[t.shape for t in operands])
        return self._new(op, [t.broadcast_to(shape) for t in operands])

    # ----- elementwise --------------------------------------------------------
    def __add__(self, o): return self._elementwise("add", o)
    def __radd__(self, o): return self._lift(o)._elementwise("add", self)
    def __sub__(self, o): return self._elementwise("sub", o)
    def __rsub__(self, o): return self._lift(o)._elementwise("sub", self)
    def __mul__(self, o): return self._elementwise("mul", o)
    def __rmul__(self, o): return self._lift(o)._elementwise("mul", self)
    def __truediv__(self, o): return self._elementwise("div", o)
    def __rtruediv__(self, o): return self._lift(o)._elementwise("div", self)
    def __neg__(self): return self._new("neg", [self])
    def __matmul__(self, o): return self.matmul(o)
    def __lt__(self, o): return self._elementwise("less", o)
    def __ge__(self, o): return self._elementwise("greater_equal", o)

    def eq(self, o) -> "Tensor": return self._elementwise("equal", o)
    def logical_and(self, o: "Tensor") -> "Tensor": return self._elementwise("logical_and", o)
    def maximum(self, o) -> "Tensor": return self._elementwise("maximum", o)
    def exp(self) -> "Tensor": return self._new("exp", [self])
    def log(self) -> "Tensor": return self._new("log", [self])
    def tanh(self) -> "Tensor": return self._new("tanh", [self])
    def sqrt(self) -> "Tensor": return self._new("sqrt", [self])
    def rsqrt(self) -> "Tensor": return self._new("rsqrt", [self])
    def sin(self) -> "Tensor": return self._new("sin", [self])
    def cos(self) -> "Tensor": return self._new("cos", [self])

    def stop_gradient(self) -> "Tensor":
        """The same value, as a constant to autodiff."""
        return self._new("stop_gradient", [self])

    def cast(self, dtype: str) -> "Tensor":
        return self if dtype == self.dtype else self._new("cast", [self], dtype=dtype)

    def where(self, a: "Tensor | float", b: "Tensor | float") -> "Tensor":
        """self is a bool condition: elementwise a where self else b."""
        ref = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
        if ref is None:
            raise ShapeError("where needs at least one tensor branch")
        a, b = ref._lift(a), ref._lift(b)
        shape = broadcast_shapes(self.shape, a.shape, b.shape)
        return self._new("where", [self.broadcast_to(shape), a.broadcast_to(shape), b.broadcast_to(shape)])

    # ----- reductions ---------------------------------------------------------
    def _axes(self, axis: int | Sequence[int] | None) -> tuple[int, ...]:
        if axis is None:
            return tuple(range(self.ndim))
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        for a in axes:
            if not -self.ndim <= a < self.ndim:
                raise ShapeError(f"axis {a} out of range for {self.type}")
        return tuple(sorted(a % self.ndim for a in axes))

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> "Tensor":
        return self._new("sum", [self], axes=self._axes(axis), keepdims=keepdims)

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> "Tensor":
        return self._new("max", [self], axes=self._axes(axis), keepdims=keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> "Tensor":
        count = int(np.prod([self.shape[a] for a in self._axes(axis)]))
        return self.sum(axis, keepdims) * (1.0 / count)

    # ----- matmul and views ---------------------------------------------------
    def matmul(self, other: "Tensor") -> "Tensor":
        return self._new("matmul", [self, self._lift(other)])

    def reshape(self, *shape: int | Sequence[int]) -> "Tensor":
        dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else tuple(shape)
        if -1 in dims:
            known = int(np.prod([d for d in dims if d != -1]))
            dims = tuple(self.type.size // max(known, 1) if d == -1 else d for d in dims)
        if dims == self.shape:
            return self
        return self._new("reshape", [self], shape=tuple(int(d) for d in dims))

    def permute(self, *perm: int | Sequence[int]) -> "Tensor":
        p = tuple(perm[0]) if len(perm) == 1 and not isinstance(perm[0], int) else tuple(perm)
        if p == tuple(range(self.ndim)):
            return self
        return self._new("permute", [self], perm=p)

    @property
    def T(self) -> "Tensor":
        """Swap the last two axes (a view)."""
        p = list(range(self.ndim))
        p[-1], p[-2] = p[-2], p[-1]
        return self.permute(p)

    def broadcast_to(self, shape: Sequence[int]) -> "Tensor":
        shape = tuple(int(d) for d in shape)
        if shape == self.shape:
            return self
        return self._new("broadcast", [self], shape=shape)

    def slice(self, axis: int, start: int, stop: int) -> "Tensor":
        axis %= self.ndim
        if start == 0 and stop == self.shape[axis]:
            return self
        return self._new("slice", [self], axis=axis, start=int(start), stop=int(stop))

    def pad(self, axis: int, before: int, after: int) -> "Tensor":
        """Zeros around the tensor along one axis (the VJP of slice)."""
        axis %= self.ndim
        return self._new("pad", [self], axis=axis, before=int(before), after=int(after))

    # ----- indexing -----------------------------------------------------------
    def gather(self, indices: "Tensor") -> "Tensor":
        """Rows of this (rows, width) table: result[..., :] = self[indices[...], :]."""
        return self._new("gather", [self, indices])

    def scatter_add(self, indices: "Tensor", num_rows: int) -> "Tensor":
        """The VJP of gather: a (num_rows, width) table of zeros with rows of self
        added at `indices`."""
        return self._new("scatter_add", [indices, self], num_rows=int(num_rows))

    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES
