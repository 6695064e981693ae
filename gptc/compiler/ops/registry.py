"""The table of primitive ops. Each op is defined in one place: its shape/dtype rule,
its NumPy reference implementation and its vector-Jacobian product (written with
other ops, through the Tensor handles of gptc.compiler.ir)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# Op kinds, used by the planner to pick a kernel family.
SOURCE = "source"          # graph inputs, parameters, constants, iota
ELEMENTWISE = "elementwise"
REDUCE = "reduce"
MATMUL = "matmul"
VIEW = "view"              # reshape/permute/broadcast/slice/pad: folded into index arithmetic
GATHER = "gather"
SCATTER = "scatter"
GROUPED = "grouped"        # MoE dispatch: counting sort by group, per-group matmuls (a kernel each)
DEDICATED = "dedicated"    # a kernel of its own per op, fusing nothing, its family the op's name:
                           # KV-cache decode (ops/decode.py), next-token sampling (ops/sample.py)
COLLECTIVE = "collective"  # all_reduce, reduce_scatter, all_gather: a library call (NCCL/RCCL), not a kernel


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str  # one of DTYPES

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE_BYTES[self.dtype]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


FLOAT_DTYPES = ("f32", "f64", "bf16")
DTYPES = FLOAT_DTYPES + ("i32", "bool")
DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "i32": 4, "bool": 1}


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str
    infer: Callable[[list[TensorType], dict[str, Any]], TensorType]
    # reference(inputs, attrs, out_type, float_dtype) -> ndarray
    reference: Callable[..., np.ndarray]
    # vjp(node_attrs, out, grad_out, *inputs) -> one gradient handle (or None) per input
    vjp: Callable[..., list] | None
    # C expression template for elementwise ops: "({0} + {1})" etc. (codegen reads it)
    c_expr: str | None = None


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name} registered twice")
    OPS[op.name] = op
    return op


class ShapeError(ValueError):
    """A graph was built with operands whose shapes or dtypes do not fit the op."""
