"""bf16 matmuls on the matrix units (templates/matmul_mma.hip.j2, matmul_wgmma.hip.j2 on sm_90) against float64 NumPy
on the same bf16-rounded operands: every operand layout (A's rows or columns
contiguous, B's likewise), awkward M, N, K (no tile multiple, K odd or under 16, N = 1..8),
row strides that allow 16-, 8-, 4- or 2-byte copies (on sm_90: 16-byte aligned operands
staged by TMA, the others by cp.async, both in one kernel), batches, fused epilogues, f32
and bf16 stores; outputs poisoned (NaN) before the launch. Run on a GPU machine with:
    PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu_mma.py

Tolerances: the products of bf16 values are exact in f32, so the error is f32
accumulation over K: |C - C64| <= K * 2^-22 * (|A| @ |B|) (a few units of f32 rounding
per term, generous for the matrix units' accumulation); a bf16 store adds one bf16 ulp
(2^-7 of the value)."""
from __future__ import annotations

import numpy as np
import pytest

from gptc import dsl
from gptc.compiler.codegen.kernels import _gemv_shape, _mm_shape, _mma_kind, render_plan
from gptc.compiler.ir import Graph
from gptc.compiler.ops.numeric import round_to_bf16
from gptc.compiler.planner import make_plan
from gptc.runtime.build import load_executor

pytestmark = pytest.mark.gpu


def bf16_values(rng, shape) -> np.ndarray:
    return round_to_bf16(rng.standard_normal(shape).astype(np.float32)).astype(np.float64)


def operand(g: Graph, name: str, rows: int, cols: int, transposed: bool, pad: int = 0):
    """A (rows, cols) bf16 operand: stored (rows, cols + pad) and sliced, or stored
    (cols, rows + pad) and read transposed. Returns (tensor, stored shape, view of a
    stored array)."""
    stored = (cols, rows + pad) if transposed else (rows, cols + pad)
    t = g.input(name, stored, "bf16")
    if pad:
        t = t.slice(1, 0, stored[1] - pad) if not pad % 2 else t.slice(1, pad, stored[1])
    view = (lambda x: x[:, :rows].T if not pad % 2 else x[:, pad:].T) if transposed else \
        (lambda x: x[:, :cols] if not pad % 2 else x[:, pad:])
    return (t.T if transposed else t), stored, view


# What a matmul on the matrix units issues, by fragment kind.
MATRIX_UNITS = {"wgmma": "wgmma.mma_async", "nv": "gptc_mma(cf", "mfma": "gptc_mma(cf", "mfma_x4": "gptc_mma(cf"}


def run(device, g: Graph, feeds: dict, matrix_units: bool = True) -> dict:
    plan = make_plan(g, True)
    kernels = render_plan(plan, device.target)
    if matrix_units and _mma_kind(device.target):  # each matmul launch on the matrix units, but those whose products all
        for launch, k in zip(plan.launches, kernels):  # have at most 8 rows: matrix-vector (test_gpu_gemv.py)
            shapes = [_mm_shape(plan, plan.kernels[i]) for i in launch if plan.kernels[i].family == "matmul"]
            if shapes and all(_gemv_shape(m, batch) for m, _, _, batch in shapes):
                assert "a matrix-vector product" in k.source, k.name
            elif shapes:
                assert MATRIX_UNITS[_mma_kind(device.target)] in k.code, f"{k.name} did not run on the matrix units"
    ex = load_executor(plan, device, {}, use_graph=False)
    try:
        ex.poison()
        return ex.run(feeds)
    finally:
        ex.close()


def check(out: np.ndarray, ref: np.ndarray, bound: np.ndarray, bf16_store: bool) -> None:
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "unwritten (NaN) or non-finite elements"
    tol = bound + (2.0 ** -7 * np.abs(ref) if bf16_store else 1e-5 * np.abs(ref)) + 1e-30
    err = np.abs(out.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err / tol), err.shape)
    assert (err <= tol).all(), f"max err/tol {float((err / tol)[worst]):.3g} at {worst}: {out[worst]} vs {ref[worst]}"


SIZES = [(1, 1, 1), (7, 5, 15), (33, 17, 17), (129, 100, 33), (1000, 129, 777), (67, 131, 45), (130, 257, 64),
         (257, 64, 1), (64, 200, 100)]


