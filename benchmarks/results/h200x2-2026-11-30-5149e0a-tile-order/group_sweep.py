"""Tile-order groups (and, with +mma, the wgmma tiles) at given shapes and layouts:
python3 benchmarks/results/<this folder>/group_sweep.py kn:8192,50264,768 kk:8192,768,50264+mma ..."""
import sys
sys.path.insert(0, "."); sys.path.insert(0, "dev")  # run from the repository root
import kernel as dk
from gptc.compiler.codegen.kernels import render_launch, tunings
from gptc.compiler.ir import Graph
from gptc.compiler.planner import make_plan
from gptc.runtime.device import open_device
def build(layout, m, n, k):
    g = Graph(); a = g.input("a", (m, k), "bf16")
    w = g.input("w", (k, n) if layout == "kn" else (n, k), "bf16")
    g.output("y", a @ (w if layout == "kn" else w.T))
    return g
device = open_device("auto")
for item in sys.argv[1:]:
    item, with_mma = item.removesuffix("+mma"), item.endswith("+mma")
    layout, shape = item.split(":")
    m, n, k = (int(x) for x in shape.split(","))
    graph = build(layout, m, n, k)
    plan = make_plan(graph, fuse=True)
    index = next(i for i, l in enumerate(plan.launches) if plan.kernels[l[0]].family == "matmul")
    kernels = [plan.kernels[i] for i in plan.launches[index]]
    choice = render_launch(plan, kernels, device.target)
    found = []
    for g in (1, 4, 8, 16, 32, 64, 1 << 20):
        t = {"group": g}
        found.append((f"group={g}", t, render_launch(plan, kernels, device.target, t)))
    if with_mma:
        for t in tunings(plan, kernels[0], device.target):
            if "mma" in t and t["mma"][4] == 4:
                for g in (1, 8, 1 << 20):
                    tt = {**t, "group": g}
                    found.append((f"mma={t['mma']} group={g}".replace(" ", ""), tt, render_launch(plan, kernels, device.target, tt)))
    dk.variants = lambda *a, found=found: found
    print(f"== {layout} {m}x{n}x{k} (codegen's choice {choice.grid}x{choice.block})", flush=True)
    dk.check_and_time(graph, plan, index, device, 30, False)
    sys.stdout.flush()
device.close()
