"""RMSNorm, ScaleNorm, the sinusoidal position table, SiLU and SwiGLU (model.norm,
model.pos, model.ffn options) against float64 central finite differences, with
test_ops_grad.py's machinery; ScaleNorm at a zero row (a zero gradient, not NaN); the
sinusoidal table against its closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gptc import dsl
from gptc.compiler.ir import Graph
from gptc.runtime.reference import run_graph
from test_ops_grad import _single_grad, normal

def _values(build, inputs: dict) -> np.ndarray:
    g = Graph()
    t = {n: g.input(n, a.shape) for n, a in inputs.items()}
    g.output("y", build(g, t))
    return run_graph(g, inputs, np.float64)["outputs"]["y"]


def test_forward_values_closed_form() -> None:
    x, w, gu = normal(3, 8), normal(8), normal(4, 6)
    rms = _values(lambda g, t: dsl.rmsnorm(t["x"], t["w"], 1e-5), {"x": x, "w": w})
    assert np.allclose(rms, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-12)
    sn = _values(lambda g, t: dsl.scalenorm(t["x"], t["g"], 1e-5), {"x": x, "g": np.array([1.7])})
    assert np.allclose(sn, 1.7 * x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-12)
    sw = _values(lambda g, t: dsl.swiglu(t["gu"]), {"gu": gu})
    gate, up = gu[:, :3], gu[:, 3:]
    assert np.allclose(sw, gate / (1 + np.exp(-gate)) * up, rtol=1e-12)


def test_scalenorm_zero_row_has_zero_gradient() -> None:
    """A zero row is below eps, where ScaleNorm is linear (x * gain / eps): no NaN from
    0 / ||0||, no gradient through the norm (the max's eps branch is constant), and the
    row adds nothing to the gain's gradient. _single_grad projects on R = 1."""
    x = normal(3, 5)
    x[1] = 0.0
    inputs = {"x": x, "g": np.array([2.0])}
    build = lambda g, t: dsl.scalenorm(t["x"], t["g"])  # noqa: E731
    dx, dg = _single_grad(build, inputs, "x"), _single_grad(build, inputs, "g")
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dg))
    assert np.array_equal(dx[1], np.full(5, 2.0 / 1e-5))
    others = x[[0, 2]]
    expected = (others / np.linalg.norm(others, axis=-1, keepdims=True)).sum()  # d sum(out) / d gain
    assert dg.shape == (1,) and math.isclose(dg[0], expected, rel_tol=1e-12)


@pytest.mark.parametrize("dims,base", [(8, 10000.0), (6, 100.0), (32, 10000.0)])
def test_sinusoidal_table_closed_form(dims: int, base: float) -> None:
    positions = np.array([0, 1, 2, 7, 30, 511], dtype=np.int32)
    g = Graph()
    g.output("t", dsl.sinusoidal_table(g.input("p", positions.shape, "i32"), dims, base))
    table = run_graph(g, {"p": positions}, np.float64)["outputs"]["t"]
    p = positions[:, None].astype(np.float64)
    i = np.arange(dims // 2)[None, :]
    angle = p / base ** (2 * i / dims)
    expected = np.zeros((len(positions), dims))
    expected[:, 0::2], expected[:, 1::2] = np.sin(angle), np.cos(angle)
    assert np.allclose(table, expected, rtol=0, atol=1e-9)