@pytest.mark.parametrize("a_t", [False, True], ids=["A_k", "A_m"])
@pytest.mark.parametrize("b_t", [False, True], ids=["B_n", "B_k"])
@pytest.mark.parametrize("m,n,k", SIZES)
def test_layouts_and_sizes(device, rng, m, n, k, a_t, b_t):
    g = Graph()
    a, sa, va = operand(g, "a", m, k, a_t)
    b, sb, vb = operand(g, "b", k, n, b_t)
    g.output("c", a @ b)
    feeds = {"a": bf16_values(rng, sa), "b": bf16_values(rng, sb)}
    A, B = va(feeds["a"]), vb(feeds["b"])
    out = run(device, g, {n_: v.astype(np.float32) for n_, v in feeds.items()})["c"]
    check(out, A @ B, k * 2.0 ** -22 * (np.abs(A) @ np.abs(B)), False)


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("b_t", [False, True], ids=["B_n", "B_k"])
def test_narrow_n(device, rng, n, b_t):
    m, k = 77, 19
    g = Graph()
    a, sa, va = operand(g, "a", m, k, False)
    b, sb, vb = operand(g, "b", k, n, b_t)
    g.output("c", (a @ b).cast("bf16"))
    feeds = {"a": bf16_values(rng, sa), "b": bf16_values(rng, sb)}
    A, B = va(feeds["a"]), vb(feeds["b"])
    out = run(device, g, {n_: v.astype(np.float32) for n_, v in feeds.items()})["c"]
    check(out, A @ B, k * 2.0 ** -22 * (np.abs(A) @ np.abs(B)), True)


@pytest.mark.parametrize("pad", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, True), (False, True), (True, False)])
def test_unaligned_rows(device, rng, pad, a_t, b_t):
    """Row strides and offsets of every alignment (a slice of a wider buffer, from its
    start or from column `pad`): the copies narrow from 16 bytes to 8, 4, 2."""
    m, n, k = 150, 90, 72
    g = Graph()
    a, sa, va = operand(g, "a", m, k, a_t, pad)
    b, sb, vb = operand(g, "b", k, n, b_t, pad + 1)
    g.output("c", a @ b)
    feeds = {"a": bf16_values(rng, sa), "b": bf16_values(rng, sb)}
    A, B = va(feeds["a"]), vb(feeds["b"])
    out = run(device, g, {n_: v.astype(np.float32) for n_, v in feeds.items()})["c"]
    check(out, A @ B, k * 2.0 ** -22 * (np.abs(A) @ np.abs(B)), False)


@pytest.mark.parametrize("bf16_out", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True)])
def test_batched_with_epilogue(device, rng, a_t, b_t, bf16_out):
    """(3, 67, 45) @ (3, 45, 131): bias, GELU, a residual and a scale fused in the epilogue."""
    batch, m, n, k = 3, 67, 131, 45
    g = Graph()
    sa = (batch, k, m) if a_t else (batch, m, k)
    sb = (batch, n, k) if b_t else (batch, k, n)
    a, b = g.input("a", sa, "bf16"), g.input("b", sb, "bf16")
    bias, res = g.input("bias", (n,)), g.input("res", (batch, m, n))
    y = (dsl.gelu((a.T if a_t else a) @ (b.T if b_t else b) + bias) + res) * 0.5
    g.output("y", y.cast("bf16") if bf16_out else y)
    feeds = {"a": bf16_values(rng, sa), "b": bf16_values(rng, sb),
             "bias": rng.standard_normal(n).astype(np.float64), "res": rng.standard_normal((batch, m, n))}
    feeds = {name: v.astype(np.float32).astype(np.float64) for name, v in feeds.items()}
    A = np.swapaxes(feeds["a"], 1, 2) if a_t else feeds["a"]
    B = np.swapaxes(feeds["b"], 1, 2) if b_t else feeds["b"]
    x = A @ B + feeds["bias"]
    ref = (0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))) + feeds["res"]) * 0.5
    # the accumulation error passes through GELU (slope < 1.2) and the 0.5 scale
    bound = k * 2.0 ** -22 * (np.abs(A) @ np.abs(B)) + 1e-5 * (np.abs(x) + np.abs(feeds["res"]))
    out = run(device, g, {name: v.astype(np.float32) for name, v in feeds.items()})["y"]
    check(out, ref, bound, bf16_out)


@pytest.mark.parametrize("n,f32_root", [(136, False), (136, True), (132, False), (131, True)],
                         ids=["chunks_of_8", "chunks_of_4", "chunks_of_4_n132", "single_columns"])
