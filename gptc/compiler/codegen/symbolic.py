"""Index expressions as small trees, simplified as they are built, printed minimally.

The integers involved index memory: variables range over [0, bound) (a thread's element,
row or tile; a gathered token id is non-negative, with no known bound), constants
are strides, sizes and offsets. Only a pad's shifted index (i - before) can be negative,
so every rewrite that relies on non-negative operands checks their bounds first.
Division and remainder have C semantics (truncation towards zero).

The constructors `add`, `mul`, `div`, `mod`, `minimum`, `maximum` apply these rules:
- constant folding, x * 1 -> x, x * 0 -> 0, x + 0 -> x, x / 1 -> x, x % 1 -> 0;
- sums are flattened with like terms merged and terms ordered by decreasing stride
  (the row-major order of a linearised index; also a canonical form);
- (x / k) * k*c + (x % k) * c -> x * c and ((x / k) % m) * k*c + (x % k) * c ->
  (x % (k*m)) * c: an index unravelled and linearised again is the index itself;
- (k*a + b) / k -> a + b / k and (k*a + b) % k -> b % k (a, b >= 0);
  (d*a + b) / (d*m) -> a / m when 0 <= b < d;
  (x / a) / b -> x / (a*b); (x % (k*m)) / k -> (x / k) % m; (x % (k*m)) % k -> x % k;
- x / k -> 0 and x % k -> x when 0 <= x < k; min and max of ordered operands."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

Bound = Optional[int]  # None: unbounded (-inf as a lower bound, +inf as an upper one)


class Expr:
    """An integer expression (frozen, hashable: equal trees are equal keys)."""


@dataclass(frozen=True)
class Const(Expr):
    value: int


@dataclass(frozen=True)
class Var(Expr):
    name: str           # a C expression of type idx_t, printed as is
    bound: Bound = None  # 0 <= value < bound


@dataclass(frozen=True)
class Sum(Expr):
    terms: tuple[tuple[Expr, int], ...]  # (term, coefficient): no constants or sums among the terms
    const: int


@dataclass(frozen=True)
class Div(Expr):
    a: Expr
    k: int


@dataclass(frozen=True)
class Mod(Expr):
    a: Expr
    k: int


@dataclass(frozen=True)
class Min(Expr):
    a: Expr
    b: Expr


@dataclass(frozen=True)
class Max(Expr):
    a: Expr
    b: Expr


ZERO = Const(0)


def var(name: str, bound: Bound = None) -> Expr:
    """The variable `name` in [0, bound) (0 itself if that is its only value)."""
    return ZERO if bound == 1 else Var(name, bound)


def c_div(a: int, k: int) -> int:
    """C's a / k (truncation towards zero)."""
    q = abs(a) // abs(k)
    return q if (a >= 0) == (k > 0) else -q


def c_mod(a: int, k: int) -> int:
    """C's a % k (the sign of a)."""
    return a - k * c_div(a, k)


def as_expr(e: Expr | int) -> Expr:
    return Const(e) if isinstance(e, int) else e


# ----- bounds ---------------------------------------------------------------------

def bounds(e: Expr) -> tuple[Bound, Bound]:
    """Inclusive (lowest, highest) value of `e`; None where unbounded."""
    if isinstance(e, Const):
        return e.value, e.value
    if isinstance(e, Var):
        return 0, None if e.bound is None else e.bound - 1
    if isinstance(e, Sum):
        lo: Bound = e.const
        hi: Bound = e.const
        for t, c in e.terms:
            tlo, thi = bounds(t)
            if c < 0:
                tlo, thi = thi, tlo
            lo = None if lo is None or tlo is None else lo + c * tlo
            hi = None if hi is None or thi is None else hi + c * thi
        return lo, hi
    if isinstance(e, Div):  # truncation is monotonic in the dividend
        lo, hi = bounds(e.a)
        return None if lo is None else c_div(lo, e.k), None if hi is None else c_div(hi, e.k)
    if isinstance(e, Mod):
        lo, hi = bounds(e.a)
        if lo is not None and lo >= 0:
            return (lo, hi) if hi is not None and hi < e.k else (0, e.k - 1)
        return -(e.k - 1), e.k - 1
    (alo, ahi), (blo, bhi) = bounds(e.a), bounds(e.b)  # Min or Max; None: unbounded
    if isinstance(e, Min):
        return (None if alo is None or blo is None else min(alo, blo),
                bhi if ahi is None else ahi if bhi is None else min(ahi, bhi))
    if isinstance(e, Max):
        return (blo if alo is None else alo if blo is None else max(alo, blo),
                None if ahi is None or bhi is None else max(ahi, bhi))
    raise TypeError(e)


