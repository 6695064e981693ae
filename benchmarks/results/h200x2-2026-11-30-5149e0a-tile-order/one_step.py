"""gpt2 bf16 train: `--symbols NAME...` prints a regex of the symbols of the launches whose
names start with NAME (for ncu -k); without it, runs one step without a device graph."""
import sys
from dataclasses import replace
sys.path.insert(0, ".")
import numpy as np
from gptc.models import build_graph, init_params
from gptc.compiler.planner import make_plan
from gptc.compiler.codegen.kernels import render_plan
from gptc.tools.bench.config import resolve_spec
from gptc.target import parse_target
spec, _ = resolve_spec("gpt2", None)
spec = replace(spec, train=replace(spec.train, precision="bf16"))
graph = build_graph(spec, "train")
plan = make_plan(graph)
if sys.argv[1:2] == ["--symbols"]:
    syms = []
    for l in render_plan(plan, parse_target("cuda:sm_90")):
        if any(l.name == n or l.name.startswith(n + "_") for n in sys.argv[2:]):
            print(l.name, l.symbol, l.grid, l.block, file=sys.stderr)
            syms.append(l.symbol)
    print("|".join(sorted(set(syms))))
    sys.exit()
from gptc.runtime.build import load_executor
from gptc.runtime.device import open_device
dev = open_device("auto")
params = init_params(graph, 0)
ex = load_executor(plan, dev, params, use_graph=False)
rng = np.random.default_rng(0)
tok = rng.integers(0, 50257, (8, 1024)).astype(np.int32)
out = ex.run({"tokens": tok, "targets": tok, "lr": np.float32(1e-4), "step": np.float32(1)})
print("loss", float(out["loss"]))
ex.close()
