"""Matrix-vector products (templates/matmul_gemv.hip.j2: a decode step's products of at
most 8 rows) against float64 NumPy: M = 1..8, awkward N and K (N not a multiple of the
block's 8 columns, K not of its 32 lanes, K < 32), B laid out along n or along k (a
tied embedding read transposed), A transposed, f32 and bf16 operands, a fused epilogue,
two products in one launch; outputs poisoned (NaN) before the launch. Run on a GPU
machine with:
    PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu_gemv.py

Tolerance: f32 accumulation over K, |C - C64| <= K * 2^-22 * (|A| @ |B|) (f32 operands'
products add one rounding each, inside that bound)."""
from __future__ import annotations

import numpy as np
import pytest

from gptc import dsl
from gptc.compiler.codegen.kernels import render_plan
from gptc.compiler.ir import Graph
from gptc.compiler.ops.numeric import round_to_bf16
from gptc.compiler.planner import make_plan
from gptc.runtime.build import load_executor

pytestmark = pytest.mark.gpu


def values(rng, shape, dtype: str) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return (round_to_bf16(x) if dtype == "bf16" else x).astype(np.float64)


def run(device, g: Graph, feeds: dict, gemvs: int) -> dict:
    """Run g's plan, whose one launch holds `gemvs` matrix-vector products."""
    plan = make_plan(g, True)
    (kernel,) = render_plan(plan, device.target)
    assert kernel.source.count("a matrix-vector product") == gemvs
    ex = load_executor(plan, device, {}, use_graph=False)
    try:
        ex.poison()
        return ex.run({n: v.astype(np.float32) for n, v in feeds.items()})
    finally:
        ex.close()


def check(out: np.ndarray, ref: np.ndarray, bound: np.ndarray) -> None:
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "unwritten (NaN) or non-finite elements"
    tol = bound + 1e-6 * np.abs(ref) + 1e-30
    err = np.abs(out.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err / tol), err.shape)
    assert (err <= tol).all(), f"max err/tol {float((err / tol)[worst]):.3g} at {worst}: {out[worst]} vs {ref[worst]}"


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("a_t", [False, True], ids=["A_k", "A_m"])
@pytest.mark.parametrize("b_t", [False, True], ids=["B_n", "B_k"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 2304, 768), (3, 13, 31), (8, 777, 100), (5, 50257, 64),
                                   (2, 9, 3072), (7, 1000, 33)])
def test_sizes_and_layouts(device, rng, m, n, k, a_t, b_t, dtype):
    g = Graph()
    sa, sb = ((k, m) if a_t else (m, k)), ((n, k) if b_t else (k, n))
    a, b = g.input("a", sa, dtype), g.input("b", sb, dtype)
    g.output("c", (a.T if a_t else a) @ (b.T if b_t else b))
    feeds = {"a": values(rng, sa, dtype), "b": values(rng, sb, dtype)}
    A = feeds["a"].T if a_t else feeds["a"]
    B = feeds["b"].T if b_t else feeds["b"]
    out = run(device, g, feeds, 1)["c"]
    check(out, A @ B, k * 2.0 ** -22 * (np.abs(A) @ np.abs(B)))


@pytest.mark.parametrize("b_t", [False, True], ids=["B_n", "B_k"])
def test_epilogue(device, rng, b_t):
    """A linear layer of a decode step: bias, GELU and a residual fused after the sum."""
    m, n, k = 4, 301, 200
    g = Graph()
    sb = (n, k) if b_t else (k, n)
    a, b = g.input("a", (m, k)), g.input("b", sb)
    bias, res = g.input("bias", (n,)), g.input("res", (m, n))
    g.output("y", dsl.gelu(a @ (b.T if b_t else b) + bias) + res)
    feeds = {"a": values(rng, (m, k), "f32"), "b": values(rng, sb, "f32"),
             "bias": values(rng, (n,), "f32"), "res": values(rng, (m, n), "f32")}
    B = feeds["b"].T if b_t else feeds["b"]
    x = feeds["a"] @ B + feeds["bias"]
    ref = 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))) + feeds["res"]
    bound = k * 2.0 ** -22 * (np.abs(feeds["a"]) @ np.abs(B)) * 1.2 + 1e-5 * (np.abs(x) + np.abs(feeds["res"]))
    check(run(device, g, feeds, 1)["y"], ref, bound)


def test_two_products_in_one_launch(device, rng):
    """Independent matrix-vector products batched into one launch stay right."""
    g = Graph()
    a, b = g.input("a", (3, 40), "f32"), g.input("b", (40, 70), "f32")
    c, d = g.input("c", (3, 17), "f32"), g.input("d", (9, 17), "f32")
    g.output("x", a @ b)
    g.output("y", c @ d.T)
    shapes = {"a": (3, 40), "b": (40, 70), "c": (3, 17), "d": (9, 17)}
    feeds = {name: values(rng, s, "f32") for name, s in shapes.items()}
    out = run(device, g, feeds, 2)
    A, B, C, D = feeds["a"], feeds["b"], feeds["c"], feeds["d"].T
    check(out["x"], A @ B, 40 * 2.0 ** -22 * (np.abs(A) @ np.abs(B)))
    check(out["y"], C @ D, 17 * 2.0 ** -22 * (np.abs(C) @ np.abs(D)))
