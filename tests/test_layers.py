"""The package's layers point one way. Walks every import in gptc/ (module level and
inside functions alike) and fails on an import that reaches up a layer, or on a cycle."""
from __future__ import annotations

import ast
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gptc"

# Bottom to top: a module may import from its own floor and the floors below it.
FLOORS = [
    ["gptc.common"],
    ["gptc.target", "gptc.spec"],
    ["gptc.compiler.strides", "gptc.compiler.ops"],
    ["gptc.compiler.ir"],
    ["gptc.compiler.dsl", "gptc.compiler.autodiff"],
    ["gptc.compiler.optim", "gptc.compiler.precision", "gptc.compiler.parallel"],  # the passes after autodiff
    ["gptc.compiler.planner"],
    ["gptc.compiler.codegen"],
    ["gptc.compiler"],           # the package's own __init__
    ["gptc.models"],
    ["gptc.runtime"],
    ["gptc.tools"],
    ["gptc", "gptc.__main__"],   # the public facade and the entry point
]


def floor_of(module: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The gptc modules `path` imports (a `from pkg import name` counts name when it is
    a module, else pkg)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gptc"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "gptc":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def import_graph() -> nx.DiGraph:
    mods = package_modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for target in imports_of(path, set(mods)):
            if target != name:
                g.add_edge(name, target)
    return g


def test_no_import_reaches_up_a_layer():
    g = import_graph()
    upward = [f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
              for a, b in g.edges if floor_of(b) > floor_of(a)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g = import_graph()
    # a package's __init__ importing its own submodules is how packages re-export; a
    # submodule importing its package's __init__ back is a cycle like any other
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles)


def test_every_package_is_shipped():
    shipped = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert packages <= shipped, f"packages missing from pyproject.toml: {sorted(packages - shipped)}"


def test_floors_detect_an_upward_import():
    # the check itself can fail: the planner reaching into codegen is upward
    assert floor_of("gptc.compiler.codegen.kernels") > floor_of("gptc.compiler.planner.fusion")
    assert floor_of("gptc.tools.train") > floor_of("gptc.runtime.device") > floor_of("gptc.compiler.ir")


def module_level_imports(path: Path) -> set[str]:
    """Top-level packages `path` imports outside any function (inside try/except too):
    what `import gptc...` needs installed."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, (ast.Try, ast.If)):  # try: import tomllib / except: import tomli
            nodes += node.body + node.orelse + getattr(node, "finalbody", [])
            nodes += [n for h in getattr(node, "handlers", []) for n in h.body]
    return found


IMPORT_NAME = {"cuda_bindings": "cuda", "hip_python": "hip", "nvidia_cuda_nvrtc": "nvidia"}


def test_every_module_level_import_is_a_declared_dependency():
    """`import gptc` must work wherever pip installed gptc: a third-party package imported
    at module level is in pyproject's dependencies (tomli, for Python 3.10, was not)."""
    import re
    import sys
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda specs: {re.split(r"[<>=!;\[ ]", d)[0].strip().lower().replace("-", "_") for d in specs}  # noqa: E731
    declared = names(project["dependencies"])
    # what the extras install, by import name: modules that import these are imported lazily
    optional = {IMPORT_NAME.get(n, n) for extra in project["optional-dependencies"].values() for n in names(extra)}
    # Python 3.10's standard library has no tomllib: that name needs the tomli backport
    stdlib = set(sys.stdlib_module_names) - {"tomllib"}
    imported = set().union(*(module_level_imports(p) for p in PACKAGE.rglob("*.py")))
    third_party = {m for m in imported if m not in stdlib and m not in ("gptc", "__future__")}
    missing = sorted(m for m in third_party - declared - optional if m != "tomllib")
    assert not missing, f"imported by gptc at module level but not declared in pyproject.toml: {missing}"
    assert "tomli" in declared
