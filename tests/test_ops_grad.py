"""Every primitive op's VJP against float64 central finite differences.

Each case builds a small graph from named inputs, projects its output on a fixed
random tensor R (loss = sum(out * R)), differentiates the loss with
gptc.compiler.autodiff.gradients and compares every float input's gradient with central
differences of the loss, all run by the NumPy reference executor in float64.

`test_every_differentiable_op_is_covered` fails when an op with a VJP is added to the
registry without a case here that uses it. An op through which no gradient flows
(stop_gradient: its VJP gives None) is covered by a case that lists its input in
`no_grad`, and by the composites that use it (softmax, cross-entropy), whose gradients
do not depend on it in exact arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from gptc import dsl
from gptc.compiler.autodiff import gradients
from gptc.compiler.ir import Graph, Tensor
from gptc.compiler.ops import OPS
from gptc.compiler.ops.numeric import round_to_bf16
from gptc.compiler.ops.registry import DEDICATED, SOURCE
from gptc.runtime.reference import run_graph

STEP = 1e-6        # central-difference step; the inputs keep every kink farther than this
TOLERANCE = 1e-6   # ‖numeric − analytic‖ / ‖numeric‖


@dataclass
class Case:
    id: str
    build: Callable[[Graph, dict[str, Tensor]], Tensor]
    # name -> array (dtype from the array: float -> "f32", int -> "i32", bool -> "bool")
    # or (array, gptc dtype)
    inputs: dict
    # float inputs the loss does not depend on differentiably (expect a None gradient)
    no_grad: tuple[str, ...] = ()
    dtypes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = {}
        for name, v in self.inputs.items():
            if isinstance(v, tuple):
                v, dtype = v
            else:
                v = np.asarray(v)
                dtype = {"b": "bool", "i": "i32", "u": "i32"}.get(v.dtype.kind, "f32")
            values[name] = np.asarray(v, dtype={"bool": np.bool_, "i32": np.int32}.get(dtype, np.float64))
            self.dtypes[name] = dtype
        self.inputs = values

    def differentiable(self, name: str) -> bool:
        return self.dtypes[name] in ("f32", "f64") and name not in self.no_grad


def make_graph(case: Case, with_grads: bool) -> tuple[Graph, set[str], dict]:
    """The loss graph of `case` (with "grad.<name>" outputs if with_grads), the ops of
    its forward part, and {input name: gradient handle or None}."""
    g = Graph()
    t = {name: g.input(name, a.shape, case.dtypes[name]) for name, a in case.inputs.items()}
    out = case.build(g, t)
    assert out.dtype in ("f32", "f64"), f"case {case.id} must produce a float output"
    r = g.input("R", out.shape, out.dtype)
    loss = (out * r).sum()
    g.output("loss", loss)
    forward_ops = {g.op(n) for n in g.nx.nodes}
    grads = {}
    if with_grads:
        names = list(t)
        for name, grad in zip(names, gradients(loss, [t[n] for n in names])):
            grads[name] = grad
            if grad is not None:
                g.output(f"grad.{name}", grad)
    return g, forward_ops, grads


def projection(case: Case) -> np.ndarray:
    g, _, _ = make_graph(case, with_grads=False)
    shape = g.type(g.inputs["R"]).shape
    return np.random.default_rng(12345).standard_normal(shape)


# ----- inputs ------------------------------------------------------------------------
RNG = np.random.default_rng(20240607)


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def positive(*shape: int) -> np.ndarray:
    """Away from the log/sqrt/rsqrt singularity at 0."""
    return RNG.uniform(0.5, 2.0, shape)


def nonzero(*shape: int) -> np.ndarray:
    """Away from 0 on both sides (divisors)."""
    return RNG.uniform(0.5, 2.0, shape) * RNG.choice([-1.0, 1.0], shape)


def grid(*shape: int, offset: float = 0.0) -> np.ndarray:
    """Values on the lattice 0.25 k + offset: two tensors drawn with offsets 0 and 0.125
    never come closer than 0.125 (no ties for maximum / compares)."""
    return RNG.integers(-8, 8, shape) * 0.25 + offset


def distinct(*shape: int) -> np.ndarray:
    """Pairwise distinct values at least 0.1 apart (no ties for max)."""
    size = int(np.prod(shape))
    return (RNG.permutation(size) * 0.1 - size * 0.05).reshape(shape) + RNG.uniform(0, 0.01)


# ----- cases -------------------------------------------------------------------------
CASES: list[Case] = []


def case(id: str, inputs: dict, no_grad: tuple[str, ...] = ()):
    def register(build):
        CASES.append(Case(id, build, inputs, no_grad))
        return build
    return register


UNARY = {
    "neg": (lambda x: -x, normal),
    "exp": (Tensor.exp, normal),
    "log": (Tensor.log, positive),
    "tanh": (Tensor.tanh, normal),
    "sqrt": (Tensor.sqrt, positive),
    "rsqrt": (Tensor.rsqrt, positive),
    "sin": (Tensor.sin, normal),
    "cos": (Tensor.cos, normal),
}
for _name, (_fn, _draw) in UNARY.items():
    case(f"unary-{_name}", {"x": _draw(3, 4)})(lambda g, t, fn=_fn: fn(t["x"]))


BINARY = {
    "add": (lambda a, b: a + b, normal),
    "sub": (lambda a, b: a - b, normal),
    "mul": (lambda a, b: a * b, normal),
    "div": (lambda a, b: a / b, nonzero),
    "maximum": (lambda a, b: a.maximum(b), None),
}
# (x shape, y shape): the Tensor operators insert broadcast views, whose VJPs sum.
BROADCASTS = {
    "same": ((2, 3, 4), (2, 3, 4)),
    "scalar": ((2, 3, 4), ()),
    "leading": ((2, 3, 4), (3, 4)),
    "middle1": ((2, 3, 4), (2, 1, 4)),
    "both": ((2, 1, 4), (3, 1)),
    "left-small": ((4,), (2, 3, 4)),
}
for _name, (_fn, _draw_y) in BINARY.items():
    for _bname, (_xs, _ys) in BROADCASTS.items():
        if _name == "maximum":
            _inputs = {"x": grid(*_xs), "y": grid(*_ys, offset=0.125)}
        else:
            _inputs = {"x": normal(*_xs), "y": _draw_y(*_ys)}
        case(f"binary-{_name}-{_bname}", _inputs)(lambda g, t, fn=_fn: fn(t["x"], t["y"]))

# Python scalars on either side (constants get no gradient; the tensor does).
case("scalar-consts", {"x": nonzero(2, 3)})(
    lambda g, t: (2.5 - t["x"]) * 3.0 + 1.5 / t["x"] - t["x"] / 4.0 + (t["x"] + 1.0) * t["x"].maximum(0.3))


# ----- reductions ----------------------------------------------------------------------
for _op in ("sum", "max"):
    for _axis in (0, 1, -1, (0, 2), (1, 2), None):
        for _keep in (False, True):
            case(f"reduce-{_op}-axis{_axis}-keep{_keep}", {"x": distinct(2, 3, 4)})(
                lambda g, t, op=_op, axis=_axis, keep=_keep: getattr(t["x"], op)(axis, keepdims=keep))
case("reduce-max-4d", {"x": distinct(2, 2, 3, 2)})(lambda g, t: t["x"].max((0, 3)) * t["x"].sum((0, 3)))
case("reduce-mean", {"x": normal(3, 5)})(lambda g, t: t["x"].mean(-1, keepdims=True) * t["x"])


# ----- matmul --------------------------------------------------------------------------
case("matmul-2d", {"a": normal(3, 4), "b": normal(4, 5)})(lambda g, t: t["a"] @ t["b"])
case("matmul-batched", {"a": normal(2, 3, 4), "b": normal(2, 4, 5)})(lambda g, t: t["a"] @ t["b"])
case("matmul-4d", {"a": normal(2, 2, 3, 4), "b": normal(2, 2, 4, 3)})(lambda g, t: t["a"] @ t["b"])
case("matmul-aT", {"a": normal(2, 4, 3), "b": normal(2, 4, 5)})(lambda g, t: t["a"].T @ t["b"])
case("matmul-bT", {"a": normal(2, 3, 4), "b": normal(2, 5, 4)})(lambda g, t: t["a"] @ t["b"].T)
case("matmul-aT-bT", {"a": normal(4, 3), "b": normal(5, 4)})(lambda g, t: t["a"].T @ t["b"].T)
case("matmul-self", {"a": normal(4, 4)})(lambda g, t: t["a"] @ t["a"])
case("matmul-selfT", {"a": normal(3, 4)})(lambda g, t: t["a"].T @ t["a"])


# ----- views ---------------------------------------------------------------------------
case("reshape-merge", {"x": normal(2, 3, 4)})(lambda g, t: t["x"].reshape(6, 4) * t["x"].reshape(6, 4).exp())
case("reshape-split", {"x": normal(6, 4)})(lambda g, t: t["x"].reshape(4, 3, 2).sum(1))
case("permute-201", {"x": normal(2, 3, 4)})(lambda g, t: t["x"].permute(2, 0, 1).tanh())
case("permute-4d", {"x": normal(2, 3, 2, 4)})(lambda g, t: t["x"].permute(0, 2, 1, 3).reshape(4, 12))
case("broadcast-middle", {"x": normal(3, 1)})(lambda g, t: t["x"].broadcast_to((2, 3, 4)).sin())
case("broadcast-scalar", {"x": normal()})(lambda g, t: t["x"].broadcast_to((2, 3)))
case("broadcast-lead-and-stretch", {"x": normal(1, 4)})(lambda g, t: t["x"].broadcast_to((2, 3, 4)))
case("slice-middle", {"x": normal(2, 5, 3)})(lambda g, t: t["x"].slice(1, 1, 3).exp())
case("slice-first-last", {"x": normal(4, 3)})(lambda g, t: t["x"].slice(0, 0, 2).slice(1, 0, 2) * t["x"].slice(-1, 1, 3).slice(0, 2, 4))
case("pad-middle", {"x": normal(2, 3, 2)})(lambda g, t: t["x"].pad(1, 1, 2).exp())
case("pad-one-side", {"x": normal(3, 2)})(lambda g, t: t["x"].pad(0, 0, 3) + t["x"].pad(0, 3, 0))
case("slice-of-pad", {"x": normal(3, 4)})(lambda g, t: t["x"].pad(1, 2, 1).slice(1, 1, 5))


# ----- indexing ------------------------------------------------------------------------
case("gather-repeated", {"table": normal(5, 3), "idx": np.array([[0, 2, 2, 4], [4, 1, 2, 0]])})(
    lambda g, t: t["table"].gather(t["idx"]))
case("gather-1d", {"table": normal(6, 2), "idx": np.array([5, 5, 0, 3, 5])})(
    lambda g, t: t["table"].gather(t["idx"]).tanh())
case("scatter_add-repeated", {"upd": normal(2, 4, 3), "idx": np.array([[1, 1, 3, 0], [3, 1, 5, 5]])})(
    lambda g, t: t["upd"].scatter_add(t["idx"], 7))


# ----- where, compares, casts ----------------------------------------------------------
case("where", {"c": RNG.random((2, 3)) < 0.5, "a": normal(2, 3), "b": normal(2, 3)})(
    lambda g, t: t["c"].where(t["a"], t["b"]))
case("where-broadcast", {"c": np.array([[True], [False], [True]]), "a": normal(2, 3, 4), "b": normal(4)})(
    lambda g, t: t["c"].where(t["a"], t["b"]))
case("where-scalar-branch", {"c": RNG.random((3, 4)) < 0.5, "a": normal(3, 4)})(
    lambda g, t: t["c"].where(t["a"], 0.0) + t["c"].where(-1.0, t["a"] * t["a"]))
case("where-less", {"x": grid(3, 4), "y": grid(3, 4, offset=0.125)})(
    lambda g, t: (t["x"] < t["y"]).where(t["x"], t["y"] * 2.0))
case("where-greater_equal", {"x": grid(3, 4), "y": grid(4, offset=0.125)})(
    lambda g, t: (t["x"] >= t["y"]).where(t["x"].exp(), t["y"]))
# The condition's float operands reach the loss only through compares: no gradient.
case("where-equal-only", {"p": np.array([1.0, 2.0, 3.0]), "q": np.array([1.0, 0.0, 3.0]), "a": normal(3)},
     no_grad=("p", "q"))(lambda g, t: t["p"].eq(t["q"]).where(t["a"], -t["a"]))
case("compare-only", {"x": grid(4), "y": normal(4)}, no_grad=("x",))(
    lambda g, t: (t["x"] < 0.1).where(t["y"], 1.0))
case("cast-f32-f64-f32", {"x": normal(3, 4)})(lambda g, t: t["x"].cast("f64").exp().cast("f32") * t["x"])
case("cast-f64-input", {"x": (normal(2, 3), "f64"), "y": normal(2, 3)})(
    lambda g, t: t["x"].cast("f32") * t["y"] + t["y"].cast("f64").tanh().cast("f32"))
# Through an integer the gradient stops.
case("copy-of-view", {"x": normal(3, 4, 5)})(
    lambda g, t: t["x"].permute(1, 0, 2)._new("copy", [t["x"].permute(1, 0, 2)]).reshape(4, 15).tanh())

case("cast-i32", {"x": grid(2, 3, offset=0.5), "y": normal(2, 3)}, no_grad=("x",))(
    lambda g, t: t["x"].cast("i32").cast("f32") * t["y"])
# stop_gradient: its input gets no gradient through it (the other factor's is exact).
case("stop_gradient", {"x": normal(3, 4), "y": normal(3, 4)}, no_grad=("x",))(
    lambda g, t: t["x"].stop_gradient() * t["y"] + t["y"].exp())


# ----- one tensor used several times -------------------------------------------------
case("repeat-x*x", {"x": normal(3, 4)})(lambda g, t: t["x"] * t["x"])
case("repeat-three-users", {"x": normal(3, 4), "y": normal(4)})(
    lambda g, t: t["x"].exp() + t["x"] * t["y"] + t["x"].sum(0, keepdims=True).tanh())
case("repeat-param-two-places", {"w": normal(4, 3), "x": normal(2, 4)})(
    # one parameter in a matmul and (transposed) in a second matmul, as tied weights
    lambda g, t: (t["x"] @ t["w"]).tanh() @ t["w"].T)
case("repeat-tied-embedding", {"wte": normal(5, 3), "idx": np.array([[0, 3, 3], [1, 4, 0]])})(
    lambda g, t: t["wte"].gather(t["idx"]).reshape(6, 3) @ t["wte"].T)
case("repeat-where-both-branches", {"c": RNG.random((3, 3)) < 0.5, "x": normal(3, 3)})(
    lambda g, t: t["c"].where(t["x"], t["x"] * 3.0) * t["x"])
case("repeat-chain", {"x": positive(5)})(
    lambda g, t: (t["x"] * t["x"]).sqrt().log() * t["x"] / (t["x"] * t["x"] + 1.0))


# ----- DSL composites (built from the primitives above) ------------------------------
case("dsl-softmax", {"x": normal(3, 5)})(lambda g, t: dsl.softmax(t["x"]))
case("dsl-layernorm", {"x": normal(2, 3, 6), "w": normal(6), "b": normal(6)})(
    lambda g, t: dsl.layernorm(t["x"], t["w"], t["b"]))
case("dsl-gelu", {"x": normal(3, 4) * 2})(lambda g, t: dsl.gelu(t["x"]))
case("dsl-linear", {"x": normal(2, 3, 4), "w": normal(4, 5), "b": normal(5)})(
    lambda g, t: dsl.linear(t["x"], t["w"], t["b"]))
case("dsl-causal-attention", {"q": normal(2, 4, 3), "k": normal(2, 4, 3), "v": normal(2, 4, 3)})(
    lambda g, t: dsl.causal_attention(t["q"], t["k"], t["v"]))
# grouped query heads (4 over 2, and multi-query 4 over 1: dk, dv sum over the group) and a local window
case("dsl-gqa-attention", {"q": normal(1, 4, 4, 3), "k": normal(1, 2, 4, 3), "v": normal(1, 2, 4, 3)})(
    lambda g, t: dsl.causal_attention(t["q"], t["k"], t["v"]))
case("dsl-mqa-local-attention", {"q": normal(4, 5, 3), "k": normal(1, 5, 3), "v": normal(1, 5, 3)})(
    lambda g, t: dsl.causal_attention(t["q"], t["k"], t["v"], window=2))
case("logical_and", {"a": RNG.random((3, 4)) < 0.5, "b": RNG.random((3, 4)) < 0.5, "x": normal(3, 4)})(
    lambda g, t: t["a"].logical_and(t["b"]).where(t["x"], t["x"] * -2.0))
case("dsl-cross-entropy", {"logits": normal(2, 3, 5) * 2, "targets": np.array([[0, 4, 4], [2, 1, 0]])})(
    lambda g, t: dsl.cross_entropy(t["logits"], t["targets"]))

# The norms and gated activations of the model options.
case("dsl-rmsnorm", {"x": normal(2, 3, 7), "w": normal(7)})(lambda g, t: dsl.rmsnorm(t["x"], t["w"]))
case("dsl-rmsnorm-eps", {"x": normal(4, 5) * 0.3, "w": normal(5)})(lambda g, t: dsl.rmsnorm(t["x"], t["w"], 0.3))
case("dsl-scalenorm", {"x": normal(2, 3, 7), "g": normal(1)})(lambda g, t: dsl.scalenorm(t["x"], t["g"]))
# rows with ||x|| on both sides of eps: the max picks eps for the small ones
case("dsl-scalenorm-eps", {"x": np.concatenate([normal(3, 6), normal(2, 6) * 0.02]), "g": normal(1)})(
    lambda g, t: dsl.scalenorm(t["x"], t["g"], 0.5))
case("dsl-silu", {"x": normal(3, 5) * 3})(lambda g, t: dsl.silu(t["x"]))
case("dsl-swiglu", {"gu": normal(2, 3, 10) * 2})(lambda g, t: dsl.swiglu(t["gu"]))

# Mixture-of-experts dispatch (ops/grouped.py): 7 rows in 3 groups, group 1 empty.
MOE_IDS = np.array([2, 0, 2, 2, 0, 2, 0])
MOE_OFFSETS = np.array([0, 3, 3, 7])
case("grouped-dispatch", {"x": normal(7, 4), "w": normal(3, 4, 5), "ids": MOE_IDS})(
    lambda g, t: dsl.grouped_matmul(t["x"].scatter_add(dsl.group_rank(t["ids"], 3), 7), t["w"],
                                    dsl.group_offsets(t["ids"], 3)).gather(dsl.group_rank(t["ids"], 3)))
case("grouped_weight_grad", {"x": normal(7, 4), "y": normal(7, 5), "offsets": MOE_OFFSETS})(
    lambda g, t: t["x"]._new("grouped_weight_grad", [t["x"], t["y"], t["offsets"]]))

# Collectives in a world of one rank (identities); tests/test_multi_reference.py checks
# their VJPs across simulated worlds of several.
for _op in ("all_reduce", "reduce_scatter", "all_gather"):
    case(f"collective-{_op}", {"x": normal(6)})(
        lambda g, t, op=_op: t["x"]._new(op, [t["x"]], world=1, bucket=0) * t["x"])


# ----- the checks ----------------------------------------------------------------------
def loss_at(graph: Graph, feeds: dict) -> float:
    return float(run_graph(graph, feeds, np.float64)["outputs"]["loss"])


def numeric_gradient(graph: Graph, feeds: dict, name: str) -> np.ndarray:
    x = feeds[name]
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + STEP
        up = loss_at(graph, feeds)
        x[i] = saved - STEP
        down = loss_at(graph, feeds)
        x[i] = saved
        grad[i] = (up - down) / (2 * STEP)
    return grad


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_vjp_matches_finite_differences(case: Case) -> None:
    forward, _, _ = make_graph(case, with_grads=False)
    graph, _, grads = make_graph(case, with_grads=True)
    feeds = {name: a.copy() for name, a in case.inputs.items()}
    feeds["R"] = projection(case)
    result = run_graph(graph, feeds, np.float64)
    assert np.isfinite(result["outputs"]["loss"])
    checked = 0
    for name in case.inputs:
        if not case.differentiable(name):
            assert grads[name] is None, f"{case.id}: input '{name}' ({case.dtypes[name]}) must get no gradient"
            continue
        assert grads[name] is not None, f"{case.id}: no gradient for '{name}'"
        analytic = result["outputs"][f"grad.{name}"]
        assert analytic.shape == case.inputs[name].shape
        assert np.all(np.isfinite(analytic))
        numeric = numeric_gradient(forward, feeds, name)
        scale = np.linalg.norm(numeric)
        assert scale > 1e-3, f"{case.id}: degenerate case, d loss/d {name} is ~0"
        error = np.linalg.norm(analytic - numeric) / scale
        assert error < TOLERANCE, (
            f"{case.id}: d loss/d {name}: relative error {error:.3g}\nanalytic\n{analytic}\nnumeric\n{numeric}")
        checked += 1
    assert checked > 0


def test_every_differentiable_op_is_covered() -> None:
    covered: set[str] = set()
    for c in CASES:
        covered |= make_graph(c, with_grads=False)[1]
    with_vjp = {name for name, op in OPS.items() if op.vjp is not None}
    missing = sorted(with_vjp - covered)
    assert not missing, f"ops with a VJP but no finite-difference case in {__file__}: {missing}"


def test_only_sources_and_inference_ops_lack_a_vjp() -> None:
    """autodiff treats a source without a VJP as final (its gradient stops there) and
    refuses to differentiate through an inference-only op (decoding, sampling), so any
    other op must define one, even if it returns None for every input."""
    for name, op in OPS.items():
        assert op.vjp is not None or op.kind in (SOURCE, DEDICATED), f"op '{name}' ({op.kind}) has no VJP"


def test_autodiff_refuses_an_inference_only_op() -> None:
    g = Graph()
    cache = g.param("cache", (1, 1, 4, 2))
    new = g.param("new", (1, 1, 1, 2))
    written = Tensor(g, g.add("kv_write", [cache.id, new.id, g.input("pos", (1,), "i32", bound=4).id]))
    with pytest.raises(ValueError, match="kv_write has no gradient"):
        gradients(written.sum(), [new])


# ----- behaviour at the points finite differences avoid -------------------------------
def _single_grad(build, inputs: dict, wrt: str) -> np.ndarray:
    c = Case("single", build, inputs)
    graph, _, grads = make_graph(c, with_grads=True)
    feeds = {**c.inputs, "R": np.ones(graph.type(graph.inputs["R"]).shape)}
    return run_graph(graph, feeds, np.float64)["outputs"][f"grad.{wrt}"]


def test_max_ties_share_the_gradient() -> None:
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, -1.0]])
    grad = _single_grad(lambda g, t: t["x"].max(-1), {"x": x}, "x")
    np.testing.assert_array_equal(grad, [[0, 0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3, 0]])


def test_maximum_tie_goes_to_first_operand() -> None:
    x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 5.0, 3.0])
    build = lambda g, t: t["x"].maximum(t["y"])  # noqa: E731
    np.testing.assert_array_equal(_single_grad(build, {"x": x, "y": y}, "x"), [1, 0, 1])
    np.testing.assert_array_equal(_single_grad(build, {"x": x, "y": y}, "y"), [0, 1, 0])


def test_stop_gradient_is_a_constant_to_autodiff() -> None:
    """d/dx (sg(x) * x) = sg(x): only the direct use of x is differentiated."""
    x = normal(3, 4)
    np.testing.assert_array_equal(_single_grad(lambda g, t: t["x"].stop_gradient() * t["x"], {"x": x}, "x"), x)


def test_bf16_cast_passes_the_gradient_rounded_to_bf16() -> None:
    x, r = normal(3, 4), normal(3, 4)
    c = Case("bf16", lambda g, t: t["x"].cast("bf16").cast("f32"), {"x": x})
    graph, _, grads = make_graph(c, with_grads=True)
    out = run_graph(graph, {**c.inputs, "R": r}, np.float64)["outputs"]
    np.testing.assert_array_equal(out["grad.x"], round_to_bf16(r).astype(np.float64))


def test_unreachable_and_integer_inputs_get_none() -> None:
    g = Graph()
    x = g.input("x", (2, 3))
    unused = g.input("unused", (2, 3))
    idx = g.input("idx", (2,), "i32")
    cond = g.input("cond", (2, 3), "bool")
    table = g.input("table", (4, 3))
    loss = (cond.where(x, table.gather(idx)) * x).sum()
    gx, gu, gi, gc, gt = gradients(loss, [x, unused, idx, cond, table])
    assert gx is not None and gt is not None
    assert gu is None and gi is None and gc is None


def test_loss_must_be_scalar() -> None:
    g = Graph()
    x = g.input("x", (2, 3))
    with pytest.raises(ValueError, match="scalar"):
        gradients(x * 2.0, [x])
