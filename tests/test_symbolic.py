"""The index-expression simplifier (gptc/compiler/codegen/symbolic.py): random
expressions, built by the simplifying constructors and printed as C, evaluate to the
same values as the unsimplified expressions, at random values of their variables
(property tests: C's truncating division and remainder, negative intermediates
included); and the printed forms of the patterns the codegen builds."""
from __future__ import annotations

import random

import pytest

from gptc.compiler.codegen import indexing
from gptc.compiler.codegen.symbolic import (Var, add, atom, bounds, c_div, c_mod, div, emit, in_range, lane_base,
                                            maximum, minimum, mod, mul)

DIVISORS = (1, 2, 3, 4, 5, 8, 12, 16, 32, 64, 128)


class CInt(int):
    """An int with C's / and % (truncation), to evaluate printed expressions."""

    def __add__(self, o): return CInt(int(self) + int(o))
    def __radd__(self, o): return CInt(int(o) + int(self))
    def __sub__(self, o): return CInt(int(self) - int(o))
    def __rsub__(self, o): return CInt(int(o) - int(self))
    def __mul__(self, o): return CInt(int(self) * int(o))
    def __rmul__(self, o): return CInt(int(o) * int(self))
    def __neg__(self): return CInt(-int(self))
    def __truediv__(self, o): return CInt(c_div(int(self), int(o)))
    def __mod__(self, o): return CInt(c_mod(int(self), int(o)))


def c_eval(text: str, env: dict[str, int]) -> int:
    """Python and C agree on the precedence and associativity of + - * / % and unary -."""
    calls = {"min": lambda a, b: CInt(min(a, b)), "max": lambda a, b: CInt(max(a, b))}
    return int(eval(text, calls, {k: CInt(v) for k, v in env.items()}))


def random_case(rng: random.Random, depth: int, variables: list[Var]):
    """(expression built by the simplifying constructors, evaluator of the same
    expression without simplification)."""
    choice = rng.random() if depth > 0 else rng.random() * 0.3
    if choice < 0.2:
        v = rng.choice(variables)
        return v, lambda env: env[v.name]
    if choice < 0.3:
        k = rng.choice((0, 1, 2, 5, 7, 32, 100, -3, -64))
        return add(k), lambda env: k
    a, fa = random_case(rng, depth - 1, variables)
    if choice < 0.45:
        b, fb = random_case(rng, depth - 1, variables)
        sign = rng.choice((1, -1)) if rng.random() < 0.2 else 1
        return add(a, mul(b, sign)), lambda env: fa(env) + sign * fb(env)
    if choice < 0.55:
        k = rng.choice(DIVISORS + (0, -1))
        return mul(a, k), lambda env: fa(env) * k
    if choice < 0.68:
        k = rng.choice(DIVISORS)
        return div(a, k), lambda env: c_div(fa(env), k)
    if choice < 0.8:
        k = rng.choice(DIVISORS)
        return mod(a, k), lambda env: c_mod(fa(env), k)
    if choice < 0.86:
        b, fb = random_case(rng, depth - 1, variables)
        op = rng.choice((minimum, maximum))
        py = min if op is minimum else max
        return op(a, b), lambda env: py(fa(env), fb(env))
    # An index unravelled into a shape and linearised again, possibly through a
    # reshape to another shape of the same size (what views produce).
    shape = [rng.choice((1, 2, 3, 4, 8, 32)) for _ in range(rng.randint(1, 4))]
    size = 1
    for d in shape:
        size *= d
    idx = indexing.unravel(mod(a, size), shape)
    if rng.random() < 0.5:
        shape2 = shape[::-1]
        idx = indexing.unravel(indexing.linearize(idx, shape), shape2)
        shape = shape2
    return indexing.linearize(idx, shape), lambda env: c_mod(fa(env), size)


@pytest.mark.parametrize("seed", range(40))
def test_simplified_expressions_keep_their_values(seed):
    rng = random.Random(seed)
    variables = [Var("i", 1 << rng.randint(3, 20)), Var("j", rng.choice((3, 32, 129))), Var("t")]
    for _ in range(50):
        e, reference = random_case(rng, rng.randint(1, 5), variables)
        text = emit(e)
        for _ in range(20):
            env = {v.name: rng.randrange(v.bound if v.bound else 10**6) for v in variables}
            want = reference(env)
            assert c_eval(text, env) == want, f"{text} at {env}"
            assert c_eval(atom(e), env) == want
            lo, hi = bounds(e)
            assert (lo is None or lo <= want) and (hi is None or want <= hi), f"{text}: {want} outside {lo}..{hi}"