def test_epilogue_inputs_and_roots(device, rng, n, f32_root):
    """The fused epilogue of tests/test_mma.py epilogue_chunks_graph: inputs read a chunk
    of columns at once (an f32 bias, a bf16 residual) or a lane at a time (a scale a row,
    a transposed input), f32 and bf16 roots stored a chunk at once, a bool root a lane at
    a time; chunks of 8, of 4 (an f32 root, or n = 132) and of 1 (n = 131)."""
    from test_mma import epilogue_chunks_graph
    m, k = 200, 72
    feeds = {"a": bf16_values(rng, (m, k)), "b": bf16_values(rng, (k, n)), "bias": rng.standard_normal(n),
             "scale": rng.standard_normal((m, 1)), "res": bf16_values(rng, (m, n)), "res_t": rng.standard_normal((n, m))}
    feeds = {name: v.astype(np.float32).astype(np.float64) for name, v in feeds.items()}
    out = run(device, epilogue_chunks_graph(n, f32_root), {name: v.astype(np.float32) for name, v in feeds.items()})
    c = feeds["a"] @ feeds["b"]
    c_bound = k * 2.0 ** -22 * (np.abs(feeds["a"]) @ np.abs(feeds["b"]))
    y = (c + feeds["bias"]) * feeds["scale"] + feeds["res"] + feeds["res_t"].T
    bound = c_bound * np.abs(feeds["scale"]) + 1e-6 * (np.abs(y) + np.abs(c * feeds["scale"]))
    if f32_root:
        check(out["y"], y, bound, False)
    check(out["y16"], y, bound, True)
    decided = np.abs(c) > c_bound  # the sign of c where accumulation error cannot flip it
    assert out["negative"].dtype == np.bool_ and (out["negative"][decided] == (c < 0)[decided]).all()