def nonnegative(e: Expr) -> bool:
    lo, _ = bounds(e)
    return lo is not None and lo >= 0


def below(e: Expr, k: int) -> bool:
    """0 <= e < k."""
    lo, hi = bounds(e)
    return lo is not None and lo >= 0 and hi is not None and hi < k


# ----- constructors (with the rewrite rules) ---------------------------------------

def _terms(e: Expr) -> tuple[list[tuple[Expr, int]], int]:
    if isinstance(e, Const):
        return [], e.value
    if isinstance(e, Sum):
        return list(e.terms), e.const
    return [(e, 1)], 0


def _sum(terms: list[tuple[Expr, int]], const: int) -> Expr:
    """The expression of merged terms, ordered by decreasing |coefficient| (then by
    their text, so the order is canonical)."""
    terms = sorted(terms, key=lambda tc: (-abs(tc[1]), emit(tc[0])))
    if not terms:
        return Const(const)
    if len(terms) == 1 and terms[0][1] == 1 and const == 0:
        return terms[0][0]
    return Sum(tuple(terms), const)


def _merge(terms: list[tuple[Expr, int]]) -> list[tuple[Expr, int]]:
    merged: dict[Expr, int] = {}
    for t, c in terms:
        merged[t] = merged.get(t, 0) + c
    return [(t, c) for t, c in merged.items() if c]


def _recombine(terms: list[tuple[Expr, int]], const: int) -> tuple[list[tuple[Expr, int]], int]:
    """Fold (x % k) * c with (x / k) * k*c into x * c, or with ((x / k) % m) * k*c into
    (x % (k*m)) * c, until no pair is left."""
    changed = True
    while changed:
        changed = False
        for i, (t, c) in enumerate(terms):
            if not isinstance(t, Mod) or not nonnegative(t.a):
                continue
            x, k = t.a, t.k
            q = div(x, k)
            for j, (u, d) in enumerate(terms):
                if d != c * k:
                    continue
                if u == q:
                    new = x
                elif isinstance(u, Mod) and u.a == q:
                    new = mod(x, k * u.k)
                else:
                    continue
                new_terms, new_const = _terms(new)
                rest = [tc for n, tc in enumerate(terms) if n not in (i, j)]
                terms = _merge(rest + [(term, c * coef) for term, coef in new_terms])
                const += c * new_const
                changed = True
                break
            if changed:
                break
    return terms, const


def add(*operands: Expr | int) -> Expr:
    terms: list[tuple[Expr, int]] = []
    const = 0
    for e in operands:
        t, k = _terms(as_expr(e))
        terms += t
        const += k
    return _sum(*_recombine(_merge(terms), const))


def mul(e: Expr | int, k: int) -> Expr:
    e = as_expr(e)
    if k == 0:
        return ZERO
    terms, const = _terms(e)
    return _sum([(t, c * k) for t, c in terms], const * k)


