"""Times the flash kernels (fp32 SIMT vs bf16 matrix units) at gpt2's attention shape."""
import sys, time
sys.path.insert(0, "tests")
import numpy as np
from test_attention_bf16 import attention_graph
from test_gpu_kernels import random_feeds
from gptc.compiler.planner import make_plan
from gptc.runtime.build import load_executor
from gptc.runtime.device import open_device
from gptc.tools.bench.measure import device_timer
dev = open_device("auto")
timer = device_timer(dev)
B, H, T, D = 8, 12, 1024, 64
for dim in (64, 128):
    heads = H if dim == 64 else 6
    for precision in ("fp32", "bf16"):
        g = attention_graph(seq=T, dim=dim, heads=heads, precision=precision, batch=B)
        plan = make_plan(g, True)
        feeds = random_feeds(g, np.random.default_rng(0))
        ex = load_executor(plan, dev, {n: feeds[n] for n in g.params}, use_graph=False)
        ex.run({n: feeds[n] for n in g.inputs})
        for li, launch in enumerate(plan.launches):
            fams = {plan.kernels[k].family for k in launch}
            if not fams & {"attention", "attention_bwd"}:
                continue
            a, b = timer.event(), timer.event()
            timer.record(a)
            for _ in range(10):
                ex.run_kernel(li)
            timer.record(b)
            ms = timer.elapsed_ms(a, b) / 10
            flops = 2 * 2 * B * heads * T * T * dim / 2 * (2.5 if "attention_bwd" in fams else 1.0)
            print(f"{precision} head_dim {dim} B{B} H{heads} T{T} {sorted(fams)}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s (causal)")
        ex.close()