@pytest.mark.parametrize("path", ["mma", "simt"])
def test_epilogue_stores_a_copy_with_padded_rows(device, rng, path, monkeypatch):
    """A bf16 copy of C stored with its rows padded to 16 bytes (precision.py's aligned
    copies: gpt2's logits) is stored by the matmul's epilogue (fusion._epilogue_legal; its
    padding neither written nor read) and read back through a slice by a row kernel, in
    chunks of 8 with a partial last one; on the device's matrix units and on the SIMT
    template (AMD's path for some targets). Small integer operands make C exact in f32
    and in bf16, so the softmax is checked to f32 rounding."""
    if path == "simt":
        from gptc.compiler.codegen import kernels
        monkeypatch.setattr(kernels, "_mma_kind", lambda target: None)
    m, n, k = 200, 131, 72
    g = Graph()
    c = g.input("a", (m, k), "bf16") @ g.input("b", (k, n), "bf16") + g.input("bias", (n,))
    g.output("softmax", dsl.softmax(c.pad(1, 0, 5).cast("bf16").slice(1, 0, n).cast("f32") * 0.25))
    plan = make_plan(g, True)
    (mm,) = [kernel for kernel in plan.kernels if kernel.family == "matmul"]
    assert [plan.graph.type(r).shape for r in mm.roots] == [(m, n + 5)] and len(plan.kernels) == 2
    feeds = {"a": rng.integers(-1, 2, (m, k)), "b": rng.integers(-1, 2, (k, n)), "bias": rng.integers(-8, 9, n)}
    feeds = {name: v.astype(np.float32) for name, v in feeds.items()}
    if path == "simt":
        assert not any(unit in k.code for k in render_plan(plan, device.target) for unit in MATRIX_UNITS.values())
    out = run(device, g, feeds, matrix_units=path == "mma")["softmax"]
    x = (feeds["a"].astype(np.float64) @ feeds["b"] + feeds["bias"]) * 0.25
    ref = np.exp(x - x.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    check(out, ref, 1e-6 * ref, False)


def test_two_matmuls_in_one_launch(device, rng):
    """Independent bf16 matmuls batched into one launch (one block size) stay right."""
    g = Graph()
    a, b = g.input("a", (100, 40), "bf16"), g.input("b", (40, 70), "bf16")
    c, d = g.input("c", (33, 17), "bf16"), g.input("d", (9, 17), "bf16")
    g.output("x", a @ b)
    g.output("y", c @ d.T)
    feeds = {n_: bf16_values(rng, s) for n_, s in (("a", (100, 40)), ("b", (40, 70)), ("c", (33, 17)), ("d", (9, 17)))}
    out = run(device, g, {n_: v.astype(np.float32) for n_, v in feeds.items()})
    A, B, C, D = feeds["a"], feeds["b"], feeds["c"], feeds["d"].T
    check(out["x"], A @ B, 40 * 2.0 ** -22 * (np.abs(A) @ np.abs(B)), False)
    check(out["y"], C @ D, 17 * 2.0 ** -22 * (np.abs(C) @ np.abs(D)), False)


@pytest.mark.parametrize("a_t,b_t", [(False, True), (True, False)], ids=["A_k-B_k", "A_m-B_n"])
def test_every_tile(device, rng, a_t, b_t):
    """Every tile, warp layout and pipeline depth the codegen may pick (kernels.tunings),
    not only its choice, on a batched product at sizes no tile divides with a fused
    epilogue (bias, GELU, residual, bf16 store), outputs poisoned. K = 328: rows 16-byte
    aligned, five whole slabs of 64 and a partial one, so both the whole-chunk copies
    (matmul_stage.hip.j2 stage_whole) and the checked ones run; on wgmma each tile both
    with TMA (boxes past the matrix read as zeros; an m- or n-contiguous operand in
    several boxes a stage) and with cp.async staging. Both operands k-contiguous, and
    both m- and n-contiguous (m 2100, n 1000: rows 16-byte aligned)."""
    from gptc.compiler.codegen.kernels import render_launch, tunings
    from gptc.runtime.build import plan_table
    from gptc.runtime.device import compile_many
    from gptc.runtime.executor import Arenas, GpuExecutor

    batch, m, n, k = 3, 2100, 1000, 328
    sa, sb = (batch, k, m) if a_t else (batch, m, k), (batch, n, k) if b_t else (batch, k, n)
    g = Graph()
    a, b = g.input("a", sa, "bf16"), g.input("b", sb, "bf16")
    bias, res = g.input("bias", (n,)), g.input("res", (batch, m, n))
    g.output("y", (dsl.gelu((a.T if a_t else a) @ (b.T if b_t else b) + bias) + res).cast("bf16"))
    feeds = {"a": bf16_values(rng, sa), "b": bf16_values(rng, sb),
             "bias": rng.standard_normal(n).astype(np.float32), "res": rng.standard_normal((batch, m, n)).astype(np.float32)}
    A = np.swapaxes(feeds["a"], 1, 2) if a_t else feeds["a"]
    B = np.swapaxes(feeds["b"], 1, 2) if b_t else feeds["b"]
    x = A @ B + feeds["bias"]
    ref = 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))) + feeds["res"]
    bound = k * 2.0 ** -22 * (np.abs(A) @ np.abs(B)) * 1.2 + 1e-5 * (np.abs(x) + np.abs(feeds["res"]))
    plan = make_plan(g, True)
    index = next(i for i, launch in enumerate(plan.launches) if plan.kernels[launch[0]].family == "matmul")
    kernels = [plan.kernels[i] for i in plan.launches[index]]
    variants = [t for t in tunings(plan, kernels[0], device.target) if "mma" in t]
    if not variants:
        pytest.skip(f"{device.target.name} has no matrix-unit matmul")
    if _mma_kind(device.target) == "wgmma":  # each tile with its operands staged by TMA (the default), and by cp.async
        variants += [{**t, "tma": False} for t in variants]
    base = render_plan(plan, device.target)
    sources = [render_launch(plan, kernels, device.target, t) for t in variants]
    codes = compile_many([(s.code, s.symbol, (), s.origin) for s in sources + base], device.target)
    code = {s.symbol: c for s, c in zip(sources + base, codes)}
    for tuning, source in zip(variants, sources):
        launch = base[:index] + [source] + base[index + 1:]
        arenas = Arenas(device, [plan_table(plan, launch)])
        ex = GpuExecutor(plan_table(plan, launch), device, code, arenas, use_graph=False)
        try:
            ex.poison()
            out = ex.run({name: v.astype(np.float32) for name, v in feeds.items()})["y"]
        finally:
            ex.close()
            arenas.close()
        try:
            check(out, ref, bound, True)
        except AssertionError as e:
            raise AssertionError(f"tile {tuning['mma']}{' (cp.async)' if 'tma' in tuning else ''}: {e}") from None