def _split(e: Expr, k: int) -> tuple[Expr, Expr] | None:
    """(a, b) with e = k*a + b, a and b non-negative, if e has terms divisible by k."""
    terms, const = _terms(e)
    whole = [(t, c // k) for t, c in terms if c % k == 0]
    rest = [(t, c) for t, c in terms if c % k]
    if not whole and const < k:
        return None
    a, b = _sum(whole, const // k), _sum(rest, const % k)
    return (a, b) if nonnegative(a) and nonnegative(b) else None


def div(e: Expr | int, k: int) -> Expr:
    assert k > 0, "division by a positive constant"
    e = as_expr(e)
    if k == 1:
        return e
    if isinstance(e, Const):
        return Const(c_div(e.value, k))
    if below(e, k):
        return ZERO
    if not nonnegative(e):
        return Div(e, k)
    if isinstance(e, Div):
        return div(e.a, e.k * k)
    if isinstance(e, Mod) and e.k % k == 0:
        return mod(div(e.a, k), e.k // k)
    split = _split(e, k)
    if split is not None:
        return add(split[0], div(split[1], k))
    for d in sorted({math.gcd(k, c) for _, c in _terms(e)[0]} - {1, k}, reverse=True):
        # e = d*a + b with 0 <= b < d: e / (d*m) = a / m (the row of a flat index)
        terms, const = _terms(e)
        if below(_sum([(t, c) for t, c in terms if c % d], const % d), d):
            return div(_sum([(t, c // d) for t, c in terms if c % d == 0], const // d), k // d)
    return Div(e, k)


def mod(e: Expr | int, k: int) -> Expr:
    assert k > 0, "remainder by a positive constant"
    e = as_expr(e)
    if k == 1:
        return ZERO
    if isinstance(e, Const):
        return Const(c_mod(e.value, k))
    if below(e, k):
        return e
    if not nonnegative(e):
        return Mod(e, k)
    if isinstance(e, Mod) and e.k % k == 0:
        return mod(e.a, k)
    split = _split(e, k)
    if split is not None:
        return mod(split[1], k)
    return Mod(e, k)


def minimum(a: Expr | int, b: Expr | int) -> Expr:
    a, b = as_expr(a), as_expr(b)
    (alo, ahi), (blo, bhi) = bounds(a), bounds(b)
    if ahi is not None and blo is not None and ahi <= blo:
        return a
    if bhi is not None and alo is not None and bhi <= alo:
        return b
    return Min(a, b)


def maximum(a: Expr | int, b: Expr | int) -> Expr:
    a, b = as_expr(a), as_expr(b)
    (alo, ahi), (blo, bhi) = bounds(a), bounds(b)
    if alo is not None and bhi is not None and alo >= bhi:
        return a
    if blo is not None and ahi is not None and blo >= ahi:
        return b
    return Max(a, b)


def in_range(e: Expr, lo: int, hi: int) -> str:
    """The C condition lo <= e < hi, without the comparisons the bounds of e decide
    ("true" or "false" if they decide both)."""
    elo, ehi = bounds(e)
    if (ehi is not None and ehi < lo) or (elo is not None and elo >= hi):
        return "false"
    tests = []
    if elo is None or elo < lo:
        tests.append(f"{emit(e)} >= {lo}")
    if ehi is None or ehi >= hi:
        tests.append(f"{emit(e)} < {hi}")
    return " && ".join(tests) or "true"


def variables(e: Expr) -> set[Var]:
    """The variables that occur in `e`."""
    if isinstance(e, Var):
        return {e}
    if isinstance(e, Sum):
        return set().union(*(variables(t) for t, _ in e.terms))
    if isinstance(e, (Div, Mod)):
        return variables(e.a)
    if isinstance(e, (Min, Max)):
        return variables(e.a) | variables(e.b)
    return set()


def lane_base(e: Expr, lane: Var, chunk: Var, width: int) -> Expr | None:
    """`e` at `chunk` instead of `lane` (a variable of lane's name) where e = lane + (terms
    and a constant that are multiples of `width`), else None: an offset that moves with the lane variable one
    element at a time, so `width` consecutive lanes from an aligned chunk start (a
    multiple of `width`) read or write `width` consecutive, aligned elements."""
    terms, const = _terms(e)
    named = lambda t: isinstance(t, Var) and t.name == lane.name  # noqa: E731  (whatever bound a view gave it)
    rest = [(t, c) for t, c in terms if not named(t)]
    if len(rest) != len(terms) - 1 or any(c != 1 for t, c in terms if named(t)) or const % width \
            or any(c % width or lane.name in {v.name for v in variables(t)} for t, c in rest):
        return None
    return add(chunk, *[mul(t, c) for t, c in rest], const)


# ----- printing -------------------------------------------------------------------

def emit(e: Expr) -> str:
    """C text of `e`, without redundant parentheses."""
    if isinstance(e, Const):
        return str(e.value)
    if isinstance(e, Var):
        return e.name
    if isinstance(e, Div):
        return f"{atom(e.a)} / {e.k}"
    if isinstance(e, Mod):
        return f"{atom(e.a)} % {e.k}"
    if isinstance(e, (Min, Max)):
        return f"{'min' if isinstance(e, Min) else 'max'}({emit(e.a)}, {emit(e.b)})"
    if isinstance(e, Sum):
        text = ""
        for n, (t, c) in enumerate(e.terms):
            term = emit(t) if abs(c) == 1 else f"{atom(t)} * {abs(c)}"
            text += ("-" if c < 0 else "") + term if n == 0 else (" - " if c < 0 else " + ") + term
        if e.const:
            text += f" - {-e.const}" if e.const < 0 else f" + {e.const}"
        return text
    raise TypeError(e)


def atom(e: Expr) -> str:
    """`e` as an operand of *, / or % (or of a cast): bracketed unless it is a name, a
    number or a call, so a product reads unambiguously: (i / 32) % 4."""
    simple = isinstance(e, (Var, Min, Max)) or (isinstance(e, Const) and e.value >= 0)
    return emit(e) if simple else f"({emit(e)})"
