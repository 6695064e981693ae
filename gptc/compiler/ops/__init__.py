"""Primitive ops. Importing this package fills the registry `OPS`."""
from gptc.compiler.ops.registry import OPS, OpDef, ShapeError, TensorType  # noqa: F401
from gptc.compiler.ops import elementwise, reduce, matmul, view, index, source, grouped, random, decode, sample, collective  # noqa: F401,E402
