"""Sweep wgmma variants over shapes: python3 benchmarks/results/<this folder>/mm_sweep.py matmul_bf16:8192,3072,768 ..."""
import sys, time
sys.path.insert(0, "."); sys.path.insert(0, "dev")  # run from the repository root
import kernel as dk
from gptc.compiler.planner import make_plan
from gptc.runtime.device import open_device
orig = dk.variants
def filtered(plan, index, target):
    found = orig(plan, index, target)
    best = {}
    for label, tuning, src in found:
        if "mma" in tuning:
            t = tuning["mma"]; best[t[:4]] = max(best.get(t[:4], 0), t[4])
    keep = []
    for label, tuning, src in found:
        if not tuning:
            keep.append((label, tuning, src)); continue
        if "mma" not in tuning:
            continue
        t = tuning["mma"]
        if t[4] in (4, best[t[:4]]):
            keep.append((label, tuning, src))
    return keep
dk.variants = filtered
device = open_device("auto")
for item in sys.argv[1:]:
    fam, shape = item.split(":")
    shape = tuple(int(x) for x in shape.split(","))
    graph = dk.FAMILIES[fam][0](*shape)
    plan = make_plan(graph, fuse=True)
    index = next(i for i, l in enumerate(plan.launches) if plan.kernels[l[0]].family == "matmul")
    found = filtered(plan, index, device.target)
    t0 = time.time()
    dk.compile_many([(s.code, s.symbol, (), s.origin) for _, _, s in found], device.target)
    print(f"== {fam} {shape}: {len(found)} variants compiled in {time.time() - t0:.1f} s", flush=True)
    dk.check_and_time(graph, plan, index, device, 50, False)
    sys.stdout.flush()
device.close()