@pytest.mark.parametrize("seed", range(10))
def test_in_range_conditions(seed):
    rng = random.Random(seed)
    i = Var("i", 384)
    for _ in range(100):
        e = add(mod(i, rng.choice((32, 128, 384))), rng.randint(-200, 200))
        lo = rng.randint(-50, 300)
        hi = lo + rng.randint(1, 300)
        cond = in_range(e, lo, hi).replace("&&", "and").replace("true", "True").replace("false", "False")
        for value in range(0, 384, 7):
            want = lo <= c_eval(emit(e), {"i": value}) < hi
            assert eval(cond, {}, {"i": CInt(value)}) == want, (cond, value)


def test_printed_forms():
    i, row, j = Var("i", 393216), Var("row", 1024), Var("j", 5000)
    # unravel then linearise: the index itself
    assert emit(indexing.linearize(indexing.unravel(i, (32, 32, 384)), (32, 32, 384))) == "i"
    # (x / k) * k + x % k -> x, with a common stride
    assert emit(add(mul(add(mul(div(row, 32), 32), mod(row, 32)), 5000), j)) == "row * 5000 + j"
    # ((x / k) % m) * k + x % k -> x % (k*m)
    assert emit(add(mul(mod(div(i, 32), 4), 32), mod(i, 32))) == "i % 128"
    # x * 1, x + 0, x / 1, x % 1, constants
    assert emit(add(mul(i, 1), 0)) == "i" and emit(div(i, 1)) == "i" and emit(mod(i, 1)) == "0"
    assert emit(add(mul(add(3), 4), 5)) == "17"
    # a % n and a / n when a < n is known
    assert emit(mod(j, 5000)) == "j" and emit(div(j, 5000)) == "0" and emit(mod(div(i, 384), 1024)) == "i / 384"
    # nested division and remainder
    assert emit(div(div(i, 32), 4)) == "i / 128" and emit(div(mod(i, 384), 128)) == "(i / 128) % 3"
    assert emit(mod(add(mul(i, 64), j), 32)) == "j % 32" and emit(div(add(mul(i, 64), 3), 64)) == "i"
    # a clamp the bounds decide, and minimal parentheses
    assert emit(minimum(maximum(add(mod(i, 384), -256), 0), 127)) == "max(i % 384 - 256, 0)"
    assert emit(add(mul(div(i, 4096), 4096), mul(mod(div(i, 32), 4), 1024))) == "(i / 4096) * 4096 + ((i / 32) % 4) * 1024"
    # a negative operand is never simplified by the rules that need a non-negative one
    assert emit(div(add(i, -5), 2)) == "(i - 5) / 2"


def test_lane_base():
    """An offset that moves with the lane one element at a time from a multiple of the
    width gives its chunk's offset; any other does not (None)."""
    gm, gn, gc, batch = Var("gm", 8192), Var("gn", 3072), Var("gc", 3072), Var("batch", 3)
    base = lambda e: lane_base(e, gn, gc, 8)  # noqa: E731
    assert emit(base(gn)) == "gc"
    assert emit(base(add(mul(gm, 3072), gn))) == "gm * 3072 + gc"
    assert emit(base(add(mul(batch, 589824), mul(gm, 768), gn, 16))) == "batch * 589824 + gm * 768 + gc + 16"
    # the row of a (..., m, n) view of a (B, T, C) tensor: unravelled and linearised, the same offset
    gn768, gc768 = Var("gn", 768), Var("gc", 768)
    element = indexing.unravel(add(mul(gm, 768), gn768), (8, 1024, 768))
    assert emit(lane_base(indexing.linearize(element, (8, 1024, 768)), gn768, gc768, 8)) == "gm * 768 + gc"
    assert base(gm) is None                                   # broadcast along the lanes: each reads one element
    assert base(add(mul(gn, 8192), gm)) is None               # transposed: the lanes 8192 elements apart
    assert base(add(mul(gm, 3071), gn)) is None               # rows not a multiple of 8 apart
    assert base(add(mul(gm, 3072), gn, 4)) is None            # a chunk would start mid-vector
    assert base(add(mul(gm, 3072), mul(gn, 2))) is None       # every other element
    assert base(add(mul(gm, 3072), gn, mul(mod(gn, 4), 8))) is None  # gn also inside another term
