"""Time gpt2 bf16 row kernels with float_to_bf16 by cvt.rn.bf16.f32 (hw) and by bit operations (sw)."""
import sys, re, dataclasses, statistics
sys.path.insert(0, '.')
from gptc.target import parse_target
from gptc.compiler.planner import make_plan
from gptc.compiler.codegen.kernels import render_plan
from gptc.spec import preset
from gptc.models import build_graph
from gptc.runtime.device import open_device, ptr
from gptc.runtime.cuda import compile_source
spec = preset("gpt2")
spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, precision="bf16"))
plan = make_plan(build_graph(spec, "train", 8), True)
dev = open_device("cuda")
ks = render_plan(plan, dev.target)
HW = "#if GPTC_CUDA && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800\n  asm(\"cvt.rn.bf16.f32"
picked = [k for k in ks if k.name in ("k140_row", "k137_row", "k221_row") or (k.family == "row" and "cross_entropy" in k.origin and k.grid[0] > 1000)]
for k in picked:
    bufs = {a: dev.alloc(plan.buffer_of(a).nbytes) for a in k.args}
    for a, p in bufs.items():
        dev.memset(p, 0 if plan.buffer_of(a).dtype == "i32" else 0x3C, plan.buffer_of(a).nbytes)
    res = {}
    for variant in ("hw", "sw", "hw", "sw"):
        code = k.code if variant == "hw" else k.code.replace(HW, "#if 0\n" + HW.split("\n")[1])
        fn = dev.get_function(dev.load_module(compile_source(code, k.symbol, "sm_90", ["-std=c++17", "-DWARP_SIZE=32"])), k.symbol)
        launch = dev.prepare_launch(fn, k.grid, k.block, k.shared_bytes, [ptr(bufs[a]) for a in k.args], name=k.name)
        for _ in range(20): launch()
        times = []
        for _ in range(50):
            e0, e1 = dev.event(), dev.event()
            dev.record(e0); launch(); dev.record(e1)
            times.append(dev.elapsed_ms(e0, e1))
        res.setdefault(variant, []).append(statistics.median(times))
    print(k.name, k.grid, {v: [round(t * 1000, 1) for t in ts] for v, ts in res.items()}, "us", k.origin[:90], flush=True)
