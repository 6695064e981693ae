"""Names in generated kernels: parameters named by the role of the buffer they pass.

Kernels are rendered with positional placeholders (gptc_arg<N> for the launch's
parameters, gptc_farg<N> for the parameters of a function shared by batched parts,
gptc_fn<N> for those functions). The code the compiler gets keeps them, so kernels that
differ only in which buffers they touch (a repeated layer) have identical code and
compile once. The source a person reads has them replaced by role names:
- a graph input, param or state by its name: `tokens`, `lr`, `wte`,
  `h_0_attn_c_attn_weight`, `m_wte` (AdamW's first moment of wte), `k_cache_0`;
- a graph output by `out_` and its name: `out_loss`;
- any other value by its node id, the last part of its scope and its op:
  `t93_layernorm_add` (#bwd scopes end in `_bwd`).
A name never equals another identifier of the kernel (the template's locals, the
prelude's names, C++ keywords) or another parameter: it gets a suffix _2, _3, ...
Names depend only on the graph and the order of first use, so they are deterministic."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from gptc.compiler.planner.schedule import Plan

PLACEHOLDER = re.compile(r"\bgptc_(?:arg|farg|fn)\d+\b")
ARG = re.compile(r"\bgptc_arg\d+\b")
IDENTIFIER = re.compile(r"(?<![.\w])[A-Za-z_]\w*")  # not a member (threadIdx.x)
# C++ keywords a name could spell (the others are no sanitised graph name).
KEYWORDS = frozenset("""auto bool break case char class const continue default delete do double else enum extern
false float for goto if inline int long namespace new operator private protected public register return short
signed sizeof static struct switch template this true typedef typename union unsigned using virtual void
volatile while""".split())


def arg(n: int) -> str:
    return f"gptc_arg{n}"


def farg(n: int) -> str:
    return f"gptc_farg{n}"


def fn(n: int) -> str:
    return f"gptc_fn{n}"


def sanitize(text: str) -> str:
    """`text` as a C identifier: runs of other characters become one underscore."""
    name = re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_") or "x"
    return f"_{name}" if name[0].isdigit() else name


def buffer_names(plan: Plan, node: int) -> tuple[str, ...]:
    """Names of the buffer of `node`, from the most specific (its role) to the most
    generic (its kind: a function shared by several parts names a parameter by the
    most specific name that all of them agree on)."""
    g = plan.graph
    for table in (g.inputs, g.params, g.states):
        for name, nid in table.items():
            if nid == node:
                return sanitize(name), "param" if table is g.params else sanitize(name.split(".")[0])
    for name, nid in g.outputs.items():
        if plan.aliases.get(nid, nid) == node:
            return (f"out_{sanitize(name)}", "out")
    n = g.node(node)
    scope = n["scope"].split("/")[-1]
    label = sanitize(f"{scope}_{n['op']}") if scope else n["op"]
    return (f"t{node}_{label}", label, "grad" if scope.endswith("#bwd") else "t")


def taken_names(code: str, prelude: str) -> set[str]:
    """Names a parameter must not take: the identifiers of a kernel's `code` (without
    its prelude; placeholders aside), the prelude's global names (macros, types,
    functions; its functions' own parameters are out of the kernel's scope) and the
    keywords."""
    prelude = re.sub(r"//.*", "", prelude)
    globals_ = re.findall(r"#define\s+(\w+)|\b(\w+)\s*\(|\bstruct\s+(\w+)|\btypedef\b[^;]*\b(\w+)\s*;", prelude)
    found = {name for match in globals_ for name in match if name}
    return (set(IDENTIFIER.findall(code)) - set(PLACEHOLDER.findall(code))) | found | KEYWORDS


def unique(name: str, taken: set[str]) -> str:
    """`name`, or `name_2`, `name_3`, ... whichever is not taken yet (then taken)."""
    result, k = name, 2
    while result in taken:
        result, k = f"{name}_{k}", k + 1
    taken.add(result)
    return result


def agreed_name(candidates: Sequence[Sequence[str]]) -> str:
    """The most specific name all candidate lists (one per part) share at one level."""
    for level in range(max(len(c) for c in candidates)):
        names = {c[min(level, len(c) - 1)] for c in candidates}
        if len(names) == 1:
            return names.pop()
    return "buf"


def substitute(text: str, names: dict[str, str]) -> str:
    """Replace the placeholders of `text` that `names` names."""
    return PLACEHOLDER.sub(lambda m: names.get(m.group(0), m.group(0)), text)


def wrap(items: Iterable[str], first: str, indent: str, width: int = 100) -> list[str]:
    """`first` followed by `items` separated by ", ", wrapped into lines of at most
    `width` characters where the items allow (continuation lines start with `indent`)."""
    lines, line = [], first
    for item in items:
        if len(line) + len(item) + 2 <= width or line == indent:
            line += item if line == first else ", " + item
        elif line == first:  # even the first item does not fit after `first`
            lines.append(first.rstrip())
            line = indent + item
        else:
            lines.append(line + ",")
            line = indent + item
    return lines + [line]
